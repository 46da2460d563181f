"""The HTML atlas: renders in a real (headless) browser, shows only current concepts, resists injection."""
import json
import re
import shutil
import subprocess

import numpy as np
import pytest
from PIL import Image

from selfexplain import artifacts, report

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FINGERPRINT = "0123456789abcdef"  # the SAE the fake report describes


def _fake_report(folder, n=6, dead=(4,)):
    (folder / "sprites").mkdir(parents=True)
    records = []
    for i in range(n):
        sprite = None
        if i not in dead:
            sprite = f"sprites/n{i:05d}.png"
            Image.fromarray(np.full((24, 74, 3), 40 * i % 256, dtype=np.uint8)).save(folder / sprite)
        records.append({
            "neuron_id": i, "sae_fingerprint": FINGERPRINT, "dead": i in dead, "threshold": 0.5, "frequency": 0.1,
            "quantile": 0.9,
            "image_frequency": 0.1 * i, "token_frequency": 0.02, "mean_on_activation": 1.5, "max_activation": 2.0,
            "score": float(n - i), "score_class": "bicycle",
            "top_classes": [{"class": "bicycle" if i % 2 else "car", "index": i % 2, "pmi": 1.2,
                             "p_class_given_on": 0.6, "lens": 0.4, "knockout": -0.3}],
            "anti_classes": [{"class": "sun", "index": 2, "pmi": -1.0, "lens": -0.2}],
            "where": {"row": 0.7, "col": 0.3, "spread": 0.1, "description": "lower left"},
            "auto_summary": f"Neuron {i} </script><b>not bold</b> summary.", "top_examples": [], "sprite": sprite})
    artifacts.write_jsonl(folder / "neurons.jsonl", records)
    artifacts.write_json(folder / "summary.json", {"sae_fingerprint": FINGERPRINT, "n_images": 10})
    return records


def _payload(html: str) -> dict:
    return json.loads(html.split('id="atlas-data">')[1].split("</script>")[0])


def _chromium_dom(page, tmp_path) -> str:
    assert CHROMIUM, "chromium is needed for the atlas test: apt-get install chromium"
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}",
           "--dump-dom", page.as_uri()]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120).stdout


def test_atlas_renders_cards_and_concepts_in_chromium(tmp_path):
    out = tmp_path / "neuron_report"
    records = _fake_report(out)
    artifacts.write_jsonl(out / "llm_output.jsonl", [
        {"neuron_id": 1, "answer": "double spoked wheel", "backend": "fake", "model": "m",
         "sae_fingerprint": FINGERPRINT},
        {"neuron_id": 3, "answer": "zigzag crown teeth", "backend": "offline", "model": "offline",
         "sae_fingerprint": FINGERPRINT}])
    page = report.write_index_html(out)
    html = page.read_text()
    assert "http://" not in html and "https://" not in html  # self-contained: nothing to fetch
    dom = _chromium_dom(page, tmp_path)
    cards = re.findall(r'<article class="neuron[ "]', dom)
    live = [r for r in records if not r["dead"]]
    assert len(cards) == len(live)  # dead neurons are hidden by default; the JS built every card
    assert "double spoked wheel" in dom and "zigzag crown teeth" in dom
    assert "<b>not bold</b>" not in dom  # summaries are escaped, and '</script>' did not end the data early
    assert 'src="sprites/n00000.png"' in dom
    # the tooltip states the run's own QUANTILE (it said "about 1% by design" whatever the setting)
    assert 'title="share of images above its threshold τ (the 90.0% quantile of its per-image max: about 10.0% by ' \
           'design)"' in dom
    assert "<small>fake m</small>" in dom and "<small>offline</small>" in dom  # the backend tag once, not twice
    order = [int(m) for m in re.findall(r'data-id="(\d+)"', dom)]
    assert order == sorted(order, key=lambda i: -records[i]["score"])  # default sort: score


