"""Stage 5's inputs and outputs around :mod:`selfexplain.explain`: what ``IMAGE`` names,
where overlays go, and the text a person reads.

``IMAGE`` is an image file, a folder (its images, sorted), a pattern (``sketches/*.png``), ``test:K`` (the K-th held-out
test image of the classifier's dataset), or a list of those. On the command line a list
is a Python/JSON literal, ``--image="['a.png', 'b, c.png']"``, whose names are never
split; the bare form ``--image=[a.png,b.png]`` splits at commas except inside a name
that exists on disk. A single path with a comma in it is just a path.
"""
from __future__ import annotations

import ast
import glob
import json
import os
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from .artifacts import atomic_write_bytes
from .data import load_dataset
from .errors import UserError, some
from .explain import NO_RANDOM_SET, OVERLAY_MARK, Explanation, Models, to_uint8, unfamiliar_note
from .imaging import IMAGE_EXTENSIONS, is_image_file, mask_to_grey, png_bytes, png_text, user_path
from .logs import log
from .prompts import concept_name, percent
from .stats import describe_map

TEST_IMAGES_DIR = "test_images"  # under REPORT_DIR: test:K images saved as PNG, so outputs can name a file
_TEST_ENTRY = re.compile(r"^test:(.*)$", re.IGNORECASE)


@dataclass
class ImageInput:
    """One decoded input: the name its explanation carries, the image, and its class if known."""

    name: str                   # the path given, or the PNG a test:K image was saved as
    image: np.ndarray           # uint8 (S, S), white background
    true_class: str | None = None


# ----------------------------------------------------------------------------- IMAGE
def image_list(image: str | Sequence[str]) -> list[str]:
    """IMAGE as given -> a list of entries: files, every image of a folder, the files a pattern
    (``*``, ``?``, ``[...]``, ``**``) matches, or test:K."""
    if isinstance(image, str) and is_list_text(image):
        image = _parse_list(image.strip())
    entries = image if isinstance(image, (list, tuple)) else [image]
    if not entries:
        raise UserError("no image given (an empty list); use --image=PATH (a file, a folder, a [list] or test:K)")
    out, overlays = [], []
    for entry in (str(e).strip() for e in entries):
        if not entry:
            raise UserError("no image given; use --image=PATH (a file, a folder, a [list] or test:K)")
        path = Path(entry).expanduser()
        if path.is_dir():
            found = sorted(str(p) for p in path.rglob("*") if is_image_file(p)  # subfolders too, as stage 1 reads
                           and not any(part.startswith(".") for part in p.relative_to(path).parts))
            found, marked = _without_overlays(found)
            if not found:
                raise UserError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in folder {path}" + _only(marked))
        elif not path.exists() and glob.has_magic(entry):  # a pattern quoted past the shell ('new_*.png')
            found = sorted(m for m in glob.glob(str(path), recursive=True) if is_image_file(Path(m)))
            found, marked = _without_overlays(found)
            if not found:  # as a folder: its image files only (a notes.txt beside them is no input)
                raise UserError(f"no image file ({', '.join(IMAGE_EXTENSIONS)}) matches {entry}"
                                + (", and no file has that name" if "[" in entry else "") + _only(marked))
        else:
            found, marked = [entry], []  # a file named on its own is explained, an overlay too
        out += found
        overlays += marked
    if overlays:
        log(f"left out {_overlays(overlays)} this script wrote earlier ({some(Path(p).name for p in overlays)}); "
            "name one on its own to explain it")
    return out


def _overlays(files: Sequence[str]) -> str:
    return f"{len(files)} overlay{'s' if len(files) > 1 else ''}"


def _only(overlays: Sequence[str]) -> str:
    return f", only {_overlays(overlays)} this script wrote" if overlays else ""


def _without_overlays(files: list[str]) -> tuple[list[str], list[str]]:
    """(the files, the overlays among them): PNGs that carry :data:`explain.OVERLAY_MARK`, so that rerunning
    ``--image=dir/ --overlay=dir/`` reads the sketches again, not the last run's ``*_why.png``."""
    key, value = OVERLAY_MARK
    marked = {f for f in files if f.lower().endswith(".png") and png_text(f).get(key) == value}
    return [f for f in files if f not in marked], [f for f in files if f in marked]


