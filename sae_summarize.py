"""Stage 3: summarise every SAE neuron (statistics, examples, concept recovery, HTML atlas).

Usage
-----
    python sae_summarize.py                                   # after train_standard_cnn.py and train_sae.py
    python sae_summarize.py --max_per_class=50 --top_examples=8
    python sae_summarize.py --sae_ckpt=runs/sae_topk/last_sae.pt --out_dir=neuron_report_last

One pass over the training split (or MAX_PER_CLASS images per class) records, for every
image and neuron, the max and mean over tokens of the Top-K code (what the SAE uses) and
of the dense ReLU code, plus activation-weighted positions. A second small pass recomputes
the token maps of each neuron's top examples only (memory stays O(N·M), not O(N·T·M)).

Writes OUT_DIR/neurons.jsonl (one object per neuron), summary.json (counts, timings,
concept recovery on data with ground-truth parts, fingerprints, config), thumbs/ and
sprites/ (top examples with their activation heat) and index.html (a self-contained
atlas; sae_summary_to_llm.py rebuilds it with the concepts once it has run).
"""
from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np
import torch

from selfexplain import artifacts, data, report, stats
from selfexplain.errors import UserError
from selfexplain.config import make_config, module_constants, run_cli
from selfexplain.artifacts import save_effective_config
from selfexplain.distributed import resolve_device, set_threads
from selfexplain.features import iter_feature_maps
from selfexplain.sae import bias_logits, logit_lens

# ----------------------------------------------------------------------------- config
CLASSIFIER_CKPT = "runs/standard_cnn/best.pt"  # stage 1 checkpoint (records dataset, preprocessing, split)
SAE_CKPT = "runs/sae_topk/best_sae.pt"         # stage 2 checkpoint (must be trained on CLASSIFIER_CKPT)
OUT_DIR = "neuron_report"                      # where neurons.jsonl, summary.json, thumbs/, sprites/, index.html go
CACHE_DIR = "cache"                            # decoded image cache (same as stage 1)
QUANTILE = 0.99                                # "on" = per-image max activation above this quantile over images
PMI_LAMBDA = 1.0                               # Laplace smoothing λ of the class PMI
TOP_EXAMPLES = 8                               # strongest images kept per neuron (thumbs, sprite, LLM)
TOP_CLASSES = 5                                # classes listed per neuron (most specific first)
ANTI_CLASSES = 3                               # classes listed as avoided per neuron
WEAK_PMI = 0.5                                 # best PMI below this reads as "weak/unclear" in the summary
MAX_PER_CLASS = 0                              # summarise at most this many training images per class (0 = all)
BATCH_SIZE = 128                               # images per forward pass
FEATURE_CACHE_MB = 1024                        # keep layer4 maps in memory up to this size (skips pass 2's backbone)
THUMB_SIZE = 80                                # side of each example thumbnail in pixels
HEAT_ALPHA = 0.6                               # opacity of the red activation overlay at the peak
DEVICE = "auto"                                # auto | cpu | cuda
CHANNELS_LAST = True                           # channels_last memory format (faster convs, same maths)
AMP = "off"                                    # off keeps the closed-form contributions exact; auto | bf16 | fp16
NUM_THREADS = 0                                # CPU intra-op threads (0 = torch default)
SEED = 0                                       # seeds the per-class sample


# ----------------------------------------------------------------------------- data
def select_images(train: np.ndarray, labels: np.ndarray, max_per_class: int, seed: int) -> np.ndarray:
    """Sorted training indices, at most ``max_per_class`` per class (0 = all), drawn at random."""
    if max_per_class <= 0:
        return np.sort(train)
    rng = np.random.default_rng(seed)
    keep = [rng.permutation(train[labels[train] == c])[:max_per_class] for c in np.unique(labels[train])]
    return np.sort(np.concatenate(keep))


def load_models(cfg, device):
    """Classifier, SAE (checked to belong together) and the dataset the classifier was trained on."""
    model, ckpt = artifacts.load_classifier(cfg.CLASSIFIER_CKPT, device)
    if cfg.CHANNELS_LAST:
        model = model.to(memory_format=torch.channels_last)
    sae, sae_ckpt = artifacts.load_sae(cfg.SAE_CKPT, ckpt, device)
    imageset = data.load_dataset(ckpt["dataset"], cfg.CACHE_DIR)
    return model, ckpt, sae, sae_ckpt, imageset


