"""Data layer: decode once into a uint8 cache, split once, batch and augment on tensors.

Every source (``synthetic``, ``tu-berlin``, ``parquet``, ``folder``) ends up as the same
:class:`ImageSet`: a memory-mapped uint8 array (N, S, S) of white-background sketches at
``IMAGE_SIZE``, integer labels and class names, cached on disk under a key built from
the source's fingerprint and the size, so every stage and epoch reads the cache.

Model inputs are "ink" images: ``ink = 1 - pixel/255`` (strokes 1, paper 0), then
standardised with the training mean and std stored in the classifier checkpoint.
Working in ink space makes zero padding in augmentation mean white paper.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .artifacts import CACHE_DIR, read_json, remove_path, remove_stale_builds, write_json
from .config import register_choices, require_choice
from .errors import UserError, some
from .imaging import BadImage, decode_image
from .logs import log
from .sources import describe_source, iter_source
from .synthetic import GENERATOR_VERSION, generate_synthetic
from .synthetic import spec_style

DATASETS = register_choices("DATASET", ("synthetic", "tu-berlin", "parquet", "folder"))
CACHE_VERSION = 3  # bump when decoding changes, so old caches are rebuilt (3: strokes thickened by measured width)


@dataclass
class ImageSet:
    """A decoded dataset: ``images[i]`` is a (S, S) uint8 sketch of class ``labels[i]``."""

    images: np.ndarray
    labels: np.ndarray
    class_names: list[str]
    names: list[str]
    parts: list | None = None  # synthetic only: per image [{"part", "box"}]
    part_types: list[str] | None = None
    origins: list | None = None  # synthetic only: per image (class_index, sample_index), for synthetic.rerender
    skipped: list[dict] = field(default_factory=list)  # [{"source", "reason"}]
    spec: dict = field(default_factory=dict)
    decoded_now: bool = False  # this call decoded the files (and logged each one skipped); else read the cache

    def __len__(self) -> int:
        return len(self.labels)


def dataset_spec(dataset: str, data_root: str | None, image_size: int, **extra) -> dict:
    """The JSON-able description of a dataset that checkpoints record."""
    require_choice("DATASET", dataset, DATASETS)
    if image_size < 32 or image_size % 32:
        raise UserError(f"IMAGE_SIZE must be a multiple of 32 and >= 32, got {image_size}")
    spec = {"dataset": dataset, "data_root": data_root, "image_size": int(image_size)}
    if dataset == "synthetic":  # later stages must see the sketches this classifier was trained on
        spec["generator_version"] = GENERATOR_VERSION
    spec.update(extra)
    return spec


def relocate(spec: dict, data_root: str) -> dict:
    """A checkpoint's dataset spec read from ``data_root`` instead of the folder stage 1 read ('' = as recorded).

    For data that moved (another machine, another folder): the images must be the same
    ones, which :func:`load_dataset` checks by the recorded ``items_digest``.
    """
    if not data_root:
        return spec
    if spec["dataset"] == "synthetic":
        raise UserError("DATA_ROOT: this classifier was trained on the built-in synthetic sketches; there is no "
                        "folder to point at (leave DATA_ROOT empty)")
    return {**spec, "data_root": str(data_root)}


# ----------------------------------------------------------------------------- cache
def load_dataset(spec: dict, cache_dir: str | os.PathLike = CACHE_DIR, progress: bool = True) -> ImageSet:
    """Load a dataset through its on-disk cache, building the cache on first use.

    ``progress`` shows the decoding bar and stage 1's notes on the folder (False on the other DDP ranks)."""
    if spec["dataset"] == "synthetic":
        recorded = spec.get("generator_version", GENERATOR_VERSION)
        if recorded != GENERATOR_VERSION:
            raise UserError(f"this checkpoint was trained on synthetic sketches of generator version {recorded}, "
                            f"this code draws version {GENERATOR_VERSION}; retrain with train_standard_cnn.py")
        key_src = {k: spec.get(k) for k in ("dataset", "image_size", "per_class", "seed")}
        key_src["style"] = spec_style(spec)
        key_src["generator_version"] = GENERATOR_VERSION  # a changed drawing never reuses old sketches
        source = None
    else:
        try:
            # the class folders left out are stage 1's to say (and rank 0's: progress), not every stage's
            source = describe_source(spec["dataset"], spec["data_root"], notes=progress and "items_digest" not in spec)
        except UserError as exc:
            if "items_digest" not in spec:  # stage 1's own settings: the message says it all
                raise
            raise UserError(f"{exc}; if the classifier's data moved, pass --data_root=WHERE_IT_IS_NOW") from None
        key_src = {"dataset": spec["dataset"], "image_size": spec["image_size"], "fingerprint": source["fingerprint"],
                   "classes": "readable only",  # caches built before empty classes were left out are rebuilt
                   "class_names": source["class_names"]}  # names from a README edited since, not only the files
        _refuse_changed_files(spec, source)  # before the decode: minutes for a large folder, then refused
    key_src["version"] = CACHE_VERSION
    key = hashlib.sha256(json.dumps(key_src, sort_keys=True).encode()).hexdigest()[:12]
    folder = Path(cache_dir) / f"{spec['dataset']}-{spec['image_size']}px-{key}"
    decoded_now = not (folder / "meta.json").is_file()
    if decoded_now:
        _build_cache(spec, source, folder, progress)
        if source is not None:  # synthetic caches of other settings are not older versions
            _note_older_caches(folder)
    imageset = _open_cache(folder, spec)
    imageset.decoded_now = decoded_now
    if source is not None:
        _check_items(imageset, spec, source)
    return imageset


