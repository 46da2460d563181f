"""Stage 4's logic: which neurons to ask, asking them in parallel, and the concepts on disk.

``REPORT_DIR/llm_output.jsonl`` holds one :class:`Concept` per line and is only ever
appended to: a later line for a neuron supersedes an earlier one, and a line written for
another SAE (its ``sae_fingerprint``), another prompt (``prompt_version``) or another
backend or model stays on disk but is set aside by the readers here. Each answer is
appended the moment it arrives, so neither a crash nor Ctrl-C loses an answer already
paid for. One run writes at a time: it holds an exclusive lock on ``llm_output.jsonl.lock``
(released by the operating system when the process ends, so it never goes stale).

:func:`concepts_and_names` (and :func:`load_concepts`, its first half) is the one reader of
concepts for the other stages: stage 4's answers, else stage 3's ``auto_summary`` (or, as a
short name, the statistics' offline label), for the SAE the caller has loaded.
"""
from __future__ import annotations

import threading
from concurrent.futures import CancelledError, Future, ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

from tqdm.auto import tqdm

from . import artifacts, prompts
from .errors import UserError
from .llm_backends import RETRY_STATUSES, Backend, LLMError
from .logs import log

LOCK_SUFFIX = ".lock"  # beside llm_output.jsonl: held by the run that writes it


# ----------------------------------------------------------------------------- records
@dataclass
class Concept:
    """One line of ``llm_output.jsonl``: a neuron's concept and where it came from.

    ``attempts`` counts the answers asked for (an unusable one is asked again); the
    clients' own HTTP retries are not counted. ``raw`` is the answer as received,
    scrubbed of secrets and control characters, cut to 300 characters.
    """

    neuron_id: int
    answer: str
    backend: str
    model: str
    prompt_version: str
    sae_fingerprint: str | None
    attempts: int = 1
    images: int = 0
    raw: str = ""

    @classmethod
    def from_dict(cls, record) -> "Concept | None":
        """A record read back from disk; None when it is not a well-formed concept line."""
        if not isinstance(record, dict):
            return None
        nid, answer = record.get("neuron_id"), record.get("answer")
        if not isinstance(nid, int) or isinstance(nid, bool) or not isinstance(answer, str):
            return None

        def text(key: str) -> str:
            return record[key] if isinstance(record.get(key), str) else ""

        def count(key: str) -> int:
            value = record.get(key)
            return value if isinstance(value, int) and not isinstance(value, bool) else 0

        return cls(nid, prompts.strip_controls(answer), text("backend"), text("model"), text("prompt_version"),
                   text("sae_fingerprint") or None, count("attempts"), count("images"), text("raw"))


@dataclass(frozen=True)
class Question:
    """What one run asks every neuron with."""

    report_dir: Path
    sae_fingerprint: str | None  # of the SAE stage 3 described (summary.json)
    max_words: int = 12  # longest concept kept
    n_images: int = 4  # thumbnails attached where the model takes images (0: none)


def read_concepts(path: str | Path) -> list[Concept]:
    """Every well-formed line of a concepts file, in order (a missing file gives [])."""
    return [c for c in map(Concept.from_dict, artifacts.read_jsonl(path)) if c is not None]


def report_fingerprint(report_dir: str | Path) -> str | None:
    """The fingerprint of the SAE stage 3 described (``summary.json``), None when not recorded."""
    path = Path(report_dir) / artifacts.SUMMARY
    if not path.is_file():
        return None
    fingerprint = artifacts.read_json(path).get("sae_fingerprint")
    return fingerprint if isinstance(fingerprint, str) else None


def latest(records: list[Concept], sae_fingerprint: str | None) -> tuple[dict[int, Concept], int]:
    """The last record per neuron among those for ``sae_fingerprint`` (all when None), and how many were not."""
    kept = [r for r in records if sae_fingerprint is None or r.sae_fingerprint == sae_fingerprint]
    return {r.neuron_id: r for r in kept}, len(records) - len(kept)


