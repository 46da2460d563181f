"""Stage 1's logic: train the sketch classifier, checkpoint it, test the best epoch.

``train_standard_cnn.py`` reads the settings and calls, in order: :func:`resume_point`
(on ``--resume=True``), :func:`new_split` or :func:`restore`, :func:`fit`. Every
function takes values (a :class:`ClassifierTrainSettings`, tensors, the data), never
the config dict, so a notebook can drive a run piece by piece.
"""
from __future__ import annotations

import contextlib
import os
import sys
import time
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from tqdm.auto import tqdm

from . import artifacts, data, synthetic
from .artifacts import TrainState
from .distributed import (Runtime, all_reduce_sum, amp_dtype, autocast, barrier, broadcast, lr_at,
                          precision_note)
from .errors import UserError, some
from .logs import log
from .model import classifier_arch

FRESH_WORKERS = 2  # processes drawing fresh synthetic sketches on a CPU run (4 s -> 2 s per 5,760 sketches on 2 cores)
FRESH_WORKERS_GPU = 8  # ... on a GPU run, where the cores are otherwise idle (an H200 epoch waited 6 s of 9 on 2)


def fresh_workers(world_size: int = 1, device_type: str = "cpu") -> int:
    """Drawing processes for :func:`epoch_images`: ``FRESH_WORKERS`` (``FRESH_WORKERS_GPU`` when the model
    trains on a GPU and the cores are otherwise idle; the loop waits while they draw), at most the CPUs per rank, and
    none (draw in this process) where new processes are not forked: a spawned worker re-imports
    torch and the script every epoch, which costs more than it saves (Windows, macOS)."""
    import multiprocessing
    if sys.platform == "win32" or multiprocessing.get_start_method(allow_none=False) != "fork":
        return 0
    per_rank = max(1, (os.cpu_count() or 1) // max(1, world_size))
    if device_type == "cuda":
        return min(FRESH_WORKERS_GPU, per_rank)
    return min(FRESH_WORKERS, per_rank)


@dataclass
class ClassifierTrainSettings:
    """Stage 1's training settings (the script's constants of the same names, lower-case)."""

    out_dir: str                 # checkpoints, metrics and TensorBoard go here
    epochs: int = 2              # passes over the training split
    batch_size: int = 64         # images per micro-batch (per process under DDP)
    accum_steps: int = 1         # micro-batches per optimiser step
    lr: float = 5e-3             # peak AdamW learning rate
    weight_decay: float = 0.05   # AdamW weight decay (weights only)
    warmup_fraction: float = 0.1  # share of steps warming up, then cosine
    label_smoothing: float = 0.1  # cross-entropy label smoothing
    grad_clip: float = 1.0       # max gradient norm (0 = off)
    augment: bool = False        # batched affine / flip / stroke thickness
    synthetic_fresh: bool = False  # synthetic only: new training sketches each epoch after the first
    amp: str = "auto"            # autocast mode (see distributed.amp_dtype)
    channels_last: bool = True   # channels_last memory format
    max_batches: int = 0         # cap on batches per epoch (0 = full epoch)
    tensorboard: bool = True     # TensorBoard logs in out_dir/tb
    seed: int = 0                # batch order and augmentation draws
    config: dict = field(default_factory=dict)  # the effective config, recorded in checkpoints

    @classmethod
    def from_config(cls, cfg: dict, augment: bool) -> "ClassifierTrainSettings":
        """Pick this record's fields from a script config (UPPER_CASE keys)."""
        values = {f.name: cfg[f.name.upper()] for f in fields(cls) if f.name.upper() in cfg}
        return cls(**{**values, "augment": augment, "config": dict(cfg)})


@dataclass
class ClassifierData:
    """What a run trains on: the images, the split (dataset indices) and the preprocessing."""

    imageset: data.ImageSet
    split: dict[str, np.ndarray]
    prep: dict


def resolve_augment(value, dataset: str) -> bool:
    """Resolve AUGMENT. ``auto`` augments real sketches but not the synthetic set, which
    already draws every sample with fresh rotation, scale, position and stroke width:
    there extra augmentation only slows learning (measured on the quadrants style, 3 epochs
    of 250 per class: test accuracy 0.970 with it, 0.997 without; part AUROC 0.895 against
    0.936; the varied style draws still more variety itself)."""
    text = str(value).strip().lower()
    if text == "auto":
        return dataset != "synthetic"
    if text in ("true", "on", "1", "yes"):
        return True
    if text in ("false", "off", "0", "no"):
        return False
    raise UserError(f"AUGMENT must be auto, True or False, got {value!r}")


def make_classifier_optimizer(model: nn.Module, lr: float, weight_decay: float, device) -> torch.optim.AdamW:
    """AdamW with weight decay on weights only (not on biases and BatchNorm parameters)."""
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    # the fused kernel updates all tensors at once: about half the step time of foreach on CPU
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=lr,
                             fused=torch.device(device).type in ("cpu", "cuda"))


