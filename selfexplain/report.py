"""Stage 3's outputs: per-neuron records, example thumbnails and sprites, the HTML atlas.

* :func:`neuron_records` turns the typed records of ``summarize.py`` (:class:`NeuronStats`,
  :class:`NeuronParts`) into the ``neurons.jsonl`` objects (fields listed in the README, stage 3);
* :func:`render_examples` draws every neuron's top examples with their activation heat
  (``thumbs/``) and one strip per neuron (``sprites/``), batched in numpy/torch, inside
  :func:`staged_images` so a failed run leaves the previous images in place;
* :func:`write_index_html` fills ``templates/atlas.html`` from ``neurons.jsonl`` (and the
  ``llm_output.jsonl`` answers for the same SAE when stage 4 has run) and the held-out
  figures of ``summary.json``: one self-contained page, no network.
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from . import concept_measures as cm
from . import concepts, prompts, stats
from .artifacts import (INDEX_HTML, NEURONS, SPRITES_DIR, SUMMARY, THUMBS_DIR, atomic_write_bytes,
                        read_json, read_jsonl)
from .distributed import interrupts_held
from .logs import log
from .summarize import Examples, NeuronParts, NeuronStats

HEAT_RGB = np.array([0.9, 0.05, 0.05])  # overlay colour of the activation heat
SPRITE_GAP = 2                           # pixels between thumbnails in a sprite
ATLAS_TEMPLATE = Path(__file__).parent / "templates" / "atlas.html"  # package data: found without an install
ATLAS_PLACEHOLDER = "__ATLAS_DATA__"
# What a path read from neurons.jsonl may look like: relative, plain names, no scheme, no backslash.
SAFE_REL_PATH = re.compile(r"[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)*")


# ----------------------------------------------------------------------------- records
def _class_entries(idx: np.ndarray, st: NeuronStats, i: int, names: list[str], keys: tuple[str, ...]) -> list[dict]:
    out = []
    for c in idx:
        entry = {"class": names[c], "index": int(c)}
        for key in keys:
            entry[key] = round(float(getattr(st, key)[i, c]), 4)
        if "counts" in keys:
            entry["count"] = int(entry.pop("counts"))
        out.append(entry)
    return out


def example_entries(examples: Examples, thumbs: np.ndarray, indices: np.ndarray, labels: np.ndarray,
                    class_names: list[str]) -> list[list[dict]]:
    """Per neuron, its ``top_examples`` records (global image index, activation, class, thumb path)."""
    out = []
    for i in range(examples.rows.shape[0]):
        out.append([{"image_index": int(indices[r]), "activation": round(float(v), 5),
                     "class": class_names[labels[r]], "thumb": t or None}
                    for r, v, t in zip(examples.rows[i], examples.values[i], thumbs[i]) if r >= 0])
    return out


def neuron_records(st: NeuronStats, class_names: list[str], examples: list[list[dict]], sae_fingerprint: str,
                   parts: NeuronParts | None = None, n_top: int = 5, n_anti: int = 3,
                   weak_pmi: float = 0.5) -> list[dict]:
    """One ``neurons.jsonl`` object per neuron.

    Parameters
    ----------
    st : per-neuron statistics from ``summarize.neuron_stats``.
    examples : per neuron, its ``top_examples`` entries (see :func:`example_entries`).
    sae_fingerprint : the SAE's fingerprint, so readers can set aside records of another SAE.
    parts : on data with ground-truth parts, each neuron's best part on the training split (adds
        ``parts``: ``best_part``, its ``auroc`` and the ``pointing`` game on the neuron's examples
        with its chance rate, all on training images, ``split: "train"``; held-out figures are
        summary.json's ``concept_measures``).
    """
    # top classes: classes the neuron was on for, most specific first; anti: see avoided_classes
    order_top = np.argsort(-st.pmi, axis=1, kind="stable")
    pos = st.position
    records = []
    for i in range(len(st.tau)):
        top = [c for c in order_top[i] if st.counts[i, c] > 0][:n_top]
        push = int(np.argmax(st.lens[i]))
        rec = {"neuron_id": i, "sae_fingerprint": sae_fingerprint, "dead": bool(st.dead[i]),
               "quantile": st.quantile, "threshold": float(st.tau[i]), "frequency": float(st.frequency[i]),
               "image_frequency": float(st.image_frequency[i]), "token_frequency": float(st.token_frequency[i]),
               "dense_frequency": float(st.dense_frequency[i]), "mean_on_activation": float(st.mean_on_activation[i]),
               "max_activation": float(st.max_activation[i]), "score": float(st.score[i]),
               "score_class": class_names[st.best_class[i]] if st.best_class[i] >= 0 else None,
               "top_classes": _class_entries(top, st, i, class_names,
                                             ("pmi", "p_class_given_on", "lens", "knockout", "counts")),
               "anti_classes": _class_entries(avoided_classes(st.pmi[i], st.lens[i], top, n_anti), st, i,
                                              class_names, ("pmi", "lens")),
               "where": {"row": round(float(pos["row"][i]), 4), "col": round(float(pos["col"][i]), 4),
                         "spread": round(float(pos["spread"][i]), 4),
                         "description": stats.describe_position(pos["row"][i], pos["col"][i], pos["spread"][i],
                                                                diffuse="anywhere in the sketch")},
               "top_examples": examples[i], "sprite": f"{SPRITES_DIR}/n{i:05d}.png" if examples[i] else None,
               "pushes_toward": {"class": class_names[push], "index": push, "lens": float(st.lens[i, push])}}
        if parts is not None:  # a dead neuron's constant score ties every part at 0.5: it detects none
            rec["parts"] = {"best_part": None if st.dead[i] else parts.part[i],
                            "auroc": None if st.dead[i] else _rounded(parts.auroc[i]),
                            "distractor_auroc": None if st.dead[i] else _rounded(parts.distractor_auroc[i]),
                            "pointing": _rounded(parts.pointing[i]),
                            "pointing_chance": _rounded(parts.pointing_chance[i]),
                            "n_examples": int(parts.n_holding[i]), "split": "train"}
        rec["n_on"] = int(st.counts[i].sum())  # images above τ: what the class statistics rest on
        rec["clear_class"] = has_clear_class(rec, weak_pmi)  # stage 4's offline label follows this verdict
        rec["clear_classes"] = clear_classes(rec, weak_pmi)[:2]  # ... and names only these
        rec["auto_summary"] = auto_summary(rec, weak_pmi)
        records.append(rec)
    return records


def avoided_classes(pmi: np.ndarray, lens: np.ndarray, top: list[int], n_anti: int) -> list[int]:
    """The classes a neuron avoids: negative PMI only, lowest first (ties: most negative lens),
    never one of its ``top`` classes (with 3 classes, the 3 lowest were every class, its favourite too)."""
    order = np.lexsort((lens, pmi))
    return [int(c) for c in order if pmi[c] < 0 and c not in top][:n_anti]


def _rounded(x) -> float | None:
    """A JSON-safe figure for a record: 4 decimals, None for NaN (undefined)."""
    return None if np.isnan(x) else round(float(x), 4)


MIN_SUPPORT = 5  # images of its top class above τ before a neuron's class preference counts as clear


def thin_classes_note(labels: np.ndarray, class_names: list[str]) -> str | None:
    """A log line naming the classes with under MIN_SUPPORT summarised images (no neuron can be labelled
    typical of them: "no clear class preference" there is arithmetic, not a finding), else None."""
    counts = np.bincount(np.asarray(labels), minlength=len(class_names))
    thin = [f"{name} ({n})" for name, n in zip(class_names, counts) if n < MIN_SUPPORT]
    if not thin:
        return None
    return (f"{len(thin)} of {len(class_names)} classes have under {MIN_SUPPORT} training images here: "
            f"{', '.join(thin[:8])}{' ...' if len(thin) > 8 else ''}; no neuron can be labelled typical of them "
            "(a class preference needs that many images of the class above the threshold)")


def has_clear_class(rec: dict, weak_pmi: float = 0.5) -> bool:
    """A live neuron whose most specific class reaches PMI ``weak_pmi`` on at least ``MIN_SUPPORT`` images.

    On a small summary (192 images at QUANTILE 0.99: 2 images above τ per neuron) one or two
    images would otherwise make any class "clear".
    """
    return not rec["dead"] and bool(clear_classes(rec, weak_pmi)[:1])


def clear_classes(rec: dict, weak_pmi: float = 0.5) -> list[str]:
    """The top classes (in order) with PMI >= ``weak_pmi`` on at least ``MIN_SUPPORT`` images above τ."""
    return [c["class"] for c in rec["top_classes"] if c["pmi"] >= weak_pmi and c.get("count", MIN_SUPPORT) >= MIN_SUPPORT]


def auto_summary(rec: dict, weak_pmi: float = 0.5) -> str:
    """One honest sentence from a record's statistics ("weak/unclear" when they say little)."""
    if rec["dead"]:
        return "Dead: never active in the Top-K code on the summarised images."
    freq = f"Active on {prompts.share(rec['image_frequency'])} of images"  # as the card prints it; never "0.0%"
    top, names = rec["top_classes"], clear_classes(rec, weak_pmi)
    if not names:
        few = top and top[0]["pmi"] >= weak_pmi and rec.get("n_on", MIN_SUPPORT) < MIN_SUPPORT
        why = (f"too few images above τ to judge a class ({rec['n_on']})" if few else
               "weak/unclear class preference" + (f" (best PMI {top[0]['pmi']:.2f})" if top else ""))
        return f"{freq}; {why}; fires {rec['where']['description']}."
    classes = f"{top[0]['class']} (PMI {top[0]['pmi']:.1f}, {top[0]['count']} of {rec['n_on']} images above τ)"
    if len(names) > 1:
        classes += f" and {names[1]}"
    push = rec["pushes_toward"]
    pushes = f"pushes toward {push['class']}" if push["lens"] > 0 else "pushes no class up"
    return f"{freq}; its strongest favour {classes}; {pushes}; {rec['where']['description']}."


