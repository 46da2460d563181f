"""Plots for bench/bench_explain.py: deletion/insertion curves and the counterfactual scatter."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

COLOURS = {"explanation": "#d62728", "random order": "#ff9896", "CAM": "#1f77b4", "random ink": "#7f7f7f"}


def plot_curves(deletion: dict[str, np.ndarray], insertion: dict[str, np.ndarray], path: str | Path) -> Path:
    """Mean class logit per step (0 = nothing removed / added) for each order, side by side."""
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6), sharey=True)
    for ax, curves, title in ((axes[0], deletion, "deletion (ink removed from the sketch)"),
                              (axes[1], insertion, "insertion (ink added to a blank page)")):
        for order, curve in curves.items():
            ax.plot(np.arange(len(curve)), curve, marker="o", ms=3, label=order, color=COLOURS.get(order))
        ax.set_xticks(np.arange(len(curve)))
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("cited concepts' regions, step")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("predicted class logit (mean)")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def plot_counterfactuals(actual: np.ndarray, predicted: np.ndarray, distractor: np.ndarray, path: str | Path) -> Path:
    """Predicted vs actual logit change for each (image, part) re-render, with the identity line."""
    fig, ax = plt.subplots(figsize=(4.4, 4.2))
    ax.scatter(actual[~distractor], predicted[~distractor], s=6, alpha=0.5, label="class part")
    ax.scatter(actual[distractor], predicted[distractor], s=6, alpha=0.5, label="distractor")
    lo, hi = float(min(actual.min(), predicted.min())), float(max(actual.max(), predicted.max()))
    ax.plot([lo, hi], [lo, hi], color="black", lw=0.8, label="predicted = actual")
    ax.set_xlabel("actual change of the class logit (part left out)")
    ax.set_ylabel("explanation's predicted change")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)
