"""Honest concept measures: does a code unit detect a part on images it was not chosen on?

A *unit* is any code dimension (an SAE latent, a layer4 channel, a PCA or NMF component);
every function is vectorised over units U and part types P and works on plain arrays, so
the SAE and its baselines go through the same arithmetic.

* :func:`best_units` / :func:`score_units` (both at once: :func:`select_and_score`): per
  part, the unit with the best AUROC on the *training* split, scored (AUROC, average
  precision) on the *test* split. The best unit on the test split itself is reported too,
  but only as an optimistic upper bound (chosen and scored on the same images).
* :func:`class_confound`: every part is in 4 of the 12 synthetic classes, so a detector of
  those classes already separates part presence well. Reported beside each part: the AUROC
  of a perfect class-set detector (score 1 when the label is one of the part's classes),
  and the chosen unit's AUROC among images of the *other* classes, where only distractors
  carry the part, so a class detector scores 0.5 there.
* :func:`pointing_game`: on test images holding the part, the chosen unit's strongest token
  falls inside the part's box. Rule: a token hits when its cell's *centre* lies inside the
  box (``x0 <= x < x1``, ``y0 <= y < y1``, output pixels); chance is the share of the map's
  cells whose centres lie inside, averaged over the same images.
* :func:`counterfactual_drops`: the chosen unit's per-image activation (max over tokens)
  on a test image and on re-renders with exactly one part left out; the relative drop
  ``Σ(a - a') / Σa`` when its own part is removed and when another part is removed.

Each returns a dataclass with ``to_dict()`` (NaN -> None) for summary.json.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from . import stats

POINTING_RULE = ("strongest token's cell centre inside the part's box; chance = share of cell centres inside; "
                 "ceiling = share of images where any cell centre is inside (a part smaller than a cell may hold none)")


def _num(x) -> float | None:
    """A JSON-safe float: NaN becomes None."""
    x = float(x)
    return None if np.isnan(x) else x


def _nanmean(x) -> float:
    x = np.asarray(x, dtype=np.float64)
    return float(np.nanmean(x)) if np.isfinite(x).any() else float("nan")


# ----------------------------------------------------------------------------- ground truth
def part_presence(parts: list, part_types: list[str]) -> np.ndarray:
    """(N, P) bool: image n holds at least one part of type p (class part or distractor)."""
    index = {p: j for j, p in enumerate(part_types)}
    out = np.zeros((len(parts), len(part_types)), dtype=bool)
    for n, records in enumerate(parts):
        out[n, [index[r["part"]] for r in records]] = True
    return out


def class_parts(parts: list, labels, part_types: list[str], n_classes: int) -> np.ndarray:
    """(P, C) bool: part p is one of class c's own parts (seen there as a non-distractor)."""
    index = {p: j for j, p in enumerate(part_types)}
    out = np.zeros((len(part_types), n_classes), dtype=bool)
    for records, label in zip(parts, np.asarray(labels)):
        for r in records:
            if not r.get("distractor", False):
                out[index[r["part"]], label] = True
    return out


def cells_in_box(parts: list, part_types: list[str], grid: tuple[int, int], image_size: int) -> np.ndarray:
    """(N, P, H*W) bool: the token cell's centre lies inside some box of part type p (row-major)."""
    rows, cols = stats.token_grid(*grid)
    ys, xs = rows * image_size, cols * image_size
    index = {p: j for j, p in enumerate(part_types)}
    out = np.zeros((len(parts), len(part_types), len(ys)), dtype=bool)
    for n, records in enumerate(parts):
        for r in records:
            x0, y0, x1, y1 = r["box"]
            out[n, index[r["part"]]] |= (xs >= x0) & (xs < x1) & (ys >= y0) & (ys < y1)
    return out


