"""Stage 1: checkpoints, metrics, resume after SIGKILL, DDP, pretrained offline."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import numpy as np

from conftest import ROOT, TINY_CNN
from selfexplain import artifacts, data
from selfexplain import classifier_train as ct
from selfexplain.errors import UserError
from selfexplain.model import build_classifier


def test_checkpoint_describes_itself_and_round_trips(tiny_classifier, cache_dir):
    model, ckpt = artifacts.load_classifier(tiny_classifier / "best.pt")
    assert ckpt["dataset"]["dataset"] == "synthetic" and ckpt["preprocess"]["image_size"] == 64
    assert set(ckpt["split"]) == {"train", "val", "test"} and len(ckpt["fingerprint"]) == 16
    images = data.load_dataset(ckpt["dataset"], cache_dir, progress=False)
    x = data.model_input(torch.from_numpy(images.images[:4].copy()), ckpt["preprocess"])
    with torch.no_grad():
        fmap = model.features(x)
        assert fmap.shape == (4, 512, 2, 2)
        assert torch.allclose(model.head(fmap), model(x))
    again, ckpt2 = artifacts.load_classifier(tiny_classifier / "best.pt")
    with torch.no_grad():
        assert torch.equal(again(x), model(x))
    assert ckpt2["fingerprint"] == artifacts.tensor_fingerprint(again.state_dict())


def test_stage_outputs(tiny_classifier, cache_dir):
    metrics = json.loads((tiny_classifier / "metrics.json").read_text())
    assert len(metrics["history"]) == 2
    # the reported accuracies, recomputed independently from best.pt on the recorded split
    model, ckpt = artifacts.load_classifier(tiny_classifier / "best.pt")
    images = data.load_dataset(ckpt["dataset"], cache_dir, progress=False)
    for name in ("val", "test"):
        idx = ckpt["split"][name].numpy()
        x = data.model_input(torch.from_numpy(images.images[idx]), ckpt["preprocess"])
        with torch.no_grad():
            accuracy = (model(x).argmax(1).numpy() == images.labels[idx]).mean()
        assert metrics[f"{name}_accuracy"] == pytest.approx(accuracy, abs=1.5 / len(idx))
    assert metrics["history"][ckpt["epoch"] - 1]["val_accuracy"] == pytest.approx(metrics["val_accuracy"], abs=0.05)
    decoder = json.loads((tiny_classifier / "label_decoder.json").read_text())
    assert decoder["0"] == "circle-spokes-dots" and len(decoder) == metrics["num_classes"]
    assert json.loads((tiny_classifier / "config.json").read_text())["IMAGE_SIZE"] == 64
    last = artifacts.load_checkpoint(tiny_classifier / "last.pt", "classifier")
    assert "optimizer" in last and last["epoch"] == 2


def _launch(args, env=None):
    cmd = [sys.executable, str(ROOT / "train_standard_cnn.py"), *args]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def _flags(**kw):
    return [f"--{k}={v}" for k, v in kw.items()]


def test_resume_after_sigkill_loses_at_most_the_epoch_in_progress(tmp_path, cache_dir):
    cfg = dict(TINY_CNN, epochs=4, out_dir=tmp_path, cache_dir=cache_dir, synthetic_per_class=24)
    proc = _launch(_flags(**cfg))
    last = tmp_path / "last.pt"
    deadline = time.time() + 120
    while not last.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert last.exists(), "no epoch finished"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    saved = artifacts.load_checkpoint(last, "classifier")
    assert 1 <= saved["epoch"] < 4
    resumed = _launch(_flags(**cfg, resume=True))
    out, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, out
    assert f"resumed from {tmp_path}/last.pt after epoch {saved['epoch']}" in out
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert [h["epoch"] for h in metrics["history"]] == [1, 2, 3, 4]
    assert metrics["history"][: saved["epoch"]] == saved["history"]  # finished epochs kept as they were


def test_ddp_two_processes_gloo(tmp_path, cache_dir):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "train_standard_cnn.py"), *_flags(**dict(TINY_CNN, epochs=1), out_dir=tmp_path,
                                                          cache_dir=cache_dir, device="cpu")]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert "world 2 (DDP on gloo)" in out.stderr
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["epochs"] == 1
    artifacts.load_classifier(tmp_path / "best.pt")


def test_a_resume_with_another_number_of_processes_is_refused(tiny_classifier, tmp_path, cache_dir):
    """Steps per epoch depend on the processes: a 1-process run resumed under torchrun with 2 passed its
    schedule's total at once and trained the rest at lr 0 (stage 2 alike, through the same check)."""
    assert artifacts.load_checkpoint(tiny_classifier / "last.pt", "classifier")["config"]["WORLD_SIZE"] == 1
    run = tmp_path / "run"
    run.mkdir()
    (run / "last.pt").write_bytes((tiny_classifier / "last.pt").read_bytes())
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "train_standard_cnn.py"), *_flags(**dict(TINY_CNN, epochs=3), out_dir=run, cache_dir=cache_dir,
                                                          device="cpu", resume=True)]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode != 0
    assert "was trained with 1 process(es), which set its learning-rate schedule; resume with torchrun " \
           "--nproc_per_node=1" in out.stderr
    with pytest.raises(UserError, match=r"trained with --batch_size=64, 2 process\(es\)"):
        artifacts.require_same_schedule("x", {"BATCH_SIZE": 64, "WORLD_SIZE": 2}, {"BATCH_SIZE": 32, "WORLD_SIZE": 1})
    artifacts.require_same_schedule("x", {"BATCH_SIZE": 64}, {"BATCH_SIZE": 64, "WORLD_SIZE": 4})  # older: no record


