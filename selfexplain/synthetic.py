"""The built-in procedural sketch dataset (``DATASET=synthetic``, the offline default).

The dataset is *compositional*: 9 part types (circle, triangle, zigzag, ...) and 12
classes, each class a set of 3 parts. The classes are the 12 lines of the affine plane
AG(2, 3) whose 9 points are the parts, so every pair of parts lies in exactly one class,
two classes share at most one part and every part is in exactly 4 classes. No part (and
no pair of parts' positions) gives the class away: the classifier has to detect each part
wherever it is, which is what makes stage 3's SAE neurons part detectors.

Layout, in one of two styles (``STYLES``, recorded in the dataset spec):

* ``quadrants`` (a quick toy; the tests' tiny runs and specs made before the setting):
  the 3 class parts go into 3 of the 4 quadrants, each 36-44% of the image, one pen width
  (1.7-2.6% of the image), a light wobble. 2 epochs reach ~0.98 test accuracy at 64 px,
  but a classifier trained on it reads a person's drawing poorly (0.22 on the second
  renderer of ``bench/bench_person.py``): it learns the house style, not the parts.
* ``varied`` (the demo, issue 16: how people draw): the parts go anywhere, each 12-50% of
  the image (in half of the images all three are large, 30-48%; a part that finds no free
  room is shrunk until it fits), with a gap between their boxes so parts never overlap, a
  pen from a fine liner to a marker (1.2-5%, log-uniform) and strokes from clean to shaky.
  It needs more training: the demo's 600 sketches per class x 8 epochs, drawn anew every
  epoch (``fresh_sketches``), reach 0.99.

Both turn and flip parts at random. With probability ``DISTRACTOR_PROB`` one smaller
*distractor* part of a type outside the class joins them; the image stays unambiguous,
since no other class's 3 parts fit in the 4. A stray stroke or two adds clutter.

Drawing: each part is a few polylines in a canonical frame; every polyline gets smooth
"hand" wobble and one pen width per image (above). Strokes are drawn
with PIL at 2-4x resolution and box-filtered down so they stay smooth from 64 to 224 px. A
sample's randomness comes from ``np.random.default_rng([seed, class_index, j])`` only, so
the output is byte-identical for a given seed whatever the generation order, and a smaller
``n_per_class`` yields a subset of a larger one. :func:`rerender` re-draws any sample, and
with ``omit=k`` draws it without part k and every other pixel unchanged (the counterfactual).

Box convention: ``[x0, y0, x1, y1]`` in output pixels, x = column, ``x1``/``y1``
exclusive, so ``image[y0:y1, x0:x1]`` holds the part's strokes.
"""
from __future__ import annotations

import ctypes
import os
import signal
import sys
from concurrent.futures import ProcessPoolExecutor

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from .config import register_choices, require_choice
from .errors import UserError

# Part i is the point (i // 3, i % 3) of AG(2, 3).
PART_TYPES = ["circle", "triangle", "zigzag", "spokes", "rectangle",
              "arc", "dots", "cross", "spiral"]


def _affine_plane_lines() -> list:
    """The 12 lines of AG(2, 3) as sorted triples of part indices (point (x, y) = 3x + y)."""
    lines = [[3 * x + (m * x + b) % 3 for x in range(3)] for m in range(3) for b in range(3)]
    lines += [[3 * b + y for y in range(3)] for b in range(3)]  # the vertical lines x = b
    return [sorted(line) for line in lines]


# A class is named after its parts (readable in explanations); one of each part.
CLASS_PARTS = {"-".join(PART_TYPES[i] for i in line): {PART_TYPES[i]: 1 for i in line}
               for line in _affine_plane_lines()}
