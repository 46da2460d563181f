"""Real-data sources: TU-Berlin from the Hugging Face hub, parquet folders, image folders.

Every source is described once by :func:`describe_source` (a JSON-able dict that a
checkpoint can record) and read by :func:`iter_source`, which streams
``(name, payload, label)`` triples; :func:`decode_image` turns one payload into the
uint8 white-background square that the cache stores.

* ``tu-berlin``: the Hugging Face dataset ``kmewhort/tu-berlin-png`` (about 20.1k PNG
  sketches of 1111x1111 px, 250 classes), downloaded into ``DATA_ROOT`` when missing.
* ``parquet``: any folder of ``*.parquet`` files in the Hugging Face image-classification
  schema: column ``image`` = struct ``{bytes, path}``, column ``label`` = int64, class
  names in the schema metadata key ``huggingface`` (else the README's ``dataset_info``).
* ``folder``: ``DATA_ROOT/<class name>/*.png|jpg|...``; class names are the sorted
  sub-folder names that hold at least one image; hidden files and folders are skipped.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import re
from pathlib import Path
from typing import Iterator

import numpy as np

from .errors import UserError

MAX_PIXELS = 40_000_000  # larger than any sane sketch; bigger headers are refused undecoded
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
TU_BERLIN_REPO = "kmewhort/tu-berlin-png"  # Hugging Face dataset repo of the TU-Berlin sketches
TU_BERLIN_PATTERNS = ["data/*.parquet", "README.md"]  # what the download fetches
SOURCE_DATASETS = ("tu-berlin", "parquet", "folder")  # the DATASET values this module reads
THICKEN_ABOVE = 3.0  # thicken strokes before downscaling by more than this factor
PARQUET_BATCH_ROWS = 64  # rows per streamed parquet batch (1111 px PNGs are ~20-60 kB each)

_SHARD = re.compile(r"^(?P<split>.+)-(?P<index>\d{5})-of-(?P<total>\d{5})(?:-[^/]*)?\.parquet$")


class BadImage(Exception):
    """A payload that cannot become a sketch; ``str(exc)`` is a short reason such as
    ``'empty file'``, ``'not an image'``, ``'truncated'``, ``'corrupt (...)'`` or
    ``'too large (WxH)'``."""


# ----------------------------------------------------------------------------- decoding
def decode_image(payload: bytes | str | Path, image_size: int) -> np.ndarray:
    """Decode one sketch to a uint8 ``(image_size, image_size)`` array on white.

    Transparent pixels are composited on white, 16-bit and float images are scaled to
    8 bits, any mode becomes grey; the image is padded to a centred white square and
    resized with antialiasing (strokes are thickened first when shrinking by more than
    ``THICKEN_ABOVE``x, so thin 1111 px strokes survive at 224 or 112 px).

    Parameters
    ----------
    payload : bytes | str | Path
        Encoded image bytes, or a path to an image file.
    image_size : int
        Side of the output square.

    Raises
    ------
    BadImage
        Empty payload, not an image, truncated or corrupt data, or more than
        ``MAX_PIXELS`` pixels (checked on the header, before any pixel is decoded).
    """
    if int(image_size) < 1:
        raise ValueError(f"image_size must be positive, got {image_size}")
    with _open_checked(payload) as im:
        try:
            gray = _to_white_gray(im)
        except (OSError, SyntaxError, ValueError, EOFError) as exc:  # PIL's ways of saying "broken"
            raise BadImage(_failure_reason(exc)) from None
    return _square_resize(gray, int(image_size))


@contextlib.contextmanager
def _open_checked(payload: bytes | str | Path):
    """Open an image lazily (header only) and refuse empty, non-image or huge ones."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(payload, (str, Path)):
        try:
            if Path(payload).stat().st_size == 0:
                raise BadImage("empty file")
            source = open(payload, "rb")
        except OSError as exc:
            raise BadImage(f"unreadable file ({exc.strerror or exc})") from None
    else:
        if len(payload) == 0:
            raise BadImage("empty file")
        source = io.BytesIO(payload)
    with source:
        try:
            im = Image.open(source)
        except Image.DecompressionBombError as exc:  # PIL's own limit (2 x 89 MP) fired first
            pixels = re.search(r"\((\d+) pixels\)", str(exc))
            raise BadImage(f"too large ({pixels.group(1) if pixels else 'over 179M'} pixels)") from None
        except UnidentifiedImageError:
            raise BadImage("not an image") from None
        except (OSError, SyntaxError, ValueError, EOFError) as exc:
            raise BadImage(_failure_reason(exc)) from None
        with im:
            width, height = im.size
            if width * height > MAX_PIXELS:  # decided on the header: a bomb is never decoded
                raise BadImage(f"too large ({width}x{height})")
            if width == 0 or height == 0:
                raise BadImage("corrupt (zero-sized image)")
            yield im


