"""Choose, on the validation split, how the input-space check ranks the ink where neurons fire.

The deletion check (selfexplain/evidence.py) whites out the ink where several neurons fire.
Their token maps have to be combined into one "where" first (raw activations are not
comparable across neurons), and a token map (4x4 on the demo) says which cells, not which
ink inside them. This script scores each way of combining the maps, alone (upsampled) and
times the pixel attribution of the set's activation (``evidence.set_activation_pixels``),
on the *validation* split (the test split is left to ``bench_explain.py``'s headline
figures): for each way, the logit drop after whiting out ``INK_SHARE`` of the ink by the
cited concepts' map and by random active neurons' maps (the same rule for both), beside
CAM. The rule: the highest cited / random among the ways with cited >= 0.95x CAM; the
defaults in ``evidence.where_map`` and ``evidence.PIXEL_MAPS`` are the row chosen here
(the plain sum in session 8; on session 9's models the mass-normalised sum led it beyond
the images' noise and replaced it), kept unless a later pick leads them beyond that noise
(a paired bootstrap interval of the lead that excludes 0: :func:`versus_product`).

Usage: python bench/choose_where_map.py [--max_images=0] [--out=bench/results/explain_where.md]
"""
from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.bench_explain import cited_and_random  # noqa: E402
from bench.sections import write_section  # noqa: E402
from selfexplain import artifacts, data, evidence, explain  # noqa: E402
from selfexplain.config import make_config, module_constants, run_cli  # noqa: E402

CLASSIFIER_CKPT = artifacts.CLASSIFIER_CKPT   # trained classifier
SAE_CKPT = artifacts.SAE_CKPT                 # its SAE
CACHE_DIR = artifacts.CACHE_DIR               # decoded-image cache
SPLIT = "val"                                 # where the choice is made (never the test split)
MAX_IMAGES = 0                                # images scored (0 = the whole split)
N_CITE = 5                                    # cited concepts (why_did_you's default)
RANDOM_DRAWS = 8                              # random active-neuron sets per image
INK_SHARE = 0.2                               # share of the ink whited out
SEED = 0                                      # random draws
OUT = "bench/results/explain_where.md"        # markdown written here (merged into RESULTS.md)

WAYS = {  # name -> how (n, h, w) maps become one (h, w) map
    "mass-normalised, summed (evidence.where_map)": evidence.where_map,
    "raw sum (the set's code per token)": lambda m: np.asarray(m, dtype=np.float64).sum(0),
    "peak-normalised, summed": lambda m: evidence.peak_normalised(m).sum(0),
    "peak-normalised, strongest per token (the overlay's)": lambda m: evidence.peak_normalised(m).max(0),
    "square root, summed": lambda m: np.sqrt(np.clip(m, 0, None)).sum(0),
}
PIXELS_ONLY = "none: pixel attribution alone"  # the pixel map without the token map's cells
PRODUCT = "mass-normalised, summed (evidence.where_map) x pixel attribution"  # why_did_you's row (PIXEL_MAPS=True)
N_BOOT = 1000                                 # paired bootstrap resamples: the pick against the product's row


def image_drops(models, image: np.ndarray, analysis, b: int, cited: list, random_sets: list, cls: int,
                ink_share: float) -> dict[str, tuple[float, float, float]]:
    """Per row: (cited drop, mean random drop, CAM drop) of class ``cls``'s logit on one image.

    One gradient pass for the pixel attribution of all sets and one forward for every row's
    masks: rows are each way with the token map alone and times the pixel attribution.
    """
    sets = [list(cited)] + [list(r) for r in random_sets]
    size = image.shape[-1]
    pixels = evidence.set_activation_pixels(models, image, sets)
    rows = {}
    for name, combine in WAYS.items():
        token = evidence.upsample(np.stack([combine(evidence.token_maps(analysis, b, ids)) for ids in sets]), size)
        rows[f"{name} x pixel attribution"] = evidence.pixel_scores(token, pixels)
        rows[f"{name}, token map alone"] = token
    rows[PIXELS_ONLY] = pixels
    cam = evidence.upsample(evidence.cam_map(models, analysis, b, cls)[None], size)
    masks = evidence.rank_ink(image, np.concatenate(list(rows.values()) + [cam]), ink_share)
    logits, _ = evidence.class_scores(models, evidence.delete_ink(image, masks), cls)
    drops = float(analysis.logits[b, cls]) - logits
    out = {}
    for k, name in enumerate(rows):
        d = drops[k * len(sets):(k + 1) * len(sets)]
        out[name] = (float(d[0]), float(d[1:].mean()) if len(d) > 1 else 0.0, float(drops[-1]))
    return out


