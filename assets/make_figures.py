"""Draw assets/pipeline.png and assets/idea.png (the latter from a real demo explanation).

Usage: python assets/make_figures.py        (after `make demo`, for idea.png)
"""
from __future__ import annotations

import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as `python assets/make_figures.py`: the package lives in the repo root
from idea_figure import idea_figure  # noqa: E402  (assets/, this script's folder, is on sys.path)
from selfexplain.artifacts import (BEST_CLASSIFIER, BEST_SAE, CLASSIFIER_DIR, INDEX_HTML, LABEL_DECODER,  # noqa: E402
                                   LLM_OUTPUT, METRICS, NEURONS, REPORT_DIR, SAE_DIR, SPRITES_DIR, SUMMARY)
from selfexplain.logs import log  # noqa: E402

STAGES = [
    ("train_standard_cnn.py", "ResNet-18, 1-channel sketches",
     f"{CLASSIFIER_DIR}/\n{BEST_CLASSIFIER}  {LABEL_DECODER}\n{METRICS}"),
    ("train_sae.py", "BatchTopK SAE on layer4 tokens", f"{SAE_DIR}/\n{BEST_SAE}  (μ, σ, M, K, θ)\n{METRICS}"),
    ("sae_summarize.py", "PMI, logit lens, knockout",
     f"{REPORT_DIR}/\n{NEURONS}  {SPRITES_DIR}/\n{INDEX_HTML}  {SUMMARY}"),
    ("sae_summary_to_llm.py", "statistics + images → concept", f"{REPORT_DIR}/\n{LLM_OUTPUT}"),
    ("why_did_you.py", "explain one prediction", "prediction, concepts,\nshares, heat-map overlay"),
]


def pipeline_figure(path: Path) -> None:
    """The five stages as boxes, each over the artifacts it writes."""
    fig, ax = plt.subplots(figsize=(16, 3.6), dpi=150)
    ax.set_xlim(0, 5 * 3.0)
    ax.set_ylim(0, 3.6)
    ax.axis("off")
    colours = ["#4C72B0", "#55A868", "#C44E52", "#8172B2", "#CCB974"]
    for i, (script, what, outputs) in enumerate(STAGES):
        x = 0.15 + i * 3.0
        ax.add_patch(FancyBboxPatch((x, 2.0), 2.6, 1.3, boxstyle="round,pad=0.05", fc=colours[i], ec="none", alpha=0.9))
        ax.text(x + 1.3, 2.95, f"{i + 1}. {script}", ha="center", va="center", color="white", fontsize=9, weight="bold")
        ax.text(x + 1.3, 2.45, what, ha="center", va="center", color="white", fontsize=8)
        ax.add_patch(FancyBboxPatch((x, 0.25), 2.6, 1.25, boxstyle="round,pad=0.05", fc="#f4f4f4", ec=colours[i]))
        ax.text(x + 1.3, 0.87, outputs, ha="center", va="center", fontsize=7.8, family="monospace")
        ax.add_patch(FancyArrowPatch((x + 1.3, 1.98), (x + 1.3, 1.55), arrowstyle="-|>", mutation_scale=12,
                                     color="#555"))
        if i < len(STAGES) - 1:
            ax.add_patch(FancyArrowPatch((x + 2.67, 2.65), (x + 3.08, 2.65), arrowstyle="-|>", mutation_scale=14,
                                         color="#333"))
    fig.suptitle("Five stages, each reading the previous stage's artifacts from disk", fontsize=11)
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)


def main() -> None:
    out = ROOT / "assets"
    pipeline_figure(out / "pipeline.png")
    log(f"wrote {out / 'pipeline.png'}")
    idea_figure(out / "idea.png")
    log(f"wrote {out / 'idea.png'}")


if __name__ == "__main__":
    main()