def test_the_relaunch_on_several_gpus_reads_the_settings_as_the_script_does(monkeypatch, tmp_path):
    """'--device=cpu' was compared after '-' became '_' ('__device=cpu'): a CPU run and --help were relaunched
    under torchrun on every 2-GPU machine; a typo became a traceback per process."""
    import train_standard_cnn as stage1
    from selfexplain import distributed

    launched = []
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(os, "execvp", lambda prog, cmd: launched.append(cmd))
    (tmp_path / "cpu.yaml").write_text("device: cpu\n")
    for argv in (["--device=cpu"], ["--help"], ["-h"], ["--device=cuda:1"], [f"--config={tmp_path / 'cpu.yaml'}"],
                 ["--epocs=3"], ["--epochs=three"]):
        distributed.maybe_launch_torchrun("train_standard_cnn.py", vars(stage1), argv)
        assert launched == [], argv
    distributed.maybe_launch_torchrun("train_standard_cnn.py", vars(stage1), ["--epochs=3", "--device=cuda"])
    assert launched and launched[0][-3:] == ["train_standard_cnn.py", "--epochs=3", "--device=cuda"]
    assert "--nproc_per_node=2" in launched[0]


def test_torchrun_with_one_process_joins_the_group(monkeypatch):
    """One-GPU machines check the NCCL/DDP path by torchrun with one process."""
    import socket

    from selfexplain.distributed import all_reduce_sum, cleanup, setup_runtime

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {"TORCHELASTIC_RUN_ID": "t", "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    runtime = setup_runtime("cpu")
    try:
        assert runtime.distributed and runtime.world_size == 1 and torch.distributed.is_initialized()
        assert all_reduce_sum(torch.ones(3), runtime).tolist() == [1.0, 1.0, 1.0]
        assert runtime.describe() == "device cpu, world 1 (DDP on gloo)"  # the log shows the group was joined
    finally:
        cleanup(runtime)
    assert not torch.distributed.is_initialized()
    monkeypatch.delenv("TORCHELASTIC_RUN_ID")
    plain = setup_runtime("cpu")
    assert not plain.distributed and plain.describe() == "device cpu, world 1"  # a plain run stays single-process


def test_analysis_stages_read_ieee_fp32_features_on_cuda(monkeypatch, tiny_classifier):
    """cuDNN's default TF32 moved an H200's cached tokens by 7e-4 relative from fp32; loading the classifier
    for stages 2-5 turns TF32 convolutions off on CUDA, and leaves a CPU run's settings alone."""
    from selfexplain.distributed import exact_fp32_convs

    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)  # PyTorch's default, restored afterwards
    exact_fp32_convs("cpu")
    assert torch.backends.cudnn.allow_tf32
    exact_fp32_convs(torch.device("cuda", 0))  # the flag is set without a GPU: the rule is checkable here
    assert not torch.backends.cudnn.allow_tf32
    seen = []
    monkeypatch.setattr(artifacts, "exact_fp32_convs", seen.append)
    artifacts.load_classifier(tiny_classifier / "best.pt", "cpu")
    assert seen == ["cpu"]  # every reader of features passes through load_classifier


