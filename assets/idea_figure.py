"""assets/idea.png from a real demo explanation: the sketch, the concepts' heat maps and
their exact contributions to the predicted logit (which add up to it).

Imported by make_figures.py, which puts the repo root on sys.path first.
"""
from __future__ import annotations

import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from selfexplain import artifacts, data, explain  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CLASSIFIER_CKPT = ROOT / artifacts.CLASSIFIER_CKPT  # the demo's artifacts (make demo)
SAE_CKPT = ROOT / artifacts.SAE_CKPT
REPORT_DIR = ROOT / artifacts.REPORT_DIR
CACHE_DIR = ROOT / artifacts.CACHE_DIR
TEST_INDEX = 1  # which held-out test sketch to explain (test:0, the README's misread example, is shown there)


def idea_figure(path: Path) -> None:
    """Explain test sketch TEST_INDEX with the demo's models and draw input, overlay and contributions."""
    ckpt = artifacts.load_checkpoint(CLASSIFIER_CKPT, "classifier")
    images = data.load_dataset(ckpt["dataset"], CACHE_DIR, progress=False)
    idx = int(ckpt["split"]["test"][TEST_INDEX])
    sketch = np.asarray(images.images[idx])
    exp = explain.explain_images([sketch], CLASSIFIER_CKPT, SAE_CKPT, REPORT_DIR)[0]
    overlay = explain.render_overlay(sketch, exp, size=384, max_concepts=len(exp.neurons))  # the region the check used

    aspect = overlay.width / overlay.height  # the legend makes it taller than wide: a square slot left a gap
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.6), dpi=130, layout="constrained",
                             gridspec_kw={"width_ratios": [1, aspect, 2.2]})
    axes[0].imshow(sketch, cmap="gray", vmin=0, vmax=255)
    axes[0].set_title(f"input (true: {images.class_names[int(images.labels[idx])]})", fontsize=10)
    axes[1].imshow(overlay)
    axes[1].set_title("where the cited concepts fired", fontsize=10)
    for ax in axes[:2]:
        ax.axis("off")
    # the concept up to its first comma: "circle (part AUROC 1.00)" (the "where" words are on the overlay)
    names = [f"#{n.neuron_id} {n.concept.removeprefix('offline: ').split(',')[0][:40]}  ({n.share:.0%})"
             for n in exp.neurons]
    names += ["other neurons", "bias", "SAE error"]
    values = [n.contribution for n in exp.neurons] + [exp.others, exp.bias, exp.error]
    colours = [np.array(explain.PALETTE[i % len(explain.PALETTE)]) / 255 for i in range(len(exp.neurons))]
    colours += ["#999999", "#cccccc", "#eeeeee"]
    ax = axes[2]
    ax.barh(range(len(values))[::-1], values, color=colours, edgecolor="#555")
    ax.set_yticks(range(len(values))[::-1], names, fontsize=8.5)
    ax.axvline(0, color="#333", lw=0.8)
    ax.set_xlabel("contribution to the predicted logit")
    ax.set_title(f"predicted {exp.predicted_class} ({exp.probability:.0%}): logit {exp.logit:.2f} = sum of bars",
                 fontsize=10)
    fig.suptitle(textwrap.fill(exp.sentence.replace("offline: ", ""), 160), fontsize=10)
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
