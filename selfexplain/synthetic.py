"""The built-in procedural sketch dataset (``DATASET=synthetic``, the offline default).

Every class is a layout of parts drawn from a small shared vocabulary (a wheel in the
bicycle, the car and the ferris wheel; a circle in the sun, the face and the clock; a
triangle in the bicycle frame, the house roof and the fish tail, ...). On top of the
class parts, each image may get a few small *distractor* parts placed off to the side,
independently of its class, so that "has a wheel" and "is a car" are different facts.
Every part (class or distractor) is recorded with a tight pixel box: that ground truth
lets stage 3 check whether SAE neurons recover real concepts.

Drawing: each part is a few polylines in a canonical frame; the whole composition is
flipped, rotated (±15°), scaled and moved at random, every polyline gets smooth
"hand" wobble, strokes are drawn with PIL at 2-4x resolution and box-filtered down so
they stay smooth and visible from 64 to 224 px. A sample's randomness comes from
``np.random.default_rng([seed, class_index, j])`` only, so the output is byte-identical
for a given seed whatever the generation order, and a smaller ``n_per_class`` yields a
subset of a larger one.

Box convention: ``[x0, y0, x1, y1]`` in output pixels, x = column, ``x1``/``y1``
exclusive, so ``image[y0:y1, x0:x1]`` holds the part's strokes.
"""
from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from .config import UserError

PART_TYPES = ["wheel", "circle", "triangle", "zigzag", "spokes",
              "rectangle", "arc", "dots", "cross", "wave"]
CLASS_NAMES = ["bicycle", "car", "sun", "face", "clock", "house",
               "fish", "crown", "storm", "ferris_wheel", "medkit", "sailboat"]
# The parts that define each class, with counts: always present in that class's images.
CLASS_PARTS = {
    "bicycle": {"wheel": 2, "triangle": 1},
    "car": {"rectangle": 1, "arc": 1, "wheel": 2},
    "sun": {"circle": 1, "spokes": 1},
    "face": {"circle": 1, "dots": 1, "arc": 1},
    "clock": {"circle": 1, "dots": 1},
    "house": {"rectangle": 2, "triangle": 1, "cross": 1},
    "fish": {"arc": 2, "triangle": 1, "dots": 1},
    "crown": {"rectangle": 1, "zigzag": 1, "dots": 1},
    "storm": {"arc": 3, "zigzag": 1},
    "ferris_wheel": {"wheel": 1, "spokes": 1, "triangle": 1},
    "medkit": {"rectangle": 1, "cross": 1, "arc": 1},
    "sailboat": {"arc": 1, "triangle": 1, "wave": 1},
}
DISTRACTOR_TYPES = list(PART_TYPES)  # any part may turn up as a small distractor
DISTRACTOR_PROB = 0.1  # chance per distractor type per image (about one per image)
MAX_DISTRACTORS = 3  # keep images readable
ROTATION_DEG = 15.0  # the whole composition turns by up to this much
MAIN_SIZE = (0.58, 0.8)  # longest side of the class composition, fraction of the image
DISTRACTOR_SIZE = (0.12, 0.18)  # longest side of a distractor, fraction of the image
MARGIN = 0.04  # blank border kept around the composition, fraction of the image
STROKE_WIDTH = (0.017, 0.026)  # stroke width as a fraction of the image size
MIN_STROKE_PX = 1.5  # never thinner than this in output pixels (small images)
WOBBLE = 0.008  # hand-drawn wobble amplitude, fraction of the image

Stroke = tuple  # ("line", points (n, 2), width factor) or ("dot", centre (2,), radius)


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


def _wheel(cx, cy, r, rng, hub=None) -> list:
    hub = rng.uniform(0.18, 0.28) if hub is None else hub
    return [_loop(cx, cy, r, rng, 0.05), _loop(cx, cy, r * hub, rng, 0.05)]


def _spokes(cx, cy, r0, r1, n, rng) -> list:
    a = rng.uniform(0, 2 * np.pi) + 2 * np.pi * np.arange(n) / n + rng.normal(0, 0.05, n)
    c, s = np.cos(a), np.sin(a)
    return [_line([(cx + r0 * c[k], cy + r0 * s[k]), (cx + r1 * c[k], cy + r1 * s[k])])
            for k in range(n)]


def _zigzag(x0, x1, y_base, y_peak, teeth) -> Stroke:
    xs = np.linspace(x0, x1, 2 * teeth + 1)
    ys = np.where(np.arange(2 * teeth + 1) % 2 == 1, y_peak, y_base)
    return _line(np.stack([xs, ys], 1))


