"""Real-data sources: TU-Berlin from the Hugging Face hub, parquet folders, image folders.

Every source is described once by :func:`describe_source` (a JSON-able dict that a
checkpoint can record) and read by :func:`iter_source`, which streams
``(name, payload, label)`` triples; :func:`selfexplain.imaging.decode_image` turns one
payload into the uint8 white-background square that the cache stores.

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
import json
import logging
import re
import unicodedata
from pathlib import Path
from typing import Callable, Iterator

import yaml

from .errors import UserError, one_line, some
from .imaging import IMAGE_EXTENSIONS, BadImage, is_image_file
from .logs import log

TU_BERLIN_REPO = "kmewhort/tu-berlin-png"  # Hugging Face dataset repo of the TU-Berlin sketches
TU_BERLIN_PATTERNS = ["data/*.parquet", "README.md"]  # what the download fetches
TU_BERLIN_SPLITS = ("train", "test")  # each must have all its shards, or the copy is incomplete
SOURCE_DATASETS = ("tu-berlin", "parquet", "folder")  # the DATASET values this module reads
PARQUET_BATCH_ROWS = 64  # rows per streamed parquet batch (1111 px PNGs are ~20-60 kB each)

_SHARD = re.compile(r"^(?P<split>.+)-(?P<index>\d{5})-of-(?P<total>\d{5})(?:-[^/]*)?\.parquet$")


def _arrow():
    """(pyarrow, pyarrow.parquet), imported on first use: 0.3 s that synthetic-only runs never pay."""
    import pyarrow
    import pyarrow.parquet

    return pyarrow, pyarrow.parquet


# ----------------------------------------------------------------------------- describing
def describe_source(dataset: str, data_root: str | None, notes: bool = True) -> dict:
    """Resolve a dataset to a JSON-able description that :func:`iter_source` reads.

    Parameters
    ----------
    dataset : str
        ``'tu-berlin'`` (downloaded when missing), ``'parquet'`` or ``'folder'``.
    data_root : str | None
        The folder holding the data; ``None`` means ``data/<dataset>``.
    notes : bool
        Log the class folders left out (stage 1 decides the classes; later stages re-read the
        same folder and would repeat it).

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
        raise UserError(f"DATA_ROOT={root} {_not_a_folder(root, dataset)}")
    if dataset == "folder":
        files, labels, class_names = _scan_image_folder(root, notes)
        num_items = len(files)
    else:
        files = _find_parquet(root)
        if not files:
            raise UserError(f"no *.parquet files under DATA_ROOT={root}")
        missing = _missing_shards(root)
        if missing:  # '-of-00002' with one of the two there: part of the data, without a word
            raise UserError(f"DATA_ROOT={root} lacks shard(s) {some(missing)} named by their siblings' '-of-N': "
                            "add them, or rename the files to train on what is there")
        _refuse_duplicate_shards(root)
        _check_schema(files, root, dataset)
        readme = root / "README.md"
        class_names = parquet_class_names(files, readme if readme.is_file() else None)
        num_items = _count_rows(files, root, len(class_names), dataset)
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


def _not_a_folder(root: Path, dataset: str) -> str:
    """Why DATA_ROOT is not a folder; a data file names the folder that holds it (a shard's, or an image's
    DATA_ROOT/<class>/<image>), any other file only what is read (README.md suggested /tmp)."""
    if not root.is_file():
        return f"does not exist (DATASET={dataset} reads a folder)"
    if dataset == "parquet" and root.suffix.lower() == ".parquet":
        return f"is a file; DATASET=parquet reads a folder: give {root.parent}"
    if dataset == "folder" and is_image_file(root):
        return f"is a file; DATASET=folder reads a folder: give {root.parent.parent}"
    layout = "*.parquet shards" if dataset == "parquet" else "one sub-folder of images per class"
    return f"is a file; DATASET={dataset} reads a folder of {layout}"


