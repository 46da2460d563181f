"""Image decoding: any sketch file or payload -> the uint8 white-background square the cache stores.

:func:`decode_image` is the one decoder every source and stage 5 use: transparency is
composited on white, 16-bit and float images are scaled to 8 bits, any mode becomes grey,
the image is padded to a centred white square and resized so that thin strokes keep
their ink. Unusable payloads raise :class:`BadImage` with a short reason; a user's own
file goes through :func:`load_user_image`, which turns that into a one-line UserError.
"""
from __future__ import annotations

import contextlib
import io
import os
import re
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, PngImagePlugin, UnidentifiedImageError

from .errors import UserError
from .logs import log

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")  # what folders are searched for
FLOAT_ONE_MAX = 1.5       # float arrays up to this are 0-1 pixels (cubic resampling overshoots 1 a little)
FLOAT_ONE_MIN = -0.5      # ... and down to this (below: a normalised tensor, not pixels)
FLOAT_255_MIN_TOP = 32.0  # float arrays whose top is above this are 0-255 pixels; in between: neither
MAX_PIXELS = 40_000_000  # larger than any sane sketch; bigger headers are refused undecoded
MAX_SIDE = 8192  # longest side: the image is padded to a square, so a 1 x 200000 strip would need 40 GB
THICKEN_ABOVE = 3.0  # thicken strokes before downscaling by more than this factor
STROKE_OUT_PX = 1.5  # ... to about this width in output pixels, from their measured width (thicker: left as is)
WIDE_ASPECT = 3.0  # a user's image whose long side is over this many times its short one is noted (it reads small)
DARK_SHARE = 0.5  # a picture more than this share dark is noted as light-on-dark (the demo's ink: 8%, at most 21%)


class BadImage(Exception):
    """A payload that cannot become a sketch; ``str(exc)`` is a short reason such as
    ``'empty file'``, ``'not an image'``, ``'truncated'``, ``'corrupt (...)'`` or
    ``'too large (WxH)'``. A source may hand one over as the payload of a row that has
    no usable image; :func:`decode_image` then raises it."""


def is_image_file(path: Path) -> bool:
    """True for a file whose extension is one of :data:`IMAGE_EXTENSIONS` (any case)."""
    return path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file()


# ----------------------------------------------------------------------------- decoding
def decode_image(payload: bytes | str | Path | BadImage | Image.Image, image_size: int,
                 max_side: int = MAX_SIDE) -> np.ndarray:
    """Decode one sketch to a uint8 ``(image_size, image_size)`` array on white.

    Parameters
    ----------
    payload : bytes | str | Path | BadImage | PIL.Image.Image
        Encoded image bytes, a path to an image file, a PIL image (any mode: decoded as
        the same picture in a file would be), or the reason a row has none.
    image_size : int
        Side of the output square.
    max_side : int
        Longest side accepted (a server takes less than ``MAX_SIDE``: decoding costs memory
        the upload's size does not bound).

    Raises
    ------
    BadImage
        Empty payload, not an image, truncated or corrupt data, more than ``MAX_PIXELS``
        pixels or a side longer than ``max_side`` (checked on the header, before any pixel
        is decoded).
    """
    if int(image_size) < 1:
        raise ValueError(f"image_size must be positive, got {image_size}")
    if isinstance(payload, BadImage):
        raise payload
    if isinstance(payload, Image.Image):
        _check_size(payload, max_side)
        return _to_sketch(payload, int(image_size))
    with _open_checked(payload, max_side) as im:
        return _to_sketch(im, int(image_size))


def _to_sketch(im: Image.Image, image_size: int) -> np.ndarray:
    try:
        gray = _to_white_gray(im)
    except (OSError, SyntaxError, ValueError, EOFError) as exc:  # PIL's ways of saying "broken"
        raise BadImage(_failure_reason(exc)) from None
    return square_resize(gray, image_size)