def test_pretrained_without_weights_is_a_clear_error(tmp_path, monkeypatch):
    from selfexplain.model import SketchResNet

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    import torchvision

    def offline(*a, **k):
        raise OSError("network unreachable")

    monkeypatch.setattr(torchvision.models.ResNet18_Weights.IMAGENET1K_V1.__class__, "get_state_dict", offline)
    with pytest.raises(UserError, match="--pretrained=False"):
        SketchResNet(10, pretrained=True)


def test_pretrained_stem_averages_rgb(monkeypatch):
    import torchvision

    from selfexplain import model as model_mod

    reference = torchvision.models.resnet18(weights=None).state_dict()
    monkeypatch.setattr(model_mod, "_imagenet_state_dict", lambda: reference)
    net = model_mod.SketchResNet(7, pretrained=True)
    assert torch.allclose(net.stem[0].weight, reference["conv1.weight"].mean(1, keepdim=True))
    assert torch.equal(net.layer1[0].conv1.weight, reference["layer1.0.conv1.weight"])


def test_lr_schedule_warms_up_then_decays_to_zero():
    from selfexplain.distributed import lr_at

    lrs = [lr_at(s, 100, 1.0, 0.1) for s in range(100)]
    assert lrs[0] == 0.1 and lrs[9] == 1.0  # linear warm-up over the first 10 steps
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:])) and lrs[-1] < 1e-3


def test_augment_auto_is_off_for_synthetic_on_for_real_data_and_bad_values_fail(tmp_path):
    import train_standard_cnn as stage1

    assert ct.resolve_augment("auto", "synthetic") is False  # procedural samples are already varied
    assert ct.resolve_augment("auto", "folder") is True and ct.resolve_augment("auto", "tu-berlin") is True
    assert ct.resolve_augment("True", "synthetic") is True  # CLI strings and Python bools alike
    assert ct.resolve_augment(False, "folder") is False
    with pytest.raises(UserError, match="AUGMENT must be auto, True or False"):
        stage1.main(dataset="synthetic", augment="sometimes", out_dir=str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()  # failed before any work


def test_optimizer_decays_weights_only():
    from selfexplain.model import SketchResNet

    net = SketchResNet(5)
    opt = ct.make_classifier_optimizer(net, 5e-3, 0.05, "cpu")
    decayed, plain = opt.param_groups
    assert decayed["weight_decay"] > 0 and all(p.ndim > 1 for p in decayed["params"])
    assert plain["weight_decay"] == 0 and {id(p) for p in plain["params"]} == {id(net.fc.bias), *(
        id(p) for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d) for p in m.parameters())}


def test_fresh_residual_blocks_start_as_identity(seed):
    from selfexplain.model import SketchResNet

    net = SketchResNet(5).eval()
    block = net.layer2[1]  # no downsample: output = relu(x + residual), residual zero at init
    x = torch.rand(2, 128, 8, 8)
    assert torch.equal(block(x), torch.relu(x))


def test_allocator_tuning_leaves_a_users_malloc_settings_alone(monkeypatch):
    from selfexplain.distributed import keep_freed_memory

    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "0")
    assert keep_freed_memory() is False
    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_")
    import platform

    if platform.libc_ver()[0] == "glibc":
        assert keep_freed_memory() is True  # applied


def test_an_earlier_run_is_refused_unless_resume_or_overwrite(tiny_classifier, tmp_path, cache_dir):
    import train_standard_cnn as stage1

    run = tmp_path / "run"
    run.mkdir()
    for name in ("best.pt", "last.pt", "metrics.json"):
        (run / name).write_bytes((tiny_classifier / name).read_bytes())
    (run / "tb").mkdir()
    (run / "tb" / "events.out.tfevents.old").write_text("old run")
    cfg = dict(TINY_CNN, epochs=1, max_batches=1, out_dir=str(run), cache_dir=str(cache_dir))
    before = (run / "best.pt").read_bytes()
    with pytest.raises(UserError, match="holds an earlier run.*--resume=True.*--overwrite=True"):
        stage1.main(**cfg)
    assert (run / "best.pt").read_bytes() == before  # nothing touched
    with pytest.raises(UserError, match="choose one"):
        stage1.main(**cfg, resume=True, overwrite=True)
    for mistake in (dict(amp="fp8"), dict(layer4_stride=3), dict(dataset="folder", data_root=str(tmp_path / "typo")),
                    dict(data_root=str(tmp_path)),  # a folder named, DATASET left at synthetic
                    dict(val_fraction=0.0), dict(batch_size=100000)):
        with pytest.raises((UserError, ValueError)):
            stage1.main(**{**cfg, **mistake}, overwrite=True)
        assert (run / "best.pt").read_bytes() == before  # --overwrite with a mistake deletes nothing
    stage1.main(**dict(cfg, tensorboard=True), overwrite=True)
    assert not (run / "tb" / "events.out.tfevents.old").exists()  # the old curves cannot interleave
    assert artifacts.load_checkpoint(run / "last.pt", "classifier")["epoch"] == 1


