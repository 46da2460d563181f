"""Stage 4: ask an LLM to name the concept of every live SAE neuron.

Reads REPORT_DIR/neurons.jsonl (from sae_summarize.py) and the neurons' top thumbnails,
writes REPORT_DIR/llm_output.jsonl, one line per neuron:
{"neuron_id", "answer", "backend", "model", "prompt_version", "attempts", "images", "raw"}.

Usage:
    python sae_summary_to_llm.py                                # auto backend, all live neurons
    python sae_summary_to_llm.py --backend=offline              # no network: labels from statistics
    python sae_summary_to_llm.py --backend=replicate --limit=20 # needs REPLICATE_API_TOKEN (env or .env)
    OPENAI_BASE_URL=http://localhost:11434/v1 python sae_summary_to_llm.py --model=llava --only=[3,17]

Backends: replicate (REPLICATE_API_TOKEN; base URL from REPLICATE_API_BASE_URL), openai
(any OpenAI-compatible server: OPENAI_API_KEY / OPENAI_BASE_URL), offline, auto (the first of
these whose settings are present). Default models: replicate anthropic/claude-4-sonnet with
IMAGES=True (an official model that takes an image), meta/meta-llama-3-70b-instruct without;
openai gpt-4o-mini, or the model a self-hosted server serves (when it lists just one). Community models on
Replicate run by version: --model=yorickvp/llava-13b:VERSION_ID.

A rerun resumes: neurons already answered are not asked again (answers from the offline
backend are replaced when a real backend runs). Neurons that still fail after RETRIES are
listed at the end and the exit code is 1. Dead neurons are skipped unless ONLY names them.
"""
from __future__ import annotations

from concurrent.futures import CancelledError, ThreadPoolExecutor, as_completed
from functools import partial
from pathlib import Path

from tqdm import tqdm

from selfexplain import llm
from selfexplain.artifacts import append_jsonl, missing_message, read_jsonl, write_json, write_jsonl
from selfexplain.errors import UserError
from selfexplain.config import make_config, module_constants, run_cli
from selfexplain.artifacts import save_effective_config

# ----------------------------------------------------------------------------- config
REPORT_DIR = "neuron_report"  # stage 3's folder: reads neurons.jsonl and thumbs, writes llm_output.jsonl
BACKEND = "auto"  # auto | replicate | openai | offline
MODEL = ""  # "" = default per backend (see the docstring); replicate community models as owner/name:version
BASE_URL = ""  # API base URL; "" = REPLICATE_API_BASE_URL / OPENAI_BASE_URL from the environment, else official
WORKERS = 4  # requests in flight at once
TIMEOUT = 60.0  # seconds per request before it counts as failed (and is retried)
RETRIES = 4  # extra attempts on 429, 5xx, timeouts and malformed answers
BACKOFF = 1.0  # base of the exponential backoff between attempts, in seconds
IMAGES = True  # attach each neuron's top thumbnails where the model takes images
N_IMAGES = 4  # how many thumbnails to attach
IMAGE_INPUT = "auto"  # replicate input for thumbnails: auto (known models) | image (one tiled PNG) | images | none
ONLY = None  # list of neuron ids to ask (dead ones included), None = all live neurons
LIMIT = None  # ask at most this many of the selected neurons (the first in neurons.jsonl order)
MAX_WORDS = 12  # longest concept kept, in words
SEED = 0  # seeds the backoff jitter; sent to OpenAI-compatible servers as `seed`


# ----------------------------------------------------------------------------- inputs
def log(message: str) -> None:
    tqdm.write(message)


def check_config(cfg) -> None:
    """Settings that parse but make no sense are one-line errors."""
    if cfg.WORKERS < 1 or cfg.RETRIES < 0 or cfg.TIMEOUT <= 0 or cfg.MAX_WORDS < 1 or cfg.N_IMAGES < 0:
        raise UserError("need WORKERS >= 1, RETRIES >= 0, TIMEOUT > 0, MAX_WORDS >= 1, N_IMAGES >= 0")
    if cfg.LIMIT is not None and (not isinstance(cfg.LIMIT, int) or cfg.LIMIT < 0):
        raise UserError(f"LIMIT must be a non-negative integer or None, got {cfg.LIMIT!r}")