def current_answers(report_dir: str | Path, sae_fingerprint: str | None) -> tuple[dict[int, Concept], int]:
    """Stage 4's current answer per neuron for ``sae_fingerprint`` (any SAE when None).

    Returns the answers and how many lines were set aside as made for another SAE.
    """
    return latest(read_concepts(Path(report_dir) / artifacts.LLM_OUTPUT), sae_fingerprint)


_LOADED: dict = {}  # (folder, fingerprint, files' mtimes) -> concepts: explaining many images reads them once


def load_concepts(report_dir: str | Path, sae_fingerprint: str | None = None) -> dict[int, str]:
    """``{neuron_id: concept}``: stage 4's answer, else stage 3's ``auto_summary``; see :func:`concepts_and_names`."""
    return concepts_and_names(report_dir, sae_fingerprint)[0]


def concepts_and_names(report_dir: str | Path, sae_fingerprint: str | None = None) -> tuple[dict, dict]:
    """``({neuron_id: concept}, {neuron_id: name})`` from one reading of the report.

    A concept is stage 4's answer, else stage 3's ``auto_summary``; a name (what a sentence
    uses) is stage 4's answer, else the label the offline backend would make from the
    statistics (:func:`prompts.offline_label`), not the summary's whole sentence.

    With ``sae_fingerprint`` only concepts of that SAE count; the others are set aside
    (left on disk) with one log line saying how many. Neurons without a concept are
    missing from the dict; when neither file exists a one-line notice says so. The result
    is reused until either file changes (a copy is returned, so callers may edit it).
    """
    report = Path(report_dir)
    stamps = tuple(f.stat().st_mtime_ns if f.is_file() else -1
                   for f in (report / artifacts.NEURONS, report / artifacts.LLM_OUTPUT))
    key = (str(report.resolve()), sae_fingerprint, stamps)
    if key not in _LOADED:
        _LOADED.clear()  # one report at a time is the common case; no unbounded growth
        _LOADED[key] = _read_concepts(report, sae_fingerprint)
    concepts, names = _LOADED[key]
    return dict(concepts), dict(names)


def _read_concepts(report: Path, sae_fingerprint: str | None) -> tuple[dict[int, str], dict[int, str]]:
    """:func:`load_concepts` without the reuse: (concepts, short names)."""
    neurons_path, answers_path = report / artifacts.NEURONS, report / artifacts.LLM_OUTPUT
    summaries = [n for n in artifacts.read_jsonl(neurons_path) if isinstance(n, dict)
                 and isinstance(n.get("neuron_id"), int) and isinstance(n.get("auto_summary"), str)]
    stale_summaries = 0
    if summaries and sae_fingerprint is not None and report_fingerprint(report) != sae_fingerprint:
        summaries, stale_summaries = [], len(summaries)
    concepts = {n["neuron_id"]: prompts.strip_controls(n["auto_summary"]) for n in summaries}
    names = {n["neuron_id"]: prompts.offline_label(n) for n in summaries}
    answers, stale_answers = current_answers(report, sae_fingerprint)
    # "unclear" is an answer (it is not asked again) but no name: the statistics summary stays
    named = {i: r.answer for i, r in answers.items() if r.answer.strip() and not prompts.is_unclear(r.answer)}
    concepts.update(named)
    names.update(named)
    if stale_summaries or (stale_answers and not answers):  # older answers beside current ones are history
        log(f"{report}: set aside {stale_answers} answers and {stale_summaries} summaries made for another SAE "
            f"(kept on disk; rerun sae_summarize.py and sae_summary_to_llm.py)")
    if not neurons_path.is_file() and not answers_path.is_file():
        log(f"note: no concepts in {report}: neither {neurons_path.name} nor {answers_path.name} is there (check "
            "REPORT_DIR, or run sae_summarize.py and sae_summary_to_llm.py); neurons are named by id")
    return concepts, names


