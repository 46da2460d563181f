"""Benchmark: does the classifier read a person's drawing of its classes?

Draws ``N_PER_CLASS`` sketches of every synthetic class in every layout with the second
renderer (``bench/person_sketches.py``: clean PIL shapes at 1111 px, thin to thick pens,
read back through the project's ink-preserving decode at the checkpoint's input size),
classifies them and prints accuracy per layout and per pen width, beside chance, and how
much the predictions collapse onto a few classes. It trains nothing; it needs a trained
synthetic classifier (``make demo`` or ``python train_standard_cnn.py``).

Usage: python bench/bench_person.py [--classifier_ckpt=runs/standard_cnn/best.pt] [--n_per_class=20] [--sheet=sheet.png]
"""
from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.person_sketches import LAYOUTS, PENS, person_set  # noqa: E402
from bench.sections import write_section  # noqa: E402
from selfexplain import artifacts, data  # noqa: E402
from selfexplain.config import make_config, module_constants, run_cli  # noqa: E402
from selfexplain.errors import UserError  # noqa: E402
from selfexplain.synthetic import CLASS_NAMES  # noqa: E402

CLASSIFIER_CKPT = "runs/standard_cnn/best.pt"  # a classifier trained on DATASET=synthetic
N_PER_CLASS = 20                               # sketches per class and layout
SEED = 0                                       # seeds the second renderer
BATCH = 128                                    # images per forward pass
SHEET = ""                                     # also write a contact sheet of the sketches here ('' = no)
OUT = "bench/results/person.md"                # markdown written here (merged into RESULTS.md)


def predict(model: torch.nn.Module, prep: dict, images: np.ndarray, batch: int) -> np.ndarray:
    """Predicted class index per uint8 (N, S, S) image (fp32, no grad)."""
    out = []
    with torch.no_grad():
        for start in range(0, len(images), batch):
            x = data.model_input(torch.from_numpy(images[start:start + batch]), prep)
            out.append(model(x).argmax(1).numpy())
    return np.concatenate(out)


def contact_sheet(sketches: list, path: str) -> None:
    """One row per class; columns are that class's sketches, layout after layout."""
    rows = [[s.image for s in sketches if s.label == c] for c in range(len(CLASS_NAMES))]
    side, cols = rows[0][0].shape[0] + 2, len(rows[0])
    sheet = np.full((len(rows) * side, cols * side), 128, dtype=np.uint8)
    for r, row in enumerate(rows):
        for c, image in enumerate(row):
            sheet[r * side:r * side + side - 2, c * side:c * side + side - 2] = image
    Image.fromarray(sheet).save(path)


def table(sketches: list, predicted: np.ndarray, size: int, ckpt_path: str) -> list[str]:
    """Markdown: accuracy per layout and per pen, and the share of the most predicted class."""
    labels = np.array([s.label for s in sketches])
    correct = predicted == labels
    lines = [f"## A person's drawing: second-renderer accuracy ({size} px, `{ckpt_path}`)", "",
             f"{len(sketches) // len(LAYOUTS) // len(CLASS_NAMES)} sketches per class and layout, "
             f"clean shapes drawn at 1111 px by `bench/person_sketches.py` (pens {', '.join(map(str, PENS))} px), "
             f"decoded to {size} px; chance {1 / len(CLASS_NAMES):.3f}.", "",
             "| layout | sketches | accuracy | " + " | ".join(f"pen {p} px" for p in PENS)
             + " | most predicted class (share) |",
             "|---|---:|---:|" + "---:|" * len(PENS) + "---|"]
    groups = [(layout, np.array([s.layout == layout for s in sketches])) for layout in LAYOUTS]
    for name, mask in groups + [("all", np.ones(len(sketches), dtype=bool))]:
        pens = [correct[mask & np.array([s.pen == p for s in sketches])] for p in PENS]
        top, count = Counter(predicted[mask].tolist()).most_common(1)[0]
        lines.append(f"| {name} | {mask.sum()} | {correct[mask].mean():.3f} | "
                     + " | ".join(f"{c.mean():.3f}" if len(c) else "-" for c in pens)
                     + f" | {CLASS_NAMES[top]} ({count / mask.sum():.2f}) |")
    return lines


def main(**overrides) -> float:
    cfg = make_config(module_constants(globals()), overrides)
    model, ckpt = artifacts.load_classifier(cfg.CLASSIFIER_CKPT)
    if list(ckpt["class_names"]) != CLASS_NAMES:
        raise UserError(f"{cfg.CLASSIFIER_CKPT} was not trained on the synthetic classes (DATASET=synthetic)")
    size = int(ckpt["preprocess"]["image_size"])
    sketches = person_set(cfg.N_PER_CLASS, size, seed=cfg.SEED)
    if cfg.SHEET:
        contact_sheet(sketches, cfg.SHEET)
    predicted = predict(model, ckpt["preprocess"], np.stack([s.image for s in sketches]), cfg.BATCH)
    write_section(cfg.OUT, table(sketches, predicted, size, cfg.CLASSIFIER_CKPT))
    return float((predicted == np.array([s.label for s in sketches])).mean())


if __name__ == "__main__":
    run_cli(main, globals())
