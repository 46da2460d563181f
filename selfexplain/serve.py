"""The draw-and-explain page: a local HTTP server over the loaded models.

Routes (stdlib :mod:`http.server`, one thread per request, nothing fetched from the network):

* ``GET /``: the drawing page (``static/draw.html``): a canvas for mouse, touch and pen,
  undo, clear, stroke width and an upload button; after each stroke it posts the canvas;
* ``POST /explain``: body = PNG or JPEG bytes; answers the ``why_did_you --json`` object, plus
  ``familiarity``/``unfamiliar``, ``overlay_png`` (the heat overlay, base64 PNG) and
  ``versus_overlay_png`` (the contrast's panel, or null) with ``versus_palette`` (its colours);
  a bad body is a 400 with ``{"error": "..."}``, a body over ``MAX_BODY`` bytes a 413;
* ``GET /atlas/<path>``: ``REPORT_DIR``'s files (the atlas ``index.html``, thumbs,
  sprites), read-only, refusing any path that leaves ``REPORT_DIR`` (``/atlas`` redirects
  to ``/atlas/``);
* ``HEAD`` answers as ``GET`` without the body; other methods get a 405. Every error,
  http.server's own included, is a one-line JSON ``{"error"}``; a refused body is drained
  and its connection closed, so it cannot pose as the next request. Uploads over
  ``MAX_UPLOAD_SIDE`` px on a side are refused on their header, and at most
  ``DECODES_AT_ONCE`` are decoded at a time. Ctrl-C or SIGTERM stops :func:`run_server`.

Models load once, when the server is made, and every model pass is serialised, so
concurrent requests are safe (each request's explanation owns its own tensors). Under
:func:`run_server` (``why_did_you.py --serve=True``) the passes run on the main thread, the
one that loaded the models, and the HTTP handlers only parse and answer: a second thread
running torch next to the main thread's idle OpenMP pool took 30-33% longer per request (99 ms against 74.5-76.4)
here (2 cores), which the page's 100 ms budget cannot spare. :func:`make_server` alone
(tests, embedding) runs the passes in the handler threads under a lock.
"""
from __future__ import annotations

import base64
import json
import mimetypes
import queue
import sys
import threading
import traceback
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

from . import artifacts, explain, familiarity
from .distributed import sigterm_interrupts
from .errors import UserError
from .imaging import BadImage, dark_note, decode_image, png_bytes
from .logs import log

MAX_BODY = 4 * 1024 * 1024              # bytes per upload; larger bodies get a 413
DRAIN_LIMIT = 64 * 1024 * 1024          # a refused body up to this size is read and dropped, so the client sees the 413
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"    # the first 8 bytes of every PNG file
JPEG_SIGNATURE = b"\xff\xd8\xff"          # ... and of every JPEG file (the page sends a photo's own bytes)
FORM_TYPES = ("multipart/form-data", "application/x-www-form-urlencoded")  # what curl -F and -d send
PAGE = Path(__file__).with_name("static") / "draw.html"
# what /atlas/ serves: never the report's other files
ATLAS_FILES = (artifacts.INDEX_HTML, f"{artifacts.THUMBS_DIR}/", f"{artifacts.SPRITES_DIR}/")
REQUEST_TIMEOUT = 30.0                  # seconds a client may stall mid-request before its connection closes
MAX_UPLOAD_SIDE = 4096                  # longest side of an uploaded PNG: a 200 KB 8192x4880 one took 0.7 GB to decode
DECODES_AT_ONCE = 2                     # uploads decoded at the same time (the rest wait): decoding memory stays bounded
OVERLAY_SIZE = 288                      # px of each overlay panel (the page shows two, ~245 CSS px each)


class Stopping(Exception):
    """A queued request the stopping server will not answer (a 503)."""