def test_index_rebuild_without_llm_output(tmp_path):
    out = tmp_path / "r"
    _fake_report(out)
    payload = _payload(report.write_index_html(out).read_text())
    assert len(payload["neurons"]) == 6 and not any("concept" in n for n in payload["neurons"])
    assert payload["meta"]["n_dead"] == 1 and payload["meta"]["classes"] == ["bicycle", "car"]


def test_comment_and_script_tags_in_the_data_cannot_break_the_page(tmp_path):
    """'<!--<script' in the JSON block switches the HTML parser to a state where '</script>' no longer ends it."""
    out = tmp_path / "r"
    records = _fake_report(out)
    records[0]["top_classes"][0]["class"] = "<!--<script>"
    records[1]["score_class"] = "<!--<script>"
    artifacts.write_jsonl(out / "neurons.jsonl", records)
    artifacts.write_jsonl(out / "llm_output.jsonl", [
        {"neuron_id": 2, "answer": "<!--<script>alert(1)</script>", "backend": "fake", "model": "m",
         "sae_fingerprint": FINGERPRINT}])
    page = report.write_index_html(out)
    dom = _chromium_dom(page, tmp_path)
    assert len(re.findall(r'<article class="neuron[ "]', dom)) == 5  # the script ran: every live card is there
    assert "&lt;!--&lt;script&gt;alert(1)&lt;/script&gt;" in dom
    html = page.read_text()
    data = html.split('id="atlas-data">')[1].split("</script>")[0]
    assert "<" not in data and ">" not in data                 # nothing in the payload is markup
    assert _payload(html)["meta"]["classes"][0] == "<!--<script>"


def test_records_are_type_checked(tmp_path):
    out = tmp_path / "r"
    records = _fake_report(out)
    records.append(dict(records[2], neuron_id='7" onmouseover="alert(1)'))  # not an int: left out
    records.append(dict(records[2], neuron_id=True))
    records.append(dict(records[2], neuron_id=8, score="9", dead="no", where=["x"], top_classes="car",
                        anti_classes=[3, {"class": 4}], parts="x", sprite=["sprites/n00000.png"]))
    artifacts.write_jsonl(out / "neurons.jsonl", records)
    html = report.write_index_html(out).read_text()
    payload = _payload(html)
    assert [n["neuron_id"] for n in payload["neurons"]] == [0, 1, 2, 3, 4, 5, 8] and "onmouseover" not in html
    typed = payload["neurons"][-1]                             # wrong types become empty values, never markup
    assert typed["score"] is None and typed["dead"] is False and typed["top_classes"] == []
    assert typed["where"] == {"description": None} and typed["anti_classes"] == [None, None]
    assert "parts" not in typed and typed["sprite"] is None


@pytest.mark.parametrize("sprite", ["../../etc/passwd", "http://x/y.png", "//x/y.png", "/etc/passwd",
                                    "sprites/../../x.png", "C:/x.png", "sprites\\..\\..\\x.png",
                                    "javascript:alert(1)", "sprites/link.png", 7])
def test_paths_from_neurons_jsonl_stay_inside_the_report(tmp_path, sprite):
    out = tmp_path / "r"
    records = _fake_report(out)
    (out / "sprites" / "link.png").symlink_to(tmp_path)  # a link that resolves outside the report
    records[0]["sprite"] = sprite
    artifacts.write_jsonl(out / "neurons.jsonl", records)
    html = report.write_index_html(out).read_text()
    assert _payload(html)["neurons"][0]["sprite"] is None and "http://" not in html
    assert report.page_path(out, sprite) is None
    assert report.page_path(out, "sprites/n00001.png") == "sprites/n00001.png"


