"""Devices, precision and DDP plumbing shared by the training scripts.

A script runs single-process by default. Under ``torchrun`` (``WORLD_SIZE`` > 1) it
joins a process group (NCCL on CUDA, gloo on CPU); when several CUDA devices are
visible and it was started plainly, :func:`maybe_launch_torchrun` re-executes it under
``torchrun`` with one process per GPU.
"""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import math
import os
import signal
import sys
import threading
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from .errors import UserError
from .logs import log

PROCESS_GROUP_TIMEOUT = timedelta(minutes=60)  # collectives wait this long (a rank-0 download included)


@dataclass
class Runtime:
    """Where this process runs: device, rank and world size."""

    device: torch.device
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    in_group: bool = False  # joined a process group (torchrun), even with one process

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        # torchrun with one process still takes the DDP path, so a single GPU checks NCCL
        return self.world_size > 1 or self.in_group

    def describe(self) -> str:
        """Device and world for a run's first log line; names the process group when there is one
        (a one-process torchrun still trains under DDP: the line shows the NCCL/gloo path was taken)."""
        group = f" (DDP on {dist.get_backend()})" if self.in_group and dist.is_initialized() else ""
        return f"device {self.device}, world {self.world_size}{group}"

    def log(self, message: str) -> None:
        """Log a line from rank 0 only (every rank runs the same loop)."""
        if self.is_main:
            log(message)


def resolve_device(preference: str = "auto") -> torch.device:
    """``auto`` picks CUDA when available; asking for CUDA without it is a clear error."""
    preference = (preference or "auto").lower()
    if preference == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if preference.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("DEVICE=cuda but no CUDA device is visible; use --device=cpu or --device=auto")
    if preference not in ("cpu", "cuda") and not preference.startswith("cuda:"):
        raise UserError(f"DEVICE must be auto, cpu or cuda, got '{preference}'")
    return torch.device(preference)


def setup_runtime(preference: str = "auto") -> Runtime:
    """Join the process group when launched by torchrun; else a single process.

    A torchrun launch joins even with one process (DDP and collectives are then
    no-ops in effect), so the NCCL path can be checked on a one-GPU machine.
    """
    device = resolve_device(preference)
    if "TORCHELASTIC_RUN_ID" not in os.environ and int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return Runtime(device=device)
    world = int(os.environ["WORLD_SIZE"])
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    if not dist.is_initialized():
        # 60 min: rank 0 may download and decode a dataset while the others wait at a barrier
        # device_id binds NCCL to this rank's GPU (barriers otherwise guess it, and warn: seen on an H200)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", timeout=PROCESS_GROUP_TIMEOUT,
                                device_id=device if device.type == "cuda" else None)
    return Runtime(device=device, rank=rank, world_size=world, local_rank=local_rank, in_group=True)


def cleanup(runtime: Runtime) -> None:
    if runtime.distributed and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def all_reduce_sum(tensor: torch.Tensor, runtime: Runtime) -> torch.Tensor:
    """Sum a tensor over ranks in place (no-op single-process); returns it."""
    if runtime.distributed:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_min(tensor: torch.Tensor, runtime: Runtime) -> torch.Tensor:
    """Minimum of a tensor over ranks in place (no-op single-process); returns it.

    The tensor must live on ``runtime.device``: NCCL reduces CUDA tensors only.
    """
    if runtime.distributed:
        dist.all_reduce(tensor, op=dist.ReduceOp.MIN)
    return tensor


def broadcast(tensor: torch.Tensor, runtime: Runtime, src: int = 0) -> torch.Tensor:
    if runtime.distributed:
        dist.broadcast(tensor, src=src)
    return tensor


@contextlib.contextmanager
def main_rank_first(runtime: Runtime):
    """Run the block on rank 0, then on the other ranks (a download or a cache build done once, then reused)."""
    if runtime.distributed and not runtime.is_main:
        dist.barrier()
    try:
        yield
    finally:
        if runtime.distributed and runtime.is_main:
            dist.barrier()