def is_list_text(text: str) -> bool:
    """``[a.png, b.png]``: a list of images, unless a file of that very name exists."""
    text = text.strip()
    return text.startswith("[") and text.endswith("]") and not Path(text).exists()


def _parse_list(text: str) -> list[str]:
    """``"['a.png', 'b,c.png']"`` (a literal) or ``"[a.png,b.png]"`` (bare) -> names."""
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return _split_bare(text[1:-1])
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise UserError(f"IMAGE list must hold file names as strings, got {text}")
    return value


def _split_bare(inner: str) -> list[str]:
    """Split at commas, keeping together the longest run of pieces that names an existing path."""
    pieces, out, i = inner.split(","), [], 0
    while i < len(pieces):
        j = next((j for j in range(len(pieces), i + 1, -1) if Path(",".join(pieces[i:j]).strip()).exists()), i + 1)
        out.append(",".join(pieces[i:j]).strip().strip("'\""))
        i = j
    return out


def load_inputs(entries: Sequence[str], models: Models, cache_dir: str | Path,
                report_dir: str | Path) -> tuple[list[ImageInput], list[tuple[int, str, str]]]:
    """Decode every entry up front; returns (inputs, [(position in entries, file, why it was skipped)]).

    One image that cannot be read is an error (a UserError); among several (a folder, a
    list), an unreadable file is skipped and named, as stage 1 skips it, and the rest are
    explained. A bad ``test:K`` is always an error: it is a wrong argument, not a bad file.
    """
    inputs, skipped = [], []
    for position, entry in enumerate(entries):
        try:
            inputs.append(read_input(entry, models, cache_dir, report_dir))
        except UserError as exc:
            if len(entries) == 1 or test_entry(entry) is not None:
                raise
            skipped.append((position, entry, str(exc)))
    if not inputs:
        raise UserError(f"none of the {len(entries)} images could be read (first: {skipped[0][2]})")
    return inputs, skipped


def as_image_list(images) -> list:
    """The notebook's images as a list: one path, PIL image, (H, W[, C]) array or (H, W) /
    (C, H, W) tensor (C 1, 3 or 4) alone is one image; a (B, H, W) array and a (B, C, H, W)
    tensor are B images (so is a (B, H, W) tensor unless B is 1, 3 or 4: pass grey stacks as
    (B, 1, H, W)). A (3, H, W) array is three grey images, not one colour image (numpy's colour
    axis is last): a warning says so. A boolean (B, H, W) stack (array, or tensor (B, [1,] H, W)) gets one ink
    polarity for all its frames."""
    if isinstance(images, torch.Tensor):  # channels first: (3, H, W) is one colour image; grey stacks are (B, 1, H, W)
        one = images.ndim == 2 or (images.ndim == 3 and images.shape[0] in (1, 3, 4))
        if images.dtype == torch.bool and not one and (images.ndim == 3 or images.shape[1] == 1):  # masks' stack
            stack = images.detach().cpu().numpy().reshape(len(images), *images.shape[-2:])
            return list(mask_to_grey(stack, f"the {tuple(images.shape)} stack"))
        return [images] if one else list(images)
    if isinstance(images, dict):
        raise UserError("images are a list of paths, PIL images or arrays, not a dict")
    picture = isinstance(images, np.ndarray) and (images.ndim == 2 or (images.ndim == 3 and images.shape[2] in (1, 3, 4)))
    if isinstance(images, np.ndarray) and images.ndim == 3 and not picture and images.shape[0] in (3, 4):
        log(f"warning: a {images.shape} array is read as {images.shape[0]} grey images; for one colour image "
            "pass it as (H, W, C): np.moveaxis(array, 0, -1)")
    one = isinstance(images, (str, os.PathLike, Image.Image)) or picture  # a (B, S, S) stack is B images
    if isinstance(images, np.ndarray) and images.dtype == bool and images.ndim == 3 and not one:
        # masks of one source share a convention: the stack's less common value is the ink in every frame (a
        # frame decided alone flipped where its drawing filled most of it)
        images = mask_to_grey(images, f"the {images.shape} stack")
    return [images] if one else list(images)