def load_user_image(path_or_pil: str | Path | Image.Image, image_size: int, name: str = "") -> np.ndarray:
    """A user's image file or PIL image (any mode) -> uint8 (S, S) like the cache; bad input is a
    UserError that names the file, or ``name`` (default ``<PIL image>``)."""
    if isinstance(path_or_pil, Image.Image):
        payload, name = path_or_pil, name or "<PIL image>"
    else:
        payload = user_path(path_or_pil)
        name = name or os.fspath(path_or_pil)
        if payload.is_dir():
            raise UserError(f"{payload} is a folder: pass its image files (why_did_you.explain_images(folder) and "
                            f"why_did_you.py --image=FOLDER read a folder)")
        if not payload.is_file():
            raise UserError(f"image not found: {payload}")
    try:
        sketch = decode_image(payload, image_size)
    except BadImage as exc:
        raise UserError(f"cannot read image {name}: {exc}") from None
    width, height = picture_size(payload)
    for note in (aspect_note(width, height, name), dark_note(sketch, name, _aspect(width, height))):
        if note:
            log(note)
    return sketch


def picture_size(payload: Path | Image.Image) -> tuple[int, int]:
    """(width, height) of a picture as :func:`decode_image` reads it: EXIF orientations 5-8 turn it a quarter."""
    if isinstance(payload, Image.Image):
        (width, height), turned = payload.size, _exif_orientation(payload) >= 5
    else:
        with Image.open(payload) as im:  # the header only: decode_image has read the file once already
            (width, height), turned = im.size, _exif_orientation(im) >= 5
    return (height, width) if turned else (width, height)


def _aspect(width: int, height: int) -> float:
    return max(width, height) / max(1, min(width, height))


def dark_note(sketch: np.ndarray, name: str, aspect: float = 1.0) -> str | None:
    """A note when most of a picture is dark: the models read dark strokes on white paper, so light strokes
    on a dark background (a chalkboard, an MNIST-style array) are explained as a blot of ink. The share is
    of the picture's own area: a picture ``aspect``:1 fills 1/aspect of the square, the rest is white padding."""
    dark = min(1.0, float((np.asarray(sketch) < 128).mean()) * aspect)
    if dark <= DARK_SHARE:
        return None
    return (f"note: {name} is {dark:.0%} dark: the models read dark strokes on white paper; if it is light strokes "
            "on a dark background, invert it (255 - array, or PIL.ImageOps.invert)")


def aspect_note(width: int, height: int, name: str) -> str | None:
    """A note when a picture is over :data:`WIDE_ASPECT`: 1: it is padded to a square as in training (no
    crop, no stretch), so the drawing fills only a strip of the model's input and reads smaller."""
    ratio = _aspect(width, height)
    if ratio <= WIDE_ASPECT:
        return None
    return (f"note: {name} is {width}x{height} ({ratio:.1f}:1): padded to a square as in training, the drawing "
            f"fills {1 / ratio:.0%} of the input's {'height' if width > height else 'width'}; "
            "crop it closer to the drawing for a larger sketch")


def user_path(text: str | os.PathLike) -> Path:
    """A typed path as a file path: ``~`` expanded, a ``file://`` URI unquoted; a web URL is a
    UserError (nothing is downloaded; it read as "image not found: https:/example.com/x.png")."""
    text = os.fspath(text)
    url = urllib.parse.urlparse(text)
    scheme = url.scheme.lower()
    if scheme == "file":
        return Path(urllib.request.url2pathname(url.path))
    if scheme in ("http", "https", "ftp", "s3", "gs"):
        raise UserError(f"{text} is a URL: images are not downloaded; save it and pass the file's path")
    return Path(text).expanduser()