# ----------------------------------------------------------------------------- scores
def average_precision(scores, positives) -> np.ndarray:
    """Average precision of each column of ``scores`` (N, U) against binary labels.

    AP = Σ_t (R_t - R_{t-1}) P_t over the distinct score thresholds t, highest first (tied
    scores enter together, as in scikit-learn's ``average_precision_score``).

    Parameters
    ----------
    scores : (N, U) per-image scores. positives : (N,) bool, or (N, P) for P label sets.

    Returns
    -------
    (U,) or (P, U) float64; NaN for a label set without positives.
    """
    s = np.asarray(scores, dtype=np.float64)
    pos = np.asarray(positives, dtype=bool)
    squeeze = pos.ndim == 1
    pos = pos[:, None] if squeeze else pos
    n = s.shape[0]
    order = np.argsort(-s, axis=0, kind="stable")                        # (N, U), best first
    s_sorted = np.take_along_axis(s, order, axis=0)
    group_end = np.ones_like(s_sorted, dtype=bool)                       # last row of each tie group
    group_end[:-1] = s_sorted[:-1] != s_sorted[1:]
    rank = np.arange(1, n + 1, dtype=np.float64)[:, None]
    out = np.empty((pos.shape[1], s.shape[1]))
    for j in range(pos.shape[1]):                                        # P is small (part types)
        tp = np.cumsum(pos[order, j], axis=0, dtype=np.float64)          # (N, U) true positives so far
        tp_end = np.where(group_end, tp, 0.0)
        prev = np.zeros_like(tp_end)
        prev[1:] = np.maximum.accumulate(tp_end, axis=0)[:-1]            # tp at the previous threshold
        gain = np.where(group_end, tp - prev, 0.0) * tp / rank           # ΔTP · precision
        n_pos = pos[:, j].sum()
        out[j] = gain.sum(0) / n_pos if n_pos else np.nan
    return out[0] if squeeze else out


@dataclass
class Selection:
    """Per part: the unit chosen on the training split and its held-out scores."""

    part_names: list[str]
    unit: np.ndarray                 # (P,) chosen by AUROC on the training split
    train_auroc: np.ndarray          # (P,) its AUROC where it was chosen (optimistic)
    test_auroc: np.ndarray           # (P,) held out: the figure to report
    test_ap: np.ndarray              # (P,) held-out average precision
    test_prevalence: np.ndarray      # (P,) share of test images with the part (AP's chance rate)
    test_best_auroc: np.ndarray      # (P,) best unit chosen on the test split: an upper bound, not evidence

    def to_dict(self) -> dict:
        per_part = {name: {"unit": int(self.unit[j]), "train_auroc": _num(self.train_auroc[j]),
                           "test_auroc": _num(self.test_auroc[j]), "test_ap": _num(self.test_ap[j]),
                           "test_prevalence": _num(self.test_prevalence[j]),
                           "test_best_auroc_upper_bound": _num(self.test_best_auroc[j])}
                    for j, name in enumerate(self.part_names)}
        return {"per_part": per_part, "mean_test_auroc": _num(_nanmean(self.test_auroc)),
                "mean_test_ap": _num(_nanmean(self.test_ap)), "mean_train_auroc": _num(_nanmean(self.train_auroc)),
                "mean_test_best_auroc_upper_bound": _num(_nanmean(self.test_best_auroc))}


def best_units(train_auroc) -> np.ndarray:
    """(P,) the unit with the best AUROC per part on the training split (0 where no AUROC is defined)."""
    auc = np.asarray(train_auroc, dtype=np.float64)
    finite = np.isfinite(auc)
    return np.where(finite.any(1), np.where(finite, auc, -np.inf).argmax(1), 0)