def make_grad_scaler(device: torch.device, amp: str) -> torch.amp.GradScaler:
    """fp16 needs loss scaling; bf16 and fp32 do not (the scaler is then a pass-through)."""
    return torch.amp.GradScaler(device.type, enabled=amp_dtype(device, amp) == torch.float16)


def new_split(imageset: data.ImageSet, val_fraction: float, test_fraction: float, seed: int,
              image_size: int) -> tuple[dict, dict]:
    """A fresh stratified split and the preprocessing measured on its training part."""
    labels = np.asarray(imageset.labels)
    counts = np.bincount(labels, minlength=len(imageset.class_names))
    named = lambda small: some(f"{imageset.class_names[c]} ({counts[c]})" for c in small)  # noqa: E731
    too_few = np.flatnonzero(counts < 3)
    if len(too_few):  # such a class never reaches val or test: trained on, never measured, without a word
        raise UserError(f"every class needs at least 3 images (one each for train, val and test); "
                        f"{named(too_few)} {'has' if len(too_few) == 1 else 'have'} fewer: add images or remove "
                        "the class (for synthetic data: --synthetic_per_class >= 3)")
    few = np.flatnonzero(counts < 10)
    if len(few):
        log(f"warning: {named(few)} {'has' if len(few) == 1 else 'have'} under 10 images: one or two in each "
            "of val and test, and little to train on")
    split = data.stratified_split(imageset.labels, val_fraction, test_fraction, seed)
    untrained = np.flatnonzero(np.bincount(labels[split["train"]], minlength=len(counts)) == 0)
    if len(untrained):  # large fractions on a small class (0.45 + 0.45 of 4 images) hold out all of it
        raise UserError(f"VAL_FRACTION={val_fraction} and TEST_FRACTION={test_fraction} leave no training image for "
                        f"{named(untrained)}: lower them or add images")
    mean, std = data.ink_mean_std(imageset.images, split["train"])
    return split, {"image_size": image_size, "mean": mean, "std": std, "ink": True}


