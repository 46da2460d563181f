"""LLM backends: one interface, :class:`Backend` (``ask(system, text, images)``), three servers.

* ``replicate``: the official ``replicate`` client against the predictions API
  (``POST /v1/models/{owner}/{name}/predictions``, then ``GET /v1/predictions/{id}``
  polling). Token ``REPLICATE_API_TOKEN``; base URL from the
  argument, ``REPLICATE_API_BASE_URL`` or ``REPLICATE_BASE_URL``. A model
  ``owner/name:version`` runs a community model by version.
* ``openai``: any OpenAI-compatible chat-completions server (OpenAI, vLLM, Ollama,
  llama.cpp) through the official ``openai`` client; ``OPENAI_BASE_URL`` / ``OPENAI_API_KEY``.
* ``offline``: no network; answers with a deterministic fallback built by the caller.

:func:`make_backend` builds one; ``auto`` starts a paid backend only when its token is a
real environment variable (a ``.env`` file in the current folder is read for explicit
backends only), and says which backend it picked and why.

Retries: the clients retry HTTP failures themselves, ``retries`` times (openai: 408, 409,
429, 5xx, timeouts and lost connections, honouring ``Retry-After``, ``retry-after-ms`` and
HTTP dates; replicate: polls on the same statuses, creates only on 429 and 503 (a create answered
otherwise may have started a paid prediction), ``Retry-After`` in seconds, and httpx retries failed
connections). This module retries only what they cannot see: answers that do not
parse, and replicate predictions that failed or outlasted the timeout. Secrets never leave
this module: every error message and answer is scrubbed of them.
"""
from __future__ import annotations

import base64
import contextlib
import io
import math
import os
import random
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence
from urllib.parse import urlsplit, urlunsplit

from dotenv import dotenv_values
from PIL import Image

from .config import register_choices, require_choice
from .errors import UserError
from .logs import log
from .prompts import OFFLINE_PREFIX, MalformedAnswer, clean_text, ends_inside_think

BACKENDS = register_choices("BACKEND", ("auto", "replicate", "openai", "offline"))
POLL_INTERVAL = 0.5  # seconds between replicate polls (at most a tenth of the timeout)
OPENAI_MAX_TOKENS = 200  # room for a short answer
REASONING_MAX_TOKENS = 4000  # reasoning models spend hidden tokens before the answer, from the same budget
TEMPERATURE = 0.0  # labels should not change from run to run
# OpenAI's reasoning families refuse `max_tokens` and any temperature but the default
REASONING_MODEL = re.compile(r"(^|/)(o\d|gpt-5)", re.I)
RETRY_STATUSES = frozenset({408, 409, 429, 500, 502, 503, 504})  # what the openai client retries too
# A replicate create (POST) that failed with a 5xx may still have started a paid prediction:
# only a refusal (rate limit, overloaded) is sure to have run nothing and is sent again.
CREATE_RETRY_STATUSES = frozenset({429, 503})
REPLICATE_MODEL = re.compile(r"[\w.-]+/[\w.-]+(?::[\w.-]+)?")  # owner/name or owner/name:version
BUSY_STATUSES = frozenset({408, 409, 429, 503})  # timeouts, conflicts, rate limits, overloaded: try later
FATAL_STATUSES = (401, 403, 404)  # every later request would fail the same way
TOKEN_VARS = ("REPLICATE_API_TOKEN", "OPENAI_API_KEY")  # settings that start paid calls

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
IMAGE_INPUTS = register_choices("IMAGE_INPUT", ("auto", "image", "images", "none"))
NO_KEY = "no-key"  # sent to local OpenAI-compatible servers, which ignore the key
_SECRET_PATTERNS = [re.compile(r"r8_[A-Za-z0-9]{16,}"), re.compile(r"sk-[A-Za-z0-9_\-]{16,}")]


