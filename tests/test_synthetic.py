"""The built-in synthetic sketch dataset: shapes, determinism, part ground truth."""
from collections import Counter
from itertools import combinations

import numpy as np
import pytest

from selfexplain.errors import UserError
from selfexplain.synthetic import (CLASS_NAMES, CLASS_PARTS, DISTRACTOR_TYPES, GENERATOR_VERSION,
                                   PART_TYPES, fresh_sketches, generate_synthetic, render_sample, rerender,
                                   sample_origin)


@pytest.fixture
def seed():
    np.random.seed(0)
    return 0


@pytest.fixture(scope="module")
def data():
    """20 images per class at 64 px: enough for distractors of every type to turn up."""
    return generate_synthetic(20, 64, seed=0)


def test_shapes_dtypes_and_look(data):
    n = 20 * len(CLASS_NAMES)
    assert data["images"].shape == (n, 64, 64) and data["images"].dtype == np.uint8
    assert data["labels"].shape == (n,) and data["labels"].dtype == np.int64
    assert np.array_equal(data["labels"], np.repeat(np.arange(len(CLASS_NAMES)), 20))
    assert data["class_names"] == CLASS_NAMES and data["part_types"] == PART_TYPES
    assert len(data["parts"]) == n
    flat = data["images"].reshape(n, -1)
    assert (np.median(flat, axis=1) == 255).all()  # white background
    assert (flat.min(axis=1) < 40).all()  # black strokes
    dark = (flat < 128).mean(axis=1)
    assert (dark > 0.02).all() and (dark < 0.35).all()  # visible strokes, not blobs


def test_deterministic_by_seed(seed):
    a = generate_synthetic(2, 48, seed=3)
    np.random.seed(seed + 123)  # the global numpy state must not matter
    b = generate_synthetic(2, 48, seed=3)
    assert a["images"].tobytes() == b["images"].tobytes() and a["parts"] == b["parts"]
    c = generate_synthetic(2, 48, seed=4)
    assert a["images"].tobytes() != c["images"].tobytes()


def test_samples_independent_of_order_and_count():
    small, big = generate_synthetic(1, 48, seed=5), generate_synthetic(3, 48, seed=5)
    assert np.array_equal(small["images"], big["images"][::3])
    assert small["parts"] == big["parts"][::3]
    image, parts = render_sample(4, 48, np.random.default_rng([5, 4, 0]))
    assert np.array_equal(image, small["images"][4]) and parts == small["parts"][4]


def test_classes_are_the_lines_of_the_affine_plane():
    """12 classes of 3 parts over 9 part types: each pair of parts in exactly one class."""
    assert len(CLASS_NAMES) == 12 and len(PART_TYPES) == 9 and len(set(PART_TYPES)) == 9
    assert list(CLASS_PARTS) == CLASS_NAMES and len(set(CLASS_NAMES)) == 12
    sets = [set(parts) for parts in CLASS_PARTS.values()]
    assert all(len(s) == 3 and s <= set(PART_TYPES) for s in sets)
    assert all(sum(parts.values()) == 3 for parts in CLASS_PARTS.values())  # one of each
    uses = Counter(t for s in sets for t in s)
    assert all(uses[t] == 4 for t in PART_TYPES)
    assert all(len(a & b) <= 1 for k, a in enumerate(sets) for b in sets[k + 1:])
    pairs = Counter(frozenset(p) for s in sets for p in combinations(sorted(s), 2))
    assert len(pairs) == 36 and set(pairs.values()) == {1}  # every pair of parts exactly once
    for name, parts in CLASS_PARTS.items():  # names say which parts to look for
        assert all(t in name for t in parts)


@pytest.mark.parametrize("size", [64, 112])
def test_boxes_are_inside_and_tight(size):
    data = generate_synthetic(2, size, seed=1)
    for image, parts in zip(data["images"], data["parts"]):
        assert parts
        for part in parts:
            assert part["part"] in PART_TYPES
            x0, y0, x1, y1 = part["box"]
            assert all(isinstance(v, int) for v in part["box"])
            assert 0 <= x0 < x1 <= size and 0 <= y0 < y1 <= size
            crop = image[y0:y1, x0:x1]
            assert crop.min() < 100  # the part's strokes are inside its box
            # tight: ink touches each of the four sides (within 2 px)
            sides = [crop[:, :2], crop[:, -2:], crop[:2], crop[-2:]]
            assert max(int(s.min()) for s in sides) < 160, part