def _scan_image_folder(root: Path, notes: bool = True) -> tuple[list[Path], list[int], list[str]]:
    """Class folders (sorted) and their images, found recursively inside each class."""
    class_names, files, labels = [], [], []
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        images = sorted(p for p in folder.rglob("*")
                        if is_image_file(p) and _visible(p, root))
        if not images:  # an empty class would break stratified splits: leave it out
            if notes:
                log(f"class folder {folder.name}/ has no images: left out")
            continue
        labels += [len(class_names)] * len(images)
        class_names.append(folder.name)
        files += images
    if not class_names:
        raise UserError(f"DATA_ROOT={root} has no class sub-folders with images "
                        f"(expected DATA_ROOT/<class name>/*.png, extensions {', '.join(IMAGE_EXTENSIONS)})")
    loose = [p.name for p in root.iterdir() if is_image_file(p) and not p.name.startswith(".")]
    if loose and notes:  # in no class: a user who put them there expected them read
        log(f"{len(loose)} image(s) directly in DATA_ROOT ({some(sorted(loose))}) are in no class folder: left out "
            "(DATA_ROOT/<class name>/*.png)")
    _refuse_look_alike_names(class_names, root)
    return files, labels, class_names


def _refuse_look_alike_names(class_names: list[str], root: Path) -> None:
    """Two class folders whose names differ only in Unicode form ('café' typed, 'café' from macOS: NFC and NFD)
    print alike everywhere: the classifier would split one class in two and --versus pick one by its bytes."""
    seen: dict[str, str] = {}
    for name in class_names:
        key = unicodedata.normalize("NFC", name)
        if key in seen:
            raise UserError(f"DATA_ROOT={root} has two class folders named {name!r} and {seen[key]!r}: the same name "
                            "in two Unicode forms (NFC and NFD); merge or rename one")
        seen[key] = name


def _damaged(rel: str, exc: BaseException, dataset: str, where: str = "") -> UserError:
    """A parquet file that does not read: what to do depends on whether a download can replace it."""
    cure = ("delete it and rerun: the download fetches it again" if dataset == "tu-berlin" else
            "replace it with a whole copy")
    return UserError(f"{rel} is damaged{where} ({one_line(exc, 200)}): {cure}")


@contextlib.contextmanager
def _reading(rel: str, dataset: str, where: Callable[[], str] = str):
    """Turn a parquet read that fails (a damaged footer or page) into :func:`_damaged`; a permission
    error is not damage (run_cli names the file in one line). ``where``: how far it got."""
    pa, _ = _arrow()
    try:
        yield
    except PermissionError:
        raise
    except (pa.ArrowException, OSError) as exc:
        raise _damaged(rel, exc, dataset, where()) from None


def _check_schema(files: list[Path], root: Path, dataset: str = "parquet") -> None:
    """Every file must be readable parquet with ``image`` and integer ``label`` columns."""
    pa, pq = _arrow()
    for path in files:
        rel = path.relative_to(root).as_posix()
        with _reading(rel, dataset, lambda: ": not a readable parquet file"):
            schema = pq.read_schema(path)
        if "image" not in schema.names or "label" not in schema.names:
            raise UserError(f"{rel}: expected columns 'image' and 'label' (Hugging Face image schema), "
                            f"found {', '.join(schema.names)}")
        label_type = schema.field("label").type
        if not pa.types.is_integer(label_type):  # a ClassLabel is stored as its index
            raise UserError(f"{rel}: column 'label' holds {label_type}, not class indices (integers; the class "
                            "names go in the schema metadata or the README, as the Hugging Face hub writes them)")


def _count_rows(files: list[Path], root: Path, num_classes: int, dataset: str = "parquet") -> int:
    """Row count, checking that every label names a class (label column only: cheap)."""
    _, pq = _arrow()
    total = 0
    for path in files:
        rel = path.relative_to(root).as_posix()
        with _reading(rel, dataset):  # a damaged page: the footer read fine, the data does not
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
    _, pq = _arrow()
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
    log(f"no class names in the parquet metadata or a README.md beside it: classes are named class_0..class_{high} "
        "(a dataset card's class_label names would name them)")
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
def iter_source(source: dict) -> Iterator[tuple[str, bytes | Path | BadImage, int]]:
    """Yield ``(name, payload, label)`` for every item of a described source, streaming.

    Parquet files are read in batches of ``PARQUET_BATCH_ROWS`` rows, so a dataset of
    20k 1111 px PNGs never sits in memory at once; names are ``'<file>#<row>'``. Folder
    items are yielded as paths named by their path relative to ``DATA_ROOT``. A row
    without a usable image yields a :class:`BadImage` payload saying why.
    """
    root = Path(source["data_root"])
    if source["dataset"] == "folder":
        index = {name: i for i, name in enumerate(source["class_names"])}
        for rel in source["files"]:
            yield rel, root / rel, index[rel.split("/", 1)[0]]
        return
    _, pq = _arrow()
    for rel in source["files"]:
        row = 0
        with _reading(rel, source["dataset"], lambda: f" after row {row}"):
            for batch in pq.ParquetFile(root / rel).iter_batches(batch_size=PARQUET_BATCH_ROWS,
                                                                 columns=["image", "label"]):
                images, labels = batch.column("image"), batch.column("label").to_pylist()
                for payload, label in zip(_image_payloads(images, (root / rel).parent, root), labels):
                    yield f"{rel}#{row}", payload, int(label)
                    row += 1


