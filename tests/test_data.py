"""Data layer: cache, split, augmentation, bad images end to end, interrupted builds."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from hf_fixtures import bad_image_payloads, make_image_folder
from selfexplain import data
from selfexplain.errors import UserError
from selfexplain.imaging import load_user_image


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
    make_image_folder(tmp_path / "src", ["a", "b"], n_per_class=3, clutter=False)
    for name, payload in bad_image_payloads().items():
        (tmp_path / "src" / "a" / f"{name}.png").write_bytes(payload)
    spec = data.dataset_spec("folder", str(tmp_path / "src"), 64)
    images = data.load_dataset(spec, tmp_path / "cache", progress=False)
    reasons = {s["source"].split("/")[-1]: s["reason"] for s in images.skipped}
    assert set(reasons) == {"zero_bytes.png", "not_an_image.png", "truncated_png.png", "huge_header.png",
                            "large_header.png", "long_strip.png"}
    assert reasons["long_strip.png"] == "too large (200000x1)"
    assert len(images) == 6 + 4  # the good ones plus RGBA, LA, 16-bit and palette images
    kept = {n.split("/")[-1]: i for i, n in enumerate(images.names)}
    rgba = images.images[kept["rgba_transparent.png"]]
    assert rgba[0, 0] == 255 and rgba[32, 32] < 128  # white paper, dark stroke


def test_user_image_errors_are_one_line(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_user_image(tmp_path / "missing.png", 64)
    (tmp_path / "x.png").write_text("hello")
    with pytest.raises(UserError, match="not an image"):
        load_user_image(tmp_path / "x.png", 64)


def test_a_long_strip_of_an_image_is_noted_and_a_sketch_is_not(tmp_path, capsys):
    """A 4:1 photo of a drawing is padded to a square (as in training): the user is told it reads smaller."""
    from PIL import Image, ImageDraw
    wide = Image.new("L", (400, 100), 255)
    ImageDraw.Draw(wide).line((20, 50, 380, 50), fill=0, width=4)
    wide.save(tmp_path / "wide.png")
    sketch = load_user_image(tmp_path / "wide.png", 64)
    assert "wide.png is 400x100 (4.0:1): padded to a square as in training, the drawing fills 25% of the " \
           "input's height" in capsys.readouterr().err
    assert (sketch[:20] == 255).all() and (sketch[28:36] < 255).any()  # letterboxed: white above, ink in the middle
    load_user_image(wide.rotate(90, expand=True), 64, name="tall")
    assert "tall is 100x400 (4.0:1): padded to a square as in training, the drawing fills 25% of the input's width" \
        in capsys.readouterr().err
    load_user_image(Image.new("L", (300, 100), 255), 64)  # 3:1 and squarer: nothing to say
    assert capsys.readouterr().err == ""
    exif = Image.Exif()
    exif[0x0112] = 6  # a phone photo stored on its side: decoded upright, so it is tall
    wide.save(tmp_path / "turned.jpg", exif=exif)
    load_user_image(tmp_path / "turned.jpg", 64)
    assert "turned.jpg is 100x400 (4.0:1)" in capsys.readouterr().err


def _interrupt_after_writing(real):
    """Wrap a cache writer so it writes its files, then raises KeyboardInterrupt (Ctrl-C)."""
    def writer(*args):
        real(*args)
        raise KeyboardInterrupt
    return writer


def test_interrupted_cache_build_leaves_no_temporary_folder(tmp_path, monkeypatch):
    spec = data.dataset_spec("synthetic", None, 64, per_class=2, seed=1)
    monkeypatch.setattr(data, "_cache_synthetic", _interrupt_after_writing(data._cache_synthetic))
    with pytest.raises(KeyboardInterrupt):
        data.load_dataset(spec, tmp_path, progress=False)
    assert list(tmp_path.iterdir()) == []  # neither a half-built cache nor its temporary folder
    monkeypatch.undo()
    assert len(data.load_dataset(spec, tmp_path, progress=False)) > 0


def test_failed_source_cache_build_leaves_no_temporary_folder(tmp_path, monkeypatch):
    make_image_folder(tmp_path / "src", ["a", "b"], n_per_class=2, clutter=False)
    monkeypatch.setattr(data, "_cache_source", _interrupt_after_writing(data._cache_source))
    with pytest.raises(KeyboardInterrupt):
        data.load_dataset(data.dataset_spec("folder", str(tmp_path / "src"), 64), tmp_path / "cache", progress=False)
    assert list((tmp_path / "cache").iterdir()) == []


def test_stale_temporary_folders_of_dead_processes_are_removed(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f"synthetic-64px-0123456789ab.tmp{int(dead.stdout)}"
    live = tmp_path / f"synthetic-64px-ba9876543210.tmp{os.getppid()}"  # our parent: alive
    for folder in (stale, live):
        folder.mkdir()
        (folder / "images.npy").write_bytes(b"\0" * 1024)
    data.load_dataset(data.dataset_spec("synthetic", None, 64, per_class=2, seed=1), tmp_path, progress=False)
    assert not stale.exists() and live.is_dir()
    tokens = tmp_path / "sae_tokens"  # stage 2's spilled token files: as large as the tokens
    tokens.mkdir()
    stale_file = tokens / f"abc-train-n10-r0of1.npy.tmp{int(dead.stdout)}.npy"
    live_file = tokens / f"abc-val-n10-r0of1.npy.tmp{os.getppid()}.npy"
    kept = tokens / "abc-train-n10-r0of1.npy"
    for path in (stale_file, live_file, kept):
        path.write_bytes(b"\0" * 64)
    assert data.remove_stale_builds(tokens) == [stale_file] and live_file.is_file() and kept.is_file()


def test_a_classifier_of_another_generator_version_is_refused(tmp_path):
    from selfexplain import synthetic

    spec = data.dataset_spec("synthetic", None, 64, per_class=2, seed=0)
    assert spec["generator_version"] == synthetic.GENERATOR_VERSION
    with pytest.raises(UserError, match="generator version"):
        data.load_dataset({**spec, "generator_version": synthetic.GENERATOR_VERSION - 1}, tmp_path, progress=False)


def test_a_changed_folder_is_refused_where_a_saved_split_would_index_other_images(tmp_path):
    """Stage 1 records which images its split indexes; later loads refuse another list, not a touched file."""
    make_image_folder(tmp_path / "src", ["a", "b"], n_per_class=3, clutter=False)
    spec = data.dataset_spec("folder", str(tmp_path / "src"), 64)
    recorded = data.load_dataset(spec, tmp_path / "cache", progress=False).spec  # what the checkpoint keeps
    assert "items_digest" in recorded
    os.utime(tmp_path / "src" / "a" / "000.png", ns=(1, 1))  # a copy or a touch: same images, new cache
    assert data.load_dataset(recorded, tmp_path / "cache", progress=False).names[0] == "a/000.png"
    first = (tmp_path / "src" / "a" / "001.jpg").read_bytes()
    (tmp_path / "src" / "a" / "0000_new.jpg").write_bytes(first)  # sorts first: every later index shifts
    caches = set((tmp_path / "cache").iterdir())
    with pytest.raises(UserError, match=r"no longer holds the images.*read 6 image files, now 7\), so"):
        data.load_dataset(recorded, tmp_path / "cache", progress=False)
    assert set((tmp_path / "cache").iterdir()) == caches  # refused before decoding the changed folder
    (tmp_path / "src" / "a" / "001.jpg").unlink()  # as many images again, another list: no counts to give
    with pytest.raises(UserError, match=r"added, removed or renamed, or became unreadable, so"):
        data.load_dataset(recorded, tmp_path / "cache", progress=False)
    older = {k: v for k, v in recorded.items() if not k.startswith("files_")}  # a checkpoint from before the list
    with pytest.raises(UserError, match=r"no longer holds the images"):  # still refused, after decoding
        data.load_dataset(older, tmp_path / "cache", progress=False)


def test_deleting_the_files_stage_1_could_not_read_is_no_change(tmp_path):
    """Stage 1 names its unreadable files; removing them leaves the same images, so later stages still load."""
    make_image_folder(tmp_path / "src", ["a", "b"], n_per_class=3, clutter=False)
    (tmp_path / "src" / "b" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    spec = data.dataset_spec("folder", str(tmp_path / "src"), 64)
    recorded = data.load_dataset(spec, tmp_path / "cache", progress=False).spec
    assert recorded["files_unread"] == ["b/broken.png"] and recorded["files_count"] == 6
    (tmp_path / "src" / "b" / "broken.png").unlink()
    assert len(data.load_dataset(recorded, tmp_path / "cache", progress=False).names) == 6
    (tmp_path / "src" / "b" / "also_broken.png").write_bytes(b"junk")  # a new file, even unreadable, is a change
    with pytest.raises(UserError, match=r"read 6 image files besides the 1 it could not read, now 7"):
        data.load_dataset(recorded, tmp_path / "cache", progress=False)


def test_the_lighter_pen_keeps_a_thin_stroke(seed):
    """Augmentation's thinning must not erase 1-2 px strokes (a blank image with a label)."""
    ink = torch.zeros(64, 1, 64, 64)
    ink[:, :, 20:22, 8:56] = 1.0  # a 2 px stroke
    ink[:, :, 30:50, 40] = 1.0    # a 1 px stroke
    out = data.augment(ink, torch.Generator().manual_seed(0), degrees=0.0, scale=(1.0, 1.0), translate=0.0,
                       flip=False, thickness_p=1.0)
    strokes = ink[0, 0] > 0
    kept = (out[:, 0][:, strokes] >= 0.4).float().mean(1)  # share of the stroke still drawn, per image
    assert kept.min() > 0.95
    lighter = out.sum((1, 2, 3)) < ink.sum((1, 2, 3)) - 1  # about half the batch takes the lighter pen
    assert 16 < int(lighter.sum()) < 48