def score_units(train_auroc, test_scores, test_present, part_names: list[str]) -> Selection:
    """Score each part's unit, chosen by ``train_auroc``, on the test split.

    Parameters
    ----------
    train_auroc : (P, U) every unit's AUROC per part on the training split (``stats.auroc``).
    test_scores : (N_test, U) per-image scores (max over tokens). test_present : (N_test, P) bool.
    part_names : P names.

    Returns
    -------
    :class:`Selection`. A part missing (or everywhere) on the training split gets unit 0
    and NaN scores rather than a unit chosen on the test images.
    """
    train_auc = np.asarray(train_auroc, dtype=np.float64)
    test_auc = stats.auroc(test_scores, test_present)                     # (P, U)
    unit = best_units(train_auc)
    choosable = np.isfinite(train_auc).any(1)
    parts = np.arange(len(unit))
    test_ap = average_precision(np.asarray(test_scores)[:, unit], test_present)[parts, parts]
    nan = np.full(len(unit), np.nan)
    best = np.array([np.nanmax(row) if np.isfinite(row).any() else np.nan for row in test_auc])
    return Selection(part_names=list(part_names), unit=unit,
                     train_auroc=np.where(choosable, train_auc[parts, unit], nan),
                     test_auroc=np.where(choosable, test_auc[parts, unit], nan),
                     test_ap=np.where(choosable, test_ap, nan),
                     test_prevalence=np.asarray(test_present, dtype=np.float64).mean(0),
                     test_best_auroc=best)


def select_and_score(train_scores, train_present, test_scores, test_present, part_names: list[str]) -> Selection:
    """Choose each part's unit on the training split (scores (N_train, U)), score it on the test split."""
    return score_units(stats.auroc(train_scores, train_present), test_scores, test_present, part_names)


# ----------------------------------------------------------------------------- class confound
@dataclass
class ClassConfound:
    """Per part: can a class detector explain the unit's AUROC?"""

    part_names: list[str]
    class_set_auroc: np.ndarray      # (P,) a perfect detector of the part's classes, on the test split
    distractor_auroc: np.ndarray     # (P,) the chosen unit, among test images of classes without the part
    distractor_positives: np.ndarray  # (P,) of those images, how many carry the part (as a distractor)

    def to_dict(self) -> dict:
        per_part = {name: {"class_set_auroc": _num(self.class_set_auroc[j]),
                           "distractor_auroc": _num(self.distractor_auroc[j]),
                           "distractor_positives": int(self.distractor_positives[j])}
                    for j, name in enumerate(self.part_names)}
        return {"per_part": per_part, "mean_class_set_auroc": _num(_nanmean(self.class_set_auroc)),
                "mean_distractor_auroc": _num(_nanmean(self.distractor_auroc))}


def class_confound(test_scores, test_present, test_labels, part_classes, units, part_names: list[str]) -> ClassConfound:
    """AUROC of a perfect class-set detector, and the chosen units' AUROC where only distractors count.

    Parameters
    ----------
    test_scores : (N, U). test_present : (N, P) bool. test_labels : (N,) class indices.
    part_classes : (P, C) bool from :func:`class_parts`. units : (P,) chosen units.

    Returns
    -------
    :class:`ClassConfound`. ``distractor_auroc`` is NaN for a part never seen as a distractor
    in the test split; there a class detector would score 0.5, a part detector near 1.
    """
    present = np.asarray(test_present, dtype=bool)
    in_class_set = np.asarray(part_classes, dtype=bool)[:, np.asarray(test_labels)].T    # (N, P)
    class_auc = np.diagonal(stats.auroc(in_class_set.astype(np.float64), present)).copy()
    scores = np.asarray(test_scores, dtype=np.float64)
    distractor_auc = np.full(len(units), np.nan)
    for j, u in enumerate(units):                                        # a different image subset per part
        others = ~in_class_set[:, j]
        distractor_auc[j] = stats.auroc(scores[others][:, [u]], present[others, j])[0]
    return ClassConfound(part_names=list(part_names), class_set_auroc=class_auc, distractor_auroc=distractor_auc,
                         distractor_positives=(present & ~in_class_set).sum(0))