def skipped_note(imageset: ImageSet, shown: int = 5) -> str:
    """One line on the files a folder's decoding skipped: named when read from the cache, counted only
    when this run decoded them (each was logged with its reason as it was met)."""
    n = len(imageset.skipped)
    head = f"skipped {n} unreadable image{'s' if n != 1 else ''}"
    if imageset.decoded_now:
        return f"{head} (named above; all listed in metrics.json)"
    named = ", ".join(f"{item['source']} ({item['reason']})" for item in imageset.skipped[:shown])
    return f"{head}: {named}{', ...' if n > shown else ''} (all listed in metrics.json)"


def _note_older_caches(folder: Path) -> None:
    """Say how much disk the caches of earlier versions of this dataset hold (each change to the
    files, even a copy that resets their times, builds a new one: ~1 GB for TU-Berlin at 224 px)."""
    root = read_json(folder / "meta.json").get("data_root")
    older = [p for p in folder.parent.glob(folder.name.rsplit("-", 1)[0] + "-*")  # same source kind and size ...
             if p != folder and p.is_dir() and (p / "meta.json").is_file()
             and root is not None and read_json(p / "meta.json").get("data_root") == root]  # ... and folder
    if older:
        size = sum(f.stat().st_size for p in older for f in p.rglob("*") if f.is_file())
        log(f"{len(older)} older cache(s) of this dataset in {folder.parent} hold {size / 2 ** 30:.2f} GB "
            f"({some(p.name for p in older)}): delete them if no "
            "checkpoint reads that data any more")


def _check_items(imageset: ImageSet, spec: dict, source: dict) -> None:
    """Record which images, in which order, a source's indices point at; refuse another list.

    A checkpoint's split is a list of positions in this list: once files are added, removed
    or renamed, the same positions name other images (validation images would train the
    SAE). Modification times alone do not count: a copied or touched folder still loads.
    An image folder's file list is recorded too (:func:`_refuse_changed_files`).
    """
    digest = hashlib.sha256(json.dumps([list(imageset.names), imageset.labels.tolist()]).encode()).hexdigest()[:16]
    recorded = spec.get("items_digest")
    if recorded is not None and recorded != digest:
        count = spec.get("items_count")  # checkpoints before session 12 record the digest alone
        _changed(spec, count, len(imageset.names), "images")
    imageset.spec = {**spec, "items_digest": digest, "items_count": len(imageset.names)}
    if spec["dataset"] == "folder":
        unread = sorted(item["source"] for item in imageset.skipped)
        digest, count = _files_digest(source, unread)
        imageset.spec.update(files_digest=digest, files_count=count, files_unread=unread)


def _files_digest(source: dict, unread: list[str]) -> tuple[str, int]:
    """Digest and count of an image folder's file list, less the files stage 1 could not read."""
    leave_out = set(unread)
    files = [f for f in source["files"] if f not in leave_out]
    return hashlib.sha256(json.dumps(files).encode()).hexdigest()[:16], len(files)


