"""Save and load every artifact of the pipeline, atomically.

One module owns the on-disk formats:

* checkpoints (``best.pt``, ``last.pt``, ``best_sae.pt``, ``last_sae.pt``): dicts of
  tensors and plain JSON-able values, written to a temp file then renamed, read back
  with ``torch.load(weights_only=True)`` so a malicious pickle never executes;
* JSON files (``metrics.json``, ``summary.json``, ``label_decoder.json``, configs);
* JSONL files (``neurons.jsonl``, ``llm_output.jsonl``): whole lines only, so a crash
  never leaves half a record, and readers drop a torn tail.
"""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Iterable

import torch

from .errors import UserError
from .model import build_classifier
from .sae import TopKSAE

CHECKPOINT_FORMAT = 1  # bumped when the checkpoint layout changes; loads refuse other versions

# ----------------------------------------------------------------------------- names (contract)
# Every file name the pipeline reads or writes, in one place (see DESIGN.md, "Artifacts").
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

# Which script produces which artifact: used to tell users what to run first.
PRODUCER = {
    "classifier": "train_standard_cnn.py",
    "sae": "train_sae.py",
    "report": "sae_summarize.py",
    "llm": "sae_summary_to_llm.py",
}


# ----------------------------------------------------------------------------- files
def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` via a temp file in the same folder and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


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
    return f"{path} not found{hint}"


# ----------------------------------------------------------------------------- JSONL
def append_jsonl(path: str | os.PathLike, record: dict) -> None:
    """Append one record as a single ``write`` of a whole line, then fsync."""
    line = json.dumps(record, default=_json_default, ensure_ascii=False) + "\n"
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(line)
        fh.flush()
        os.fsync(fh.fileno())


def read_jsonl(path: str | os.PathLike, repair: bool = False) -> list[dict]:
    """Read whole records of a JSONL file; a torn last line (crash mid-write) is dropped.

    With ``repair=True`` the torn tail is also cut from the file so appends stay clean.
    """
    path = Path(path)
    if not path.is_file():
        return []
    raw = path.read_bytes()
    records, good_end = [], 0
    for line in raw.splitlines(keepends=True):
        if not line.endswith(b"\n"):
            break
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            break
        good_end += len(line)
    if repair and good_end != len(raw):
        with open(path, "r+b") as fh:
            fh.truncate(good_end)
    return records


def write_jsonl(path: str | os.PathLike, records: Iterable[dict]) -> Path:
    """Atomically write a whole JSONL file."""
    text = "".join(json.dumps(r, default=_json_default, ensure_ascii=False) + "\n" for r in records)
    return atomic_write_bytes(path, text.encode("utf-8"))


# ----------------------------------------------------------------------------- checkpoints
def save_checkpoint(obj: dict, path: str | os.PathLike) -> Path:
    """Atomically save a checkpoint dict (tensors and plain values only)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        torch.save(obj, tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


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
        first = str(exc).strip().splitlines()[0][:160]
        raise UserError(f"{path} refused: it holds objects a safe load will not run ({first})")
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as exc:
        first = (str(exc).strip().splitlines() or [exc.__class__.__name__])[0][:160]
        raise UserError(f"{path} is truncated or not a checkpoint ({first}); rerun {PRODUCER.get(kind, 'its stage')}")
    if not isinstance(ckpt, dict) or ckpt.get("kind") != kind:
        found = ckpt.get("kind") if isinstance(ckpt, dict) else type(ckpt).__name__
        raise UserError(f"{path} is not a {kind} checkpoint (found {found!r})")
    if ckpt.get("format") != CHECKPOINT_FORMAT:
        raise UserError(f"{path} has checkpoint format {ckpt.get('format')!r}, this code reads format "
                        f"{CHECKPOINT_FORMAT}; rerun {PRODUCER.get(kind, 'its stage')}")
    return ckpt


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
def open_tensorboard(out_dir: str | os.PathLike, enabled: bool = True):
    """A SummaryWriter on ``out_dir/tb``, or None when disabled or tensorboard is missing."""
    if not enabled:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter  # optional at run time: imported only when asked for
    except ImportError:
        print("tensorboard not installed: no TensorBoard logs", file=sys.stderr)
        return None
    return SummaryWriter(str(Path(out_dir) / TENSORBOARD_DIR))


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
    """Rebuild the classifier from its checkpoint; returns (model in eval mode, checkpoint)."""
    ckpt = load_checkpoint(path, "classifier")
    model = build_classifier(ckpt["arch"])
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as exc:
        raise UserError(f"{path} does not match its recorded architecture ({str(exc).splitlines()[0]})")
    return model.to(device).eval(), ckpt


# ----------------------------------------------------------------------------- SAE
def sae_checkpoint(sae: torch.nn.Module, *, classifier_fingerprint: str, classifier_path: str, config: dict,
                   epoch: int, metrics: dict, usage_ema: torch.Tensor, **extra) -> dict:
    """The SAE checkpoint: weights, μ, σ, M, K, usage EMA and the classifier's fingerprint."""
    state = {k: v.detach().to("cpu", torch.float32) for k, v in sae.state_dict().items()}
    ckpt = {
        "kind": "sae", "format": CHECKPOINT_FORMAT, "d_in": sae.d_in, "n_latents": sae.n_latents, "k": sae.k,
        "state": state, "mu": state["mu"], "sigma": state["sigma"], "usage_ema": usage_ema.detach().to("cpu"),
        "classifier_fingerprint": classifier_fingerprint, "classifier_path": str(classifier_path),
        "config": dict(config), "epoch": int(epoch), "metrics": dict(metrics),
    }
    ckpt.update(extra)
    return ckpt


def load_sae(path: str | os.PathLike, classifier_ckpt: dict | None = None,
             device: str | torch.device = "cpu") -> tuple[torch.nn.Module, dict]:
    """Rebuild the SAE; with ``classifier_ckpt``, refuse a pair trained on another classifier."""
    ckpt = load_checkpoint(path, "sae")
    if classifier_ckpt is not None and ckpt["classifier_fingerprint"] != classifier_ckpt["fingerprint"]:
        raise UserError(
            f"{path} was trained on classifier {ckpt['classifier_fingerprint']} ({ckpt['classifier_path']}) "
            f"but the classifier given is {classifier_ckpt['fingerprint']}; retrain with train_sae.py or "
            "point CLASSIFIER_CKPT at the matching checkpoint")
    sae = TopKSAE(ckpt["d_in"], ckpt["n_latents"], ckpt["k"])
    try:
        sae.load_state_dict(ckpt["state"])
    except RuntimeError as exc:
        raise UserError(f"{path} does not match its recorded shape ({str(exc).splitlines()[0]})")
    return sae.to(device).eval(), ckpt
