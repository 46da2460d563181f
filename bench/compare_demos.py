"""Benchmark: is the demo classifier worse than the old `quadrants` demo's on the old demo's own sketches?

Issue 16 asks that the demo's test accuracy be "no worse" after the demo moved to the
`varied` style (how people draw). The two demos' test splits differ (the old one's is
easier), so their own test figures cannot be compared. This reads both classifiers on
the same images, paired:

* the old demo's own test split (360 `quadrants` sketches: the split in its checkpoint);
* the new demo's own test split (720 `varied` sketches);
* 6,000 fresh sketches of each style (``FRESH_PER_CLASS`` per class, generator seed
  ``FRESH_SEED``: a random stream neither classifier was trained or selected on).

Each row gives both accuracies, the sketches only one of them reads right, and an exact
McNemar p (two-sided binomial test on those discordant pairs). The old demo is rebuilt
with today's code when ``OLD_CKPT`` is missing (``OLD_SETTINGS``: the settings the demo
had until session 5, ~1 min on 2 cores).

Usage: python bench/compare_demos.py [--new_ckpt=runs/standard_cnn/best.pt] [--old_ckpt=bench/_work/quad_cnn/best.pt]
"""
from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import train_standard_cnn  # noqa: E402
from bench.bench_person import predict  # noqa: E402
from bench.sections import write_section  # noqa: E402
from selfexplain import artifacts, data, synthetic  # noqa: E402
from selfexplain.config import make_config, module_constants, run_cli  # noqa: E402
from selfexplain.logs import log  # noqa: E402

NEW_CKPT = artifacts.CLASSIFIER_CKPT           # the demo classifier (`make demo`)
OLD_CKPT = "bench/_work/quad_cnn/best.pt"      # the old quadrants demo's classifier (rebuilt when missing)
OLD_SETTINGS = {"synthetic_style": "quadrants", "synthetic_per_class": 300, "epochs": 2,  # the old demo's stage 1
                "synthetic_fresh": False, "layer4_stride": 1}                                # (cached sketches, 4x4 maps)
CACHE_DIR = artifacts.CACHE_DIR                # decoded-image cache
FRESH_PER_CLASS = 500                          # fresh sketches per class and style (6,000 per style)
FRESH_SEED = 123                               # generator seed of the fresh sketches (the demos use 0)
BATCH = 256                                    # images per forward pass
OUT = "bench/results/demos.md"                 # markdown written here (merged into RESULTS.md)


def mcnemar_exact(only_a: int, only_b: int) -> float:
    """Two-sided exact McNemar p: the discordant pairs as Binomial(only_a + only_b, 1/2)."""
    n, k = only_a + only_b, min(only_a, only_b)
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def old_classifier(cfg) -> str:
    """OLD_CKPT, trained first with OLD_SETTINGS when it does not exist."""
    if not Path(cfg.OLD_CKPT).is_file():
        log(f"{cfg.OLD_CKPT} missing: training the old quadrants demo ({cfg.OLD_SETTINGS})")
        train_standard_cnn.main(dataset="synthetic", out_dir=str(Path(cfg.OLD_CKPT).parent), cache_dir=cfg.CACHE_DIR,
                                tensorboard=False, overwrite=True, **cfg.OLD_SETTINGS)
    return cfg.OLD_CKPT


def sketch_sets(cfg, new: dict, old: dict) -> dict:
    """name -> (uint8 images, labels): both demos' test splits and the fresh sketches of each style."""
    sets = {}
    for name, ckpt in (("old demo's test split (quadrants)", old), ("new demo's test split (varied)", new)):
        imageset = data.load_dataset(ckpt["dataset"], cfg.CACHE_DIR, progress=False)
        test = np.sort(ckpt["split"]["test"].numpy())
        sets[name] = (imageset.images[test], np.asarray(imageset.labels)[test])
    for style in ("quadrants", "varied"):
        drawn = synthetic.generate_synthetic(cfg.FRESH_PER_CLASS, new["dataset"]["image_size"], seed=cfg.FRESH_SEED,
                                             style=style)
        sets[f"fresh {style} sketches (seed {cfg.FRESH_SEED})"] = (drawn["images"], drawn["labels"])
    return sets


def compare(models: dict, sets: dict, batch: int) -> list[dict]:
    """Paired reads of every set by both classifiers."""
    rows = []
    for name, (images, labels) in sets.items():
        right = {who: predict(model, prep, images, batch) == labels for who, (model, prep) in models.items()}
        only_new, only_old = int((right["new"] & ~right["old"]).sum()), int((right["old"] & ~right["new"]).sum())
        rows.append({"set": name, "n": len(labels), "new": float(right["new"].mean()), "old": float(right["old"].mean()),
                     "new_errors": int((~right["new"]).sum()), "old_errors": int((~right["old"]).sum()),
                     "only_new": only_new, "only_old": only_old, "p": mcnemar_exact(only_new, only_old)})
        log(f"{name}: new {rows[-1]['new']:.4f} old {rows[-1]['old']:.4f} p {rows[-1]['p']:.3g}")
    return rows


def _p(p: float) -> str:
    return "< 1e-100" if p < 1e-100 else f"{p:.2g}"


def render(rows: list[dict], cfg, new: dict, old: dict) -> list[str]:
    def describe(ckpt: dict) -> str:
        spec = ckpt["dataset"]
        return f"{spec.get('style')}, {spec.get('per_class')} per class, {ckpt['config'].get('EPOCHS')} epochs"

    lines = ["## The demo classifier against the old quadrants demo's, on the same sketches", "",
             f"New: {cfg.NEW_CKPT} ({describe(new)}); old: {cfg.OLD_CKPT} ({describe(old)}, rebuilt with today's code). "
             "Paired reads; \"only new\" = sketches the new classifier reads right and the old one wrong; p = exact "
             "McNemar (two-sided) on those discordant pairs.", "",
             "| sketches | n | new demo | old demo | errors new / old | only new | only old | McNemar p |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['set']} | {r['n']} | **{r['new']:.4f}** | {r['old']:.4f} | {r['new_errors']} / "
                     f"{r['old_errors']} | {r['only_new']} | {r['only_old']} | {_p(r['p'])} |")
    return lines


def main(**overrides) -> list[dict]:
    cfg = make_config(module_constants(globals()), overrides)
    loaded = {who: artifacts.load_classifier(path) for who, path in (("new", cfg.NEW_CKPT),
                                                                       ("old", old_classifier(cfg)))}
    models = {who: (model.eval(), ckpt["preprocess"]) for who, (model, ckpt) in loaded.items()}
    with torch.inference_mode():
        rows = compare(models, sketch_sets(cfg, loaded["new"][1], loaded["old"][1]), cfg.BATCH)
    write_section(cfg.OUT, render(rows, cfg, loaded["new"][1], loaded["old"][1]))
    return rows


if __name__ == "__main__":
    run_cli(main, globals())