def expand_paths(images: list) -> list[tuple[object, int | None]]:
    """The notebook's list with each folder and file pattern (``"sketches/*.png"``) replaced by the image
    files it holds, sorted, as ``--image`` lists them; any other entry is kept as it is. Returns (entry, its
    index in ``images``, or None for a list of one: what names an array or PIL image, ``<array 2>``). An
    empty list, or a pattern that matches no image, is a UserError (a notebook's glob that found nothing)."""
    if not images:
        raise UserError("no images given (an empty list: did a glob find nothing?)")
    out = []
    for place, item in enumerate(images):
        path = user_path(item) if isinstance(item, (str, os.PathLike)) else None
        many = path is not None and (path.is_dir() or (not path.exists() and glob.has_magic(str(path))))
        out += [(entry, None) for entry in image_list(str(path))] if many else \
            [(item, place if len(images) > 1 else None)]
    return out


def read_inputs(entries: list[tuple[object, int | None]], models: Models, cache_dir: str | Path,
                report_dir: str | Path) -> list[ImageInput]:
    """:func:`expand_paths`' entries decoded, in order (a bad one is a UserError)."""
    return [read_input(item, models, cache_dir, report_dir, place) for item, place in entries]


def as_batch(inputs: list[ImageInput]) -> np.ndarray:
    """The inputs as one (B, S, S) uint8 batch, which :func:`explain.to_uint8` takes as is."""
    return np.stack([item.image for item in inputs])


def read_input(item, models: Models, cache_dir: str | Path, report_dir: str | Path,
               place: int | None = None) -> ImageInput:
    """One image decoded: ``test:K`` (with its class), a path, a PIL image or an array (the
    notebook's) by :func:`explain.to_uint8`; a bad one is a UserError. ``place``: its index in a list
    of several, which names an array or PIL image (``<array 2>``)."""
    k_text = test_entry(item)
    if k_text is not None:
        return test_image(k_text, models, cache_dir, report_dir)
    batch, names = to_uint8([item], models.image_size, place)
    return ImageInput(names[0], batch[0])


def name_after_input(exp: Explanation, item: ImageInput) -> None:
    """Name the explanation after its input and add the input's true class when known."""
    exp.image = item.name
    if item.true_class is not None:
        exp.extra["true_class"] = item.true_class


def test_entry(entry) -> str | None:
    """The K of a ``test:K`` entry (a file of that name wins; spaces around it are dropped, as the shell drops
    them), else None."""
    test = _TEST_ENTRY.match(str(entry).strip()) if isinstance(entry, (str, Path)) else None
    return test.group(1) if test and not Path(entry).exists() else None


_LAST_DATASET: dict = {}  # (spec, cache folder) -> ImageSet: one load for a list of test:K, not one each (~0.1 s)


def _dataset(spec: dict, cache_dir: str | Path):
    """The classifier's dataset through its cache, kept for the next ``test:K`` of the same spec and folder."""
    key = (json.dumps(spec, sort_keys=True, default=str), str(Path(cache_dir).resolve()))
    if key not in _LAST_DATASET:
        _LAST_DATASET.clear()
        _LAST_DATASET[key] = load_dataset(spec, cache_dir)
    return _LAST_DATASET[key]


def test_image(k_text: str, models: Models, cache_dir: str | Path, report_dir: str | Path) -> ImageInput:
    """The K-th test image of the classifier's split, saved as ``REPORT_DIR/test_images/test_K.png``."""
    try:
        k = int(k_text)
    except ValueError:
        raise UserError(f"test images are named test:K with K an integer, got test:{k_text}") from None
    ckpt = models.classifier_ckpt
    test = ckpt["split"]["test"]
    if not 0 <= k < len(test):
        raise UserError(f"test:{k}: the classifier's test split has {len(test)} images "
                        f"(test:0 .. test:{len(test) - 1})")
    imageset = _dataset(ckpt["dataset"], cache_dir)
    index = int(test[k])
    image = np.array(imageset.images[index])
    path = atomic_write_bytes(Path(report_dir) / TEST_IMAGES_DIR / f"test_{k}.png", png_bytes(image))
    return ImageInput(str(path), image, imageset.class_names[int(imageset.labels[index])])


# ----------------------------------------------------------------------------- overlays
OTHER_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".gif", ".bmp", ".webp", ".tif", ".tiff")  # refused for OVERLAY (PNG only)