def _refuse_changed_files(spec: dict, source: dict) -> None:
    """An image folder whose file list differs from the one stage 1 recorded is refused before decoding.

    The list is the class folders' image files (their paths name the class) less those stage 1 could
    not read, so deleting those is no change, and a damaged file added since is one. Parquet is
    checked after decoding only: rewritten shards can hold the same images.
    """
    recorded, unread = spec.get("files_digest"), spec.get("files_unread", [])
    if spec["dataset"] != "folder" or recorded is None:
        return
    digest, count = _files_digest(source, unread)
    if digest != recorded:  # the unread files are left out of both counts
        _changed(spec, spec.get("files_count"), count,
                 f"image files{f' besides the {len(unread)} it could not read' if unread else ''}")


def _changed(spec: dict, count: int | None, now: int, what: str) -> None:
    counts = f" (the classifier's run read {count} {what}, now {now})" if count not in (None, now) else ""
    raise UserError(f"{spec['data_root']} no longer holds the images the classifier was trained on: files were "
                    f"added, removed or renamed, or became unreadable{counts}, so its saved split would index "
                    "other images; restore the folder or retrain with train_standard_cnn.py --overwrite=True")


def _open_cache(folder: Path, spec: dict) -> ImageSet:
    meta = read_json(folder / "meta.json")
    images = np.load(folder / "images.npy", mmap_mode="r")
    labels = np.load(folder / "labels.npy")
    return ImageSet(images=images, labels=labels, class_names=meta["class_names"], names=meta["names"],
                    parts=meta.get("parts"), part_types=meta.get("part_types"),
                    origins=[tuple(o) for o in meta["origins"]] if meta.get("origins") else None,
                    skipped=meta.get("skipped", []), spec=spec)