def test_resume_refuses_other_data(tiny_classifier, tmp_path, cache_dir):
    import train_standard_cnn as stage1

    run = tmp_path / "run"
    run.mkdir()
    (run / "last.pt").write_bytes((tiny_classifier / "last.pt").read_bytes())
    for other in (dict(synthetic_per_class=30), dict(image_size=96), dict(dataset="folder", data_root=str(tmp_path)),
                  dict(synthetic_style="varied")):
        with pytest.raises(UserError, match="was trained on synthetic .* but the settings name .*; resume with "
                                            "--dataset=synthetic --image_size=64 --synthetic_per_class=24 "
                                            "--synthetic_style=quadrants --seed=0, or"):
            stage1.main(**dict(TINY_CNN, out_dir=str(run), cache_dir=str(cache_dir), resume=True, **other))
    old = artifacts.load_checkpoint(run / "last.pt", "classifier")  # drawn by an older generator: no flag helps
    artifacts.save_checkpoint({**old, "dataset": {**old["dataset"], "generator_version": 1}}, run / "last.pt")
    with pytest.raises(UserError, match="differs from this code's in generator_version; start a new run"):
        stage1.main(**dict(TINY_CNN, out_dir=str(run), cache_dir=str(cache_dir), resume=True))
    (run / "last.pt").write_bytes((tiny_classifier / "last.pt").read_bytes())
    for other in (dict(batch_size=64), dict(accum_steps=2), dict(max_batches=1)):  # steps per epoch: lr went to 0
        with pytest.raises(UserError, match="which set its learning-rate schedule"):
            stage1.main(**dict(TINY_CNN, out_dir=str(run), cache_dir=str(cache_dir), resume=True, **other))
    # every setting to change in one message (a walkthrough took three tries, one flag each)
    with pytest.raises(UserError, match=r"trained on synthetic .* but the settings name synthetic .* 96 px.*; and with "
                                        r"LAYER4_STRIDE=\d; and with --batch_size=\d+, which set its learning-rate "
                                        r"schedule; resume with --dataset=synthetic --image_size=64 .* "
                                        r"--layer4_stride=\d --batch_size=\d+, or start a new run"):
        stage1.main(**dict(TINY_CNN, out_dir=str(run), cache_dir=str(cache_dir), resume=True, image_size=96,
                           layer4_stride=3 - TINY_CNN.get("layer4_stride", 2), batch_size=64))


def test_too_few_images_for_a_validation_split_is_refused(tmp_path, cache_dir):
    """2 sketches per class split 24/0/0 and reported val and test accuracy 0.0000 as measurements."""
    import train_standard_cnn as stage1

    with pytest.raises(UserError, match=r"at least 3 images.*; circle-spokes-dots \(2\), .*, \.\.\. have fewer"):
        stage1.main(**dict(TINY_CNN, out_dir=str(tmp_path / "run"), cache_dir=str(cache_dir), synthetic_per_class=2,
                           batch_size=4))


def test_one_class_too_small_for_validation_is_refused_and_small_ones_named(tmp_path, capsys):
    """A 2-image class among larger ones split 150/18/18 without a word: trained on, never in val or test."""
    from selfexplain import classifier_train as ct
    from selfexplain.data import ImageSet

    def imageset(sizes):
        labels = np.repeat(np.arange(len(sizes)), sizes)
        return ImageSet(images=np.full((len(labels), 8, 8), 255, np.uint8), labels=labels,
                        class_names=["a", "b", "tiny"], names=[str(i) for i in range(len(labels))])

    with pytest.raises(UserError, match=r"tiny \(2\) has fewer: add images or remove the class"):
        ct.new_split(imageset([30, 30, 2]), 0.1, 0.1, 0, 8)
    with pytest.raises(UserError, match=r"leave no training image for tiny \(4\)"):  # 0.45 + 0.45 of 4 images
        ct.new_split(imageset([30, 30, 4]), 0.45, 0.45, 0, 8)
    split, _ = ct.new_split(imageset([30, 30, 5]), 0.1, 0.1, 0, 8)
    assert "warning: tiny (5) has under 10 images" in capsys.readouterr().err
    assert all(np.isin(2, np.repeat(np.arange(3), [30, 30, 5])[split[k]]) for k in ("train", "val", "test"))


