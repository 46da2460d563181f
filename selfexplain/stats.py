"""Per-neuron statistics of an SAE code, as pure vectorised functions.

Everything here works on plain arrays (numpy or anything ``np.asarray`` accepts), vectorised
over neurons M and classes C, so the maths can be checked on small hand-made inputs:

* ``thresholds``: τ_i, the q-quantile of neuron i's per-image max activation;
* ``pmi``: pointwise mutual information between "neuron on" and each class, with Laplace λ;
* ``knockout``: the exact logit change Δ⁻ when a neuron is removed from the reconstruction;
* ``ranking_score``: one number per neuron that rewards class *support* (w > 0, Δ⁻ < 0);
* ``auroc``: rank-based AUROC of per-image scores against binary labels, ties averaged;
* ``weighted_position`` / ``describe_position``: where in the image a neuron fires.

Notation follows the README's "How it works": a neuron with mean code m = mean_tokens(z_i) over an image's
tokens adds m · w_i[c] to class c's logit, where w_i = W_out (d_i ⊙ σ) is its logit lens.
"""
from __future__ import annotations

import numpy as np


def thresholds(per_image_max, q: float = 0.99) -> np.ndarray:
    """τ_i = q-quantile over images of each neuron's per-image max activation.

    Parameters
    ----------
    per_image_max : (N, M) array, per-image max activation of each neuron.
    q : quantile in [0, 1].

    Returns
    -------
    (M,) float64. A neuron active on fewer than (1 - q) of the images gets τ = 0, so
    "on" (max > τ) then means "active at all".
    """
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"quantile must be in [0, 1], got {q}")
    return np.quantile(np.asarray(per_image_max, dtype=np.float64), q, axis=0)


def on_mask(per_image_max, tau) -> np.ndarray:
    """(N, M) bool: the neuron is "on" in an image when its max activation exceeds τ (strictly)."""
    return np.asarray(per_image_max) > np.asarray(tau)[None, :]


def pmi(on, labels, n_classes: int, lam: float = 1.0) -> np.ndarray:
    """PMI(i, c) = log P(c | i on) / P(c), Laplace-smoothed with λ.

    P(c | on) = (n_ic + λ) / (n_i + λC),   P(c) = (n_c + λ) / (N + λC),
    where n_ic counts images of class c with neuron i on, n_i = Σ_c n_ic, n_c the images of c.

    Parameters
    ----------
    on : (N, M) bool. labels : (N,) ints in [0, n_classes). lam : λ > 0 (0 gives -inf for empty cells).

    Returns
    -------
    (M, C) float64. With no "on" images a neuron's PMI is log(P_λ(uniform) / P(c)): 0 for balanced
    classes, away from 0 for the rare and common ones.
    """
    counts = class_counts(on, labels, n_classes)              # (M, C)
    n_c = np.bincount(np.asarray(labels), minlength=n_classes).astype(np.float64)
    n = float(len(labels))
    p_c_on = (counts + lam) / (counts.sum(1, keepdims=True) + lam * n_classes)
    p_c = (n_c + lam) / (n + lam * n_classes)
    with np.errstate(divide="ignore"):  # λ = 0 and an empty cell gives -inf, which is right
        return np.log(p_c_on) - np.log(p_c)[None, :]


def class_counts(on, labels, n_classes: int) -> np.ndarray:
    """n_ic: (M, C) float64 count of images of class c where neuron i is on."""
    onehot = np.zeros((len(labels), n_classes), dtype=np.float64)
    onehot[np.arange(len(labels)), np.asarray(labels)] = 1.0
    return np.asarray(on, dtype=np.float64).T @ onehot


def p_class_given_on(on, labels, n_classes: int, lam: float = 1.0) -> np.ndarray:
    """Smoothed P(c | i on): (M, C), each row sums to 1."""
    counts = class_counts(on, labels, n_classes)
    return (counts + lam) / (counts.sum(1, keepdims=True) + lam * n_classes)


def knockout(mean_codes, lens, on=None) -> np.ndarray:
    """Δ⁻_i[c] = −mean_tokens(z_i) · w_i[c]: the change of class c's logit when neuron i is removed.

    Parameters
    ----------
    mean_codes : (N, M) per-image mean over tokens of the (Top-K) code.
    lens : (M, C) logit lens w_i.
    on : optional (N, M) bool; when given, Δ⁻ is averaged over the images where the neuron
        is on (0 for a neuron never on), else over all N images.

    Returns
    -------
    (M, C). Negative where the neuron supports the class (removing it lowers the logit).
    """
    codes = np.asarray(mean_codes, dtype=np.float64)
    if on is None:
        mean = codes.mean(0)
    else:
        on = np.asarray(on, dtype=np.float64)
        mean = (codes * on).sum(0) / np.maximum(on.sum(0), 1.0)
    return -mean[:, None] * np.asarray(lens, dtype=np.float64)