def _build_cache(spec: dict, source: dict | None, folder: Path, progress: bool) -> None:
    """Decode everything into ``folder`` via a temp folder renamed at the end (atomic).

    The temp folder (as large as the cache) is removed if the build fails or is
    interrupted; ones left by killed processes are removed by the next build.
    """
    remove_stale_builds(folder.parent)
    if progress:  # a notebook in another folder builds a second cache where it runs: say where
        log(f"building the image cache in {folder.resolve()} (CACHE_DIR; later runs read it)")
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        meta = _cache_synthetic(spec, tmp, progress) if source is None else _cache_source(spec, source, tmp, progress)
        write_json(tmp / "meta.json", meta)
        try:
            os.replace(tmp, folder)
        except OSError:  # another process (a DDP rank, a second run) finished first: use its cache
            if not (folder / "meta.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _cache_synthetic(spec: dict, tmp: Path, progress: bool) -> dict:
    data = generate_synthetic(spec.get("per_class", 300), spec["image_size"], seed=spec.get("seed", 0),
                              style=spec_style(spec),
                              progress=progress)
    np.save(tmp / "images.npy", data["images"])
    np.save(tmp / "labels.npy", data["labels"].astype(np.int64))
    names = [f"synthetic#{i}" for i in range(len(data["labels"]))]
    return {"class_names": data["class_names"], "names": names, "parts": data["parts"],
            "part_types": data["part_types"], "origins": data["origins"],
            "generator_version": data["generator_version"], "skipped": []}


def _decode_chunk(args: tuple) -> list:
    """Worker: decode a chunk of (name, payload) pairs; returns arrays or error reasons."""
    items, size = args
    out = []
    for name, payload in items:
        try:
            out.append((name, decode_image(payload, size), None))
        except BadImage as exc:
            out.append((name, None, str(exc)))
    return out


def _cache_source(spec: dict, source: dict, tmp: Path, progress: bool) -> dict:
    """Stream a real source through parallel decoding into a memory-mapped array."""
    size, total = spec["image_size"], source["num_items"]
    images = np.lib.format.open_memmap(tmp / "images.npy", mode="w+", dtype=np.uint8, shape=(total, size, size))
    labels, names, skipped = [], [], []
    bar = tqdm(total=total, desc=f"decode {spec['dataset']}", unit="img", disable=None if progress else True)
    workers = 0 if sys.platform == "win32" else min(4, os.cpu_count() or 1)

    def consume(results, chunk_labels):
        for (name, array, reason), label in zip(results, chunk_labels):
            if array is None:
                skipped.append({"source": name, "reason": reason})
                log(f"skipped {name}: {reason}")
            else:
                images[len(labels)] = array
                labels.append(label)
                names.append(name)
        bar.update(len(results))

    pool = ProcessPoolExecutor(workers) if workers > 1 else None
    try:
        pending = []
        for chunk in _chunks(iter_source(source), 64):
            args = ([(n, p) for n, p, _ in chunk], size)
            chunk_labels = [lab for _, _, lab in chunk]
            if pool is None:
                consume(_decode_chunk(args), chunk_labels)
                continue
            pending.append((pool.submit(_decode_chunk, args), chunk_labels))
            while len(pending) > 2 * workers:  # bound memory: payloads in flight
                fut, lab = pending.pop(0)
                consume(fut.result(), lab)
        for fut, lab in pending:
            consume(fut.result(), lab)
    finally:  # on Ctrl-C or an error, queued chunks are dropped rather than decoded
        if pool is not None:
            pool.shutdown(cancel_futures=True)
        bar.close()
    images.flush()
    kept = len(labels)
    images = None  # close the memmap before shrinking the file
    if kept < total:  # shrink the file to the images that decoded
        full = np.load(tmp / "images.npy", mmap_mode="r")
        np.save(tmp / "images_kept.npy", full[:kept])
        del full
        os.replace(tmp / "images_kept.npy", tmp / "images.npy")
    if kept == 0:
        raise UserError(f"no readable images in {source['data_root']} ({len(skipped)} skipped)")
    labels, class_names = drop_empty_classes(np.asarray(labels, dtype=np.int64), source["class_names"])
    np.save(tmp / "labels.npy", labels)
    return {"class_names": class_names, "names": names, "skipped": skipped,
            "data_root": source["data_root"]}  # which folder this cache decoded (older versions are found by it)


def drop_empty_classes(labels: np.ndarray, class_names: list[str]) -> tuple[np.ndarray, list[str]]:
    """Leave out classes none of whose images decoded (a class without images has nothing to
    train or test, and broke stratified splits), renumbering the labels; each one is logged."""
    present = np.bincount(labels, minlength=len(class_names)) > 0
    for name in np.asarray(class_names, dtype=object)[~present]:
        log(f"class {name!r} has no readable images: left out")
    new_index = np.cumsum(present) - 1
    return new_index[labels].astype(np.int64), [c for c, keep in zip(class_names, present) if keep]


def _chunks(iterable, n: int) -> Iterator[list]:
    chunk = []
    for item in iterable:
        chunk.append(item)
        if len(chunk) == n:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


# ----------------------------------------------------------------------------- split
def stratified_split(labels: np.ndarray, val_fraction: float, test_fraction: float, seed: int) -> dict:
    """Split indices per class into train/val/test; every class with >= 3 images is in all three."""
    rng = np.random.default_rng(seed)
    split = {"train": [], "val": [], "test": []}
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n = len(idx)
        n_val = max(1, round(n * val_fraction)) if n >= 3 and val_fraction > 0 else 0
        n_test = max(1, round(n * test_fraction)) if n >= 3 and test_fraction > 0 else 0
        split["val"].append(idx[:n_val])
        split["test"].append(idx[n_val:n_val + n_test])
        split["train"].append(idx[n_val + n_test:])
    return {k: np.sort(np.concatenate(v)).astype(np.int64) for k, v in split.items()}


# ----------------------------------------------------------------------------- tensors
def ink_mean_std(images: np.ndarray, indices: np.ndarray, max_images: int = 2000) -> tuple[float, float]:
    """Mean and std of ink (1 - pixel/255) over a sample of training images."""
    sample = np.sort(np.random.default_rng(0).permutation(indices)[:max_images])
    ink = 1.0 - np.asarray(images[sample], dtype=np.float64) / 255.0
    return float(ink.mean()), float(max(ink.std(), 1e-3))


def model_input(batch_uint8: torch.Tensor, prep: dict, device: torch.device | str = "cpu", augment_batch: bool = False,
                generator: torch.Generator | None = None, channels_last: bool = False) -> torch.Tensor:
    """uint8 (B, S, S) white-background sketches -> standardised ink (B, 1, S, S) on ``device``.

    ``prep`` is the checkpoint's preprocessing record ({"mean", "std", ...}).
    """
    x = batch_uint8.to(device, non_blocking=True)
    ink = 1.0 - x.unsqueeze(1).float() / 255.0
    if augment_batch:
        ink = augment(ink, generator)
    x = standardise_ink(ink, prep)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def uint8_tensor(images_uint8: np.ndarray) -> torch.Tensor:
    """A uint8 array as a tensor for :func:`model_input`, without a copy when it can be shared.

    A read-only array (a memmap, ``np.load(mmap_mode="r")``, the image cache) is copied:
    torch cannot wrap one without a warning that writes through it are undefined.
    """
    array = np.ascontiguousarray(images_uint8)
    return torch.from_numpy(array if array.flags.writeable else array.copy())


def standardise_ink(ink: torch.Tensor, prep: dict) -> torch.Tensor:
    """Ink (darkness in [0, 1], paper 0) -> the classifier's input scale (``prep``'s mean and std)."""
    return (ink - prep["mean"]) / prep["std"]


def few_steps_batch_size(fits: int) -> int:
    """A power-of-two batch size, at least 2 (BatchNorm; an SAE's tokens too), that makes about four steps
    of ``fits`` items: the advice of a refusal that the data cannot fill one batch (stages 1 and 2)."""
    size = 2
    while size * 2 * 4 <= fits:
        size *= 2
    return size


def batches(images: np.ndarray, labels: np.ndarray, indices: np.ndarray, batch_size: int,
            shuffle: bool = False, seed: int = 0, drop_last: bool = False,
            start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor, np.ndarray]]:
    """Yield (uint8 images (B, S, S), labels (B,), indices) from the cache.

    ``start`` skips the first batches (used to resume mid-epoch deterministically).
    """
    order = np.random.default_rng(seed).permutation(indices) if shuffle else np.asarray(indices)
    n_batches = len(order) // batch_size if drop_last else math.ceil(len(order) / batch_size)
    for b in range(start, n_batches):
        idx = order[b * batch_size:(b + 1) * batch_size]
        sorted_idx = np.sort(idx)  # memmap reads are faster in order
        yield torch.from_numpy(np.ascontiguousarray(images[sorted_idx])), torch.from_numpy(labels[sorted_idx]), sorted_idx


