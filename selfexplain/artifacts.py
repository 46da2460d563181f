"""Save and load every artifact of the pipeline, atomically.

One module owns the on-disk formats:

* checkpoints (``best.pt``, ``last.pt``, ``best_sae.pt``, ``last_sae.pt``): dicts of
  tensors and plain JSON-able values, written to a temp file then renamed, read back
  with ``torch.load(weights_only=True)`` so a malicious pickle never executes;
* JSON files (``metrics.json``, ``summary.json``, ``label_decoder.json``, configs);
* JSONL files (``neurons.jsonl``, ``llm_output.jsonl``): whole lines only, so a crash
  never leaves half a record, and readers set damaged lines aside and keep the rest.

Written files get the mode a plain ``open`` would give them (0666 less the umask), and
a failed write (disk full, read-only folder) is a one-line :class:`UserError` naming
the path.
"""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import shutil
import sys
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterable

try:
    import fcntl
except ImportError:  # Windows: msvcrt locks a byte range instead
    fcntl = None
    import msvcrt

import torch

from .distributed import exact_fp32_convs, sigterm_held
from .errors import UserError
from .logs import log
from .model import build_classifier
from .sae import TopKSAE

# bumped when the checkpoint layout changes; loads refuse other versions
# (2: SAE checkpoints carry their own fingerprint; loop state as TrainState fields)
CHECKPOINT_FORMAT = 2

# ----------------------------------------------------------------------------- names (contract)
# Every file name the pipeline reads or writes, in one place (a contract: stages, tests and users rely on them).
CLASSIFIER_DIR = "runs/standard_cnn"              # stage 1's default OUT_DIR
SAE_DIR = "runs/sae_topk"                         # stage 2's default OUT_DIR
REPORT_DIR = "neuron_report"                      # stage 3's default OUT_DIR, stages 4-5's REPORT_DIR
CACHE_DIR = "cache"                               # decoded-image and token caches
BEST_CLASSIFIER = "best.pt"                       # stage 1: best validation accuracy
LAST_CLASSIFIER = "last.pt"                       # stage 1: every epoch, with optimiser state
BEST_SAE = "best_sae.pt"                          # stage 2: lowest validation FVU
LAST_SAE = "last_sae.pt"                          # stage 2: every epoch, with optimiser state
CLASSIFIER_CKPT = f"{CLASSIFIER_DIR}/{BEST_CLASSIFIER}"  # default CLASSIFIER_CKPT of stages 2-5
SAE_CKPT = f"{SAE_DIR}/{BEST_SAE}"                # default SAE_CKPT of stages 3-5
LABEL_DECODER = "label_decoder.json"              # stage 1: {"0": "airplane", ...}
METRICS = "metrics.json"                          # stages 1-2
CONFIG = "config.json"                            # every stage's effective config
TENSORBOARD_DIR = "tb"                            # stages 1-2
NEURONS = "neurons.jsonl"                         # stage 3: one object per neuron
SUMMARY = "summary.json"                          # stage 3: counts, fingerprints, concept measures
INDEX_HTML = "index.html"                         # stage 3 (refreshed by stage 4): the atlas
THUMBS_DIR = "thumbs"                             # stage 3: top-example thumbnails
SPRITES_DIR = "sprites"                           # stage 3: one strip per neuron
LLM_OUTPUT = "llm_output.jsonl"                   # stage 4: {neuron_id, answer, ...}
LLM_CONFIG = "llm_config.json"                    # stage 4's effective config
LLM_SUMMARY = "llm_summary.json"                  # stage 4: counts and failures
FAMILIARITY = "familiarity.json"                  # stage 5: validation calibration of the "unfamiliar" flag
# What marks an earlier run in a trainer's OUT_DIR (see prepare_out_dir).
CLASSIFIER_OUTPUTS = (BEST_CLASSIFIER, LAST_CLASSIFIER, METRICS, TENSORBOARD_DIR, CONFIG, LABEL_DECODER)
SAE_OUTPUTS = (BEST_SAE, LAST_SAE, METRICS, TENSORBOARD_DIR, CONFIG)
ALL_OUTPUTS = frozenset(CLASSIFIER_OUTPUTS + SAE_OUTPUTS)  # what a stage-1 or stage-2 run folder may hold
LEFTOVERS = (TENSORBOARD_DIR, CONFIG, LABEL_DECODER)  # alone, they are a run that saved no checkpoint
REPLACED_DIR = ".replaced"  # an overwritten run waits here until the new run's first checkpoint