# ----------------------------------------------------------------------------- errors
class LLMError(Exception):
    """A request that failed for good. ``fatal``: every later request would fail too;
    ``slow``: it ran out of time; ``unreachable``: no connection was made (nothing listens there, an
    unknown host; fatal too); :attr:`busy`: the server is busy (slow, rate limits, overloaded), not wrong."""

    def __init__(self, message: str, status: int | None = None, fatal: bool = False, slow: bool = False,
                 unreachable: bool = False):
        super().__init__(message)
        self.status, self.fatal, self.slow, self.unreachable = status, fatal or unreachable, slow, unreachable

    @property
    def busy(self) -> bool:
        return self.slow or self.status in BUSY_STATUSES


class TransientError(LLMError):
    """Failed this time in a way no client retries (a replicate prediction failed or ran out of time)."""


def _lost_connection(base_url: str, exc: BaseException) -> LLMError:
    """A request that failed below HTTP (after the client's retries): ``unreachable`` when no connection was
    made (a ConnectError of httpx, or of the httpx fork the openai client wraps), else a lost connection that a
    later request may not meet."""
    for error in (exc, exc.__cause__):  # openai raises APIConnectionError from its HTTP library's error
        if error is not None and any(k.__name__ == "ConnectError" for k in type(error).__mro__):
            return LLMError(f"cannot connect to {base_url} ({error or type(error).__name__})", unreachable=True)
    return LLMError(f"connection lost: {exc.__cause__ or exc}")


def _status_error(status: int, detail: str) -> LLMError:
    """The final error for an HTTP status (the client has already retried what it retries)."""
    return LLMError(f"HTTP {status}: {detail}".strip().rstrip(":"), status, fatal=status in FATAL_STATUSES)


def _error_text(error) -> str:
    return str(error.get("message") or error) if isinstance(error, dict) else str(error)


def public_url(url: str) -> str:
    """``url`` without its ``user:password@`` part (up to the last ``@``), query and fragment
    (``?api-key=...``), so it can be logged and stored."""
    parts = urlsplit(str(url))
    return scrub(urlunsplit((parts.scheme, parts.netloc.rpartition("@")[2], parts.path, "", "")))


def scrub(text: str, secrets: Iterable[str] = ()) -> str:
    """``text`` with every secret (and anything shaped like an API token) replaced by ``***``."""
    text = str(text)
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    for pattern in _SECRET_PATTERNS:
        text = pattern.sub("***", text)
    return text


# ----------------------------------------------------------------------------- images
def png_bytes(path: str | os.PathLike) -> bytes:
    """A thumbnail re-encoded as PNG (whatever it was stored as)."""
    with Image.open(path) as img:
        buf = io.BytesIO()
        img.convert("RGB" if img.mode not in ("L", "RGB") else img.mode).save(buf, format="PNG")
    return buf.getvalue()


def tile_png(paths: Sequence[str | os.PathLike], cell: int = 224) -> bytes:
    """Several thumbnails tiled into one PNG (for models that take a single image)."""
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
    """One parsed answer: ``text`` (parsed), ``raw`` (as received, scrubbed), ``attempts`` (answers asked for)."""

    text: str
    raw: str
    attempts: int
    images: int = 0


