"""Stage 3's outputs: per-neuron records, example thumbnails and sprites, the HTML atlas.

* :func:`neuron_records` turns the per-neuron arrays of ``sae_summarize.neuron_stats``
  into the ``neurons.jsonl`` objects (contract fields listed in DESIGN.md / the issue);
* :func:`render_examples` draws every neuron's top examples with their activation heat
  (``thumbs/``) and one strip per neuron (``sprites/``), batched in numpy/torch;
* :func:`write_index_html` builds ``index.html`` from ``neurons.jsonl`` (and
  ``llm_output.jsonl`` when stage 4 has run): one self-contained page, no network.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from . import stats
from .artifacts import atomic_write_bytes, read_jsonl

HEAT_RGB = np.array([0.9, 0.05, 0.05])  # overlay colour of the activation heat
SPRITE_GAP = 2                           # pixels between thumbnails in a sprite


# ----------------------------------------------------------------------------- records
def _class_entries(idx: np.ndarray, st: dict, i: int, names: list[str], keys: tuple[str, ...]) -> list[dict]:
    out = []
    for c in idx:
        entry = {"class": names[c], "index": int(c)}
        for key in keys:
            entry[key] = round(float(st[key][i, c]), 4)
        if "counts" in keys:
            entry["count"] = int(entry.pop("counts"))
        out.append(entry)
    return out


def neuron_records(st: dict, class_names: list[str], examples: list[list[dict]], parts: dict | None = None,
                   n_top: int = 5, n_anti: int = 3, weak_pmi: float = 0.5) -> list[dict]:
    """One ``neurons.jsonl`` object per neuron.

    Parameters
    ----------
    st : per-neuron arrays from ``sae_summarize.neuron_stats`` (M,) and (M, C).
    examples : per neuron, its ``top_examples`` entries ({image_index, activation, class, thumb}).
    parts : optional per-neuron concept-recovery arrays {best_part, auroc, in_box_share}.
    """
    # top classes: classes the neuron was on for, most specific first; anti: lowest PMI, then most negative lens
    order_top = np.argsort(-st["pmi"], axis=1, kind="stable")
    order_anti = np.lexsort((st["lens"], st["pmi"]), axis=1)
    pos = st["position"]
    records = []
    for i in range(len(st["tau"])):
        top = [c for c in order_top[i] if st["counts"][i, c] > 0][:n_top]
        rec = {"neuron_id": i, "dead": bool(st["dead"][i]), "threshold": float(st["tau"][i]),
               "frequency": float(st["frequency"][i]), "image_frequency": float(st["image_frequency"][i]),
               "token_frequency": float(st["token_frequency"][i]), "dense_frequency": float(st["dense_frequency"][i]),
               "mean_on_activation": float(st["mean_on_activation"][i]), "max_activation": float(st["max_activation"][i]),
               "score": float(st["score"][i]),
               "score_class": class_names[st["best_class"][i]] if st["best_class"][i] >= 0 else None,
               "top_classes": _class_entries(top, st, i, class_names,
                                             ("pmi", "p_class_given_on", "lens", "knockout", "counts")),
               "anti_classes": _class_entries(order_anti[i][:n_anti], st, i, class_names, ("pmi", "lens")),
               "where": {"row": round(float(pos["row"][i]), 4), "col": round(float(pos["col"][i]), 4),
                         "spread": round(float(pos["spread"][i]), 4),
                         "description": stats.describe_position(pos["row"][i], pos["col"][i], pos["spread"][i])},
               "top_examples": examples[i], "sprite": f"sprites/n{i:05d}.png" if examples[i] else None}
        push = int(np.argmax(st["lens"][i]))
        rec["pushes_toward"] = {"class": class_names[push], "index": push, "lens": float(st["lens"][i, push])}
        if parts is not None:
            rec["parts"] = {"best_part": parts["best_part"][i], "auroc": round(float(parts["auroc"][i]), 4),
                            "in_box_share": round(float(parts["in_box_share"][i]), 4)}
        rec["auto_summary"] = auto_summary(rec, weak_pmi)
        records.append(rec)
    return records


def auto_summary(rec: dict, weak_pmi: float = 0.5) -> str:
    """One honest sentence from a record's statistics ("weak/unclear" when they say little)."""
    if rec["dead"]:
        return "Dead: never active in the Top-K code on the summarised images."
    freq = f"Active on {100 * rec['image_frequency']:.1f}% of images"
    top = rec["top_classes"]
    if not top or top[0]["pmi"] < weak_pmi:
        best = f" (best PMI {top[0]['pmi']:.2f})" if top else ""
        return f"{freq}; weak/unclear class preference{best}; fires {rec['where']['description']}."
    classes = f"{top[0]['class']} (PMI {top[0]['pmi']:.1f}, {100 * top[0]['p_class_given_on']:.0f}%)"
    if len(top) > 1 and top[1]["pmi"] >= weak_pmi:
        classes += f" and {top[1]['class']}"
    push = rec["pushes_toward"]
    pushes = f"pushes toward {push['class']}" if push["lens"] > 0 else "pushes no class up"
    return f"{freq}; its strongest are mostly {classes}; {pushes}; {rec['where']['description']}."


