"""bench/choose_where_map.py: the rule that combines cited maps is chosen on the validation split."""
import numpy as np

from bench import choose_where_map
from selfexplain import artifacts, evidence


def test_choose_where_map_scores_every_rule_on_validation(tiny_classifier, tiny_sae, cache_dir, tmp_path):
    out = tmp_path / "where.md"
    means = choose_where_map.main(classifier_ckpt=str(tiny_classifier / artifacts.BEST_CLASSIFIER),
                                  sae_ckpt=str(tiny_sae / artifacts.BEST_SAE), cache_dir=str(cache_dir),
                                  max_images=6, random_draws=2, out=str(out))
    assert list(means) == list(choose_where_map.WAYS)
    assert choose_where_map.WAYS[next(iter(choose_where_map.WAYS))] is evidence.where_map  # the default row
    cam = np.array([m[2] for m in means.values()])
    assert np.allclose(cam, cam[0])                       # CAM does not depend on the rule: one baseline for all
    text = out.read_text()
    assert "chosen on the val split" in text and text.count("\n| ") >= len(choose_where_map.WAYS)