# ----------------------------------------------------------------------------- images
def _resize(batch: np.ndarray, size: int, mode: str) -> torch.Tensor:
    t = torch.as_tensor(batch, dtype=torch.float32).unsqueeze(1)
    return F.interpolate(t, size=(size, size), mode="bilinear", antialias=mode == "area", align_corners=False)[:, 0]


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


@contextmanager
def staged_images(out_dir: str | Path, publish: Callable[[], None] | None = None) -> Iterator[Path]:
    """A scratch folder inside ``out_dir`` to render ``thumbs/`` and ``sprites/`` into.

    When the block succeeds they replace ``out_dir``'s own and ``publish()`` writes the files
    that point at them, with Ctrl-C and SIGTERM held from the swap to the last write (an
    interruption there left the new images under the old neurons.jsonl); when it fails the
    scratch folder goes and the previous run's images stay, so its atlas and stage 4 keep working.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".staging-", suffix=f".tmp{os.getpid()}", dir=out_dir))
    try:
        yield staging
        with interrupts_held():
            for name in (THUMBS_DIR, SPRITES_DIR):
                (staging / name).mkdir(exist_ok=True)
                if (out_dir / name).exists():
                    (out_dir / name).rename(staging / f"old-{name}")  # deleted with the scratch folder
                (staging / name).rename(out_dir / name)
            if publish is not None:
                publish()
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def render_examples(out_dir: str | Path, sketches: Callable[[np.ndarray], np.ndarray], examples: Examples,
                    grid: tuple, thumb: int = 80, alpha: float = 0.6, chunk: int = 128) -> np.ndarray:
    """Write ``thumbs/n<id>_<rank>.png`` and ``sprites/n<id>.png``; returns thumb paths (M, E) ('' = none).

    Parameters
    ----------
    sketches : maps example rows (K,) to their sketches (K, S, S) uint8; called once per chunk
        of neurons, so the images are read lazily.
    examples : rows (M, E), -1 where none, and token maps (M, E, T), T = H*W.
    """
    out_dir = Path(out_dir)
    (out_dir / THUMBS_DIR).mkdir(parents=True, exist_ok=True)
    (out_dir / SPRITES_DIR).mkdir(parents=True, exist_ok=True)
    rows, maps = examples.rows, examples.maps
    m, e = rows.shape
    paths = np.full((m, e), "", dtype=object)
    peak = np.maximum(maps.reshape(m, -1).max(1), 1e-12)                      # heat relative to the neuron's best
    for start in range(0, m, chunk):
        nz, slot = np.nonzero(rows[start:start + chunk] >= 0)
        if len(nz) == 0:
            continue
        nz = nz + start
        heat = (maps[nz, slot] / peak[nz, None]).reshape(-1, *grid)
        tiles = overlay(sketches(rows[nz, slot]), heat, thumb, alpha)
        _save_tiles(out_dir, tiles, nz, slot, paths)
    return paths


def _save_tiles(out_dir: Path, tiles: np.ndarray, neurons: np.ndarray, slots: np.ndarray, paths: np.ndarray) -> None:
    """Save each tile as a thumb and each neuron's tiles as one horizontal sprite."""
    thumb = tiles.shape[1]
    for k, (i, j) in enumerate(zip(neurons, slots)):
        rel = f"{THUMBS_DIR}/n{i:05d}_{j}.png"
        Image.fromarray(tiles[k]).save(out_dir / rel, compress_level=1)
        paths[i, j] = rel
    for i in np.unique(neurons):
        own = tiles[neurons == i]
        strip = np.full((thumb, len(own) * (thumb + SPRITE_GAP) - SPRITE_GAP, 3), 235, dtype=np.uint8)
        for k, tile in enumerate(own):
            strip[:, k * (thumb + SPRITE_GAP):k * (thumb + SPRITE_GAP) + thumb] = tile
        Image.fromarray(strip).save(out_dir / f"{SPRITES_DIR}/n{i:05d}.png", compress_level=1)