class Backend:
    """Base class: asks again when an answer does not parse (the clients retry HTTP failures).

    Attributes
    ----------
    name : ``"replicate"``, ``"openai"`` or ``"offline"``.
    model : the model asked.
    accepts_images : whether ``ask`` sends the images it is given.
    base_url : the server asked ('' offline), without any user:password part, query or
        fragment (:func:`public_url`), for the records.
    """

    name = "base"
    accepts_images = False
    base_url = ""

    def __init__(self, model: str, timeout: float = 60.0, retries: int = 4, backoff: float = 1.0,
                 seed: int | None = None, secrets: Iterable[str] = ()):
        self.model, self.timeout, self.retries, self.backoff, self.seed = model, timeout, retries, backoff, seed
        self._secrets = [s for s in secrets if s]
        self._rng = random.Random(seed)

    def scrub(self, text: str) -> str:
        """``text`` without this backend's secrets."""
        return scrub(text, self._secrets)

    def ask(self, system: str, text: str, images: Sequence[str | os.PathLike] = (), **kwargs) -> str:
        """Ask and return the parsed answer text; see :meth:`ask_detailed`."""
        return self.ask_detailed(system, text, images, **kwargs).text

    def ask_detailed(self, system: str, text: str, images: Sequence[str | os.PathLike] = (),
                     parse: Callable[[str], str] | None = None, fallback: str | None = None) -> Answer:
        """Send ``system`` + ``text`` (+ ``images``); ask again while the answer is unusable.

        Parameters
        ----------
        parse : turns the raw answer into the result; raises :class:`MalformedAnswer` to ask
            again. Default :func:`prompts.clean_text`.
        fallback : what the offline backend answers (other backends ignore it).

        Raises
        ------
        LLMError
            After ``retries + 1`` unusable answers, or at once for an HTTP failure the client
            gave up on. The message is scrubbed of secrets.
        """
        parse = parse or clean_text
        images = [Path(p) for p in images] if self.accepts_images else []
        last: Exception | None = None
        for attempt in range(self.retries + 1):
            try:
                raw = self.scrub(self._request(system, text, images, fallback))  # an echoed token stops here
                return Answer(parse(raw), raw, attempt + 1, len(images))
            except MalformedAnswer as exc:  # asking again may help; no need to wait
                last = exc
            except TransientError as exc:
                last = exc
                if attempt < self.retries:
                    time.sleep(self._backoff(attempt))
            except LLMError as exc:
                raise LLMError(self.scrub(str(exc)), exc.status, exc.fatal, exc.slow, exc.unreachable) from None
        raise LLMError(self.scrub(f"gave up after {self.retries + 1} attempts: {last}"),
                       getattr(last, "status", None), slow=getattr(last, "slow", False)) from None

    def _backoff(self, attempt: int) -> float:
        """Exponential backoff with jitter (0.5x to 1.5x) so parallel workers spread out."""
        return self.backoff * 2 ** attempt * (0.5 + self._rng.random())

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
        return OFFLINE_PREFIX + first