CLASS_NAMES = list(CLASS_PARTS)
DISTRACTOR_TYPES = list(PART_TYPES)  # any part may be a distractor (in classes that lack it)
DISTRACTOR_PROB = 0.3  # chance that an image gets its one distractor
PART_SIZE = (0.12, 0.5)  # longest side of a class part, fraction of the image (before any shrink)
LARGE_PART_SIZE = (0.3, 0.48)  # the same in a "large parts" image: quick to learn, anchors the small ones
LARGE_PROB = 0.5  # share of images with large parts
DISTRACTOR_SIZE = (0.12, 0.3)  # longest side of the distractor, fraction of the image
DISTRACTOR_MIN = 0.08  # a distractor is shrunk to find room, but dropped below this fraction
PART_GAP = 0.02  # blank kept between two parts' boxes, fraction of the image
PLACE_TRIES = 24  # random spots tried for a part before it is shrunk
SHRINK = 0.85  # a part that finds no room is scaled by this and tried again
STROKE_WIDTH = (0.012, 0.05)  # stroke width, fraction of the image size (log-uniform): thin pen to marker
# quadrants: the quick toy (tests); varied: how people draw (the demo, issue 16)
STYLES = register_choices("SYNTHETIC_STYLE", ("quadrants", "varied"))
LEGACY_STYLE = "quadrants"  # what a spec without "style" was drawn in (and the renderers' default); the demo uses varied
QUADRANT_PART_SIZE = (0.36, 0.44)  # quadrants style: longest side of a class part, fraction of the image
QUADRANT_DISTRACTOR_SIZE = (0.22, 0.30)  # quadrants style: the distractor's longest side
QUADRANT_MARGIN = 0.03  # quadrants style: blank kept inside each quadrant's border, fraction of the image
QUADRANT_STROKE = (0.017, 0.026)  # quadrants style: stroke width, fraction of the image (uniform)
QUADRANT_WOBBLE = 0.008  # quadrants style: wobble amplitude, fraction of the image
MIN_STROKE_PX = 1.5  # never thinner than this in output pixels (small images)
WOBBLE = (0.0, 0.012)  # hand-drawn wobble amplitude, fraction of the image (uniform: clean to shaky)
GENERATOR_VERSION = 3  # bump whenever the drawing changes, so cached datasets are rebuilt

Stroke = tuple  # ("line", points (n, 2), width factor) or ("dot", centre (2,), radius)


def spec_style(spec: dict) -> str:
    """The style a dataset spec's sketches were drawn in (specs made before the setting: quadrants)."""
    return spec.get("style", LEGACY_STYLE)


# ----------------------------------------------------------------------------- primitives
def _ellipse(cx, cy, rx, ry, a0, a1, n=48):
    t = np.linspace(a0, a1, n)
    return np.stack([cx + rx * np.cos(t), cy + ry * np.sin(t)], 1)


def _line(pts) -> Stroke:
    return ("line", np.asarray(pts, dtype=float), 1.0)


def _loop(cx, cy, r, rng, squash=0.08) -> Stroke:
    """A closed hand-drawn loop: random start, slightly oval, small gap or overshoot."""
    a0 = rng.uniform(0, 2 * np.pi)
    sweep = 2 * np.pi + rng.uniform(-0.2, 0.4)
    return _line(_ellipse(cx, cy, r, r * rng.uniform(1 - squash, 1 + squash), a0, a0 + sweep))


def _poly(corners, closed=True) -> Stroke:
    pts = list(corners) + ([corners[0]] if closed else [])
    return _line(pts)


def _rect(x0, y0, x1, y1) -> Stroke:
    return _poly([(x0, y0), (x1, y0), (x1, y1), (x0, y1)])


def _spokes(cx, cy, r0, r1, n, rng) -> list:
    a = rng.uniform(0, 2 * np.pi) + 2 * np.pi * np.arange(n) / n + rng.normal(0, 0.05, n)
    c, s = np.cos(a), np.sin(a)
    return [_line([(cx + r0 * c[k], cy + r0 * s[k]), (cx + r1 * c[k], cy + r1 * s[k])])
            for k in range(n)]


def _zigzag(x0, x1, y_base, y_peak, teeth) -> Stroke:
    xs = np.linspace(x0, x1, 2 * teeth + 1)
    ys = np.where(np.arange(2 * teeth + 1) % 2 == 1, y_peak, y_base)
    return _line(np.stack([xs, ys], 1))


