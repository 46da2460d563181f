"""Choose, on the validation split, how the input-space check combines the cited neurons' maps.

The deletion check (selfexplain/evidence.py) whites out the ink where several neurons fire.
Their token maps have to be combined into one "where" first, and raw activations are not
comparable across neurons. This script scores a few ways of combining them on the
*validation* split (the test split is left to ``bench_explain.py``'s headline figures):
for each way, the logit drop after whiting out ``INK_SHARE`` of the ink by the cited
concepts' combined map and by random active neurons' combined map (the same rule for both),
beside CAM. The default in ``evidence.where_map`` is the row chosen here.

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
    "peak-normalised, summed (evidence.where_map, the default)": evidence.where_map,
    "raw sum": lambda m: np.asarray(m, dtype=np.float64).sum(0),
    "peak-normalised, strongest per token (the overlay's)": lambda m: evidence.peak_normalised(m).max(0),
    "mass-normalised, summed": lambda m: (m / np.maximum(m.reshape(len(m), -1).sum(1), 1e-12)[:, None, None]).sum(0),
    "square root, summed": lambda m: np.sqrt(np.clip(m, 0, None)).sum(0),
}


def image_drops(models, image: np.ndarray, analysis, b: int, cited: list, random_sets: list, cls: int,
                ink_share: float) -> dict[str, tuple[float, float, float]]:
    """Per way: (cited drop, mean random drop, CAM drop) of class ``cls``'s logit on one image."""
    out = {}
    for name, combine in WAYS.items():
        d = evidence.input_deletion(models, image, analysis, b, cited, cls, random_sets, ink_share, combine=combine)
        out[name] = (d["input_cited_drop"], d["input_random_drop"], d["cam_drop"])
    return out


def main(**overrides) -> dict:
    cfg = make_config(module_constants(globals()), overrides)
    models = explain.load_models(cfg.CLASSIFIER_CKPT, cfg.SAE_CKPT, "cpu")
    imageset = data.load_dataset(models.classifier_ckpt["dataset"], cfg.CACHE_DIR)
    idx = np.sort(np.asarray(models.classifier_ckpt["split"][cfg.SPLIT]))
    idx = idx[:cfg.MAX_IMAGES] if cfg.MAX_IMAGES else idx
    picks = SimpleNamespace(N_CITE=cfg.N_CITE, RANDOM_DRAWS=cfg.RANDOM_DRAWS)
    rows = {name: [] for name in WAYS}
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
                    rows[name].append(drops)
        print(f"{min(start + 64, len(idx))}/{len(idx)} images", flush=True)
    means = {name: np.mean(r, 0) for name, r in rows.items()}
    lines = [f"### Combining the cited neurons' maps: chosen on the {cfg.SPLIT} split", "",
             f"`bench/choose_where_map.py`: {len(rows[next(iter(WAYS))])} {cfg.SPLIT} images, {cfg.N_CITE} cited "
             f"concepts, {cfg.RANDOM_DRAWS} random active sets, {cfg.INK_SHARE:.0%} of the ink whited out; the same "
             "rule combines the cited and the random neurons' maps. Logit drops:", "",
             "| way | cited | random active | CAM | cited / random | cited / CAM |", "|---|---:|---:|---:|---:|---:|"]
    for name, (c, r, cam) in means.items():
        lines.append(f"| {name} | {c:.3f} | {r:.3f} | {cam:.3f} | {c / max(r, 1e-12):.3f} | {c / max(cam, 1e-12):.3f} |")
    write_section(cfg.OUT, lines)
    return {name: m.tolist() for name, m in means.items()}


if __name__ == "__main__":
    run_cli(main, globals())