def test_a_cache_another_process_finished_first_is_used(tmp_path, monkeypatch):
    """Two DDP ranks (or runs) build the same cache: the one whose rename comes second finds it done and reads it."""
    import shutil

    make_image_folder(tmp_path / "src", ["a", "b"], n_per_class=2, clutter=False)
    real = os.replace

    def another_finishes_first(src, dst):  # between any check and this rename, the other rank's lands
        if Path(src).is_dir() and not Path(dst).exists():
            shutil.copytree(src, dst)
        return real(src, dst)

    monkeypatch.setattr(data.os, "replace", another_finishes_first)
    images = data.load_dataset(data.dataset_spec("folder", str(tmp_path / "src"), 64), tmp_path / "cache",
                               progress=False)
    assert len(images) == 4
    assert len(list((tmp_path / "cache").iterdir())) == 1  # the finished cache; our temporary copy is gone


def test_later_stages_read_moved_data_from_data_root_if_the_images_are_the_same(tmp_path):
    make_image_folder(tmp_path / "src", ["a", "b"], n_per_class=3, clutter=False)
    spec = data.load_dataset(data.dataset_spec("folder", str(tmp_path / "src"), 64), tmp_path / "cache",
                             progress=False).spec                       # as the checkpoint records it
    (tmp_path / "src").rename(tmp_path / "moved")
    with pytest.raises(UserError, match="does not exist.*pass --data_root=WHERE_IT_IS_NOW"):
        data.load_dataset(spec, tmp_path / "cache", progress=False)
    moved = data.load_dataset(data.relocate(spec, str(tmp_path / "moved")), tmp_path / "cache", progress=False)
    assert len(moved) == 6 and moved.spec["data_root"] == str(tmp_path / "moved")
    make_image_folder(tmp_path / "other", ["a", "b"], n_per_class=4, clutter=False)  # not the trained images
    with pytest.raises(UserError, match="no longer holds the images"):
        data.load_dataset(data.relocate(spec, str(tmp_path / "other")), tmp_path / "cache", progress=False)
    assert data.relocate(spec, "") is spec
    with pytest.raises(UserError, match="synthetic"):
        data.relocate({"dataset": "synthetic"}, str(tmp_path))