# ----------------------------------------------------------------------------- train / eval
def train_epoch(model, optimizer, scaler, loader, *, settings: ClassifierTrainSettings, prep: dict,
                runtime: Runtime, state: TrainState, total_steps: int, generator: torch.Generator,
                bar=None) -> tuple[float, float, int]:
    """One pass over ``loader``; advances ``state.step``; returns (mean loss, accuracy, images)."""
    model.train()
    optimizer.zero_grad(set_to_none=True)  # an epoch's leftover micro-batches (not a full ACCUM_STEPS) are dropped
    criterion = nn.CrossEntropyLoss(label_smoothing=settings.label_smoothing)
    loss_sum = torch.zeros((), device=runtime.device)
    correct = torch.zeros((), device=runtime.device)
    seen = 0
    for i, (xb, yb, _) in enumerate(loader):
        x = data.model_input(xb, prep, runtime.device, settings.augment, generator, settings.channels_last)
        y = yb.to(runtime.device, non_blocking=True)
        stepping = (i + 1) % settings.accum_steps == 0
        # DDP all-reduces at every backward: only a step's last micro-batch needs it (the others accumulate)
        local = model.no_sync() if not stepping and hasattr(model, "no_sync") else contextlib.nullcontext()
        with local:
            with autocast(runtime.device, settings.amp):
                logits = model(x)
                loss = criterion(logits.float(), y)
            scaler.scale(loss / settings.accum_steps).backward()
        if stepping:
            for group in optimizer.param_groups:
                group["lr"] = lr_at(state.step, total_steps, settings.lr, settings.warmup_fraction)
            if settings.grad_clip > 0:
                scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            state.step += 1
        loss_sum += loss.detach() * len(y)
        correct += (logits.argmax(1) == y).sum()
        seen += len(y)
        if bar is not None:
            bar.update(len(y) * runtime.world_size)
            if i % 10 == 0:
                bar.set_postfix(loss=f"{loss.item():.3f}")
    # every rank's images, as validation counts them (rank 0's shard alone was logged before)
    totals = all_reduce_sum(torch.stack([loss_sum.float(), correct.float(),
                                         torch.tensor(float(seen), device=runtime.device)]), runtime)
    return totals[0].item() / max(1.0, totals[2].item()), totals[1].item() / max(1.0, totals[2].item()), seen


@torch.no_grad()
def evaluate(model, images: np.ndarray, labels: np.ndarray, indices: np.ndarray, prep: dict, runtime: Runtime, *,
             amp: str = "auto", channels_last: bool = True, batch_size: int = 256) -> dict:
    """Loss, accuracy and layer4 statistics on ``indices`` (sharded across ranks)."""
    net = model.module if hasattr(model, "module") else model
    net.eval()
    for buffer in net.buffers():  # DDP: each rank's last forward moved its own BatchNorm statistics; score rank 0's
        broadcast(buffer, runtime)
    shard = indices[runtime.rank::runtime.world_size]
    totals = torch.zeros(5, dtype=torch.float64, device=runtime.device)  # loss, correct, n, feat sum, zeros
    for xb, yb, _ in data.batches(images, labels, shard, batch_size):
        x = data.model_input(xb, prep, runtime.device, channels_last=channels_last)
        y = yb.to(runtime.device)
        with autocast(runtime.device, amp):
            feats = net.features(x)
            logits = net.head(feats).float()
        totals[0] += nn.functional.cross_entropy(logits, y, reduction="sum").double()
        totals[1] += (logits.argmax(1) == y).sum()
        totals[2] += len(y)
        totals[3] += feats.float().mean(dim=(1, 2, 3)).sum().double()
        totals[4] += (feats <= 0).float().mean(dim=(1, 2, 3)).sum().double()
    all_reduce_sum(totals, runtime)
    n = max(1.0, totals[2].item())
    return {"loss": totals[0].item() / n, "accuracy": totals[1].item() / n, "n": int(totals[2].item()),
            "layer4_mean": totals[3].item() / n, "layer4_zero_fraction": totals[4].item() / n}


def augment_generator(seed: int, epoch: int, rank: int) -> torch.Generator:
    """The augmentation draws of one epoch on one rank, seeded from (seed, epoch, rank).

    Seeded per epoch, like the batch order, so a resumed run draws exactly what the
    uninterrupted run would have drawn.
    """
    return torch.Generator().manual_seed(int(np.random.SeedSequence([seed, epoch, rank]).generate_state(1)[0]))


# ----------------------------------------------------------------------------- checkpoints
def save_checkpoints(model, optimizer, scaler, state: TrainState, run: ClassifierData,
                     settings: ClassifierTrainSettings, is_best: bool) -> None:
    """best.pt when ``is_best``; last.pt every epoch, with optimiser, scaler and loop state."""
    net = model.module if hasattr(model, "module") else model
    imageset = run.imageset
    ckpt = artifacts.classifier_checkpoint(
        net, arch=classifier_arch(net), preprocess=run.prep, dataset=imageset.spec, split=run.split,
        class_names=imageset.class_names, config=settings.config, epoch=state.epoch, metrics=state.history[-1],
        skipped=imageset.skipped)
    out = Path(settings.out_dir)
    if is_best:
        artifacts.save_checkpoint(ckpt, out / artifacts.BEST_CLASSIFIER)
    ckpt.update(state.to_checkpoint(), optimizer=optimizer.state_dict(), scaler=scaler.state_dict(),
                torch_rng=torch.get_rng_state())
    artifacts.save_checkpoint(ckpt, out / artifacts.LAST_CLASSIFIER)