def page_path(report_dir: str | Path, rel) -> str | None:
    """``rel`` when the atlas may load it: a plain relative path to a file inside ``report_dir``.

    Paths come from ``neurons.jsonl``. An absolute path, a URL (``http://``, ``//host``,
    ``javascript:``), a drive letter, a backslash or a ``..`` or link that leaves the folder
    would make the self-contained page load something from elsewhere: None.
    """
    if not isinstance(rel, str) or not SAFE_REL_PATH.fullmatch(rel):
        return None
    return rel if concepts.contained(Path(report_dir), rel) else None


# ----------------------------------------------------------------------------- HTML atlas
NUMBER_FIELDS = ("quantile", "threshold", "frequency", "image_frequency", "token_frequency", "mean_on_activation", "max_activation", "score")
CLASS_NUMBERS = ("pmi", "p_class_given_on", "lens", "knockout")


def _number(value) -> float | None:
    """A finite number from a record, else None (a string or NaN never reaches the page as a number)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return value
    return None


def _text(value) -> str | None:
    return value if isinstance(value, str) else None


def _dict(value) -> dict:
    return value if isinstance(value, dict) else {}


def _list(value) -> list:
    return value if isinstance(value, list) else []


def _card(rec: dict, concept: concepts.Concept | None, report_dir: Path) -> dict | None:
    """The page's view of one record, every field type-checked; None for a record without a valid id."""
    nid = rec.get("neuron_id")
    if type(nid) is not int or nid < 0:
        return None
    card = {"neuron_id": nid, "dead": rec.get("dead") is True, "score_class": _text(rec.get("score_class")),
            "auto_summary": _text(rec.get("auto_summary")), **{k: _number(rec.get(k)) for k in NUMBER_FIELDS},
            "where": {"description": _text(_dict(rec.get("where")).get("description"))},
            "sprite": page_path(report_dir, rec.get("sprite")),
            "top_classes": [{"class": _text(c.get("class")), **{k: _number(c.get(k)) for k in CLASS_NUMBERS}}
                            for c in map(_dict, _list(rec.get("top_classes")))],
            "anti_classes": [_text(_dict(c).get("class")) for c in _list(rec.get("anti_classes"))]}
    parts = rec.get("parts")
    if isinstance(parts, dict):
        card["parts"] = {"best_part": _text(parts.get("best_part")), "auroc": _number(parts.get("auroc")),
                         "distractor_auroc": _number(parts.get("distractor_auroc")),
                         "pointing": _number(parts.get("pointing")),
                         "pointing_chance": _number(parts.get("pointing_chance")),
                         "n_examples": _number(parts.get("n_examples"))}
    if concept is not None:
        card["concept"] = concept.answer
        card["concept_source"] = " ".join(dict.fromkeys(t for t in (concept.backend, concept.model) if t))  # once each
    return card