def main(**overrides) -> dict:
    cfg = make_config(module_constants(globals()), overrides)
    models = explain.load_models(cfg.CLASSIFIER_CKPT, cfg.SAE_CKPT, "cpu")
    imageset = data.load_dataset(models.classifier_ckpt["dataset"], cfg.CACHE_DIR)
    idx = np.sort(np.asarray(models.classifier_ckpt["split"][cfg.SPLIT]))
    idx = idx[:cfg.MAX_IMAGES] if cfg.MAX_IMAGES else idx
    picks = SimpleNamespace(N_CITE=cfg.N_CITE, RANDOM_DRAWS=cfg.RANDOM_DRAWS)
    rows: dict[str, list] = {}
    for start in range(0, len(idx), 64):
        batch = np.ascontiguousarray(imageset.images[idx[start:start + 64]])
        analysis = explain.analyse(models, batch)
        for b in range(len(batch)):
            cls = int(analysis.logits[b].argmax())
            rng = np.random.default_rng([cfg.SEED, int(idx[start + b])])
            cited, sets = cited_and_random(models, analysis, b, cls, picks, rng)
            if cited:
                for name, drops in image_drops(models, batch[b], analysis, b, cited, sets, cls,
                                               cfg.INK_SHARE).items():
                    rows.setdefault(name, []).append(drops)
        print(f"{min(start + 64, len(idx))}/{len(idx)} images", flush=True)
    means = {name: np.mean(r, 0) for name, r in rows.items()}
    chosen = choose(means)
    lines = [f"### Ranking the ink where neurons fire: chosen on the {cfg.SPLIT} split", "",
             f"`bench/choose_where_map.py`: {len(rows[chosen])} {cfg.SPLIT} images, {cfg.N_CITE} cited "
             f"concepts, {cfg.RANDOM_DRAWS} random active sets, {cfg.INK_SHARE:.0%} of the ink whited out; the same "
             "rule ranks the cited and the random neurons' ink. Each way of combining the token maps, upsampled, "
             "alone or times the pixel attribution of the set's activation (gradient x ink, positive part). "
             "Chosen (**bold**): the highest cited / random among the rows with cited >= 0.95x CAM. Logit drops:", "",
             "| way | cited | random active | CAM | cited / random | cited / CAM |", "|---|---:|---:|---:|---:|---:|"]
    for name, (c, r, cam) in sorted(means.items(), key=lambda kv: -kv[1][0] / max(kv[1][1], 1e-12)):
        label = f"**{name}**" if name == chosen else name
        lines.append(f"| {label} | {c:.3f} | {r:.3f} | {cam:.3f} | {c / max(r, 1e-12):.3f} | {c / max(cam, 1e-12):.3f} |")
    lines += ["", versus_product(rows, chosen, cfg.SEED)]
    write_section(cfg.OUT, lines)
    return {"chosen": chosen, "means": {name: m.tolist() for name, m in means.items()}}


def versus_product(rows: dict[str, list], chosen: str, seed: int, n_boot: int = N_BOOT) -> str:
    """One line: the pick's cited / random lead over the product's row, with a paired bootstrap interval.

    A pick that leads by less than the images can resolve (the interval holds 0) does not
    overturn the rule the product already uses: choices are not re-made on noise.
    """
    if chosen == PRODUCT:
        return "The pick is the product's rule (`evidence.where_map` x the pixel attribution, `PIXEL_MAPS=True`)."
    pick, product = np.asarray(rows[chosen]), np.asarray(rows[PRODUCT])
    boot = np.random.default_rng(seed).integers(0, len(pick), (n_boot, len(pick)))

    def ratio(a, i=slice(None)):
        return a[i, 0].mean(-1) / np.maximum(a[i, 1].mean(-1), 1e-12)

    lead = ratio(pick) - ratio(product)
    lo, hi = np.percentile([ratio(pick, i) - ratio(product, i) for i in boot], [2.5, 97.5])
    verdict = ("within what these images resolve: the product keeps its rule" if lo <= 0 <= hi else
               "beyond what the images' noise explains: the product's rule should change to the pick")
    return (f"The pick leads the product's rule ({PRODUCT}) by {lead:+.3f} in cited / random (95% paired bootstrap "
            f"interval {lo:+.3f} to {hi:+.3f}, {n_boot} resamples of the images): {verdict}.")


def choose(means: dict[str, np.ndarray]) -> str:
    """The row with the highest cited / random among those with cited >= 0.95x CAM (all rows if none)."""
    ok = [n for n, (c, r, cam) in means.items() if c >= 0.95 * cam] or list(means)
    return max(ok, key=lambda n: means[n][0] / max(means[n][1], 1e-12))


if __name__ == "__main__":
    run_cli(main, globals())
