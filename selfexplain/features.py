"""Run the frozen classifier once and collect what later stages need from it.

:func:`iter_feature_maps` streams layer4 maps and logits; :func:`cache_tokens` stores
the layer4 tokens of a set of images once (stage 2 trains on them for many epochs) and
:func:`standardization` turns their sums into the per-channel μ, σ the SAE records.
"""
from __future__ import annotations

import errno
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from tqdm.auto import tqdm

from . import artifacts, data
from .distributed import Runtime, all_reduce_sum, autocast
from .errors import UserError
from .sae import tokens_of


@torch.no_grad()
def iter_feature_maps(model, images: np.ndarray, indices: np.ndarray, prep: dict, device: torch.device,
                      batch_size: int = 256, amp: str = "auto", progress: bool = False,
                      desc: str = "features") -> Iterator[tuple[np.ndarray, torch.Tensor, torch.Tensor]]:
    """Yield (indices, layer4 map float32 (B, C, H, W), logits float32 (B, classes)) over ``indices``.

    Indices come back in sorted order within each batch (memmap-friendly); the caller
    keeps them to align results.
    """
    model.eval()
    bar = tqdm(total=len(indices), desc=desc, unit="img", disable=None if progress else True, leave=False)
    for xb, _, idx in data.batches(images, np.zeros(len(images), dtype=np.int64), np.sort(indices), batch_size):
        x = data.model_input(xb, prep, device)
        with autocast(device, amp):
            fmap = model.features(x)
        fmap = fmap.float()
        yield idx, fmap, model.head(fmap).float()
        bar.update(len(idx))
    bar.close()


