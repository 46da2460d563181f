"""bench/bench_explain.py end to end on the tiny pipeline: latency rows (the page's request among them) and evidence."""
import numpy as np
import pytest

from bench import bench_explain
from selfexplain import artifacts, data, evidence, explain


def test_bench_explain_times_the_page_request_and_writes_its_section(tiny_classifier, tiny_sae, cache_dir, tmp_path):
    out = tmp_path / "explain.md"
    result = bench_explain.main(classifier_ckpt=str(tiny_classifier / artifacts.BEST_CLASSIFIER),
                                sae_ckpt=str(tiny_sae / artifacts.BEST_SAE), report_dir=str(tmp_path / "report"),
                                cache_dir=str(cache_dir), max_images=6, iters=2, rounds=1, random_draws=2,
                                out=str(out), plots=str(tmp_path))
    latency = result["latency_ms"]
    assert set(latency) == {"bare forward", "explain, fast (no input check)", "explain + input check",
                            bench_explain._AUTOGRAD_CHECK, bench_explain._PAGE_REQUEST}
    assert all(ms > 0 for ms in latency.values())        # timed, not compared: speed lives in the benchmark
    text = out.read_text()
    assert "The page's request" in text and "| page request: POST /explain" in text
    assert result["figures"]["n"] == 6 and "cf" in result["figures"]
    assert {"class_pixels_drop", "cam_pixels_drop"} <= set(result["figures"]["drops"])
    assert "no concepts, pixel level: CAM times" in text
    fig = result["figures"]
    for kind in ("deletion", "insertion"):  # the gap is the table's two rows apart, its interval around it
        mean, low, high = fig["order_gap"][kind]
        assert mean == pytest.approx(fig[f"{kind}_auc"]["explanation"] - fig[f"{kind}_auc"]["random order"])
        assert low <= mean <= high
    alone = fig["alone"]
    assert alone["n"][0] == fig["curves_n"] and len(alone["insert"]) == len(alone["delete"]) >= 2
    assert "Explanation minus random order" in text and "| 1 | " in text
    for key in ("insert", "delete"):
        mean, low, high = alone["rank_correlation"][key]
        assert -1.0 <= low <= mean <= high <= 1.0


def test_rank_correlation_reads_order_not_scale():
    assert bench_explain.rank_correlation([1, 2, 3, 4], [10, 20, 300, 4000]) == pytest.approx(1.0)
    assert bench_explain.rank_correlation([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert bench_explain.rank_correlation([1, 2, 3], [5, 5, 5]) == 0.0   # a flat region effect says nothing
    assert bench_explain.rank_correlation([1.0], [2.0]) == 0.0
    assert bench_explain.rank_correlation([1, 2, 3, 4], [1, 1, 2, 2]) == pytest.approx(np.sqrt(0.8))  # ties averaged


def test_the_timed_reference_attribution_is_the_products_by_autograd(tiny_classifier, tiny_sae, cache_dir):
    """The latency table's "before" row times what the product computes, by the old path: same values."""
    models = explain.load_models(tiny_classifier / artifacts.BEST_CLASSIFIER, tiny_sae / artifacts.BEST_SAE, "cpu")
    test = np.sort(np.asarray(models.classifier_ckpt["split"]["test"]))[:2]
    images = data.load_dataset(models.classifier_ckpt["dataset"], cache_dir).images[test]
    for image in images:
        sets = [[0, 1, 2], [5], []]
        want = evidence.set_activation_pixels(models, image, sets, class_logit=1)
        with bench_explain.swapped(evidence, "ink_attribution", bench_explain.autograd_ink_attribution):
            got = evidence.set_activation_pixels(models, image, sets, class_logit=1)
        assert evidence.ink_attribution is not bench_explain.autograd_ink_attribution   # swapped back
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * max(float(want.max()), 1e-12))


def test_paired_mean_interval_brackets_the_mean_and_shrinks_with_more_images():
    rng = np.random.default_rng(0)
    few, many = rng.normal(0.1, 1.0, 50), rng.normal(0.1, 1.0, 5000)
    (m_few, lo_few, hi_few), (m_many, lo_many, hi_many) = map(bench_explain.paired_mean_interval, (few, many))
    assert lo_few < m_few < hi_few and lo_many < m_many < hi_many
    assert hi_many - lo_many < (hi_few - lo_few) / 5      # ~1/sqrt(100) as wide
    assert lo_many > 0 > lo_few                             # 0.1 is resolved by 5,000 images, not by 50
    assert bench_explain.paired_mean_interval([0.5] * 10) == (0.5, 0.5, 0.5)