def load_neurons(report_dir: Path) -> list[dict]:
    """The neurons of stage 3; a missing or empty file is a :class:`UserError`."""
    path = report_dir / "neurons.jsonl"
    if not path.is_file():
        raise UserError(missing_message(path, "report"))
    neurons = [n for n in read_jsonl(path) if isinstance(n.get("neuron_id"), int)]
    if not neurons:
        raise UserError(f"{path} holds no neurons; rerun sae_summarize.py")
    return neurons


def select_neurons(neurons: list[dict], only, limit: int | None) -> tuple[list[dict], int]:
    """The neurons to answer (ONLY, else the live ones; then LIMIT) and how many dead were skipped."""
    if only is not None:
        wanted = [only] if isinstance(only, int) else list(only)
        if not all(isinstance(i, int) and not isinstance(i, bool) for i in wanted):
            raise UserError(f"ONLY must be a list of neuron ids, got {only!r}")
        by_id = {n["neuron_id"]: n for n in neurons}
        unknown = sorted(set(wanted) - set(by_id))
        if unknown:
            raise UserError(f"ONLY names neurons not in neurons.jsonl: {unknown[:10]}")
        chosen, n_dead = [by_id[i] for i in dict.fromkeys(wanted)], 0
    else:
        chosen = [n for n in neurons if not n.get("dead")]
        n_dead = len(neurons) - len(chosen)
    return (chosen if limit is None else chosen[:limit]), n_dead


def attachable_examples(neuron: dict, report_dir: Path, n_images: int) -> list[tuple[dict, Path]]:
    """The neuron's top examples whose thumbnails exist on disk, with their paths (relative in the file)."""
    pairs = [(e, report_dir / e["thumb"]) for e in neuron.get("top_examples", []) if e.get("thumb")]
    return [(e, p) for e, p in pairs if p.is_file()][:n_images]


# ----------------------------------------------------------------------------- resume
def load_answers(path: Path) -> dict[int, dict]:
    """Answers so far, the last per neuron; cuts a torn tail and drops superseded lines."""
    records = [r for r in read_jsonl(path, repair=True) if isinstance(r.get("neuron_id"), int)]
    latest = {r["neuron_id"]: r for r in records}
    if len(latest) != len(records):  # e.g. offline answers replaced by a real backend
        write_jsonl(path, latest.values())
    return latest


def already_done(answers: dict[int, dict], backend_name: str) -> set[int]:
    """Neurons not to ask again: all of them, except offline answers when a real LLM runs."""
    return {i for i, r in answers.items() if backend_name == "offline" or r.get("backend") != "offline"}


# ----------------------------------------------------------------------------- asking
def ask_neuron(backend: llm.Backend, neuron: dict, cfg, report_dir: Path, system: str, version: str) -> dict:
    """One neuron's record for llm_output.jsonl (raises :class:`llm.LLMError` on failure)."""
    pairs = attachable_examples(neuron, report_dir, cfg.N_IMAGES) if cfg.IMAGES and backend.accepts_images else []
    text = llm.neuron_prompt(neuron, cfg.MAX_WORDS, attached=[e for e, _ in pairs])
    parse = partial(llm.parse_concept, max_words=cfg.MAX_WORDS)
    answer = backend.ask_detailed(system, text, [p for _, p in pairs], parse=parse,
                                  fallback=llm.offline_label(neuron, cfg.MAX_WORDS))
    return {"neuron_id": neuron["neuron_id"], "answer": answer.text, "backend": backend.name,
            "model": backend.model, "prompt_version": version, "attempts": answer.attempts,
            "images": answer.images, "raw": backend.scrub(answer.raw)[:300]}


