"""Stage 2: train a BatchTopK (or Top-K) sparse autoencoder on the classifier's layer4 tokens.

Usage
-----
    python train_sae.py                                   # synthetic demo (reads runs/standard_cnn/best.pt)
    python train_sae.py --latent_dim=2048 --top_k=20 --batch_size=4096 --epochs=20   # TU-Berlin values
    python train_sae.py --arch=topk --dead_latents=both   # K per token, with resampling (default: batchtopk, auxk)
    python train_sae.py --resume=True                     # continue from OUT_DIR/last_sae.pt
    python train_sae.py --overwrite=True                  # replace the earlier run in OUT_DIR
    torchrun --nproc_per_node=4 train_sae.py              # DDP: tokens sharded across ranks

The frozen backbone runs once, in fp32: train and val tokens are cached as fp16 (in RAM, or as a
memory-mapped .npy in CACHE_DIR when larger than TOKEN_RAM_GB), then the SAE trains on
shuffled token batches. Tokens are standardised per channel (μ, σ over the training
split), s = W_e ã + b_e, z = TopK(ReLU(s)), â = D z + b_d with unit-norm decoder columns.
ARCH=batchtopk (the default) keeps the K·B largest codes of each training batch of B tokens
instead of K per token, and codes z = ReLU(s)·(s > θ) afterwards, θ estimated in training; the checkpoint
records ARCH (and θ), and every later stage uses that rule (``selfexplain/sae.py``).

Defaults are sized for the 64 px synthetic demo: a 4x4 layer4 map (LAYER4_STRIDE=1 in
stage 1), M=512 latents for 512 channels, K=8, 12 epochs. For TU-Berlin at 224 px use
M=2048, K=20 (density 0.01), BATCH_SIZE=4096, EPOCHS≈20. A small token set trains more
epochs than EPOCHS, until the run makes MIN_STEPS optimiser steps (``--min_steps=0``: exactly EPOCHS).

Dead latents: a latent's usage EMA tracks the share of tokens it fires on (time constant
USAGE_EMA_EPOCHS of an epoch); it is dead when the EMA falls below DEAD_USAGE x K/M.
"resample" re-initialises dead latents from badly reconstructed tokens at epoch ends;
"auxk" adds the AuxK loss (the top AUXK_K dead latents reconstruct the residual).
Reported dead fractions are stricter: latents that fire on no token of the split, on
train (during the epoch) and on validation, each split holding at least 10·M/K tokens
(``sae_train.min_tokens_for_dead``); both are in the epoch log and metrics.json.

Writes OUT_DIR/best_sae.pt (lowest validation FVU), last_sae.pt (every epoch, with
optimiser state), metrics.json, config.json and TensorBoard logs in OUT_DIR/tb.
"""
from __future__ import annotations

from pathlib import Path

import torch

from selfexplain import artifacts, data
from selfexplain import sae_train as st
from selfexplain.artifacts import TrainState, save_effective_config
from selfexplain.config import make_config, module_constants, require_ranges, run_cli
from selfexplain.distributed import (barrier, cleanup, exit_on_sigterm, keep_freed_memory, maybe_launch_torchrun,
                                     set_threads, setup_runtime)
from selfexplain.errors import UserError

# ----------------------------------------------------------------------------- config
CLASSIFIER_CKPT = artifacts.CLASSIFIER_CKPT  # stage-1 checkpoint (dataset, split, preprocessing come from it)
OUT_DIR = artifacts.SAE_DIR   # where checkpoints, metrics and logs go
CACHE_DIR = artifacts.CACHE_DIR  # decoded-image cache; token memmaps go under CACHE_DIR/sae_tokens
DATA_ROOT = ""  # the classifier's data, if it moved since stage 1 ('' = where stage 1 read it; the same images are required)
LATENT_DIM = 512               # M, number of latents (demo: 512 for 512 channels; TU-Berlin: 2048)
TOP_K = 8                      # K, active latents per token (demo; TU-Berlin: 20)
ARCH = "batchtopk"             # topk (K per token) | batchtopk (K·B per batch of B; threshold θ at inference)
THRESHOLD_RATE = 0.01          # batchtopk: EMA weight per step of the batch's smallest kept activation in θ
EPOCHS = 12                    # passes over the cached training tokens (demo: 12 x 92k tokens; 20 fit better on val but detect no better held out; 0: cache the tokens only)
MIN_STEPS = 2000               # ... more epochs when a small token set would make fewer optimiser steps (demo: 2,160)
BATCH_SIZE = 512               # tokens per optimiser step (per process under DDP; TU-Berlin: 4096)
LR = 2e-3                      # peak Adam learning rate
WARMUP_FRACTION = 0.05         # share of steps warming up linearly, then cosine to 0
DEAD_LATENTS = "auxk"          # resample | auxk | both | none
AUXK_K = 256                   # AuxK: dead latents used to reconstruct the residual (Gao et al.: C/2)
AUXK_COEF = 0.5                # AuxK loss weight (Gao et al. use 1/32; quadrants demo at DEAD_USAGE 0.01: 1/8 left 13.5% dead on val, 1/2 2.9%)
RESAMPLE_SAMPLE = 8192         # tokens scored when choosing where to resample
RESAMPLE_STOP = 0.95           # no resampling after this share of the epochs (let it settle; 0.8 left 9-11% dead)
USAGE_EMA_EPOCHS = 0.25        # usage EMA time constant, in epochs of training tokens
DEAD_USAGE = 0.05              # dead (AuxK target) when usage EMA < DEAD_USAGE x K/M (demo: 0.01 left 5.5-7.0% dead on val; use 0.01 at M/K >= 128)
TOKEN_RAM_GB = 4.0             # keep cached tokens in RAM up to this size, else memmap on disk
MAX_IMAGES = 0                 # cache tokens of a SEED-chosen subset of at most this many images per split (0 = all)
FEATURE_BATCH = 256            # images per backbone forward when caching tokens (always fp32, as stages 3-5 run it)
AMP = "auto"                   # SAE encoder matmul: auto | bf16 | fp16 | off (auto: fp32 on CPUs without native bf16)
DEVICE = "auto"                # auto | cpu | cuda
NUM_THREADS = 0                # CPU intra-op threads (0 = torch default)
RESUME = False                 # continue from OUT_DIR/last_sae.pt
OVERWRITE = False              # replace an earlier run in OUT_DIR (without it, or RESUME, an earlier run is refused)
TENSORBOARD = True             # write TensorBoard logs to OUT_DIR/tb
SEED = 0                       # seeds init, batch order and resampling
INIT = "random"                # random | channels (latent i < C starts as channel i; needs M >= C; README "INIT")