# ----------------------------------------------------------------------------- images
def _resize(batch: np.ndarray, size: int, mode: str) -> torch.Tensor:
    t = torch.as_tensor(batch, dtype=torch.float32).unsqueeze(1)
    if mode == "area":
        return F.interpolate(t, size=(size, size), mode="bilinear", antialias=True, align_corners=False)[:, 0]
    return F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False)[:, 0]


def overlay(sketches: np.ndarray, heat: np.ndarray, thumb: int, alpha: float = 0.6) -> np.ndarray:
    """Red activation heat over grey sketches.

    Parameters
    ----------
    sketches : (K, S, S) uint8, white paper. heat : (K, H, W) in [0, 1] (token maps).

    Returns
    -------
    (K, thumb, thumb, 3) uint8.
    """
    grey = (_resize(sketches, thumb, "area") / 255.0).clamp(0, 1).numpy()[..., None]
    a = alpha * _resize(heat, thumb, "bilinear").clamp(0, 1).numpy()[..., None]
    rgb = grey * (1 - a) + HEAT_RGB * a * (0.35 + 0.65 * grey)  # ink stays dark under the heat
    return (rgb * 255).round().astype(np.uint8)


def render_examples(out_dir: str | Path, images: np.ndarray, rows: np.ndarray, maps: np.ndarray, grid: tuple,
                    thumb: int = 80, alpha: float = 0.6, chunk: int = 128) -> np.ndarray:
    """Write ``thumbs/n<id>_<rank>.png`` and ``sprites/n<id>.png``; returns thumb paths (M, E) ('' = none).

    Parameters
    ----------
    images : (M, E, S, S) indexable sketches for each neuron's examples (read lazily per chunk:
        pass a callable ``rows -> (K, S, S)`` via ``images`` being a function, or an array).
    rows : (M, E) example rows, -1 where none. maps : (M, E, T) token maps, T = H*W.
    """
    out_dir = Path(out_dir)
    (out_dir / "thumbs").mkdir(parents=True, exist_ok=True)
    (out_dir / "sprites").mkdir(parents=True, exist_ok=True)
    m, e = rows.shape
    paths = np.full((m, e), "", dtype=object)
    peak = np.maximum(maps.reshape(m, -1).max(1), 1e-12)                      # heat relative to the neuron's best
    for start in range(0, m, chunk):
        sl = slice(start, min(m, start + chunk))
        nz, slot = np.nonzero(rows[sl] >= 0)
        if len(nz) == 0:
            continue
        nz = nz + start
        sketches = images(rows[nz, slot]) if callable(images) else images[rows[nz, slot]]
        heat = (maps[nz, slot] / peak[nz, None]).reshape(-1, *grid)
        tiles = overlay(sketches, heat, thumb, alpha)
        _save_tiles(out_dir, tiles, nz, slot, paths)
    return paths


def _save_tiles(out_dir: Path, tiles: np.ndarray, neurons: np.ndarray, slots: np.ndarray, paths: np.ndarray) -> None:
    """Save each tile as a thumb and each neuron's tiles as one horizontal sprite."""
    thumb = tiles.shape[1]
    for k, (i, j) in enumerate(zip(neurons, slots)):
        rel = f"thumbs/n{i:05d}_{j}.png"
        Image.fromarray(tiles[k]).save(out_dir / rel, compress_level=1)
        paths[i, j] = rel
    for i in np.unique(neurons):
        own = tiles[neurons == i]
        strip = np.full((thumb, len(own) * (thumb + SPRITE_GAP) - SPRITE_GAP, 3), 235, dtype=np.uint8)
        for k, tile in enumerate(own):
            strip[:, k * (thumb + SPRITE_GAP):k * (thumb + SPRITE_GAP) + thumb] = tile
        Image.fromarray(strip).save(out_dir / f"sprites/n{i:05d}.png", compress_level=1)


# ----------------------------------------------------------------------------- HTML atlas
CARD_FIELDS = ("neuron_id", "dead", "frequency", "image_frequency", "token_frequency", "mean_on_activation",
               "max_activation", "score", "score_class", "where", "auto_summary", "sprite", "parts")


