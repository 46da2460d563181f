"""Benchmark: stage 1's training loop against a bare model step, side by side.

The loop (train_standard_cnn.train_epoch: cache reads, batched augmentation,
standardisation, autocast, clipping, LR schedule) is timed against a bare
forward/backward/AdamW step on a synthetic tensor of the same batch, size and
precision. Rounds alternate so machine noise hits both alike.

Usage: python bench/bench_train.py [--image_size=64] [--batch_size=64] [--steps=20] [--amp=auto] [--device=cpu]
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train_standard_cnn as stage1  # noqa: E402
from selfexplain import data  # noqa: E402
from sections import write_section  # noqa: E402
from selfexplain.config import make_config, module_constants, run_cli  # noqa: E402
from selfexplain.distributed import Runtime, amp_dtype, autocast, resolve_device  # noqa: E402
from selfexplain.model import SketchResNet  # noqa: E402

IMAGE_SIZE = 64        # input side (the demo's)
BATCH_SIZE = 64        # images per step (the demo trains with 32; the ratio is what is judged)
STEPS = 20             # timed steps per round
ROUNDS = 3             # alternating rounds; the best of each side is kept
AMP = "auto"           # precision, as in stage 1
DEVICE = "cpu"         # cpu | cuda | auto (bench/cuda_check.py runs it on a GPU)
CACHE_DIR = "cache"    # image cache for the loop's real data
OUT = "bench/results/train.md"  # markdown section written here


def sync(device) -> None:
    if device.type == "cuda":  # CUDA runs asynchronously: wait before reading the clock
        torch.cuda.synchronize(device)


def bare_rate(model, optimizer, batch, size, steps, device, amp) -> float:
    x = torch.randn(batch, 1, size, size, device=device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, model.num_classes, (batch,), device=device)
    # fp16 needs loss scaling, as in the loop; bf16/fp32 pass through
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype(device, amp) == torch.float16)
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        with autocast(device, amp):
            loss = nn.functional.cross_entropy(model(x).float(), y)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
    sync(device)
    return batch * steps / (time.perf_counter() - start)


def loop_rate(model, optimizer, imageset, cfg, prep, steps, seed, device) -> float:
    order = np.random.default_rng(seed).permutation(len(imageset))[: steps * cfg.BATCH_SIZE]
    loader = data.batches(imageset.images, imageset.labels, order, cfg.BATCH_SIZE, drop_last=True)
    runtime = Runtime(device=device)
    sync(device)
    start = time.perf_counter()
    _, _, seen, _ = stage1.train_epoch(model, optimizer, loader, cfg, prep, runtime, 0, 10 * steps,
                                       torch.Generator().manual_seed(seed))
    sync(device)
    return seen / (time.perf_counter() - start)


def main(**overrides) -> dict:
    b = make_config(module_constants(globals()), overrides)
    cfg = make_config(module_constants(vars(stage1)), {"image_size": b.IMAGE_SIZE, "batch_size": b.BATCH_SIZE,
                                                       "amp": b.AMP, "cache_dir": b.CACHE_DIR})
    imageset = data.load_dataset(stage1.build_spec(cfg), cfg.CACHE_DIR)
    prep = {"mean": 0.1, "std": 0.25}
    device = resolve_device(b.DEVICE)
    model = SketchResNet(len(imageset.class_names)).to(device, memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    bare_rate(model, optimizer, b.BATCH_SIZE, b.IMAGE_SIZE, 3, device, b.AMP)  # warm-up
    loop_rate(model, optimizer, imageset, cfg, prep, 2, 99, device)
    bare, loop = [], []
    for r in range(b.ROUNDS):
        bare.append(bare_rate(model, optimizer, b.BATCH_SIZE, b.IMAGE_SIZE, b.STEPS, device, b.AMP))
        loop.append(loop_rate(model, optimizer, imageset, cfg, prep, b.STEPS, r, device))
        print(f"round {r + 1}: bare {bare[-1]:.1f} img/s, loop {loop[-1]:.1f} img/s")
    ratio = max(loop) / max(bare)
    dtype = amp_dtype(device, b.AMP)
    where = (f"GPU {torch.cuda.get_device_name(device)}" if device.type == "cuda"
             else f"CPU {torch.get_num_threads()} threads")
    lines = [f"## Stage 1: training loop vs bare step ({device.type})", "",
             f"ResNet-18, {b.IMAGE_SIZE} px, batch {b.BATCH_SIZE}, {dtype or 'fp32'}, channels_last, "
             f"{b.STEPS} steps x {b.ROUNDS} alternating rounds, best of each, {where}.", "",
             "| | images/s |", "|---|---|",
             f"| bare step (synthetic tensors) | {max(bare):.1f} |",
             f"| training loop (cache, augment, schedule, clip) | {max(loop):.1f} |",
             f"| loop / bare | **{ratio:.2f}** (target >= 0.85) |"]
    # Why AMP=auto picks what it picks: the bare step in the other precisions beside it.
    names = {"off": "fp32", "bf16": "bf16", "fp16": "fp16"}
    others = [m for m in names if amp_dtype(device, m) != dtype]
    if device.type == "cpu":
        others = others[:1] if dtype is None else ["off"]  # one slow emulated precision is enough
    steps = 3 if device.type == "cpu" else b.STEPS
    for mode in others:
        bare_rate(model, optimizer, b.BATCH_SIZE, b.IMAGE_SIZE, 2, device, mode)  # warm-up
        rate = bare_rate(model, optimizer, b.BATCH_SIZE, b.IMAGE_SIZE, steps, device, mode)
        print(f"bare step with {names[mode]}: {rate:.1f} img/s")
        lines.append(f"| bare step in {names[mode]} ({steps} steps, for the AMP=auto choice) | {rate:.1f} |")
    lines.append("")
    write_section(b.OUT, lines)
    return {"bare": max(bare), "loop": max(loop), "ratio": ratio}


if __name__ == "__main__":
    run_cli(main, globals())