class OpenAIBackend(Backend):
    """Any OpenAI-compatible chat-completions server, through the official client."""

    name = "openai"
    accepts_images = True

    def __init__(self, model: str, base_url: str | None, api_key: str, images: bool = True, **kwargs):
        import openai  # lazy: a network client, loaded only when this backend is used

        super().__init__(model=model, secrets=[api_key] if api_key != NO_KEY else [], **kwargs)
        self.accepts_images = images
        self.client = openai.OpenAI(base_url=base_url or None, api_key=api_key, max_retries=self.retries,
                                    timeout=self.timeout)
        self.base_url = public_url(str(self.client.base_url))
        self._refused: set[str] = set()  # parameters the server refused for this model (400 unsupported_*)
        self._long = False  # an answer was cut off inside <think>: ask with the reasoning budget
        self._lock = threading.Lock()
        if not self.model:
            self.model = self._served_model() or DEFAULT_MODELS[("openai", images)]

    def _http_error(self, exc) -> LLMError:
        """The client's status error as an :class:`LLMError`; a 404 says where to look."""
        body = exc.body if isinstance(getattr(exc, "body", None), dict) else {}
        detail = str(body["message"]) if body.get("message") else re.sub(r"^Error code: \d+\s*-?\s*", "",
                                                                          str(exc.message))
        code = getattr(exc, "code", None) or body.get("code")
        if code == "insufficient_quota":  # a 429 that no wait cures: every later request gets it too
            return LLMError(f"HTTP {exc.status_code}: the account is out of quota ({detail})", exc.status_code,
                            fatal=True)
        if exc.status_code == 404:
            detail = " ".join(filter(None, [detail, f"(no such model or path: is MODEL={self.model} served there, "
                                                    f"and is BASE_URL {self.base_url} the API's address, often "
                                                    f"ending in /v1?)"]))
        return _status_error(exc.status_code, detail)

    def _served_model(self) -> str:
        """The model a self-hosted server (vLLM, llama.cpp, Ollama) serves, when it lists one."""
        if "api.openai.com" in str(self.client.base_url):
            return ""
        import openai  # lazy: see __init__

        try:
            names = [m.id for m in self.client.models.list()]
        except openai.APIConnectionError as exc:  # a timeout too: a slow server may still answer the chats
            error = _lost_connection(self.base_url, exc)
            if error.unreachable:  # nothing will answer: say so now, not after 8 neurons' retries
                raise UserError(f"openai: {error}: is the server up, and is BASE_URL right?") from None
            return self._unlisted(type(exc).__name__)
        except Exception as exc:  # noqa: BLE001  no listing (a 404, a proxy): fall back to the default name
            return self._unlisted(type(exc).__name__)
        if len(names) > 1:  # picking one at random would surprise: ask instead
            listed = ", ".join(names[:8])
            raise UserError(f"{self.base_url} serves several models; set MODEL to one of: {listed}")
        return names[0] if names else ""

    def _unlisted(self, why: str) -> str:
        """No model list (a 404, a proxy, a timeout): the default name, with a note on how to set MODEL."""
        log(f"could not list models at {self.base_url} ({why}); asking for "
            f"{DEFAULT_MODELS[('openai', self.accepts_images)]}: set MODEL to the name this server serves")
        return ""

    def sampling(self) -> dict:
        """The length and sampling parameters this model takes.

        Reasoning models (o1/o3/o4, gpt-5) take ``max_completion_tokens`` and no temperature;
        any parameter the server has refused once is left out from then on.
        """
        if REASONING_MODEL.search(self.model):
            params = {"max_completion_tokens": REASONING_MAX_TOKENS}
        else:
            params = {"max_tokens": REASONING_MAX_TOKENS if self._long else OPENAI_MAX_TOKENS,
                      "temperature": TEMPERATURE}
        if self.seed is not None:
            params["seed"] = self.seed
        with self._lock:
            refused = set(self._refused)
        if "max_tokens" in refused and "max_completion_tokens" not in refused:
            params["max_completion_tokens"] = REASONING_MAX_TOKENS  # the name servers ask for instead
        return {k: v for k, v in params.items() if k not in refused}

    def _refuse(self, exc, sent: dict) -> bool:
        """Remember a parameter a 400 names as unsupported; False when there is none to drop.

        ``sent``: the parameters this request sent. Requests in flight on other workers sent
        it too: each is asked again without it (checking the current parameters instead, they
        found it already dropped and failed: 3 such neurons stopped the run).
        """
        param = getattr(exc, "param", None)
        if exc.status_code != 400 or getattr(exc, "code", None) not in ("unsupported_parameter", "unsupported_value"):
            return False
        if param not in sent:  # not one of ours: nothing to fall back on
            return False
        with self._lock:
            first = param not in self._refused
            self._refused.add(param)
        if first:
            log(f"openai: {self.model} refuses '{param}'; asking without it")
        return True

    def _request(self, system, text, images, fallback):
        import openai  # lazy: see __init__

        content: str | list = text
        if images:
            content = [{"type": "text", "text": text}] + [
                {"type": "image_url", "image_url": {"url": data_url(png_bytes(p))}} for p in images]
        messages = [{"role": "system", "content": system}, {"role": "user", "content": content}]
        while True:  # ends: each refusal drops one of finitely many parameters from what is sent
            sent = self.sampling()
            try:
                resp = self.client.chat.completions.create(model=self.model, messages=messages, **sent)
                break
            except openai.APITimeoutError:
                raise LLMError(f"timed out after {self.timeout:g}s ({self.retries + 1} tries)", slow=True) from None
            except openai.APIConnectionError as exc:
                raise _lost_connection(self.base_url, exc) from None
            except openai.APIStatusError as exc:
                if not self._refuse(exc, sent):
                    raise self._http_error(exc) from None
            except (openai.APIResponseValidationError, ValueError) as exc:
                raise MalformedAnswer(f"unreadable response: {exc}") from None
        if isinstance(resp, str):  # the client hands back a body that is not JSON as text (an HTML page, say)
            raise MalformedAnswer(f"the server answered with text, not JSON ({' '.join(resp.split())[:60]!r}); "
                                  f"is BASE_URL ({self.base_url}) the API's address?")
        choices = getattr(resp, "choices", None)
        if not choices:
            error = (getattr(resp, "model_extra", None) or {}).get("error")  # proxies answer 200 {"error": ...}
            raise MalformedAnswer(f"the server sent an error, not an answer: {_error_text(error)}" if error
                                  else "no answer in the response")
        message, finish = choices[0].message, getattr(choices[0], "finish_reason", None)
        content = getattr(message, "content", None)
        # cut off while thinking: in the text (<think> never closed) or in a separate field (vLLM, DeepSeek,
        # Ollama put it in reasoning_content / reasoning and send no content)
        if finish == "length" and (not content or ends_inside_think(content)) and \
                sent.get("max_tokens") == OPENAI_MAX_TOKENS:  # sent with the short budget: lengthen, ask again
            self._long_answers()
            raise MalformedAnswer(f"the answer was cut off before it began (a reasoning model out of tokens?); "
                                  f"asking again with {REASONING_MAX_TOKENS} tokens")
        if not content:
            refusal = getattr(message, "refusal", None)
            raise MalformedAnswer(f"the model refused: {refusal}" if refusal else
                                  "the answer was cut at the token limit before any text" if finish == "length" else
                                  f"the model answered with empty text (finish_reason {finish})")
        return content

    def _long_answers(self) -> None:
        """Ask with the reasoning budget from now on (a model the name rule missed: R1 distills, QwQ...)."""
        with self._lock:
            first, self._long = not self._long, True
        if first:
            log(f"openai: {self.model} thinks before it answers; asking with {REASONING_MAX_TOKENS} tokens")