def array_to_sketch(array: np.ndarray, image_size: int, name: str = "<array>") -> np.ndarray:
    """An array as a model input (the notebook's third kind of image).

    A uint8 ``(S, S)`` array at the model's size is taken as is, like the cache's images.
    Any other grey ``(H, W)`` or colour ``(H, W, 3|4)`` array is read as the picture it
    holds, through :func:`decode_image` (padded, resized; white paper, dark ink). A boolean
    ``(H, W)`` mask is ink where it holds its less common value. Floats are
    0-1 when their largest value is at most 1.5, 0-255 when it is above 32 (resampling
    overshoot is clipped); integers are 0-255, or 0-65535 when any value is above 255. NaN,
    infinity, floats that fit neither scale (a normalised tensor), negative integers and
    integers above 65535 are a UserError, as are other shapes; notes and errors call it ``name``.
    """
    if array.dtype == np.uint8 and array.shape == (image_size, image_size):
        note = dark_note(array, name)
        if note:
            log(note)
        return array
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[..., 0]
    if array.dtype == bool and array.ndim == 2:
        array = mask_to_grey(array, name)
    numeric = np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)
    if not numeric or not (array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (3, 4))):
        raise UserError(f"array input must be numbers shaped (H, W), (H, W, 3) or (H, W, 4) (white paper, dark "
                        f"ink), or a boolean (H, W) mask, got {array.dtype} {array.shape}")
    return load_user_image(Image.fromarray(_to_uint8_values(array)), image_size, name=name)


def mask_to_grey(mask: np.ndarray, name: str) -> np.ndarray:
    """A boolean mask (or a (B, H, W) stack of them, one polarity for all) as white paper and black ink.
    Masks have no convention (``a < 128`` marks the ink, ``a > 128`` the paper), so the less common value
    is the ink (a sketch is mostly paper); a note says when that is False, so a filled silhouette read the
    wrong way round is seen."""
    ink_is_true = mask.sum() * 2 < mask.size
    if not ink_is_true and mask.any():
        log(f"note: {name} is a boolean mask, {mask.mean():.0%} True: read with False as the ink (the less common "
            "value); pass ~mask if True marks the ink")
    return np.where(mask if ink_is_true else ~mask, 0, 255).astype(np.uint8)


def _to_uint8_values(array: np.ndarray) -> np.ndarray:
    """:func:`array_to_sketch`'s value rules: its numbers as 0-255 uint8."""
    if array.size == 0:
        return array.astype(np.uint8)
    if array.dtype.kind == "f":
        if not np.isfinite(array).all():
            raise UserError("array input holds NaN or infinite values: give paper its white value (1.0 or 255)")
        low, high = float(array.min()), float(array.max())
        # 0-1 or 0-255 pixels, with the overshoot cubic resampling leaves on either side (clipped); a
        # normalised tensor (mean/std: about -3..3) is neither, and reading it as pixels would be garbage
        if (high <= FLOAT_ONE_MAX and low < FLOAT_ONE_MIN) or FLOAT_ONE_MAX < high <= FLOAT_255_MIN_TOP:
            raise UserError(f"array input holds values from {low:.3g} to {high:.3g}: neither 0-1 nor 0-255 pixels "
                            f"(a normalised tensor?); give pixel values with white paper")
        scale = 255.0 if high <= FLOAT_ONE_MAX else 1.0
        return np.clip(np.rint(array.astype(np.float64) * scale), 0, 255).astype(np.uint8)
    low, high = int(array.min()), int(array.max())
    if low < 0 or high > 65535:
        raise UserError(f"array input holds integers outside 0-65535 ({low}..{high}): scale it to 0-255")
    wide = array.astype(np.int64)
    return (wide if high <= 255 else np.rint(wide * (255.0 / 65535))).astype(np.uint8)


def png_bytes(image: Image.Image | np.ndarray, compress_level: int = 6, text: dict[str, str] | None = None) -> bytes:
    """A PIL image or a uint8 array encoded as PNG bytes (zlib ``compress_level`` 0-9: 1 is fastest),
    with ``text`` as tEXt chunks (written before the pixels: :func:`png_text` reads them without decoding)."""
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    info = None
    if text:
        info = PngImagePlugin.PngInfo()
        for key, value in text.items():
            info.add_text(key, value)
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=compress_level, pnginfo=info)
    return buf.getvalue()


def png_text(path: str | Path) -> dict[str, str]:
    """The tEXt chunks before the pixels of a PNG file; {} for any other file or one that cannot be read."""
    try:
        with Image.open(path) as im:
            return {k: v for k, v in im.info.items() if isinstance(v, str)} if im.format == "PNG" else {}
    except (OSError, ValueError, Image.DecompressionBombError):
        return {}