def _cross(cx, cy, arm, rng) -> list:
    a = rng.uniform(-0.1, 0.1)
    c, s = arm * np.cos(a), arm * np.sin(a)
    return [_line([(cx - c, cy - s), (cx + c, cy + s)]), _line([(cx + s, cy - c), (cx - s, cy + c)])]


def _dots(centres, r) -> list:
    return [("dot", np.asarray(p, dtype=float), r) for p in centres]


# ----------------------------------------------------------------------------- parts
_DICE = {3: [(-1, -1), (0, 0), (1, 1)], 4: [(-1, -1), (1, -1), (-1, 1), (1, 1)],
         5: [(-1, -1), (1, -1), (0, 0), (-1, 1), (1, 1)]}  # dice faces: dots stay apart


def _part(ptype, rng) -> list:
    """The strokes of one part of type ``ptype`` in a canonical [-0.5, 0.5] frame."""
    if ptype == "circle":
        return [_loop(0, 0, 0.5, rng)]
    if ptype == "triangle":
        return [_poly([(-0.5, 0.4), (rng.uniform(-0.2, 0.2), -0.45), (0.5, 0.4)])]
    if ptype == "zigzag":
        return [_zigzag(-0.5, 0.5, 0.25, -0.25, int(rng.integers(3, 5)))]
    if ptype == "spokes":  # a star burst: many rays, unlike the 4 arms of the cross
        return _spokes(0, 0, 0.1, 0.5, int(rng.integers(7, 10)), rng)
    if ptype == "rectangle":
        return [_rect(-0.5, -rng.uniform(0.25, 0.4), 0.5, rng.uniform(0.25, 0.4))]
    if ptype == "arc":  # a half-open bowl, not a closed circle
        return [_line(_ellipse(0, -0.15, 0.5, rng.uniform(0.45, 0.6), 0.15, np.pi - 0.15, 32))]
    if ptype == "dots":
        pts = np.array(_DICE[int(rng.integers(3, 6))], dtype=float) * 0.38
        return _dots(pts + rng.normal(0, 0.03, pts.shape), 0.11)
    if ptype == "cross":
        return _cross(0, 0, 0.5, rng)
    if ptype == "spiral":  # a coiled open line: nested turns, unlike the single closed circle
        t = np.linspace(0.0, 1.0, 72)
        angle = 2 * np.pi * rng.uniform(2.0, 2.5) * t + rng.uniform(0, 2 * np.pi)
        radius = 0.08 + 0.42 * t
        return [_line(np.stack([radius * np.cos(angle), radius * np.sin(angle)], 1))]
    raise ValueError(f"unknown part type {ptype!r}")


# ----------------------------------------------------------------------------- geometry
def _transform(parts, matrix, offset):
    """Apply x -> matrix @ x + offset to every stroke; dot radii scale with the matrix."""
    scale = abs(matrix[0, 0] * matrix[1, 1] - matrix[0, 1] * matrix[1, 0]) ** 0.5
    out = []
    for ptype, strokes in parts:
        new = []
        for kind, pts, extra in strokes:
            moved = pts @ matrix.T + offset
            new.append((kind, moved, extra * scale if kind == "dot" else extra))
        out.append((ptype, new))
    return out


def _extent(parts) -> np.ndarray:
    """[x0, y0, x1, y1] over every stroke point and dot disc."""
    lo, hi = [], []
    for _, strokes in parts:
        for kind, pts, extra in strokes:
            pad = extra if kind == "dot" else 0.0
            pts = pts.reshape(-1, 2)
            lo.append(pts.min(0) - pad)
            hi.append(pts.max(0) + pad)
    return np.concatenate([np.min(lo, 0), np.max(hi, 0)])