# ----------------------------------------------------------------------------- token cache
@dataclass
class TokenStore:
    """Cached layer4 tokens of some images: fp16 (N, C), image-major, H*W tokens per image.

    ``tokens`` is an in-RAM array or an ``np.memmap`` on disk; ``image_index`` holds the
    dataset index of each image (in token order) and ``hw`` the map's (H, W).
    """

    tokens: np.ndarray
    image_index: np.ndarray
    hw: tuple[int, int]

    @property
    def n_tokens(self) -> int:
        return len(self.tokens)

    def iter_batches(self, batch_size: int, seed, n_batches: int, chunk: int = 1 << 18):
        """Yield ``n_batches`` shuffled fp16 batches (torch) of ``batch_size`` tokens.

        Shuffles fully when in RAM; a memmap is read chunk by chunk (chunk order and rows
        within a chunk shuffled) so reads stay sequential.
        """
        rng = np.random.default_rng(seed)
        n = self.n_tokens
        in_ram = not isinstance(self.tokens, np.memmap)
        if in_ram:  # gather batch by batch: a shuffled copy of all tokens would double the RAM they take
            order = rng.permutation(n)
            for b in range(min(n_batches, n // batch_size)):
                yield torch.from_numpy(self.tokens[order[b * batch_size:(b + 1) * batch_size]])
            return
        starts = list(rng.permutation(np.arange(0, n, chunk)))
        carry, made = None, 0
        for s in starts:
            block = np.asarray(self.tokens[s:s + chunk])
            block = block[rng.permutation(len(block))]
            if carry is not None:
                block = np.concatenate([carry, block])
            full = len(block) // batch_size
            for b in range(full):
                if made == n_batches:
                    return
                yield torch.from_numpy(block[b * batch_size:(b + 1) * batch_size])
                made += 1
            carry = block[full * batch_size:]


def map_shape(model, image_size: int, device) -> tuple[int, int, int]:
    """(C, H, W) of the layer4 map for ``image_size`` inputs."""
    with torch.no_grad():
        fmap = model.eval().features(torch.zeros(1, 1, image_size, image_size, device=device))
    return tuple(fmap.shape[1:])


def reserve_disk(path: Path) -> None:
    """Allocate a (sparse, memory-mapped) file's blocks now, so a full disk is an error here."""
    if not hasattr(os, "posix_fallocate"):  # Windows, macOS: the write itself reports it
        return
    with open(path, "r+b") as fh:
        try:
            os.posix_fallocate(fh.fileno(), 0, os.path.getsize(path))
        except OSError as exc:
            if exc.errno in (errno.EOPNOTSUPP, errno.EINVAL):  # a file system without it
                return
            raise UserError(f"cannot cache tokens in {path.parent}: {exc.strerror} (need "
                            f"{os.path.getsize(path) / 2 ** 30:.1f} GiB; free space, set CACHE_DIR elsewhere or raise "
                            f"TOKEN_RAM_GB)") from None


def cache_tokens(model, images: np.ndarray, indices: np.ndarray, prep: dict, device: torch.device, *,
                 ram_gb: float, disk_path: str | Path, batch_size: int = 256, progress: bool = False,
                 stats: bool = False) -> tuple[TokenStore, tuple | None]:
    """Run the frozen backbone once over ``indices`` in fp32 and store the tokens as fp16.

    The backbone runs in fp32 whatever the training precision: stages 3 and 5 explain
    fp32 features, so the SAE must be fitted to those, not to bf16 ones.

    Returns (TokenStore, sums) where ``sums`` = (n, Σa, Σa²) in float64 when ``stats``.
    Tokens go to RAM when they fit in ``ram_gb``, else to a memory-mapped ``.npy`` at
    ``disk_path`` (written to a temp name, renamed when complete, reused next time: the
    caller makes the name unique to the classifier and the exact images).
    """
    c, h, w = map_shape(model, prep["image_size"], device)
    indices = np.sort(np.asarray(indices))
    n_tok = len(indices) * h * w
    disk_path = Path(disk_path)
    on_disk = n_tok * c * 2 > ram_gb * 2 ** 30
    sums_path = disk_path.with_name(disk_path.name + ".sums.npz")  # (Σa, Σa²) of a stats pass, kept beside it
    if on_disk and disk_path.is_file() and (sums_path.is_file() or not stats):
        arr = np.load(disk_path, mmap_mode="r")
        if arr.shape == (n_tok, c):
            if not stats:
                return TokenStore(arr, indices, (h, w)), None
            saved = np.load(sums_path)
            return TokenStore(arr, indices, (h, w)), (n_tok, *(torch.from_numpy(saved[k]).to(device) for k in ("sum", "sq")))
    tmp = disk_path.with_name(f"{disk_path.name}.tmp{os.getpid()}.npy")  # two runs never share a temp file
    if on_disk:
        artifacts.remove_stale_builds(disk_path.parent)  # full-size temp files of killed runs
    try:
        if on_disk:
            disk_path.parent.mkdir(parents=True, exist_ok=True)
            arr = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16, shape=(n_tok, c))
            reserve_disk(tmp)  # a sparse file on a full disk would end in SIGBUS mid-pass, with no message
        else:
            arr = np.empty((n_tok, c), dtype=np.float16)
        sums = _fill_tokens(arr, model, images, indices, prep, device, batch_size, progress, stats)
        if on_disk:
            arr.flush()
            del arr
            if stats:  # the sums land first: tokens without them would be recomputed, never misread
                artifacts.atomic_write(sums_path, lambda fh: np.savez(fh, sum=sums[0].cpu().numpy(),
                                                                      sq=sums[1].cpu().numpy()))
            tmp.replace(disk_path)
            arr = np.load(disk_path, mmap_mode="r")
    except BaseException:  # interrupted or failed: no full-size temporary file left behind
        tmp.unlink(missing_ok=True)
        raise
    return TokenStore(arr, indices, (h, w)), ((n_tok, *sums) if stats else None)


def _fill_tokens(arr, model, images, indices, prep, device, batch_size, progress, stats):
    """Write the fp32 backbone's tokens into ``arr``; returns (Σa, Σa²) in float64."""
    c = arr.shape[1]
    s1 = torch.zeros(c, dtype=torch.float64, device=device)
    s2 = torch.zeros(c, dtype=torch.float64, device=device)
    pos = 0
    for _, fmap, _ in iter_feature_maps(model, images, indices, prep, device, batch_size, "off", progress, "tokens"):
        tok = tokens_of(fmap)
        if stats:  # float64 accumulation: sums over ~10^6 tokens lose precision in fp32
            s1 += tok.double().sum(0)
            s2 += tok.double().pow(2).sum(0)
        arr[pos:pos + len(tok)] = tok.clamp(-6e4, 6e4).half().cpu().numpy()
        pos += len(tok)
    return s1, s2


def standardization(n: int, s1: torch.Tensor, s2: torch.Tensor, runtime: Runtime) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel μ, σ over all ranks' training tokens (float64 sums, all-reduced).

    A channel whose σ is below 1% of the median σ (e.g. always 0 after the ReLU) gets
    that floor, so a rare non-zero value on new data cannot explode after dividing.
    """
    total = all_reduce_sum(torch.cat([s1, s2, torch.tensor([float(n)], dtype=torch.float64, device=s1.device)]),
                           runtime)
    c = len(s1)
    count = total[-1]
    mu = total[:c] / count
    var = (total[c:2 * c] / count - mu ** 2).clamp_min(0)
    sigma = var.sqrt()
    floor = 0.01 * sigma.median().clamp_min(1e-8)
    return mu.float(), sigma.clamp_min(floor).float()