@contextlib.contextmanager
def _open_checked(payload: bytes | str | Path, max_side: int = MAX_SIDE):
    """Open an image lazily (header only) and refuse empty, non-image or huge ones."""
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
            _check_size(im, max_side)  # decided on the header: never decoded
            yield im


def _check_size(im: Image.Image, max_side: int = MAX_SIDE) -> None:
    width, height = im.size
    if width * height > MAX_PIXELS or max(width, height) > max_side:
        raise BadImage(f"too large ({width}x{height})")
    if width == 0 or height == 0:
        raise BadImage("empty (0 pixels)" if width == height == 0 else "corrupt (zero-sized image)")


def _failure_reason(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return "truncated" if "truncated" in text.lower() else f"corrupt ({text[:80]})"


# ----------------------------------------------------------------------------- PIL helpers
def _to_white_gray(im: Image.Image) -> Image.Image:
    """Any PIL image -> mode 'L', transparency composited on white, high depth scaled."""
    if _exif_orientation(im) != 1:  # phone photos of sketches: honour EXIF rotation
        im = ImageOps.exif_transpose(im)
    if im.mode in ("La", "LAB"):  # premultiplied grey, CIELAB: PIL converts them to little directly
        im = im.convert("LA") if im.mode == "La" else im.getchannel(0)  # LAB's L band is its lightness
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


def _exif_orientation(im: Image.Image) -> int:
    try:
        return int(im.getexif().get(0x0112, 1))
    except Exception:  # a damaged EXIF block should not cost us the sketch
        return 1


def _high_depth_to_gray(im: Image.Image) -> Image.Image:
    """16-bit, 32-bit integer or float grey -> 8-bit grey with the full range kept."""
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


# ----------------------------------------------------------------------------- ink-preserving resize
def square_resize(gray: Image.Image, size: int) -> np.ndarray:
    """Pad a grey image to a centred white square, then resize to ``size`` keeping its ink.

    Strokes thinner than ``STROKE_OUT_PX`` output pixels are thickened first when shrinking by
    more than ``THICKEN_ABOVE``x, so the thin strokes of a 1111 px sketch survive at 224 or
    112 px, while a marker's strokes are left as drawn.
    """
    width, height = gray.size
    side = max(width, height)
    ratio = side / size
    if ratio > THICKEN_ABOVE:
        # Grow strokes to ~1.5 output pixels from their measured width (TU-Berlin's ~3 px
        # pen: 1111 -> 224 uses k=5, 1111 -> 112 uses k=13). Thinner and they fade to light
        # grey when averaged; thicker and nearby strokes merge. A fixed 3 px guess grew a
        # marker's strokes too: test sketches upscaled to 1024 px read 0.75 that way, 0.98 with the measured width.
        pixels = np.asarray(gray)
        k = 2 * max(0, round((STROKE_OUT_PX * ratio - stroke_width(pixels)) / 2)) + 1
        if k > 1:
            gray = Image.fromarray(_thicken(pixels, k), mode="L")
    if width != height:
        canvas = Image.new("L", (side, side), 255)
        canvas.paste(gray, ((side - width) // 2, (side - height) // 2))
        gray = canvas
    if side > size:  # area averaging: exact antialiasing for line art, no ringing, 5x faster than Lanczos
        gray = gray.resize((size, size), Image.Resampling.BOX)
    elif side < size:
        gray = gray.resize((size, size), Image.Resampling.LANCZOS)
    return np.array(gray, dtype=np.uint8)


def stroke_width(gray: np.ndarray, dark: int = 128) -> float:
    """The strokes' mean width in pixels: twice the ink area over its edge pixels (a stroke of width w and
    length L has about w·L ink pixels, 2·L of them on an edge; a 1 px line reads 2). 0 for a blank page."""
    ink = np.asarray(gray) < dark
    padded = np.pad(ink, 1)
    inner = (padded[1:-1, 1:-1] & padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:])
    edge = int((ink & ~inner).sum())
    return 2.0 * int(ink.sum()) / edge if edge else 0.0


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