def barrier(runtime: Runtime) -> None:
    if runtime.distributed:
        dist.barrier()


def maybe_launch_torchrun(script: str, namespace: dict | None = None, argv: list[str] | None = None) -> None:
    """Re-run ``script`` under torchrun with one process per GPU when several are visible.

    Skipped when already under torchrun, when ``SELFEXPLAIN_NO_DDP=1``, for ``--help``, and when
    the settings (command line and ``--config`` YAML, read with the script's constants from
    ``namespace``) name a device other than auto or cuda (``cpu``, ``cuda:1``). Settings that do not
    parse are not relaunched either: the script itself then says what is wrong in one line (under
    torchrun it was a traceback per process and exit 1).
    """
    from .config import make_config, module_constants, parse_argv  # config reads no torch: no cycle

    argv = sys.argv[1:] if argv is None else argv
    if "WORLD_SIZE" in os.environ or os.environ.get("SELFEXPLAIN_NO_DDP") == "1":
        return
    n_gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if n_gpus < 2:
        return
    try:
        overrides, wants_help = parse_argv(argv)
        device = make_config(module_constants(namespace or {}), overrides).get("DEVICE", "auto")
    except UserError:
        return
    if wants_help or str(device).lower() not in ("auto", "cuda"):
        return
    log(f"{n_gpus} GPUs visible: relaunching under torchrun (set SELFEXPLAIN_NO_DDP=1 to stop this)")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n_gpus}", script, *argv]
    os.execvp(cmd[0], cmd)


def cpu_has_fast_bf16() -> bool:
    """True when the CPU has native bf16 instructions (AVX512-BF16 or AMX).

    Without them bf16 autocast is emulated: measured 14x slower than fp32 for
    ResNet-18 training on an AVX2-only AMD EPYC (an early session; the figure is not in bench/).
    """
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def amp_dtype(device: torch.device, mode: str = "auto") -> torch.dtype | None:
    """The autocast dtype for ``mode`` (auto | bf16 | fp16 | off) on ``device``; None = fp32."""
    mode = str(mode).lower()
    if mode in ("off", "false", "fp32", "none"):
        return None
    if mode == "bf16":
        return torch.bfloat16
    if mode == "fp16":
        return torch.float16
    if mode not in ("auto", "true"):
        raise UserError(f"AMP must be auto, bf16, fp16 or off, got '{mode}'")
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_has_fast_bf16() else None


def precision_note(device: torch.device, mode: str = "auto") -> str:
    """What AMP=``mode`` trains in on ``device``, for the run's first log line (AMP=auto's choice was not
    shown), with a warning for fp16 on a CPU (25x slower than bf16 there: 7 against 175 img/s, measured)."""
    dtype = amp_dtype(device, mode)
    name = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]
    note = f"precision {name} (AMP={mode})"
    if dtype == torch.float16 and device.type == "cpu":
        note += "; warning: fp16 autocast on a CPU is far slower than bf16 or fp32: use --amp=auto"
    return note


def exact_fp32_convs(device: str | torch.device) -> None:
    """Make fp32 convolutions IEEE fp32 on CUDA, for the stages that read the classifier (2-5).

    cuDNN runs fp32 convolutions in TF32 by default (a 10-bit mantissa). On an H200 the cached layer4
    tokens then differed from the CPU's fp32 ones by up to 7e-4 relative (more than their fp16 storage
    rounding), and a recomputation with another batch could disagree with the report. The features
    are documented as fp32, so they are. Matmuls are IEEE fp32 by PyTorch's default already; stage 1's
    training keeps TF32 (it trains in bf16 under AMP=auto anyway) until it loads its best checkpoint to
    test it: the flag is process-wide, so a later training run in the same process (a notebook) is fp32
    exact too. A no-op on CPU.
    """
    if torch.device(device).type == "cuda":
        torch.backends.cudnn.allow_tf32 = False  # the legacy flag sets conv and RNN alike (mixing APIs raises)