def _fit(parts, rng, size, angle_deg, flip):
    """Flip, rotate and scale ``parts`` so their longest side is ``size``; origin at top-left."""
    a = np.deg2rad(rng.uniform(-angle_deg, angle_deg))
    rot = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    matrix = rot @ np.diag([-1.0 if flip else 1.0, 1.0])
    parts = _transform(parts, matrix, np.zeros(2))
    ext = _extent(parts)
    s = size / max(ext[2] - ext[0], ext[3] - ext[1])
    parts = _transform(parts, s * np.eye(2), -s * ext[:2])
    return parts, s * (ext[2:] - ext[:2])


# ----------------------------------------------------------------------------- drawing
def _wobble(lines: list, canvas: float, amplitude: float, rng):
    """Densify and wobble many polylines at once (vectorised: this is the hot loop).

    Long segments are split so the noise can bend them; every original vertex is kept so
    corners stay sharp. The noise is a sum of two random sinusoids per axis along the
    stroke's length: smooth, like a hand, at most ``amplitude`` px (0: clean strokes).
    Returns the new polylines and their corners.
    """
    counts = np.array([len(p) for p in lines])
    pts = np.concatenate(lines)
    sid = np.repeat(np.arange(len(lines)), counts)
    d = np.diff(pts, axis=0)
    inside = sid[1:] == sid[:-1]  # segments that join two points of one stroke
    seg = np.where(inside, np.hypot(d[:, 0], d[:, 1]), 0.0)
    k = np.maximum(1, np.ceil(seg / max(1.5, canvas / 60)).astype(int))
    idx = np.repeat(np.arange(len(seg)), k)
    frac = (np.arange(k.sum()) - np.repeat(np.cumsum(k) - k, k)) / np.repeat(k, k)
    dense = np.concatenate([pts[idx] + frac[:, None] * d[idx] * inside[idx, None], pts[-1:]])
    dsid = np.concatenate([sid[idx], sid[-1:]])
    t = np.concatenate([np.cumsum(seg)[idx] - seg[idx] * (1 - frac), [seg.sum()]])
    starts = np.cumsum(counts) - counts
    size = (np.maximum.reduceat(pts, starts) - np.minimum.reduceat(pts, starts)).max(1)
    amp = np.clip(0.04 * size, 0.3 * amplitude, amplitude)[:, None, None]
    wavelength = canvas * rng.uniform(0.15, 0.6, (len(lines), 2, 2))  # (stroke, component, axis)
    phase = rng.uniform(0, 2 * np.pi, (len(lines), 2, 2))
    gain = amp * rng.uniform(0.2, 0.7, (len(lines), 2, 2))
    arg = 2 * np.pi * t[:, None, None] / wavelength[dsid] + phase[dsid]
    dense = dense + (gain[dsid] * np.sin(arg)).sum(1)
    return np.split(dense, np.cumsum(np.bincount(dsid))[:-1]), _corners(dense, dsid)


def _corners(pts: np.ndarray, sid: np.ndarray, min_turn: float = 0.5):
    """Points (and their stroke ids) where a stroke ends or turns by > ``min_turn`` rad."""
    d = np.diff(pts, axis=0)
    a = np.arctan2(d[:, 1], d[:, 0])
    turn = np.abs((np.diff(a) + np.pi) % (2 * np.pi) - np.pi)
    same = (sid[:-2] == sid[1:-1]) & (sid[1:-1] == sid[2:])
    edge = np.ones(len(pts), dtype=bool)
    edge[1:-1] = (sid[:-2] != sid[1:-1]) | (sid[1:-1] != sid[2:]) | (same & (turn > min_turn))
    return pts[edge], sid[edge]


