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
* :func:`pointing_game`: on test images holding the part, does the chosen unit point inside
  the part's box? Its point is the strongest token's cell centre moved to the activation-
  weighted centre of that token and its 8 neighbours (:func:`peak_points`: a 4x4 map's cells
  are 16 px wide, wider than many parts, and a part straddling two cells lights both);
  beside two nulls: the same rule on maps of noise (:func:`noise_chance`), and the unit's
  peak on another image holding the part (:func:`shuffled_chance`, which keeps the unit's
  own habits, such as peaking near the centre). The cell-centre rule is reported beside
  it (hit when the strongest cell's centre lies inside; chance = share of cell centres inside;
  ceiling = share of images where any cell centre lies inside). The peak rule was chosen
  among cell centre, 3x3 centroid, whole-map centroid, per-axis parabola and bicubic/bilinear
  upsampled argmax on the *validation* split (bench/results/concepts_notes.md).
* :func:`counterfactual_drops`: the chosen unit's per-image activation (max over tokens)
  on a test image and on re-renders with exactly one part left out; the relative drop
  ``Σ(a - a') / Σa`` when its own part is removed and when another part is removed.

Each returns a dataclass with ``to_dict()`` (NaN -> None) for summary.json.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from . import stats

POINTING_RULE = ("the unit's peak (its strongest token's cell centre moved to the activation-weighted centre of that "
                 "token and its 8 neighbours) inside the part's box; chance = the same rule on maps of uniform noise; "
                 "shuffled = the unit's peak on another image holding the part, against this image's box")
POINTING_CELL_RULE = ("strongest token's cell centre inside the part's box; chance = share of cell centres inside; "
                      "ceiling = share of images where any cell centre is inside (a part smaller than a cell may hold "
                      "none)")


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


def part_boxes(parts: list, part_types: list[str]) -> np.ndarray:
    """(N, P, B, 4) float: the boxes (x0, y0, x1, y1, output pixels) of part type p in image n, NaN-padded to B >= 1."""
    index = {p: j for j, p in enumerate(part_types)}
    counts = np.zeros((len(parts), len(part_types)), dtype=int)
    for n, records in enumerate(parts):
        for r in records:
            counts[n, index[r["part"]]] += 1
    out = np.full((len(parts), len(part_types), max(1, int(counts.max(initial=0))), 4), np.nan)
    counts[:] = 0
    for n, records in enumerate(parts):
        for r in records:
            j = index[r["part"]]
            out[n, j, counts[n, j]] = r["box"]
            counts[n, j] += 1
    return out


def points_in_boxes(points, boxes) -> np.ndarray:
    """(...) bool: point (x, y) of ``points`` (..., 2) lies in one of its boxes (..., B, 4); NaN boxes hold none."""
    boxes = np.asarray(boxes, dtype=np.float64)
    x, y = np.asarray(points, dtype=np.float64)[..., None, 0], np.asarray(points, dtype=np.float64)[..., None, 1]
    with np.errstate(invalid="ignore"):
        inside = (boxes[..., 0] <= x) & (x < boxes[..., 2]) & (boxes[..., 1] <= y) & (y < boxes[..., 3])
    return inside.any(-1)


def cells_in_boxes(boxes, grid: tuple[int, int], image_size: int) -> np.ndarray:
    """(N, P, H*W) bool: token cell t's centre lies in one of the boxes (N, P, B, 4) (row-major)."""
    rows, cols = stats.token_grid(*grid)
    centres = np.stack([cols * image_size, rows * image_size], -1)                # (T, 2) as (x, y)
    return points_in_boxes(centres[None, None], np.asarray(boxes)[:, :, None])


def peak_points(unit_maps, grid: tuple[int, int], image_size: int) -> np.ndarray:
    """(..., 2) pixel (x, y) where each map (..., H*W, row-major) peaks, to better than a cell.

    The strongest token's cell centre, moved by the activation-weighted mean offset of that
    token and its (up to) 8 neighbours (negative codes weigh 0): a part straddling two cells
    lights both, and the point lands between them.
    """
    h, w = grid
    raw = np.asarray(unit_maps, dtype=np.float64)
    lead = raw.shape[:-1]
    raw = raw.reshape(-1, h, w)
    ty, tx = np.divmod(raw.reshape(-1, h * w).argmax(1), w) if len(raw) else (np.zeros(0, int), np.zeros(0, int))
    padded = np.pad(np.maximum(raw, 0.0), ((0, 0), (1, 1), (1, 1)))
    off = np.arange(-1, 2)
    window = padded[np.arange(len(raw))[:, None, None], (ty + 1)[:, None, None] + off[None, :, None],
                    (tx + 1)[:, None, None] + off[None, None, :]]                     # (n, 3, 3)
    mass = np.maximum(window.sum((1, 2)), 1e-12)
    dy, dx = window.sum(2) @ off / mass, window.sum(1) @ off / mass
    points = np.stack([(tx + 0.5 + dx) * image_size / w, (ty + 0.5 + dy) * image_size / h], -1)
    return points.reshape(*lead, 2)


def noise_chance(boxes, grid: tuple[int, int], image_size: int, draws: int = 512, seed: int = 0) -> np.ndarray:
    """(N, P) chance that :func:`peak_points` of a map of uniform noise lands in the boxes (N, P, B, 4).

    The null of a unit that knows nothing of the image. Not the box's share of the canvas:
    the point can only land between the outer cells' centres, and the neighbourhood
    weighting pulls it inwards.
    """
    rng = np.random.default_rng(seed)
    points = peak_points(rng.random((draws, grid[0] * grid[1])), grid, image_size)       # (R, 2)
    boxes = np.asarray(boxes, dtype=np.float64)
    out = np.empty(boxes.shape[:2])
    for start in range(0, len(boxes), 64):                                               # bounded memory
        out[start:start + 64] = points_in_boxes(points[None, None], boxes[start:start + 64, :, None]).mean(-1)
    return out


def shuffled_chance(points, live, boxes, present, max_shifts: int = 16) -> np.ndarray:
    """(P,) hit rate of each unit's peak on *another* image holding the part, against this image's boxes.

    The null that keeps the unit's own habits (a unit that always peaks at the centre scores
    its centre rate here). Over the images holding part p, in order, image i is paired with
    image i - s for shifts s = 1 .. min(n - 1, ``max_shifts``); NaN with fewer than 2 images.

    Parameters
    ----------
    points : (N, P, 2) from :func:`peak_points`. live : (N, P) bool, the map is not flat.
    boxes : (N, P, B, 4). present : (N, P) bool.
    """
    points, live, present = np.asarray(points), np.asarray(live, dtype=bool), np.asarray(present, dtype=bool)
    boxes = np.asarray(boxes, dtype=np.float64)
    out = np.full(present.shape[1], np.nan)
    for p in range(present.shape[1]):
        rows = np.flatnonzero(present[:, p])
        hits = [points_in_boxes(points[np.roll(rows, s), p], boxes[rows, p]) & live[np.roll(rows, s), p]
                for s in range(1, min(len(rows) - 1, max_shifts) + 1)]
        if hits:
            out[p] = float(np.mean(hits))
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
    scores = np.asarray(test_scores, dtype=np.float64)[:, np.asarray(units)]
    distractor_auc = distractor_auroc(scores, present, test_labels, part_classes, np.arange(len(units)))
    return ClassConfound(part_names=list(part_names), class_set_auroc=class_auc, distractor_auroc=distractor_auc,
                         distractor_positives=(present & ~in_class_set).sum(0))


def distractor_auroc(scores, present, labels, part_classes, unit_part) -> np.ndarray:
    """Each unit's AUROC for its part among the images of classes without that part.

    There only distractors carry the part, so a detector of the part's classes scores 0.5
    and a part detector near 1.

    Parameters
    ----------
    scores : (N, U) per-image unit scores. present : (N, P) bool. labels : (N,) class indices.
    part_classes : (P, C) bool from :func:`class_parts`. unit_part : (U,) the part index each unit is scored for.

    Returns
    -------
    (U,) float64; NaN where no such image carries the part (or every one does).
    """
    scores, present = np.asarray(scores, dtype=np.float64), np.asarray(present, dtype=bool)
    in_class_set = np.asarray(part_classes, dtype=bool)[:, np.asarray(labels)].T          # (N, P)
    unit_part = np.asarray(unit_part)
    out = np.full(len(unit_part), np.nan)
    for j in np.unique(unit_part):                                        # a different image subset per part
        units, others = np.flatnonzero(unit_part == j), ~in_class_set[:, j]
        out[units] = stats.auroc(scores[others][:, units], present[others, j])
    return out


# ----------------------------------------------------------------------------- where
@dataclass
class Pointing:
    """Per part: the pointing game of the chosen unit on the test split, beside its chance rate."""

    part_names: list[str]
    hit_rate: np.ndarray             # (P,) share of images where the unit's peak point (peak_points) is in the box
    chance: np.ndarray               # (P,) the same rule on maps of noise (noise_chance), over the same images
    shuffled: np.ndarray             # (P,) the unit's peak on another image holding the part (shuffled_chance)
    n_images: np.ndarray             # (P,) test images holding the part
    cell_rate: np.ndarray            # (P,) the cell-centre rule: the strongest cell's centre is in the box
    cell_chance: np.ndarray          # (P,) share of cell centres in the box
    # (P,) share of images with any cell centre in the box: the best the cell-centre rule allows at this map
    # resolution (a part smaller than a cell may hold no centre)
    ceiling: np.ndarray
    rule: str = field(default=POINTING_RULE)

    def to_dict(self) -> dict:
        fields = {"pointing": self.hit_rate, "pointing_chance": self.chance, "pointing_shuffled": self.shuffled,
                  "pointing_cell": self.cell_rate,
                  "pointing_cell_chance": self.cell_chance, "pointing_ceiling": self.ceiling}
        per_part = {name: {**{k: _num(v[j]) for k, v in fields.items()}, "pointing_images": int(self.n_images[j])}
                    for j, name in enumerate(self.part_names)}
        return {"per_part": per_part, **{f"mean_{k}": _num(_nanmean(v)) for k, v in fields.items()},
                "pointing_rule": self.rule, "pointing_cell_rule": POINTING_CELL_RULE}


def pointing_game(unit_maps, boxes, present, part_names: list[str], grid: tuple[int, int],
                  image_size: int) -> Pointing:
    """Does each chosen unit point inside its part's box?

    Parameters
    ----------
    unit_maps : (N, P, T) the code of part p's chosen unit at every token of image n (row-major ``grid``).
    boxes : (N, P, B, 4) from :func:`part_boxes`. present : (N, P) bool.
    grid, image_size : the token grid (H, W) and the canvas side in pixels the boxes are in.

    Returns
    -------
    :class:`Pointing` over the images holding each part: the peak rule (:func:`peak_points`)
    with two nulls (:func:`noise_chance`, :func:`shuffled_chance`), and the cell-centre rule
    with its chance and ceiling. A unit whose map is flat on an image (silent) points
    nowhere: that image counts as a miss under both.
    """
    maps = np.asarray(unit_maps, dtype=np.float64)
    live = maps.max(2) > maps.min(2)
    points = peak_points(maps, grid, image_size)
    hit = points_in_boxes(points, boxes) & live
    in_box = cells_in_boxes(boxes, grid, image_size)                          # (N, P, T)
    cell_hit = np.take_along_axis(in_box, maps.argmax(2)[..., None], 2)[..., 0] & live
    ok = np.asarray(present, dtype=bool)
    n = ok.sum(0)

    def rate(x):
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(n > 0, (np.asarray(x, dtype=np.float64) * ok).sum(0) / n, np.nan)

    return Pointing(part_names=list(part_names), hit_rate=rate(hit), chance=rate(noise_chance(boxes, grid, image_size)),
                    shuffled=shuffled_chance(points, live, boxes, ok), n_images=n, cell_rate=rate(cell_hit),
                    cell_chance=rate(in_box.mean(2)), ceiling=rate(in_box.any(2)))


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
    boxes: np.ndarray                # (N, P, B, 4) from part_boxes
    grid: tuple[int, int]            # (H, W) token grid the measures' maps are on
    image_size: int                  # canvas side in pixels (the boxes' units)


def part_truth(parts: list, labels, part_types: list[str], part_classes, grid: tuple[int, int],
               image_size: int) -> PartTruth:
    """:class:`PartTruth` for the images whose part records are ``parts`` (one list per image)."""
    return PartTruth(part_names=list(part_types), present=part_presence(parts, part_types), labels=np.asarray(labels),
                     part_classes=np.asarray(part_classes, dtype=bool),
                     boxes=part_boxes(parts, part_types), grid=tuple(grid), image_size=int(image_size))


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
    # (N_test, P) each part's chosen unit's score on the test images (for paired comparisons; not in to_dict)
    unit_scores: np.ndarray | None = field(default=None, repr=False)

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
        if self.counterfactual is None:  # not run, or no natural zero (PCA): one schema, null figures
            out.update(mean_cf_own_drop=None, mean_cf_other_drop=None)
            for fields in out["per_part"].values():
                fields.update(cf_own_drop=None, cf_other_drop=None, cf_own_n=None, cf_other_n=None)
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
    # a part with no unit (missing, or everywhere, on the training split) is scored by no measure: unit 0
    # stands in for it in sel.unit only to keep the arrays' shape, and counts as absent from every image
    present = np.asarray(test.present, dtype=bool) & np.isfinite(sel.train_auroc)[None, :]
    conf = class_confound(test_max, present, test.labels, test.part_classes, sel.unit, names)
    point = pointing_game(unit_maps, test.boxes, present, names, test.grid, test.image_size)
    drops = None if cf_max is None else counterfactual_drops(test_max, cf_max, cf_image, cf_part, present,
                                                             sel.unit, names)
    unit_scores = np.asarray(test_max)[:, sel.unit]
    return ConceptReport(code, np.shape(test_max)[1], dead_share(test_max), sel, conf, point, drops, unit_scores)


def paired_auroc_difference(scores_a, scores_b, present, n_boot: int = 1000, seed: int = 0) -> dict:
    """Mean held-out AUROC of code a minus code b, with a paired bootstrap interval over the images.

    Parameters
    ----------
    scores_a, scores_b : (N, P) each part's chosen unit's score on the same N test images
        (:attr:`ConceptReport.unit_scores`). present : (N, P) bool.
    n_boot : resamples of the N images with replacement, the same resample for both codes.

    Returns
    -------
    dict: ``difference`` (on the images as they are), ``low`` / ``high`` (the 2.5th and 97.5th
    percentiles of the resampled differences), ``n_boot``. An interval that holds 0 means
    these images cannot tell the two codes apart.
    """
    a, b = np.asarray(scores_a, dtype=np.float64), np.asarray(scores_b, dtype=np.float64)
    present = np.asarray(present, dtype=bool)

    def difference(rows) -> float:
        auc_a = np.diag(stats.auroc(a[rows], present[rows]))                # part p's unit against part p's labels
        auc_b = np.diag(stats.auroc(b[rows], present[rows]))
        return _nanmean(auc_a) - _nanmean(auc_b)

    rng = np.random.default_rng(seed)
    n = len(present)
    resampled = np.array([difference(rng.integers(0, n, n)) for _ in range(n_boot)])
    low, high = np.nanpercentile(resampled, [2.5, 97.5])
    return {"difference": difference(np.arange(n)), "low": float(low), "high": float(high), "n_boot": n_boot}


def versus_best_baseline(reports: dict, present, n_boot: int = 1000, seed: int = 0) -> dict | None:
    """The SAE's (key ``"sae"``) mean held-out AUROC minus the best other code's, with a paired bootstrap interval.

    Parameters
    ----------
    reports : :class:`ConceptReport` by code key, scored on the same test images (``"sae"`` among them).
    present : (N, P) bool, those images' part presence.

    Returns
    -------
    dict: ``baseline`` (the best other code's name) and the fields of
    :func:`paired_auroc_difference`; None without the SAE or another code. The baseline is
    picked by its chosen units' mean AUROC on the training split, where they were chosen:
    the test images only score the difference.
    """
    others = {k: r for k, r in reports.items() if k != "sae"}
    if "sae" not in reports or not others:
        return None
    best = max(others, key=lambda k: _nanmean(others[k].selection.train_auroc))
    # only parts both codes chose a unit for: the difference is then that of their mean_test_auroc figures
    chosen = np.isfinite(reports["sae"].selection.train_auroc) & np.isfinite(others[best].selection.train_auroc)
    present = np.asarray(present, dtype=bool) & chosen[None, :]
    diff = paired_auroc_difference(reports["sae"].unit_scores, others[best].unit_scores, present, n_boot, seed)
    return {"baseline": others[best].code, **diff}


def versus_text(baseline: str, difference: float, low: float, high: float) -> str:
    """One sentence for :func:`versus_best_baseline`'s figures, saying whether the images resolve them."""
    verdict = ("the interval holds 0: these images cannot tell the two apart" if low <= 0 <= high
               else "the SAE is ahead beyond these images' noise" if low > 0 else "the SAE is behind beyond noise")
    return (f"SAE minus the best baseline ({baseline}) in mean held-out AUROC: {difference:+.4f}, "
            f"95% paired bootstrap interval {low:+.4f} to {high:+.4f} ({verdict})")
