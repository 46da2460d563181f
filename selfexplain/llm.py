"""LLM backends that name a neuron's concept, and the prompt and answer handling around them.

Four backends share one interface, :class:`Backend` (``ask(system, text, images)``):

* ``replicate``: the official ``replicate`` client against the predictions API
  (``POST /v1/models/{owner}/{name}/predictions`` with ``Prefer: wait``, then
  ``GET /v1/predictions/{id}`` polling). Token from ``REPLICATE_API_TOKEN`` (environment
  or a ``.env`` file); base URL from the argument, ``REPLICATE_API_BASE_URL`` or
  ``REPLICATE_BASE_URL``. A model ``owner/name:version`` runs a community model by version.
* ``openai``: any OpenAI-compatible chat-completions server (OpenAI, vLLM, Ollama,
  llama.cpp) through the official ``openai`` client; ``OPENAI_BASE_URL`` / ``OPENAI_API_KEY``.
* ``offline``: no network; answers with a deterministic fallback built by the caller.
* ``auto``: replicate if its token is set, else openai if its settings are, else offline.

Retries live here, not in the clients (both clients' own retries are switched off), so
their number and timing are predictable: 429, 5xx, timeouts, connection errors and
malformed answers are retried with exponential backoff and jitter, honouring
``Retry-After``; 401/403/404 are fatal (they would fail every request the same way).
Secrets never leave this module: every error message is scrubbed of them.
"""
from __future__ import annotations

import base64
import hashlib
import io
import math
import os
import random
import re
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

from .errors import UserError

BACKENDS = ("auto", "replicate", "openai", "offline")
BACKOFF = 1.0  # base of the exponential backoff in seconds (tests set it small)
MAX_BACKOFF = 60.0  # longest single wait between attempts, Retry-After included
POLL_INTERVAL = 0.5  # seconds between replicate polls (at most a tenth of the timeout)
OPENAI_MAX_TOKENS = 200  # room for a short answer, and for a reasoning model's preamble
TEMPERATURE = 0.0  # labels should not change from run to run
PROMPT_DIR = Path(__file__).with_name("prompts")
OUTPUT_NAME = "llm_output.jsonl"  # stage 4's output in REPORT_DIR (contract)

# Defaults when MODEL is "". Replicate's models endpoint serves "official" models by
# name; community models (e.g. "yorickvp/llava-13b") need "owner/name:version".
DEFAULT_MODELS = {
    ("replicate", True): "anthropic/claude-4-sonnet",  # official, takes one `image`
    ("replicate", False): "meta/meta-llama-3-70b-instruct",  # official, text only
    ("openai", True): "gpt-4o-mini",  # takes image_url parts
    ("openai", False): "gpt-4o-mini",
}
# How known replicate models take their inputs: (image field, system prompt field).
# "image" gets one PNG tiling all thumbnails, "images" a list; "" means not accepted.
REPLICATE_INPUTS = {
    "anthropic/claude-4-sonnet": ("image", "system_prompt"),
    "anthropic/claude-3.7-sonnet": ("image", "system_prompt"),
    "meta/meta-llama-3-70b-instruct": ("", "system_prompt"),
    "meta/meta-llama-3-8b-instruct": ("", "system_prompt"),
    "yorickvp/llava-13b": ("image", ""),
    "yorickvp/llava-v1.6-34b": ("image", ""),
}
IMAGE_INPUTS = ("auto", "image", "images", "none")
NO_KEY = "no-key"  # sent to local OpenAI-compatible servers, which ignore the key
_SECRET_PATTERNS = [re.compile(r"r8_[A-Za-z0-9]{16,}"), re.compile(r"sk-[A-Za-z0-9_\-]{16,}")]


# ----------------------------------------------------------------------------- errors
class LLMError(Exception):
    """A request that failed for good. ``fatal``: every later request would fail too."""

    def __init__(self, message: str, status: int | None = None, fatal: bool = False):
        super().__init__(message)
        self.status, self.fatal = status, fatal