SCHEDULE_KEYS = ("BATCH_SIZE", "ACCUM_STEPS", "MAX_BATCHES", "WORLD_SIZE")  # what fixes the steps per epoch


def resume_point(path: str | Path, spec: dict, layer4_stride: int, schedule: dict | None = None,
                 moved_to: str = "") -> dict:
    """Load ``last.pt`` to resume; refuse it when the current settings name other data, another stride or
    other steps per epoch (the learning-rate schedule), naming every flag to resume with in one message.

    The dataset and split come from the checkpoint: training on with the same split but
    other images would silently mix two datasets. The stride changes no weight shape, so
    a mismatch would load silently and train another network: refuse it too. The data is
    read where the checkpoint says, or at ``moved_to`` (an explicit DATA_ROOT: the folder
    moved; :func:`data.load_dataset` then checks that it holds the same images).
    """
    artifacts.require_resumable(path)
    ckpt = artifacts.load_checkpoint(path, "classifier")
    saved, differ = ckpt["dataset"], []  # every setting that must change, named in one message
    had, want = _data_identity(saved), _data_identity(spec)
    if had != want:
        if _data_flags(saved) == _data_flags(spec):  # nothing a flag can change (the synthetic generator's version)
            changed = sorted(k for k in {**had, **want} if had.get(k) != want.get(k))
            raise UserError(f"{path} was trained on data that differs from this code's in {', '.join(changed)}; "
                            "start a new run with --overwrite=True")
        differ.append((f"on {_describe(saved)} but the settings name {_describe(spec)}", _data_flags(saved)))
    saved_stride = ckpt["arch"].get("layer4_stride", 2)
    if saved_stride != layer4_stride:
        differ.append((f"with LAYER4_STRIDE={saved_stride}", f"--layer4_stride={saved_stride}"))
    changes = artifacts.schedule_changes(ckpt.get("config") or {}, schedule or {})
    if changes:
        differ.append((f"with {', '.join(what for what, _ in changes)}, which set its learning-rate schedule",
                       " ".join(flag for _, flag in changes)))
    if differ:
        raise UserError(f"{path} was trained {'; and '.join(what for what, _ in differ)}; resume with "
                        f"{' '.join(flag for _, flag in differ)}, or start a new run with --overwrite=True")
    if moved_to and str(Path(moved_to).resolve()) != str(Path(saved.get("data_root") or moved_to).resolve()):
        if "items_digest" not in saved:  # no record of its images: another folder could not be checked
            raise UserError(f"{path} predates the record of which images it was trained on, so it resumes only "
                            f"from {saved.get('data_root')}; start a new run with --overwrite=True to use {moved_to}")
        ckpt["dataset"] = data.relocate(saved, moved_to)
    return ckpt


# what identifies a run's data beyond the settings: checked when the data loads, never named to the user
_LOAD_CHECKS = ("items_digest", "items_count", "files_digest", "files_count", "files_unread")


def _data_identity(spec: dict) -> dict:
    """The settings that name a run's data, less its folder (a resume may read it where it moved)."""
    out = {k: v for k, v in spec.items() if k not in _LOAD_CHECKS and k != "data_root"}
    if spec.get("dataset") == "synthetic":  # a spec from before the style setting was drawn in the legacy style
        out["style"] = synthetic.spec_style(spec)
    return out


def _data_flags(spec: dict) -> str:
    """The flags that name ``spec``'s data, to repeat when resuming."""
    flags = [f"--dataset={spec['dataset']}", f"--image_size={spec['image_size']}"]
    if spec["dataset"] == "synthetic":
        flags += [f"--synthetic_per_class={spec.get('per_class')}", f"--synthetic_style={synthetic.spec_style(spec)}",
                  f"--seed={spec.get('seed', 0)}"]
    return " ".join(flags)