def overlay_paths(overlay: str | Path, names: Sequence[str], also_keep: Sequence[str] = ()) -> list[Path]:
    """OVERLAY for each image: itself for one image; for several, ``<OVERLAY stem>_<label>.png``;
    an existing folder (or a path ending in ``/``) gets ``<folder>/<label>_why.png`` for each (the
    suffix keeps an overlay off an input of the same name when the folder is the inputs' own).
    A path that is one of the input files, or of ``also_keep`` (the inputs that were skipped as
    unreadable: still the user's files), is a UserError (:func:`refuse_overwriting_inputs`).

    The label is the image's file stem; images whose stems repeat (``a/cat.png``,
    ``b/cat.png``, ``cat.jpg``) are labelled by their path below the inputs' common
    folder instead (``a_cat_png``, ``b_cat_png``, ``cat_jpg``), and any label still
    repeated is numbered, so no overlay overwrites another.
    """
    out = Path(overlay)
    if out.is_dir() or str(overlay).endswith(("/", "\\")):  # a folder: one file per image inside it
        paths = [out / f"{label}_why.png" for label in _unique_labels(names)]
    else:
        if out.suffix.lower() in OTHER_IMAGE_SUFFIXES:  # why.jpg written as why.png surprised; JPEG would lose the mark
            raise UserError(f"OVERLAY is written as PNG: name it {out.with_suffix('.png').name}, not {out.name}")
        if out.suffix.lower() != ".png":
            out = out.with_suffix(".png")
        paths = ([out] if len(names) == 1 else
                 [out.with_name(f"{out.stem}_{label}.png") for label in _unique_labels(names)])
    refuse_overwriting_inputs(paths, [*names, *also_keep])
    return paths


def refuse_overwriting_inputs(paths: Sequence[Path], names: Sequence[str]) -> None:
    """A UserError when an overlay would replace one of the input images (``--image=a.png --overlay=a.png``
    wrote the overlay over the sketch; so did ``--overlay=a``, saved as ``a.png``). Files are compared as
    the file system sees them (device and inode), not by name: on a case-insensitive volume (macOS, a USB stick)
    ``--image=A.PNG --overlay=a`` names the input, which :meth:`Path.resolve` does not show."""
    inputs = {_file_id(Path(n)) for n in names if Path(n).is_file()}
    clash = next((p for p in paths if p.exists() and _file_id(p) in inputs), None)
    if clash is not None:
        raise UserError(f"the overlay {clash} would overwrite the input image of that name: pass another --overlay "
                        "path (a folder gets <name>_why.png per image)")


def _file_id(path: Path) -> tuple[int, int] | Path:
    """(device, inode) of an existing file, through symbolic links: one value for every name of that file;
    its resolved path where the file system gives no inode (0: some network shares)."""
    st = path.stat()
    return (st.st_dev, st.st_ino) if st.st_ino else path.resolve()


def _unique_labels(names: Sequence[str]) -> list[str]:
    stems = [Path(n).stem for n in names]
    repeated = {s for s, c in Counter(stems).items() if c > 1}
    if repeated:
        resolved = [Path(n).resolve() for n in names]
        common = Path(os.path.commonpath([str(p.parent) for p in resolved]))
        stems = [re.sub(r"[^\w-]+", "_", p.relative_to(common).as_posix()) if s in repeated else s
                 for s, p in zip(stems, resolved)]
    seen: Counter = Counter()
    labels = []
    for label in stems:
        seen[label] += 1
        labels.append(label if seen[label] == 1 else f"{label}_{seen[label]}")
    return labels


