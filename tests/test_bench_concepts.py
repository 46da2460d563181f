"""bench/bench_concepts.py: the supervised probe (a reference that must find a part where the features hold it) and the fresh-sketch table."""
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from bench import bench_concepts
from selfexplain import concept_measures as cm
from selfexplain.errors import UserError

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


def test_fresh_sketches_score_every_code_and_other_sae_seeds(tiny_classifier, tiny_sae, cache_dir, tmp_path, seed):
    """The fresh-sketch table: the given SAE, its other seeds (trained once, then reused) and the baselines."""
    settings = dict(classifier_ckpt=str(tiny_classifier / "best.pt"), sae_ckpt=str(tiny_sae / "best_sae.pt"),
                    cache_dir=str(cache_dir), out=str(tmp_path / "concepts.md"), cf_images=0, nmf_iters=5,
                    nmf_code_iters=5, nmf_tokens=256, fresh_per_class=4, seed_saes=[0, 1],
                    seed_sae_dir=str(tmp_path / "sae_seed{seed}"))
    fresh = bench_concepts.main(**settings)["fresh"]
    codes = [r["code"] for r in fresh]
    assert codes[0].endswith("seed 0 (the one given)") and codes[1].endswith("seed 1")   # seed 0 is the given one
    assert {"channels", "PCA", "NMF"} <= set(codes)
    for row in fresh[:2]:                                                # each SAE against the best baseline
        assert row["versus"]["baseline"] in codes[2:] and row["versus"]["low"] <= row["versus"]["high"]
        sae_auroc = row["mean_test_auroc"]                              # ... and every close contender, named
        close = {r["code"] for r in fresh[2:] if r["mean_test_auroc"] >= sae_auroc - bench_concepts.CONTENDER}
        assert {e["baseline"] for e in row["versus_each"]} == close
    assert all("versus" not in r for r in fresh[2:])
    assert "48 fresh sketches (generator seed 123)" in (tmp_path / "concepts.md").read_text()
    trained = tmp_path / "sae_seed1" / "best_sae.pt"
    stamp = trained.stat().st_mtime_ns
    bench_concepts.main(**settings)                                      # same settings: the seed-1 SAE is reused
    assert trained.stat().st_mtime_ns == stamp and not (tmp_path / "sae_seed0").exists()


def test_fresh_sketches_refuse_the_datasets_own_seed(tiny_classifier):
    ckpt = torch.load(tiny_classifier / "best.pt", weights_only=True)
    cfg = SimpleNamespace(FRESH_SEED=ckpt["dataset"]["seed"], FRESH_PER_CLASS=4, BATCH_SIZE=8)
    with pytest.raises(UserError, match="dataset's own seed"):
        bench_concepts.fresh_sketches(None, ckpt, None, (2, 2), cfg)
