"""The draw-and-explain server: good, bad, oversized and concurrent requests, and the atlas files."""
import base64
import http.client
import io
import json
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

from conftest import ctrl_c_as_in_a_terminal
from selfexplain import artifacts, data, explain, familiarity, serve
from selfexplain.errors import UserError
from selfexplain.imaging import decode_image, png_bytes

CONTRACT = {"image", "predicted_class", "predicted_index", "probability", "top5", "logit", "neurons", "others",
            "bias", "error", "faithfulness", "sentence", "familiarity", "unfamiliar", "overlay_png",
            "versus_overlay_png", "versus_palette"}


@pytest.fixture(scope="module")
def report_dir(tmp_path_factory):
    """A report folder with a stand-in atlas page and one thumbnail, and a secret beside it."""
    folder = tmp_path_factory.mktemp("served") / "neuron_report"
    (folder / artifacts.THUMBS_DIR).mkdir(parents=True)
    (folder / artifacts.INDEX_HTML).write_text("<html><article id='neuron-0'>atlas</article></html>")
    Image.new("RGB", (8, 8), "red").save(folder / artifacts.THUMBS_DIR / "n00000_0.png")
    (folder.parent / "secret.txt").write_text("not for the web")
    (folder / ".env").write_text("OPENAI_API_KEY=sk-not-for-the-web")  # --report_dir=. would put it here
    (folder / "neurons.jsonl").write_text("{}\n")
    return folder


@pytest.fixture(scope="module")
def server(tiny_classifier, tiny_sae, cache_dir, report_dir):
    srv = serve.make_server(str(tiny_classifier / artifacts.BEST_CLASSIFIER), str(tiny_sae / artifacts.BEST_SAE),
                            str(report_dir), str(cache_dir), port=0, device="cpu", quiet=True)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


@pytest.fixture(scope="module")
def sketches(tiny_classifier, cache_dir):
    """Three held-out test sketches as PNG bytes."""
    ckpt = artifacts.load_checkpoint(tiny_classifier / artifacts.BEST_CLASSIFIER, "classifier")
    images = data.load_dataset(ckpt["dataset"], cache_dir, progress=False).images
    return [png_bytes(np.array(images[int(i)])) for i in ckpt["split"]["test"][:3]]


def request(server, method, path, body=None, headers=None):
    """(status, parsed JSON or raw bytes) of one request on a fresh connection."""
    conn = http.client.HTTPConnection(*server.server_address[:2], timeout=60)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        payload = response.read()
        kind = response.getheader("Content-Type", "")
        return response.status, json.loads(payload) if kind.startswith("application/json") else payload
    finally:
        conn.close()


def test_good_png_answers_the_json_contract(server, sketches):
    status, out = request(server, "POST", "/explain", sketches[0], {"Content-Type": "image/png"})
    assert status == 200
    assert CONTRACT <= set(out)
    assert out["predicted_class"] == out["top5"][0]["class"] and len(out["top5"]) == 5
    assert out["n_classes"] == len(server.explainer.models.class_names)  # the page's chance rate
    assert 0 <= out["familiarity"] <= 100 and isinstance(out["unfamiliar"], bool)
    cited = sum(n["contribution"] for n in out["neurons"])
    assert cited + out["others"] + out["bias"] + out["error"] == pytest.approx(out["logit"], abs=1e-3)
    overlay = Image.open(io.BytesIO(base64.b64decode(out["overlay_png"])))
    assert overlay.format == "PNG" and overlay.width >= 64
    # the page also says why not the runner-up: the margin over it, decomposed the same exact way
    versus = out["versus"]
    assert versus["class"] == out["top5"][1]["class"]
    cited = sum(n["contribution"] for n in versus["neurons"])
    assert cited + versus["others"] + versus["bias"] + versus["error"] == pytest.approx(versus["margin"], abs=1e-3)
    panel = Image.open(io.BytesIO(base64.b64decode(out["versus_overlay_png"])))  # where those neurons fired
    assert panel.format == "PNG" and panel.width == overlay.width
    assert len(out["versus_palette"]) == len(versus["neurons"])  # the page's swatches for that panel


@pytest.mark.parametrize("body, reason", [(b"", "empty"), (b"hello, not an image", "PNG"),
                                          (b"\x89PNG\r\n\x1a\n" + b"\0" * 40, "cannot read"),
                                          (b"GIF89a" + b"\0" * 40, "PNG")])
def test_bad_upload_is_a_400_and_the_server_keeps_serving(server, sketches, body, reason):
    status, out = request(server, "POST", "/explain", body)
    assert status == 400
    assert set(out) == {"error"} and reason in out["error"] and "\n" not in out["error"]
    assert request(server, "POST", "/explain", sketches[1])[0] == 200