class ReplicateBackend(Backend):
    """Replicate's predictions API through the official client."""

    name = "replicate"

    def __init__(self, model: str, base_url: str | None, api_token: str, images: bool = True,
                 image_input: str = "auto", **kwargs):
        import httpx  # lazy: network clients, loaded only when this backend is used
        import replicate

        super().__init__(model=model or DEFAULT_MODELS[("replicate", images)], secrets=[api_token], **kwargs)
        if not REPLICATE_MODEL.fullmatch(self.model):  # the client refuses it before any request, per neuron
            raise UserError(f"MODEL for replicate must be owner/name or owner/name:version, got '{self.model}'")
        self.image_field, self.system_field = self._input_layout(images, image_input)
        self.accepts_images = bool(self.image_field)
        # The HTTP timeout of creates and polls (creates never ask the server to hold them: see _run).
        limits = httpx.Timeout(self.timeout + 10.0, connect=min(10.0, self.timeout))
        self.client = replicate.Client(api_token=api_token, base_url=base_url or None, timeout=limits,
                                       transport=httpx.HTTPTransport(retries=self.retries))  # retries failed connects
        self.base_url = public_url(str(self.client._client.base_url))
        # The client wraps its transport in a RetryTransport that retries only GETs on 429/503/504.
        # Polls (GET) retry every transient status; creates and cancels (POST) only refusals.
        polls = self.client._client._transport
        polls.max_attempts, polls.backoff_factor = self.retries + 1, self.backoff
        polls.retry_status_codes = RETRY_STATUSES
        posts = type(polls)(polls._wrapped_transport, max_attempts=self.retries + 1, backoff_factor=self.backoff,
                            retryable_methods={"POST"}, retry_status_codes=CREATE_RETRY_STATUSES)
        for transport in (polls, posts):  # it sleeps a numeric Retry-After as given: 3600 outlived SIGTERM
            transport._calculate_sleep = _capped(transport._calculate_sleep, self.timeout)
        self.client._client._transport = _ByMethod(polls, posts, limits)

    def _input_layout(self, images: bool, image_input: str) -> tuple[str, str]:
        known = REPLICATE_INPUTS.get(self.model.split(":")[0])
        image_field, system_field = known or ("", "system_prompt")
        if image_input in ("image", "images"):
            image_field = image_input
        elif image_input == "none" or not images:
            image_field = ""
        elif known is None and images:
            log(f"replicate model {self.model} is not known to take images; sending text only "
                f"(set IMAGE_INPUT=image or images to attach thumbnails)")
        return image_field, system_field

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
        import httpx  # lazy: see __init__
        from replicate.exceptions import ReplicateError

        try:
            return self._run(self._input(system, text, images))
        except ReplicateError as exc:
            detail = exc.detail or exc.title or ""
            if exc.status == 404:
                detail += (f" (no such model: is MODEL={self.model} on {self.base_url}? community models run by "
                           "version: owner/name:version)")
            raise _status_error(exc.status or 0, detail.strip()) from None
        except httpx.TimeoutException:  # httpx retries connecting, not waiting: ask again ourselves
            raise TransientError(f"timed out after {self.timeout:g}s", slow=True) from None
        except httpx.TransportError as exc:
            raise _lost_connection(self.base_url, exc) from None
        except ValueError as exc:  # JSON that is not a prediction
            raise MalformedAnswer(f"unreadable response: {exc}") from None

    def _run(self, payload: dict) -> str:
        """Create a prediction, then poll it until done (cancelled after TIMEOUT).

        No ``Prefer: wait``: the client gives a waiting create a read timeout of the wait + 0.5 s, so
        an answer a little late lost the prediction's id while the prediction ran and billed. A plain
        create answers at once with the id; the answer costs a poll every ``POLL_INTERVAL``.
        """
        import httpx  # lazy: see __init__

        ref, _, version = self.model.partition(":")
        try:
            if version:  # community models run by version id
                pred = self.client.predictions.create(version=version, input=payload)
            else:
                pred = self.client.models.predictions.create(model=ref, input=payload)
        except (httpx.ReadTimeout, httpx.WriteTimeout):  # sent: a prediction may be running and billing
            raise LLMError(f"the create request got no answer within {self.timeout + 10:g}s once sent; not sent "
                           "again (it may have started a prediction)", slow=True) from None
        deadline = time.monotonic() + self.timeout
        while pred.status not in ("succeeded", "failed", "canceled"):
            if time.monotonic() >= deadline:
                self._cancel(pred.id)
                raise TransientError(f"timed out after {self.timeout:g}s (prediction {pred.status})", slow=True)
            time.sleep(min(POLL_INTERVAL, self.timeout / 10))
            with contextlib.suppress(httpx.TimeoutException):  # a slow poll: poll again, never create again
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