def ranking_score(pmi_values, knockout_values) -> tuple[np.ndarray, np.ndarray]:
    """score_i = max_c PMI⁺_ic · relu(−Δ⁻_ic) and the class that attains it.

    A neuron ranks high when it is specific to a class (PMI > 0) *and* supports that
    class's logit (removing it lowers the logit, Δ⁻ < 0). Opposing a class (Δ⁻ > 0) or
    firing indiscriminately (PMI ≤ 0) scores 0.

    Returns
    -------
    (score (M,), best class (M,) int; -1 where the score is 0).
    """
    per_class = np.maximum(np.asarray(pmi_values, dtype=np.float64), 0.0) * np.maximum(
        -np.asarray(knockout_values, dtype=np.float64), 0.0)
    score = per_class.max(1)
    best = np.where(score > 0, per_class.argmax(1), -1)
    return score, best


def average_ranks(scores) -> np.ndarray:
    """1-based ranks of each column of ``scores`` (N, M), ties get their average rank."""
    x = np.asarray(scores, dtype=np.float64)
    n = x.shape[0]
    order = np.argsort(x, axis=0, kind="stable")
    s = np.take_along_axis(x, order, axis=0)
    pos = np.broadcast_to(np.arange(n)[:, None], s.shape)
    new = np.ones_like(s, dtype=bool)
    new[1:] = s[1:] != s[:-1]
    first = np.maximum.accumulate(np.where(new, pos, 0), axis=0)          # start of each tie group
    last_new = np.ones_like(new)
    last_new[:-1] = new[1:]
    last = np.minimum.accumulate(np.where(last_new, pos, n - 1)[::-1], axis=0)[::-1]
    ranks = np.empty_like(s)
    np.put_along_axis(ranks, order, (first + last) / 2.0 + 1.0, axis=0)
    return ranks


def auroc(scores, positives) -> np.ndarray:
    """Rank-based (Mann-Whitney) AUROC of each column of ``scores`` against binary labels.

    Parameters
    ----------
    scores : (N, M) per-image scores (e.g. per-image max activation per neuron).
    positives : (N,) bool, or (N, P) bool for P label sets at once.

    Returns
    -------
    (M,) or (P, M) float64; NaN where a label set has no positives or no negatives.
    """
    ranks = average_ranks(scores)
    pos = np.asarray(positives, dtype=np.float64)
    squeeze = pos.ndim == 1
    pos = pos[:, None] if squeeze else pos
    n_pos = pos.sum(0)[:, None]                                           # (P, 1)
    n_neg = pos.shape[0] - n_pos
    rank_sum = pos.T @ ranks                                              # (P, M)
    with np.errstate(divide="ignore", invalid="ignore"):
        out = (rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg)
    out = np.where((n_pos > 0) & (n_neg > 0), out, np.nan)
    return out[0] if squeeze else out


def token_grid(height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Normalised centre (row, col) in [0, 1] of every token, row-major: two (H*W,) arrays."""
    rows = (np.arange(height) + 0.5) / height
    cols = (np.arange(width) + 0.5) / width
    return np.repeat(rows, width), np.tile(cols, height)


def weighted_position(sums) -> dict:
    """Activation-weighted mean position and spread from accumulated moments.

    Parameters
    ----------
    sums : dict of (M,) arrays: ``w`` = Σ z, ``r``/``c`` = Σ z·row/col, ``rr``/``cc`` = Σ z·row²/col²
        over all tokens of all images (rows and cols normalised to [0, 1]).

    Returns
    -------
    dict of (M,) arrays ``row``, ``col``, ``spread`` (= sqrt(var_row + var_col)); 0.5, 0.5, 0
    for a neuron that never fired.
    """
    w = np.asarray(sums["w"], dtype=np.float64)
    safe = np.maximum(w, 1e-12)
    row = np.where(w > 0, sums["r"] / safe, 0.5)
    col = np.where(w > 0, sums["c"] / safe, 0.5)
    var = np.where(w > 0, sums["rr"] / safe - row ** 2 + sums["cc"] / safe - col ** 2, 0.0)
    return {"row": row, "col": col, "spread": np.sqrt(np.maximum(var, 0.0))}


DIFFUSE_SPREAD = 0.3  # spread above this reads as "all over" (uniform on a 2x2 grid is 0.35)


def describe_map(heat) -> str:
    """Words for where one (H, W) activation map is strongest (one image's "where")."""
    heat = np.clip(np.asarray(heat, dtype=np.float64), 0.0, None)
    rows, cols = token_grid(*heat.shape)
    w = heat.reshape(-1)
    sums = {"w": w.sum(), "r": (w * rows).sum(), "c": (w * cols).sum(), "rr": (w * rows ** 2).sum(),
            "cc": (w * cols ** 2).sum()}
    pos = weighted_position(sums)
    return describe_position(float(pos["row"]), float(pos["col"]), float(pos["spread"]))


def describe_position(row: float, col: float, spread: float, diffuse: str = "all over the sketch") -> str:
    """Words for a normalised position: "upper left", "lower", "centre", "all over"...

    ``diffuse`` names a centred, spread-out position: "all over the sketch" for one image's
    map; a neuron's position over many images passes "anywhere in the sketch" (it fires
    wherever its part is drawn, not all over each sketch).
    """
    vertical = "upper" if row < 1 / 3 else "lower" if row > 2 / 3 else ""
    horizontal = "left" if col < 1 / 3 else "right" if col > 2 / 3 else ""
    place = " ".join(w for w in (vertical, horizontal) if w) or "centre"
    if spread > DIFFUSE_SPREAD:
        return diffuse if place == "centre" else f"{place}, but spread out"
    return place
