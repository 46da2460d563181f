"""The familiarity score: noise and blank pages are flagged, held-out sketches mostly not."""
import json

import numpy as np
import pytest
import torch

from selfexplain import artifacts, data, explain, familiarity
from selfexplain.errors import UserError


@pytest.fixture(scope="module")
def models(tiny_classifier, tiny_sae):
    return explain.load_models(tiny_classifier / artifacts.BEST_CLASSIFIER, tiny_sae / artifacts.BEST_SAE, "cpu")


@pytest.fixture(scope="module")
def report_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("familiarity_report")


@pytest.fixture(scope="module")
def calibration(models, report_dir, cache_dir):
    return familiarity.load_or_fit(models, report_dir, cache_dir)


def strange_images(n: int, size: int, seed: int = 1) -> dict[str, np.ndarray]:
    """Inputs unlike any sketch: uniform noise, salt and pepper, blank white and black pages."""
    rng = np.random.default_rng(seed)
    return {"uniform noise": rng.integers(0, 256, (n, size, size), dtype=np.uint8),
            "salt and pepper": np.where(rng.random((n, size, size)) < 0.2, 0, 255).astype(np.uint8),
            "blank white": np.full((n, size, size), 255, np.uint8),
            "blank black": np.zeros((n, size, size), np.uint8)}


def flagged(calibration, models, images: np.ndarray) -> float:
    return float(np.mean([f.unfamiliar for f in calibration.score(explain.analyse(models, images), images)]))


def test_strange_inputs_are_flagged_and_test_sketches_mostly_not(calibration, models, cache_dir):
    ckpt = models.classifier_ckpt
    images = data.load_dataset(ckpt["dataset"], cache_dir, progress=False).images
    test = np.stack([images[int(i)] for i in ckpt["split"]["test"]])
    assert flagged(calibration, models, test) <= 0.2  # the threshold sits at validation's 1st percentile
    for name, batch in strange_images(16, models.image_size).items():
        assert flagged(calibration, models, batch) >= 0.9, name


def test_validation_percentiles_spread_over_0_to_100_and_agree_with_the_flag(calibration):
    val = calibration.val_scores
    percentiles = calibration.percentiles(val)
    assert percentiles.min() == 0.0 and percentiles.max() == 100.0 and 25 < np.median(percentiles) < 75
    assert np.mean(val < calibration.threshold) <= 0.05
    grid = np.linspace(val[0] - 1, val[min(len(val) - 1, 20)], 2001)  # dense around the threshold
    flagged = grid < calibration.threshold
    assert flagged.any() and not flagged.all()
    assert np.array_equal(flagged, calibration.percentiles(grid) < familiarity.UNFAMILIAR_PERCENTILE)


def test_calibration_is_stored_reused_and_refitted_when_stale(calibration, models, report_dir, cache_dir, monkeypatch):
    path = report_dir / familiarity.FAMILIARITY
    stored = json.loads(path.read_text())
    assert stored["classifier_fingerprint"] == models.classifier_ckpt["fingerprint"]
    assert stored["sae_fingerprint"] == models.sae_ckpt["fingerprint"]
    assert stored["val_scores"] == sorted(stored["val_scores"])

    def no_fit(*args):
        raise AssertionError("refitted a calibration that matches the models")

    monkeypatch.setattr(familiarity, "fit", no_fit)
    again = familiarity.load_or_fit(models, report_dir, cache_dir)
    batch = strange_images(2, models.image_size)["uniform noise"]
    analysis = explain.analyse(models, batch)
    assert [f.score for f in again.score(analysis, batch)] == pytest.approx([f.score for f in calibration.score(analysis, batch)])
    stored["sae_fingerprint"] = "another sae"
    path.write_text(json.dumps(stored))
    with pytest.raises(AssertionError, match="refitted"):
        familiarity.load_or_fit(models, report_dir, cache_dir)  # stale: it must refit (here: the stub refuses)
    monkeypatch.undo()
    familiarity.load_or_fit(models, report_dir, cache_dir)
    assert json.loads(path.read_text())["sae_fingerprint"] == models.sae_ckpt["fingerprint"]


def test_a_damaged_stored_calibration_is_a_one_line_error(calibration, models, cache_dir, tmp_path):
    good = calibration.to_json()
    # valid JSON but no calibration: a list was an AttributeError, a missing field a KeyError, deep in the load
    for damaged, reason in (([], "not a familiarity calibration"), ({**good, "scales": None}, "damaged"),
                            ({k: v for k, v in good.items() if k != "threshold"}, "damaged"),
                            ({**good, "precision_float32": "%%"}, "damaged"),
                            ({**good, "class_means": []}, "damaged")):  # no rows: an IndexError's traceback
        (tmp_path / familiarity.FAMILIARITY).write_text(json.dumps(damaged))
        with pytest.raises(UserError, match=f"{reason}.*delete it and rerun"):
            familiarity.load_or_fit(models, tmp_path, cache_dir)


def test_pooled_features_are_exactly_the_classifier_gap(models):
    batch = strange_images(3, models.image_size)["salt and pepper"]
    x = data.model_input(torch.from_numpy(batch), models.classifier_ckpt["preprocess"])
    with torch.no_grad():
        gap = models.classifier.features(x).float().mean(dim=(2, 3)).double().numpy()
    rebuilt = familiarity.pooled_features(models.sae, explain.analyse(models, batch))
    assert rebuilt == pytest.approx(gap, rel=1e-4, abs=1e-4)