def test_class_parts_always_present_and_apart(data):
    for label, parts in zip(data["labels"], data["parts"]):
        own = [p for p in parts if not p["distractor"]]
        assert Counter(p["part"] for p in own) == Counter(CLASS_PARTS[CLASS_NAMES[label]])
        boxes = [p["box"] for p in parts]
        for k, a in enumerate(boxes):  # parts never overlap, so each one stays readable
            for b in boxes[k + 1:]:
                assert min(a[2], b[2]) <= max(a[0], b[0]) or min(a[3], b[3]) <= max(a[1], b[1])


def test_at_most_one_distractor_of_a_foreign_type(data):
    with_distractor, per_class = 0, Counter()
    for label, parts in zip(data["labels"], data["parts"]):
        extra = [p["part"] for p in parts if p["distractor"]]
        assert len(extra) <= 1
        if extra:
            name = CLASS_NAMES[label]
            assert extra[0] not in CLASS_PARTS[name]
            # still unambiguous: no other class has all its parts among the 4 drawn
            drawn = set(CLASS_PARTS[name]) | set(extra)
            assert [c for c in CLASS_NAMES if set(CLASS_PARTS[c]) <= drawn] == [name]
            with_distractor += 1
            per_class[name] += 1
    assert 0.2 <= with_distractor / len(data["labels"]) <= 0.4
    assert len(per_class) == len(CLASS_NAMES)  # every class gets some
    types = Counter(p["part"] for parts in data["parts"] for p in parts if p["distractor"])
    assert set(types) == set(DISTRACTOR_TYPES)  # and every part type turns up as one


def test_layout_varies_within_a_class(data):
    """Parts move around: position says nothing about which part it is."""
    where = {}
    for parts in data["parts"]:
        for p in parts:
            if not p["distractor"]:
                x0, y0, x1, y1 = p["box"]
                where.setdefault(p["part"], set()).add((x0 + x1 >= 64, y0 + y1 >= 64))
    assert all(len(where[t]) == 4 for t in PART_TYPES)  # every part seen in every quadrant


def test_bad_arguments_are_user_errors():
    with pytest.raises(UserError):
        generate_synthetic(0, 64)
    with pytest.raises(UserError):
        generate_synthetic(2, 8)


def test_origins_and_rerender_reproduce_the_dataset():
    data = generate_synthetic(3, 48, seed=7)
    assert data["generator_version"] == GENERATOR_VERSION
    for i in (0, 4, 35):
        c, j = sample_origin(i, 3)
        assert (c, j) == tuple(data["origins"][i]) == divmod(i, 3)
        image, parts = rerender(c, j, 48, seed=7)
        assert image.tobytes() == data["images"][i].tobytes() and parts == data["parts"][i]


@pytest.mark.parametrize("size", [64, 112])
def test_rerender_without_a_part_changes_only_that_part(size):
    """The counterfactual: part k vanishes, every pixel outside its box stays identical."""
    for c, j in [(0, 0), (5, 3), (11, 8)]:
        full, parts = rerender(c, j, size, seed=2)
        for k, part in enumerate(parts):
            cut, cut_parts = rerender(c, j, size, seed=2, omit=k)
            assert cut_parts == parts
            x0, y0, x1, y1 = part["box"]
            outside = np.ones_like(full, dtype=bool)
            outside[y0:y1, x0:x1] = False
            assert np.array_equal(cut[outside], full[outside]), (c, j, k)
            inside = (slice(y0, y1), slice(x0, x1))
            assert (cut[inside] > full[inside]).sum() >= 10  # the part's ink is gone
            assert (cut[inside] >= full[inside]).all()  # nothing is drawn in its place


def test_rerender_rejects_a_missing_part():
    _, parts = rerender(0, 0, 48, seed=0)
    with pytest.raises(UserError):
        rerender(0, 0, 48, seed=0, omit=len(parts))


