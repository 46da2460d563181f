"""bench/bench_concepts.py's supervised probe: a reference that must find a part where the features hold it."""
import numpy as np
import torch

from bench import bench_concepts
from selfexplain import concept_measures as cm

PARTS = ["a", "b"]


def _truth(present: np.ndarray) -> cm.PartTruth:
    n = len(present)
    return cm.PartTruth(part_names=PARTS, present=present, labels=np.zeros(n, int),
                        part_classes=np.array([[True], [True]]), boxes=np.full((n, 2, 1, 4), np.nan), grid=(2, 2),
                        image_size=64)


def _maps(present: np.ndarray, rng, signal: float) -> torch.Tensor:
    """(N, 8, 2, 2) post-ReLU maps: channel 0 carries part a (times ``signal``) spread over noise channels."""
    maps = rng.random((len(present), 8, 2, 2))
    maps[:, 0, 0, 0] += signal * present[:, 0]
    maps[:, 3, 1, 1] += signal * present[:, 1]
    return torch.as_tensor(maps, dtype=torch.float32)


def test_probe_finds_parts_the_features_carry_and_not_labels_they_do_not():
    rng = np.random.default_rng(0)
    present = {s: rng.random((n, 2)) < 0.4 for s, n in (("train", 400), ("test", 200))}
    truth = {s: _truth(p) for s, p in present.items()}
    strong = bench_concepts.probe_report({s: _maps(p, rng, 2.0) for s, p in present.items()}, truth)
    assert strong.selection.test_auroc.min() > 0.95
    silent = bench_concepts.probe_report({s: _maps(p, rng, 0.0) for s, p in present.items()}, truth)
    assert abs(silent.selection.test_auroc.mean() - 0.5) < 0.1        # fitted on train, no signal: chance on test
