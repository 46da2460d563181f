"""The per-neuron statistics of stage 3, checked on small hand-made inputs."""
import math

import numpy as np
import pytest

from selfexplain import stats


def test_thresholds_are_per_neuron_quantiles():
    x = np.stack([np.arange(101.0), np.zeros(101)], 1)  # neuron 1 never fires
    tau = stats.thresholds(x, 0.99)
    assert tau.tolist() == [99.0, 0.0]
    on = stats.on_mask(x, tau)
    assert on[:, 0].sum() == 1 and on[100, 0]  # strictly above τ: only the top image
    assert not on[:, 1].any()  # a silent neuron is never on
    with pytest.raises(ValueError):
        stats.thresholds(x, 1.5)


def test_pmi_matches_hand_computation_with_laplace():
    labels = np.array([0, 0, 1, 1, 1, 2])
    on = np.array([[1, 0], [1, 0], [0, 0], [0, 1], [0, 1], [0, 1]], dtype=bool)
    got = stats.pmi(on, labels, n_classes=3, lam=1.0)
    # neuron 0: n_i = 2 (both class 0); P(c|on) = (n_ic + 1)/(2 + 3), P(c) = (n_c + 1)/(6 + 3)
    p_on = np.array([3, 1, 1]) / 5
    p_c = np.array([3, 4, 2]) / 9
    assert np.allclose(got[0], np.log(p_on / p_c))
    # neuron 1: n_ic = [0, 2, 1]
    assert np.allclose(got[1], np.log((np.array([1, 3, 2]) / 6) / p_c))
    # λ = 0 is plain PMI: a class never seen with the neuron is -inf
    raw = stats.pmi(on, labels, 3, lam=0.0)
    assert raw[0, 0] == pytest.approx(math.log(1.0 / (2 / 6))) and raw[0, 1] == -np.inf
    assert np.allclose(stats.p_class_given_on(on, labels, 3, 1.0).sum(1), 1.0)


def test_knockout_is_minus_mean_code_times_lens_over_on_images():
    mean_codes = np.array([[2.0, 0.0], [4.0, 1.0], [0.0, 3.0]])
    lens = np.array([[1.0, -0.5], [0.0, 2.0]])
    on = np.array([[1, 0], [1, 0], [0, 1]], dtype=bool)
    got = stats.knockout(mean_codes, lens, on)
    assert np.allclose(got[0], -3.0 * lens[0])  # mean code 3 over its two on images
    assert np.allclose(got[1], -3.0 * lens[1])
    assert np.allclose(stats.knockout(mean_codes, lens), -mean_codes.mean(0)[:, None] * lens)
    never = stats.knockout(mean_codes, lens, np.zeros_like(on))
    assert np.all(never == 0)


def test_ranking_score_rewards_support_not_opposition():
    pmi = np.array([[2.0, -1.0], [2.0, -1.0], [-0.5, 0.1]])
    ko = np.array([[-1.5, 0.3], [1.5, -0.2], [-3.0, 0.0]])  # neuron 0 supports class 0, neuron 1 opposes it
    score, best = stats.ranking_score(pmi, ko)
    assert score[0] == pytest.approx(3.0) and best[0] == 0
    assert score[1] == 0.0 and best[1] == -1  # specific but pushing the class down: no credit
    assert score[2] == 0.0  # supports a class it is not specific to


def _brute_auroc(s, y):
    pos, neg = s[y], s[~y]
    diff = pos[:, None] - neg[None, :]
    return ((diff > 0) + 0.5 * (diff == 0)).mean()


def test_auroc_matches_pairwise_count_with_ties(seed):
    rng = np.random.default_rng(seed)
    scores = rng.integers(0, 4, size=(40, 5)).astype(float)  # many ties
    y = rng.random(40) < 0.4
    got = stats.auroc(scores, y)
    assert np.allclose(got, [_brute_auroc(scores[:, m], y) for m in range(5)])
    both = stats.auroc(scores, np.stack([y, ~y], 1))
    assert both.shape == (2, 5) and np.allclose(both[0] + both[1], 1.0)
    perfect = stats.auroc(np.where(y, 2.0, 1.0)[:, None], y)
    assert perfect[0] == 1.0
    assert np.isnan(stats.auroc(scores, np.zeros(40, dtype=bool))).all()


def test_average_ranks_ties():
    ranks = stats.average_ranks(np.array([[3.0], [1.0], [3.0], [2.0]]))
    assert ranks[:, 0].tolist() == [3.5, 1.0, 3.5, 2.0]


def test_weighted_position_and_words():
    rows, cols = stats.token_grid(2, 2)
    assert rows.tolist() == [0.25, 0.25, 0.75, 0.75] and cols.tolist() == [0.25, 0.75, 0.25, 0.75]
    z = np.array([[0.0, 0.0], [0.0, 1.0], [0.0, 0.0], [4.0, 1.0]])  # (T, M): neuron 0 only lower right
    sums = {"w": z.sum(0), "r": rows @ z, "c": cols @ z, "rr": rows ** 2 @ z, "cc": cols ** 2 @ z}
    pos = stats.weighted_position(sums)
    assert pos["row"][0] == pytest.approx(0.75) and pos["col"][0] == pytest.approx(0.75)
    assert pos["spread"][0] == pytest.approx(0.0, abs=1e-9)
    assert pos["row"][1] == pytest.approx(0.5) and pos["spread"][1] == pytest.approx(math.sqrt(0.0625))
    assert stats.describe_position(0.75, 0.75, 0.0) == "lower right"
    assert stats.describe_position(0.2, 0.5, 0.1) == "upper"
    assert stats.describe_position(0.5, 0.5, 0.1) == "centre"
    assert stats.describe_position(0.5, 0.5, 0.4) == "all over the sketch"
    assert stats.describe_position(0.5, 0.5, 0.4, diffuse="anywhere in the sketch") == "anywhere in the sketch"
    assert stats.describe_position(0.2, 0.5, 0.4, diffuse="anywhere in the sketch") == "upper, but spread out"
    dead = stats.weighted_position({k: np.zeros(1) for k in ("w", "r", "c", "rr", "cc")})
    assert dead["row"][0] == 0.5 and dead["spread"][0] == 0.0


def test_describe_map_says_where_one_image_fired():
    from selfexplain.stats import describe_map

    heat = np.zeros((4, 4))
    heat[0, 0] = 1.0
    assert describe_map(heat) == "upper left"
    heat = np.zeros((4, 4))
    heat[3, 2:] = 2.0
    assert describe_map(heat) == "lower right"
    assert describe_map(np.ones((4, 4))) == "all over the sketch"