def _wave(x0, x1, y, amp, periods, phase=0.0) -> Stroke:
    x = np.linspace(x0, x1, 16 * periods)
    return _line(np.stack([x, y + amp * np.sin(phase + 2 * np.pi * periods * (x - x0) / (x1 - x0))], 1))


def _cross(cx, cy, arm, rng) -> list:
    a = rng.uniform(-0.1, 0.1)
    c, s = arm * np.cos(a), arm * np.sin(a)
    return [_line([(cx - c, cy - s), (cx + c, cy + s)]), _line([(cx + s, cy - c), (cx - s, cy + c)])]


def _dots(centres, r) -> list:
    return [("dot", np.asarray(p, dtype=float), r) for p in centres]


def _bump(x0, x1, y, h) -> Stroke:
    """An arc from (x0, y) to (x1, y) bulging by h (negative h bulges up)."""
    t = np.linspace(0, 1, 32)
    return _line(np.stack([x0 + (x1 - x0) * t, y + h * np.sin(np.pi * t)], 1))


# ----------------------------------------------------------------------------- classes
# Each builder draws one class in a canonical frame (y down, roughly [-1, 1]) and returns
# [(part type or None, strokes)]; None marks unrecorded details (handlebar, clock hands).
def _bicycle(rng):
    r, d = rng.uniform(0.38, 0.46), rng.uniform(0.72, 0.85)
    crank = (rng.uniform(-0.05, 0.1), 0.3)
    seat = (rng.uniform(-0.3, -0.15), rng.uniform(-0.45, -0.3))
    head = (d - rng.uniform(0.22, 0.3), seat[1] + rng.uniform(-0.05, 0.05))
    bar = (head[0] + rng.uniform(0.0, 0.1), head[1] - rng.uniform(0.15, 0.22))
    details = [_line([seat, head]), _line([crank, head]), _line([bar, (d, 0.3)]),
               _line([(bar[0] - 0.12, bar[1]), (bar[0] + 0.08, bar[1] - 0.04)]),
               _line([(seat[0] - 0.12, seat[1] - 0.05), (seat[0] + 0.1, seat[1] - 0.05)])]
    return [("wheel", _wheel(-d, 0.3, r, rng)), ("wheel", _wheel(d, 0.3, r, rng)),
            ("triangle", [_poly([(-d, 0.3), seat, crank])]), (None, details)]


def _car(rng):
    half, top, bottom = rng.uniform(0.95, 1.1), -rng.uniform(0.15, 0.25), rng.uniform(0.25, 0.35)
    cx, rx, ry = rng.uniform(-0.15, 0.1), rng.uniform(0.45, 0.6), rng.uniform(0.35, 0.5)
    r = rng.uniform(0.22, 0.28)
    return [("rectangle", [_rect(-half, top, half, bottom)]),
            ("arc", [_line(_ellipse(cx, top, rx, ry, np.pi, 2 * np.pi, 32))]),
            ("wheel", _wheel(-0.55 * half, bottom, r, rng)),
            ("wheel", _wheel(0.55 * half, bottom, r, rng)),
            (None, [_line([(cx, top), (cx, top - ry)])])]


def _sun(rng):
    r = rng.uniform(0.38, 0.5)
    r0 = r + rng.uniform(0.1, 0.18)
    return [("circle", [_loop(0, 0, r, rng)]),
            ("spokes", _spokes(0, 0, r0, r0 + rng.uniform(0.3, 0.45), int(rng.integers(8, 13)), rng))]


def _face(rng):
    ex, ey, er = rng.uniform(0.28, 0.38), -rng.uniform(0.15, 0.3), rng.uniform(0.07, 0.1)
    a = rng.uniform(0.15, 0.4)
    smile = _ellipse(0, rng.uniform(0.0, 0.15), rng.uniform(0.35, 0.5), rng.uniform(0.25, 0.4),
                     a, np.pi - a, 32)
    return [("circle", [_loop(0, 0, 1.0, rng)]), ("dots", _dots([(-ex, ey), (ex, ey)], er)),
            ("arc", [_line(smile)])]


def _clock(rng):
    rt = rng.uniform(0.78, 0.85)
    t = 2 * np.pi * np.arange(12) / 12
    ha, ma = rng.uniform(0, 2 * np.pi, 2)
    hands = [_line([(0, 0), (0.45 * np.cos(ha), 0.45 * np.sin(ha))]),
             _line([(0, 0), (0.65 * np.cos(ma), 0.65 * np.sin(ma))])]
    return [("circle", [_loop(0, 0, 1.0, rng)]),
            ("dots", _dots(np.stack([rt * np.cos(t), rt * np.sin(t)], 1), rng.uniform(0.045, 0.06))),
            (None, hands + _dots([(0, 0)], 0.05))]