# ----------------------------------------------------------------------------- where
@dataclass
class Pointing:
    """Per part: the pointing game of the chosen unit on the test split, beside its chance rate."""

    part_names: list[str]
    hit_rate: np.ndarray             # (P,) share of images where the strongest token is in the box
    chance: np.ndarray               # (P,) share of cells in the box, averaged over the same images
    n_images: np.ndarray             # (P,) test images holding the part
    # (P,) share of those images with any cell centre in the box: the best any unit can score at this
    # map resolution (a part smaller than a cell may hold no centre)
    ceiling: np.ndarray | None = None
    rule: str = field(default=POINTING_RULE)

    def to_dict(self) -> dict:
        ceiling = self.ceiling if self.ceiling is not None else np.full(len(self.part_names), np.nan)
        per_part = {name: {"pointing": _num(self.hit_rate[j]), "pointing_chance": _num(self.chance[j]),
                           "pointing_ceiling": _num(ceiling[j]), "pointing_images": int(self.n_images[j])}
                    for j, name in enumerate(self.part_names)}
        return {"per_part": per_part, "mean_pointing": _num(_nanmean(self.hit_rate)),
                "mean_pointing_chance": _num(_nanmean(self.chance)),
                "mean_pointing_ceiling": _num(_nanmean(ceiling)), "pointing_rule": self.rule}