def test_a_spec_from_before_the_style_setting_reads_as_the_legacy_style():
    from selfexplain import classifier_train, synthetic

    old = {"dataset": "synthetic", "data_root": None, "image_size": 64, "per_class": 24, "seed": 0}
    assert (classifier_train._data_identity(old)
            == classifier_train._data_identity({**old, "style": synthetic.LEGACY_STYLE}))
    assert (classifier_train._data_identity(old)
            != classifier_train._data_identity({**old, "style": "varied"}))


def test_resume_restores_split_scaler_and_augmentation_draws(tiny_classifier):
    """restore() brings back the split, the loss scaler's state; the augmentation draws depend on the epoch only."""
    from selfexplain.model import SketchResNet

    ckpt = artifacts.load_checkpoint(tiny_classifier / "last.pt", "classifier")
    model = SketchResNet(len(ckpt["class_names"]))
    optimizer = ct.make_classifier_optimizer(model, 1e-3, 0.0, "cpu")
    ckpt["scaler"] = torch.amp.GradScaler("cpu", init_scale=1024.0).state_dict()  # as an fp16 run saves it
    fresh = torch.amp.GradScaler("cpu")
    state, split, prep = ct.restore(ckpt, model, optimizer, fresh)
    assert fresh.get_scale() == 1024.0
    assert state.epoch == ckpt["epoch"] == len(state.history) and state.step == ckpt["step"]
    assert all(np.array_equal(split[k], ckpt["split"][k].numpy()) for k in ("train", "val", "test"))
    assert prep == ckpt["preprocess"]
    draws = [ct.augment_generator(0, 3, 0).initial_seed() for _ in range(2)]
    assert draws[0] == draws[1] != ct.augment_generator(0, 4, 0).initial_seed() != ct.augment_generator(0, 3, 1).initial_seed()


def test_layer4_stride_1_checkpoint_reloads_with_its_map_size(tmp_path, cache_dir):
    """LAYER4_STRIDE=1 gives a 4x4 map at 64 px; the checkpoint records it and rebuilds the same model."""
    import train_standard_cnn as stage1
    from selfexplain.model import SketchResNet

    run = tmp_path / "s1"
    stage1.main(**dict(TINY_CNN, layer4_stride=1, epochs=1, max_batches=2), out_dir=str(run), cache_dir=str(cache_dir))
    model, ckpt = artifacts.load_classifier(run / "best.pt")
    assert ckpt["arch"]["layer4_stride"] == 1
    x = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        assert model.features(x).shape == (2, 512, 4, 4)
        as_stride_2 = SketchResNet(ckpt["arch"]["num_classes"], layer4_stride=2).eval()
        as_stride_2.load_state_dict(ckpt["model"])  # same weight shapes: only the recorded stride tells them apart
        assert as_stride_2.features(x).shape == (2, 512, 2, 2)
        assert not torch.allclose(as_stride_2(x), model(x))
    with pytest.raises(UserError, match="LAYER4_STRIDE=1"):  # resuming with the other stride is refused
        stage1.main(**dict(TINY_CNN, layer4_stride=2, epochs=2), out_dir=str(run), cache_dir=str(cache_dir),
                    resume=True)
    old = dict(ckpt["arch"])
    del old["layer4_stride"]  # a checkpoint from before the setting: torchvision's stride 2
    assert build_classifier(old).layer4_stride == 2
    with pytest.raises(UserError, match="LAYER4_STRIDE must be 1 or 2"):
        SketchResNet(3, layer4_stride=4)