def _draw(parts, canvas: int, width: float, wobble: float, rng, omit=None):
    """Draw every stroke on a white ``canvas`` square; return the image and part extents.

    Part ``omit`` (an index into ``parts``) is laid out and its random draws consumed like
    any other, but not inked: every other stroke comes out exactly as in the full drawing.
    """
    lines = [(i, pts, f) for i, (_, strokes) in enumerate(parts) for kind, pts, f in strokes
             if kind == "line"]
    dots = [(i, pts, r) for i, (_, strokes) in enumerate(parts) for kind, pts, r in strokes
            if kind == "dot"]
    owner = np.array([i for i, _, _ in lines])
    widths = np.array([f for _, _, f in lines]) * width * rng.uniform(0.85, 1.15, len(lines))
    widths = np.maximum(2, np.round(widths)).astype(int)
    polys, (caps, cap_sid) = _wobble([p for _, p, _ in lines], canvas, wobble, rng)
    img = Image.new("L", (canvas, canvas), 255)
    draw = ImageDraw.Draw(img)
    lo, hi = np.full((len(parts), 2), np.inf), np.full((len(parts), 2), -np.inf)
    for i, poly, w in zip(owner, polys, widths):
        if i != omit:
            draw.line(poly.ravel().tolist(), fill=0, width=int(w))
        lo[i] = np.minimum(lo[i], poly.min(0) - w / 2)
        hi[i] = np.maximum(hi[i], poly.max(0) + w / 2)
    for (x, y), h, i in zip(caps.tolist(), (widths[cap_sid] / 2).tolist(), owner[cap_sid]):
        if i != omit:
            draw.ellipse([x - h, y - h, x + h, y + h], fill=0)  # round caps and joints
    for i, (x, y), r in dots:
        r = max(r, 0.6 * width)
        if i != omit:
            draw.ellipse([x - r, y - r, x + r, y + r], fill=0)
        lo[i] = np.minimum(lo[i], (x - r, y - r))
        hi[i] = np.maximum(hi[i], (x + r, y + r))
    return img, np.concatenate([lo, hi], 1)


def _clutter(canvas: float, rng) -> list:
    """Zero to two short stray strokes: unrecorded noise, as in real sketches."""
    strokes = []
    for _ in range(int(rng.integers(0, 3))):
        start = rng.uniform(0.05, 0.95, 2) * canvas
        length, a = rng.uniform(0.03, 0.07) * canvas, rng.uniform(0, 2 * np.pi)
        bend = rng.uniform(-0.4, 0.4)
        ang = a + bend * np.linspace(0, 1, 6)
        steps = np.stack([np.cos(ang), np.sin(ang)], 1) * length / 5
        strokes.append(_line(start + np.concatenate([[[0.0, 0.0]], np.cumsum(steps[:-1], 0)])))
    return [(None, strokes)] if strokes else []


# ----------------------------------------------------------------------------- samples
def supersample_factor(image_size: int) -> int:
    """Drawing resolution multiplier: at least 2x, and a canvas of at least ~224 px."""
    return max(2, int(round(224 / image_size)))


def _placed(ptype, size: float, free: tuple, gap: float, taken: list, rng, min_side: float = 0.0) -> list:
    """One part of ``ptype``, randomly turned and about ``size`` px long, at a random free spot.

    Tries ``PLACE_TRIES`` spots inside the ``free`` area (x0, y0, x1, y1 for the top-left
    corner's box) that keep ``gap`` px from the ``taken`` boxes; then shrinks the part by
    ``SHRINK`` and tries again, giving up (``[]``) once it is shorter than ``min_side`` px.
    The chosen box is appended to ``taken``.
    """
    part, wh = _fit([(ptype, _part(ptype, rng))], rng, size, 180.0, bool(rng.random() < 0.5))
    lo, hi = np.array(free[:2], dtype=float), np.array(free[2:], dtype=float)
    others = np.array(taken, dtype=float).reshape(-1, 4)
    while True:
        corners = rng.uniform(lo, np.maximum(hi - wh, lo), (PLACE_TRIES, 2))
        boxes = np.concatenate([corners, corners + wh], 1)[:, None]  # (tries, 1, 4) against (taken, 4)
        apart = ((boxes[..., 0] >= others[:, 2] + gap) | (others[:, 0] >= boxes[..., 2] + gap)
                 | (boxes[..., 1] >= others[:, 3] + gap) | (others[:, 1] >= boxes[..., 3] + gap))
        fits = np.flatnonzero(apart.all(1))
        if len(fits):
            taken.append(boxes[fits[0], 0])
            return _transform(part, np.eye(2), corners[fits[0]])
        if wh.max() * SHRINK < min_side:
            return []
        part, wh = _transform(part, SHRINK * np.eye(2), np.zeros(2)), SHRINK * wh


