"""Benchmark: stage 1's training loop against a bare model step, side by side.

The loop (train_standard_cnn.train_epoch: cache reads, batched augmentation,
standardisation, autocast, clipping, LR schedule) is timed against a bare
forward/backward/AdamW step on a synthetic tensor of the same batch, size and
precision. Rounds alternate so machine noise hits both alike.

Usage: python bench/bench_train.py [--image_size=64] [--batch_size=64] [--steps=20] [--amp=auto]
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
from selfexplain.distributed import Runtime, amp_dtype, autocast  # noqa: E402
from selfexplain.model import SketchResNet  # noqa: E402

IMAGE_SIZE = 64        # input side (the demo's)
BATCH_SIZE = 64        # images per step (the demo trains with 32; the ratio is what is judged)
STEPS = 20             # timed steps per round
ROUNDS = 3             # alternating rounds; the best of each side is kept
AMP = "auto"           # precision, as in stage 1
CACHE_DIR = "cache"    # image cache for the loop's real data
OUT = "bench/results/train.md"  # markdown section written here


def bare_rate(model, optimizer, batch, size, steps, device, amp) -> float:
    x = torch.randn(batch, 1, size, size).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, model.num_classes, (batch,))
    start = time.perf_counter()
    for _ in range(steps):
        with autocast(device, amp):
            loss = nn.functional.cross_entropy(model(x).float(), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return batch * steps / (time.perf_counter() - start)


def loop_rate(model, optimizer, imageset, cfg, prep, steps, seed) -> float:
    order = np.random.default_rng(seed).permutation(len(imageset))[: steps * cfg.BATCH_SIZE]
    loader = data.batches(imageset.images, imageset.labels, order, cfg.BATCH_SIZE, drop_last=True)
    runtime = Runtime(device=torch.device("cpu"))
    start = time.perf_counter()
    _, _, seen, _ = stage1.train_epoch(model, optimizer, loader, cfg, prep, runtime, 0, 10 * steps,
                                       torch.Generator().manual_seed(seed))
    return seen / (time.perf_counter() - start)


def main(**overrides) -> dict:
    b = make_config(module_constants(globals()), overrides)
    cfg = make_config(module_constants(vars(stage1)), {"image_size": b.IMAGE_SIZE, "batch_size": b.BATCH_SIZE,
                                                       "amp": b.AMP, "cache_dir": b.CACHE_DIR})
    imageset = data.load_dataset(stage1.build_spec(cfg), cfg.CACHE_DIR)
    prep = {"mean": 0.1, "std": 0.25}
    device = torch.device("cpu")
    model = SketchResNet(len(imageset.class_names)).to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    bare_rate(model, optimizer, b.BATCH_SIZE, b.IMAGE_SIZE, 2, device, b.AMP)  # warm-up
    bare, loop = [], []
    for r in range(b.ROUNDS):
        bare.append(bare_rate(model, optimizer, b.BATCH_SIZE, b.IMAGE_SIZE, b.STEPS, device, b.AMP))
        loop.append(loop_rate(model, optimizer, imageset, cfg, prep, b.STEPS, r))
        print(f"round {r + 1}: bare {bare[-1]:.1f} img/s, loop {loop[-1]:.1f} img/s")
    ratio = max(loop) / max(bare)
    dtype = amp_dtype(device, b.AMP)
    # Why AMP=auto means fp32 on CPUs without native bf16: measure bf16 autocast beside it.
    other = "fp32" if dtype is not None else "bf16"
    other_rate = bare_rate(model, optimizer, b.BATCH_SIZE, b.IMAGE_SIZE, 3, device, "off" if other == "fp32" else "bf16")
    print(f"bare step with {other}: {other_rate:.1f} img/s")
    lines = ["## Stage 1: training loop vs bare step", "",
             f"ResNet-18, {b.IMAGE_SIZE} px, batch {b.BATCH_SIZE}, {dtype or 'fp32'}, channels_last, "
             f"{b.STEPS} steps x {b.ROUNDS} alternating rounds, best of each, CPU {torch.get_num_threads()} threads.", "",
             "| | images/s |", "|---|---|",
             f"| bare step (synthetic tensors) | {max(bare):.1f} |",
             f"| training loop (cache, augment, schedule, clip) | {max(loop):.1f} |",
             f"| loop / bare | **{ratio:.2f}** (target >= 0.85) |",
             f"| bare step in {other} (3 steps, for the AMP=auto choice) | {other_rate:.1f} |", ""]
    write_section(b.OUT, lines)
    return {"bare": max(bare), "loop": max(loop), "ratio": ratio}


if __name__ == "__main__":
    run_cli(main, globals())
