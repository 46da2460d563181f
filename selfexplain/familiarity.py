"""Is this input like the training sketches? A familiarity score, calibrated on validation.

An explanation of an image the models have never seen the like of (noise, a blank page, a
photo) is still exact arithmetic, but it says nothing about sketches. Three signals, all
read from what the models already see for every explained image, tell such inputs apart:

* ``sae_error``: the SAE's reconstruction error of the image's layer4 tokens,
  ``mean over tokens and channels of ((A − Â) / σ)²`` (an FVU in the SAE's standardised
  space): the SAE learned the training tokens, and tokens unlike them reconstruct badly;
* ``feature_distance``: the squared Mahalanobis distance of the pooled layer4 feature
  ``g = GAP(A)`` to the nearest class mean, one covariance shared by the classes and shrunk
  towards a multiple of the identity (Lee et al., 2018), fitted on training images; ``g``
  is rebuilt exactly from the analysis, ``GAP(A) = σ ⊙ (D z̄ + b_d) + μ + GAP(A − Â)``;
* ``ink``: how far the input's ink share (the mean of the model's ink input) is from the
  training median, ``|log(ink + 1e-3) − median|``. The first two miss a blank page: its
  features sit among the sketches' (measured: 0% of blank pages flagged by them).

Each signal is put on a common scale by its validation median and 90th percentile,
``z = (x − median) / (q90 − median)``, and the image's strangeness is the largest of the
three (one clearly strange signal is enough); the familiarity **score** is minus that.
The reported **percentile** is the share of validation images whose score is at most the
image's; ``unfamiliar`` means a score below the ``UNFAMILIAR_PERCENTILE``-th percentile
of the validation scores (the stored ``threshold``). The Gaussian and the ink median are
fitted on the training split, scales and threshold on validation, so test rates are honest.

The calibration lives in ``REPORT_DIR/familiarity.json`` with the fingerprints of the
classifier and SAE it was computed for; :func:`load_or_fit` refits it when it is missing
or belongs to other models. :func:`verdict_judge` (what stage 5 calls) gives no verdict
instead when the validation split is under ``MIN_VAL_IMAGES`` and nothing matching is stored.
"""
from __future__ import annotations

import base64
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .artifacts import FAMILIARITY, read_json, write_json
from .data import load_dataset
from .errors import UserError
from .explain import analyse, require_own_report
from .logs import log

CALIBRATION_VERSION = 1           # bump when the score changes: stored calibrations are then refitted
SIGNALS = ("sae_error", "feature_distance", "ink")
UNFAMILIAR_PERCENTILE = 1.0       # threshold: this percentile of the validation scores (99% of them pass)
SHRINKAGE = 0.1                   # covariance shrinkage towards a scaled identity (512 dims, a few thousand images)
INK_FLOOR = 1e-3                  # keeps log(ink) finite on a blank page
MIN_VAL_IMAGES = 20               # fewer validation images are too thin a reference to rank against
ROUGH_VAL_IMAGES = 200            # below this the threshold rests on a couple of scores: a warning says so
MAX_FIT_IMAGES = 5000             # training images that fit the Gaussian (a seeded sample beyond this)
BATCH = 256                       # images per forward pass while fitting


@dataclass
class Familiarity:
    """One image's verdict."""

    score: float       # minus the largest scaled signal (higher = more familiar)
    percentile: float  # its rank among the validation scores, 0-100 (the threshold's own interpolation)
    unfamiliar: bool   # score below the calibration's threshold

    def to_dict(self) -> dict:
        """The ``--json`` fields: ``familiarity`` (the percentile) and ``unfamiliar``."""
        return {"familiarity": round(self.percentile, 2), "unfamiliar": self.unfamiliar}