def _card(rec: dict, concept: dict | None) -> dict:
    card = {k: rec.get(k) for k in CARD_FIELDS}
    card["top_classes"] = [{k: c.get(k) for k in ("class", "pmi", "p_class_given_on", "lens", "knockout")}
                           for c in rec.get("top_classes", [])]
    card["anti_classes"] = [c.get("class") for c in rec.get("anti_classes", [])]
    if concept:
        card["concept"] = concept.get("answer")
        card["concept_source"] = " ".join(str(concept.get(k)) for k in ("backend", "model") if concept.get(k))
    return card


def write_index_html(report_dir: str | Path) -> Path:
    """(Re)build ``report_dir/index.html`` from neurons.jsonl and, if present, llm_output.jsonl."""
    report_dir = Path(report_dir)
    neurons = read_jsonl(report_dir / "neurons.jsonl")
    answers = {r["neuron_id"]: r for r in read_jsonl(report_dir / "llm_output.jsonl")
               if isinstance(r.get("neuron_id"), int)}
    summary_path = report_dir / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    cards = [_card(n, answers.get(n["neuron_id"])) for n in neurons]
    classes = sorted({c["class"] for n in neurons for c in n.get("top_classes", [])})
    meta = {"title": summary.get("title", "SAE neuron atlas"), "classes": classes,
            "n_neurons": len(neurons), "n_dead": sum(bool(n.get("dead")) for n in neurons),
            "n_concepts": sum(1 for c in cards if c.get("concept")), "headline": _headline(summary)}
    payload = json.dumps({"meta": meta, "neurons": cards}, ensure_ascii=False, default=_json_num)
    payload = payload.replace("</", "<\\/")  # never close the <script> early
    html = _TEMPLATE.replace("__DATA__", payload)
    return atomic_write_bytes(report_dir / "index.html", html.encode("utf-8"))


def _json_num(obj):
    if hasattr(obj, "item"):
        return obj.item()
    raise TypeError(type(obj).__name__)


def _headline(summary: dict) -> list[str]:
    """A few facts from summary.json for the page header."""
    out = []
    if "n_images" in summary:
        out.append(f"{summary['n_images']} training images")
    if "sae" in summary:
        out.append(f"M={summary['sae'].get('n_latents')}, K={summary['sae'].get('k')}")
    rec = summary.get("concept_recovery") or {}
    if rec.get("mean_best_auroc") is not None:
        out.append(f"concept recovery: mean best AUROC {rec['mean_best_auroc']:.3f}")
    if summary.get("sae_top1_agreement") is not None:
        out.append(f"SAE keeps {100 * summary['sae_top1_agreement']:.1f}% of predictions")
    return out