@dataclass
class Explainer:
    """The loaded models, the familiarity judge (None: no verdict) and the options every request shares."""

    models: explain.Models
    judge: Callable | None
    classifier_ckpt: str
    sae_ckpt: str
    report_dir: str
    options: dict = field(default_factory=dict)   # keyword arguments for explain.explain_images
    lock: threading.Lock = field(default_factory=threading.Lock)
    decoding: threading.Semaphore = field(default_factory=lambda: threading.Semaphore(DECODES_AT_ONCE))
    jobs: queue.Queue | None = None   # set: the passes run where :meth:`work` drains it (run_server: main thread)

    def explain_png(self, payload: bytes, content_type: str = "") -> dict:
        """PNG or JPEG bytes -> the ``--json`` object with familiarity and the overlay; bad bytes raise UserError
        (``content_type``, the request's, only words the message)."""
        if not payload.startswith((PNG_SIGNATURE, JPEG_SIGNATURE)):
            raise UserError(not_an_image(payload, content_type))
        try:
            with self.decoding:
                image = decode_image(payload, self.models.image_size, max_side=MAX_UPLOAD_SIDE)
        except BadImage as exc:
            raise UserError(f"cannot read the image: {exc}") from None
        if self.jobs is None:
            with self.lock:  # one model pass at a time: torch modules are shared, CPU threads are few
                return self.answer(image)
        done: Future = Future()
        self.jobs.put((image, done))
        return done.result()

    def answer(self, image) -> dict:
        """One decoded sketch -> the answer object (the model pass, familiarity, the overlay PNG)."""
        note = dark_note(image, "<upload>")  # named as the page's answers are; the batch below is not noted again
        if note:
            log(note)
        exp = explain.explain_images(image[None], classifier_ckpt=self.classifier_ckpt, sae_ckpt=self.sae_ckpt,
                                     report_dir=self.report_dir, judge=self.judge, **self.options)[0]
        exp.image = "<upload>"
        out = exp.to_dict()
        out["unfamiliar_note"] = explain.unfamiliar_note(exp)
        out["n_classes"] = len(self.models.class_names)  # the page shows the chance rate, 1 / n_classes
        out["overlay_png"] = _png64(explain.render_overlay(image, exp, OVERLAY_SIZE))
        versus = explain.render_versus_overlay(image, exp, OVERLAY_SIZE)  # the contrast's, beside it on the page
        out["versus_overlay_png"] = _png64(versus) if versus is not None else None
        out["versus_palette"] = explain.versus_palette(exp)  # its colours: the page's list shows the same swatches
        return out

    def work(self, stop: threading.Event, poll_s: float = 0.5) -> None:
        """Answer queued requests one at a time on the calling thread until ``stop`` is set.

        A failing request fails only its own future (the handler answers a 400 or a 500 and serves on).
        """
        try:
            while not stop.is_set():
                try:
                    image, done = self.jobs.get(timeout=poll_s)
                except queue.Empty:
                    continue
                try:
                    done.set_result(self.answer(image))
                except Exception as exc:  # noqa: BLE001 (handed to the waiting handler, which reports it)
                    done.set_exception(exc)
                except BaseException:     # Ctrl-C mid-pass: this request fails too, then we stop
                    done.set_exception(Stopping("the server is stopping"))
                    raise
        finally:
            self.fail_pending()

    def fail_pending(self) -> None:
        """Answer every request still queued with an error (the server is stopping)."""
        while True:
            try:
                _, done = self.jobs.get_nowait()
            except queue.Empty:
                return
            done.set_exception(Stopping("the server is stopping"))


def _png64(image) -> str:
    """A PIL image as base64 PNG text; zlib level 1: ~5 ms instead of ~13 ms per overlay here (demo size), for
    a somewhat larger body."""
    return base64.b64encode(png_bytes(image, compress_level=1)).decode("ascii")


def not_an_image(payload: bytes, content_type: str = "") -> str:
    """Why a body that is no PNG or JPEG was refused; a form upload is told how to send the bytes (``curl -F``
    wraps them in a form, ``curl -d`` drops their line breaks: both read "the body must be a PNG or JPEG image"
    for a PNG file)."""
    if not payload:
        return "empty body: send the image's bytes"
    # curl --data-binary sends a file under the urlencoded type too: only a form's body, or a PNG that curl -d
    # stripped of its line breaks, gets the advice to send the bytes; any other file is simply not an image
    if content_type == "multipart/form-data" or (content_type in FORM_TYPES and _form_or_mangled(payload)):
        return (f"the body must be a PNG or JPEG image's own bytes, not a form ({content_type}): send the file as "
                "the body, e.g. curl --data-binary @sketch.png -H 'Content-Type: image/png' URL/explain")
    return "the body must be a PNG or JPEG image (this file is neither)"


def _form_or_mangled(payload: bytes) -> bool:
    """A urlencoded form's ``key=value`` text, or a PNG whose signature lost its line breaks (``curl -d``)."""
    head = payload[:2048]
    return head.startswith(PNG_SIGNATURE[:4]) or (b"=" in head and head.isascii() and b"\0" not in head)


def atlas_file(report_dir: str | Path, url_path: str) -> Path | None:
    """The atlas file under ``report_dir`` that ``/atlas/<url_path>`` names, or None.

    None when it is missing, outside ``report_dir`` or not part of the atlas (``ATLAS_FILES``):
    with ``--host=0.0.0.0`` a report folder's other files (a ``.env`` beside them) stay private.
    """
    root = Path(report_dir).resolve()
    rel = unquote(url_path).lstrip("/") or artifacts.INDEX_HTML
    try:
        target = (root / rel).resolve()
        if not target.is_relative_to(root) or not target.is_file():
            return None
    except (ValueError, OSError):  # a NUL byte, a name too long for the file system
        return None
    inside = target.relative_to(root).as_posix()
    return target if any(inside == name or (name.endswith("/") and inside.startswith(name))
                         for name in ATLAS_FILES) else None