def _describe(spec: dict) -> str:
    extra = "".join(f", {k}={spec[k]}" for k in sorted(spec)
                    if k not in ("dataset", "data_root", "image_size", *_LOAD_CHECKS))
    return f"{spec['dataset']} ({spec.get('data_root') or 'built in'}, {spec['image_size']} px{extra})"


def restore(ckpt: dict, model, optimizer, scaler) -> tuple[TrainState, dict, dict]:
    """Load a ``last.pt`` dict into model, optimiser and scaler; returns (loop state, split, preprocessing)."""
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    if ckpt["scaler"] and scaler.is_enabled():  # empty when saved by a disabled (bf16/fp32) scaler
        scaler.load_state_dict(ckpt["scaler"])
    torch.set_rng_state(ckpt["torch_rng"])
    split = {k: v.numpy() for k, v in ckpt["split"].items()}
    return TrainState.from_checkpoint(ckpt), split, ckpt["preprocess"]


# ----------------------------------------------------------------------------- the loop
def epoch_batches(n_train: int, s: ClassifierTrainSettings, world_size: int) -> int:
    """Micro-batches per epoch and rank (full batches only, capped by MAX_BATCHES).

    Raises
    ------
    UserError
        The training split cannot fill one optimiser step (BATCH_SIZE x ACCUM_STEPS) per rank.
    """
    n = n_train // world_size // s.batch_size
    n = n if s.max_batches <= 0 else min(s.max_batches, n)
    if n < s.accum_steps:
        fits = n_train // world_size // s.accum_steps  # the largest BATCH_SIZE that makes one step
        advice = (f"lower --batch_size to {fits} or less (--batch_size={data.few_steps_batch_size(fits)} makes "
                  "about four steps per epoch)" if fits >= 2 else "add images or lower ACCUM_STEPS")
        if 0 < s.max_batches < s.accum_steps:
            advice = "raise MAX_BATCHES to ACCUM_STEPS or more"
        raise UserError(f"the training split has {n_train} images ({world_size} process(es), MAX_BATCHES="
                        f"{s.max_batches}): too few for one optimiser step of BATCH_SIZE={s.batch_size} x "
                        f"ACCUM_STEPS={s.accum_steps}; {advice}")
    return n


FEW_STEPS = 20  # optimiser steps per epoch below which the log suggests a smaller BATCH_SIZE
SMALL_SPLIT = 100  # val/test images below which the final accuracies are given as counts too


def steps_note(n_train: int, batches_per_epoch: int, s: ClassifierTrainSettings, world_size: int) -> str:
    """The epoch's step count, and what full batches (drop_last) leave out: on small data the
    default BATCH_SIZE gave 1 step an epoch with a third of the training images sitting out."""
    steps, used = batches_per_epoch // s.accum_steps, batches_per_epoch * s.batch_size * world_size
    note = f"{steps} optimiser steps per epoch (BATCH_SIZE={s.batch_size} x ACCUM_STEPS={s.accum_steps})"
    if n_train - used > 0.1 * n_train:
        why = f"MAX_BATCHES={s.max_batches}" if s.max_batches > 0 else "full batches only"
        note += f"; {n_train - used} of {n_train} training images sit out each epoch ({why})"
    if steps < FEW_STEPS:  # at BATCH_SIZE 2 (BatchNorm's floor) only more epochs help
        note += ("; few steps: a smaller --batch_size learns more per epoch" if s.batch_size > 2 else
                 "; few steps: more --epochs (or more images) let it learn more")
    return note


def beats_every_epoch(val: dict, history: list[dict]) -> bool:
    """Whether this epoch's validation is better than every earlier epoch's: higher accuracy, ties broken by
    lower loss. Accuracy alone kept the first epoch to reach a tie: a 36-image validation split reached 1.0
    at epoch 5, and that best.pt tested 0.944 against the last epoch's 1.000."""
    if not history:
        return True
    best = max(history, key=lambda row: (row["val_accuracy"], -row["val_loss"]))
    return (val["accuracy"], -val["loss"]) > (best["val_accuracy"], -best["val_loss"])