# ----------------------------------------------------------------------------- text
def format_text(exp: Explanation) -> str:
    """The compact human-readable explanation."""
    truth = f"   (true class: {exp.extra['true_class']})" if exp.extra.get("true_class") else ""
    top5 = ", ".join(f"{t['class']} {percent(t['probability'], 1)}" for t in exp.top5)
    lines = [f"image: {exp.image}",
             f"predicted: {exp.predicted_class} ({percent(exp.probability, 1)}){truth}",
             f"top-5: {top5}"]
    note = unfamiliar_note(exp)
    if note:
        lines.append(f"WARNING: {note}")
    elif exp.extra.get("familiarity") is not None:  # the verdict is said either way, not only when it warns
        lines.append(f"familiarity: more familiar than {exp.extra['familiarity']:.0f}% of validation sketches "
                     f"(flagged under 1%)")
    kinds = {n.offline for n in exp.neurons}
    mixed = kinds == {True, False}  # then each offline name is starred, as in the sentence
    offline = (" (* offline label, from statistics)" if mixed else
               " (names: offline labels, from statistics)" if kinds == {True} else "")
    lines.append("because of: nothing (a blank page has no ink; the neurons below only sum the logit)"
                 if exp.extra.get("blank") else
                 f"because of (share of the positive evidence, contribution to the logit){offline}:")
    for n in exp.neurons:
        where = describe_map(n.heatmap) if n.heatmap is not None else "?"  # in this sketch, not on average
        # an offline label's own place words are where the neuron fires on average: "here" says this sketch
        name = concept_name(n.concept, keep_auroc=True) + ("*" if mixed and n.offline else "")
        lines.append(f"  {percent(n.share, 1):>6}  {name}  [#{n.neuron_id}, {n.contribution:+.3f}, here: {where}]")
    cited = sum(n.contribution for n in exp.neurons)
    lines.append(f"logit {exp.logit:.3f} = cited {cited:.3f} + others {exp.others:.3f} + bias {exp.bias:.3f} "
                 f"+ SAE error {exp.error:.3f}")
    f = exp.faithfulness
    if "input_cited_drop" in f:
        lines.append(f"evidence: whiting out {f['ink_removed']:.0%} of the ink where the cited concepts fire lowers "
                     f"the logit by {f['input_cited_drop']:.3f}; the same ink where random active neurons fire: "
                     f"{random_drop_words(f, 'input_random_drop')}; where CAM's cells are highest: {f['cam_drop']:.3f}"
                     + (f"; CAM under the same pixel rule: {f['cam_pixels_drop']:.3f}" if "cam_pixels_drop" in f else ""))
    lines.append("consistency: no neuron is cited, so there is nothing to zero in the code" if not exp.neurons else
                 f"consistency (true by construction): zeroing the cited neurons in the code lowers the logit by "
                 f"{f.get('code_cited_drop', 0.0):.3f}; as many random active neurons: "
                 f"{random_drop_words(f, 'code_random_drop')}")
    active = exp.extra.get("top_active")
    if active:
        listed = ", ".join(f"#{i} {s:.2f}" for i, s in zip(active["neuron_ids"], active["scores"]))
        lines.append(f"most active ({active['agg']} over tokens, >= p{active['percentile']:g}): {listed or 'none'}")
    lines.append(exp.sentence)
    if exp.extra.get("llm_sentence") and exp.extra["llm_sentence"] != exp.sentence:  # offline echoes the sentence
        lines.append(f"LLM: {exp.extra['llm_sentence']}")  # it answers for the class: before the contrast
    return "\n".join(lines + versus_lines(exp.extra.get("versus")))


def random_drop_words(faith: dict, key: str) -> str:
    """A random baseline's drop as text, or why there is none (every active neuron cited: the sets match)."""
    return NO_RANDOM_SET if faith.get("random_is_cited") else f"{faith.get(key, 0.0):.3f}"


def versus_lines(versus: dict | None) -> list[str]:
    """The contrast's lines (``--versus``): its neurons, the margin's identity and its sentence; [] without one."""
    if not versus:
        return []
    if "skipped" in versus:
        return [f"versus {versus['class']}: {versus['skipped']}"]
    lines = [f"versus {versus['class']} ({percent(versus['probability'], 1)}): margin {versus['margin']:.3f}, "
             "because of (share of the positive evidence, contribution to the margin):"]
    for n in versus["neurons"]:
        lines.append(f"  {percent(n['share'], 1):>6}  {concept_name(n['concept'], keep_auroc=True)}  "
                     f"[#{n['neuron_id']}, {n['contribution']:+.3f}, here: {n['where']}]")
    cited = sum(n["contribution"] for n in versus["neurons"])
    lines.append(f"margin {versus['margin']:.3f} = cited {cited:.3f} + others {versus['others']:.3f} "
                 f"+ bias {versus['bias']:.3f} + SAE error {versus['error']:.3f}")
    return [*lines, versus["sentence"]]