def test_varied_parts_come_in_many_sizes_and_places():
    """Small and large parts, anywhere: not only one size per quadrant (how people draw)."""
    data = generate_synthetic(20, 64, seed=0, style="varied")
    own = [p["box"] for parts in data["parts"] for p in parts if not p["distractor"]]
    side = np.array([max(x1 - x0, y1 - y0) for x0, y0, x1, y1 in own]) / 64
    assert side.min() < 0.2 and side.max() > 0.45 and side.std() > 0.07
    centre = np.array([((x0 + x1) / 2, (y0 + y1) / 2) for x0, y0, x1, y1 in own]) / 64
    assert (np.abs(centre - 0.5).max(1) < 0.1).sum() >= 5  # some right in the middle


@pytest.mark.parametrize("style", ["quadrants", "varied"])
def test_both_styles_rerender_exactly_and_leave_parts_out(style):
    data = generate_synthetic(2, 48, seed=3, style=style)
    assert data["style"] == style
    for i in (0, 5):
        c, j = data["origins"][i]
        image, parts = rerender(c, j, 48, seed=3, style=style)
        assert np.array_equal(image, data["images"][i]) and parts == data["parts"][i]
        cut, _ = rerender(c, j, 48, seed=3, omit=0, style=style)
        x0, y0, x1, y1 = parts[0]["box"]
        outside = np.ones_like(image, bool)
        outside[y0:y1, x0:x1] = False
        assert np.array_equal(cut[outside], image[outside]) and (cut != image).any()


def test_styles_differ_and_an_unknown_style_is_refused():
    quad, varied = generate_synthetic(1, 48, seed=0), generate_synthetic(1, 48, seed=0, style="varied")
    assert not np.array_equal(quad["images"], varied["images"])
    with pytest.raises(UserError, match="SYNTHETIC_STYLE must be one of .*got 'cubist'"):
        generate_synthetic(1, 48, style="cubist")
    with pytest.raises(UserError, match="did you mean 'varied'"):
        generate_synthetic(1, 48, style="varies")


def test_fresh_sketches_are_new_drawings_of_the_same_classes_reproducibly():
    """Stage 1's fresh training sketches: sample j + round * n of the same class, never a
    dataset image (so never a validation or test one), the same in any process count."""
    origins = [(0, 0), (5, 3), (11, 7)]
    first = fresh_sketches(origins, 1, 10, 64, seed=0, style="varied")
    assert first.shape == (3, 64, 64) and first.dtype == np.uint8
    for k, (c, j) in enumerate(origins):
        assert np.array_equal(first[k], rerender(c, j + 10, 64, 0, style="varied")[0])
    assert np.array_equal(first, fresh_sketches(origins, 1, 10, 64, seed=0, style="varied", workers=2))
    dataset = generate_synthetic(10, 64, seed=0, style="varied")["images"]
    assert not any(np.array_equal(img, cached) for img in first for cached in dataset)
    second = fresh_sketches(origins, 2, 10, 64, seed=0, style="varied")
    assert all(not np.array_equal(a, b) for a, b in zip(first, second))
    with pytest.raises(UserError, match="round_"):
        fresh_sketches(origins, 0, 10, 64)


@pytest.mark.skipif(not __import__("sys").platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_drawing_workers_die_with_a_killed_parent(tmp_path):
    """SIGKILL of stage 1 mid-draw left its two drawing workers (830 MB each) running under PID 1."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from conftest import ROOT

    script = tmp_path / "parent.py"
    script.write_text(
        "import os, time\n"
        "from concurrent.futures import ProcessPoolExecutor\n"
        "from selfexplain import synthetic\n"
        "def pid(_):\n"
        "    return os.getpid()\n"
        "if __name__ == '__main__':\n"
        "    with ProcessPoolExecutor(1, initializer=synthetic._die_with_parent, initargs=(os.getpid(),)) as pool:\n"
        "        print(pool.submit(pid, 0).result(), flush=True)\n"
        "        time.sleep(60)\n")
    parent = subprocess.Popen([sys.executable, str(script)], cwd=ROOT, stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
    worker = int(parent.stdout.readline())
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    deadline = time.time() + 10
    while time.time() < deadline:
        try:
            os.kill(worker, 0)
        except ProcessLookupError:
            break
        time.sleep(0.05)
    else:
        os.kill(worker, signal.SIGKILL)
        pytest.fail(f"worker {worker} outlived its killed parent")