def _house(rng):
    w, h, peak = rng.uniform(0.6, 0.8), rng.uniform(0.8, 1.0), rng.uniform(0.6, 0.8)
    side = rng.choice([-1.0, 1.0])
    dx, dh = side * rng.uniform(0.15, 0.35), rng.uniform(0.4, 0.5)
    wx, wy, ws = -side * w * 0.5, h * rng.uniform(0.3, 0.4), rng.uniform(0.15, 0.2)
    ov = rng.uniform(0.05, 0.15)
    return [("rectangle", [_rect(-w, 0, w, h)]),
            ("triangle", [_poly([(-w - ov, 0), (rng.uniform(-0.1, 0.1), -peak), (w + ov, 0)])]),
            ("rectangle", [_rect(dx - 0.14, h - dh, dx + 0.14, h)]),
            ("cross", _cross(wx, wy, ws * 0.8, rng)),
            (None, [_rect(wx - ws, wy - ws, wx + ws, wy + ws)])]


def _fish(rng):
    x0, x1, h = -rng.uniform(0.75, 0.9), rng.uniform(0.45, 0.6), rng.uniform(0.35, 0.5)
    tx, th = x1 + rng.uniform(0.35, 0.45), rng.uniform(0.3, 0.4)
    eye = (x0 + rng.uniform(0.25, 0.35), -rng.uniform(0.05, 0.15))
    return [("arc", [_bump(x0, x1, 0, -h)]), ("arc", [_bump(x0, x1, 0, h)]),
            ("triangle", [_poly([(x1 - 0.05, 0), (tx, -th), (tx, th)])]),
            ("dots", _dots([eye], rng.uniform(0.06, 0.08)))]


def _crown(rng):
    half, top, bottom = rng.uniform(0.75, 0.9), 0.15, rng.uniform(0.45, 0.55)
    teeth = int(rng.integers(3, 6))
    jx = np.linspace(-half, half, 5)[1:-1] if teeth % 2 else np.array([-half / 2, half / 2])
    return [("rectangle", [_rect(-half, top, half, bottom)]),
            ("zigzag", [_zigzag(-half, half, top, -rng.uniform(0.45, 0.65), teeth)]),
            ("dots", _dots([(x, (top + bottom) / 2) for x in jx], rng.uniform(0.06, 0.08)))]


def _storm(rng):
    r = rng.uniform(0.25, 0.32, 3) * np.array([1.0, 1.4, 1.0])
    cx = [-0.85 + r[0], -0.4 + r[1], 0.85 - r[2]]
    bumps = [_line(_ellipse(x, 0, q, q * rng.uniform(0.85, 1.05), np.pi, 2 * np.pi, 32))
             for x, q in zip(cx, r)]
    bx, jag = rng.uniform(-0.15, 0.15), rng.uniform(0.15, 0.25)
    bolt = [(bx + 0.05, 0.08), (bx - jag, 0.5), (bx + jag, 0.45), (bx - 0.05, 1.0)]
    return [("arc", [b]) for b in bumps] + [("zigzag", [_poly(bolt, closed=False)]),
                                            (None, [_line([(-0.85, 0), (0.85, 0)])])]


def _ferris_wheel(rng):
    r, cy, foot = rng.uniform(0.65, 0.75), -0.25, rng.uniform(0.5, 0.65)
    hub = rng.uniform(0.12, 0.18)
    return [("wheel", _wheel(0, cy, r, rng, hub)),
            ("spokes", _spokes(0, cy, r * hub, r * 0.95, int(rng.integers(6, 10)), rng)),
            ("triangle", [_poly([(-foot, 0.95), (0, cy), (foot, 0.95)])])]


def _medkit(rng):
    half, top, bottom = rng.uniform(0.8, 0.95), -0.35, rng.uniform(0.45, 0.6)
    rx, ry = rng.uniform(0.25, 0.35), rng.uniform(0.2, 0.3)
    return [("rectangle", [_rect(-half, top, half, bottom)]),
            ("cross", _cross(0, (top + bottom) / 2, rng.uniform(0.22, 0.3), rng)),
            ("arc", [_line(_ellipse(0, top, rx, ry, np.pi, 2 * np.pi, 32))])]