def write_index_html(report_dir: str | Path) -> Path:
    """(Re)build ``report_dir/index.html`` from neurons.jsonl and, if present, llm_output.jsonl."""
    report_dir = Path(report_dir)
    summary = _dict(read_json(report_dir / SUMMARY)) if (report_dir / SUMMARY).is_file() else {}
    # only answers for the SAE this report describes; the others stay in the file, counted as stale
    answers, n_stale = concepts.current_answers(report_dir, _text(summary.get("sae_fingerprint")))
    neurons = [n for n in read_jsonl(report_dir / NEURONS) if isinstance(n, dict)]
    cards = [c for c in (_card(n, answers.get(n.get("neuron_id")), report_dir) for n in neurons) if c]
    if len(cards) < len(neurons):
        log(f"{report_dir / NEURONS}: {len(neurons) - len(cards)} records without a valid neuron_id left out")
    classes = sorted({c["class"] for card in cards for c in card["top_classes"] if c["class"]})
    headline = _headline(summary)
    if n_stale:
        headline.append(f"{n_stale} LLM answers made for an earlier SAE ignored")
    meta = {"title": _text(summary.get("title")) or "SAE neuron atlas", "classes": classes,
            "n_neurons": len(cards), "n_dead": sum(c["dead"] for c in cards),
            "n_concepts": sum(1 for c in cards if c.get("concept")), "n_stale": n_stale, "headline": headline,
            "held_out": held_out_table(_dict(summary.get("concept_measures"))),
            "part_auroc": prompts.PART_AUROC,  # a best part below this is not what the neuron means
            "n_images": _number(summary.get("n_images"))}  # what "dead" was judged on (MAX_PER_CLASS samples)
    payload = script_json({"meta": meta, "neurons": cards})
    html = ATLAS_TEMPLATE.read_text(encoding="utf-8").replace(ATLAS_PLACEHOLDER, payload)
    return atomic_write_bytes(report_dir / INDEX_HTML, html.encode("utf-8"))