def main(**overrides) -> dict:
    cfg = make_config(module_constants(globals()), overrides)
    settings = st.SAETrainSettings.from_config(cfg)
    settings.check()
    require_ranges(cfg, {"SEED": (0, None), "THRESHOLD_RATE": (0, 1), "WARMUP_FRACTION": (0, 1), "AUXK_COEF": (0, None),
                         "DEAD_USAGE": (0, None), "RESAMPLE_STOP": (0, 1), "USAGE_EMA_EPOCHS": (0, None),
                         "NUM_THREADS": (0, None)})
    if cfg.FEATURE_BATCH < 1 or cfg.MAX_IMAGES < 0:
        raise UserError(f"need FEATURE_BATCH >= 1 and MAX_IMAGES >= 0, got {cfg.FEATURE_BATCH}, {cfg.MAX_IMAGES}")
    runtime = setup_runtime(cfg.DEVICE)
    settings.config["WORLD_SIZE"] = runtime.world_size  # fixes the steps per epoch: a resume must match it
    set_threads(cfg.NUM_THREADS)
    model, clf_ckpt = artifacts.load_classifier(cfg.CLASSIFIER_CKPT, runtime.device)
    st.check_start(settings, model.feature_dim)
    clf_ckpt["dataset"] = data.relocate(clf_ckpt["dataset"], cfg.DATA_ROOT)
    out_dir = dict(resume=cfg.RESUME, overwrite=cfg.OVERWRITE)
    artifacts.prepare_out_dir(cfg.OUT_DIR, artifacts.SAE_OUTPUTS, **out_dir, clear=False)  # refuse now, clear later
    if cfg.RESUME:  # before the token pass, not after it
        st.check_resumable(Path(cfg.OUT_DIR) / artifacts.LAST_SAE, settings, clf_ckpt["fingerprint"],
                           world_size=runtime.world_size)
    model = model.to(memory_format=torch.channels_last)  # 2x faster convs on CPU (measured)
    model.requires_grad_(False)
    tokens = st.cache_split_tokens(model, clf_ckpt, cfg.CACHE_DIR, runtime, max_images=cfg.MAX_IMAGES, seed=cfg.SEED,
                                   ram_gb=cfg.TOKEN_RAM_GB, feature_batch=cfg.FEATURE_BATCH)
    if tokens.n_val == 0:  # val FVU 0.0000 on no tokens picked the "best" checkpoint (all ranks: their shards differ)
        raise UserError(f"{cfg.CLASSIFIER_CKPT} has an empty validation split: nothing to choose the best SAE on; "
                        "retrain stage 1 with more images per class")
    if cfg.EPOCHS == 0:  # a cache-only run: nothing goes into OUT_DIR
        runtime.log(st.cache_only_note(tokens, cfg.CACHE_DIR))
        cleanup(runtime)
        return {"train_tokens": tokens.n_train, "val_tokens": tokens.n_val}
    steps = st.steps_per_epoch(tokens.train, settings.batch_size, runtime)  # too few tokens: refused before
    # --overwrite removes the earlier run only now, once the data has loaded: a typo loses nothing
    artifacts.prepare_out_dir(cfg.OUT_DIR, artifacts.SAE_OUTPUTS, **out_dir, clear=runtime.is_main)
    barrier(runtime)
    sae, usage_ema = st.new_sae(tokens, settings, runtime.device)
    optimizer = st.make_sae_optimizer(sae, cfg.LR)
    state = TrainState(best=float("inf"))
    if cfg.RESUME:
        last = Path(cfg.OUT_DIR) / artifacts.LAST_SAE
        state, usage_ema = st.restore(last, sae, optimizer, settings, clf_ckpt["fingerprint"], runtime)
    settings = st.lengthened(settings, steps, runtime)
    if cfg.RESUME:  # after MIN_STEPS has lengthened EPOCHS, as the run's saved config records it
        runtime.log(state.resumed_note(last, settings.epochs))
    if runtime.is_main:  # effective: the EPOCHS that MIN_STEPS made (the log says so), replayable with --config
        save_effective_config({**cfg, "EPOCHS": settings.epochs}, cfg.OUT_DIR)
    result = st.fit(sae, optimizer, usage_ema, model.head, tokens, state, settings, runtime)
    cleanup(runtime)
    return result


if __name__ == "__main__":
    exit_on_sigterm()
    keep_freed_memory()
    maybe_launch_torchrun(__file__, globals())
    run_cli(main, globals())