def test_epoch_images_train_on_fresh_sketches_after_the_first_epoch():
    """Epoch 1 (and real data, and SYNTHETIC_FRESH off) reads the cache; later epochs draw
    the same classes anew, each epoch different, labels aligned with the images."""
    from selfexplain.synthetic import generate_synthetic, rerender
    gen = generate_synthetic(4, 32, seed=0, style="varied")
    spec = {"dataset": "synthetic", "image_size": 32, "per_class": 4, "seed": 0, "style": "varied"}
    imageset = data.ImageSet(gen["images"], gen["labels"], gen["class_names"], [""] * len(gen["labels"]),
                             origins=gen["origins"], spec=spec)
    shard = np.array([3, 17, 40])
    for epoch, fresh in ((1, True), (3, False)):
        images, labels, rows = ct.epoch_images(imageset, shard, epoch, fresh)
        assert images is imageset.images and labels is imageset.labels and rows is shard
    real = data.ImageSet(gen["images"], gen["labels"], gen["class_names"], [""] * len(gen["labels"]))
    assert ct.epoch_images(real, shard, 2, True)[0] is real.images
    images, labels, rows = ct.epoch_images(imageset, shard, 2, True)
    assert np.array_equal(rows, np.arange(3)) and np.array_equal(labels, gen["labels"][shard])
    for k, i in enumerate(shard):
        c, j = gen["origins"][i]
        assert c == labels[k] and np.array_equal(images[k], rerender(c, j + 4, 32, 0, style="varied")[0])
        assert not np.array_equal(images[k], gen["images"][i])
    later = ct.epoch_images(imageset, shard, 3, True)[0]
    assert not any(np.array_equal(a, b) for a, b in zip(images, later))


def test_fresh_drawing_forks_at_most_the_cpus_per_rank_and_never_spawns(monkeypatch):
    """Spawned workers would re-import torch every epoch: drawing then stays in-process."""
    import multiprocessing
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    monkeypatch.setattr(multiprocessing, "get_start_method", lambda allow_none=False: "fork")
    assert ct.fresh_workers(1) == ct.FRESH_WORKERS and ct.fresh_workers(8) == 1
    # on a GPU run the cores only draw (the loop waits for them): more workers, still per rank
    assert ct.fresh_workers(1, "cuda") == min(ct.FRESH_WORKERS_GPU, 8) > ct.FRESH_WORKERS
    assert ct.fresh_workers(4, "cuda") == 2 and ct.fresh_workers(8, "cuda") == 1
    monkeypatch.setattr(multiprocessing, "get_start_method", lambda allow_none=False: "spawn")
    assert ct.fresh_workers(1) == 0