# ----------------------------------------------------------------------------- inputs
def load_neurons(report_dir: Path) -> list[dict]:
    """The neurons of stage 3; a missing or empty file is a :class:`UserError`."""
    path = report_dir / artifacts.NEURONS
    if not path.is_file():
        raise UserError(artifacts.missing_message(path, "report"))
    neurons = [n for n in artifacts.read_jsonl(path) if isinstance(n, dict) and isinstance(n.get("neuron_id"), int)]
    if not neurons:
        raise UserError(f"{path} holds no neurons; rerun sae_summarize.py")
    return neurons


def select_neurons(neurons: list[dict], only) -> tuple[list[dict], int]:
    """The neurons to answer (ONLY, else the live ones) and how many dead were skipped (LIMIT applies
    later, to those without an answer)."""
    if only is not None:
        wanted = [only] if isinstance(only, int) else list(only)
        if not all(isinstance(i, int) and not isinstance(i, bool) for i in wanted):
            raise UserError(f"ONLY must be a list of neuron ids, got {only!r}")
        by_id = {n["neuron_id"]: n for n in neurons}
        unknown = sorted(set(wanted) - set(by_id))
        if unknown:
            raise UserError(f"ONLY names neurons not in {artifacts.NEURONS}: {unknown[:10]}")
        chosen, n_dead = [by_id[i] for i in dict.fromkeys(wanted)], 0
    else:
        chosen = [n for n in neurons if not n.get("dead")]
        n_dead = len(neurons) - len(chosen)
    return chosen, n_dead


def contained(root: Path, relative) -> Path | None:
    """``root/relative`` when it is a path that stays inside ``root`` (links resolved), else None.

    Paths come from ``neurons.jsonl``: an absolute or ``../`` path there must never make
    stage 4 read, and upload, a file from elsewhere on the machine.
    """
    if not isinstance(relative, str) or not relative:
        return None
    base = root.resolve()
    path = (base / relative).resolve()
    return path if path != base and path.is_relative_to(base) else None


def attachable_examples(neuron: dict, report_dir: Path, n_images: int) -> list[tuple[dict, Path]]:
    """The neuron's top examples whose thumbnails exist inside ``report_dir``, with their paths."""
    pairs = []
    for example in neuron.get("top_examples", []):
        if len(pairs) == n_images or not isinstance(example, dict) or not example.get("thumb"):
            continue
        path = contained(report_dir, example["thumb"])
        if path is None:
            log(f"neuron {neuron['neuron_id']}: thumbnail {example['thumb']!r} is not inside {report_dir}; "
                "not sent")
        elif path.is_file():
            pairs.append((example, path))
    return pairs


# ----------------------------------------------------------------------------- resume
def offline_answer(neuron: dict, max_words: int) -> str | None:
    """What the offline backend stores for ``neuron`` now: its label, parsed as every answer is."""
    try:
        return prompts.parse_concept(prompts.offline_label(neuron, max_words), max_words)
    except prompts.MalformedAnswer:
        return None


def answered_ids(records: list[Concept], backend: Backend, sae_fingerprint: str | None, version: str,
                 offline_answers: dict[int, str | None] | None = None) -> set[int]:
    """Neurons whose current answer this run would not change.

    The latest answer for this SAE counts when it came from this backend and model with
    this prompt; an offline run also keeps any real LLM's answer (a label from statistics
    never replaces one). With ``offline_answers`` (an offline run: :func:`offline_answer` of
    each neuron now), an offline answer counts only while it is unchanged: new statistics relabel.
    """
    current, _ = latest(records, sae_fingerprint)
    return {i for i, r in current.items()
            if ((r.backend, r.model, r.prompt_version) == (backend.name, backend.model, version)
                and (offline_answers is None or r.backend != "offline" or offline_answers.get(i) == r.answer))
            or (backend.name == "offline" and r.backend not in ("offline", ""))}


