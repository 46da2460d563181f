"""bench/compare_demos.py: paired reads of two classifiers and the exact McNemar test."""
import numpy as np
import pytest
import torch

from bench import compare_demos


class _Fixed(torch.nn.Module):
    """A 'classifier' that answers a fixed class per image, keyed by the image's grey level (0-255)."""

    def __init__(self, answers: dict):
        super().__init__()
        self.answers = answers

    def forward(self, x):
        keys = ((1.0 - x[:, 0, 0, 0]) * 255).round().int().tolist()  # model_input's ink = 1 - grey / 255
        logits = torch.zeros(len(x), 3)
        for row, key in enumerate(keys):
            logits[row, self.answers[key]] = 1.0
        return logits


def test_mcnemar_exact_matches_the_binomial_tail():
    assert compare_demos.mcnemar_exact(0, 0) == 1.0
    assert compare_demos.mcnemar_exact(5, 0) == pytest.approx(2 / 32)          # 2 * P(X <= 0), X ~ Bin(5, 1/2)
    assert compare_demos.mcnemar_exact(1, 9) == pytest.approx(2 * 11 / 1024)   # 2 * (1 + 10) / 2^10
    assert compare_demos.mcnemar_exact(26, 29) == compare_demos.mcnemar_exact(29, 26) > 0.7


def test_compare_counts_what_only_one_classifier_reads_right():
    images = np.stack([np.full((8, 8), v, dtype=np.uint8) for v in (0, 50, 100, 150, 200)])
    labels = np.array([0, 1, 2, 0, 1])
    prep = {"mean": 0.0, "std": 1.0, "image_size": 8, "ink": True}
    keys = [0, 50, 100, 150, 200]
    new = _Fixed(dict(zip(keys, [0, 1, 2, 2, 2])))   # right on 0, 1, 2
    old = _Fixed(dict(zip(keys, [0, 0, 0, 0, 1])))   # right on 0, 3, 4
    [row] = compare_demos.compare({"new": (new, prep), "old": (old, prep)}, {"five": (images, labels)}, batch=2)
    assert (row["new"], row["old"]) == (0.6, 0.6)
    assert (row["only_new"], row["only_old"], row["new_errors"], row["old_errors"]) == (2, 2, 2, 2)
    assert row["p"] == 1.0
