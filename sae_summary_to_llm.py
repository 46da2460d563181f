"""Stage 4: ask an LLM to name the concept of every live SAE neuron.

Reads REPORT_DIR/neurons.jsonl (from sae_summarize.py) and the neurons' top thumbnails,
appends to REPORT_DIR/llm_output.jsonl, one line per answer (the latest per neuron counts):
{"neuron_id", "answer", "backend", "model", "prompt_version", "sae_fingerprint", "attempts", "images", "raw"}.

Usage:
    python sae_summary_to_llm.py                                # auto backend, all live neurons
    python sae_summary_to_llm.py --backend=offline              # no network: labels from statistics
    python sae_summary_to_llm.py --backend=replicate --limit=20 # 20 unanswered neurons; rerun for the next 20
    OPENAI_BASE_URL=http://localhost:11434/v1 python sae_summary_to_llm.py --model=llava --only=[3,17]

Backends: replicate (REPLICATE_API_TOKEN; base URL from REPLICATE_API_BASE_URL), openai
(any OpenAI-compatible server: OPENAI_API_KEY / OPENAI_BASE_URL), offline, auto (the first of
these whose settings are real environment variables: a token found only in ./.env is used
when BACKEND names its backend, never by auto, so a stray file starts no paid calls).
Default models: replicate anthropic/claude-4-sonnet with IMAGES=True (an official model that
takes an image), meta/meta-llama-3-70b-instruct without; openai gpt-4o-mini, or the model a
self-hosted server serves (when it lists just one). Community models on Replicate run by
version: --model=yorickvp/llava-13b:VERSION_ID.

A rerun resumes: a neuron is asked again only when its latest answer was made for another
SAE (summary.json's sae_fingerprint), another prompt, backend or model (an offline run never
replaces a real LLM's answer); REDO=True asks again anyway (with ONLY=[...], just those neurons:
a bad answer is replaced by the next). The file is only appended to: superseded lines stay on disk and
readers set them aside (PRUNE=True first drops the lines made for another SAE). Each answer
is written as it arrives; Ctrl-C stops new requests and keeps the answers of those in flight
(a second Ctrl-C quits at once without them).
A second run on the same REPORT_DIR is refused while one is writing. Neurons that still fail are listed at the end and the exit code is 1; a run whose
first neurons all fail stops early (exit 2): 3 refusals, a bad token, unknown model or exhausted
quota, a server that cannot be reached at all, 8 failures that are not a busy server's (timeouts, 429,
503): BASE_URL is not its API, or 16 busy failures (rerun later).
llm_config.json records what made the answers (ASKED: backend, model, server); llm_summary.json what the
last run asked and what failed. Dead neurons
are skipped unless ONLY names them. Logic: selfexplain/concepts.py.
"""
from __future__ import annotations

from pathlib import Path

from selfexplain import artifacts, concepts, prompts, report
from selfexplain.config import make_config, module_constants, run_cli
from selfexplain.distributed import exit_on_sigterm
from selfexplain.errors import UserError
from selfexplain.llm_backends import make_backend, public_url
from selfexplain.logs import log

# ----------------------------------------------------------------------------- config
REPORT_DIR = artifacts.REPORT_DIR  # stage 3's folder: reads neurons.jsonl and thumbs, writes llm_output.jsonl
BACKEND = "auto"  # auto | replicate | openai | offline
MODEL = ""  # "" = default per backend (see the docstring); replicate community models as owner/name:version
BASE_URL = ""  # API base URL; "" = REPLICATE_API_BASE_URL / OPENAI_BASE_URL from the environment, else official
WORKERS = 4  # requests in flight at once
TIMEOUT = 60.0  # seconds per request before it counts as failed (and is retried)
RETRIES = 4  # retries by the client (408, 409, 429, 5xx, timeouts; a replicate create: 429, 503 only) and of unusable answers
BACKOFF = 1.0  # base of replicate's exponential backoff, and of the wait after a failed prediction, in seconds
IMAGES = True  # attach each neuron's top thumbnails where the model takes images
N_IMAGES = 4  # how many thumbnails to attach
IMAGE_INPUT = "auto"  # replicate input for thumbnails: auto (known models) | image (one tiled PNG) | images | none
ONLY = None  # list of neuron ids to ask (dead ones included), None = all live neurons
LIMIT = None  # ask at most this many neurons with no answer yet (the first in neurons.jsonl order): rerun for the next batch
MAX_WORDS = 12  # longest concept kept, in words
SEED = 0  # seeds the backoff jitter; sent to OpenAI-compatible servers as `seed`
PRUNE = False  # first drop the answers made for another SAE from llm_output.jsonl (readers set them aside anyway)
REDO = False  # ask again neurons already answered by this backend and model (a bad answer; with ONLY: just those)


def check_config(cfg) -> None:
    """Settings that parse but make no sense are one-line errors."""
    if cfg.WORKERS < 1 or cfg.RETRIES < 0 or cfg.TIMEOUT <= 0 or cfg.MAX_WORDS < 1 or cfg.N_IMAGES < 0:
        raise UserError("need WORKERS >= 1, RETRIES >= 0, TIMEOUT > 0, MAX_WORDS >= 1, N_IMAGES >= 0")
    if cfg.LIMIT is not None and (not isinstance(cfg.LIMIT, int) or cfg.LIMIT < 0):
        raise UserError(f"LIMIT must be a non-negative integer or None, got {cfg.LIMIT!r}")


def refresh_atlas(report_dir: Path) -> None:
    """Rebuild index.html so the atlas shows the new concepts; a failure is only a notice."""
    try:
        report.write_index_html(report_dir)
        log(f"atlas updated: {report_dir / artifacts.INDEX_HTML}")
    except Exception as exc:  # noqa: BLE001  the answers are saved; a stale page is not worth failing the run
        log(f"could not refresh {report_dir / artifacts.INDEX_HTML}: {exc.__class__.__name__}: {exc}")


