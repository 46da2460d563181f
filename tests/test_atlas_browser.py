"""The HTML atlas renders in a real (headless) browser, with stage 4's concepts when present."""
import re
import shutil
import subprocess

import numpy as np
import pytest
from PIL import Image

from selfexplain import artifacts, report

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _fake_report(folder, n=6, dead=(4,)):
    (folder / "sprites").mkdir(parents=True)
    records = []
    for i in range(n):
        sprite = None
        if i not in dead:
            sprite = f"sprites/n{i:05d}.png"
            Image.fromarray(np.full((24, 74, 3), 40 * i, dtype=np.uint8)).save(folder / sprite)
        records.append({
            "neuron_id": i, "dead": i in dead, "threshold": 0.5, "frequency": 0.01, "image_frequency": 0.1 * i,
            "token_frequency": 0.02, "mean_on_activation": 1.5, "max_activation": 2.0, "score": float(n - i),
            "score_class": "bicycle", "top_classes": [{"class": "bicycle" if i % 2 else "car", "index": i % 2,
                                                       "pmi": 1.2, "p_class_given_on": 0.6, "lens": 0.4,
                                                       "knockout": -0.3}],
            "anti_classes": [{"class": "sun", "index": 2, "pmi": -1.0, "lens": -0.2}],
            "where": {"row": 0.7, "col": 0.3, "spread": 0.1, "description": "lower left"},
            "auto_summary": f"Neuron {i} </script><b>not bold</b> summary.", "top_examples": [], "sprite": sprite})
    artifacts.write_jsonl(folder / "neurons.jsonl", records)
    return records


def _chromium(args, tmp_path):
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}"]
    return subprocess.run(cmd + args, capture_output=True, text=True, timeout=120)


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed")
def test_atlas_renders_cards_and_concepts_in_chromium(tmp_path):
    out = tmp_path / "neuron_report"
    records = _fake_report(out)
    artifacts.write_jsonl(out / "llm_output.jsonl", [
        {"neuron_id": 1, "answer": "double spoked wheel", "backend": "fake", "model": "m"},
        {"neuron_id": 3, "answer": "zigzag crown teeth", "backend": "fake", "model": "m"}])
    page = report.write_index_html(out)
    html = page.read_text()
    assert "http://" not in html and "https://" not in html  # self-contained: nothing to fetch
    dom = _chromium(["--dump-dom", page.as_uri()], tmp_path).stdout
    cards = re.findall(r'<article class="neuron[ "]', dom)
    live = [r for r in records if not r["dead"]]
    assert len(cards) == len(live)  # dead neurons are hidden by default; the JS built every card
    assert "double spoked wheel" in dom and "zigzag crown teeth" in dom
    assert "<b>not bold</b>" not in dom  # summaries are escaped, and '</script>' did not end the data early
    assert 'src="sprites/n00000.png"' in dom
    order = [int(m) for m in re.findall(r'data-id="(\d+)"', dom)]
    assert order == sorted(order, key=lambda i: -records[i]["score"])  # default sort: score


def test_index_rebuild_without_llm_output(tmp_path):
    out = tmp_path / "r"
    _fake_report(out)
    html = report.write_index_html(out).read_text()
    data = html.split('id="atlas-data">')[1].split("</script>")[0]
    import json

    payload = json.loads(data)
    assert len(payload["neurons"]) == 6 and not any("concept" in n for n in payload["neurons"])
    assert payload["meta"]["n_dead"] == 1 and payload["meta"]["classes"] == ["bicycle", "car"]
