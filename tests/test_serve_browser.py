"""The draw page in headless Chromium: strokes drawn with pointer events bring up the explanation.

Fails (does not skip) without Chromium: CI installs it (Debian: ``apt-get install -y chromium``).
"""
import math
import re
import threading

import pytest

from selfexplain import artifacts, serve
from selfexplain.browser import Chromium, find_chromium

CANVAS = "document.getElementById('pad').getBoundingClientRect()"


@pytest.fixture(scope="module")
def url(tiny_classifier, tiny_sae, cache_dir, tmp_path_factory):
    report = tmp_path_factory.mktemp("browser_report")
    (report / artifacts.INDEX_HTML).write_text("<html><body>atlas</body></html>")
    fingerprint = artifacts.load_checkpoint(tiny_sae / artifacts.BEST_SAE, "sae")["fingerprint"]
    artifacts.write_jsonl(report / artifacts.LLM_OUTPUT, [  # the offline backend's labels for every neuron
        {"neuron_id": i, "answer": f"offline: part{i} (train AUROC 0.90), anywhere in the sketch",
         "backend": "offline", "model": "offline", "sae_fingerprint": fingerprint} for i in range(64)])
    srv = serve.make_server(str(tiny_classifier / artifacts.BEST_CLASSIFIER), str(tiny_sae / artifacts.BEST_SAE),
                            str(report), str(cache_dir), port=0, device="cpu", quiet=True)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield "http://%s:%d/" % srv.server_address[:2]
    srv.shutdown()
    srv.server_close()


def test_chromium_is_installed():
    assert find_chromium(), "chromium is missing: apt-get install -y chromium (CI installs it)"


def test_drawing_strokes_shows_the_explanation(url):
    with Chromium(1100, 800) as browser:
        browser.goto(url)
        box = browser.evaluate(f"(r => [r.left, r.top, r.width])({CANVAS})")
        left, top, side = box

        def at(u, v):  # canvas fractions -> viewport pixels
            return left + u * side, top + v * side

        # a circle with the mouse
        circle = [at(0.5 + 0.3 * math.cos(t / 10), 0.5 + 0.3 * math.sin(t / 10)) for t in range(64)]
        browser.stroke(circle, "mouse")
        browser.wait_for("document.body.dataset.explained >= 1")
        first = browser.evaluate("document.getElementById('prediction').textContent")
        assert first and "%" in first
        # spokes with a pen and a touch: every stroke posts again and the answer is redrawn
        browser.stroke([at(0.5, 0.2), at(0.5, 0.8)], "pen")
        browser.stroke([at(0.2, 0.5), at(0.8, 0.5)], "touch")
        browser.wait_for("document.body.dataset.explained >= 2 && !document.getElementById('status').textContent")
        page = browser.evaluate("""({
            top5: document.querySelectorAll('#top5 li').length,
            links: [...document.querySelectorAll('#concepts a')].map(a => a.getAttribute('href')),
            overlay: document.getElementById('overlay').naturalWidth,
            versus_overlay: document.getElementById('versus_overlay').naturalWidth,
            ink: (() => { const c = document.getElementById('pad'), d = c.getContext('2d')
                          .getImageData(0, 0, c.width, c.height).data; let n = 0;
                          for (let i = 0; i < d.length; i += 4) n += d[i] < 128; return n; })(),
        })""")
        assert page["top5"] == 5
        # the familiarity verdict is said either way: the warning when flagged, else how familiar it is
        flagged, familiar = browser.evaluate("[document.getElementById('warning').className === 'on', "
                                             "document.getElementById('familiar').textContent]")
        assert flagged != familiar.startswith("Familiarity: more familiar than ")
        assert browser.evaluate("document.getElementById('chance').textContent").startswith("(chance ")
        pct = re.search(r"const pct=(.*?);  //", serve.PAGE.read_text()).group(1)  # the page's own formatter
        assert browser.evaluate(f"[0.996, 0.9999, 1, 0.46, 0.083, 0.0004, 0].map({pct})") == \
            ["99.6%", ">99.9%", "100%", "46%", "8.3%", "<0.1%", "0.0%"]
        assert page["links"] and all(h.startswith("/atlas/index.html#neuron-") for h in page["links"])
        # offline labels read as their part, the whole label on hover, and the page says once where names came from
        names = browser.evaluate("[...document.querySelectorAll('#concepts a')].map(a => [a.textContent, a.title])")
        assert all(text == f"part{h.split('-')[-1]}" and title.startswith(f"offline: {text} (train AUROC")
                   for (text, title), h in zip(names, page["links"]))
        assert browser.evaluate("document.getElementById('names').textContent").startswith("Names from the statistics")
        assert page["overlay"] > 0 and page["versus_overlay"] > 0 and page["ink"] > 500
        # why this class rather than the runner-up, in the page's words
        top5 = browser.evaluate("[...document.querySelectorAll('#top5 li')].map(li => li.firstChild.textContent.trim())")
        versus = browser.evaluate("document.getElementById('versus').textContent")
        assert versus.startswith(f"{top5[0]} rather than {top5[1]} (")
        listed = browser.evaluate("[...document.querySelectorAll('#versus_concepts li')].length")
        assert listed >= 1 and page["versus_overlay"] > 0  # the contrast's concepts, listed with their swatches
        head = browser.evaluate("(h => h.hidden ? '' : h.textContent)(document.getElementById('versus_head'))")
        assert head.startswith(f"Rather than {top5[1]} because of")  # its own heading: not a second 'Because of'
        # undo removes the last stroke and explains again; clear empties the page
        count = browser.evaluate("Number(document.body.dataset.explained)")
        browser.evaluate("document.getElementById('undo').click()")
        browser.wait_for(f"document.body.dataset.explained > {count}")
        browser.evaluate("document.getElementById('clear').click()")
        assert browser.evaluate("document.getElementById('prediction').textContent") == ""
        assert browser.evaluate("document.getElementById('versus').textContent") == ""
        assert not browser.evaluate("document.getElementById('versus_overlay').getAttribute('src')")
        assert browser.evaluate("document.getElementById('versus_concepts').innerHTML") == ""
        assert browser.evaluate("document.getElementById('versus_head').hidden")
        assert browser.evaluate("document.getElementById('familiar').textContent") == ""