class AnswerLog:
    """``llm_output.jsonl`` held by one run: an exclusive lock, and whole lines appended as answers come.

    Use as a context manager; a second run on the same folder gets a one-line :class:`UserError`.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self.lock_path = self.path.with_name(self.path.name + LOCK_SUFFIX)
        self._threads = threading.Lock()  # workers append from several threads
        self._lock_file = None

    def __enter__(self) -> "AnswerLog":
        try:
            self._lock_file = open(self.lock_path, "a+")
        except OSError as exc:
            raise UserError(f"cannot write {self.lock_path}: {exc.strerror or exc}") from None
        if not artifacts.lock_exclusive(self._lock_file):
            self._lock_file.close()
            raise UserError(f"another sae_summary_to_llm.py run is writing {self.path} ({self.lock_path} is "
                            "locked); wait for it to finish, or use another REPORT_DIR")
        self._close_torn_line()
        return self

    def __exit__(self, *exc) -> None:
        self._lock_file.close()  # closing releases the lock

    def _close_torn_line(self) -> None:
        """End a torn last line (a crash mid-write) so the next answer starts a line of its own.

        The fragment stays, as a line every reader skips: the file is never rewritten.
        """
        if not self.path.is_file() or self.path.stat().st_size == 0:
            return
        try:
            with open(self.path, "rb+") as fh:
                fh.seek(-1, 2)
                if fh.read(1) != b"\n":
                    fh.write(b"\n")
        except OSError as exc:
            raise UserError(f"cannot write {self.path}: {exc.strerror or exc}") from None

    def records(self) -> list[Concept]:
        return read_concepts(self.path)

    def prune(self, sae_fingerprint: str | None) -> int:
        """Drop every line not made for this SAE (the file is rewritten atomically, under the
        lock); returns how many went. Readers set such lines aside anyway: pruning only keeps
        a folder whose SAE was retrained many times from growing."""
        if not self.path.is_file() or sae_fingerprint is None:
            return 0
        lines = artifacts.read_jsonl(self.path)
        kept = [r for r in lines if isinstance(r, dict) and r.get("sae_fingerprint") == sae_fingerprint]
        if len(kept) < len(lines):
            artifacts.write_jsonl(self.path, kept)
        return len(lines) - len(kept)

    def append(self, record: Concept) -> None:
        with self._threads:
            artifacts.append_jsonl(self.path, asdict(record))


# ----------------------------------------------------------------------------- asking
def ask_neuron(backend: Backend, neuron: dict, question: Question, system: str, version: str) -> Concept:
    """One neuron's concept (raises :class:`LLMError` when the backend gives up)."""
    pairs = attachable_examples(neuron, question.report_dir, question.n_images) if backend.accepts_images else []
    text = prompts.neuron_prompt(neuron, question.max_words, attached=[e for e, _ in pairs])
    answer = backend.ask_detailed(system, text, [p for _, p in pairs],
                                  parse=partial(prompts.parse_concept, max_words=question.max_words),
                                  fallback=prompts.offline_label(neuron, question.max_words))
    return Concept(neuron["neuron_id"], answer.text, backend.name, backend.model, version, question.sae_fingerprint,
                   answer.attempts, answer.images, prompts.strip_controls(backend.scrub(answer.raw))[:300])


def _failure(future: Future) -> Exception | None:
    """The exception a finished request raised (None when it succeeded or was cancelled)."""
    try:
        future.result()
    except CancelledError:
        return None
    except Exception as exc:  # noqa: BLE001  every failure is listed, none dropped silently
        return exc
    return None


REFUSALS_BEFORE_STOP = 3  # a 4xx for this many neurons and no answer yet: the request is wrong, not the neuron
FAILURES_BEFORE_STOP = 8  # this many failures, not of a busy server, and no answer yet: the server is down or wrong
_DOWN = "down"  # ask_all's stop for a server that answers nothing, worded once the requests in flight are counted
BUSY_BEFORE_STOP = 16  # this many busy failures (timeouts, 429, 503) and no answer yet: come back later