def test_a_form_upload_is_told_to_send_the_bytes(server, sketches):
    # curl -F wraps the PNG in a form, curl -d drops its line breaks: both read "the body must be a PNG or
    # JPEG image" about a PNG file, with no word of what to send instead
    form = b"--xyz\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.png\"\r\n\r\n" + sketches[0]
    stripped = sketches[0].replace(b"\r", b"").replace(b"\n", b"")
    for body, kind in ((form + b"\r\n--xyz--\r\n", "multipart/form-data; boundary=xyz"),
                       (stripped, "application/x-www-form-urlencoded")):
        status, out = request(server, "POST", "/explain", body, {"Content-Type": kind})
        assert status == 400 and "--data-binary" in out["error"] and "\n" not in out["error"]
    urlencoded = {"Content-Type": "application/x-www-form-urlencoded"}
    status, out = request(server, "POST", "/explain", b"sketch=a.png&x=1", urlencoded)
    assert status == 400 and "not a form" in out["error"]  # curl -d 'sketch=...'
    # a file that is no image, sent as the README says (curl --data-binary: the urlencoded type), is told just that
    status, out = request(server, "POST", "/explain", b"GIF89a" + bytes(range(256)) * 4, urlencoded)
    assert status == 400 and out["error"] == "the body must be a PNG or JPEG image (this file is neither)"
    # the image's own bytes under a form's type (urllib's default for a body) are still read
    assert request(server, "POST", "/explain", sketches[0], {"Content-Type": "application/x-www-form-urlencoded"}
                   )[0] == 200


def test_truncated_png_is_a_400(server, sketches):
    status, out = request(server, "POST", "/explain", sketches[0][: len(sketches[0]) // 2])
    assert status == 400 and "error" in out


def test_oversized_body_is_a_413_unread(server, sketches):
    status, out = request(server, "POST", "/explain", b"\x89PNG\r\n\x1a\n" + b"\0" * serve.MAX_BODY)
    assert status == 413 and "MiB" in out["error"]
    assert request(server, "POST", "/explain", sketches[0])[0] == 200


def test_concurrent_requests_all_succeed_and_agree(server, sketches):
    bodies = [sketches[k % 3] for k in range(8)]
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda b: request(server, "POST", "/explain", b), bodies))
    assert [status for status, _ in answers] == [200] * 8
    serial = [request(server, "POST", "/explain", s)[1] for s in sketches]
    for k, (_, out) in enumerate(answers):
        expected = serial[k % 3]
        assert out["predicted_class"] == expected["predicted_class"]
        assert out["logit"] == pytest.approx(expected["logit"], abs=1e-5)
        assert [n["neuron_id"] for n in out["neurons"]] == [n["neuron_id"] for n in expected["neurons"]]
        assert out["familiarity"] == pytest.approx(expected["familiarity"])


def test_page_is_self_contained(server):
    status, page = request(server, "GET", "/")
    html = page.decode()
    assert status == 200 and "<canvas" in html and "/explain" in html
    assert "http://" not in html and "https://" not in html  # no CDN: nothing to fetch
    assert explain.NO_RANDOM_SET in html  # the page's words for "no random set" are the text's and the overlay's


def test_atlas_files_are_served_and_contained(server):
    status, page = request(server, "GET", "/atlas/index.html")
    assert status == 200 and b"neuron-0" in page
    assert request(server, "GET", "/atlas/")[0] == 200
    status, thumb = request(server, "GET", "/atlas/thumbs/n00000_0.png")
    assert status == 200 and thumb.startswith(b"\x89PNG")
    for escape in ("/atlas/../secret.txt", "/atlas/%2e%2e/secret.txt", "/atlas/..%2fsecret.txt",
                   "/atlas//etc/passwd", "/atlas/thumbs/../../secret.txt", "/atlas/.env", "/atlas/neurons.jsonl",
                   "/atlas/thumbs/../.env"):
        status, out = request(server, "GET", escape)
        assert status == 404, escape
    assert request(server, "GET", "/nowhere")[0] == 404
    assert request(server, "POST", "/atlas/index.html", b"x")[0] == 404
    for odd in ("/atlas/%00", "/atlas/thumbs/" + "a" * 300):  # a NUL byte, a name too long: 404, not a dropped line
        status, out = request(server, "GET", odd)
        assert status == 404 and "no such atlas file" in out["error"]
    status, _ = request(server, "GET", "/atlas")  # its relative image links need the slash
    assert status == 301
    for method in ("PUT", "DELETE", "OPTIONS"):
        status, out = request(server, method, "/explain", b"x")
        assert status == 405 and "POST /explain" in out["error"]
    for method in ("TRACE", "BREW"):  # no do_TRACE: http.server's own 501, answered as the 405 it is
        status, out = request(server, method, "/")
        assert status == 405 and f"{method} is not served" in out["error"]
    status, out = request(server, "GET", "/explain")  # the route exists: the method is what is wrong
    assert status == 405 and "POST" in out["error"]