def _failure_reason(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return "truncated" if "truncated" in text.lower() else f"corrupt ({text[:80]})"


def _to_white_gray(im):
    """Any PIL image -> mode 'L', transparency composited on white, high depth scaled."""
    from PIL import Image, ImageOps

    if _exif_orientation(im) != 1:  # phone photos of sketches: honour EXIF rotation
        im = ImageOps.exif_transpose(im)
    mode, has_key = im.mode, "transparency" in im.info
    if mode in ("P", "PA"):
        im = im.convert("RGBA" if has_key or mode == "PA" else "RGB")
    elif mode in ("L", "RGB") and has_key:  # a tRNS colour key marks the background
        im = im.convert("RGBA")
    if im.mode.startswith("I") or im.mode == "F":
        return _high_depth_to_gray(im)
    if im.mode in ("RGBA", "LA", "La", "RGBa"):
        # Strokes drawn on a transparent canvas often have black "invisible" pixels
        # behind them: compositing on white is what a viewer shows.
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("L")
    return im.convert("L")


def _exif_orientation(im) -> int:
    try:
        return int(im.getexif().get(0x0112, 1))
    except Exception:  # a damaged EXIF block should not cost us the sketch
        return 1


def _high_depth_to_gray(im):
    """16-bit, 32-bit integer or float grey -> 8-bit grey with the full range kept."""
    from PIL import Image

    arr = np.asarray(im, dtype=np.float32)
    top = float(arr.max()) if arr.size else 0.0
    if im.mode.startswith("I;16"):
        scale = 65535.0
    elif im.mode == "F" and top <= 1.0:
        scale = 1.0
    else:  # 'I' (often a 16-bit PNG) or 'F' in 0..255 or beyond: infer the range
        scale = 255.0 if top <= 255 else (65535.0 if top <= 65535 else top)
    out = np.clip(arr * (255.0 / scale) + 0.5, 0, 255).astype(np.uint8)
    return Image.fromarray(out, mode="L")


def _square_resize(gray, size: int) -> np.ndarray:
    """Pad a grey image to a centred white square, then resize to ``size``."""
    from PIL import Image

    width, height = gray.size
    side = max(width, height)
    ratio = side / size
    if ratio > THICKEN_ABOVE:
        # Grow strokes to ~1.5 output pixels (assuming ~3 px source strokes, as in
        # TU-Berlin): 1111 -> 224 uses k=5, 1111 -> 112 uses k=13. Thinner and they
        # fade to light grey when averaged; thicker and nearby strokes merge.
        k = 2 * max(1, round((1.5 * ratio - 3) / 2)) + 1
        gray = Image.fromarray(_thicken(np.asarray(gray), k), mode="L")
    if width != height:
        canvas = Image.new("L", (side, side), 255)
        canvas.paste(gray, ((side - width) // 2, (side - height) // 2))
        gray = canvas
    if side > size:  # area averaging: exact antialiasing for line art, no ringing, 5x faster than Lanczos
        gray = gray.resize((size, size), Image.Resampling.BOX)
    elif side < size:
        gray = gray.resize((size, size), Image.Resampling.LANCZOS)
    return np.array(gray, dtype=np.uint8)


def _thicken(arr: np.ndarray, k: int) -> np.ndarray:
    """Grey-level erosion with a k x k square (dark strokes grow by k-1 px).

    Separable running minimum in numpy: ~60x faster than ``ImageFilter.MinFilter(k)``
    on a 1111 px sketch (3 ms instead of 200 ms for k=7).
    """
    r = k // 2
    padded = np.pad(arr, r, mode="constant", constant_values=255)  # outside is white paper
    h, w = arr.shape
    rows = padded[:, 0:w].copy()
    for s in range(1, k):
        np.minimum(rows, padded[:, s:s + w], out=rows)
    out = rows[0:h].copy()
    for s in range(1, k):
        np.minimum(out, rows[s:s + h], out=out)
    return out


# ----------------------------------------------------------------------------- describing
def describe_source(dataset: str, data_root: str | None) -> dict:
    """Resolve a dataset to a JSON-able description that :func:`iter_source` reads.

    Parameters
    ----------
    dataset : str
        ``'tu-berlin'`` (downloaded when missing), ``'parquet'`` or ``'folder'``.
    data_root : str | None
        The folder holding the data; ``None`` means ``data/<dataset>``.

    Returns
    -------
    dict
        ``{"dataset", "data_root" (absolute), "files" (relative paths), "fingerprint"
        (hash of file names, sizes and mtimes), "num_items", "class_names"}``.
    """
    if dataset not in SOURCE_DATASETS:
        raise UserError(f"DATASET '{dataset}' is not a file source; choose one of {', '.join(SOURCE_DATASETS)}")
    root = Path(data_root or f"data/{dataset}").expanduser().resolve()
    if dataset == "tu-berlin":
        root = ensure_tu_berlin(str(root))
    elif not root.is_dir():
        raise UserError(f"DATA_ROOT={root} does not exist (DATASET={dataset} reads a folder)")
    if dataset == "folder":
        files, labels, class_names = _scan_image_folder(root)
        num_items = len(files)
    else:
        files = _find_parquet(root)
        if not files:
            raise UserError(f"no *.parquet files under DATA_ROOT={root}")
        _check_schema(files, root)
        readme = root / "README.md"
        class_names = parquet_class_names(files, readme if readme.is_file() else None)
        num_items = _count_rows(files, root, len(class_names))
    rel = [p.relative_to(root).as_posix() for p in files]
    return {"dataset": dataset, "data_root": str(root), "files": rel,
            "fingerprint": _fingerprint(root, rel), "num_items": num_items, "class_names": class_names}


def _visible(path: Path, root: Path) -> bool:
    """False for anything inside a hidden folder or named like a hidden file (._x.png)."""
    return not any(part.startswith(".") for part in path.relative_to(root).parts)


def _find_parquet(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    return sorted(p for p in root.rglob("*.parquet") if p.is_file() and _visible(p, root))


def _scan_image_folder(root: Path) -> tuple[list[Path], list[int], list[str]]:
    """Class folders (sorted) and their images, found recursively inside each class."""
    class_names, files, labels = [], [], []
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        images = sorted(p for p in folder.rglob("*")
                        if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file() and _visible(p, root))
        if not images:  # an empty class would break stratified splits: leave it out
            continue
        labels += [len(class_names)] * len(images)
        class_names.append(folder.name)
        files += images
    if not class_names:
        raise UserError(f"DATA_ROOT={root} has no class sub-folders with images "
                        f"(expected DATA_ROOT/<class name>/*.png, extensions {', '.join(IMAGE_EXTENSIONS)})")
    return files, labels, class_names


def _check_schema(files: list[Path], root: Path) -> None:
    """Every file must be readable parquet with ``image`` and ``label`` columns."""
    import pyarrow.parquet as pq

    for path in files:
        rel = path.relative_to(root).as_posix()
        try:
            names = pq.read_schema(path).names
        except Exception as exc:  # pyarrow raises ArrowInvalid/OSError for a damaged footer
            raise UserError(f"{rel} is not a readable parquet file ({str(exc).splitlines()[0][:80]})") from None
        if "image" not in names or "label" not in names:
            raise UserError(f"{rel}: expected columns 'image' and 'label' (Hugging Face image schema), "
                            f"found {', '.join(names)}")


def _count_rows(files: list[Path], root: Path, num_classes: int) -> int:
    """Row count, checking that every label names a class (label column only: cheap)."""
    import pyarrow.parquet as pq

    total = 0
    for path in files:
        rel = path.relative_to(root).as_posix()
        labels = pq.ParquetFile(path).read(columns=["label"]).column("label")
        if labels.null_count:
            raise UserError(f"{rel}: {labels.null_count} rows have no label")
        if len(labels):
            arr = labels.to_numpy()
            low, high = int(arr.min()), int(arr.max())
            if low < 0 or high >= num_classes:
                raise UserError(f"{rel}: labels span {low}..{high} but there are {num_classes} class names")
        total += len(labels)
    return total


def _fingerprint(root: Path, rel: list[str]) -> str:
    """Hash of names, sizes and modification times: changes whenever a file does."""
    h = hashlib.sha256()
    for name in rel:
        st = (root / name).stat()
        h.update(f"{name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


# ----------------------------------------------------------------------------- class names
def parquet_class_names(files: list[Path], readme: Path | None) -> list[str]:
    """Class names of a Hugging Face parquet dataset.

    Looks, in order, at the schema metadata key ``huggingface`` of each file, the
    ``dataset_info`` block of the README's YAML front matter, and finally the labels
    themselves (``class_0 .. class_<max label>``).
    """
    import pyarrow.parquet as pq

    for path in files:
        meta = pq.read_schema(path).metadata or {}
        names = _names_from_hf_metadata(meta.get(b"huggingface"))
        if names:
            return names
    if readme is not None:
        names = _names_from_readme(readme)
        if names:
            return names
    high = -1
    for path in files:
        labels = pq.ParquetFile(path).read(columns=["label"]).column("label").drop_null()
        if len(labels):
            high = max(high, int(labels.to_numpy().max()))
    return [f"class_{i}" for i in range(high + 1)]


def _names_from_hf_metadata(raw: bytes | None) -> list[str] | None:
    try:
        features = json.loads(raw)["info"]["features"]
    except (TypeError, ValueError, KeyError):
        return None
    if isinstance(features, list):  # some writers store features as a list of named dicts
        features = {f.get("name"): f for f in features if isinstance(f, dict)}
    label = features.get("label") if isinstance(features, dict) else None
    names = label.get("names") if isinstance(label, dict) else None
    return [str(n) for n in names] if isinstance(names, list) and names else None


def _names_from_readme(readme: Path) -> list[str] | None:
    """Names from ``dataset_info.features[label].dtype.class_label.names`` in the front matter."""
    import yaml

    text = readme.read_text(encoding="utf-8", errors="replace")
    match = re.match(r"^---\s*\n(.*?)\n---\s*(\n|$)", text, re.DOTALL)
    if not match:
        return None
    try:
        card = yaml.safe_load(match.group(1)) or {}
    except yaml.YAMLError:
        return None
    infos = card.get("dataset_info") if isinstance(card, dict) else None
    for info in infos if isinstance(infos, list) else [infos]:  # a list when there are configs
        for feature in (info or {}).get("features", []) if isinstance(info, dict) else []:
            if not isinstance(feature, dict) or feature.get("name") != "label":
                continue
            dtype = feature.get("dtype")
            names = dtype.get("class_label", {}).get("names") if isinstance(dtype, dict) else None
            if isinstance(names, dict) and names:
                return [str(names[k]) for k in sorted(names, key=int)]
            if isinstance(names, list) and names:
                return [str(n) for n in names]
    return None


# ----------------------------------------------------------------------------- reading
def iter_source(source: dict) -> Iterator[tuple[str, bytes | Path, int]]:
    """Yield ``(name, payload, label)`` for every item of a described source, streaming.

    Parquet files are read in batches of ``PARQUET_BATCH_ROWS`` rows, so a dataset of
    20k 1111 px PNGs never sits in memory at once; names are ``'<file>#<row>'``. Folder
    items are yielded as paths named by their path relative to ``DATA_ROOT``.
    """
    root = Path(source["data_root"])
    if source["dataset"] == "folder":
        index = {name: i for i, name in enumerate(source["class_names"])}
        for rel in source["files"]:
            yield rel, root / rel, index[rel.split("/", 1)[0]]
        return
    import pyarrow.parquet as pq

    for rel in source["files"]:
        pf = pq.ParquetFile(root / rel)
        row = 0
        for batch in pf.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=["image", "label"]):
            images, labels = batch.column("image"), batch.column("label").to_pylist()
            for payload, label in zip(_image_payloads(images, (root / rel).parent), labels):
                yield f"{rel}#{row}", payload, int(label)
                row += 1


def _image_payloads(images, folder: Path) -> list[bytes | Path]:
    """Bytes of an ``image`` column: the HF struct {bytes, path}, or plain binary."""
    import pyarrow as pa

    if not pa.types.is_struct(images.type):
        return [b or b"" for b in images.to_pylist()]
    data = images.field("bytes").to_pylist()
    paths = images.field("path").to_pylist() if images.type.get_field_index("path") >= 0 else [None] * len(data)
    out = []
    for blob, path in zip(data, paths):
        if blob is None and path and (folder / path).is_file():  # HF may store a path instead
            out.append(folder / path)
        else:
            out.append(blob or b"")  # missing bytes decode as BadImage('empty file')
    return out


# ----------------------------------------------------------------------------- download
def ensure_tu_berlin(data_root: str) -> Path:
    """Make sure ``data_root`` holds the TU-Berlin parquet files; download them if not.

    Nothing is fetched when every shard is present (``train-00000-of-00002`` ...). A
    missing or partial copy is completed with ``huggingface_hub.snapshot_download``
    (which skips files already there). Without network, raises a one-line UserError
    naming the dataset and the ways out.
    """
    root = Path(data_root).expanduser().resolve()
    if _find_parquet(root) and not _missing_shards(root):
        return root
    print(f"downloading Hugging Face dataset {TU_BERLIN_REPO} into {root}", flush=True)
    try:
        from huggingface_hub import snapshot_download

        with _quiet_hub_warnings():  # its offline fallback only warns; we raise below instead
            snapshot_download(repo_id=TU_BERLIN_REPO, repo_type="dataset", local_dir=str(root),
                              allow_patterns=TU_BERLIN_PATTERNS)
    except _hub_errors() as exc:
        raise UserError(_download_failed(root, exc)) from None
    missing = _missing_shards(root)
    if not _find_parquet(root) or missing:
        reason = f"missing {', '.join(missing)}" if missing else "no parquet files arrived"
        raise UserError(_download_failed(root, reason))
    return root


def _missing_shards(root: Path) -> list[str]:
    """Shards named '<split>-<i>-of-<n>' whose siblings are absent (an interrupted download)."""
    seen: dict[tuple[str, int], set[int]] = {}
    for path in _find_parquet(root):
        m = _SHARD.match(path.relative_to(root).as_posix())
        if m:
            seen.setdefault((m["split"], int(m["total"])), set()).add(int(m["index"]))
    return [f"{split}-{i:05d}-of-{n:05d}" for (split, n), have in sorted(seen.items())
            for i in range(n) if i not in have]


def _hub_errors() -> tuple[type[BaseException], ...]:
    """Connection, HTTP and hub errors (hub errors derive from OSError)."""
    errors: list[type[BaseException]] = [OSError]
    for module, name in (("httpx2", "HTTPError"), ("httpx", "HTTPError"), ("requests", "RequestException"),
                         ("huggingface_hub.errors", "XetDownloadError")):
        with contextlib.suppress(ImportError, AttributeError):
            errors.append(getattr(__import__(module, fromlist=[name]), name))
    return tuple(errors)


@contextlib.contextmanager
def _quiet_hub_warnings():
    logger = logging.getLogger("huggingface_hub")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _download_failed(root: Path, exc: BaseException | str) -> str:
    if not isinstance(exc, str):
        while (exc.__cause__ or exc.__context__) is not None:  # the hub wraps the real cause
            exc = exc.__cause__ or exc.__context__
        exc = f"{type(exc).__name__}: {str(exc).strip()}"
    reason = " ".join(exc.split())[:160]  # one line, whatever the hub said
    return (f"cannot download Hugging Face dataset {TU_BERLIN_REPO} ({reason}); put a local copy "
            f"(data/*.parquet) in DATA_ROOT={root}, or run offline with --dataset=synthetic")