def test_an_answer_that_arrives_after_clear_is_not_shown(url):
    """Clear while a request is in flight: the late answer belongs to an erased drawing."""
    with Chromium(1100, 800) as browser:
        browser.goto(url)
        browser.evaluate("(() => { const f = window.fetch; window.fetch = (...a) => "
                         "new Promise(r => setTimeout(() => r(f(...a)), 800)); })()")  # every answer arrives late
        left, top, side = browser.evaluate(f"(r => [r.left, r.top, r.width])({CANVAS})")
        browser.stroke([(left + 0.2 * side, top + 0.5 * side), (left + 0.8 * side, top + 0.5 * side)], "mouse")
        browser.evaluate("document.getElementById('clear').click()")
        browser.wait_for("new Promise(r => setTimeout(() => r(true), 2500))")
        assert browser.evaluate("document.getElementById('prediction').textContent") == ""
        assert not browser.evaluate("document.body.dataset.explained")


def test_an_upload_is_explained_as_the_file_itself(url, tmp_path, tiny_classifier, cache_dir):
    """The page sends an upload at its own size: the answer is the one a direct POST of the file gets."""
    import http.client
    import json

    import numpy as np
    from PIL import Image

    from selfexplain import data

    ckpt = artifacts.load_checkpoint(tiny_classifier / artifacts.BEST_CLASSIFIER, "classifier")
    image = np.array(data.load_dataset(ckpt["dataset"], cache_dir, progress=False).images[int(ckpt["split"]["test"][0])])
    path = tmp_path / "upload.png"
    Image.fromarray(image).save(path)
    host, port = url.split("//")[1].rstrip("/").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    conn.request("POST", "/explain", path.read_bytes(), {"Content-Type": "image/png"})
    direct = json.loads(conn.getresponse().read())
    conn.close()
    with Chromium(1100, 800) as browser:
        browser.goto(url)
        root = browser.call("DOM.getDocument")["root"]["nodeId"]
        node = browser.call("DOM.querySelector", {"nodeId": root, "selector": "#file"})["nodeId"]
        browser.call("DOM.setFileInputFiles", {"nodeId": node, "files": [str(path)]})
        browser.wait_for("document.body.dataset.explained >= 1")
        shown = browser.evaluate("document.getElementById('prediction').textContent")
        here = browser.evaluate("[...document.querySelectorAll('#concepts li')].map(li => li.textContent)")
    p = direct["probability"]
    assert shown == f"{direct['predicted_class']} ({100 * p:.{1 if p < 0.1 else 0}f}%)"  # the page's rounding
    assert all("here: " in line for line in here) and len(here) == len(direct["neurons"])