@dataclass
class Calibration:
    """The fitted signals and the validation reference for one classifier/SAE pair."""

    classifier_fingerprint: str
    sae_fingerprint: str
    class_means: np.ndarray             # (classes, C) training means of GAP(A)
    precision: np.ndarray               # (C, C) inverse of the shared, shrunk covariance
    ink_centre: float                   # median of log(ink + INK_FLOOR) over the training images
    scales: dict[str, tuple[float, float]] = field(default_factory=dict)  # per signal: validation (median, q90)
    val_scores: np.ndarray = field(default_factory=lambda: np.zeros(0))  # sorted validation scores
    threshold: float = float("-inf")    # scores below it are unfamiliar
    sae: torch.nn.Module | None = field(default=None, repr=False)  # the SAE the signals read (not stored)

    @torch.no_grad()
    def signals(self, analysis, images: np.ndarray) -> dict[str, np.ndarray]:
        """The three signals for every image of an analysis of the uint8 batch ``images``."""
        residual = analysis.residual / self.sae.sigma.view(1, -1, 1, 1)
        return {"sae_error": residual.pow(2).mean(dim=(1, 2, 3)).double().cpu().numpy(),
                "feature_distance": mahalanobis(pooled_features(self.sae, analysis), self.class_means, self.precision),
                "ink": np.abs(log_ink(images) - self.ink_centre)}

    def scores(self, signals: dict[str, np.ndarray]) -> np.ndarray:
        """The familiarity score per image: minus the largest signal on its validation scale."""
        scaled = [(signals[k] - median) / max(q90 - median, 1e-12) for k, (median, q90) in self.scales.items()]
        return -np.max(scaled, axis=0)

    def score(self, analysis, images: np.ndarray) -> list[Familiarity]:
        """One :class:`Familiarity` per image of ``images`` (uint8 (B, S, S)) and its analysis."""
        scores = self.scores(self.signals(analysis, images))
        return [Familiarity(float(s), float(p), bool(s < self.threshold)) for s, p in zip(scores, self.percentiles(scores))]

    def percentiles(self, scores: np.ndarray) -> np.ndarray:
        """Each score's percentile among the validation scores, by the rule that placed the threshold
        (``np.percentile``'s linear interpolation, inverted), so an image is flagged exactly when its
        percentile is below ``UNFAMILIAR_PERCENTILE`` (a step count showed 1.11 for a flagged image)."""
        ranks = 100.0 * np.arange(len(self.val_scores)) / max(len(self.val_scores) - 1, 1)
        return np.interp(scores, self.val_scores, ranks)

    def judge(self, analysis, images: np.ndarray) -> list[dict]:
        """The ``--json`` fields per image (``explain.explain_images(..., judge=calibration.judge)``)."""
        return [verdict.to_dict() for verdict in self.score(analysis, images)]

    @classmethod
    def from_json(cls, stored: dict, sae: torch.nn.Module) -> "Calibration":
        precision = np.frombuffer(base64.b64decode(stored["precision_float32"]), np.float32).astype(np.float64)
        means = np.asarray(stored["class_means"], np.float64)
        return cls(stored["classifier_fingerprint"], stored["sae_fingerprint"], means,
                   precision.reshape(means.shape[1], means.shape[1]), float(stored["ink_centre"]),
                   {k: tuple(v) for k, v in stored["scales"].items()}, np.asarray(stored["val_scores"]),
                   float(stored["threshold"]), sae)

    def to_json(self) -> dict:
        return {"version": CALIBRATION_VERSION, "classifier_fingerprint": self.classifier_fingerprint,
                "sae_fingerprint": self.sae_fingerprint, "signals": list(SIGNALS),
                "unfamiliar_percentile": UNFAMILIAR_PERCENTILE, "shrinkage": SHRINKAGE,
                "threshold": self.threshold, "val_scores": self.val_scores.tolist(),
                "scales": {k: list(v) for k, v in self.scales.items()}, "ink_centre": self.ink_centre,
                "class_means": self.class_means.tolist(),
                # the (C, C) precision as base64 float32: a tenth of the size of a JSON list
                "precision_float32": base64.b64encode(self.precision.astype(np.float32).tobytes()).decode("ascii")}