def script_json(obj) -> str:
    """JSON that is safe inside a ``<script>`` block.

    Every ``<``, ``>`` and ``&`` becomes a ``\\u`` escape (they can only occur inside JSON
    strings), so no text can form ``</script``, ``<!--`` or ``<script`` and end or hide the
    block; U+2028/9 are escaped too.
    """
    text = json.dumps(obj, ensure_ascii=False, allow_nan=False)
    for char in "<>&\u2028\u2029":
        text = text.replace(char, f"\\u{ord(char):04x}")
    return text


def _headline(summary: dict) -> list[str]:
    """A few facts from summary.json for the page header."""
    out = []
    if _number(summary.get("n_images")) is not None:
        out.append(f"{summary['n_images']} training images")
    sae = _dict(summary.get("sae"))
    if sae:
        out.append(f"M={_number(sae.get('n_latents'))}, K={_number(sae.get('k'))}")
    codes = _dict(_dict(summary.get("concept_measures")).get("codes"))
    auroc = _number(_dict(codes.get("sae")).get("mean_test_auroc"))
    if auroc is not None:  # beside what it is measured against: alone, 0.996 reads as a feat
        others = [f"{_text(_dict(codes.get(key)).get('code')) or key} {prompts.fixed(value, 3)}"
                  for key in ("random_sae", "channels")
                  if (value := _number(_dict(codes.get(key)).get("mean_test_auroc"))) is not None]
        class_set = _number(_dict(codes.get("sae")).get("mean_class_set_auroc"))
        if class_set is not None:
            others.append(f"a perfect class detector {prompts.fixed(class_set, 3)}")
        out.append(f"held-out part AUROC {prompts.fixed(auroc, 3)}" + (f" (against: {', '.join(others)})" if others
                                                                        else ""))
    agreement = _number(summary.get("sae_top1_agreement"))
    if agreement is not None:
        out.append(f"SAE keeps {prompts.percent(agreement, 1)} of predictions (training images)")
    return out


