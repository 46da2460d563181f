"""A second renderer of the synthetic classes: clean shapes as a person would draw them.

Written apart from ``selfexplain/synthetic.py`` (it shares only the class -> parts table and
the part names) so that it can test whether the classifier learned the *parts* rather than
the generator's style. Each sketch is drawn at ``CANVAS`` px with PIL's own primitives
(ellipses, arcs, rectangles, polylines, filled discs; no wobble, upright or nearly so),
with one pen width, then saved as PNG bytes and read back through the project's
ink-preserving decode, exactly as ``why_did_you.py --image=sketch.png`` reads a file.

Layouts (``LAYOUTS``):

* ``grid3x3``: 3 small parts (18-28% of the canvas) in 3 random cells of a 3x3 grid;
* ``quadrants``: 3 large parts (32-45%) in 3 of the 4 quadrants;
* ``random``: 3 parts of any size (12-45%) at random places, kept apart.

Pen widths (``PENS``, px at 1111) run from a fine liner to a marker. Each sketch records
the parts it holds and their boxes in output pixels (``[x0, y0, x1, y1]``, exclusive ends).

Used by ``bench/bench_person.py`` (which can also write a contact sheet of them).
"""
from __future__ import annotations

import io
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageChops, ImageDraw, ImageOps

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from selfexplain.imaging import decode_image  # noqa: E402
from selfexplain.synthetic import CLASS_NAMES, CLASS_PARTS  # noqa: E402

CANVAS = 1111                      # drawing side in px (TU-Berlin's size)
LAYOUTS = ("grid3x3", "quadrants", "random")
PENS = (3, 6, 15, 30)              # pen widths in px at CANVAS
SIZES = {"grid3x3": (0.18, 0.28), "quadrants": (0.32, 0.45), "random": (0.12, 0.45)}  # part side / canvas
TILT = 12.0                        # parts are drawn upright, give or take this many degrees


@dataclass
class PersonSketch:
    """One sketch: the decoded image, its class, how it was drawn and what it holds."""
    image: np.ndarray              # uint8 (S, S), white background
    label: int                     # index into CLASS_NAMES
    layout: str
    pen: int                       # pen width in px at CANVAS
    parts: list = field(default_factory=list)  # [{"part": name, "box": [x0, y0, x1, y1]}] in output px


# ----------------------------------------------------------------------------- shapes
def _turn(points, centre, degrees: float) -> list:
    """Rotate (x, y) points about ``centre``; returns a flat list for ImageDraw."""
    a = np.deg2rad(degrees)
    p = np.asarray(points, dtype=float) - centre
    rot = p @ np.array([[np.cos(a), np.sin(a)], [-np.sin(a), np.cos(a)]])
    return (rot + centre).ravel().tolist()


def _draw_part(draw: ImageDraw.ImageDraw, name: str, cx: float, cy: float, side: float, pen: int, rng) -> None:
    """Draw part ``name`` centred at (cx, cy), fitting a ``side`` x ``side`` square."""
    r = side / 2
    tilt = rng.uniform(-TILT, TILT)
    centre = np.array([cx, cy])
    line = {"fill": 0, "width": pen, "joint": "curve"}
    if name == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=0, width=pen)
    elif name == "triangle":
        pts = [(cx - r, cy + 0.8 * r), (cx, cy - 0.9 * r), (cx + r, cy + 0.8 * r), (cx - r, cy + 0.8 * r)]
        draw.line(_turn(pts, centre, tilt), **line)
    elif name == "rectangle":
        h = r * rng.uniform(0.5, 0.8)
        pts = [(cx - r, cy - h), (cx + r, cy - h), (cx + r, cy + h), (cx - r, cy + h), (cx - r, cy - h)]
        draw.line(_turn(pts, centre, tilt + 90 * rng.integers(0, 2)), **line)
    elif name == "zigzag":
        teeth = int(rng.integers(3, 6))
        xs = np.linspace(cx - r, cx + r, 2 * teeth + 1)
        ys = np.where(np.arange(2 * teeth + 1) % 2, cy - 0.45 * r, cy + 0.45 * r)
        draw.line(_turn(np.stack([xs, ys], 1), centre, tilt), **line)
    elif name == "spokes":  # rays out of a centre, like a sun without its disc
        n, inner = int(rng.integers(6, 11)), rng.uniform(0.0, 0.15) * r
        for a in np.deg2rad(tilt) + 2 * np.pi * np.arange(n) / n:
            draw.line([cx + inner * np.cos(a), cy + inner * np.sin(a), cx + r * np.cos(a), cy + r * np.sin(a)],
                      fill=0, width=pen)
    elif name == "arc":  # a bowl or a dome: half an ellipse
        start = 180 * int(rng.integers(0, 2)) + tilt
        draw.arc([cx - r, cy - r, cx + r, cy + r], start + 10, start + 170, fill=0, width=pen)
    elif name == "dots":
        n, d = int(rng.integers(3, 6)), max(rng.uniform(0.08, 0.13) * side, pen / 2)
        spots = {3: [(-1, -1), (0, 0), (1, 1)], 4: [(-1, -1), (1, -1), (-1, 1), (1, 1)],
                 5: [(-1, -1), (1, -1), (0, 0), (-1, 1), (1, 1)]}[n]
        for x, y in np.asarray(spots) * (r - d):
            draw.ellipse([cx + x - d, cy + y - d, cx + x + d, cy + y + d], fill=0)
    elif name == "cross":  # a plus or an x
        a = np.deg2rad(tilt + 45 * int(rng.integers(0, 2)))
        for b in (a, a + np.pi / 2):
            draw.line([cx - r * np.cos(b), cy - r * np.sin(b), cx + r * np.cos(b), cy + r * np.sin(b)],
                      fill=0, width=pen)
    elif name == "spiral":  # Archimedean, 2-3 turns, outer end open
        t = np.linspace(0, 1, 200)
        turns = rng.uniform(2.0, 3.0)
        ang = 2 * np.pi * turns * t + np.deg2rad(tilt) * 4
        draw.line(np.stack([cx + r * t * np.cos(ang), cy + r * t * np.sin(ang)], 1).ravel().tolist(), **line)
    else:
        raise ValueError(f"unknown part {name!r}")