def test_a_body_sent_to_another_path_is_never_read_as_the_next_request(server):
    """POST /foo with a body: answered 404 and the connection closed, so the body cannot pose as a request;
    a large one is drained first, so the client still sending gets the answer, not a reset."""
    conn = http.client.HTTPConnection(*server.server_address[:2], timeout=30)
    try:
        for body in (b"GET /atlas/index.html HTTP/1.1\r\nHost: x\r\n\r\n", b"x" * (3 << 20)):
            conn.request("POST", "/foo", body=body)
            response = conn.getresponse()
            assert response.status == 404 and response.getheader("Connection") == "close"
            response.read()
        conn.request("GET", "/favicon.ico")  # http.client reconnects: a fresh request, answered for itself
        second = conn.getresponse()
        assert second.status == 404 and b"favicon" in second.read()
    finally:
        conn.close()


def test_head_answers_gets_headers_without_a_body_on_a_kept_alive_connection(server):
    conn = http.client.HTTPConnection(*server.server_address[:2], timeout=30)
    try:
        conn.request("HEAD", "/")
        head = conn.getresponse()
        assert head.status == 200 and head.read() == b""
        conn.request("GET", "/")  # the same connection: the next answer is whole
        page = conn.getresponse()
        assert len(page.read()) == int(head.getheader("Content-Length")) > 0
    finally:
        conn.close()


def test_sigterm_stops_a_server_like_ctrl_c_only_where_a_handler_can_be_set():
    import signal

    from selfexplain.distributed import sigterm_interrupts

    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt):
        with sigterm_interrupts():
            signal.raise_signal(signal.SIGTERM)
    assert signal.getsignal(signal.SIGTERM) is before
    errors = []

    def off_the_main_thread():  # a notebook serving from a thread: no handler, no ValueError
        try:
            with sigterm_interrupts():
                pass
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    thread = threading.Thread(target=off_the_main_thread)
    thread.start()
    thread.join()
    assert errors == []


def test_an_upload_too_wide_to_decode_cheaply_is_refused_on_its_header(server):
    wide = io.BytesIO()
    Image.new("1", (serve.MAX_UPLOAD_SIDE + 1, 8), 1).save(wide, format="PNG")  # a few hundred bytes
    status, out = request(server, "POST", "/explain", wide.getvalue())
    assert status == 400 and f"too large ({serve.MAX_UPLOAD_SIDE + 1}x8)" in out["error"]


def test_queued_passes_run_on_the_working_thread_and_a_failure_is_a_500(tiny_classifier, tiny_sae, cache_dir,
                                                                        report_dir, sketches):
    """run_server's layout: handlers queue the sketches, one thread (there: the main one) runs every pass."""
    import queue

    srv = serve.make_server(str(tiny_classifier / artifacts.BEST_CLASSIFIER), str(tiny_sae / artifacts.BEST_SAE),
                            str(report_dir), str(cache_dir), port=0, device="cpu", quiet=True)
    explainer, stop = srv.explainer, threading.Event()
    explainer.jobs = queue.Queue()
    worker = threading.Thread(target=explainer.work, args=(stop, 0.05), name="passes")
    answer, threads = explainer.answer, set()

    def recorded(image):
        threads.add(threading.current_thread().name)
        if image.min() == 255:  # a blank page stands for a pass that fails
            raise RuntimeError("boom")
        return answer(image)

    explainer.answer = recorded
    http_thread = threading.Thread(target=srv.serve_forever, daemon=True)
    worker.start()
    http_thread.start()
    try:
        with ThreadPoolExecutor(4) as pool:
            results = list(pool.map(lambda body: request(srv, "POST", "/explain", body), sketches * 2))
        assert [status for status, _ in results] == [200] * 6
        assert [r["predicted_class"] for _, r in results[:3]] == [r["predicted_class"] for _, r in results[3:]]
        status, out = request(srv, "POST", "/explain", png_bytes(np.full((64, 64), 255, np.uint8)))
        assert status == 500 and "boom" in out["error"]
        assert request(srv, "POST", "/explain", sketches[0])[0] == 200       # and it serves on
        assert threads == {"passes"}
    finally:
        stop.set()
        worker.join(timeout=10)
        srv.shutdown()
        srv.server_close()
    assert not worker.is_alive()


