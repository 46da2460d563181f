"""The built-in synthetic sketch dataset: shapes, determinism, part ground truth."""
from collections import Counter

import numpy as np
import pytest

from selfexplain.config import UserError
from selfexplain.synthetic import (CLASS_NAMES, CLASS_PARTS, DISTRACTOR_TYPES, PART_TYPES,
                                   generate_synthetic, render_sample)


@pytest.fixture
def seed():
    np.random.seed(0)
    return 0


@pytest.fixture(scope="module")
def data():
    """20 images per class at 64 px: enough for every distractor type to turn up."""
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


def test_vocabulary_is_shared_between_classes():
    assert len(CLASS_NAMES) >= 12 and len(PART_TYPES) >= 8
    assert list(CLASS_PARTS) == CLASS_NAMES
    uses = Counter(t for parts in CLASS_PARTS.values() for t in parts)
    for ptype in PART_TYPES:
        assert uses[ptype] >= 2 or ptype in DISTRACTOR_TYPES, ptype
    assert sum(uses[t] >= 2 for t in PART_TYPES) >= 8  # most parts define several classes
    assert len({tuple(sorted(p.items())) for p in CLASS_PARTS.values()}) == len(CLASS_NAMES)


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


def test_class_parts_always_present(data):
    for label, parts in zip(data["labels"], data["parts"]):
        own = Counter(p["part"] for p in parts if not p["distractor"])
        assert own == Counter(CLASS_PARTS[CLASS_NAMES[label]])


def test_distractors_occur_independently_of_class(data):
    per_class = Counter()
    for label, parts in zip(data["labels"], data["parts"]):
        for p in parts:
            if p["distractor"]:
                per_class[(p["part"], CLASS_NAMES[label])] += 1
    for ptype in DISTRACTOR_TYPES:  # each distractor turns up in classes that lack it
        foreign = [c for c in CLASS_NAMES if ptype not in CLASS_PARTS[c] and per_class[(ptype, c)]]
        assert len(foreign) >= 2, ptype
    for name in CLASS_NAMES:  # and every class gets some
        assert sum(v for (t, c), v in per_class.items() if c == name) >= 3, name


def test_bad_arguments_are_user_errors():
    with pytest.raises(UserError):
        generate_synthetic(0, 64)
    with pytest.raises(UserError):
        generate_synthetic(2, 8)