# ----------------------------------------------------------------------------- layouts
def _slots(layout: str, rng) -> list:
    """Three (cx, cy, side) squares in CANVAS px, apart from each other."""
    lo, hi = SIZES[layout]
    if layout in ("grid3x3", "quadrants"):
        n = 3 if layout == "grid3x3" else 2
        cell = CANVAS / n
        slots = []
        for k in rng.choice(n * n, 3, replace=False):
            side = rng.uniform(lo, hi) * CANVAS
            room = (cell - side) / 2 * 0.8  # keep clear of the cell border
            cx = (k % n + 0.5) * cell + rng.uniform(-room, room)
            cy = (k // n + 0.5) * cell + rng.uniform(-room, room)
            slots.append((cx, cy, side))
        return slots
    slots = []
    while len(slots) < 3:  # rejection sampling: a new square must not touch the others
        side = rng.uniform(lo, hi) * CANVAS
        cx, cy = rng.uniform(side / 2 + 40, CANVAS - side / 2 - 40, 2)
        if all(max(abs(cx - x), abs(cy - y)) > (side + s) / 2 + 40 for x, y, s in slots):
            slots.append((cx, cy, side))
        elif rng.random() < 0.05:
            slots = []  # a crowded start: begin again
    return slots


def person_sketch(label: int, layout: str, pen: int, image_size: int, rng) -> PersonSketch:
    """Draw class ``label``'s three parts in ``layout`` with a ``pen`` px pen; decode to ``image_size``."""
    names = list(CLASS_PARTS[CLASS_NAMES[label]])
    rng.shuffle(names)
    img = Image.new("L", (CANVAS, CANVAS), 255)
    scale, parts = image_size / CANVAS, []
    for name, (cx, cy, side) in zip(names, _slots(layout, rng)):
        layer = Image.new("L", (CANVAS, CANVAS), 255)  # one part alone: its exact ink box
        _draw_part(ImageDraw.Draw(layer), name, cx, cy, side, pen, rng)
        x0, y0, x1, y1 = ImageOps.invert(layer).getbbox()
        img = ImageChops.darker(img, layer)
        # one output pixel of slack: the decode thickens strokes by less than that
        box = [max(int(np.floor(x0 * scale)) - 1, 0), max(int(np.floor(y0 * scale)) - 1, 0),
               min(int(np.ceil(x1 * scale)) + 1, image_size), min(int(np.ceil(y1 * scale)) + 1, image_size)]
        parts.append({"part": name, "box": box})
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return PersonSketch(decode_image(buf.getvalue(), image_size), label, layout, pen, parts)


def person_set(n_per_class: int, image_size: int, layouts=LAYOUTS, seed: int = 0) -> list:
    """``n_per_class`` sketches of every class in every layout, pens cycling through ``PENS``.

    Sketch j of class c in layout l draws from ``default_rng([seed, l, c, j])``: reproducible,
    and a smaller ``n_per_class`` gives a subset.
    """
    return [person_sketch(c, layout, PENS[j % len(PENS)], image_size,
                          np.random.default_rng([seed, LAYOUTS.index(layout), c, j]))
            for layout in layouts for c in range(len(CLASS_NAMES)) for j in range(n_per_class)]