def test_score_is_the_strangest_scaled_signal_and_mahalanobis_by_hand():
    cal = familiarity.Calibration("c", "s", np.zeros((1, 1)), np.eye(1), 0.0,
                                  scales={"sae_error": (1.0, 2.0), "feature_distance": (10.0, 20.0), "ink": (0.0, 0.5)})
    signals = {"sae_error": np.array([1.0, 5.0]), "feature_distance": np.array([15.0, 10.0]), "ink": np.array([0.0, 0.0])}
    assert cal.scores(signals).tolist() == [-0.5, -4.0]
    rng = np.random.default_rng(0)
    x, means = rng.normal(size=(4, 3)), rng.normal(size=(2, 3))
    a = rng.normal(size=(3, 3))
    precision = a @ a.T + np.eye(3)
    brute = [min(float((xi - m) @ precision @ (xi - m)) for m in means) for xi in x]
    assert familiarity.mahalanobis(x, means, precision) == pytest.approx(brute)


def test_a_small_validation_split_is_warned_about(models, cache_dir, capsys):
    n_val = len(models.classifier_ckpt["split"]["val"])
    assert n_val < familiarity.ROUGH_VAL_IMAGES  # the tiny fixture's split
    familiarity.fit(models, cache_dir)
    assert f"rests on only {n_val} validation images" in capsys.readouterr().err


def test_a_read_only_report_still_gets_a_familiarity_verdict(calibration, models, cache_dir, tmp_path, monkeypatch,
                                                              capsys):
    """stage 5 on a shared, read-only atlas failed on 'cannot write familiarity.json'."""
    def read_only(path, obj):
        raise UserError(f"cannot write {path}: Read-only file system")

    monkeypatch.setattr(familiarity, "write_json", read_only)
    fitted = familiarity.load_or_fit(models, tmp_path, cache_dir)
    assert fitted.threshold == pytest.approx(calibration.threshold)
    assert "the calibration is used but not kept" in capsys.readouterr().err


def test_a_small_validation_split_explains_without_a_verdict(models, calibration, tmp_path, cache_dir, capsys):
    """Stage 1 takes 3 images per class; a validation split too small to calibrate against gives no verdict
    (null, one warning), not a refusal of every explanation; a stored calibration is still used."""
    from dataclasses import replace

    split = models.classifier_ckpt["split"]
    small = replace(models, classifier_ckpt={**models.classifier_ckpt, "split": {**split, "val": split["val"][:6]}})
    assert familiarity.verdict_judge(small, tmp_path, cache_dir) is None
    assert "no familiarity verdict" in capsys.readouterr().err and not (tmp_path / familiarity.FAMILIARITY).exists()
    with pytest.raises(UserError, match="needs at least"):  # fitting itself still refuses: no judge from 6 scores
        familiarity.load_or_fit(small, tmp_path, cache_dir)
    stale = {**calibration.to_json(), "sae_fingerprint": "another sae"}  # left by a report's earlier models
    (tmp_path / familiarity.FAMILIARITY).write_text(json.dumps(stale))
    assert familiarity.verdict_judge(small, tmp_path, cache_dir) is None  # not a refit that must refuse
    (tmp_path / familiarity.FAMILIARITY).write_text(json.dumps(calibration.to_json()))
    assert familiarity.verdict_judge(small, tmp_path, cache_dir) is not None


def test_why_did_you_runs_with_a_small_validation_split(tiny_classifier, tiny_sae, cache_dir, tmp_path, monkeypatch,
                                                        capsys):
    import why_did_you

    monkeypatch.setattr(familiarity, "MIN_VAL_IMAGES", 10 ** 6)  # every split is "too small"
    out = why_did_you.main(image="test:0", classifier_ckpt=str(tiny_classifier / artifacts.BEST_CLASSIFIER),
                           sae_ckpt=str(tiny_sae / artifacts.BEST_SAE), report_dir=str(tmp_path),
                           cache_dir=str(cache_dir), device="cpu", fast=True)[0]
    assert (out["familiarity"], out["unfamiliar"]) == (None, None)
    assert "no familiarity verdict" in capsys.readouterr().err


def test_the_sae_error_signal_is_measured_in_standardised_units(calibration, models):
    """Mutation-found gap (session 23): the error undivided by σ passed every test, though it lets the
    high-variance channels decide the signal (and so which inputs are flagged)."""
    batch = strange_images(3, models.image_size)["salt and pepper"]
    x = data.model_input(torch.from_numpy(batch), models.classifier_ckpt["preprocess"])
    with torch.no_grad():
        fmap = models.classifier.features(x).float()
        error = (fmap - models.sae.reconstruct_map(fmap)) / models.sae.sigma.view(1, -1, 1, 1)
    by_hand = error.pow(2).mean(dim=(1, 2, 3)).double().numpy()
    signals = calibration.signals(explain.analyse(models, batch), batch)
    assert signals["sae_error"] == pytest.approx(by_hand, rel=1e-4)
    assert not np.allclose(models.sae.sigma.numpy(), models.sae.sigma.numpy().mean())  # σ differs by channel here