def pointing_game(unit_maps, in_box, present, part_names: list[str]) -> Pointing:
    """Does each chosen unit's strongest token fall inside its part's box?

    Parameters
    ----------
    unit_maps : (N, P, T) the code of part p's chosen unit at every token of image n.
    in_box : (N, P, T) bool from :func:`cells_in_box`. present : (N, P) bool.

    Returns
    -------
    :class:`Pointing` over the images holding each part, with the chance rate and the
    ceiling (:attr:`Pointing.ceiling`). A unit whose map is flat on an image (silent) points
    nowhere: that image counts as a miss.
    """
    maps = np.asarray(unit_maps, dtype=np.float64)
    top = maps.argmax(2)                                                  # (N, P)
    flat = maps.max(2) == maps.min(2)
    hit = np.take_along_axis(np.asarray(in_box), top[..., None], 2)[..., 0] & ~flat
    ok = np.asarray(present, dtype=bool)
    n = ok.sum(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        rate = np.where(n > 0, (hit & ok).sum(0) / n, np.nan)
        chance = np.where(n > 0, (np.asarray(in_box).mean(2) * ok).sum(0) / n, np.nan)
        ceiling = np.where(n > 0, (np.asarray(in_box).any(2) & ok).sum(0) / n, np.nan)
    return Pointing(part_names=list(part_names), hit_rate=rate, chance=chance, n_images=n, ceiling=ceiling)


# ----------------------------------------------------------------------------- counterfactual
@dataclass
class Counterfactual:
    """Per part: the chosen unit's relative drop when its own part / another part is removed."""

    part_names: list[str]
    own_drop: np.ndarray             # (P,) Σ(a - a') / Σa, own part left out
    other_drop: np.ndarray           # (P,) the same, another part of the same image left out
    n_own: np.ndarray                # (P,) re-renders averaged
    n_other: np.ndarray

    def to_dict(self) -> dict:
        per_part = {name: {"cf_own_drop": _num(self.own_drop[j]), "cf_other_drop": _num(self.other_drop[j]),
                           "cf_own_n": int(self.n_own[j]), "cf_other_n": int(self.n_other[j])}
                    for j, name in enumerate(self.part_names)}
        return {"per_part": per_part, "mean_cf_own_drop": _num(_nanmean(self.own_drop)),
                "mean_cf_other_drop": _num(_nanmean(self.other_drop))}


def counterfactual_drops(orig_max, cf_max, cf_image, cf_part, present, units, part_names: list[str],
                         eps: float = 1e-6) -> Counterfactual:
    """Relative activation drop of each chosen unit under one-part-removed re-renders.

    The drop is Σ(a - a') / Σa over the (image, removed part) pairs: the relative fall of the
    unit's mean activation, so images count by how strongly the unit fired there. (A mean of
    per-image ratios explodes where a unit barely fires: NMF codes, for one, never reach 0.)

    Parameters
    ----------
    orig_max : (N, U) per-image max activation on the original test images.
    cf_max : (R, U) the same on R re-renders. cf_image : (R,) row of ``orig_max`` each
        re-render comes from. cf_part : (R,) part type index left out of it.
    present : (N, P) bool. units : (P,) chosen units.

    Returns
    -------
    :class:`Counterfactual`. Only pairs where the unit's part is in the original image and
    the unit is active there (a > eps) count; a drop can be negative (the unit rose).
    """
    units = np.asarray(units)
    cf_image, cf_part = np.asarray(cf_image), np.asarray(cf_part)
    before = np.asarray(orig_max, dtype=np.float64)[cf_image][:, units]  # (R, P)
    after = np.asarray(cf_max, dtype=np.float64)[:, units]
    valid = np.asarray(present, dtype=bool)[cf_image] & (before > eps)
    own = cf_part[:, None] == np.arange(len(units))[None, :]

    def relative_drop(mask):
        total = np.where(mask, before, 0.0).sum(0)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(mask.any(0), np.where(mask, before - after, 0.0).sum(0) / total, np.nan)

    return Counterfactual(part_names=list(part_names), own_drop=relative_drop(valid & own),
                          other_drop=relative_drop(valid & ~own), n_own=(valid & own).sum(0),
                          n_other=(valid & ~own).sum(0))


# ----------------------------------------------------------------------------- together
def dead_share(per_image_max) -> float:
    """Share of units with no positive activation on any of the given images."""
    return float((np.asarray(per_image_max).max(0) <= 0).mean())


@dataclass
class PartTruth:
    """The ground truth of a set of images, as the measures take it."""

    part_names: list[str]
    present: np.ndarray              # (N, P) bool, from part_presence
    labels: np.ndarray               # (N,) class indices
    part_classes: np.ndarray         # (P, C) bool, from class_parts (over the whole dataset)
    in_box: np.ndarray               # (N, P, H*W) bool, from cells_in_box


def part_truth(parts: list, labels, part_types: list[str], part_classes, grid: tuple[int, int],
               image_size: int) -> PartTruth:
    """:class:`PartTruth` for the images whose part records are ``parts`` (one list per image)."""
    return PartTruth(part_names=list(part_types), present=part_presence(parts, part_types), labels=np.asarray(labels),
                     part_classes=np.asarray(part_classes, dtype=bool),
                     in_box=cells_in_box(parts, part_types, grid, image_size))


@dataclass
class ConceptReport:
    """All measures for one code (SAE or baseline), merged per part for summary.json."""

    code: str
    n_units: int
    dead_share: float
    selection: Selection
    confound: ClassConfound
    pointing: Pointing | None = None
    counterfactual: Counterfactual | None = None

    def to_dict(self) -> dict:
        out = {"code": self.code, "n_units": self.n_units, "dead_share": _num(self.dead_share),
               "split": "unit chosen on train, scored on test", "per_part": {}}
        for measure in (self.selection, self.confound, self.pointing, self.counterfactual):
            if measure is None:
                continue
            d = measure.to_dict()
            for name, fields in d.pop("per_part").items():
                out["per_part"].setdefault(name, {}).update(fields)
            out.update(d)
        return out


def concept_report(code: str, train_auroc, test_max, unit_maps, test: PartTruth, cf_max=None, cf_image=None,
                   cf_part=None) -> ConceptReport:
    """Every measure for one code: units chosen on the training split, scored on the test split.

    Parameters
    ----------
    code : the code's name (e.g. "SAE (M=512, K=8)", "channels").
    train_auroc : (P, U) every unit's AUROC per part on the training images.
    test_max : (N_test, U) per-image max over tokens on the test images.
    unit_maps : (N_test, P, T) the code of each part's chosen unit (:func:`best_units`) at every token.
    test : :class:`PartTruth` of the test images.
    cf_max, cf_image, cf_part : optional counterfactual re-renders (see :func:`counterfactual_drops`).
    """
    names = test.part_names
    sel = score_units(train_auroc, test_max, test.present, names)
    conf = class_confound(test_max, test.present, test.labels, test.part_classes, sel.unit, names)
    point = pointing_game(unit_maps, test.in_box, test.present, names)
    drops = None if cf_max is None else counterfactual_drops(test_max, cf_max, cf_image, cf_part, test.present,
                                                             sel.unit, names)
    return ConceptReport(code, np.shape(test_max)[1], dead_share(test_max), sel, conf, point, drops)