def test_concepts_of_another_sae_are_set_aside(tmp_path):
    """A retrained SAE: answers recorded for the old one must not be shown as current."""
    out = tmp_path / "r"
    _fake_report(out)
    artifacts.write_jsonl(out / "llm_output.jsonl", [
        {"neuron_id": 1, "answer": "old wheel", "backend": "fake", "model": "m", "sae_fingerprint": "ffffffffffffffff"},
        {"neuron_id": 2, "answer": "unversioned", "backend": "fake", "model": "m"},
        {"neuron_id": 3, "answer": "current crown", "backend": "fake", "model": "m", "sae_fingerprint": FINGERPRINT}])
    html = report.write_index_html(out).read_text()
    payload = _payload(html)
    concepts = {n["neuron_id"]: n.get("concept") for n in payload["neurons"]}
    assert concepts == {0: None, 1: None, 2: None, 3: "current crown", 4: None, 5: None}
    assert payload["meta"]["n_stale"] == 2 and payload["meta"]["n_concepts"] == 1
    assert "old wheel" not in html and "unversioned" not in html
    assert (out / "llm_output.jsonl").read_text().count("\n") == 3  # set aside, not deleted


def _measures(code: str, auroc: float, unit: int) -> dict:
    """A ``concept_measures`` code entry of summary.json, two parts."""
    row = {"unit": unit, "test_auroc": auroc, "test_ap": 0.7, "distractor_auroc": 0.8, "pointing": 0.9,
           "pointing_chance": 0.25, "cf_own_drop": 0.6, "cf_other_drop": 0.05}
    return {"code": code, "per_part": {"spiral": row, "<b>arc</b>": dict(row, unit=unit + 1, test_auroc=None)},
            "mean_test_auroc": auroc, "mean_test_ap": 0.7, "mean_distractor_auroc": 0.8, "mean_pointing": 0.9,
            "mean_pointing_chance": 0.25, "mean_cf_own_drop": 0.6, "mean_cf_other_drop": 0.05,
            "mean_class_set_auroc": 0.83}


def test_atlas_header_shows_the_held_out_figures(tmp_path):
    out = tmp_path / "neuron_report"
    records = _fake_report(out)
    for r in records:
        r["parts"] = {"best_part": "spiral", "auroc": 0.91, "pointing": 0.5, "pointing_chance": 0.25, "split": "train",
                      "n_examples": 6}
    artifacts.write_jsonl(out / "neurons.jsonl", records)
    artifacts.write_json(out / "summary.json", {
        "sae_fingerprint": FINGERPRINT, "n_images": 10,
        "concept_measures": {"n_train_images": 10, "n_test_images": 4, "codes": {
            "sae": _measures("SAE (M=6, K=2)", 0.951, 2), "channels": _measures("channels", "0.9", 7)},
            "sae_versus_best_baseline": {"baseline": "channels", "difference": 0.004, "low": -0.001, "high": 0.009}}})
    page = report.write_index_html(out)
    held = _payload(page.read_text())["meta"]["held_out"]
    assert [r["part"] for r in held["parts"]] == ["spiral", "<b>arc</b>"] and held["parts"][0]["unit"] == 2
    assert held["codes"][1]["mean_test_auroc"] is None       # a string in summary.json never reaches the page
    assert "(channels) in mean held-out AUROC: +0.0040, 95% paired bootstrap interval -0.0010 to +0.0090 (the " \
           "interval holds 0" in held["note"]
    dom = _chromium_dom(page, tmp_path)
    table = dom.split('id="heldout-rows">')[1].split("</tbody>")[0]
    assert '<a href="#neuron-2">#2</a>' in table and "0.951" in table and "mean · SAE (M=6, K=2)" in table
    assert "&lt;b&gt;arc&lt;/b&gt;" in table and "<b>arc</b>" not in table
    assert "mean · channels" in table and "held-out part AUROC 0.951" in dom
    assert "detects <b>spiral</b> (training images: AUROC 0.91, 0.5 = chance)" in dom
    assert "peak inside the part on 3 of the 6 top examples holding it (chance 25.0%)" in dom  # counts, not a rate