# ----------------------------------------------------------------------------- signals
def mahalanobis(x: np.ndarray, means: np.ndarray, precision: np.ndarray) -> np.ndarray:
    """Squared Mahalanobis distance of each row of ``x`` (N, C) to its nearest mean (K, C)."""
    diff = x[:, None, :] - means[None]
    return np.einsum("nkc,cd,nkd->nk", diff, precision, diff).min(axis=1)


def log_ink(images: np.ndarray) -> np.ndarray:
    """log(ink share + INK_FLOOR) per uint8 image, ink = 1 - pixel / 255."""
    ink = 1.0 - np.asarray(images, np.float64).reshape(len(images), -1).mean(1) / 255.0
    return np.log(ink + INK_FLOOR)


@torch.no_grad()
def pooled_features(sae, analysis) -> np.ndarray:
    """GAP(A) per image, rebuilt exactly from the analysis: σ ⊙ (D z̄ + b_d) + μ + GAP(A − Â)."""
    gap = sae.unstandardize(sae.decode(analysis.z_mean)) + analysis.residual.mean(dim=(2, 3))
    return gap.double().cpu().numpy()


def fit_gaussian(features: np.ndarray, labels: np.ndarray, shrinkage: float = SHRINKAGE) -> tuple[np.ndarray, np.ndarray]:
    """Class means and the precision of the shared within-class covariance, shrunk towards its mean variance."""
    classes = np.unique(labels)
    means = np.stack([features[labels == c].mean(0) for c in classes])
    centred = features - means[np.searchsorted(classes, labels)]
    cov = centred.T @ centred / max(len(features) - len(classes), 1)
    dim = cov.shape[0]
    cov = (1 - shrinkage) * cov + shrinkage * np.trace(cov) / dim * np.eye(dim)
    return means, np.linalg.inv(cov)


# ----------------------------------------------------------------------------- fitting
def _in_batches(models, images: np.ndarray, fn) -> list:
    """``fn(analysis, batch)`` for every batch of ``images``."""
    out = []
    for start in range(0, len(images), BATCH):
        batch = np.ascontiguousarray(images[start:start + BATCH])
        out.append(fn(analyse(models, batch), batch))
    return out


def fit(models, cache_dir: str | Path) -> Calibration:
    """Fit the Gaussian and ink median on (a sample of) the classifier's training split and
    the reference on its validation split."""
    ckpt = models.classifier_ckpt
    dataset = load_dataset(ckpt["dataset"], cache_dir, progress=False)
    train, val = np.asarray(ckpt["split"]["train"]), np.sort(np.asarray(ckpt["split"]["val"]))
    if len(val) < MIN_VAL_IMAGES:
        raise UserError(f"the classifier's validation split has {len(val)} images; the familiarity "
                        f"calibration needs at least {MIN_VAL_IMAGES}")
    if len(val) < ROUGH_VAL_IMAGES:
        log(f"warning: the familiarity threshold (percentile {UNFAMILIAR_PERCENTILE:g} of the validation scores) "
            f"rests on only {len(val)} validation images, so on their lowest one or two scores: how often familiar "
            f"sketches are flagged is rough; a validation split of {ROUGH_VAL_IMAGES}+ images pins it down")
    if len(train) > MAX_FIT_IMAGES:
        train = np.random.default_rng(0).choice(train, MAX_FIT_IMAGES, replace=False)
    train = np.sort(train)
    parts = _in_batches(models, dataset.images[train], lambda a, b: (pooled_features(models.sae, a), log_ink(b)))
    means, precision = fit_gaussian(np.concatenate([g for g, _ in parts]), np.asarray(dataset.labels[train]))
    calibration = Calibration(ckpt["fingerprint"], models.sae_ckpt["fingerprint"], means, precision,
                              float(np.median(np.concatenate([i for _, i in parts]))), sae=models.sae)
    parts = _in_batches(models, dataset.images[val], calibration.signals)
    signals = {k: np.concatenate([p[k] for p in parts]) for k in SIGNALS}
    calibration.scales = {k: (float(np.median(v)), float(np.percentile(v, 90))) for k, v in signals.items()}
    calibration.val_scores = np.sort(calibration.scores(signals))
    calibration.threshold = float(np.percentile(calibration.val_scores, UNFAMILIAR_PERCENTILE))
    return calibration