def autocast(device: torch.device, mode: str = "auto"):
    """Autocast context for ``mode`` (see :func:`amp_dtype`); a no-op for fp32."""
    dtype = amp_dtype(device, mode)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def set_threads(num_threads: int) -> None:
    """Use ``num_threads`` intra-op threads on CPU (0 keeps torch's default)."""
    if num_threads > 0:
        torch.set_num_threads(num_threads)


def exit_on_sigterm() -> None:
    """Turn SIGTERM (``kill``, a batch scheduler's stop) into ``SystemExit(143)``.

    Python's default for SIGTERM ends the process at once; raised as an exception
    instead, the cleanup paths run (an atomic write removes its temp file, a token
    cache its partial file). Call it from a script's entry point only.
    """
    def handler(signum, frame):
        if _SIGTERM["held"]:  # inside sigterm_held(): exit when the block ends
            _SIGTERM["pending"] = 128 + signum
            return
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)


_SIGTERM = {"held": 0, "pending": None}


@contextlib.contextmanager
def sigterm_interrupts():
    """In the block, SIGTERM raises KeyboardInterrupt: a server stops as on Ctrl-C (``kill``,
    systemd, docker send SIGTERM). Only the main thread can set a handler: elsewhere (a
    notebook serving from a thread) the block runs unchanged."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:  # None: a handler not set from Python (an embedding host); the default then
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


@contextlib.contextmanager
def interrupts_held():
    """Hold Ctrl-C (main thread) and SIGTERM until the block ends, then act on them: for a few
    writes that must land together (stage 3's image swap and the records that point at them)."""
    pending = []
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGINT, lambda signum, frame: pending.append(signum))
    try:
        with sigterm_held():
            yield
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
    if pending:
        raise KeyboardInterrupt


@contextlib.contextmanager
def sigterm_held():
    """Hold the SystemExit of :func:`exit_on_sigterm` until the block ends, then exit.

    For short writes that must not be cut: an exception raised inside ``torch.save``'s
    zip writer leaves it inconsistent, and its own cleanup then fails with a
    RuntimeError (exit 1, not 143). Held, the write completes and the process exits 143.
    """
    _SIGTERM["held"] += 1
    try:
        yield
    finally:
        _SIGTERM["held"] -= 1
        if not _SIGTERM["held"] and _SIGTERM["pending"] is not None:
            code, _SIGTERM["pending"] = _SIGTERM["pending"], None
            raise SystemExit(code)


def keep_freed_memory() -> bool:
    """Tune glibc malloc so a training step's freed buffers are reused, not returned to the OS.

    A CPU step frees and re-requests the same activation buffers every time. By default
    glibc serves the large ones with mmap and unmaps them on free, so every step pays
    ~40k page faults and kernel zeroing; raising the mmap and trim thresholds keeps them
    in the heap (measured on 2 cores, 64 px, batch 64: 2.3M -> 0.3M page faults per 60
    steps, 80-88 -> 95-104 images/s in alternating runs). A no-op
    off glibc, or when the user set MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_.
    Returns True when applied.
    """
    if any(k in os.environ for k in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")):
        return False
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc (macOS, musl, Windows)
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # from <malloc.h>
    # 32 MiB is glibc's largest allowed mmap threshold on 64-bit; a 1 GiB trim threshold
    # lets the heap keep that much freed memory for the next step
    return bool(mallopt(m_mmap_threshold, 32 << 20)) and bool(mallopt(m_trim_threshold, 1 << 30))


def lr_at(step: int, total: int, peak: float, warmup_fraction: float) -> float:
    """Learning rate at ``step`` of ``total``: linear warm-up to ``peak``, then cosine to 0."""
    warmup = max(1, int(total * warmup_fraction))
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * 0.5 * (1 + math.cos(math.pi * progress))