def augment(ink: torch.Tensor, generator: torch.Generator | None = None, degrees: float = 12.0,
            scale: tuple[float, float] = (0.85, 1.1), translate: float = 0.08, flip: bool = True,
            thickness_p: float = 0.3) -> torch.Tensor:
    """Random affine (white fill), horizontal flip and stroke thickness, on a batch.

    ``ink`` is (B, 1, S, S) with paper 0 (before standardisation), so zero padding is
    white paper. Thickness: a random subset gets a thicker pen (3x3 max-pool) or a lighter
    one (the mean of the stroke and its 3x3 min-pool: a stroke under 3 px wide keeps its
    shape at half strength, where a bare min-pool would erase it and leave a blank sketch).
    """
    b = ink.shape[0]
    dev = ink.device

    def rand(*shape):
        return torch.rand(*shape, generator=generator).to(dev)

    angle = (rand(b) * 2 - 1) * math.radians(degrees)
    s = scale[0] + rand(b) * (scale[1] - scale[0])
    sign = torch.where(rand(b) < 0.5, -1.0, 1.0) if flip else torch.ones(b, device=dev)
    cos, sin = torch.cos(angle) / s, torch.sin(angle) / s
    theta = torch.stack([torch.stack([cos * sign, -sin, (rand(b) * 2 - 1) * translate], 1),
                         torch.stack([sin * sign, cos, (rand(b) * 2 - 1) * translate], 1)], 1)
    grid = F.affine_grid(theta.to(ink.dtype), list(ink.shape), align_corners=False)
    out = F.grid_sample(ink, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    if thickness_p > 0:
        which = rand(b)
        thick = F.max_pool2d(out, 3, stride=1, padding=1)
        thin = 0.5 * (out - F.max_pool2d(-out, 3, stride=1, padding=1))
        pick_thick = (which < thickness_p / 2).view(b, 1, 1, 1)
        pick_thin = ((which >= thickness_p / 2) & (which < thickness_p)).view(b, 1, 1, 1)
        out = torch.where(pick_thick, thick, torch.where(pick_thin, thin, out))
    return out