def _capped(sleep_for: Callable, cap: float) -> Callable:
    """The replicate client's retry wait, at most ``cap`` seconds."""
    return lambda attempts_made, headers: min(float(sleep_for(attempts_made, headers)), cap)


class _ByMethod:
    """An httpx transport that hands POSTs to one retrying transport and the rest to another, and gives
    a request sent with no time limit at all the client's (replicate's create without ``wait`` passes
    ``timeout=None``, which httpx reads as "wait forever": a server that never answered hung a worker)."""

    def __init__(self, others, posts, limits):
        self.others, self.posts, self.limits = others, posts, limits.as_dict()

    def handle_request(self, request):
        if all(v is None for v in (request.extensions.get("timeout") or {}).values()):
            request.extensions["timeout"] = self.limits
        return (self.posts if request.method == "POST" else self.others).handle_request(request)

    def close(self) -> None:
        self.others.close()  # both wrap the same connection pool

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ----------------------------------------------------------------------------- factory
def read_dotenv(folder: str | os.PathLike = ".") -> dict[str, str]:
    """The settings in ``folder/.env`` (never a parent folder's); ``{}`` without one."""
    path = Path(folder) / ".env"
    return {k: v for k, v in dotenv_values(path).items() if v} if path.is_file() else {}


def choose_auto(env: dict, dotenv: dict, base_url: str = "") -> tuple[str, str]:
    """``BACKEND=auto``: (backend, why). A paid backend only from real environment variables."""
    if env.get("REPLICATE_API_TOKEN"):
        return "replicate", "REPLICATE_API_TOKEN is set in the environment"
    if base_url:
        return "openai", "BASE_URL is given"
    if env.get("OPENAI_API_KEY") or env.get("OPENAI_BASE_URL"):
        return "openai", "OPENAI_API_KEY or OPENAI_BASE_URL is set in the environment"
    why = "no REPLICATE_API_TOKEN, OPENAI_API_KEY or OPENAI_BASE_URL in the environment; labels from statistics"
    in_file = [k for k in (*TOKEN_VARS, "OPENAI_BASE_URL") if dotenv.get(k)]
    if in_file:
        why += (f"; ./.env sets {', '.join(in_file)}, which auto does not use (no paid calls from a file): "
                f"set BACKEND=replicate or BACKEND=openai to use it")
    return "offline", why