def test_requests_still_queued_when_the_server_stops_are_refused(server):
    import queue
    from concurrent.futures import Future

    explainer = serve.Explainer(server.explainer.models, server.explainer.judge, "", "", "", jobs=queue.Queue())
    pending = [Future() for _ in range(2)]
    for done in pending:
        explainer.jobs.put((None, done))
    stop = threading.Event()
    stop.set()                                     # stopping before the worker takes them
    explainer.work(stop)
    for done in pending:
        with pytest.raises(serve.Stopping):
            done.result(timeout=1)


@pytest.mark.parametrize("stop", ["SIGINT", "SIGTERM"])  # Ctrl-C; kill, systemd, docker
def test_why_did_you_serve_answers_from_its_main_thread_and_stops_on_ctrl_c(tiny_classifier, tiny_sae, cache_dir,
                                                                          report_dir, sketches, tmp_path, stop):
    """The real ``why_did_you.py --serve=True`` process: port 0, one POST with the --json object, then the signal
    stops it cleanly."""
    import signal
    import subprocess
    import sys
    from pathlib import Path

    from bench import bench_explain

    root = Path(__file__).resolve().parents[1]
    log = (tmp_path / "serve.log").open("w+b")
    proc = subprocess.Popen([sys.executable, str(root / "why_did_you.py"), "--serve=True", "--port=0", "--device=cpu",
                             f"--classifier_ckpt={tiny_classifier / artifacts.BEST_CLASSIFIER}",
                             f"--sae_ckpt={tiny_sae / artifacts.BEST_SAE}", f"--report_dir={report_dir}",
                             f"--cache_dir={cache_dir}"], cwd=root, stdout=subprocess.DEVNULL, stderr=log,
                            preexec_fn=ctrl_c_as_in_a_terminal)
    try:
        port = bench_explain.wait_for_port(proc, log, timeout_s=120)   # the bench's reader of the start-up line
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        conn.request("POST", "/explain", sketches[0], {"Content-Type": "image/png"})
        response = conn.getresponse()
        answer = json.loads(response.read())
        assert response.status == 200 and {"predicted_class", "top_active", "familiarity"} <= set(answer)  # as --json
        conn.close()
        proc.send_signal(getattr(signal, stop))
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    log.seek(0)
    assert b"stopped" in log.read()


@pytest.mark.parametrize("length, status, says", [(b"-5", b"400", b"bad Content-Length -5"),
                                                  (b"abc", b"400", b"bad Content-Length 'abc': not a number"),
                                                  (None, b"411", b"send a Content-Length header")])
def test_a_bad_content_length_closes_the_connection(server, length, status, says):
    """Its body would otherwise be read as the next request on the kept-alive connection. One that is not a
    number is a 400 that says so (it was a 411 asking for the header that had been sent)."""
    import socket

    header = b"" if length is None else b"Content-Length: " + length + b"\r\n"
    with socket.create_connection(server.server_address[:2], timeout=30) as sock:
        sock.sendall(b"POST /explain HTTP/1.1\r\nHost: x\r\n" + header + b"\r\n"
                     b"GET /atlas/index.html HTTP/1.1\r\nHost: x\r\n\r\n")
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    assert received.startswith(b"HTTP/1.1 " + status) and received.count(b"HTTP/1.1 ") == 1
    assert says in received


def test_an_unknown_versus_class_fails_at_start_not_on_every_request(tiny_classifier, tiny_sae, cache_dir, tmp_path):
    with pytest.raises(UserError, match="VERSUS must be"):
        serve.make_server(str(tiny_classifier / "best.pt"), str(tiny_sae / "best_sae.pt"), str(tmp_path),
                          str(cache_dir), port=0, quiet=True, versus="no such class")


