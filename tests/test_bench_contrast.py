"""bench/bench_contrast.py on the tiny pipeline: the section is written and its shares add up."""
import json
import math

import pytest

from bench import bench_contrast
from selfexplain import artifacts


def test_bench_contrast_scores_plain_and_contrast_against_the_parts(tiny_classifier, tiny_sae, cache_dir, tmp_path):
    import sae_summarize

    report = tmp_path / "report"
    ckpts = dict(classifier_ckpt=str(tiny_classifier / artifacts.BEST_CLASSIFIER),
                 sae_ckpt=str(tiny_sae / artifacts.BEST_SAE), cache_dir=str(cache_dir))
    sae_summarize.main(**ckpts, out_dir=str(report), baselines=[])
    # every live neuron named after its best part, so the tiny models' weak detectors still count
    rows = [json.loads(line) for line in (report / artifacts.NEURONS).read_text().splitlines()]
    for r in rows:
        if r.get("parts"):
            r["parts"].update(auroc=0.9, distractor_auroc=0.9)
    (report / artifacts.NEURONS).write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "contrast.md"
    row = bench_contrast.main(**ckpts, report_dir=str(report), out=str(out), n=3, random_draws=2, cf_images=4)
    assert row["images"] > 0 and 0 < row["chance"] < 1
    for kind in ("plain", "contrast"):
        assert sum(row[kind]) == pytest.approx(1.0, abs=1e-6) and all(0 <= x <= 1 for x in row[kind])
    for key in ("plain_of_own_parts", "contrast_of_own_parts", "plain_over_half", "contrast_over_half"):
        assert 0 <= row[key] <= 1
    assert set(row["drop"]) == {"contrast", "plain", "random"} and all(math.isfinite(v) for v in row["drop"].values())
    low, high = row["contrast_minus_plain"][1:]
    assert low <= row["contrast_minus_plain"][0] <= high
    cf = row["counterfactuals"]  # true re-renders: every one of A's parts is cited or not by each explanation
    assert cf["images"] == 4
    for kind in ("plain", "contrast", "truth"):
        groups = [v for k, v in cf.items() if k.startswith(kind + " ")]
        assert groups and all(math.isfinite(g["mean_drop"]) for g in groups)
    assert sum(v["n"] for k, v in cf.items() if k.startswith("plain ")) == \
        sum(v["n"] for k, v in cf.items() if k.startswith("truth "))
    text = out.read_text()
    assert "**contrast** (evidence for the margin A - B" in text and "95% paired interval" in text
    assert "True interventions: 4 test images re-rendered" in text
    with pytest.raises(Exception, match="run sae_summarize.py"):
        bench_contrast.main(**ckpts, report_dir=str(tmp_path / "none"), out=str(out))
