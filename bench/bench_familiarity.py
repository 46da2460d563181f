"""Benchmark: does the "unfamiliar input" flag separate sketches from things that are not?

The calibration (selfexplain/familiarity.py) is fitted on the training split and its
threshold on the validation split; this bench scores the TEST split and six kinds of
non-sketch input it never saw, and prints the share flagged for each (targets: <= 5% of
test sketches, >= 95% of noise, blank and photo-like images). Random scribbles are
reported too: they are sketches of nothing, neither clearly familiar nor clearly not.

Usage: python bench/bench_familiarity.py [--classifier_ckpt=runs/standard_cnn/best.pt] [--n=200]
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a file: the repo root holds bench/
from bench.sections import write_section  # noqa: E402
from selfexplain import artifacts, explain, familiarity  # noqa: E402
from selfexplain.config import make_config, module_constants, run_cli  # noqa: E402
from selfexplain.data import load_dataset  # noqa: E402

CLASSIFIER_CKPT = artifacts.CLASSIFIER_CKPT  # trained classifier
SAE_CKPT = artifacts.SAE_CKPT                # its SAE
REPORT_DIR = artifacts.REPORT_DIR            # where familiarity.json lives (fitted when missing)
CACHE_DIR = artifacts.CACHE_DIR              # decoded-image cache
N = 200                                      # images per non-sketch kind
SEED = 1                                     # seeds the non-sketch images (not the calibration's)
OUT = "bench/results/familiarity.md"         # markdown written here (merged into RESULTS.md)


def non_sketches(kind: str, n: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` uint8 (size, size) images of one kind of input that is not a sketch."""
    if kind == "uniform noise":
        return rng.integers(0, 256, (n, size, size), dtype=np.uint8)
    if kind == "salt and pepper":
        density = rng.uniform(0.02, 0.3, (n, 1, 1))
        return np.where(rng.random((n, size, size)) < density, 0, 255).astype(np.uint8)
    if kind == "blank white":
        return np.full((n, size, size), 255, np.uint8)
    if kind == "blank black":
        return np.zeros((n, size, size), np.uint8)
    if kind == "photo-like":
        return np.stack([_photo(size, rng) for _ in range(n)])
    if kind == "random scribbles":
        return np.stack([_scribble(size, rng) for _ in range(n)])
    raise ValueError(kind)


def _photo(size: int, rng: np.random.Generator) -> np.ndarray:
    """A smooth gradient with soft blobs: the grey-level statistics of a photo, no strokes."""
    y, x = np.mgrid[0:size, 0:size] / size
    image = 255 * (rng.uniform(0.2, 0.8) + rng.uniform(-0.4, 0.4) * x + rng.uniform(-0.4, 0.4) * y)
    for _ in range(rng.integers(2, 6)):
        cx, cy, r = rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0.05, 0.3)
        image += rng.uniform(-120, 120) * np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * r * r))
    blurred = Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(1))
    return np.asarray(blurred)


def _scribble(size: int, rng: np.random.Generator) -> np.ndarray:
    canvas = Image.new("L", (size, size), 255)
    draw = ImageDraw.Draw(canvas)
    points = [tuple(p) for p in rng.uniform(0, size, (int(rng.integers(4, 12)), 2))]
    draw.line(points, fill=0, width=max(1, size // 40))
    return np.asarray(canvas)


def flagged_share(models, calibration, images: np.ndarray) -> float:
    verdicts = []
    for start in range(0, len(images), 128):
        batch = np.ascontiguousarray(images[start:start + 128])
        verdicts += calibration.score(explain.analyse(models, batch), batch)
    return float(np.mean([v.unfamiliar for v in verdicts]))


def main(**overrides) -> dict:
    cfg = make_config(module_constants(globals()), overrides)
    models = explain.load_models(cfg.CLASSIFIER_CKPT, cfg.SAE_CKPT, "cpu")
    calibration = familiarity.load_or_fit(models, cfg.REPORT_DIR, cfg.CACHE_DIR)
    ckpt = models.classifier_ckpt
    test = np.sort(np.asarray(ckpt["split"]["test"]))
    images = load_dataset(ckpt["dataset"], cfg.CACHE_DIR, progress=False).images
    rows = {"test sketches": flagged_share(models, calibration, np.asarray(images[test]))}
    rng = np.random.default_rng(cfg.SEED)
    for kind in ("uniform noise", "salt and pepper", "blank white", "blank black", "photo-like", "random scribbles"):
        rows[kind] = flagged_share(models, calibration, non_sketches(kind, cfg.N, models.image_size, rng))
    lines = ["## Stage 5: the unfamiliar-input flag", "",
             f"`{cfg.CLASSIFIER_CKPT}` + `{cfg.SAE_CKPT}`; calibration fitted on the training split, threshold = "
             f"the {familiarity.UNFAMILIAR_PERCENTILE:g}st percentile of the validation scores; scored on the "
             f"{len(test)} test sketches and {cfg.N} images of each other kind (seed {cfg.SEED}).", "",
             "| input | flagged unfamiliar | target |", "|---|---:|---|"]
    targets = {"test sketches": "<= 5%", "random scribbles": "–"}
    for kind, share in rows.items():
        lines.append(f"| {kind} | {share:.1%} | {targets.get(kind, '>= 95%')} |")
    write_section(cfg.OUT, lines + [""])
    return rows


if __name__ == "__main__":
    run_cli(main, globals())