class TransientError(LLMError):
    """Worth retrying: rate limit, server error, timeout, lost connection."""

    def __init__(self, message: str, status: int | None = None, retry_after: float | None = None):
        super().__init__(message, status)
        self.retry_after = retry_after


class MalformedAnswer(LLMError):
    """The server answered, but not with something usable; retried like a transient error."""


def _status_error(status: int, detail: str, retry_after: float | None = None) -> LLMError:
    """Map an HTTP error status to the error class that decides what happens next."""
    message = f"HTTP {status}: {detail}".strip().rstrip(":")
    if status == 429 or status >= 500:
        return TransientError(message, status, retry_after)
    return LLMError(message, status, fatal=status in (401, 403, 404))


def parse_retry_after(value: str | None) -> float | None:
    """Seconds from a ``Retry-After`` header (the seconds form); None if absent or unreadable."""
    try:
        seconds = float(str(value).strip())
    except (TypeError, ValueError):
        return None
    return seconds if math.isfinite(seconds) and seconds >= 0 else None


def scrub(text: str, secrets: Iterable[str] = ()) -> str:
    """``text`` with every secret (and anything shaped like an API token) replaced by ``***``."""
    text = str(text)
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    for pattern in _SECRET_PATTERNS:
        text = pattern.sub("***", text)
    return text


# ----------------------------------------------------------------------------- answers
_THINK = re.compile(r"<think>.*?(</think>|$)", re.S | re.I)
_PREFIX = re.compile(r"^(final answer|answer|concept|label|the concept is|this neuron detects|neuron)\s*[:\-–]\s*",
                     re.I)
_REFUSAL = re.compile(r"^(i'?m sorry|i am sorry|sorry,|i cannot|i can'?t|as an ai)", re.I)


def clean_text(raw: str) -> str:
    """Strip reasoning blocks, code fences and whitespace; an empty answer is malformed."""
    text = _THINK.sub("", str(raw or "")).replace("```", "").strip()
    if not text:
        raise MalformedAnswer("empty answer")
    return text


def _clean_line(line: str) -> str:
    line = re.sub(r"[*_`#>]+", "", line).strip()  # markdown emphasis, headings, quotes
    line = re.sub(r"^(\d+[.)]|[-•])\s+", "", line)  # list markers
    for _ in range(3):  # "Answer: Concept: ..." peels twice
        line = _PREFIX.sub("", line).strip()
    line = line.strip(" \t\"'“”‘’«»")
    return line.rstrip(".;:,!").strip(" \"'“”‘’")


def parse_concept(raw: str, max_words: int = 12) -> str:
    """The concept in a model's answer: first meaningful line, decorations removed, cut to words.

    Raises
    ------
    MalformedAnswer
        Nothing left, no letters, mostly symbols, or a refusal.
    """
    text = clean_text(raw)
    line = next((c for c in (_clean_line(ln) for ln in text.splitlines()) if c), "")
    words = line.split()
    if len(words) > max_words:
        line = " ".join(words[:max_words]).rstrip(".;:,!-–")
    letters = sum(ch.isalpha() for ch in line)
    if letters < 2 or letters < 0.4 * len(line.replace(" ", "")) or _REFUSAL.match(line):
        raise MalformedAnswer(f"unusable answer {raw[:80]!r}")
    return line


# ----------------------------------------------------------------------------- prompts
def load_prompt(name: str) -> str:
    """The text of ``prompts/<name>.txt`` in this package."""
    path = PROMPT_DIR / f"{name}.txt"
    if not path.is_file():
        raise UserError(f"prompt file {path} not found")
    return path.read_text(encoding="utf-8")


def prompt_version() -> str:
    """A short hash of the concept prompts, recorded with each answer."""
    digest = hashlib.sha256()
    for name in ("system_prompt", "neuron_prompt"):
        digest.update(load_prompt(name).encode())
    return digest.hexdigest()[:8]


