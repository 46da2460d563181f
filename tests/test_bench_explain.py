"""bench/bench_explain.py end to end on the tiny pipeline: latency rows (the page's request among them) and evidence."""
from bench import bench_explain
from selfexplain import artifacts


def test_bench_explain_times_the_page_request_and_writes_its_section(tiny_classifier, tiny_sae, cache_dir, tmp_path):
    out = tmp_path / "explain.md"
    result = bench_explain.main(classifier_ckpt=str(tiny_classifier / artifacts.BEST_CLASSIFIER),
                                sae_ckpt=str(tiny_sae / artifacts.BEST_SAE), report_dir=str(tmp_path / "report"),
                                cache_dir=str(cache_dir), max_images=6, iters=2, rounds=1, random_draws=2,
                                out=str(out), plots=str(tmp_path))
    latency = result["latency_ms"]
    assert set(latency) == {"bare forward", "explain, fast (no input check)", "explain + input check",
                            bench_explain._PAGE_REQUEST}
    assert all(ms > 0 for ms in latency.values())        # timed, not compared: speed lives in the benchmark
    text = out.read_text()
    assert "The page's request" in text and "| page request: POST /explain" in text
    assert result["figures"]["n"] == 6 and "cf" in result["figures"]
    assert {"class_pixels_drop", "cam_pixels_drop"} <= set(result["figures"]["drops"])
    assert "no concepts, pixel level: CAM times" in text