def test_a_class_without_readable_images_is_left_out_and_said(tmp_path, capsys):
    make_image_folder(tmp_path / "src", ["a", "b", "c"], n_per_class=3)  # clutter: an empty class folder too
    for k in range(3):  # class a: every file unreadable
        (tmp_path / "src" / "a" / f"{k:03d}.png").write_text("junk")
    for stale in (tmp_path / "src" / "a").glob("*.*"):
        if stale.suffix.lower() != ".png":
            stale.unlink()
    (tmp_path / "src" / "loose.png").write_bytes((tmp_path / "src" / "b" / "002.PNG").read_bytes())  # in no class
    spec = data.dataset_spec("folder", str(tmp_path / "src"), 64)
    assert data.load_dataset(spec, tmp_path / "other_cache", progress=False).class_names == ["b", "c"]
    assert "zz_empty_class" not in capsys.readouterr().err  # a DDP rank other than 0: rank 0 says it
    images = data.load_dataset(spec, tmp_path / "cache", progress=True)
    err = capsys.readouterr().err
    assert f"building the image cache in {(tmp_path / 'cache').resolve()}" in err  # where, for a notebook elsewhere
    assert images.class_names == ["b", "c"] and sorted(set(images.labels.tolist())) == [0, 1]
    assert [n.split("/")[0] for n in images.names] == ["b"] * 3 + ["c"] * 3
    assert all(images.class_names[label] == name.split("/")[0] for label, name in zip(images.labels, images.names))
    assert "class 'a' has no readable images: left out" in err
    assert "class folder zz_empty_class/ has no images: left out" in err
    assert "1 image(s) directly in DATA_ROOT (loose.png) are in no class folder: left out" in err
    # later stages re-read the folder through the checkpoint's spec: the notice is stage 1's, not repeated
    again = data.load_dataset(images.spec, tmp_path / "cache", progress=False)
    assert again.class_names == ["b", "c"] and "has no images" not in capsys.readouterr().err


def test_a_skipped_file_is_named_once_per_run(tmp_path, capsys):
    make_image_folder(tmp_path / "src", ["a", "b"], n_per_class=3, clutter=False)
    (tmp_path / "src" / "a" / "broken.png").write_text("junk")
    spec = data.dataset_spec("folder", str(tmp_path / "src"), 64)
    decoded = data.load_dataset(spec, tmp_path / "cache", progress=False)
    err = capsys.readouterr().err
    assert decoded.decoded_now and err.count("a/broken.png") == 1  # named as it was met, with its reason
    assert data.skipped_note(decoded) == "skipped 1 unreadable image (named above; all listed in metrics.json)"
    cached = data.load_dataset(spec, tmp_path / "cache", progress=False)  # a rerun reads the cache: no decode lines
    assert not cached.decoded_now and "broken" not in capsys.readouterr().err
    assert data.skipped_note(cached) == ("skipped 1 unreadable image: a/broken.png (not an image) "
                                         "(all listed in metrics.json)")