def _sailboat(rng):
    rx, ry, deck = rng.uniform(0.8, 0.95), rng.uniform(0.3, 0.4), 0.25
    mx, sail_w = rng.uniform(-0.15, 0.0), rng.uniform(0.55, 0.7)
    wy = deck + ry + rng.uniform(0.12, 0.2)
    return [("arc", [_line(_ellipse(0, deck, rx, ry, 0, np.pi, 32))]),
            ("triangle", [_poly([(mx, deck - 0.05), (mx, -rng.uniform(0.9, 1.1)),
                                 (mx + sail_w, deck - 0.05)])]),
            ("wave", [_wave(-1.1, 1.1, wy, 0.06, int(rng.integers(3, 6)), rng.uniform(0, 6.3))]),
            (None, [_line([(-rx, deck), (rx, deck)])])]


CLASS_BUILDERS = {"bicycle": _bicycle, "car": _car, "sun": _sun, "face": _face,
                  "clock": _clock, "house": _house, "fish": _fish, "crown": _crown,
                  "storm": _storm, "ferris_wheel": _ferris_wheel, "medkit": _medkit,
                  "sailboat": _sailboat}


def _distractor(ptype, rng) -> list:
    """One small stand-alone part of type ``ptype`` in a canonical [-0.5, 0.5] frame."""
    if ptype == "wheel":
        return _wheel(0, 0, 0.5, rng)
    if ptype == "circle":
        return [_loop(0, 0, 0.5, rng)]
    if ptype == "triangle":
        return [_poly([(-0.5, 0.4), (rng.uniform(-0.2, 0.2), -0.45), (0.5, 0.4)])]
    if ptype == "zigzag":
        return [_zigzag(-0.5, 0.5, 0.2, -0.2, int(rng.integers(2, 4)))]
    if ptype == "spokes":
        return _spokes(0, 0, 0.12, 0.5, int(rng.integers(5, 9)), rng)
    if ptype == "rectangle":
        return [_rect(-0.5, -rng.uniform(0.2, 0.4), 0.5, rng.uniform(0.2, 0.4))]
    if ptype == "arc":
        return [_bump(-0.5, 0.5, 0.15, -rng.uniform(0.3, 0.45))]
    if ptype == "dots":
        n = int(rng.integers(2, 5))
        return _dots(rng.uniform(-0.45, 0.45, (n, 2)), 0.09)
    if ptype == "cross":
        return _cross(0, 0, 0.45, rng)
    if ptype == "wave":
        return [_wave(-0.5, 0.5, 0, 0.15, 2, rng.uniform(0, 6.3))]
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


def _overlap(boxes: np.ndarray, box: np.ndarray) -> np.ndarray:
    """Intersection area of each candidate box (k, 4) with ``box`` (4,)."""
    w = np.clip(np.minimum(boxes[:, 2], box[2]) - np.maximum(boxes[:, 0], box[0]), 0, None)
    h = np.clip(np.minimum(boxes[:, 3], box[3]) - np.maximum(boxes[:, 1], box[1]), 0, None)
    return w * h


def _free_spot(wh, occupied, canvas, margin, rng, tries=24) -> np.ndarray:
    """Top-left corner for a ``wh`` box that overlaps the ``occupied`` boxes least."""
    hi = np.maximum(canvas - margin - wh, margin)
    corners = rng.uniform(margin, hi, (tries, 2))
    cand = np.concatenate([corners, corners + wh], 1)
    cost = sum(_overlap(cand, b) for b in occupied)
    return corners[int(np.argmin(cost))]