def test_without_a_verdict_the_page_answers_null_and_another_sae_report_still_fails_at_start(
        tiny_classifier, tiny_sae, cache_dir, sketches, tmp_path, monkeypatch):
    """--familiarity=False (and a validation split too small to calibrate) serve answers without a verdict; the
    report check that the calibration used to make still refuses another SAE's report before serving."""
    clf, sae = str(tiny_classifier / artifacts.BEST_CLASSIFIER), str(tiny_sae / artifacts.BEST_SAE)
    srv = serve.make_server(clf, sae, str(tmp_path), str(cache_dir), port=0, device="cpu", quiet=True, familiar=False)
    try:
        assert srv.explainer.judge is None and not (tmp_path / artifacts.FAMILIARITY).exists()
        out = srv.explainer.answer(decode_image(sketches[0], 64))
        assert (out["familiarity"], out["unfamiliar"], out["unfamiliar_note"]) == (None, None, None)
    finally:
        srv.server_close()
    other = tmp_path / "other"
    other.mkdir()
    artifacts.write_json(other / artifacts.SUMMARY, {"sae_fingerprint": "another sae"})
    monkeypatch.setattr(familiarity, "MIN_VAL_IMAGES", 10 ** 6)  # no calibration is fitted to check it
    for familiar in (True, False):
        with pytest.raises(UserError, match="another SAE"):
            serve.make_server(clf, sae, str(other), str(cache_dir), port=0, device="cpu", quiet=True,
                              familiar=familiar)


def test_a_taken_port_is_a_one_line_error_before_any_model_loads(server, tmp_path):
    from selfexplain.errors import UserError

    host, port = server.server_address[:2]
    with pytest.raises(UserError, match=f"cannot listen on {host}:{port}"):  # not "run train_standard_cnn.py"
        serve.make_server(str(tmp_path / "none.pt"), str(tmp_path / "none_sae.pt"), str(tmp_path), str(tmp_path),
                          host=host, port=port)
    with pytest.raises(UserError, match="PORT must be in 0..65535"):
        serve.bind(host, 99999)
    with pytest.raises(UserError, match="unknown explanation setting 'n_site'"):  # not a 400 on every request
        serve.make_server(str(tmp_path / "none.pt"), str(tmp_path / "none_sae.pt"), str(tmp_path), str(tmp_path),
                          host=host, port=0, n_site=3)


def test_a_jpeg_upload_reads_as_the_command_line_reads_the_file(server, sketches, tmp_path):
    """The page sends a photo's own bytes (a phone's 4032 px JPEG re-encoded as PNG was over 4 MiB)."""
    from selfexplain import explain

    jpeg = tmp_path / "photo.jpg"
    Image.open(io.BytesIO(sketches[0])).resize((640, 480)).convert("RGB").save(jpeg, quality=90)
    status, out = request(server, "POST", "/explain", jpeg.read_bytes(), {"Content-Type": "image/jpeg"})
    direct = explain.explain_images([str(jpeg)], server.explainer.classifier_ckpt, server.explainer.sae_ckpt,
                                    server.explainer.report_dir, device="cpu")[0]
    assert status == 200 and out["predicted_class"] == direct.predicted_class
    assert out["probability"] == pytest.approx(direct.probability, abs=1e-5)


def test_a_blank_page_is_flagged_and_gets_no_input_check(server):
    """Nothing to white out: the check read '0% of the ink ... lowers the logit by -0.000'."""
    status, out = request(server, "POST", "/explain", png_bytes(np.full((64, 64), 255, np.uint8)))
    assert status == 200 and out["blank"] is True and "blank page" in out["sentence"]
    assert out["faithfulness"]["input_cited_drop"] is None and out["faithfulness"]["ink_removed"] is None
    status, out = request(server, "POST", "/explain", png_bytes(np.full((64, 64), 200, np.uint8)))  # grey: ink
    assert status == 200 and "blank" not in out and out["faithfulness"]["input_cited_drop"] is not None


def test_a_client_that_hangs_up_is_one_log_line_not_a_traceback(server, capsys):
    for gone in (ConnectionResetError(104, "Connection reset by peer"), BrokenPipeError(32, "Broken pipe")):
        try:
            raise gone
        except OSError:
            server.quiet = False
            try:
                server.handle_error(None, ("10.0.0.7", 5000))
            finally:
                server.quiet = True
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("10.0.0.7 hung up") == 2
    try:
        raise ValueError("a real bug")
    except ValueError:
        server.handle_error(None, ("10.0.0.7", 5000))  # anything else keeps socketserver's traceback
    assert "ValueError: a real bug" in capsys.readouterr().err


def test_a_dark_upload_is_noted_once_under_its_own_name(server, sketches, capsys):
    """Walkthrough (session 23): the server logged the note as '<array>', from a second decode of the upload."""
    dark = 255 - np.asarray(Image.open(io.BytesIO(sketches[0])).convert("L"))
    capsys.readouterr()
    status, _ = request(server, "POST", "/explain", png_bytes(dark), {"Content-Type": "image/png"})
    notes = [line for line in capsys.readouterr().err.splitlines() if "dark strokes on white paper" in line]
    assert status == 200 and len(notes) == 1 and notes[0].startswith("note: <upload> is ")