def _image_payloads(images, folder: Path, root: Path) -> list[bytes | Path | BadImage]:
    """Payloads of an ``image`` column: the HF struct {bytes, path}, or plain binary.

    A row without bytes may name a file instead, relative to its parquet file's folder;
    it is read only when it lies inside ``root`` (DATA_ROOT), so an absolute or ``../``
    path in someone's parquet cannot pull in other local files.
    """
    pa, _ = _arrow()
    if not pa.types.is_struct(images.type):
        return [b or b"" for b in images.to_pylist()]
    data = images.field("bytes").to_pylist()
    paths = images.field("path").to_pylist() if images.type.get_field_index("path") >= 0 else [None] * len(data)
    return [blob if blob is not None or not path else _contained_file(folder, path, root)
            for blob, path in zip(data, paths)]


def _contained_file(folder: Path, path: str, root: Path) -> Path | bytes | BadImage:
    """``folder / path`` resolved, if it is a file inside ``root``; else why not."""
    target = (folder / path).resolve()
    if not target.is_relative_to(root.resolve()):
        return BadImage(f"image path outside DATA_ROOT ({path[:80]})")
    return target if target.is_file() else b""  # no bytes, no file: decodes as BadImage('empty file')


# ----------------------------------------------------------------------------- download
def ensure_tu_berlin(data_root: str) -> Path:
    """Make sure ``data_root`` holds the TU-Berlin parquet files; download them if not.

    Nothing is fetched when every shard is present (``train-00000-of-00002`` ...). An empty
    ``data_root`` reads a complete copy in the Hugging Face cache when there is one (offline
    compute nodes); else the dataset is downloaded there. A partial download (the hub's
    ``data/`` shards) is completed with ``huggingface_hub.snapshot_download``, which skips the
    files already there. Parquet files in another layout are refused, not downloaded beside:
    both copies would be read (test images in the training split). Without network, raises
    a one-line UserError naming the dataset and the ways out.

    Returns the folder to read: ``data_root``, or the cache's snapshot folder.
    """
    root = Path(data_root).expanduser().resolve()
    if root.is_file():
        raise UserError(f"DATA_ROOT={root} is a file; DATASET=tu-berlin reads a folder: give {root.parent}")
    found = _find_parquet(root)
    unnamed = [p.relative_to(root).as_posix() for p in found if not _SHARD.match(p.relative_to(root).as_posix())]
    if unnamed:  # beside a complete copy too: they would be read with it (4 images became 8)
        raise UserError(f"DATA_ROOT={root} holds parquet files that are not <split>-NNNNN-of-NNNNN shards "
                        f"({some(unnamed, 2)}), which would be read with "
                        "the dataset: move them out, or read the folder as it is with --dataset=parquet")
    if found and not _missing_shards(root, TU_BERLIN_SPLITS):
        return _refuse_duplicate_shards(root, across_folders=True)
    foreign = [p.relative_to(root).as_posix() for p in found if not _is_hub_shard(p, root)]
    if foreign:
        raise UserError(f"DATA_ROOT={root} holds parquet files that are not the hub's data/<split>-NNNNN-of-NNNNN "
                        f"shards ({some(foreign, 2)}) and is not a "
                        f"complete copy ({', '.join(_missing_shards(root, TU_BERLIN_SPLITS))} missing): a download "
                        "there would be read beside them; read them as they are with --dataset=parquet, or give an "
                        "empty DATA_ROOT to download")
    cached = None if found else _cached_snapshot()
    if cached is not None:
        log(f"reading {TU_BERLIN_REPO} from the Hugging Face cache: {cached}")
        return cached
    log(f"downloading Hugging Face dataset {TU_BERLIN_REPO} into {root}")
    try:
        # lazy: huggingface_hub reads HF_ENDPOINT/HF_HUB_OFFLINE at import and costs 0.1 s; only downloads need it
        from huggingface_hub import snapshot_download

        with _quiet_hub_warnings():  # its offline fallback only warns; we raise below instead
            snapshot_download(repo_id=TU_BERLIN_REPO, repo_type="dataset", local_dir=str(root),
                              allow_patterns=TU_BERLIN_PATTERNS)
    except _hub_errors() as exc:
        raise UserError(_download_failed(root, exc)) from None
    missing = _missing_shards(root, TU_BERLIN_SPLITS)
    if not _find_parquet(root) or missing:
        reason = f"missing {', '.join(missing)}" if missing else "no parquet files arrived"
        raise UserError(_download_failed(root, reason))
    return _refuse_duplicate_shards(root, across_folders=True)