def test_class_filter_keeps_neurons_that_favour_the_class_and_chips_say_which(tmp_path):
    """A class a neuron is seen on with PMI <= 0 is a grey chip, and filtering by it does not list the neuron."""
    from selfexplain.browser import Chromium

    out = tmp_path / "neuron_report"
    records = _fake_report(out)
    records[1]["top_classes"].append({"class": "car", "index": 0, "pmi": -1.07, "p_class_given_on": 0.02,
                                      "lens": 0.0, "knockout": 0.0})  # seen on a car once, against the odds
    artifacts.write_jsonl(out / "neurons.jsonl", records)
    artifacts.write_jsonl(out / "llm_output.jsonl", [
        {"neuron_id": 3, "answer": "offline: zigzag (train AUROC 0.97), lower left", "backend": "offline",
         "model": "offline", "sae_fingerprint": FINGERPRINT}])
    page = report.write_index_html(out)
    with Chromium(1000, 800) as browser:
        browser.goto(page.as_uri())
        browser.evaluate("(() => { const s = document.getElementById('cls'); s.value = 'car';"
                         " s.dispatchEvent(new Event('input')); })()")
        shown = browser.evaluate("[...document.querySelectorAll('article')].map(a => Number(a.dataset.id))")
        browser.evaluate("(() => { const s = document.getElementById('cls'); s.value = '';"
                         " s.dispatchEvent(new Event('input')); })()")
        weak = browser.evaluate("[...document.querySelectorAll('#neuron-1 .chip.weak')].map(c => c.textContent)")
        concept = browser.evaluate("document.querySelector('#neuron-3 .concept').textContent")
        browser.evaluate("(() => { const d = document.getElementById('dead'); d.checked = true;"
                         " d.dispatchEvent(new Event('change')); d.dispatchEvent(new Event('input')); })()")
        dead = browser.evaluate("(c => c ? c.textContent : '')(document.querySelector('#neuron-4 .stats'))")
    # dead on what was summarised: MAX_PER_CLASS samples (it read 'never on in the training images')
    assert dead == "never on in the 10 summarised training images"
    assert sorted(shown) == [0, 2]  # neurons 0 and 2 favour car (PMI 1.2); 1 only met one; 4 is dead
    assert weak == ["car PMI -1.07"]
    assert concept == "zigzag (train AUROC 0.97), lower left offline"  # the backend named once


def _page_with_parts(tmp_path, n=40):
    out = tmp_path / "neuron_report"
    records = _fake_report(out, n=n, dead=(4,))
    for r in records:
        i = r["neuron_id"]
        r["parts"] = {"best_part": "spiral" if i % 3 == 0 else "cross", "auroc": 0.95 if i % 3 == 0 else 0.52,
                      "pointing": 0.5, "pointing_chance": 0.25, "split": "train", "n_examples": 0 if i == 6 else 4}
        r["top_classes"][0]["class"] = "spiral-cross" if i % 2 else "car"  # a class named after parts
        r["auto_summary"] = f"Neuron {i}."
    records[5]["image_frequency"], records[5]["threshold"] = 0.00004, 0.0
    del records[9]["parts"]["n_examples"]  # a report from before the count was recorded
    records[3]["parts"]["distractor_auroc"] = 0.91  # detects spirals where only distractors carry them too
    records[12]["parts"]["distractor_auroc"] = 0.61  # a detector of spiral's classes more than of spirals
    artifacts.write_jsonl(out / "neurons.jsonl", records)
    measures = {"n_train_images": 10, "n_test_images": 4, "counterfactual": {"test_images": 120, "rerenders": 393},
                "codes": {"sae": _measures("SAE", 0.9996, 2), "channels": _measures("channels", 0.995, 7)}}
    for name, row in measures["codes"]["sae"]["per_part"].items():
        row.update(distractor_positives=13 if name == "spiral" else 33, cf_own_n=36, cf_other_n=85)
    artifacts.write_json(out / "summary.json", {"sae_fingerprint": FINGERPRINT, "n_images": 10,
                                                "concept_measures": measures})
    return report.write_index_html(out)


