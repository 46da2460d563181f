"""A real HTTP server on 127.0.0.1 that speaks what the official LLM clients use.

* OpenAI chat completions: ``GET /v1/models``, ``POST /v1/chat/completions``.
* Replicate predictions: ``POST /v1/models/{owner}/{name}/predictions`` and
  ``POST /v1/predictions`` (honouring ``Prefer: wait=N``), ``GET /v1/predictions/{id}``,
  ``POST /v1/predictions/{id}/cancel``.

Each request's neuron is read from the prompt ("Neuron #12"); a ``script(api, neuron_id,
attempt)`` decides the reply (:class:`Reply`). Every request is logged, and
:meth:`FakeLLMServer.answered` counts the answers actually delivered per neuron. Models
named in ``reasoning_models`` answer as OpenAI's reasoning models do: 400
``unsupported_parameter`` for ``max_tokens`` and ``unsupported_value`` for a temperature
other than 1, with the same body as the real API.

Usage::

    with FakeLLMServer(token="sk-...", script=lambda api, nid, attempt: Reply(text="wheel")) as srv:
        ...  # srv.openai_url / srv.replicate_url
"""
from __future__ import annotations

import base64
import json
import re
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

NEURON = re.compile(r"Neuron #(\d+)")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@dataclass
class Reply:
    """What the server does with one request.

    kind : ``ok`` (answer ``text``), ``status`` (HTTP ``status`` with ``headers`` and
        ``detail``), ``slow`` (answer after ``delay`` s; on replicate the prediction runs
        that long), ``hold`` (keep the request open until :meth:`FakeLLMServer.release`,
        then close it unanswered), ``html`` (openai: HTTP 200 with ``text`` as an HTML page,
        what a login proxy or a wrong path answers), ``json`` (openai: HTTP 200 with ``body``
        as the whole response, e.g. a proxy's ``{"error": ...}``).
    code : openai ``status`` replies: the error's ``code`` (e.g. ``insufficient_quota``).
    finish : openai ``ok`` replies: the choice's ``finish_reason`` (``length``: cut at the token limit).
    """

    kind: str = "ok"
    text: str = "round wheel with spokes"
    status: int = 200
    headers: dict = field(default_factory=dict)
    detail: str = "server error"
    delay: float = 0.0
    code: str = ""
    finish: str = "stop"
    body: dict | None = None


def default_script(api: str, neuron_id: int | None, attempt: int) -> Reply:
    return Reply(text=f"Concept: shape number {neuron_id}")


class FakeLLMServer:
    """Serve on an ephemeral port in a background thread; see the module docstring."""

    def __init__(self, token: str | None = None, script: Callable[[str, int | None, int], Reply] | None = None,
                 model_id: str | list = "fake-vision-1", max_wait: float = 60.0, reasoning_models: tuple = (),
                 refusal_delay: float = 0.0, create_latency: float = 0.0):
        self.token, self.script, self.model_id = token, script or default_script, model_id
        self.reasoning_models = set(reasoning_models)
        self.refusal_delay = refusal_delay  # a reasoning model's 400 comes this late (requests pile up in flight)
        self.max_wait = max_wait  # Replicate holds a `Prefer: wait` request at most this long
        self.create_latency = create_latency  # a create's answer comes this much later (a slow network or server)
        self.log: list[dict] = []  # one entry per request
        self.attempts: Counter = Counter()  # (api, neuron) -> requests seen
        self.predictions: dict[str, dict] = {}
        self.lock = threading.Lock()
        self._release = threading.Event()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(self))
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    # ------------------------------------------------------------------ lifecycle
    def __enter__(self) -> "FakeLLMServer":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
        self.httpd.shutdown()
        self.httpd.server_close()

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    @property
    def openai_url(self) -> str:
        return self.base + "/v1"

    @property
    def replicate_url(self) -> str:
        return self.base

    def release(self) -> None:
        """Let held requests go (they close without an answer)."""
        self._release.set()

    # ------------------------------------------------------------------ bookkeeping
    def record(self, **entry) -> dict:
        with self.lock:
            self.log.append(entry)
        return entry

    def next_attempt(self, api: str, neuron_id: int | None) -> int:
        with self.lock:
            self.attempts[(api, neuron_id)] += 1
            return self.attempts[(api, neuron_id)]

    def answered(self) -> Counter:
        """How many answers were delivered, per neuron."""
        with self.lock:
            return Counter(e["neuron_id"] for e in self.log if e.get("answered"))

    def held(self) -> int:
        with self.lock:
            return sum(1 for e in self.log if e.get("held"))

    def requests(self, api: str | None = None) -> list[dict]:
        with self.lock:
            return [e for e in self.log if api is None or e["api"] == api]