def _is_hub_shard(path: Path, root: Path) -> bool:
    """Named and placed as the hub names its shards (what an interrupted download leaves)."""
    rel = path.relative_to(root).as_posix()
    return rel.startswith("data/") and _SHARD.match(rel) is not None


def _refuse_duplicate_shards(root: Path, across_folders: bool = False) -> Path:
    """``root``, unless two files are the same shard: a hand copy without the hub's hash suffix
    beside the downloaded one (same folder), or, with ``across_folders`` (a dataset of one
    configuration: TU-Berlin), a flat copy beside ``data/``; every image would be read twice.
    Without it, ``a/train-00000-of-00001`` and ``b/...`` are two configurations, not a copy."""
    shards: dict[tuple[str, int, int], list[str]] = {}
    for path in _find_parquet(root):
        rel = path.relative_to(root).as_posix()
        m = _SHARD.match(rel)
        if m:
            split = Path(m["split"]).name if across_folders else m["split"]
            shards.setdefault((split, int(m["index"]), int(m["total"])), []).append(rel)
    twice = next((names for names in shards.values() if len(names) > 1), None)
    if twice:
        raise UserError(f"DATA_ROOT={root} holds one shard twice ({' and '.join(twice)}): every image would be read "
                        "twice; delete one copy")
    return root


def _cached_snapshot() -> Path | None:
    """A complete copy of the dataset in the Hugging Face cache (``HF_HOME``), else None; no network."""
    try:
        from huggingface_hub import snapshot_download

        with _quiet_hub_warnings():
            folder = Path(snapshot_download(repo_id=TU_BERLIN_REPO, repo_type="dataset",
                                            allow_patterns=TU_BERLIN_PATTERNS, local_files_only=True))
    except (*_hub_errors(), ValueError, ImportError):  # not cached (LocalEntryNotFoundError), or no hub library
        return None
    complete = _find_parquet(folder) and not _missing_shards(folder, TU_BERLIN_SPLITS)
    return _refuse_duplicate_shards(folder, across_folders=True) if complete else None


def _missing_shards(root: Path, splits: tuple[str, ...] = ()) -> list[str]:
    """What an interrupted download left out: shards named '<split>-<i>-of-<n>' whose
    siblings are absent, and each of ``splits`` with no shard at all ('<split>-*')."""
    seen: dict[tuple[str, int], set[int]] = {}
    for path in _find_parquet(root):
        m = _SHARD.match(path.relative_to(root).as_posix())
        if m:
            seen.setdefault((m["split"], int(m["total"])), set()).add(int(m["index"]))
    named = {Path(split).name for split, _ in seen}  # shards sit under data/
    return [f"{split}-{i:05d}-of-{n:05d}" for (split, n), have in sorted(seen.items())
            for i in range(n) if i not in have] + [f"{split}-*" for split in splits if split not in named]


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
        chain = [exc]
        while (chain[-1].__cause__ or chain[-1].__context__) is not None:  # the hub wraps the real cause
            chain.append(chain[-1].__cause__ or chain[-1].__context__)
        kinds = {type(e).__name__ for e in chain}
        if kinds & {"RepositoryNotFoundError", "GatedRepoError"}:
            exc = "the hub has no such dataset, or it needs a login (hf auth login)"
        else:
            exc = f"{type(chain[-1]).__name__}: {str(chain[-1]).strip()}"
    return (f"cannot download Hugging Face dataset {TU_BERLIN_REPO} ({one_line(exc)}); put a local copy "
            f"(data/*.parquet) in DATA_ROOT={root}, or train offline on the built-in sketches "
            "(train_standard_cnn.py --dataset=synthetic)")