def fit(model, optimizer, scaler, run: ClassifierData, state: TrainState, settings: ClassifierTrainSettings,
        runtime: Runtime) -> dict:
    """The epoch loop: train, validate, checkpoint; then test the best model (see :func:`finish`)."""
    s, split, imageset = settings, run.split, run.imageset
    batches_per_epoch = epoch_batches(len(split["train"]), s, runtime.world_size)
    total_steps = max(1, s.epochs * (batches_per_epoch // s.accum_steps))
    writer = artifacts.open_tensorboard(s.out_dir, s.tensorboard, state.epoch + 1) if runtime.is_main else None
    runtime.log(f"{len(imageset)} images, {len(imageset.class_names)} classes, split "
                f"{len(split['train'])}/{len(split['val'])}/{len(split['test'])}, {runtime.describe()}, "
                f"{precision_note(runtime.device, s.amp)}, "
                f"augment {'on' if s.augment else 'off'}"
                f"{', fresh sketches each epoch' if s.synthetic_fresh and imageset.origins else ''}")
    runtime.log(steps_note(len(split["train"]), batches_per_epoch, s, runtime.world_size))
    for epoch in range(state.epoch + 1, s.epochs + 1):
        t0 = time.time()
        order = np.random.default_rng([s.seed, epoch]).permutation(split["train"])
        shard = order[runtime.rank::runtime.world_size][:batches_per_epoch * s.batch_size]
        images, labels, rows = epoch_images(imageset, shard, epoch, s.synthetic_fresh,
                                            fresh_workers(runtime.world_size, runtime.device.type))
        loader = data.batches(images, labels, rows, s.batch_size, drop_last=True)
        bar = tqdm(total=len(shard) * runtime.world_size, desc=f"epoch {epoch}/{s.epochs}", unit="img",
                   disable=None if runtime.is_main else True, leave=False)
        loss, acc, seen = train_epoch(model, optimizer, scaler, loader, settings=s, prep=run.prep, runtime=runtime,
                                      state=state, total_steps=total_steps,
                                      generator=augment_generator(s.seed, epoch, runtime.rank), bar=bar)
        bar.close()
        speed = seen * runtime.world_size / (time.time() - t0)
        val = evaluate(model, imageset.images, imageset.labels, split["val"], run.prep, runtime, amp=s.amp,
                       channels_last=s.channels_last)
        is_best = beats_every_epoch(val, state.history)
        state.best, state.epoch = max(state.best, val["accuracy"]), epoch
        lr = optimizer.param_groups[0]["lr"]
        state.history.append({"epoch": epoch, "train_loss": loss, "train_accuracy": acc, "val_loss": val["loss"],
                              "val_accuracy": val["accuracy"], "lr": lr, "images_per_s": speed,
                              "seconds": time.time() - t0})
        if writer is not None:
            _log_tensorboard(writer, state.history[-1], val, epoch)
        if runtime.is_main:
            save_checkpoints(model, optimizer, scaler, state, run, s, is_best)
            artifacts.drop_replaced(s.out_dir)  # a run --overwrite moved aside goes once this one has a checkpoint
        barrier(runtime)
        runtime.log(f"epoch {epoch}/{s.epochs} train_loss {loss:.4f} train_acc {acc:.4f} val_loss {val['loss']:.4f} "
                    f"val_acc {val['accuracy']:.4f} lr {lr:.2e} {speed:.0f} img/s "
                    f"{time.time() - t0:.1f}s{' *best*' if is_best else ''}")  # after the save: Ctrl-C now keeps it
    if writer is not None:
        writer.close()
    return finish(run, state, settings, runtime)


def epoch_images(imageset: data.ImageSet, shard: np.ndarray, epoch: int, fresh: bool,
                 workers: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """What epoch ``epoch`` trains on: the cached images, or fresh drawings of the same classes.

    Parameters
    ----------
    imageset : data.ImageSet
        The dataset; only a synthetic one (with ``origins``) can be drawn anew.
    shard : np.ndarray
        This rank's training indices for the epoch, in batch order.
    epoch : int
        1-based; epoch 1 always reads the cache.
    fresh : bool
        ``SYNTHETIC_FRESH``: from epoch 2 on, draw round ``epoch - 1`` of
        :func:`synthetic.fresh_sketches`, sample indices strided past the dataset's largest.
    workers : int
        Drawing processes (:func:`fresh_workers`). Drawing the next epoch in the background
        while this one trains saved nothing on 2 saturated cores (18.5 s per epoch either way).

    Returns
    -------
    (images, labels, rows) for :func:`data.batches`: ``images[rows[k]]`` is of class ``labels[rows[k]]``.
    """
    if not fresh or epoch < 2 or not imageset.origins:
        return imageset.images, imageset.labels, shard
    spec = imageset.spec
    stride = max(j for _, j in imageset.origins) + 1   # past every sample the dataset holds
    drawn = synthetic.fresh_sketches([imageset.origins[i] for i in shard], epoch - 1, stride, spec["image_size"],
                                     seed=spec.get("seed", 0), style=synthetic.spec_style(spec), workers=workers)
    return drawn, np.asarray(imageset.labels)[shard], np.arange(len(shard))


def finish(run: ClassifierData, state: TrainState, settings: ClassifierTrainSettings, runtime: Runtime) -> dict:
    """Test the best checkpoint and write metrics.json."""
    out = Path(settings.out_dir)
    model, ckpt = artifacts.load_classifier(out / artifacts.BEST_CLASSIFIER, runtime.device)
    if settings.channels_last:
        model = model.to(memory_format=torch.channels_last)
    imageset, split = run.imageset, run.split
    val, test = (evaluate(model, imageset.images, imageset.labels, split[name], run.prep, runtime, amp=settings.amp,
                          channels_last=settings.channels_last) for name in ("val", "test"))
    metrics = {"val_accuracy": val["accuracy"], "test_accuracy": test["accuracy"], "val_loss": val["loss"],
               "test_loss": test["loss"], "best_epoch": ckpt["epoch"], "epochs": state.epoch,
               "num_classes": len(imageset.class_names), "num_images": len(imageset),
               "split_sizes": {k: len(v) for k, v in split.items()}, "skipped_images": imageset.skipped,
               "history": state.history, "fingerprint": ckpt["fingerprint"],
               "world_size": runtime.world_size, "device": str(runtime.device)}
    if runtime.is_main:
        artifacts.write_json(out / artifacts.METRICS, metrics)
    runtime.log(f"best epoch {ckpt['epoch']}: val_acc {accuracy_text(val['accuracy'], len(split['val']))} "
                f"test_acc {accuracy_text(test['accuracy'], len(split['test']))} -> {out / artifacts.BEST_CLASSIFIER}")
    return metrics


def accuracy_text(accuracy: float, n_images: int) -> str:
    """``0.9944``, or ``0.5000 (1 of 2 images)`` on a split under SMALL_SPLIT images: four decimals of two
    images read like a measurement."""
    if n_images >= SMALL_SPLIT:
        return f"{accuracy:.4f}"
    return f"{accuracy:.4f} ({round(accuracy * n_images)} of {n_images} images)"


def _log_tensorboard(writer, row: dict, val: dict, epoch: int) -> None:
    writer.add_scalar("loss/train", row["train_loss"], epoch)
    writer.add_scalar("loss/val", row["val_loss"], epoch)
    writer.add_scalar("accuracy/train", row["train_accuracy"], epoch)
    writer.add_scalar("accuracy/val", row["val_accuracy"], epoch)
    writer.add_scalar("lr", row["lr"], epoch)
    writer.add_scalar("layer4/mean", val["layer4_mean"], epoch)
    writer.add_scalar("layer4/zero_fraction", val["layer4_zero_fraction"], epoch)
    writer.flush()
