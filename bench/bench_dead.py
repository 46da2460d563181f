"""Benchmark: TopK vs BatchTopK on the demo tokens, and dead latents on an image folder nobody tuned for.

Usage
-----
    python bench/bench_dead.py                                              # demo classifier only
    python bench/make_standin.py --out=bench/_work/standin25 --classes=25 --per_class=70
    python train_standard_cnn.py --dataset=parquet --data_root=bench/_work/standin25 --image_size=96 \
        --layer4_stride=2 --epochs=3 --out_dir=runs/standin25_cnn
    python bench/bench_dead.py --folder_ckpt=runs/standin25_cnn/best.pt     # + the folder rows

Every SAE trains with stage 2's own loop (``sae_train.fit``) and ``train_sae.py``'s defaults
on one token cache per classifier. Each row is then re-measured from the last checkpoint
with the inference code on every train and validation token: FVU, mean L0 and "dead"
(a latent that fires on no token of the split; the split must hold at least 10·M/K
tokens for that to mean "used well below a tenth of the average rate", see
``sae_train.min_tokens_for_dead``). Prints a markdown table and writes bench/results/dead.md.
"""
from __future__ import annotations

import contextlib
import io
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import train_sae  # noqa: E402
from bench.sections import write_section  # noqa: E402
from selfexplain import artifacts  # noqa: E402
from selfexplain import sae_train as st  # noqa: E402
from selfexplain.artifacts import TrainState  # noqa: E402
from selfexplain.config import make_config, module_constants, run_cli  # noqa: E402
from selfexplain.distributed import Runtime, keep_freed_memory, set_threads  # noqa: E402

CLASSIFIER_CKPT = artifacts.CLASSIFIER_CKPT  # the demo classifier
FOLDER_CKPT = ""               # a classifier trained on an image folder (see the usage above); '' = skip those rows
CACHE_DIR = artifacts.CACHE_DIR  # decoded-image and token cache
LATENT_DIM = 512               # M on the demo tokens
FOLDER_LATENT_DIM = 256        # M on the folder tokens (issue 13: M=256, K=8 on ~12k tokens)
TOP_K = 8                      # K (mean L0 for batchtopk)
EPOCHS = 12                    # SAE epochs per row (train_sae.py's default)
ARCHS = ["topk", "batchtopk"]  # the sparsity rules compared
WORK_DIR = "bench/_work/dead"  # the rows' SAE run folders
OUT = "bench/results/dead.md"  # the markdown section (bench/run_all.py merges it into RESULTS.md)
NUM_THREADS = 0                # CPU threads (0 = torch default)
SEED = 0                       # SAE init and batch order


def stage2_defaults() -> dict:
    """train_sae.py's constants (dead-latent handling, AuxK weight, learning rate, ...): each row
    trains exactly as ``python train_sae.py`` would, not with the settings record's bare defaults."""
    return module_constants(vars(train_sae))


def train_row(model, tokens: st.SplitTokens, ckpt_path: str, arch: str, latent_dim: int, cfg,
              runtime: Runtime) -> dict:
    """Train one SAE with stage 2's loop; re-measure its last checkpoint on all train and val tokens."""
    out_dir = Path(cfg.WORK_DIR) / f"{Path(ckpt_path).parent.name}-{arch}-m{latent_dim}-k{cfg.TOP_K}"
    row = {"OUT_DIR": str(out_dir), "CLASSIFIER_CKPT": ckpt_path, "LATENT_DIM": latent_dim, "TOP_K": cfg.TOP_K,
           "ARCH": arch, "EPOCHS": cfg.EPOCHS, "TENSORBOARD": False, "SEED": cfg.SEED}
    settings = st.SAETrainSettings.from_config({**stage2_defaults(), **row})
    sae, usage_ema = st.new_sae(tokens, settings, runtime.device)
    optimizer = st.make_sae_optimizer(sae, settings.lr)
    t0 = time.time()
    with contextlib.redirect_stdout(io.StringIO()):  # the epoch log; the table is what this bench reports
        history = st.fit(sae, optimizer, usage_ema, model.head, tokens, TrainState(best=float("inf")), settings,
                         runtime)["history"]
    seconds = time.time() - t0
    last = artifacts.load_checkpoint(out_dir / artifacts.LAST_SAE, "sae")
    sae.load_state_dict(last["state"])
    train, val = (st.evaluate_sae(sae, model.head, store, tokens.labels, runtime) for store in (tokens.train,
                                                                                                   tokens.val))
    return {"arch": arch, "m": latent_dim, "val_fvu": val["fvu"], "val_l0": val["l0"], "train_l0": train["l0"],
            "dead_train": train["dead_fraction"], "dead_val": val["dead_fraction"], "n_train": train["n_tokens"],
            "n_val": val["n_tokens"], "resampled": sum(r["resampled"] for r in history), "seconds": seconds,
            "spliced": val["spliced_accuracy"], "own": val["classifier_accuracy"]}


def rows_for(ckpt_path: str, latent_dim: int, cfg, runtime: Runtime) -> list[dict]:
    model, clf = artifacts.load_classifier(ckpt_path, runtime.device)
    model = model.to(memory_format=torch.channels_last).requires_grad_(False)
    tokens = st.cache_split_tokens(model, clf, cfg.CACHE_DIR, runtime)
    data_name = f"{clf['dataset']['dataset']} {clf['preprocess']['image_size']} px, {tokens.train.hw[0]}x" \
                f"{tokens.train.hw[1]} map ({ckpt_path})"
    return [dict(train_row(model, tokens, ckpt_path, arch, latent_dim, cfg, runtime), data=data_name)
            for arch in cfg.ARCHS]


def render(rows: list[dict], cfg) -> list[str]:
    stage2 = stage2_defaults()
    lines = [f"## Dead latents, TopK vs BatchTopK (K={cfg.TOP_K}, {cfg.EPOCHS} epochs, CPU, "
             f"{torch.get_num_threads()} threads)", "",
             f"Stage 2's loop with `train_sae.py`'s defaults (dead latents: {stage2['DEAD_LATENTS']}, "
             f"AuxK weight {stage2['AUXK_COEF']}, DEAD_USAGE {stage2['DEAD_USAGE']}); "
             "figures re-measured from the last checkpoint "
             "with the inference code (batchtopk: the threshold θ) on every token of each split. Dead = fires on "
             "no token of the split (each split holds at least 10·M/K tokens).", "",
             "| data | ARCH | M | val FVU | mean L0 val (train) | dead train | dead val | train / val tokens "
             "| resampled | spliced acc (own) | s |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['data']} | {r['arch']} | {r['m']} | {r['val_fvu']:.4f} | {r['val_l0']:.2f} "
                     f"({r['train_l0']:.2f}) | {r['dead_train']:.1%} | {r['dead_val']:.1%} | {r['n_train']} / "
                     f"{r['n_val']} | {r['resampled']} | {r['spliced']:.3f} ({r['own']:.3f}) | {r['seconds']:.0f} |")
    return lines + [""]


def main(**overrides) -> list[dict]:
    cfg = make_config(module_constants(globals()), overrides)
    set_threads(cfg.NUM_THREADS)
    keep_freed_memory()
    runtime = Runtime(torch.device("cpu"))
    rows = rows_for(cfg.CLASSIFIER_CKPT, cfg.LATENT_DIM, cfg, runtime)
    if cfg.FOLDER_CKPT:
        rows += rows_for(cfg.FOLDER_CKPT, cfg.FOLDER_LATENT_DIM, cfg, runtime)
    write_section(cfg.OUT, render(rows, cfg))
    return rows


if __name__ == "__main__":
    run_cli(main, globals())