def verdict_judge(models, report_dir: str | Path, cache_dir: str | Path) -> Callable | None:
    """The calibration's ``judge`` for :func:`explain.explain_images`, or None (no verdict).

    None, with one warning, when the classifier's validation split is too small to calibrate
    against and REPORT_DIR holds no calibration for these models (a leftover one for other models
    cannot be refitted). A small dataset is still worth explaining (stage 1 takes 3 images per
    class): refusing every explanation made users find ``--familiarity=False`` themselves. The
    caller has checked that REPORT_DIR is these models' (``explain.require_own_report``).

    Parameters
    ----------
    models : explain.Models
    report_dir, cache_dir : stage 3's report (where the calibration is stored) and the image cache.
    """
    n_val = len(models.classifier_ckpt["split"]["val"])
    if n_val < MIN_VAL_IMAGES and stored_for(models, report_dir) is None:
        log(f"warning: no familiarity verdict (familiarity and unfamiliar are null): the classifier's validation "
            f"split has {n_val} images, the calibration needs at least {MIN_VAL_IMAGES} (--familiarity=False "
            "skips it without this warning)")
        return None
    return load_or_fit(models, report_dir, cache_dir).judge


def stored_for(models, report_dir: str | Path) -> dict | None:
    """REPORT_DIR's stored calibration object when it was fitted for these models by this version, else None
    (missing, or stale: another classifier, SAE or score); a file that is not a JSON object is a UserError."""
    path = Path(report_dir) / FAMILIARITY
    if not path.is_file():
        return None
    stored = read_json(path)
    if not isinstance(stored, dict):  # a list or a number was an AttributeError's traceback
        raise UserError(f"{path} is not a familiarity calibration (a JSON object); delete it and rerun")
    want = (CALIBRATION_VERSION, models.classifier_ckpt["fingerprint"], models.sae_ckpt["fingerprint"])
    got = (stored.get("version"), stored.get("classifier_fingerprint"), stored.get("sae_fingerprint"))
    return stored if got == want else None


def stored_calibration(path: Path, stored: dict, sae) -> Calibration:
    """:meth:`Calibration.from_json` of ``path``'s object; a field missing or garbled is a UserError."""
    try:
        return Calibration.from_json(stored, sae)
    except (LookupError, TypeError, ValueError, AttributeError) as exc:  # binascii.Error is a ValueError;
        # LookupError: a missing field (KeyError), class_means not a list of rows (IndexError)
        raise UserError(f"{path} is a damaged familiarity calibration ({type(exc).__name__}: {exc}); "
                        "delete it and rerun") from None


def load_or_fit(models, report_dir: str | Path, cache_dir: str | Path) -> Calibration:
    """The calibration in ``report_dir/familiarity.json``; fitted (and written) when missing or stale.

    Stale = written by another calibration version, or for another classifier or SAE.
    """
    require_own_report(models, report_dir)  # never refit another SAE's report for these models
    path = Path(report_dir) / FAMILIARITY
    stored = stored_for(models, report_dir)
    if stored is not None:
        return stored_calibration(path, stored, models.sae)
    if path.is_file():
        log(f"{path} belongs to other models or an older score: refitting")
    log("calibrating the familiarity score on the validation split (once per model pair)")
    calibration = fit(models, cache_dir)
    try:
        write_json(path, calibration.to_json())
    except UserError as exc:  # a read-only report (a shared atlas): the flag still works, fitted again next time
        log(f"warning: {exc}; the calibration is used but not kept (refitted on the next run)")
    return calibration