def test_an_overwrite_stopped_before_its_first_checkpoint_keeps_the_earlier_model(tiny_classifier, tmp_path,
                                                                                  cache_dir, monkeypatch):
    import train_standard_cnn as stage1

    run = tmp_path / "run"
    run.mkdir()
    for name in ("best.pt", "last.pt", "metrics.json"):
        (run / name).write_bytes((tiny_classifier / name).read_bytes())
    before = (run / "best.pt").read_bytes()
    cfg = dict(TINY_CNN, epochs=1, max_batches=1, out_dir=str(run), cache_dir=str(cache_dir), tensorboard=True)

    def ctrl_c(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(ct, "train_epoch", ctrl_c)
    for _ in range(2):  # a second overwrite that also stops early must not drop the model either
        with pytest.raises(KeyboardInterrupt):
            stage1.main(**cfg, overwrite=True)
        assert (run / artifacts.REPLACED_DIR / "best.pt").read_bytes() == before and not (run / "best.pt").exists()
    with pytest.raises(UserError, match="nothing to resume"):
        stage1.main(**cfg, resume=True)
    monkeypatch.undo()
    with pytest.raises(UserError, match="holds the run an interrupted --overwrite replaced"):
        stage1.main(**cfg)  # a plain run must not replace it either
    with pytest.raises(UserError, match="an interrupted --overwrite kept the earlier one in"):
        artifacts.load_checkpoint(run / "best.pt", "classifier")  # what stages 2-5 say meanwhile
    stage1.main(**cfg, overwrite=True)
    assert (run / "best.pt").is_file() and not (run / artifacts.REPLACED_DIR).exists()  # gone after the checkpoint


def test_one_class_is_refused_before_training(tmp_path):
    import train_standard_cnn as stage1
    from hf_fixtures import make_image_folder

    make_image_folder(tmp_path / "one", ["circle"], n_per_class=12, clutter=False)
    with pytest.raises(UserError, match=r"the data has 1 class \(circle\): a classifier needs at least 2"):
        stage1.main(**dict(TINY_CNN, dataset="folder", data_root=str(tmp_path / "one"), out_dir=str(tmp_path / "run"),
                           cache_dir=str(tmp_path / "cache")))
    assert not (tmp_path / "run" / artifacts.BEST_CLASSIFIER).exists()


def test_the_log_gives_steps_per_epoch_and_the_images_full_batches_leave_out():
    small = ct.ClassifierTrainSettings("run", batch_size=64)
    note = ct.steps_note(96, ct.epoch_batches(96, small, 1), small, 1)  # a small folder at the default batch
    assert note.startswith("1 optimiser steps per epoch") and "32 of 96 training images sit out" in note
    assert "a smaller --batch_size" in note
    demo = ct.ClassifierTrainSettings("run", batch_size=64)
    note = ct.steps_note(5760, ct.epoch_batches(5760, demo, 1), demo, 1)  # the demo: 90 full batches, none left out
    assert note == "90 optimiser steps per epoch (BATCH_SIZE=64 x ACCUM_STEPS=1)"


def test_too_few_images_for_one_step_says_which_batch_size_fits():
    """3 classes x 15 images leave 33 for training: BATCH_SIZE=64 makes no step; the error names a size that does."""
    with pytest.raises(UserError, match=r"too few for one optimiser step of BATCH_SIZE=64 x ACCUM_STEPS=1; lower "
                                        r"--batch_size to 33 or less \(--batch_size=8 makes about four steps"):
        ct.epoch_batches(33, ct.ClassifierTrainSettings("run", batch_size=64), 1)
    assert 33 // data.few_steps_batch_size(33) == 4 and data.few_steps_batch_size(3) == 2
    tiny = ct.ClassifierTrainSettings("run", batch_size=2)  # BatchNorm's floor: advise epochs, not a smaller batch
    assert ct.steps_note(8, ct.epoch_batches(8, tiny, 1), tiny, 1).endswith("few steps: more --epochs (or more images) "
                                                                          "let it learn more")
    with pytest.raises(UserError, match="add images or lower ACCUM_STEPS"):
        ct.epoch_batches(3, ct.ClassifierTrainSettings("run", batch_size=4, accum_steps=2), 1)
    with pytest.raises(UserError, match="raise MAX_BATCHES to ACCUM_STEPS or more"):
        ct.epoch_batches(5760, ct.ClassifierTrainSettings("run", batch_size=64, accum_steps=4, max_batches=2), 1)


def test_a_cached_folder_still_names_its_unreadable_images(tmp_path, capsys):
    import train_standard_cnn as stage1
    from hf_fixtures import make_image_folder

    make_image_folder(tmp_path / "src", ["a", "b"], n_per_class=4, clutter=False)
    (tmp_path / "src" / "a" / "broken.png").write_text("junk")
    run = dict(TINY_CNN, dataset="folder", data_root=str(tmp_path / "src"), epochs=0, out_dir=str(tmp_path / "run"),
               cache_dir=str(tmp_path / "cache"))
    stage1.main(**run)  # builds the cache: the decoder names it, once
    assert capsys.readouterr().err.count("a/broken.png") == 1
    stage1.main(**run)  # reads the cache: the run's log still names it
    assert "skipped 1 unreadable image: a/broken.png (not an image) (all listed" in capsys.readouterr().err


def test_a_run_resumes_where_its_image_folder_moved(tmp_path, capsys):
    """Stages 2-5 take --data_root for moved data; stage 1's resume refused it, naming digests, then
    suggested --overwrite (losing the run). A resume without DATA_ROOT reads where the checkpoint says."""
    import shutil

    import train_standard_cnn as stage1
    from hf_fixtures import make_image_folder

    make_image_folder(tmp_path / "src", ["a", "b"], n_per_class=12, clutter=False)
    run = dict(TINY_CNN, dataset="folder", data_root=str(tmp_path / "src"), epochs=1, batch_size=8,
               out_dir=str(tmp_path / "run"), cache_dir=str(tmp_path / "cache"))
    stage1.main(**run)
    capsys.readouterr()
    stage1.main(**{**run, "data_root": "", "epochs": 2, "resume": True})  # the folder it was trained on
    assert artifacts.load_checkpoint(tmp_path / "run" / "last.pt", "classifier")["epoch"] == 2
    assert "after epoch 1 of EPOCHS=1; now EPOCHS=2: the learning-rate schedule is recomputed" in capsys.readouterr().err
    stage1.main(**{**run, "data_root": "", "epochs": 2, "resume": True})  # a finished run, the same EPOCHS: said plainly
    assert "resumed from" in (err := capsys.readouterr().err) and "EPOCHS" not in err.split("resumed from")[1][:150]
    shutil.move(tmp_path / "src", tmp_path / "moved")
    with pytest.raises(UserError, match="pass --data_root=WHERE_IT_IS_NOW"):
        stage1.main(**{**run, "data_root": "", "epochs": 3, "resume": True})
    stage1.main(**{**run, "data_root": str(tmp_path / "moved"), "epochs": 3, "resume": True})
    assert artifacts.load_checkpoint(tmp_path / "run" / "last.pt", "classifier")["epoch"] == 3
    last = artifacts.load_checkpoint(tmp_path / "run" / "last.pt", "classifier")
    (tmp_path / "moved" / "a" / "000.png").unlink()  # moved, and changed: still refused
    with pytest.raises(UserError, match="no longer holds the images"):
        stage1.main(**{**run, "data_root": str(tmp_path / "moved"), "epochs": 4, "resume": True})
    # a checkpoint from before the images were recorded cannot be checked elsewhere: it resumes only where it was
    last["dataset"] = {k: v for k, v in last["dataset"].items() if not k.startswith(("items_", "files_"))}
    artifacts.save_checkpoint(last, tmp_path / "run" / "last.pt")
    with pytest.raises(UserError, match="predates the record of which images"):
        stage1.main(**{**run, "data_root": str(tmp_path / "elsewhere"), "epochs": 4, "resume": True})


@pytest.mark.parametrize("losses, best_epoch", [([2.0, 1.0, 0.5, 1.2], 2),    # the tie's later epoch has the higher loss
                                                ([2.0, 1.0, 0.5, 0.7], 4)])   # ... the lower loss: it wins the tie
def test_best_pt_is_the_epoch_with_the_best_validation_accuracy(tmp_path, cache_dir, monkeypatch, losses, best_epoch):
    """Stages 2-5 read best.pt: a loop that saved every epoch as best passed every test (validation improved
    every epoch). Ties in accuracy go to the lower validation loss: keeping the first epoch to reach a tie
    left small validation sets (saturated at 1.0 early) with an undertrained best.pt."""
    import train_standard_cnn as stage1

    real, scripted_val = ct.evaluate, iter(zip([0.5, 0.8, 0.6, 0.8], losses))
    val_calls = []

    def scripted(model, images, labels, indices, *args, **kwargs):
        out = real(model, images, labels, indices, *args, **kwargs)
        if len(val_calls) < 4:  # the epochs' validation passes; the final val/test pass reads best.pt as it is
            val_calls.append(1)
            accuracy, loss = next(scripted_val)
            out = {**out, "accuracy": accuracy, "loss": loss}
        return out

    monkeypatch.setattr(ct, "evaluate", scripted)
    stage1.main(**dict(TINY_CNN, epochs=4, out_dir=str(tmp_path), cache_dir=str(cache_dir)))
    assert artifacts.load_checkpoint(tmp_path / "best.pt", "classifier")["epoch"] == best_epoch
    assert artifacts.load_checkpoint(tmp_path / "last.pt", "classifier")["epoch"] == 4
    assert json.loads((tmp_path / "metrics.json").read_text())["best_epoch"] == best_epoch


def test_accumulated_micro_batches_skip_the_ddp_all_reduce():
    """With ACCUM_STEPS=2 under DDP every micro-batch all-reduced its gradients; only a step's last one must."""
    import contextlib

    import train_standard_cnn as stage1
    from selfexplain.artifacts import TrainState
    from selfexplain.config import make_config, module_constants
    from selfexplain.distributed import Runtime

    class Wrapped(torch.nn.Module):  # DDP's interface: forward, parameters, no_sync
        def __init__(self):
            super().__init__()
            self.net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 3))
            self.local, self.calls = 0, []

        @contextlib.contextmanager
        def no_sync(self):
            self.local += 1
            yield

        def forward(self, x):
            self.calls.append(self.local)
            return self.net(x)

    model = Wrapped()
    settings = ct.ClassifierTrainSettings.from_config(
        make_config(module_constants(vars(stage1)), {"accum_steps": 2, "amp": "off", "channels_last": False}),
        augment=False)
    images = np.full((8, 8, 8), 255, np.uint8)
    loader = data.batches(images, np.arange(8) % 3, np.arange(8), 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    state = TrainState(best=0.0)
    ct.train_epoch(model, optimizer, torch.amp.GradScaler("cpu", enabled=False), loader, settings=settings,
                   prep={"mean": 0.0, "std": 1.0}, runtime=Runtime(device=torch.device("cpu")), state=state,
                   total_steps=10, generator=torch.Generator().manual_seed(0))
    assert model.calls == [1, 1, 2, 2] and state.step == 2  # micro-batches 1 and 3 ran locally; 2 steps taken


def test_accuracy_on_a_small_split_is_given_as_a_count_too():
    assert ct.accuracy_text(0.5, 2) == "0.5000 (1 of 2 images)"  # not a measurement to four decimals
    assert ct.accuracy_text(0.99444, 720) == "0.9944"