# ----------------------------------------------------------------------------- main
def main(**overrides) -> int:
    cfg = make_config(module_constants(globals()), overrides)
    check_config(cfg)
    report_dir = Path(cfg.REPORT_DIR)
    chosen, n_dead = concepts.select_neurons(concepts.load_neurons(report_dir), cfg.ONLY)
    backend = make_backend(cfg.BACKEND, cfg.MODEL, cfg.BASE_URL, cfg.TIMEOUT, cfg.RETRIES, images=cfg.IMAGES,
                           image_input=cfg.IMAGE_INPUT, backoff=cfg.BACKOFF, seed=cfg.SEED)
    question = concepts.Question(report_dir, concepts.report_fingerprint(report_dir), cfg.MAX_WORDS,
                                 cfg.N_IMAGES if cfg.IMAGES else 0)
    failures, stopped, todo, answered, later = {}, None, None, 0, 0
    try:
        with concepts.AnswerLog(report_dir / artifacts.LLM_OUTPUT) as out:
            if cfg.PRUNE:
                log(f"pruned {out.prune(question.sae_fingerprint)} answers made for another SAE from {out.path}")
            offline = ({n["neuron_id"]: concepts.offline_answer(n, cfg.MAX_WORDS) for n in chosen}
                       if backend.name == "offline" else None)
            done = set() if cfg.REDO else concepts.answered_ids(out.records(), backend, question.sae_fingerprint,
                                                                  prompts.prompt_version(), offline)
            todo = [n for n in chosen if n["neuron_id"] not in done]
            asked = todo[:cfg.LIMIT]  # a batch of the unanswered (LIMIT None: all): reruns go on
            later, todo = len(todo) - len(asked), asked
            images = "on" if backend.accepts_images and cfg.IMAGES else "off"
            log(f"backend {backend_label(backend)}: {len(todo)} neurons to ask, "
                f"{len(chosen) - len(todo) - later} already answered, "
                + (f"{later} left for later runs (LIMIT={cfg.LIMIT}), " if later else "")
                + f"{n_dead} dead skipped, images {images}")
            try:
                failures = concepts.ask_all(backend, todo, question, out, cfg.WORKERS)
            except BaseException as exc:  # a fatal answer, Ctrl-C or a crash: say so in the summary too
                stopped = stop_reason(exc)
                failures = getattr(exc, "failures", failures)
                raise
            finally:  # the answers made before a stop count, and the atlas shows them
                now = concepts.answered_ids(out.records(), backend, question.sae_fingerprint, prompts.prompt_version(),
                                            offline)
                answered = sum(n["neuron_id"] in now for n in todo)
                if answered or not todo:  # the settings that made the answers on disk; a run that made none keeps
                    save_asked(cfg, backend, report_dir)  # the last one's (llm_summary.json says what it tried)
    finally:
        if todo is not None:  # the run got as far as choosing what to ask
            try:
                write_llm_summary(report_dir, backend, question.sae_fingerprint, len(todo), answered,
                                  len(chosen) - len(todo) - later, n_dead, failures, stopped)
                refresh_atlas(report_dir)
            except Exception as exc:  # never let the summary hide the error that stopped the run
                if stopped is None:
                    raise
                log(f"could not write {artifacts.LLM_SUMMARY} or refresh the atlas: {exc}")
    log(f"wrote {answered} answers to {report_dir / artifacts.LLM_OUTPUT}")
    if failures:
        log(f"{len(failures)} neurons failed (rerun to retry them): {sorted(failures)}")
        return 1
    return 0


def backend_label(backend) -> str:
    """``openai (gpt-4o-mini)``; the offline backend's model is its name: ``offline`` once."""
    return backend.name if backend.model in ("", backend.name) else f"{backend.name} ({backend.model})"


def save_asked(cfg, backend, report_dir: Path) -> None:
    """``llm_config.json``: the effective settings, and ``ASKED``, what the '' and auto settings became."""
    artifacts.save_effective_config({**cfg, "BASE_URL": public_url(cfg.BASE_URL),
                                     "ASKED": {"backend": backend.name, "model": backend.model,
                                               "base_url": backend.base_url}},
                                    report_dir, artifacts.LLM_CONFIG)


def stop_reason(exc: BaseException) -> str:
    """Why the run stopped, for ``llm_summary.json`` (SIGTERM's SystemExit read "143")."""
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted (Ctrl-C)"
    if isinstance(exc, SystemExit):
        return "terminated (SIGTERM)" if exc.code == 143 else f"exited ({exc.code})"
    return str(exc) or exc.__class__.__name__


def write_llm_summary(report_dir: Path, backend, sae_fingerprint: str, asked: int, answered: int,
                      already: int, n_dead: int, failures: dict, stopped: str | None) -> None:
    """``llm_summary.json``: this run's counts, its failures and, when it stopped early, why."""
    artifacts.write_json(report_dir / artifacts.LLM_SUMMARY, {
        "backend": backend.name, "model": backend.model, "base_url": backend.base_url,
        "sae_fingerprint": sae_fingerprint, "asked": asked, "answered": answered, "already_answered": already,
        "dead_skipped": n_dead, "failed": [{"neuron_id": i, "error": e} for i, e in sorted(failures.items())],
        "stopped": stopped})


if __name__ == "__main__":
    exit_on_sigterm()  # SIGTERM like Ctrl-C: the answers in flight are saved, llm_summary.json says why it stopped
    run_cli(main, globals())