def system_prompt(max_words: int = 12) -> str:
    return load_prompt("system_prompt").replace("{max_words}", str(max_words)).strip()


def _class_name(entry: dict) -> str:
    return str(entry.get("class") or f"class {entry.get('index', '?')}")


def _fmt(value, spec: str, scale: float = 1.0) -> str:
    return "?" if value is None else format(scale * value, spec)


def neuron_prompt(neuron: dict, max_words: int = 12, attached: Sequence[dict] = ()) -> str:
    """The user message for one neuron: its statistics with class names, and its examples.

    ``attached`` are the ``top_examples`` entries whose thumbnails go with the message, in
    order; the message tells the model what each shows.
    """
    tops = [f"- {_class_name(c)}: PMI {_fmt(c.get('pmi'), '+.2f')}; {_fmt(c.get('p_class_given_on'), '.0f', 100)}%; "
            f"lens {_fmt(c.get('lens'), '+.2f')}" for c in neuron.get("top_classes", [])[:5]]
    antis = [f"- {_class_name(c)}: PMI {_fmt(c.get('pmi'), '+.2f')}" for c in neuron.get("anti_classes", [])[:3]]
    if attached:
        listed = "; ".join(f"{i + 1}. {e.get('class', '?')} ({_fmt(e.get('activation'), '.2f')})"
                           for i, e in enumerate(attached))
        shown = (f"The attached image{'s show' if len(attached) > 1 else ' shows'} its strongest sketches "
                 f"(in this order; left to right, top to bottom when tiled): {listed}.")
    else:
        listed = ", ".join(f"{e.get('class', '?')} ({_fmt(e.get('activation'), '.2f')})"
                           for e in neuron.get("top_examples", [])[:8])
        shown = f"Its strongest sketches are of: {listed}." if listed else ""
    where = neuron.get("where") or {}
    return load_prompt("neuron_prompt").format(
        neuron_id=neuron["neuron_id"],
        frequency=_fmt(neuron.get("frequency"), ".2f", 100) + "%",
        mean_on=_fmt(neuron.get("mean_on_activation"), ".3g"),
        top_classes="\n".join(tops) or "- none",
        anti_classes="\n".join(antis) or "- none",
        where=where.get("description") or "anywhere",
        auto_summary=neuron.get("auto_summary") or "none",
        examples=shown,
        max_words=max_words,
    ).strip()


PART_AUROC = 0.8  # offline labels name a ground-truth part when a neuron detects it this well


def offline_label(neuron: dict, max_words: int = 12) -> str:
    """A deterministic concept from the statistics alone, marked ``offline:``.

    Example: ``"offline: strokes typical of wheel/bicycle, lower left"``; on data with
    ground-truth parts (the synthetic set), a neuron that detects one part well is named
    after it: ``"offline: spiral (part AUROC 0.92), upper right"``.
    """
    classes = [_class_name(c) for c in neuron.get("top_classes", [])[:2]]
    core = f"strokes typical of {'/'.join(classes)}" if classes else "strokes without a class preference"
    part = neuron.get("parts") or {}
    if part.get("best_part") and part.get("auroc", 0) >= PART_AUROC:  # data with ground-truth parts
        core = f"{part['best_part']} (part AUROC {part['auroc']:.2f})"
    where = (neuron.get("where") or {}).get("description") or ""
    label = f"{core}, {where}" if where else core
    return "offline: " + " ".join(label.split()[:max_words])


# ----------------------------------------------------------------------------- images
def png_bytes(path: str | os.PathLike) -> bytes:
    """A thumbnail re-encoded as PNG (whatever it was stored as)."""
    from PIL import Image

    with Image.open(path) as img:
        buf = io.BytesIO()
        img.convert("RGB" if img.mode not in ("L", "RGB") else img.mode).save(buf, format="PNG")
    return buf.getvalue()