# ----------------------------------------------------------------------------- pass 1
@torch.no_grad()
def collect(model, sae, images, indices, prep, device, batch_size=128, amp="off", progress=True,
            cache_mb: float = 0) -> dict:
    """One pass: per-image max/mean of Top-K and dense codes, token counts, position moments.

    Returns a dict of numpy arrays aligned with ``indices`` (which must be sorted):
    ``top_max``, ``top_mean``, ``dense_max``, ``dense_mean`` (N, M) float32; ``logits`` and
    ``sae_logits`` (N, classes) (the classifier's and the SAE decomposition's, without ε);
    ``tokens_active`` (M,), ``n_tokens``, ``grid`` (H, W) and position sums (see stats.weighted_position);
    ``fmaps``: the layer4 maps (N, C, H, W) on the CPU when they fit in ``cache_mb``, else None.
    """
    lens = logit_lens(sae, model.fc.weight)
    bias = bias_logits(sae, model.fc.weight, model.fc.bias)
    out = {k: [] for k in ("top_max", "top_mean", "dense_max", "dense_mean", "logits", "sae_logits")}
    m = sae.n_latents
    moments = {k: torch.zeros(m, dtype=torch.float64, device=device) for k in ("w", "r", "c", "rr", "cc")}
    active = torch.zeros(m, dtype=torch.float64, device=device)
    n_tokens, grid, fmaps = 0, None, []
    for _, fmap, logits in iter_feature_maps(model, images, indices, prep, device, batch_size, amp, progress,
                                             desc="pass 1: codes"):
        grid = tuple(fmap.shape[2:])
        if fmaps is not None and len(indices) * fmap[0].numel() * 4 <= cache_mb * 2 ** 20:
            fmaps.append(fmap.cpu())
        else:
            fmaps = None
        rows, cols = (torch.as_tensor(a, device=device, dtype=torch.float32) for a in stats.token_grid(*grid))
        z = sae.codes_for_map(fmap)                                           # (B, T, M) Top-K
        dense = sae.codes_for_map(fmap, dense=True)
        z_mean = z.mean(1)
        for key, value in (("top_max", z.amax(1)), ("top_mean", z_mean), ("dense_max", dense.amax(1)),
                           ("dense_mean", dense.mean(1)), ("logits", logits), ("sae_logits", z_mean @ lens + bias)):
            out[key].append(value.float().cpu().numpy())
        zs = z.sum(0)                                                         # (T, M)
        moments["w"] += zs.sum(0).double()
        moments["r"] += (rows @ zs).double()
        moments["c"] += (cols @ zs).double()
        moments["rr"] += ((rows ** 2) @ zs).double()
        moments["cc"] += ((cols ** 2) @ zs).double()
        active += (z > 0).sum((0, 1)).double()
        n_tokens += z.shape[0] * z.shape[1]
    if grid is None:
        raise UserError("no images to summarise (empty training split?)")
    result = {k: np.concatenate(v) for k, v in out.items()}
    result.update({k: v.cpu().numpy() for k, v in moments.items()})
    result.update(tokens_active=active.cpu().numpy(), n_tokens=n_tokens, grid=grid,
                  fmaps=torch.cat(fmaps) if fmaps else None)
    return result