def ask_all(backend: llm.Backend, neurons: list[dict], cfg, report_dir: Path, out_path: Path) -> dict[int, str]:
    """Ask every neuron on a thread pool; append each answer from this thread as it comes.

    Returns ``{neuron_id: error}`` for the neurons that failed. A fatal error (bad token,
    unknown model) stops the run after writing what is already answered.
    """
    system, version = llm.system_prompt(cfg.MAX_WORDS), llm.prompt_version()
    failures, fatal = {}, None
    pool = ThreadPoolExecutor(max_workers=cfg.WORKERS)
    try:
        futures = {pool.submit(ask_neuron, backend, n, cfg, report_dir, system, version): n["neuron_id"]
                   for n in neurons}
        for fut in tqdm(as_completed(futures), total=len(futures), desc="concepts", unit="neuron", disable=None):
            nid = futures[fut]
            try:
                record = fut.result()
            except CancelledError:
                continue
            except Exception as exc:  # noqa: BLE001  every failure is listed, none dropped silently
                message = str(exc) if isinstance(exc, llm.LLMError) else f"{type(exc).__name__}: {exc}"
                failures[nid] = backend.scrub(message)
                log(f"neuron {nid}: failed: {failures[nid]}")
                if getattr(exc, "fatal", False) and fatal is None:
                    fatal = failures[nid]
                    for other in futures:
                        other.cancel()
                continue
            append_jsonl(out_path, record)  # only this thread writes: whole lines, no interleaving
    finally:
        pool.shutdown(wait=True, cancel_futures=True)  # Ctrl-C: queued neurons are not started
    if fatal:
        raise UserError(f"{backend.name} refused the requests ({fatal}); answers so far are kept, rerun to resume")
    return failures


def _refresh_atlas(report_dir: Path) -> None:
    """Rebuild index.html so the atlas shows the new concepts."""
    from selfexplain import report

    try:
        report.write_index_html(report_dir)
        log(f"atlas updated: {report_dir / 'index.html'}")
    except Exception as exc:  # the answers are saved; a stale page is not worth failing the run
        log(f"could not refresh {report_dir / 'index.html'}: {exc.__class__.__name__}: {exc}")


# ----------------------------------------------------------------------------- main
def main(**overrides) -> int:
    cfg = make_config(module_constants(globals()), overrides)
    check_config(cfg)
    report_dir = Path(cfg.REPORT_DIR)
    neurons = load_neurons(report_dir)
    chosen, n_dead = select_neurons(neurons, cfg.ONLY, cfg.LIMIT)
    backend = llm.make_backend(cfg.BACKEND, cfg.MODEL, cfg.BASE_URL, cfg.TIMEOUT, cfg.RETRIES, images=cfg.IMAGES,
                               image_input=cfg.IMAGE_INPUT, backoff=cfg.BACKOFF, seed=cfg.SEED)
    out_path = report_dir / llm.OUTPUT_NAME
    done = already_done(load_answers(out_path), backend.name)
    todo = [n for n in chosen if n["neuron_id"] not in done]
    save_effective_config(cfg, report_dir, "llm_config.json")
    log(f"backend {backend.name} ({backend.model}): {len(todo)} neurons to ask, {len(chosen) - len(todo)} "
        f"already answered, {n_dead} dead skipped, images {'on' if backend.accepts_images and cfg.IMAGES else 'off'}")

    failures = ask_all(backend, todo, cfg, report_dir, out_path)
    load_answers(out_path)  # drop lines superseded in this run, so one line per neuron remains
    write_json(report_dir / "llm_summary.json", {
        "backend": backend.name, "model": backend.model, "asked": len(todo), "answered": len(todo) - len(failures),
        "already_answered": len(chosen) - len(todo), "dead_skipped": n_dead,
        "failed": [{"neuron_id": i, "error": e} for i, e in sorted(failures.items())]})
    log(f"wrote {len(todo) - len(failures)} answers to {out_path}")
    _refresh_atlas(report_dir)
    if failures:
        log(f"{len(failures)} neurons failed (rerun to retry them): {sorted(failures)}")
        return 1
    return 0


if __name__ == "__main__":
    run_cli(main, globals())
