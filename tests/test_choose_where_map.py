"""bench/choose_where_map.py: the rule that combines cited maps is chosen on the validation split."""
import numpy as np

from bench import choose_where_map
from selfexplain import artifacts, evidence


def test_choose_where_map_scores_every_rule_on_validation(tiny_classifier, tiny_sae, cache_dir, tmp_path):
    out = tmp_path / "where.md"
    result = choose_where_map.main(classifier_ckpt=str(tiny_classifier / artifacts.BEST_CLASSIFIER),
                                   sae_ckpt=str(tiny_sae / artifacts.BEST_SAE), cache_dir=str(cache_dir),
                                   max_images=6, random_draws=2, out=str(out))
    means = result["means"]
    assert len(means) == 2 * len(choose_where_map.WAYS) + 1  # each way alone and x pixels, and pixels alone
    assert choose_where_map.WAYS[next(iter(choose_where_map.WAYS))] is evidence.where_map  # the default way
    text = out.read_text()
    assert "chosen on the val split" in text and text.count("\n| ") >= len(means) + 1
    assert f"**{result['chosen']}**" in text


def test_the_rule_takes_the_best_ratio_among_rows_that_keep_up_with_cam():
    means = {"sharp but weak": np.array([1.0, 0.5, 2.0]),     # 2.0x random, but 0.5x CAM: excluded
             "good": np.array([2.0, 1.25, 2.0]),              # 1.6x random, 1.0x CAM
             "plain": np.array([2.0, 1.5, 2.0])}              # 1.33x random
    assert choose_where_map.choose(means) == "good"
    assert choose_where_map.choose({"weak": np.array([1.0, 0.5, 2.0])}) == "weak"  # none qualifies: best of all


def test_a_pick_overturns_the_products_rule_only_beyond_noise():
    rng = np.random.default_rng(0)
    random_drop = rng.uniform(1.0, 2.0, 300)
    product = np.stack([1.6 * random_drop + rng.normal(0, 0.3, 300), random_drop, random_drop], 1)
    close = product + np.stack([rng.normal(0.01, 0.3, 300), np.zeros(300), np.zeros(300)], 1)
    far = product + np.stack([np.full(300, 0.8), np.zeros(300), np.zeros(300)], 1)
    rows = {choose_where_map.PRODUCT: list(product), "close": list(close), "far": list(far)}
    assert "keeps its rule" in choose_where_map.versus_product(rows, "close", seed=0)
    assert "should change" in choose_where_map.versus_product(rows, "far", seed=0)
    assert "is the product's rule" in choose_where_map.versus_product(rows, choose_where_map.PRODUCT, seed=0)
