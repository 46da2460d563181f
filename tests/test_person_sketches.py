"""The second renderer (bench/person_sketches.py) and its benchmark (bench/bench_person.py)."""
import numpy as np
import pytest
import torch

from bench import bench_person
from bench.person_sketches import LAYOUTS, PENS, person_set, person_sketch
from selfexplain import artifacts
from selfexplain.model import SketchResNet
from selfexplain.synthetic import CLASS_NAMES, CLASS_PARTS


@pytest.fixture(scope="module")
def sketches():
    return person_set(1, 64, seed=3)


def test_every_class_in_every_layout_with_its_three_parts(sketches):
    assert len(sketches) == len(LAYOUTS) * len(CLASS_NAMES)
    assert {(s.layout, s.label) for s in sketches} == {(l, c) for l in LAYOUTS for c in range(12)}
    for s in sketches:
        assert s.image.shape == (64, 64) and s.image.dtype == np.uint8
        assert sorted(p["part"] for p in s.parts) == sorted(CLASS_PARTS[CLASS_NAMES[s.label]])


def test_boxes_hold_all_the_ink(sketches):
    """Each recorded box has dark ink, and there is no ink outside the boxes."""
    for s in sketches:
        outside = np.ones_like(s.image, dtype=bool)
        for p in s.parts:
            x0, y0, x1, y1 = p["box"]
            assert 0 <= x0 < x1 <= 64 and 0 <= y0 < y1 <= 64
            assert s.image[y0:y1, x0:x1].min() < 100, p
            outside[y0:y1, x0:x1] = False
        assert s.image[outside].min() >= 250


@pytest.mark.parametrize("pen", [PENS[0], PENS[-1]])
def test_thin_and_thick_pens_stay_dark_at_demo_size(pen):
    """The ink-preserving decode keeps a 3 px line at 1111 px dark at 64 px."""
    s = person_sketch(0, "quadrants", pen, 64, np.random.default_rng(0))
    assert s.image.min() < 60
    dark = (s.image < 128).mean()
    assert 0.01 < dark < 0.3


def test_reproducible_and_a_smaller_set_is_a_subset():
    a, b = person_set(2, 48, layouts=("random",), seed=1), person_set(1, 48, layouts=("random",), seed=1)
    assert all(np.array_equal(x.image, y.image) and x.parts == y.parts for x, y in zip(a[::2], b))
    c = person_set(1, 48, layouts=("random",), seed=2)
    assert any(not np.array_equal(x.image, y.image) for x, y in zip(b, c))


def test_bench_person_reports_accuracy_per_layout(tmp_path):
    """Untrained stand-in classifier: the table has every layout and an accuracy in [0, 1]."""
    torch.manual_seed(0)
    model = SketchResNet(12).eval()
    split = {"train": np.arange(4), "val": np.arange(0), "test": np.arange(0)}
    ckpt = artifacts.classifier_checkpoint(
        model, arch={"name": "resnet18", "num_classes": 12, "in_channels": 1},
        preprocess={"image_size": 64, "mean": 0.1, "std": 0.25, "ink": True}, dataset={}, split=split,
        class_names=CLASS_NAMES, config={}, epoch=0, metrics={})
    path = artifacts.save_checkpoint(ckpt, tmp_path / "best.pt")
    out = tmp_path / "person.md"
    accuracy = bench_person.main(classifier_ckpt=str(path), n_per_class=1, out=str(out),
                                 sheet=str(tmp_path / "sheet.png"))
    assert 0.0 <= accuracy <= 1.0
    text = out.read_text()
    assert all(f"| {layout} | 12 |" in text for layout in LAYOUTS) and "| all | 36 |" in text
    assert (tmp_path / "sheet.png").is_file()