def tile_png(paths: Sequence[str | os.PathLike], cell: int = 224) -> bytes:
    """Several thumbnails tiled into one PNG (for models that take a single image)."""
    from PIL import Image

    cols = math.ceil(math.sqrt(len(paths)))
    rows = math.ceil(len(paths) / cols)
    canvas = Image.new("L", (cols * cell + cols - 1, rows * cell + rows - 1), color=128)  # grey grid lines
    for i, path in enumerate(paths):
        with Image.open(path) as img:
            tile = img.convert("L").resize((cell, cell))
        canvas.paste(tile, ((i % cols) * (cell + 1), (i // cols) * (cell + 1)))
    buf = io.BytesIO()
    canvas.save(buf, format="PNG")
    return buf.getvalue()


def data_url(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


# ----------------------------------------------------------------------------- backends
@dataclass
class Answer:
    """One parsed answer: ``text`` (parsed), ``raw`` (as received), how many ``attempts``."""

    text: str
    raw: str
    attempts: int
    images: int = 0


def _sleep(seconds: float) -> None:  # one place to wait, so tests can watch the waits
    time.sleep(seconds)


def _notice(message: str) -> None:
    """A one-line notice on stderr (stdout may carry JSON for a caller)."""
    from tqdm import tqdm

    tqdm.write(message, file=sys.stderr)


class Backend:
    """Base class: the retry loop around one backend-specific request.

    Attributes
    ----------
    name : ``"replicate"``, ``"openai"`` or ``"offline"``.
    model : the model asked.
    accepts_images : whether ``ask`` sends the images it is given.
    """

    name = "base"
    accepts_images = False

    def __init__(self, model: str, timeout: float = 60.0, retries: int = 4, backoff: float = BACKOFF,
                 seed: int | None = None, secrets: Iterable[str] = ()):
        self.model, self.timeout, self.retries, self.backoff, self.seed = model, timeout, retries, backoff, seed
        self._secrets = [s for s in secrets if s]
        self._rng = random.Random(seed)

    def scrub(self, text: str) -> str:
        """``text`` without this backend's secrets."""
        return scrub(text, self._secrets)

    def ask(self, system: str, text: str, images: Sequence[str | os.PathLike] = (), **kwargs) -> str:
        """Ask once (with retries) and return the parsed answer text; see :meth:`ask_detailed`."""
        return self.ask_detailed(system, text, images, **kwargs).text

    def ask_detailed(self, system: str, text: str, images: Sequence[str | os.PathLike] = (),
                     parse: Callable[[str], str] | None = None, fallback: str | None = None) -> Answer:
        """Send ``system`` + ``text`` (+ ``images``), retrying transient failures.

        Parameters
        ----------
        parse : turns the raw answer into the result; raises :class:`MalformedAnswer` to retry.
            Default :func:`clean_text`.
        fallback : what the offline backend answers (other backends ignore it).

        Raises
        ------
        LLMError
            After ``retries + 1`` attempts, or at once for a non-retryable error. The
            message is scrubbed of secrets.
        """
        parse = parse or clean_text
        images = [Path(p) for p in images] if self.accepts_images else []
        last: LLMError | None = None
        for attempt in range(self.retries + 1):
            try:
                raw = self.scrub(self._request(system, text, images, fallback))  # an echoed token stops here
                return Answer(parse(raw), raw, attempt + 1, len(images))
            except MalformedAnswer as exc:  # asking again may help; no need to wait
                last, delay = exc, 0.0
            except TransientError as exc:
                last = exc
                delay = exc.retry_after if exc.retry_after is not None else self._backoff(attempt)
            except LLMError as exc:
                raise LLMError(self.scrub(str(exc)), exc.status, exc.fatal) from None
            if attempt < self.retries:
                _sleep(min(delay, MAX_BACKOFF))
        raise LLMError(self.scrub(f"gave up after {self.retries + 1} attempts: {last}"), last.status) from None

    def _backoff(self, attempt: int) -> float:
        """Exponential backoff with jitter (0.5x to 1.5x) so parallel workers spread out."""
        return min(MAX_BACKOFF, self.backoff * 2 ** attempt) * (0.5 + self._rng.random())

    def _request(self, system: str, text: str, images: list[Path], fallback: str | None) -> str:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(model={self.model!r})"


class OfflineBackend(Backend):
    """No network: answers with the caller's ``fallback``, else the text's first line."""

    name = "offline"

    def __init__(self, **kwargs):
        super().__init__(model="offline", **kwargs)

    def _request(self, system, text, images, fallback):
        if fallback:
            return fallback
        first = next((ln.strip() for ln in str(text).splitlines() if ln.strip()), "")
        return "offline: " + first


class OpenAIBackend(Backend):
    """Any OpenAI-compatible chat-completions server, through the official client."""

    name = "openai"
    accepts_images = True

    def __init__(self, model: str, base_url: str | None, api_key: str, images: bool = True, **kwargs):
        import openai

        super().__init__(model=model, secrets=[api_key] if api_key != NO_KEY else [], **kwargs)
        self.accepts_images = images
        # max_retries=0: the retry loop is ours, so attempts and waits are what we say
        self.client = openai.OpenAI(base_url=base_url or None, api_key=api_key, max_retries=0, timeout=self.timeout)
        if not self.model:
            self.model = self._served_model() or DEFAULT_MODELS[("openai", images)]

    def _served_model(self) -> str:
        """The model a self-hosted server (vLLM, llama.cpp, Ollama) serves, when it lists one."""
        if "api.openai.com" in str(self.client.base_url):
            return ""
        try:
            names = [m.id for m in self.client.models.list()]
        except Exception as exc:  # noqa: BLE001  any failure: fall back to the default name
            _notice(f"could not list models at {self.client.base_url} ({type(exc).__name__}); using the default")
            return ""
        if len(names) > 1:  # picking one at random would surprise: ask instead
            listed = ", ".join(names[:8])
            raise UserError(f"{self.client.base_url} serves several models; set MODEL to one of: {listed}")
        return names[0] if names else ""

    def _request(self, system, text, images, fallback):
        import openai

        content: str | list = text
        if images:
            content = [{"type": "text", "text": text}] + [
                {"type": "image_url", "image_url": {"url": data_url(png_bytes(p))}} for p in images]
        messages = [{"role": "system", "content": system}, {"role": "user", "content": content}]
        extra = {} if self.seed is None else {"seed": self.seed}
        try:
            resp = self.client.chat.completions.create(
                model=self.model, messages=messages, temperature=TEMPERATURE, max_tokens=OPENAI_MAX_TOKENS, **extra)
        except openai.APITimeoutError:
            raise TransientError(f"timed out after {self.timeout:g}s") from None
        except openai.APIConnectionError as exc:
            raise TransientError(f"connection error: {exc}") from None
        except openai.APIStatusError as exc:
            retry_after = parse_retry_after(exc.response.headers.get("retry-after"))
            raise _status_error(exc.status_code, str(exc.message), retry_after) from None
        except (openai.APIResponseValidationError, ValueError) as exc:
            raise MalformedAnswer(f"unreadable response: {exc}") from None
        choices = getattr(resp, "choices", None)
        if not choices or not getattr(choices[0].message, "content", None):
            raise MalformedAnswer("no answer in the response")
        return choices[0].message.content


class ReplicateBackend(Backend):
    """Replicate's predictions API through the official client (its own retries off)."""

    name = "replicate"

    def __init__(self, model: str, base_url: str | None, api_token: str, images: bool = True,
                 image_input: str = "auto", **kwargs):
        import httpx
        import replicate
        from replicate.client import RetryTransport

        super().__init__(model=model or DEFAULT_MODELS[("replicate", images)], secrets=[api_token], **kwargs)
        self.image_field, self.system_field = self._input_layout(images, image_input)
        self.accepts_images = bool(self.image_field)
        self._local = threading.local()  # Retry-After of this thread's last response
        self.client = replicate.Client(
            api_token=api_token, base_url=base_url or None,
            timeout=httpx.Timeout(self.timeout, connect=min(10.0, self.timeout)),
            event_hooks={"response": [self._remember_headers]})
        transport = self.client._client._transport  # the client wraps every transport in retries
        if isinstance(transport, RetryTransport):
            transport.max_attempts = 1  # ours decide instead, and see every 429 and its Retry-After

    def _input_layout(self, images: bool, image_input: str) -> tuple[str, str]:
        known = REPLICATE_INPUTS.get(self.model.split(":")[0])
        image_field, system_field = known or ("", "system_prompt")
        if image_input in ("image", "images"):
            image_field = image_input
        elif image_input == "none" or not images:
            image_field = ""
        elif known is None and images:
            _notice(f"replicate model {self.model} is not known to take images; sending text only "
                    f"(set IMAGE_INPUT=image or images to attach thumbnails)")
        return image_field, system_field

    def _remember_headers(self, response) -> None:
        self._local.retry_after = response.headers.get("retry-after")

    def _input(self, system: str, text: str, images: list[Path]) -> dict:
        if self.system_field:
            payload = {"prompt": text, self.system_field: system}
        else:  # the model takes no system prompt: it leads the prompt instead
            payload = {"prompt": f"{system}\n\n{text}"}
        if images and self.image_field == "image":
            payload["image"] = data_url(tile_png(images)) if len(images) > 1 else data_url(png_bytes(images[0]))
        elif images:
            payload["images"] = [data_url(png_bytes(p)) for p in images]
        return payload  # no seed: most replicate models do not declare one, and reject unknown inputs

    def _request(self, system, text, images, fallback):
        import httpx
        from replicate.exceptions import ReplicateError

        self._local.retry_after = None
        try:
            return self._run(self._input(system, text, images))
        except ReplicateError as exc:
            retry_after = parse_retry_after(self._local.retry_after)
            raise _status_error(exc.status or 0, exc.detail or exc.title or "", retry_after) from None
        except httpx.TimeoutException:
            raise TransientError(f"timed out after {self.timeout:g}s") from None
        except httpx.TransportError as exc:
            raise TransientError(f"connection error: {type(exc).__name__}: {exc}") from None
        except ValueError as exc:  # JSON that is not a prediction
            raise MalformedAnswer(f"unreadable response: {exc}") from None

    def _run(self, payload: dict) -> str:
        """Create a prediction (waiting up to the timeout on the server), poll until done."""
        deadline = time.monotonic() + self.timeout
        wait = max(1, min(60, int(math.ceil(self.timeout))))  # Replicate accepts 1..60 s
        ref, _, version = self.model.partition(":")
        if version:  # community models run by version id
            pred = self.client.predictions.create(version=version, input=payload, wait=wait)
        else:
            pred = self.client.models.predictions.create(model=ref, input=payload, wait=wait)
        while pred.status not in ("succeeded", "failed", "canceled"):
            if time.monotonic() >= deadline:
                self._cancel(pred.id)
                raise TransientError(f"timed out after {self.timeout:g}s (prediction {pred.status})")
            _sleep(min(POLL_INTERVAL, self.timeout / 10))
            pred.reload()
        if pred.status != "succeeded":
            raise TransientError(f"prediction {pred.status}: {pred.error or 'no reason given'}")
        output = pred.output
        if isinstance(output, list):  # language models stream tokens: a list of strings
            output = "".join(str(t) for t in output)
        if not isinstance(output, str):
            raise MalformedAnswer(f"output is {type(output).__name__}, not text")
        return output

    def _cancel(self, prediction_id: str) -> None:
        """Best effort: a timed-out prediction should not keep running (and billing)."""
        try:
            self.client.predictions.cancel(prediction_id)
        except Exception:  # noqa: BLE001  the timeout is what gets reported
            pass


# ----------------------------------------------------------------------------- factory
def _load_dotenv() -> None:
    """Read a ``.env`` file from the working folder or above; the environment wins."""
    from dotenv import find_dotenv, load_dotenv

    path = find_dotenv(usecwd=True)
    if path:
        load_dotenv(path, override=False)


def make_backend(name: str = "auto", model: str = "", base_url: str = "", timeout: float = 60.0,
                 retries: int = 4, *, images: bool = True, image_input: str = "auto",
                 backoff: float = BACKOFF, seed: int | None = None) -> Backend:
    """Build a backend from its name and the environment.

    Parameters
    ----------
    name : ``auto`` | ``replicate`` | ``openai`` | ``offline``. ``auto`` picks replicate when
        ``REPLICATE_API_TOKEN`` is set, else openai when ``OPENAI_API_KEY``,
        ``OPENAI_BASE_URL`` or ``base_url`` is, else offline (with a one-line notice).
    model : model name; ``""`` picks :data:`DEFAULT_MODELS` (openai on a self-hosted
        server: the model it serves; a :class:`UserError` when it lists several).
    base_url : API base URL; ``""`` reads ``REPLICATE_API_BASE_URL`` / ``OPENAI_BASE_URL``.
    timeout, retries, backoff : per-request timeout (s), extra attempts, backoff base (s).
    images : send thumbnails where the model takes them.
    image_input : replicate only: ``auto`` (known models), ``image``, ``images`` or ``none``.
    seed : passed to the model where it takes one, and seeds the jitter.
    """
    if name not in BACKENDS:
        raise UserError(f"BACKEND must be one of {', '.join(BACKENDS)}, got {name!r}")
    if image_input not in IMAGE_INPUTS:
        raise UserError(f"IMAGE_INPUT must be one of {', '.join(IMAGE_INPUTS)}, got {image_input!r}")
    if timeout <= 0 or retries < 0:
        raise UserError(f"TIMEOUT must be > 0 and RETRIES >= 0, got {timeout}, {retries}")
    _load_dotenv()
    env = os.environ
    if name == "auto":
        name = ("replicate" if env.get("REPLICATE_API_TOKEN")
                else "openai" if env.get("OPENAI_API_KEY") or env.get("OPENAI_BASE_URL") or base_url
                else "offline")
        if name == "offline":
            _notice("no REPLICATE_API_TOKEN, OPENAI_API_KEY or OPENAI_BASE_URL set: "
                    "using the offline backend (labels from statistics, no LLM)")
    common = dict(timeout=timeout, retries=retries, backoff=backoff, seed=seed)
    if name == "offline":
        return OfflineBackend(**common)
    if name == "replicate":
        token = env.get("REPLICATE_API_TOKEN", "")
        if not token:
            raise UserError("BACKEND=replicate needs REPLICATE_API_TOKEN (environment or .env file)")
        url = base_url or env.get("REPLICATE_API_BASE_URL") or env.get("REPLICATE_BASE_URL") or ""
        return ReplicateBackend(model, url, token, images=images, image_input=image_input, **common)
    url = base_url or env.get("OPENAI_BASE_URL", "")
    key = env.get("OPENAI_API_KEY", "")
    if not key and not url:
        raise UserError("BACKEND=openai needs OPENAI_API_KEY, or OPENAI_BASE_URL for a local server")
    # local servers (vLLM, Ollama, llama.cpp) accept any key, but the client insists on one
    return OpenAIBackend(model, url, key or NO_KEY, images=images, **common)


def load_concepts(report_dir: str | os.PathLike) -> dict[int, str]:
    """``{neuron_id: concept}`` from ``llm_output.jsonl`` (the last answer per neuron wins).

    A missing file gives ``{}``; a torn last line is ignored.
    """
    from .artifacts import read_jsonl

    concepts = {}
    for record in read_jsonl(Path(report_dir) / OUTPUT_NAME):
        if isinstance(record.get("neuron_id"), int) and isinstance(record.get("answer"), str):
            concepts[record["neuron_id"]] = record["answer"]
    return concepts