def _compose(class_index: int, canvas: int, width: float, wobble: float, rng) -> list:
    """Class parts anywhere on the canvas, apart; maybe one smaller distractor; then clutter.

    Parts are placed largest first so big ones still find room; boxes keep a gap of a
    stroke width plus the wobble, so they never overlap once drawn.
    """
    own = list(CLASS_PARTS[CLASS_NAMES[class_index]])
    sizes = rng.uniform(*(LARGE_PART_SIZE if rng.random() < LARGE_PROB else PART_SIZE), len(own)) * canvas
    edge = width / 2 + 2 * wobble + 1  # strokes and wobble stay inside the image
    free, gap = (edge, edge, canvas - edge, canvas - edge), width + 4 * wobble + PART_GAP * canvas
    taken, parts = [], []
    for k in np.argsort(-sizes):
        parts += [(t, s, False) for t, s in _placed(own[k], sizes[k], free, gap, taken, rng)]
    if rng.random() < DISTRACTOR_PROB:
        ptype = str(rng.choice([t for t in DISTRACTOR_TYPES if t not in own]))
        size = rng.uniform(*DISTRACTOR_SIZE) * canvas
        parts += [(t, s, True) for t, s in _placed(ptype, size, free, gap, taken, rng, DISTRACTOR_MIN * canvas)]
    parts += [(t, s, False) for t, s in _clutter(canvas, rng)]
    return parts