_TEMPLATE = r"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>SAE neuron atlas</title>
<style>
:root{--bg:#f6f5f2;--card:#fff;--ink:#1d1d1f;--muted:#6b6b70;--accent:#c0392b;--line:#e3e1dc;--chip:#f1ede6}
*{box-sizing:border-box}body{margin:0;font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;background:var(--bg);color:var(--ink)}
header{position:sticky;top:0;z-index:2;background:rgba(246,245,242,.95);backdrop-filter:blur(4px);border-bottom:1px solid var(--line);padding:12px 20px}
h1{font-size:20px;margin:0 0 2px}.facts{color:var(--muted);font-size:13px}
.controls{display:flex;flex-wrap:wrap;gap:10px;align-items:center;margin-top:10px}
.controls input[type=search]{flex:1 1 260px;padding:7px 10px;border:1px solid var(--line);border-radius:8px;font-size:14px}
.controls select{padding:6px 8px;border:1px solid var(--line);border-radius:8px;background:#fff;font-size:14px}
.controls label{color:var(--muted);font-size:13px}#count{color:var(--muted);font-size:13px;margin-left:auto}
main{display:grid;grid-template-columns:repeat(auto-fill,minmax(340px,1fr));gap:14px;padding:16px 20px}
.neuron{background:var(--card);border:1px solid var(--line);border-radius:12px;padding:12px 14px;box-shadow:0 1px 2px rgba(0,0,0,.04);content-visibility:auto;contain-intrinsic-size:320px}
.neuron.dead{opacity:.55}.head{display:flex;align-items:baseline;gap:8px}.id{font-weight:700;font-size:16px}
.score{margin-left:auto;font-size:12px;color:var(--muted)}.score b{color:var(--accent)}
.concept{font-weight:600;margin:4px 0 6px;color:#1f4e79}.concept small{font-weight:400;color:var(--muted)}
.sprite{display:block;width:100%;image-rendering:auto;border-radius:6px;background:#eee;margin:6px 0}
.chips{display:flex;flex-wrap:wrap;gap:5px;margin:6px 0}.chip{background:var(--chip);border-radius:999px;padding:2px 9px;font-size:12px}
.chip.top{background:#fbe3df}.chip.anti{background:#e6eef7;color:#34597a}.chip b{font-weight:600}
.stats{display:grid;grid-template-columns:repeat(3,1fr);gap:2px 8px;font-size:12px;color:var(--muted);margin:6px 0}
.stats span b{color:var(--ink);font-weight:600}.summary{font-size:13px;margin-top:6px}.parts{font-size:12px;color:var(--muted);margin-top:4px}
.empty{grid-column:1/-1;text-align:center;color:var(--muted);padding:40px}
</style></head><body>
<header><h1 id="title"></h1><div class="facts" id="facts"></div>
<div class="controls">
<input type="search" id="q" placeholder="Search concepts, summaries, classes…">
<select id="cls"><option value="">all classes</option></select>
<select id="sort"><option value="score">sort: score</option><option value="frequency">sort: frequency</option><option value="id">sort: id</option></select>
<label><input type="checkbox" id="dead"> show dead</label><span id="count"></span></div></header>
<main id="grid"></main>
<script type="application/json" id="atlas-data">__DATA__</script>
<script>
(function(){
const DATA=JSON.parse(document.getElementById('atlas-data').textContent);
const M=DATA.meta, N=DATA.neurons, $=id=>document.getElementById(id);
const esc=s=>String(s==null?'':s).replace(/[&<>"']/g,c=>({'&':'&amp;','<':'&lt;','>':'&gt;','"':'&quot;',"'":'&#39;'}[c]));
const pct=x=>x==null?'?':(100*x).toFixed(x<0.01?2:1)+'%', f2=x=>x==null?'?':Number(x).toFixed(2);
document.title=M.title; $('title').textContent=M.title;
$('facts').textContent=[M.n_neurons+' neurons',M.n_dead+' dead',M.n_concepts+' with concepts'].concat(M.headline||[]).join(' · ');
for(const c of M.classes){const o=document.createElement('option');o.value=c;o.textContent=c;$('cls').appendChild(o);}
for(const n of N){n._text=[n.concept,n.auto_summary,(n.top_classes||[]).map(c=>c.class).join(' '),(n.where||{}).description,'#'+n.neuron_id,n.parts&&n.parts.best_part].join(' ').toLowerCase();}
function card(n){
  const tops=(n.top_classes||[]).map(c=>`<span class="chip top" title="P(class|on) ${pct(c.p_class_given_on)}, lens ${f2(c.lens)}, knockout ${f2(c.knockout)}"><b>${esc(c.class)}</b> PMI ${f2(c.pmi)}</span>`).join('');
  const anti=(n.anti_classes||[]).map(c=>`<span class="chip anti">not ${esc(c)}</span>`).join('');
  const concept=n.concept?`<div class="concept">${esc(n.concept)} <small>${esc(n.concept_source||'')}</small></div>`:'';
  const sprite=n.sprite?`<img class="sprite" loading="lazy" src="${esc(n.sprite)}" alt="top examples of neuron ${n.neuron_id}">`:'';
  const parts=n.parts?`<div class="parts">best part: <b>${esc(n.parts.best_part)}</b> · AUROC ${f2(n.parts.auroc)} · in box ${pct(n.parts.in_box_share)}</div>`:'';
  return `<article class="neuron${n.dead?' dead':''}" data-id="${n.neuron_id}"><div class="head"><span class="id">#${n.neuron_id}</span>`+
   `<span class="score">score <b>${f2(n.score)}</b>${n.score_class?' → '+esc(n.score_class):''}</span></div>${concept}${sprite}`+
   `<div class="chips">${tops}${anti}</div><div class="stats"><span>on <b>${pct(n.frequency)}</b></span><span>active <b>${pct(n.image_frequency)}</b></span>`+
   `<span>tokens <b>${pct(n.token_frequency)}</b></span><span>mean on <b>${f2(n.mean_on_activation)}</b></span><span>max <b>${f2(n.max_activation)}</b></span>`+
   `<span>where <b>${esc((n.where||{}).description||'?')}</b></span></div><div class="summary">${esc(n.auto_summary)}</div>${parts}</article>`;
}
function render(){
  const q=$('q').value.trim().toLowerCase(), cls=$('cls').value, showDead=$('dead').checked, key=$('sort').value;
  let list=N.filter(n=>(showDead||!n.dead)&&(!cls||(n.top_classes||[]).some(c=>c.class===cls))&&(!q||q.split(/\s+/).every(w=>n._text.includes(w))));
  const by={score:n=>-(n.score||0),frequency:n=>-(n.image_frequency||0),id:n=>n.neuron_id}[key];
  list.sort((a,b)=>by(a)-by(b)||a.neuron_id-b.neuron_id);
  $('grid').innerHTML=list.length?list.map(card).join(''):'<div class="empty">No neuron matches.</div>';
  $('count').textContent=`showing ${list.length} of ${N.length}`;
}
for(const id of ['q','cls','sort','dead'])$(id).addEventListener('input',render);
render();
})();
</script></body></html>
"""