class Handler(BaseHTTPRequestHandler):
    """Routes requests to the server's :class:`Explainer`; every error is a one-line JSON body."""

    server_version = "selfexplain"
    protocol_version = "HTTP/1.1"
    timeout = REQUEST_TIMEOUT  # a stalled body read (Content-Length larger than the body) ends, not a stuck thread

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        path = urlsplit(self.path).path
        if path in ("/", "/index.html"):
            self._send(HTTPStatus.OK, PAGE.read_bytes(), "text/html; charset=utf-8")
        elif path == "/atlas":  # the page's relative image links need the slash
            self._send(HTTPStatus.MOVED_PERMANENTLY, b"", "text/plain", {"Location": "/atlas/"})
        elif path.startswith("/atlas/"):
            target = atlas_file(self.server.explainer.report_dir, path[len("/atlas"):])
            if target is None:
                self._error(HTTPStatus.NOT_FOUND, f"no such atlas file: {path}")
            else:
                kind = mimetypes.guess_type(target.name)[0] or "application/octet-stream"
                self._send(HTTPStatus.OK, target.read_bytes(), kind)
        elif path == "/explain":
            self._refuse(HTTPStatus.METHOD_NOT_ALLOWED, "/explain takes a POST of the image's bytes")
        else:
            self._error(HTTPStatus.NOT_FOUND, f"no such page: {path}")

    do_HEAD = do_GET  # link checkers, proxies: GET's status and headers; _send leaves the body out  # noqa: N815

    def _not_allowed(self) -> None:
        self._refuse(HTTPStatus.METHOD_NOT_ALLOWED, self._not_served())

    def _not_served(self) -> str:
        return f"{self.command} is not served: GET pages, POST /explain"

    do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _not_allowed  # noqa: N815

    def send_error(self, code, message=None, explain=None) -> None:
        """http.server's own errors (bad request line, long URL) as JSON too; a method it has no
        handler for (TRACE, CONNECT, made-up ones: its 501) is a 405, like PUT."""
        if code == HTTPStatus.NOT_IMPLEMENTED:
            code, message = HTTPStatus.METHOD_NOT_ALLOWED, self._not_served()
        self._error(HTTPStatus(code), message or HTTPStatus(code).phrase, close=True)

    def do_POST(self) -> None:  # noqa: N802
        if urlsplit(self.path).path != "/explain":
            self._refuse(HTTPStatus.NOT_FOUND, "POST goes to /explain")
            return
        length = self._body_length()
        if length is None:
            return
        if length > MAX_BODY:
            self._drain(length)
            self._error(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"upload over {MAX_BODY // 2 ** 20} MiB", close=True)
            return
        payload = self.rfile.read(length)
        try:
            result = self.server.explainer.explain_png(payload, self.headers.get_content_type())
        except UserError as exc:
            self._error(HTTPStatus.BAD_REQUEST, str(exc))
            return
        except Stopping as exc:
            self._error(HTTPStatus.SERVICE_UNAVAILABLE, str(exc), close=True)
            return
        except Exception as exc:  # noqa: BLE001 (one failed request must not take the page down)
            log("error: POST /explain failed:\n" + "".join(traceback.format_exception(exc)).rstrip())
            self._error(HTTPStatus.INTERNAL_SERVER_ERROR, f"the explanation failed: {type(exc).__name__}: {exc}")
            return
        self._send(HTTPStatus.OK, json.dumps(result, ensure_ascii=False).encode("utf-8"), "application/json")

    def _body_length(self) -> int | None:
        """The request's Content-Length; None (after answering a 411 or 400) when it has none usable."""
        raw = self.headers.get("Content-Length")
        if raw is None:
            self._error(HTTPStatus.LENGTH_REQUIRED, "send a Content-Length header", close=True)
            return None
        try:
            length = int(raw)
        except ValueError:  # one was sent: "send a Content-Length header" (a 411) misled
            self._error(HTTPStatus.BAD_REQUEST, f"bad Content-Length {raw.strip()[:40]!r}: not a number", close=True)
            return None
        if length < 0:
            self._error(HTTPStatus.BAD_REQUEST, f"bad Content-Length {length}", close=True)
            return None
        return length

    def _refuse(self, status: HTTPStatus, message: str) -> None:
        """Answer without reading the request's body: drained first (a client still sending would
        miss the answer), then the connection closes (it could pose as the next request)."""
        length = self._body_length() if "Content-Length" in self.headers else 0
        if length is not None:
            self._drain(length)
            self._error(status, message, close=True)

    def _drain(self, length: int) -> None:
        """Read and drop a refused body (clients that are still sending would miss the answer)."""
        left = length if length <= DRAIN_LIMIT else 0
        while left > 0 and (chunk := self.rfile.read(min(left, 1 << 20))):
            left -= len(chunk)

    def _error(self, status: HTTPStatus, message: str, close: bool = False) -> None:
        if close:  # the unread body would be parsed as the next request
            self.close_connection = True
        self._send(status, json.dumps({"error": message}).encode("utf-8"), "application/json")

    def _send(self, status: HTTPStatus, body: bytes, content_type: str, headers: dict | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        if status == HTTPStatus.METHOD_NOT_ALLOWED:
            self.send_header("Allow", "GET, HEAD, POST")
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def log_message(self, format: str, *args) -> None:  # noqa: A002 (http.server's signature)
        if not self.server.quiet:
            log(f"{self.address_string()} {format % args}")


class Server(ThreadingHTTPServer):
    """The HTTP server; a client that hangs up mid-request (a closed tab, a reload) is one log line,
    not socketserver's traceback."""

    def handle_error(self, request, client_address) -> None:
        if isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            if not getattr(self, "quiet", False):
                log(f"{client_address[0]} hung up: {sys.exc_info()[1].__class__.__name__}")
            return
        super().handle_error(request, client_address)


def bind(host: str, port: int) -> ThreadingHTTPServer:
    """The listening server on ``host:port``; a bad or taken address is a one-line UserError."""
    if not 0 <= int(port) <= 65535:
        raise UserError(f"PORT must be in 0..65535, got {port}")
    try:
        return Server((host, int(port)), Handler)
    except OSError as exc:  # taken port, unknown host, address not on this machine
        raise UserError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None


def make_server(classifier_ckpt: str, sae_ckpt: str, report_dir: str, cache_dir: str, host: str = "127.0.0.1",
                port: int = 8000, device: str = "auto", quiet: bool = False, data_root: str = "",
                familiar: bool = True, **options) -> ThreadingHTTPServer:
    """Load the models and the familiarity calibration once; return the bound (not yet serving) server.

    ``options`` go to :func:`explain.explain_images` on every request (e.g. ``n_cite``); the page always
    shows a contrast (``versus``: the runner-up unless another class is given);
    ``data_root``: where the classifier's data is now, if it moved (the calibration reads it);
    ``familiar=False`` gives no familiarity verdict (``--familiarity=False``).
    """
    options = {**options, "versus": options.get("versus") or explain.VERSUS_RUNNER_UP}
    explain.ExplainSettings.from_kwargs(options)  # a wrong name fails now, not as a 400 on every request
    server = bind(host, port)  # before the models load: a taken port fails in a second, not after a minute
    try:
        models = explain.relocated(explain.load_models(classifier_ckpt, sae_ckpt, device), data_root)
        explain.versus_index(models, options["versus"])  # an unknown class fails now, not on every request
        explain.require_own_report(models, report_dir)  # another SAE's report fails now, not on every request
        judge = familiarity.verdict_judge(models, report_dir, cache_dir) if familiar else None
    except BaseException:
        server.server_close()
        raise
    server.daemon_threads, server.quiet = True, quiet
    server.explainer = Explainer(models, judge, str(classifier_ckpt), str(sae_ckpt), str(report_dir),
                                 dict(options, device=models.device))
    return server


def run_server(classifier_ckpt: str, sae_ckpt: str, report_dir: str, cache_dir: str, host: str = "127.0.0.1",
               port: int = 8000, device: str = "auto", data_root: str = "", familiar: bool = True,
               **options) -> None:
    """Serve the draw-and-explain page until Ctrl-C or SIGTERM (``why_did_you.py --serve=True``)."""
    server = make_server(classifier_ckpt, sae_ckpt, report_dir, cache_dir, host, port, device, data_root=data_root,
                         familiar=familiar, **options)
    server.explainer.jobs = queue.Queue()
    http_thread = threading.Thread(target=server.serve_forever, name="http", daemon=True)
    http_thread.start()
    host, port = server.server_address[:2]
    log(f"draw-and-explain page on http://{host}:{port}/ (the atlas at /atlas/index.html); Ctrl-C stops")
    try:
        with sigterm_interrupts():  # kill, systemd, docker: stop as Ctrl-C does
            server.explainer.work(threading.Event())  # the model passes, on this (the main) thread
    except KeyboardInterrupt:
        log("stopped")
    finally:
        server.shutdown()
        server.server_close()