HELD_OUT_PART = ("test_auroc", "test_ap", "distractor_auroc", "pointing", "pointing_chance", "pointing_shuffled",
                 "pointing_cell", "pointing_cell_chance", "pointing_ceiling", "cf_own_drop", "cf_other_drop")
HELD_OUT_MEAN = tuple(f"mean_{k}" for k in HELD_OUT_PART)


def _span(code: dict, key: str) -> str:
    """'13-33': the range of a per-part count, for the note (how many images a figure rests on)."""
    counts = [n for n in (_number(_dict(row).get(key)) for row in _dict(code.get("per_part")).values())
              if n is not None]
    if not counts:
        return "?"
    low, high = int(min(counts)), int(max(counts))
    return f"{low}" if low == high else f"{low}-{high}"


def _counterfactual_note(measures: dict, sae: dict) -> str:
    cf = _dict(measures.get("counterfactual"))
    if _number(cf.get("test_images")) is None:
        return ""
    return (f" CF drop: {int(cf['test_images'])} test images re-drawn with one part left out, everything else "
            "identical; the relative fall of the chosen unit's activation, Σ(a − a′)/Σa (1: gone, 0: unchanged), "
            f"when its own part goes ({_span(sae, 'cf_own_n')} images per part) and when another part goes "
            f"({_span(sae, 'cf_other_n')}). The random SAE's row is the null. PCA has none (–): its zero, the "
            "training mean, is arbitrary.")


def held_out_table(measures: dict) -> dict | None:
    """The atlas header's view of summary.json's ``concept_measures``, every field type-checked.

    Returns ``{"note", "parts": [{"part", "unit", test figures}], "codes": [{"key", "code", means}]}``
    (the SAE's chosen neuron per part, then every code's means), or None without the block.
    """
    codes = {k: v for k, v in _dict(measures.get("codes")).items() if isinstance(k, str) and isinstance(v, dict)}
    if "sae" not in codes:
        return None
    sae = codes["sae"]
    parts = [{"part": name, "unit": row.get("unit") if type(row.get("unit")) is int else None,
              **{k: _number(row.get(k)) for k in HELD_OUT_PART}}
             for name, row in _dict(sae.get("per_part")).items() if isinstance(row, dict)]
    rows = [{"key": key, "code": _text(code.get("code")) or key, **{k: _number(code.get(k)) for k in HELD_OUT_MEAN}}
            for key, code in codes.items()]
    n_train, n_test = _number(measures.get("n_train_images")), _number(measures.get("n_test_images"))
    class_set = _number(sae.get("mean_class_set_auroc"))
    note = (f"Each part's unit chosen on {n_train} training images, scored on {n_test} held-out test images. "
            "Distractor-only AUROC: among images of the classes without the part, where only distractors carry it "
            f"(a class detector scores 0.5 there; {_span(sae, 'distractor_positives')} such images per part)."
            + _counterfactual_note(measures, sae))
    if class_set is not None:
        note += f" A perfect detector of the part's classes reaches AUROC {prompts.fixed(class_set, 3)} overall."
    for key, name in (("pointing_rule", "Pointing"), ("pointing_cell_rule", "Cell-centre rule")):
        if _text(measures.get(key)):
            note += f" {name}: {_text(measures.get(key))}."
    versus = _dict(measures.get("sae_versus_best_baseline"))
    figures = [_number(versus.get(k)) for k in ("difference", "low", "high")]
    if _text(versus.get("baseline")) and None not in figures:
        note += f" {cm.versus_text(_text(versus['baseline']), *figures)}."
    return {"note": note, "parts": parts, "codes": rows}