def _check_token(name: str, token: str) -> None:
    """A token HTTP can carry: printable ASCII, no spaces or line ends (a pasted curly quote was a
    traceback; a trailing CR failed every neuron). The token itself is never shown."""
    if not (token.isascii() and token.isprintable()) or token != token.strip() or " " in token:
        raise UserError(f"{name} holds characters no token has (a pasted quote, a space or a line end?): set it "
                        "again, copied as plain text")


def make_backend(name: str = "auto", model: str = "", base_url: str = "", timeout: float = 60.0,
                 retries: int = 4, *, images: bool = True, image_input: str = "auto",
                 backoff: float = 1.0, seed: int | None = None) -> Backend:
    """Build a backend from its name, the environment and ``./.env``.

    Parameters
    ----------
    name : ``auto`` | ``replicate`` | ``openai`` | ``offline``; ``auto`` see :func:`choose_auto`.
    model : model name; ``""`` picks :data:`DEFAULT_MODELS` (openai on a self-hosted
        server: the model it serves; a :class:`UserError` when it lists several).
    base_url : API base URL; ``""`` reads ``REPLICATE_API_BASE_URL`` / ``OPENAI_BASE_URL``.
    timeout, retries : per-request timeout (s); retries of the client and of unusable answers.
    backoff : base wait (s) of replicate's retries and of asking again after a failed prediction.
    images : send thumbnails where the model takes them.
    image_input : replicate only: ``auto`` (known models), ``image``, ``images`` or ``none``.
    seed : passed to OpenAI-compatible servers, and seeds the jitter.
    """
    require_choice("BACKEND", name, BACKENDS)
    require_choice("IMAGE_INPUT", image_input, IMAGE_INPUTS)
    if timeout <= 0 or retries < 0 or backoff < 0:
        raise UserError(f"TIMEOUT must be > 0, RETRIES >= 0 and BACKOFF >= 0, got {timeout}, {retries}, {backoff}")
    dotenv = read_dotenv()
    environment = {k: v for k, v in os.environ.items() if v}
    if name == "auto":
        name, why = choose_auto(os.environ, dotenv, base_url)
        log(f"BACKEND=auto chose {name}: {why}")
        dotenv = {}  # auto reads the environment only: a key kept in ./.env went to the server the environment named
    env = {**dotenv, **environment}  # the environment wins over .env
    common = dict(timeout=timeout, retries=retries, backoff=backoff, seed=seed)
    if name == "offline":
        return OfflineBackend(**common)
    if name == "replicate":
        token = env.get("REPLICATE_API_TOKEN", "")
        if not token:
            raise UserError("BACKEND=replicate needs REPLICATE_API_TOKEN (environment or ./.env)")
        _check_token("REPLICATE_API_TOKEN", token)
        url = base_url or env.get("REPLICATE_API_BASE_URL") or env.get("REPLICATE_BASE_URL") or ""
        return ReplicateBackend(model, url, token, images=images, image_input=image_input, **common)
    url = base_url or env.get("OPENAI_BASE_URL", "")
    key = env.get("OPENAI_API_KEY", "")
    if not key and not url:
        raise UserError("BACKEND=openai needs OPENAI_API_KEY, or OPENAI_BASE_URL for a local server")
    if key:
        _check_token("OPENAI_API_KEY", key)
    # local servers (vLLM, Ollama, llama.cpp) accept any key, but the client insists on one
    return OpenAIBackend(model, url, key or NO_KEY, images=images, **common)