# ----------------------------------------------------------------------------- drawing
def _wobble(lines: list, canvas: float, rng):
    """Densify and wobble many polylines at once (vectorised: this is the hot loop).

    Long segments are split so the noise can bend them; every original vertex is kept so
    corners stay sharp. The noise is a sum of two random sinusoids per axis along the
    stroke's length: smooth, like a hand. Returns the new polylines and their corners.
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
    amp = np.clip(0.04 * size, 0.3 * WOBBLE * canvas, WOBBLE * canvas)[:, None, None]
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


def _draw(parts, canvas: int, width: float, rng):
    """Draw every stroke on a white ``canvas`` square; return the image and part extents."""
    lines = [(i, pts, f) for i, (_, strokes) in enumerate(parts) for kind, pts, f in strokes
             if kind == "line"]
    dots = [(i, pts, r) for i, (_, strokes) in enumerate(parts) for kind, pts, r in strokes
            if kind == "dot"]
    owner = np.array([i for i, _, _ in lines])
    widths = np.array([f for _, _, f in lines]) * width * rng.uniform(0.85, 1.15, len(lines))
    widths = np.maximum(2, np.round(widths)).astype(int)
    polys, (caps, cap_sid) = _wobble([p for _, p, _ in lines], canvas, rng)
    img = Image.new("L", (canvas, canvas), 255)
    draw = ImageDraw.Draw(img)
    lo, hi = np.full((len(parts), 2), np.inf), np.full((len(parts), 2), -np.inf)
    for i, poly, w in zip(owner, polys, widths):
        draw.line(poly.ravel().tolist(), fill=0, width=int(w))
        lo[i] = np.minimum(lo[i], poly.min(0) - w / 2)
        hi[i] = np.maximum(hi[i], poly.max(0) + w / 2)
    for (x, y), h in zip(caps.tolist(), (widths[cap_sid] / 2).tolist()):
        draw.ellipse([x - h, y - h, x + h, y + h], fill=0)  # round caps and joints
    for i, (x, y), r in dots:
        r = max(r, 0.6 * width)
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


def _compose(class_index: int, canvas: int, rng) -> list:
    """Class parts placed at random, then distractors in free-ish spots, then clutter."""
    margin = MARGIN * canvas
    flip = bool(rng.random() < 0.5)
    size = rng.uniform(*MAIN_SIZE) * canvas
    main, wh = _fit(CLASS_BUILDERS[CLASS_NAMES[class_index]](rng), rng, size, ROTATION_DEG, flip)
    corner = rng.uniform(margin, np.maximum(canvas - margin - wh, margin))
    main = _transform(main, np.eye(2), corner)
    parts = [(t, s, False) for t, s in main]
    occupied = [np.concatenate([corner, corner + wh])]
    wanted = [t for t in DISTRACTOR_TYPES if rng.random() < DISTRACTOR_PROB][:MAX_DISTRACTORS]
    for ptype in wanted:
        size = rng.uniform(*DISTRACTOR_SIZE) * canvas
        small, wh = _fit([(ptype, _distractor(ptype, rng))], rng, size, 180.0, False)
        corner = _free_spot(wh, occupied, canvas, margin, rng)
        occupied.append(np.concatenate([corner, corner + wh]))
        parts += [(t, s, True) for t, s in _transform(small, np.eye(2), corner)]
    parts += [(t, s, False) for t, s in _clutter(canvas, rng)]
    return parts


def render_sample(class_index: int, image_size: int, rng: np.random.Generator):
    """Draw one sketch of class ``class_index``.

    Parameters
    ----------
    class_index : index into ``CLASS_NAMES``.
    image_size : output side S in pixels.
    rng : the sample's random generator (all randomness comes from it).

    Returns
    -------
    image : uint8 (S, S), white background 255, dark strokes.
    parts : list of ``{"part": type, "box": [x0, y0, x1, y1], "distractor": bool}``,
        boxes in output pixels, ``x1``/``y1`` exclusive, tight around the part's strokes.
    """
    factor = supersample_factor(image_size)
    canvas = factor * image_size
    parts = _compose(class_index, canvas, rng)
    width = max(image_size * rng.uniform(*STROKE_WIDTH), MIN_STROKE_PX) * factor
    img, extents = _draw([(t, s) for t, s, _ in parts], canvas, width, rng)
    image = np.asarray(img.reduce(factor), dtype=np.uint8)
    records = []
    for (ptype, _, distractor), ext in zip(parts, extents):
        if ptype is None:
            continue
        x0, y0 = np.clip(np.floor(ext[:2] / factor), 0, image_size - 1).astype(int)
        x1, y1 = np.clip(np.ceil(ext[2:] / factor), 1, image_size).astype(int)
        box = [int(x0), int(y0), int(max(x1, x0 + 1)), int(max(y1, y0 + 1))]
        records.append({"part": ptype, "box": box, "distractor": distractor})
    return image, records


def generate_synthetic(n_per_class: int, image_size: int, seed: int = 0,
                       progress: bool = False) -> dict:
    """Generate the synthetic sketch dataset, classes in blocks of ``n_per_class``.

    Sample j of class c uses ``np.random.default_rng([seed, c, j])``: the same arguments
    give byte-identical output, and a smaller ``n_per_class`` gives a subset.

    Returns
    -------
    dict with ``images`` uint8 (N, S, S) (white 255 background, dark strokes),
    ``labels`` int64 (N,), ``class_names``, ``parts`` (per image, a list of
    ``{"part", "box", "distractor"}``, see :func:`render_sample`) and ``part_types``.
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
        c, j = divmod(i, n)
        images[i], recs = render_sample(c, size, np.random.default_rng([seed, c, j]))
        parts.append(recs)
    return {"images": images, "labels": labels, "class_names": list(CLASS_NAMES),
            "parts": parts, "part_types": list(PART_TYPES)}