def ask_all(backend: Backend, neurons: list[dict], question: Question, out: AnswerLog, workers: int) -> dict[int, str]:
    """Ask every neuron on ``workers`` threads; each answer is appended to ``out`` as it arrives.

    Returns ``{neuron_id: error}`` for the neurons that failed. A fatal error (bad token,
    unknown model, a server that cannot be reached: :attr:`LLMError.unreachable`), or a client
    error (400, 422: say, a model that takes no images) on the first ``REFUSALS_BEFORE_STOP`` neurons with no answer between, or ``FAILURES_BEFORE_STOP``
    failures that are not of a busy server (:attr:`LLMError.busy`: timeouts, rate limits,
    overload) with none answered (a server that is down or answers garbage: each neuron costs
    its retries), or ``BUSY_BEFORE_STOP`` busy failures with none answered, stops submitting and
    raises a :class:`UserError`; a busy server that answers some neurons only fails the others,
    listed for a rerun. Ctrl-C stops
    submitting, lets the requests in flight finish (their answers are saved) and re-raises.
    """
    system, version = prompts.system_prompt(question.max_words), prompts.prompt_version()

    def task(neuron: dict) -> None:  # on a worker thread: the answer is on disk before anything else happens
        out.append(ask_neuron(backend, neuron, question, system, version))

    failures, fatal, answered, refused, broken, busy = {}, None, 0, 0, 0, 0
    pool = ThreadPoolExecutor(max_workers=workers)
    futures = {pool.submit(task, n): n["neuron_id"] for n in neurons}
    try:
        for fut in tqdm(as_completed(futures), total=len(futures), desc="concepts", unit="neuron", disable=None):
            exc = _failure(fut)
            if exc is None:
                answered += 1
                continue
            nid = futures[fut]
            message = str(exc) if isinstance(exc, LLMError) else f"{type(exc).__name__}: {exc}"
            failures[nid] = prompts.strip_controls(backend.scrub(message))
            log(f"neuron {nid}: failed: {failures[nid]}")
            status = getattr(exc, "status", None) or 0
            refused += not answered and 400 <= status < 500 and status not in RETRY_STATUSES  # 429 is not a refusal
            broken += not answered and not getattr(exc, "busy", False)  # LLMError.busy: timeouts, 429, 503...
            busy += not answered and getattr(exc, "busy", False)
            if fatal is None and getattr(exc, "unreachable", False):
                fatal = f"{backend.name}: {failures[nid]}: is the server up, and is BASE_URL right?"
            elif fatal is None and (getattr(exc, "fatal", False) or refused >= REFUSALS_BEFORE_STOP):
                fatal = f"{backend.name} refused the requests ({failures[nid]})"
            elif fatal is None and broken >= FAILURES_BEFORE_STOP:  # worded below: those in flight fail too
                fatal = _DOWN
            elif fatal is None and busy >= BUSY_BEFORE_STOP:  # each busy neuron costs its retries and their waits
                fatal = (f"{backend.name}: the server was busy (timeouts, rate limits) for {busy} neurons and "
                         f"answered none (the last: {failures[nid]}); rerun later, or with fewer WORKERS")
            if fatal is not None:
                for other in futures:
                    other.cancel()
    except KeyboardInterrupt:
        in_flight = sum(f.running() for f in futures)
        log(f"interrupted: no new requests; waiting for the {in_flight} in flight, whose answers are saved "
            "(Ctrl-C again to quit now without them)")
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    if fatal is _DOWN:
        fatal = (f"{backend.name}: {len(failures)} neurons failed and none was answered (the last: "
                 f"{failures[nid]}); check that the server is up and BASE_URL and MODEL are right")
    if fatal:
        error = UserError(f"{fatal}; answers so far are kept, rerun to resume")
        error.failures = failures  # the neurons that failed before the stop, for llm_summary.json
        raise error
    return failures