# ----------------------------------------------------------------------------- pass 2
def top_examples(top_max: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Per neuron, rows of its ``n`` strongest images: (M, n) rows (-1 = none) and activations."""
    n = min(n, top_max.shape[0])
    t = torch.from_numpy(np.ascontiguousarray(top_max.T))
    values, rows = t.topk(n, dim=1)
    values, rows = values.numpy(), rows.numpy()
    rows = np.where(values > 0, rows, -1)  # an image where the neuron is silent is no example
    return rows, np.where(rows >= 0, values, 0.0)


@torch.no_grad()
def example_token_maps(model, sae, images, indices, rows, prep, device, batch_size=128, amp="off",
                       progress=True, fmaps: torch.Tensor | None = None) -> np.ndarray:
    """Top-K token maps of each neuron on its example images: (M, E, T) float32 (0 where none).

    Uses the layer4 maps kept by :func:`collect` when given (``fmaps``, aligned with
    ``indices``), else runs the backbone again on the example images only.
    """
    m, e = rows.shape
    needed = np.unique(rows[rows >= 0])
    maps = np.zeros((m, e, 0), dtype=np.float32)
    neuron_of, slot_of = np.nonzero(rows >= 0)
    pair_rows = rows[neuron_of, slot_of]
    if fmaps is not None:
        source = ((indices[needed[i:i + batch_size]], fmaps[needed[i:i + batch_size]].to(device))
                  for i in range(0, len(needed), batch_size))
    else:
        source = ((idx, fmap) for idx, fmap, _ in iter_feature_maps(
            model, images, indices[needed], prep, device, batch_size, amp, progress, desc="pass 2: examples"))
    for batch_idx, fmap in source:
        z = sae.codes_for_map(fmap)                                           # (B, T, M)
        if maps.shape[2] == 0:
            maps = np.zeros((m, e, z.shape[1]), dtype=np.float32)
        batch_rows = np.searchsorted(indices, batch_idx)                      # rows of this batch
        hit = np.isin(pair_rows, batch_rows)
        where = np.searchsorted(batch_rows, pair_rows[hit])
        sel = torch.as_tensor(where, device=z.device)
        neurons = torch.as_tensor(neuron_of[hit], device=z.device)
        maps[neuron_of[hit], slot_of[hit]] = z[sel, :, neurons].float().cpu().numpy()
    return maps


# ----------------------------------------------------------------------------- statistics
def neuron_stats(acts: dict, labels: np.ndarray, lens: np.ndarray, cfg) -> dict:
    """All per-neuron arrays: thresholds, frequencies, PMI, lens, knockout, score, position."""
    n_classes = lens.shape[1]
    top_max = acts["top_max"]
    tau = stats.thresholds(top_max, cfg.QUANTILE)
    on = stats.on_mask(top_max, tau)
    n_on = on.sum(0)
    on_acts = np.where(on, top_max, 0.0).sum(0) / np.maximum(n_on, 1)
    pmi = stats.pmi(on, labels, n_classes, cfg.PMI_LAMBDA)
    ko = stats.knockout(acts["top_mean"], lens, on)
    score, best = stats.ranking_score(pmi, ko)
    dead = top_max.max(0) <= 0
    score[dead] = 0.0
    return {"tau": tau, "on": on, "n_on": n_on, "dead": dead, "frequency": n_on / len(labels),
            "image_frequency": (top_max > 0).mean(0), "token_frequency": acts["tokens_active"] / acts["n_tokens"],
            "dense_frequency": (acts["dense_max"] > 0).mean(0), "mean_on_activation": on_acts,
            "max_activation": top_max.max(0), "pmi": pmi, "counts": stats.class_counts(on, labels, n_classes),
            "p_class_given_on": stats.p_class_given_on(on, labels, n_classes, cfg.PMI_LAMBDA), "lens": lens,
            "knockout": ko, "score": score, "best_class": best, "position": stats.weighted_position(acts)}


def part_labels(parts: list, rows_global: np.ndarray, part_types: list[str]) -> np.ndarray:
    """(N, P) bool: image holds at least one part of each type (class part or distractor)."""
    index = {p: j for j, p in enumerate(part_types)}
    out = np.zeros((len(rows_global), len(part_types)), dtype=bool)
    for n, g in enumerate(rows_global):
        for part in parts[g]:
            out[n, index[part["part"]]] = True
    return out


def token_in_box(parts: list, rows_global: np.ndarray, part_types: list[str], grid, image_size: int) -> np.ndarray:
    """(N, P, T) bool: the token's centre lies inside some box of that part type in that image."""
    rows, cols = stats.token_grid(*grid)
    ys, xs = rows * image_size, cols * image_size
    index = {p: j for j, p in enumerate(part_types)}
    out = np.zeros((len(rows_global), len(part_types), len(ys)), dtype=bool)
    for n, g in enumerate(rows_global):
        for part in parts[g]:
            x0, y0, x1, y1 = part["box"]
            out[n, index[part["part"]]] |= (xs >= x0) & (xs < x1) & (ys >= y0) & (ys < y1)
    return out


def in_box_share(inbox, local, top_token, valid, neurons, parts) -> tuple[np.ndarray, np.ndarray]:
    """Share of each (neuron, part) pair's top tokens inside that part's boxes, and its chance level.

    Parameters
    ----------
    inbox : (U, P, T) bool from :func:`token_in_box` over the example images.
    local : (M, E) row of ``inbox`` for each neuron's examples. top_token : (M, E) argmax token.
    valid : (M, E) bool, the example exists. neurons, parts : (K,) int pairs to evaluate.

    Returns
    -------
    (share (K,), chance (K,)): chance is the share of *all* tokens of the same examples
    that lie inside the boxes (what a neuron firing at random places would score).
    """
    loc, tok, ok = local[neurons], top_token[neurons], valid[neurons]          # (K, E)
    hit = inbox[loc, parts[:, None], tok] & ok
    chance = inbox[loc, parts[:, None], :].mean(2) * ok
    n = np.maximum(ok.sum(1), 1)
    return hit.sum(1) / n, chance.sum(1) / n


def concept_recovery(acts, rows, maps, imageset, indices, image_size) -> tuple[dict, dict] | tuple[None, None]:
    """Per part type: the best neuron's AUROC for the part's presence and its in-box share.

    The score of an image is the neuron's per-image max Top-K activation. Returns (table for
    summary.json, per-neuron {best_part, auroc, in_box_share}), or (None, None) without parts.
    """
    if not imageset.parts or not imageset.part_types:
        return None, None
    types = list(imageset.part_types)
    present = part_labels(imageset.parts, indices, types)
    auc = np.nan_to_num(stats.auroc(acts["top_max"], present), nan=0.5)     # (P, M)
    dense_auc = np.nan_to_num(stats.auroc(acts["dense_max"], present), nan=0.5)
    ex_rows = np.unique(rows[rows >= 0])
    inbox = token_in_box(imageset.parts, indices[ex_rows], types, acts["grid"], image_size)  # (U, P, T)
    ctx = (inbox, np.searchsorted(ex_rows, np.maximum(rows, 0)), maps.argmax(2), rows >= 0)
    best_neuron = auc.argmax(1)
    part_share, part_chance = in_box_share(*ctx, best_neuron, np.arange(len(types)))
    per_part = {name: {"best_neuron": int(best_neuron[j]), "auroc": float(auc[j, best_neuron[j]]),
                       "in_box_share": float(part_share[j]), "in_box_chance": float(part_chance[j]),
                       "best_dense_auroc": float(dense_auc[j].max()), "images_with_part": int(present[:, j].sum())}
                for j, name in enumerate(types)}
    table = {"per_part": per_part, "mean_best_auroc": float(auc.max(1).mean()),
             "mean_best_dense_auroc": float(dense_auc.max(1).mean()),
             "mean_in_box_share": float(part_share.mean()), "mean_in_box_chance": float(part_chance.mean()),
             "grid": list(acts["grid"]), "score": "per-image max of the Top-K code"}
    neuron_part = auc.argmax(0)
    neuron_share, _ = in_box_share(*ctx, np.arange(len(neuron_part)), neuron_part)
    per_neuron = {"best_part": [types[j] for j in neuron_part], "auroc": auc.max(0), "in_box_share": neuron_share}
    return table, per_neuron


# ----------------------------------------------------------------------------- outputs
def example_entries(rows, values, thumbs, indices, labels, class_names) -> list[list[dict]]:
    """Per neuron, its ``top_examples`` records (global image index, activation, class, thumb path)."""
    out = []
    for i in range(rows.shape[0]):
        out.append([{"image_index": int(indices[r]), "activation": round(float(v), 5),
                     "class": class_names[labels[r]], "thumb": t or None}
                    for r, v, t in zip(rows[i], values[i], thumbs[i]) if r >= 0])
    return out


def summary_metrics(cfg, acts, st, labels, records, recovery, ckpt, sae_ckpt, timings) -> dict:
    """summary.json: counts, SAE faithfulness on the summarised images, concept recovery, provenance."""
    err = acts["logits"] - acts["sae_logits"]                                # ε per image and class
    live = ~st["dead"]
    clear = [r for r in records if not r["dead"] and r["top_classes"] and r["top_classes"][0]["pmi"] >= cfg.WEAK_PMI]
    return {
        "n_images": int(len(labels)), "n_neurons": int(len(st["dead"])), "n_dead": int(st["dead"].sum()),
        "dead_fraction": float(st["dead"].mean()), "n_clear_class": len(clear),
        "mean_image_frequency_live": float(st["image_frequency"][live].mean()) if live.any() else 0.0,
        "mean_token_frequency": float(st["token_frequency"].mean()),
        "classifier_train_accuracy": float((acts["logits"].argmax(1) == labels).mean()),
        "sae_top1_agreement": float((acts["sae_logits"].argmax(1) == acts["logits"].argmax(1)).mean()),
        "sae_error_logit_rms": float(np.sqrt((err ** 2).mean())),
        "grid": list(acts["grid"]), "concept_recovery": recovery, "timings_s": timings,
        "classifier": {"path": cfg.CLASSIFIER_CKPT, "fingerprint": ckpt["fingerprint"]},
        "sae": {"path": cfg.SAE_CKPT, "fingerprint": artifacts.tensor_fingerprint(sae_ckpt["state"]),
                "n_latents": sae_ckpt["n_latents"], "k": sae_ckpt["k"],
                "classifier_fingerprint": sae_ckpt["classifier_fingerprint"]},
        "score": "max over classes of max(PMI, 0) * max(-knockout, 0)", "config": dict(cfg),
    }


def check_config(cfg) -> None:
    if not 0.0 < cfg.QUANTILE < 1.0:
        raise UserError(f"QUANTILE must be in (0, 1), got {cfg.QUANTILE}")
    if cfg.PMI_LAMBDA < 0 or cfg.TOP_EXAMPLES < 1 or cfg.BATCH_SIZE < 1 or cfg.THUMB_SIZE < 8:
        raise UserError("need PMI_LAMBDA >= 0, TOP_EXAMPLES >= 1, BATCH_SIZE >= 1 and THUMB_SIZE >= 8")


# ----------------------------------------------------------------------------- main
def main(**overrides) -> dict:
    cfg = make_config(module_constants(globals()), overrides)
    check_config(cfg)
    set_threads(cfg.NUM_THREADS)
    torch.manual_seed(cfg.SEED)
    device = resolve_device(cfg.DEVICE)
    timings, t0 = {}, time.time()
    model, ckpt, sae, sae_ckpt, imageset = load_models(cfg, device)
    indices = select_images(ckpt["split"]["train"].numpy(), imageset.labels, cfg.MAX_PER_CLASS, cfg.SEED)
    labels, prep = imageset.labels[indices], ckpt["preprocess"]
    print(f"summarising {sae.n_latents} neurons (K={sae.k}) on {len(indices)} training images, device {device}")
    run = dict(prep=prep, device=device, batch_size=cfg.BATCH_SIZE, amp=cfg.AMP)
    acts = collect(model, sae, imageset.images, indices, **run, cache_mb=cfg.FEATURE_CACHE_MB)
    timings["pass1"] = time.time() - t0

    t = time.time()
    lens = logit_lens(sae, model.fc.weight).detach().cpu().double().numpy()
    st = neuron_stats(acts, labels, lens, cfg)
    rows, values = top_examples(acts["top_max"], cfg.TOP_EXAMPLES)
    timings["stats"] = time.time() - t
    t = time.time()
    maps = example_token_maps(model, sae, imageset.images, indices, rows, **run, fmaps=acts.pop("fmaps"))
    recovery, parts = concept_recovery(acts, rows, maps, imageset, indices, prep["image_size"])
    timings["pass2_and_recovery"] = time.time() - t

    t = time.time()
    out = Path(cfg.OUT_DIR)
    for sub in ("thumbs", "sprites"):  # stale images of an earlier run would mislead
        shutil.rmtree(out / sub, ignore_errors=True)
    thumbs = report.render_examples(out, lambda r: np.asarray(imageset.images[indices[r]]), rows, maps,
                                    acts["grid"], cfg.THUMB_SIZE, cfg.HEAT_ALPHA)
    timings["render"] = time.time() - t
    examples = example_entries(rows, values, thumbs, indices, labels, imageset.class_names)
    records = report.neuron_records(st, imageset.class_names, examples, parts, cfg.TOP_CLASSES, cfg.ANTI_CLASSES,
                                    cfg.WEAK_PMI)
    artifacts.write_jsonl(out / "neurons.jsonl", records)
    timings["total"] = time.time() - t0
    summary = summary_metrics(cfg, acts, st, labels, records, recovery, ckpt, sae_ckpt, timings)
    artifacts.write_json(out / "summary.json", summary)
    save_effective_config(cfg, out)
    report.write_index_html(out)
    _log(summary, out)
    return summary


def _log(summary: dict, out: Path) -> None:
    print(f"{summary['n_neurons']} neurons, {summary['n_dead']} dead, {summary['n_clear_class']} with a clear class; "
          f"SAE keeps {100 * summary['sae_top1_agreement']:.1f}% of predictions; {summary['timings_s']['total']:.1f}s")
    rec = summary["concept_recovery"]
    if rec:
        print(f"concept recovery: mean best AUROC {rec['mean_best_auroc']:.3f}, "
              f"mean in-box share {rec['mean_in_box_share']:.2f} (chance {rec['mean_in_box_chance']:.2f})")
    print(f"-> {out}/neurons.jsonl, {out}/index.html")


if __name__ == "__main__":
    run_cli(main, globals())