def _count_pngs(urls: list[str]) -> int:
    """Images that are data: URLs holding a real PNG."""
    count = 0
    for url in urls:
        head, _, payload = str(url).partition(",")
        if head == "data:image/png;base64" and base64.b64decode(payload).startswith(PNG_MAGIC):
            count += 1
    return count


def _reasoning_refusal(body: dict) -> dict | None:
    """The 400 body OpenAI sends a reasoning model for ``max_tokens`` or a temperature other than 1."""
    if "max_tokens" in body:
        return {"error": {"message": "Unsupported parameter: 'max_tokens' is not supported with this model. "
                                     "Use 'max_completion_tokens' instead.", "type": "invalid_request_error",
                          "param": "max_tokens", "code": "unsupported_parameter"}}
    if body.get("temperature", 1) != 1:
        return {"error": {"message": f"Unsupported value: 'temperature' does not support {body['temperature']} "
                                     "with this model. Only the default (1) value is supported.",
                          "type": "invalid_request_error", "param": "temperature", "code": "unsupported_value"}}
    return None


def _make_handler(server: FakeLLMServer):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):  # keep test output clean
            pass

        # -------------------------------------------------------------- plumbing
        def _body(self) -> dict:
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            return json.loads(raw) if raw else {}

        def _send(self, status: int, payload: dict | str, headers: dict | None = None) -> bool:
            html = isinstance(payload, str)
            data = payload.encode() if html else json.dumps(payload).encode()
            try:
                self.send_response(status)
                self.send_header("Content-Type", "text/html" if html else "application/json")
                self.send_header("Content-Length", str(len(data)))
                for key, value in (headers or {}).items():
                    self.send_header(key, str(value))
                self.end_headers()
                self.wfile.write(data)
                self.wfile.flush()
                return True
            except (BrokenPipeError, ConnectionResetError):
                return False

        def _authorised(self, api: str) -> bool:
            if server.token is None or self.headers.get("Authorization") == f"Bearer {server.token}":
                return True
            server.record(api=api, path=self.path, neuron_id=None, status=401)
            body = {"detail": "Unauthenticated", "status": 401} if api == "replicate" else \
                {"error": {"message": "Incorrect API key provided", "type": "invalid_request_error"}}
            self._send(401, body)
            return False

        def _hold(self) -> None:
            server._release.wait(timeout=30)
            self.close_connection = True

        # -------------------------------------------------------------- routes
        def do_GET(self):
            if self.path == "/v1/models":
                if self._authorised("openai"):
                    ids = [server.model_id] if isinstance(server.model_id, str) else server.model_id
                    self._send(200, {"object": "list", "data": [
                        {"id": i, "object": "model", "created": 0, "owned_by": "test"} for i in ids]})
            elif m := re.fullmatch(r"/v1/predictions/(\w+)", self.path):
                if self._authorised("replicate"):
                    with server.lock:
                        nid = server.predictions.get(m.group(1), {}).get("neuron_id")
                    server.record(api="replicate", path=self.path, neuron_id=nid, status=200, poll=True)
                    self._send_prediction(m.group(1))
            else:
                self._send(404, {"detail": "not found"})

        def do_POST(self):
            body = self._body()
            if self.path == "/v1/chat/completions":
                if self._authorised("openai"):
                    self._chat(body)
            elif m := re.fullmatch(r"/v1/models/([\w.-]+)/([\w.-]+)/predictions", self.path):
                if self._authorised("replicate"):
                    self._create_prediction(body, f"{m.group(1)}/{m.group(2)}")
            elif self.path == "/v1/predictions":
                if self._authorised("replicate"):
                    self._create_prediction(body, "community/model")
            elif m := re.fullmatch(r"/v1/predictions/(\w+)/cancel", self.path):
                with server.lock:
                    pred = server.predictions.get(m.group(1))
                    if pred and pred["status"] not in ("succeeded", "failed"):
                        pred["status"] = "canceled"
                server.record(api="replicate", path=self.path, neuron_id=pred and pred["neuron_id"], status=200)
                self._send_prediction(m.group(1))
            else:
                self._send(404, {"detail": "not found"})

        # -------------------------------------------------------------- openai
        def _chat(self, body: dict) -> None:
            content = body["messages"][-1]["content"]
            parts = content if isinstance(content, list) else [{"type": "text", "text": content}]
            text = " ".join(p.get("text", "") for p in parts if p.get("type") == "text")
            images = _count_pngs([p["image_url"]["url"] for p in parts if p.get("type") == "image_url"])
            nid = int(m.group(1)) if (m := NEURON.search(text)) else None
            attempt = server.next_attempt("openai", nid)
            reply = server.script("openai", nid, attempt)
            entry = dict(api="openai", path=self.path, neuron_id=nid, attempt=attempt, images=images,
                         model=body.get("model"), system=body["messages"][0]["content"], text=text,
                         params={k: v for k, v in body.items() if k not in ("model", "messages")},
                         auth=self.headers.get("Authorization"))
            refusal = _reasoning_refusal(body) if body.get("model") in server.reasoning_models else None
            if refusal:
                time.sleep(server.refusal_delay)
                server.record(**entry, status=400)
                return self._send(400, refusal)
            if reply.kind == "hold":
                server.record(**entry, held=True)
                return self._hold()
            if reply.kind == "status":
                server.record(**entry, status=reply.status)
                error = {"message": reply.detail, "type": "server_error", **({"code": reply.code} if reply.code else {})}
                return self._send(reply.status, {"error": error}, reply.headers)
            if reply.kind == "json":
                server.record(**entry, status=200)
                return self._send(200, reply.body)
            if reply.kind == "html":
                server.record(**entry, status=200)
                return self._send(200, f"<html><body><h1>{reply.text}</h1></body></html>")
            time.sleep(reply.delay)
            payload = {"id": "chatcmpl-" + uuid.uuid4().hex[:8], "object": "chat.completion", "created": int(time.time()),
                       "model": body.get("model"), "choices": [{"index": 0, "finish_reason": reply.finish,
                       "message": {"role": "assistant", "content": reply.text}}],
                       "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}
            entry = server.record(**entry, status=200, answered=reply.kind == "ok")  # counted before it is sent,
            if not self._send(200, payload):  # so a client never holds an answer the count lacks
                with server.lock:
                    entry["answered"] = False

        # -------------------------------------------------------------- replicate
        def _create_prediction(self, body: dict, model: str) -> None:
            inp = body.get("input", {})
            prompt = str(inp.get("prompt", ""))
            nid = int(m.group(1)) if (m := NEURON.search(prompt)) else None
            attempt = server.next_attempt("replicate", nid)
            reply = server.script("replicate", nid, attempt)
            urls = ([inp["image"]] if "image" in inp else []) + list(inp.get("images", []))
            entry = dict(api="replicate", path=self.path, neuron_id=nid, attempt=attempt, images=_count_pngs(urls),
                         model=model, version=body.get("version"), prefer=self.headers.get("Prefer"), input=inp)
            if reply.kind == "hold":
                server.record(**entry, held=True)
                return self._hold()
            if reply.kind == "status":
                server.record(**entry, status=reply.status)
                return self._send(reply.status, {"detail": reply.detail, "status": reply.status}, reply.headers)
            pid = uuid.uuid4().hex[:12]
            with server.lock:
                server.predictions[pid] = dict(id=pid, model=model, version=body.get("version") or "v1", input=inp,
                                               neuron_id=nid, text=reply.text, status="starting",
                                               ready_at=time.monotonic() + reply.delay, answered=False)
            server.record(**entry, status=201, prediction=pid)
            wait = re.fullmatch(r"wait(?:=(\d+))?", self.headers.get("Prefer", "") or "")
            if wait:  # Prefer: wait holds the request until done or N seconds pass
                time.sleep(min(reply.delay, float(wait.group(1) or 60), server.max_wait))
            time.sleep(server.create_latency)
            self._send_prediction(pid, status=201)

        def _send_prediction(self, pid: str, status: int = 200) -> None:
            with server.lock:
                pred = server.predictions.get(pid)
                if pred is None:
                    return self._send(404, {"detail": "Not found", "status": 404})
                if pred["status"] == "starting" and time.monotonic() >= pred["ready_at"]:
                    pred["status"] = "succeeded"
                done = pred["status"] == "succeeded"
                first_delivery = done and not pred["answered"]
                if first_delivery:  # counted before it is sent (see _chat)
                    pred["answered"] = True
                    entry = dict(api="replicate", path=self.path, neuron_id=pred["neuron_id"], status=status,
                                 answered=True)
                    server.log.append(entry)
                payload = dict(id=pid, model=pred["model"], version=pred["version"], input=pred["input"],
                               status=pred["status"], logs="", error=None, metrics={},
                               output=re.findall(r"\S+\s*", pred["text"]) if done else None,  # streamed tokens
                               created_at="2025-01-01T00:00:00Z", started_at=None, completed_at=None,
                               urls={"get": f"{server.base}/v1/predictions/{pid}",
                                     "cancel": f"{server.base}/v1/predictions/{pid}/cancel"})
            if not self._send(status, payload) and first_delivery:
                with server.lock:
                    entry["answered"] = pred["answered"] = False

    return Handler