# Which script produces which artifact: used to tell users what to run first.
PRODUCER = {
    "classifier": "train_standard_cnn.py",
    "sae": "train_sae.py",
    "report": "sae_summarize.py",
    "llm": "sae_summary_to_llm.py",
}


# ----------------------------------------------------------------------------- files
def _new_file_mode() -> int:
    """The mode ``open`` gives a new file (0666 less the umask); ``mkstemp`` would give 0600."""
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], Any]) -> Path:
    """Call ``write(fh)`` on a temp file in ``path``'s folder, fsync, then rename it to ``path``.

    Readers see the old file or the new one, never half of one; an interruption
    (exception, Ctrl-C) removes the temp file, and a SIGTERM (turned into SystemExit by
    ``exit_on_sigterm``) is held until the rename, then exits. An
    OSError (disk full, read-only folder) becomes a one-line :class:`UserError`.
    """
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with sigterm_held():  # a SIGTERM mid-write exits once the file is whole (held from before the temp exists)
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{os.getpid()}", dir=path.parent)
            with os.fdopen(fd, "wb") as fh:
                write(fh)
                fh.flush()
                os.fsync(fh.fileno())
            os.chmod(tmp, _new_file_mode())
            os.replace(tmp, path)
    except BaseException as exc:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise UserError(f"cannot write {path}: {exc.strerror or exc}") from None
        if isinstance(exc, RuntimeError) and "unexpected pos" in str(exc):  # torch.save's word for a full disk
            raise UserError(f"cannot write {path}: the write stopped short (is the disk full?)") from None
        raise
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_write`)."""
    return atomic_write(path, lambda fh: fh.write(data))


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Atomically write ``obj`` as indented JSON."""
    text = json.dumps(obj, indent=2, default=_json_default) + "\n"
    return atomic_write_bytes(path, text.encode())


def read_json(path: str | os.PathLike, producer: str | None = None) -> Any:
    """Read a JSON file; a missing or corrupt one is a :class:`UserError`."""
    path = Path(path)
    if not path.is_file():
        raise UserError(missing_message(path, producer))
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{path} is not valid JSON ({exc.__class__.__name__}); delete it and rerun")


def _json_default(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if hasattr(obj, "item"):
        return obj.item()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def save_effective_config(cfg: dict, out_dir: str | os.PathLike, name: str = CONFIG) -> Path:
    """Write a stage's effective config into its output folder (atomically)."""
    return write_json(Path(out_dir) / name, dict(cfg))


def missing_message(path: Path, producer: str | None) -> str:
    """The one-line error for a missing artifact, naming the script that makes it."""
    script = PRODUCER.get(producer or "", producer)
    hint = f"; run {script} first" if script else ""
    if (Path(path).parent / REPLACED_DIR / Path(path).name).is_file():
        hint = (f"; an interrupted --overwrite kept the earlier one in {Path(path).parent / REPLACED_DIR}: "
                "move its files back, or rerun the stage")
    if Path(path).is_dir():  # a run folder given where its checkpoint file was meant
        inside = sorted(p.name for p in Path(path).glob("*.pt"))
        return (f"{path} is a folder, not a file" +
                (f": did you mean {Path(path) / inside[0]}? ({', '.join(inside)} there)" if inside else ""))
    where = "" if Path(path).is_absolute() else f" (from {Path.cwd()})"  # a notebook elsewhere reads runs/ there
    return f"{path} not found{where}{hint}"


# ----------------------------------------------------------------------------- JSONL
def append_jsonl(path: str | os.PathLike, record: dict) -> None:
    """Append one record as a single ``write`` of a whole line, then fsync."""
    line = json.dumps(record, default=_json_default, ensure_ascii=False) + "\n"
    try:
        with open(path, "a", encoding="utf-8") as fh:
            fh.write(line)
            fh.flush()
            os.fsync(fh.fileno())
    except OSError as exc:
        raise UserError(f"cannot write {path}: {exc.strerror or exc}") from None


def _parse_record(line: bytes) -> dict | None:
    """One JSONL line as a dict, or None when it is torn, not UTF-8, not JSON or not an object."""
    if not line.endswith(b"\n"):
        return None
    try:
        record = json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    return record if isinstance(record, dict) else None


def read_jsonl(path: str | os.PathLike, repair: bool = False) -> list[dict]:
    """The intact records of a JSONL file, in order.

    Damaged lines (a torn last line from a crash mid-write, invalid UTF-8 or JSON, a line
    that is not a JSON object) are skipped, never the good lines after them. With
    ``repair=True`` the file is rewritten atomically without the damaged lines, so
    appends stay clean; good lines are kept byte for byte.
    """
    path = Path(path)
    if not path.is_file():
        return []
    raw = path.read_bytes()
    records, good = [], []
    for line in raw.splitlines(keepends=True):
        record = _parse_record(line)
        if record is not None:
            records.append(record)
            good.append(line)
    if repair and len(good) != len(raw.splitlines()):
        atomic_write_bytes(path, b"".join(good))
    return records


def write_jsonl(path: str | os.PathLike, records: Iterable[dict]) -> Path:
    """Atomically write a whole JSONL file."""
    text = "".join(json.dumps(r, default=_json_default, ensure_ascii=False) + "\n" for r in records)
    return atomic_write_bytes(path, text.encode("utf-8"))


# ----------------------------------------------------------------------------- checkpoints
def save_checkpoint(obj: dict, path: str | os.PathLike) -> Path:
    """Atomically save a checkpoint dict (tensors and plain values only)."""
    return atomic_write(path, lambda fh: torch.save(obj, fh))


def load_checkpoint(path: str | os.PathLike, kind: str, map_location: str | torch.device = "cpu") -> dict:
    """Load a checkpoint safely (``weights_only=True``) and check what it is.

    Parameters
    ----------
    path : checkpoint file.
    kind : ``"classifier"`` or ``"sae"``; checked against the checkpoint's ``kind`` field.

    Raises
    ------
    UserError
        Missing, truncated, not a checkpoint, unsafe pickle, or the wrong kind.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(missing_message(path, kind))
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        unsafe = re.search(r"[Uu]nsupported (?:global: )?GLOBAL (\S+)", str(exc))
        if unsafe:  # a real pickle of some class: name it, never load it
            raise UserError(f"{path} refused: it holds objects a safe load will not run ({unsafe.group(1)})")
        detail = re.search(r"WeightsUnpickler error: *(\S.*)", str(exc))  # torch's own reason, when it gives one
        raise UserError(f"{path} is not a checkpoint a safe load can read"
                        f"{f' ({detail.group(1)[:160]})' if detail else ''}; rerun {PRODUCER.get(kind, 'its stage')}"
                        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError, KeyError) as exc:
        first = (str(exc).strip().splitlines() or [exc.__class__.__name__])[0][:160]
        raise UserError(f"{path} is truncated or not a checkpoint ({first}); rerun {PRODUCER.get(kind, 'its stage')}")
    if not isinstance(ckpt, dict) or ckpt.get("kind") != kind:
        found = ckpt.get("kind") if isinstance(ckpt, dict) else type(ckpt).__name__
        raise UserError(f"{path} is not a {kind} checkpoint (found {found!r})")
    if ckpt.get("format") != CHECKPOINT_FORMAT:
        raise UserError(f"{path} has checkpoint format {ckpt.get('format')!r}, this code reads format "
                        f"{CHECKPOINT_FORMAT}; rerun {PRODUCER.get(kind, 'its stage')}")
    verify_fingerprint(ckpt, path)
    return ckpt


WEIGHTS_KEY = {"classifier": "model", "sae": "state"}  # where each kind of checkpoint keeps its weights


def verify_fingerprint(ckpt: dict, path: str | os.PathLike = "checkpoint") -> str:
    """Recompute a checkpoint's fingerprint from its weights; refuse it when the stored one differs.

    The stored field is only a claim: weights edited after saving (or a damaged file
    that still unpickles) must not pass as the model they were.
    """
    actual = tensor_fingerprint(ckpt[WEIGHTS_KEY[ckpt["kind"]]])
    if actual != ckpt.get("fingerprint"):
        raise UserError(f"{path}: its weights do not match its recorded fingerprint ({actual} != "
                        f"{ckpt.get('fingerprint')}); it was modified after saving, rerun "
                        f"{PRODUCER.get(ckpt['kind'], 'its stage')}")
    return actual


def tensor_fingerprint(state_dict: dict) -> str:
    """A short SHA-256 over a state dict's names, shapes and values (order-independent)."""
    digest = hashlib.sha256()
    for name in sorted(state_dict):
        tensor = state_dict[name]
        if not torch.is_tensor(tensor):
            continue
        t = tensor.detach().to("cpu").contiguous().reshape(-1)
        digest.update(name.encode())
        digest.update(str(tuple(t.shape)).encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()[:16]


# ----------------------------------------------------------------------------- TensorBoard
def open_tensorboard(out_dir: str | os.PathLike, enabled: bool = True, first_epoch: int = 1):
    """A SummaryWriter on ``out_dir/tb``, or None when disabled or tensorboard is missing.

    Events logged at or after ``first_epoch`` by an interrupted run are purged, so a
    resumed run does not draw two curves over the same epochs.
    """
    if not enabled:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter  # optional at run time: imported only when asked for
    except ImportError:
        log("tensorboard not installed: no TensorBoard logs")
        return None
    return SummaryWriter(str(Path(out_dir) / TENSORBOARD_DIR), purge_step=first_epoch if first_epoch > 1 else None)


# ----------------------------------------------------------------------------- run folders
def prepare_out_dir(out_dir: str | os.PathLike, outputs: Iterable[str], *, resume: bool = False,
                    overwrite: bool = False, clear: bool = True, can_resume: bool = True) -> Path:
    """Refuse to mix two runs in one output folder.

    Parameters
    ----------
    out_dir : the stage's output folder.
    outputs : file and folder names (in ``out_dir``) that mark an earlier run; ``LEFTOVERS``
        alone (a run stopped before its first checkpoint) are removed, not refused.
    resume : the run continues the earlier one; nothing is removed.
    can_resume : whether the stage has a ``--resume`` (the refusal names only what exists).
    overwrite : the earlier run's ``outputs`` leave ``out_dir`` (with ``clear``; under DDP only
        rank 0 clears), so its TensorBoard events cannot interleave. They are moved into
        ``REPLACED_DIR`` and deleted by :func:`drop_replaced` once the new run has saved a
        checkpoint: a run stopped before that leaves the earlier model there, not lost.

    Raises
    ------
    UserError
        The folder holds an earlier run and neither ``resume`` nor ``overwrite`` is set,
        or both are.
    """
    out = _require_folder(Path(out_dir))
    outputs = list(outputs)
    if resume and overwrite:
        raise UserError("--resume=True continues the run in OUT_DIR, --overwrite=True replaces it: choose one")
    found = [name for name in outputs if (out / name).exists()]
    leftovers_only = set(found) <= set(LEFTOVERS)
    if (out / REPLACED_DIR).exists() and not (resume or overwrite):
        raise UserError(f"{out / REPLACED_DIR} holds the run an interrupted --overwrite replaced: move its files "
                        "back into OUT_DIR to keep it, or pass --overwrite=True to replace it")
    if found and not (resume or overwrite or leftovers_only):
        hint = "pass --resume=True to continue it or --overwrite=True to replace it" if can_resume else \
            "pass --overwrite=True to replace it"
        raise UserError(f"{out} holds an earlier run ({', '.join(found)}); {hint}")
    if clear:  # this run writes here from now on: a second one at the same time is refused
        hold_out_dir(out)
    if clear and found and leftovers_only and not resume:
        for name in found:  # curves and settings of a run that saved nothing
            remove_path(out / name)
    elif overwrite and clear and found:
        _move_aside(out, found)
    return out


def _require_folder(out: Path) -> Path:
    """``out``, refused when it is a file or cannot be written (checked on the folder, or on the
    nearest existing folder above it): stage 2 learnt that only after its token pass."""
    if out.exists() and not out.is_dir():
        raise UserError(f"OUT_DIR={out} is a file, not a folder: choose a folder for this stage's outputs")
    existing = next((p for p in [out, *out.absolute().parents] if p.exists()), None)
    if existing is not None and not existing.is_dir():
        raise UserError(f"OUT_DIR={out} lies under {existing}, which is a file: choose another output folder")
    if existing is not None and not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"OUT_DIR={out} cannot be written ({existing} is read-only to this user): "
                        "choose another output folder")
    return out


TMP_SUFFIX = re.compile(r"\.tmp(\d+)(?:\.npy|\.npz)?$")  # a file or folder being built by process <pid>


def remove_stale_builds(cache_dir: Path) -> list[Path]:
    """Delete ``*.tmp<pid>`` files and folders (caches, token files, atomic writes, stage 3's staging)
    whose process is gone (a SIGKILL, an OOM kill or a power cut: a cache or a last.pt in the making
    is as large as what it was building).

    Returns what was removed. Those of live processes are left alone; on Windows, where a
    pid cannot be probed without side effects, nothing is removed.
    """
    if sys.platform == "win32" or not cache_dir.is_dir():
        return []
    removed = []
    for path in cache_dir.iterdir():
        match = TMP_SUFFIX.search(path.name)
        if match and not _process_alive(int(match.group(1))):
            remove_path(path)
            removed.append(path)
    return removed


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: an existence check, nothing is sent
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


OUT_DIR_LOCK = ".lock"  # in a stage's OUT_DIR: held by the run writing there
_HELD: dict[Path, Any] = {}  # the lock files this process holds, open until it exits


def hold_out_dir(out_dir: str | os.PathLike) -> None:
    """Lock ``out_dir`` for this process (kept until it exits; taken again by the same process
    at no cost): two runs writing one folder mixed their checkpoints and TensorBoard events."""
    out = Path(out_dir).resolve()
    if out in _HELD:
        return
    _require_folder(out).mkdir(parents=True, exist_ok=True)
    try:
        fh = open(out / OUT_DIR_LOCK, "a+")
    except OSError as exc:
        raise UserError(f"cannot write {out / OUT_DIR_LOCK}: {exc.strerror or exc}") from None
    if not lock_exclusive(fh, per_process=True):
        fh.close()
        raise UserError(f"another run is writing {out} ({OUT_DIR_LOCK} there is locked): wait for it to finish, "
                        f"or choose another output folder")
    _HELD[out] = fh
    for path in remove_stale_builds(out):  # a killed run's temp files (a 120 MB last.pt, a staging folder)
        log(f"removed {path.name}, left by a run that was killed")


def lock_exclusive(fh, per_process: bool = False) -> bool:
    """Take an exclusive lock on an open file without waiting; False when another process holds it.

    ``per_process``: a POSIX record lock, which forked children do not share (stage 1's drawing
    workers would otherwise keep a killed run's folder locked until they exit); else flock.
    """
    try:
        if fcntl is not None:
            (fcntl.lockf if per_process else fcntl.flock)(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        else:
            msvcrt.locking(fh.fileno(), msvcrt.LK_NBLCK, 1)
    except OSError:
        return False
    return True


def _move_aside(out: Path, names: list[str]) -> None:
    """Move ``names`` into ``out/REPLACED_DIR``.

    A folder already there holds a run no later run has replaced yet (each run deletes it
    only after saving a whole checkpoint): it is kept, the names it lacks join it (the rest
    of a move that was interrupted) and the names it has are a stopped run's, deleted.
    """
    aside = out / REPLACED_DIR
    aside.mkdir(parents=True, exist_ok=True)
    for name in names:
        target = out / name
        if not (aside / name).exists():
            os.replace(target, aside / name)
        else:
            remove_path(target)
    log(f"the earlier run in {out} waits in {aside} until this run saves its first checkpoint "
        "(copy its files back to restore it)")


def remove_path(path: Path) -> None:
    """Delete a file or a whole folder."""
    shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)


def schedule_changes(saved_config: dict, current: dict) -> list[tuple[str, str]]:
    """The settings that change the steps per epoch since a run was saved, as (what it was trained with, the
    flag that restores it): the learning-rate schedule counts steps, so a larger BATCH_SIZE (or more processes)
    resumed past its total and trained every epoch at lr 0. A key the saved config lacks (an older run) is
    not compared."""
    changed = [(k, saved_config[k]) for k, v in current.items() if k in saved_config and saved_config[k] != v]
    # WORLD_SIZE (recorded by the scripts, no flag): the processes share each step's batches
    return [(f"{old} process(es)", f"torchrun --nproc_per_node={old}") if k == "WORLD_SIZE"
            else (f"--{k.lower()}={old}", f"--{k.lower()}={old}") for k, old in changed]


def require_same_schedule(path: str | os.PathLike, saved_config: dict, current: dict) -> None:
    """Refuse to resume with settings that change the steps per epoch (:func:`schedule_changes`)."""
    changed = schedule_changes(saved_config, current)
    if changed:
        was = ", ".join(f"{what} ({flag})" if what != flag else what for what, flag in changed)
        raise UserError(f"{path} was trained with {was}, which set its learning-rate schedule: resume with the same "
                        "values, or start a new run with --overwrite=True")


def require_resumable(path: str | os.PathLike) -> None:
    """``--resume=True`` needs ``path`` (a ``last*.pt``); say so plainly when the earlier run saved none."""
    if not Path(path).is_file():
        aside = Path(path).parent / REPLACED_DIR
        if (aside / Path(path).name).is_file():  # an --overwrite stopped before its first checkpoint
            raise UserError(f"nothing to resume: {path} does not exist; the run an interrupted --overwrite replaced "
                            f"is in {aside}: move its files back into OUT_DIR to resume it, or pass "
                            "--overwrite=True to start again")
        others = sorted(p.name for p in Path(path).parent.glob("*") if p.name in ALL_OUTPUTS)
        hint = ("start again with --overwrite=True" if set(others) - set(LEFTOVERS)  # a plain rerun would be refused
                else "start again without --resume=True")
        raise UserError(f"nothing to resume: {path} does not exist (the earlier run saved no whole epoch"
                        f"{'; it left ' + ', '.join(others) if others else ''}); {hint}")


def drop_replaced(out_dir: str | os.PathLike) -> None:
    """Delete the run that ``--overwrite`` moved aside (call after the new run's first whole checkpoint)."""
    aside = Path(out_dir) / REPLACED_DIR
    if aside.exists():
        shutil.rmtree(aside, ignore_errors=True)
        log(f"removed the earlier run kept in {aside}: this run has saved a checkpoint")


# ----------------------------------------------------------------------------- loop state
@dataclass
class TrainState:
    """Where a training loop stands; saved in ``last.pt`` / ``last_sae.pt`` to resume exactly.

    ``best`` is the best validation figure so far: accuracy for the classifier (higher
    is better), FVU for the SAE (lower is better).
    """

    best: float
    epoch: int = 0                                      # last finished epoch
    step: int = 0                                       # optimiser steps taken
    history: list[dict] = field(default_factory=list)   # one row of figures per finished epoch
    planned: int | None = None                          # a resumed run's EPOCHS so far (its config's; not saved twice)

    def to_checkpoint(self) -> dict:
        """The fields a ``last`` checkpoint stores (``epoch`` is stored by the checkpoint itself)."""
        return {"step": self.step, "best": self.best, "history": list(self.history)}

    @classmethod
    def from_checkpoint(cls, ckpt: dict) -> "TrainState":
        return cls(best=ckpt["best"], epoch=ckpt["epoch"], step=ckpt["step"], history=list(ckpt["history"]),
                   planned=(ckpt.get("config") or {}).get("EPOCHS"))

    def resumed_note(self, path: str | os.PathLike, epochs: int) -> str:
        """The log line of a resume. A changed EPOCHS is said: the learning-rate schedule spans EPOCHS, so
        the rate is recomputed (a longer run goes back up the decay) and nothing else would show it."""
        line = f"resumed from {path} after epoch {self.epoch}"
        if self.planned is None or self.planned == epochs:
            return line
        left = (f"{epochs - self.epoch} more epoch(s)" if epochs > self.epoch else "nothing is left to train")
        return (f"{line} of EPOCHS={self.planned}; now EPOCHS={epochs}: the learning-rate schedule is recomputed "
                f"over {epochs} epochs, {left} (resume with --epochs={self.planned} to keep it)")


# ----------------------------------------------------------------------------- label decoder
def write_label_decoder(path: str | os.PathLike, class_names: list[str]) -> Path:
    """``{"0": "airplane", ...}``."""
    return write_json(path, {str(i): name for i, name in enumerate(class_names)})


# ----------------------------------------------------------------------------- classifier
def classifier_checkpoint(model: torch.nn.Module, *, arch: dict, preprocess: dict, dataset: dict,
                          split: dict, class_names: list[str], config: dict, epoch: int,
                          metrics: dict, **extra) -> dict:
    """The self-describing classifier checkpoint: everything later stages need."""
    state = {k: v.detach().to("cpu", torch.float32) if v.is_floating_point() else v.detach().to("cpu")
             for k, v in model.state_dict().items()}
    ckpt = {
        "kind": "classifier", "format": CHECKPOINT_FORMAT, "arch": dict(arch), "model": state,
        "preprocess": dict(preprocess), "dataset": dict(dataset),
        "split": {k: torch.as_tensor(v, dtype=torch.int64) for k, v in split.items()},
        "class_names": list(class_names), "config": dict(config), "epoch": int(epoch),
        "metrics": dict(metrics), "fingerprint": tensor_fingerprint(state),
    }
    ckpt.update(extra)
    return ckpt


def load_classifier(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, dict]:
    """Rebuild the classifier from its checkpoint; returns (model in eval mode, checkpoint).

    Every stage that reads features loads the classifier here, so on CUDA this also turns TF32
    convolutions off (:func:`distributed.exact_fp32_convs`): the features are fp32 on any device.
    """
    ckpt = load_checkpoint(path, "classifier")
    model = build_classifier(ckpt["arch"])
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as exc:
        raise UserError(f"{path} does not match its recorded architecture ({str(exc).splitlines()[0]})")
    exact_fp32_convs(device)
    return model.to(device).eval(), ckpt


# ----------------------------------------------------------------------------- SAE
def sae_checkpoint(sae: torch.nn.Module, *, classifier_fingerprint: str, classifier_path: str, config: dict,
                   epoch: int, metrics: dict, usage_ema: torch.Tensor, **extra) -> dict:
    """The SAE checkpoint: weights, μ, σ, M, K, usage EMA, its own fingerprint and the classifier's.

    ``fingerprint`` (over the SAE's weights) is what concept records and the report cite.
    """
    state = {k: v.detach().to("cpu", torch.float32) for k, v in sae.state_dict().items()}
    ckpt = {
        "kind": "sae", "format": CHECKPOINT_FORMAT, "d_in": sae.d_in, "n_latents": sae.n_latents, "k": sae.k,
        "arch": sae.arch,
        "state": state, "mu": state["mu"], "sigma": state["sigma"], "usage_ema": usage_ema.detach().to("cpu"),
        "fingerprint": tensor_fingerprint(state),
        "classifier_fingerprint": classifier_fingerprint, "classifier_path": str(classifier_path),
        "config": dict(config), "epoch": int(epoch), "metrics": dict(metrics),
    }
    ckpt.update(extra)
    return ckpt


def load_sae(path: str | os.PathLike, classifier_ckpt: dict | None = None,
             device: str | torch.device = "cpu") -> tuple[torch.nn.Module, dict]:
    """Rebuild the SAE; with ``classifier_ckpt``, refuse a pair trained on another classifier.

    The classifier's fingerprint is recomputed from its weights, not taken from its field.
    """
    ckpt = load_checkpoint(path, "sae")
    if classifier_ckpt is not None:
        given = verify_fingerprint(classifier_ckpt, "the classifier checkpoint")
        if ckpt["classifier_fingerprint"] != given:
            raise UserError(
                f"{path} was trained on classifier {ckpt['classifier_fingerprint']} ({ckpt['classifier_path']}) "
                f"but the classifier given is {given}; retrain with train_sae.py or "
                "point CLASSIFIER_CKPT at the matching checkpoint")
    sae = TopKSAE(ckpt["d_in"], ckpt["n_latents"], ckpt["k"], ckpt.get("arch", "topk"))
    try:
        sae.load_state_dict(ckpt["state"])
    except RuntimeError as exc:
        raise UserError(f"{path} does not match its recorded shape ({str(exc).splitlines()[0]})")
    return sae.to(device).eval(), ckpt