def _in_quadrant(ptype, cell: int, size_range, canvas: int, rng) -> list:
    """Quadrants style: one part of ``ptype``, turned and sized, at a random spot in quadrant ``cell``."""
    size = rng.uniform(*size_range) * canvas
    part, wh = _fit([(ptype, _part(ptype, rng))], rng, size, 180.0, bool(rng.random() < 0.5))
    half, margin = canvas / 2, QUADRANT_MARGIN * canvas
    lo = np.array([cell % 2, cell // 2]) * half + margin
    corner = rng.uniform(lo, np.maximum(lo + half - 2 * margin - wh, lo))
    return _transform(part, np.eye(2), corner)


def _compose_quadrants(class_index: int, canvas: int, rng) -> list:
    """Quadrants style: class parts in 3 random quadrants, maybe a distractor in the 4th, then clutter."""
    own = list(CLASS_PARTS[CLASS_NAMES[class_index]])
    cells = rng.permutation(4)
    parts = [(t, s, False) for k, ptype in enumerate(own)
             for t, s in _in_quadrant(ptype, cells[k], QUADRANT_PART_SIZE, canvas, rng)]
    if rng.random() < DISTRACTOR_PROB:
        ptype = str(rng.choice([t for t in DISTRACTOR_TYPES if t not in own]))
        parts += [(t, s, True) for t, s in _in_quadrant(ptype, cells[3], QUADRANT_DISTRACTOR_SIZE, canvas, rng)]
    parts += [(t, s, False) for t, s in _clutter(canvas, rng)]
    return parts


def _layout(class_index: int, image_size: int, canvas: int, factor: int, style: str, rng):
    """(parts, pen width, wobble amplitude) in canvas pixels, in each style's order of random draws."""
    if style == "quadrants":
        parts = _compose_quadrants(class_index, canvas, rng)
        width = max(image_size * rng.uniform(*QUADRANT_STROKE), MIN_STROKE_PX) * factor
        return parts, width, QUADRANT_WOBBLE * canvas
    if style != "varied":
        require_choice("SYNTHETIC_STYLE", style, STYLES)
    width = max(image_size * np.exp(rng.uniform(*np.log(STROKE_WIDTH))), MIN_STROKE_PX) * factor
    wobble = rng.uniform(*WOBBLE) * canvas
    return _compose(class_index, canvas, width, wobble, rng), width, wobble


def render_sample(class_index: int, image_size: int, rng: np.random.Generator, omit: int | None = None,
                  style: str = LEGACY_STYLE):
    """Draw one sketch of class ``class_index``.

    Parameters
    ----------
    class_index : index into ``CLASS_NAMES``.
    image_size : output side S in pixels.
    rng : the sample's random generator (all randomness comes from it).
    omit : index into the returned ``parts`` of a part to leave out (the counterfactual);
        every random draw is still made, so all other pixels match the full sketch.
    style : ``quadrants`` (parts of 36-44% of the image in three quadrants, one pen) or
        ``varied`` (parts of 12-50% anywhere, thin pen to marker, clean to shaky strokes).

    Returns
    -------
    image : uint8 (S, S), white background 255, dark strokes.
    parts : list of ``{"part": type, "box": [x0, y0, x1, y1], "distractor": bool}``,
        boxes in output pixels, ``x1``/``y1`` exclusive, tight around the part's strokes;
        the same list with or without ``omit``.
    """
    factor = supersample_factor(image_size)
    canvas = factor * image_size
    parts, width, wobble = _layout(class_index, image_size, canvas, factor, style, rng)
    recorded = [i for i, (ptype, _, _) in enumerate(parts) if ptype is not None]  # not clutter
    if omit is not None and not 0 <= omit < len(recorded):
        raise UserError(f"omit must index one of the sketch's {len(recorded)} parts, got {omit}")
    img, extents = _draw([(t, s) for t, s, _ in parts], canvas, width, wobble, rng,
                         omit=None if omit is None else recorded[omit])
    image = np.asarray(img.reduce(factor), dtype=np.uint8)
    records = []
    for i in recorded:
        ptype, _, distractor = parts[i]
        x0, y0 = np.clip(np.floor(extents[i, :2] / factor), 0, image_size - 1).astype(int)
        x1, y1 = np.clip(np.ceil(extents[i, 2:] / factor), 1, image_size).astype(int)
        box = [int(x0), int(y0), int(max(x1, x0 + 1)), int(max(y1, y0 + 1))]
        records.append({"part": ptype, "box": box, "distractor": distractor})
    return image, records


def sample_origin(index: int, n_per_class: int) -> tuple:
    """``(class_index, sample_index)`` of image ``index`` in :func:`generate_synthetic`'s
    class-block layout (class c holds images ``c * n_per_class`` to ``(c + 1) * n_per_class - 1``)."""
    c, j = divmod(int(index), int(n_per_class))
    return c, j


def rerender(class_index: int, sample_index: int, image_size: int, seed: int, omit: int | None = None,
             style: str = LEGACY_STYLE):
    """Re-draw sample ``sample_index`` of class ``class_index`` exactly as
    :func:`generate_synthetic` did (byte-identical), optionally with part ``omit`` left out.

    Returns ``(image, parts)`` as :func:`render_sample`; with ``omit=k`` only the pixels of
    part ``parts[k]`` (its box, grown by a stroke width) change, all others stay identical.
    """
    rng = np.random.default_rng([int(seed), int(class_index), int(sample_index)])
    return render_sample(int(class_index), int(image_size), rng, omit=omit, style=style)


def generate_synthetic(n_per_class: int, image_size: int, seed: int = 0, progress: bool = False,
                       style: str = LEGACY_STYLE) -> dict:
    """Generate the synthetic sketch dataset, classes in blocks of ``n_per_class``.

    Sample j of class c uses ``np.random.default_rng([seed, c, j])``: the same arguments
    give byte-identical output, and a smaller ``n_per_class`` gives a subset.

    Returns
    -------
    dict with ``images`` uint8 (N, S, S) (white 255 background, dark strokes),
    ``labels`` int64 (N,), ``class_names``, ``parts`` (per image, a list of
    ``{"part", "box", "distractor"}``, see :func:`render_sample`), ``part_types``,
    ``origins`` (per image ``(class_index, sample_index)``, the arguments of
    :func:`rerender`) and ``generator_version``.
    """
    if int(n_per_class) < 1:
        raise UserError(f"n_per_class must be at least 1, got {n_per_class}")
    if int(image_size) < 32:
        raise UserError(f"image_size must be at least 32 for synthetic sketches, got {image_size}")
    n, size, classes = int(n_per_class), int(image_size), len(CLASS_NAMES)
    images = np.empty((classes * n, size, size), dtype=np.uint8)
    labels = np.repeat(np.arange(classes, dtype=np.int64), n)
    parts = []
    for i in tqdm(range(classes * n), desc="synthetic sketches", disable=not progress):
        c, j = sample_origin(i, n)
        images[i], recs = rerender(c, j, size, seed, style=style)
        parts.append(recs)
    return {"images": images, "labels": labels, "class_names": list(CLASS_NAMES),
            "parts": parts, "part_types": list(PART_TYPES),
            "origins": [sample_origin(i, n) for i in range(classes * n)], "style": style,
            "generator_version": GENERATOR_VERSION}


def _redraw_chunk(args: tuple) -> np.ndarray:
    """Worker: re-draw a chunk of ``(class_index, sample_index)`` pairs (images only)."""
    origins, image_size, seed, style = args
    return np.stack([rerender(c, j, image_size, seed, style=style)[0] for c, j in origins])


def _die_with_parent(parent: int) -> None:
    """A drawing worker's start: killed with its parent (a SIGKILLed stage 1 left two 830 MB workers
    under PID 1) and stopped by SIGTERM (they inherited stage 1's handler, which only raises)."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)


def fresh_sketches(origins, round_: int, n_per_class: int, image_size: int, seed: int = 0,
                   style: str = LEGACY_STYLE, workers: int = 0) -> np.ndarray:
    """New sketches of the same classes, drawn for training round ``round_`` >= 1.

    Image ``(c, j)`` becomes sample ``j + round_ * n_per_class`` of class c. With
    ``n_per_class`` above every sample index of the dataset (stage 1 passes the largest
    one + 1), no dataset image, so no validation or test image, is ever drawn again; and a
    round is reproducible, so a resumed run draws the same. Stage 1 trains on them when
    ``SYNTHETIC_FRESH`` is on: the demo's 5,760 cached sketches seen six times were
    memorised (training accuracy 0.999 against validation 0.972).

    Parameters
    ----------
    origins : sequence of (int, int)
        Per image ``(class_index, sample_index)``, as :func:`generate_synthetic` gives them.
    round_ : int
        Which redraw (1, 2, ...); round 0 would be the dataset itself.
    n_per_class : int
        The stride between rounds: more than the dataset's largest sample index.
    image_size, seed, style : int, int, str
        As for :func:`generate_synthetic` (the dataset's own values).
    workers : int
        Processes to draw in (0 or 1: this process). The whole round is held in memory
        (5,760 sketches at 64 px: 24 MB).

    Returns
    -------
    np.ndarray
        uint8 (len(origins), S, S), in the order of ``origins``.
    """
    if round_ < 1:
        raise UserError(f"round_ must be >= 1 (round 0 is the cached dataset), got {round_}")
    shifted = [(int(c), int(j) + round_ * int(n_per_class)) for c, j in origins]
    if not shifted:
        return np.empty((0, image_size, image_size), dtype=np.uint8)
    n_chunks = max(1, int(workers))
    chunks = [shifted[k::n_chunks] for k in range(n_chunks)]
    args = [(chunk, int(image_size), int(seed), style) for chunk in chunks if chunk]
    if n_chunks == 1:
        parts = [_redraw_chunk(a) for a in args]
    else:
        with ProcessPoolExecutor(len(args), initializer=_die_with_parent, initargs=(os.getpid(),)) as pool:
            parts = list(pool.map(_redraw_chunk, args))
    out = np.empty((len(shifted), image_size, image_size), dtype=np.uint8)
    for k, block in enumerate(parts):
        out[k::n_chunks] = block
    return out
