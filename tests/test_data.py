"""Data layer: cache, split, augmentation, bad images end to end."""

import numpy as np
import torch

from selfexplain import data


def test_stratified_split_is_disjoint_complete_and_per_class(seed):
    labels = np.repeat(np.arange(5), 20)
    split = data.stratified_split(labels, 0.1, 0.2, seed=0)
    all_idx = np.concatenate(list(split.values()))
    assert sorted(all_idx.tolist()) == list(range(100))
    for c in range(5):
        assert (labels[split["val"]] == c).sum() == 2 and (labels[split["test"]] == c).sum() == 4
    again = data.stratified_split(labels, 0.1, 0.2, seed=0)
    assert all(np.array_equal(split[k], again[k]) for k in split)


def test_synthetic_cache_is_built_once_and_reused(tmp_path):
    spec = data.dataset_spec("synthetic", None, 64, per_class=3, seed=1)
    first = data.load_dataset(spec, tmp_path, progress=False)
    folder = next(p for p in tmp_path.iterdir() if p.is_dir())
    stamp = (folder / "images.npy").stat().st_mtime_ns
    second = data.load_dataset(spec, tmp_path, progress=False)
    assert (folder / "images.npy").stat().st_mtime_ns == stamp
    assert np.array_equal(first.images, second.images) and first.images.dtype == np.uint8
    assert first.images.shape == (3 * len(first.class_names), 64, 64) and first.parts is not None


def test_augment_fills_white_and_keeps_shape(seed):
    ink = torch.zeros(8, 1, 64, 64)
    ink[:, :, 20:44, 20:44] = 1.0
    out = data.augment(ink, torch.Generator().manual_seed(0), degrees=30, translate=0.1)
    assert out.shape == ink.shape
    assert out[:, :, :3, :3].abs().max() == 0  # corners rotated in are paper, not ink
    assert out.sum() > 0.3 * ink.sum()


def test_model_input_standardises_ink():
    batch = torch.full((2, 32, 32), 255, dtype=torch.uint8)
    batch[:, 10, :] = 0
    x = data.model_input(batch, {"mean": 0.1, "std": 0.2})
    assert x.shape == (2, 1, 32, 32)
    assert torch.allclose(x[0, 0, 0, 0], torch.tensor(-0.5)) and torch.allclose(x[0, 0, 10, 0], torch.tensor(4.5))


def test_bad_images_in_a_folder_are_skipped_counted_and_named(tmp_path):
    from hf_fixtures import bad_image_payloads, make_image_folder

    make_image_folder(tmp_path / "src", ["a", "b"], n_per_class=3, clutter=False)
    for name, payload in bad_image_payloads().items():
        (tmp_path / "src" / "a" / f"{name}.png").write_bytes(payload)
    spec = data.dataset_spec("folder", str(tmp_path / "src"), 64)
    images = data.load_dataset(spec, tmp_path / "cache", progress=False)
    reasons = {s["source"].split("/")[-1]: s["reason"] for s in images.skipped}
    assert set(reasons) == {"zero_bytes.png", "not_an_image.png", "truncated_png.png", "huge_header.png",
                            "large_header.png"}
    assert len(images) == 6 + 4  # the good ones plus RGBA, LA, 16-bit and palette images
    kept = {n.split("/")[-1]: i for i, n in enumerate(images.names)}
    rgba = images.images[kept["rgba_transparent.png"]]
    assert rgba[0, 0] == 255 and rgba[32, 32] < 128  # white paper, dark stroke


def test_user_image_errors_are_one_line(tmp_path):
    import pytest

    from selfexplain.errors import UserError

    with pytest.raises(UserError, match="not found"):
        data.load_user_image(tmp_path / "missing.png", 64)
    (tmp_path / "x.png").write_text("hello")
    with pytest.raises(UserError, match="not an image"):
        data.load_user_image(tmp_path / "x.png", 64)