def test_a_linked_card_lands_below_the_sticky_header_and_a_stale_link_keeps_the_filters(tmp_path):
    """The draw page links #neuron-<id>: the card's top was hidden under the header, or off-screen
    when the cards above it were drawn at their estimated height."""
    from selfexplain.browser import Chromium

    page = _page_with_parts(tmp_path)
    with Chromium(1200, 800) as browser:
        browser.goto(page.as_uri() + "#neuron-37")
        browser.wait_for("document.querySelector('.linked') !== null")
        browser.wait_for("new Promise(r => requestAnimationFrame(() => requestAnimationFrame(() => r(true))))")
        head = browser.evaluate("document.querySelector('header').getBoundingClientRect().bottom")
        top = browser.evaluate("document.getElementById('neuron-37').getBoundingClientRect().top")
        browser.evaluate("(() => { const q = document.getElementById('q'); q.value = 'spiral';"
                         " q.dispatchEvent(new Event('input')); location.hash = '#neuron-9999'; })()")
        browser.wait_for("document.getElementById('count').textContent.startsWith('no neuron #9999')")
        kept = browser.evaluate("document.getElementById('q').value")
    assert head <= top < 800 - 100, (head, top)
    assert kept == "spiral"


def test_parts_are_searched_filtered_and_sorted_only_where_a_neuron_detects_them(tmp_path):
    """'spiral' matched every neuron whose favoured classes were named after parts, or whose best part
    was at chance (AUROC 0.52)."""
    from selfexplain.browser import Chromium

    page = _page_with_parts(tmp_path)
    with Chromium(1200, 800) as browser:
        browser.goto(page.as_uri())
        chance = browser.evaluate("document.querySelector('#neuron-1 .parts').textContent")
        none = browser.evaluate("document.querySelector('#neuron-6 .parts').textContent")
        rare = browser.evaluate("document.querySelector('#neuron-5 .stats').textContent")
        older = browser.evaluate("document.querySelector('#neuron-9 .parts').textContent")
        among = browser.evaluate("document.querySelector('#neuron-3 .parts').textContent")
        classes = browser.evaluate("document.querySelector('#neuron-12 .parts').textContent")
        ids = "[...document.querySelectorAll('article')].map(a => Number(a.dataset.id))"
        browser.evaluate("(() => { const q = document.getElementById('q'); q.value = 'cross';"
                         " q.dispatchEvent(new Event('input')); })()")
        by_search = browser.evaluate(ids)
        browser.evaluate("(() => { const q = document.getElementById('q'); q.value = '';"
                         " q.dispatchEvent(new Event('input')); const p = document.getElementById('part');"
                         " p.value = 'spiral'; p.dispatchEvent(new Event('input')); })()")
        by_part = browser.evaluate(ids)
        options = browser.evaluate("[...document.querySelectorAll('#part option')].map(o => o.value)")
        table = browser.evaluate("document.getElementById('heldout-rows').textContent")
        note = browser.evaluate("document.getElementById('heldout-note').textContent")
        facts = browser.evaluate("document.getElementById('facts').textContent")
    spiral = [i for i in range(40) if i % 3 == 0 and i not in (4, 12)]
    assert by_search == [i for i in range(40) if i % 2 and i != 4]  # favoured 'spiral-cross'; never a part at chance
    assert sorted(by_part) == spiral and options == ["", "spiral"]
    assert "no part it detects (best: cross, AUROC 0.52; 0.5 = chance" in chance
    assert "none of its top examples holds it" in none and "?" not in none
    assert "peak inside the part on 50.0% of its examples (chance 25.0%)" in older  # not "none of them"
    assert "detects spiral (training images: AUROC 0.95, 0.5 = chance; among other classes' sketches 0.91)" in among
    assert "fires on the classes that hold spiral more than on the part" in classes and "sketches 0.61" in classes
    assert "among other classes" not in older          # a report from before the figure was recorded: not "?"
    assert "active 0.004%" in rare and "τ 0.00" in rare  # not "0.0%" for a neuron that fires
    assert "0.9996" in table and "1.000" not in table  # not rounded up to a perfect score
    assert "120 test images re-drawn" in note and "(36 images per part)" in note and "13-33 such images" in note
    assert "held-out part AUROC 1.000" not in facts and "against: channels 0.995" in facts
