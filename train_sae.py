"""Stage 2: train a Top-K sparse autoencoder on the classifier's layer4 tokens.

Usage
-----
    python train_sae.py                                   # synthetic demo (reads runs/standard_cnn/best.pt)
    python train_sae.py --latent_dim=2048 --top_k=20 --batch_size=4096 --epochs=20   # TU-Berlin values
    python train_sae.py --dead_latents=auxk               # resample | auxk | both | none
    python train_sae.py --resume=True                     # continue from OUT_DIR/last_sae.pt
    torchrun --nproc_per_node=4 train_sae.py              # DDP: tokens sharded across ranks

The frozen backbone runs once: train and val tokens are cached as fp16 (in RAM, or as a
memory-mapped .npy in CACHE_DIR when larger than TOKEN_RAM_GB), then the SAE trains on
shuffled token batches. Tokens are standardised per channel (μ, σ over the training
split), s = W_e ã + b_e, z = TopK(ReLU(s)), â = D z + b_d with unit-norm decoder columns.

Defaults are sized for the 64 px synthetic demo (M=64, K=8: 9 parts and 12 classes need few latents;
M=512 left a third of them dead). For TU-Berlin at
224 px use M=2048, K=20 (density 0.01), BATCH_SIZE=4096, EPOCHS≈20.

Dead latents: a latent's usage EMA tracks the share of tokens it fires on (time constant
USAGE_EMA_EPOCHS of an epoch); it is dead when the EMA falls below DEAD_USAGE x K/M.
"resample" re-initialises dead latents from badly reconstructed tokens at epoch ends;
"auxk" adds the AuxK loss (the top AUXK_K dead latents reconstruct the residual).
Reported "dead_fraction" is stricter: latents active on no validation token that epoch.

Writes OUT_DIR/best_sae.pt (lowest validation FVU), last_sae.pt (every epoch, with
optimiser state), metrics.json, config.json and TensorBoard logs in OUT_DIR/tb.
"""
from __future__ import annotations

import time

import numpy as np
import torch
from tqdm.auto import tqdm

from selfexplain import artifacts, data
from selfexplain import sae_train as st
from selfexplain.errors import UserError
from selfexplain.config import make_config, module_constants, run_cli
from selfexplain.artifacts import save_effective_config
from selfexplain.distributed import barrier, cleanup, lr_at, maybe_launch_torchrun, set_threads, setup_runtime
from selfexplain.sae import TopKSAE

# ----------------------------------------------------------------------------- config
CLASSIFIER_CKPT = "runs/standard_cnn/best.pt"  # stage-1 checkpoint (dataset, split, preprocessing come from it)
OUT_DIR = "runs/sae_topk"      # where checkpoints, metrics and logs go
CACHE_DIR = "cache"            # decoded-image cache; token memmaps go under CACHE_DIR/sae_tokens
LATENT_DIM = 64                # M, number of latents (demo; TU-Berlin: 2048)
TOP_K = 8                      # K, active latents per token (demo; TU-Berlin: 20)
EPOCHS = 30                    # passes over the cached training tokens
BATCH_SIZE = 512               # tokens per optimiser step (per process under DDP; TU-Berlin: 4096)
LR = 2e-3                      # peak Adam learning rate
WARMUP_FRACTION = 0.05         # share of steps warming up linearly, then cosine to 0
DEAD_LATENTS = "both"          # resample | auxk | both | none
AUXK_K = 256                   # AuxK: dead latents used to reconstruct the residual (Gao et al.: C/2)
AUXK_COEF = 0.125              # AuxK loss weight (Gao et al. use 1/32; 1/8 keeps the demo's few latents alive)
RESAMPLE_SAMPLE = 8192         # tokens scored when choosing where to resample
RESAMPLE_STOP = 0.95           # no resampling after this share of the epochs (let it settle; 0.8 left 9-11% dead)
USAGE_EMA_EPOCHS = 0.25        # usage EMA time constant, in epochs of training tokens
DEAD_USAGE = 0.01              # dead when usage EMA < DEAD_USAGE x K/M
TOKEN_RAM_GB = 4.0             # keep cached tokens in RAM up to this size, else memmap on disk
MAX_IMAGES = 0                 # cache tokens of at most this many images per split (0 = all; for CPU trials)
FEATURE_BATCH = 256            # images per backbone forward when caching tokens
AMP = "auto"                   # auto | bf16 | fp16 | off (auto: fp32 on CPUs without native bf16)
DEVICE = "auto"                # auto | cpu | cuda
NUM_THREADS = 0                # CPU intra-op threads (0 = torch default)
RESUME = False                 # continue from OUT_DIR/last_sae.pt
TENSORBOARD = True             # write TensorBoard logs to OUT_DIR/tb
SEED = 0                       # seeds init, batch order and resampling


# ----------------------------------------------------------------------------- setup
def check_config(cfg) -> None:
    if not 0 < cfg.TOP_K <= cfg.LATENT_DIM:
        raise UserError(f"need 0 < TOP_K <= LATENT_DIM, got TOP_K={cfg.TOP_K}, LATENT_DIM={cfg.LATENT_DIM}")
    if cfg.BATCH_SIZE < 1 or cfg.EPOCHS < 0 or cfg.LR <= 0:
        raise UserError("BATCH_SIZE must be >= 1, EPOCHS >= 0 and LR > 0")
    if cfg.DEAD_LATENTS not in ("resample", "auxk", "both", "none"):
        raise UserError(f"DEAD_LATENTS must be resample, auxk, both or none, got '{cfg.DEAD_LATENTS}'")


def subsample(indices: np.ndarray, max_images: int, seed: int) -> np.ndarray:
    """At most ``max_images`` of ``indices`` (a seeded random subset, kept sorted); 0 = all."""
    if max_images <= 0 or len(indices) <= max_images:
        return indices
    return np.sort(np.random.default_rng(seed).permutation(indices)[:max_images])


def build_caches(cfg, clf_ckpt, model, runtime, log):
    """Cache this rank's shard of train and val tokens; return (train, val, μ, σ, labels)."""
    imageset = data.load_dataset(clf_ckpt["dataset"], cfg.CACHE_DIR, progress=runtime.is_main)
    split = {k: v.numpy() for k, v in clf_ckpt["split"].items()}
    prep = clf_ckpt["preprocess"]
    t0 = time.time()
    stores = {}
    for name in ("train", "val"):
        chosen = subsample(split[name], cfg.MAX_IMAGES, cfg.SEED)
        shard = chosen[runtime.rank::runtime.world_size]
        path = (f"{cfg.CACHE_DIR}/sae_tokens/{clf_ckpt['fingerprint']}-{name}-n{len(chosen)}-"
                f"r{runtime.rank}of{runtime.world_size}.npy")
        stores[name], sums = st.cache_tokens(
            model, imageset.images, shard, prep, runtime.device, ram_gb=cfg.TOKEN_RAM_GB / runtime.world_size,
            disk_path=path, batch_size=cfg.FEATURE_BATCH, amp=cfg.AMP, progress=runtime.is_main,
            desc=f"{name} tokens", stats=name == "train")
        if name == "train":
            mu, sigma = st.standardization(*sums, runtime)
    log(f"cached {stores['train'].n_tokens * runtime.world_size} train / {stores['val'].n_tokens * runtime.world_size} "
        f"val tokens ({stores['train'].hw[0]}x{stores['train'].hw[1]} per image) in {time.time() - t0:.1f}s")
    return stores["train"], stores["val"], mu, sigma, imageset.labels


def steps_per_epoch(store, batch_size: int, runtime) -> int:
    """Equal on every rank (the smallest shard decides), at least 1."""
    n = torch.tensor([store.n_tokens // batch_size], dtype=torch.int64)
    if runtime.distributed:
        torch.distributed.all_reduce(n, op=torch.distributed.ReduceOp.MIN)
    if n.item() < 1:
        raise UserError(f"BATCH_SIZE={batch_size} is larger than the {store.n_tokens} training tokens per process")
    return int(n.item())


# ----------------------------------------------------------------------------- main
def main(**overrides) -> dict:
    cfg = make_config(module_constants(globals()), overrides)
    check_config(cfg)
    runtime = setup_runtime(cfg.DEVICE)
    set_threads(cfg.NUM_THREADS)
    log = print if runtime.is_main else (lambda *a, **k: None)
    model, clf_ckpt = artifacts.load_classifier(cfg.CLASSIFIER_CKPT, runtime.device)
    model = model.to(memory_format=torch.channels_last)  # 2x faster convs on CPU (measured)
    for p in model.parameters():
        p.requires_grad_(False)
    train, val, mu, sigma, labels = build_caches(cfg, clf_ckpt, model, runtime, log)

    torch.manual_seed(cfg.SEED)  # identical init on every rank
    sae = TopKSAE(train.tokens.shape[1], cfg.LATENT_DIM, cfg.TOP_K).to(runtime.device)
    sae.mu.copy_(mu)
    sae.sigma.copy_(sigma)
    optimizer = st.make_optimizer(sae, cfg.LR)
    state = {"epoch": 0, "step": 0, "best_fvu": float("inf"), "history": [],
             "usage_ema": torch.full((cfg.LATENT_DIM,), cfg.TOP_K / cfg.LATENT_DIM, device=runtime.device)}
    if cfg.RESUME:
        state = restore(cfg, sae, optimizer, clf_ckpt, runtime)
        log(f"resumed from {cfg.OUT_DIR}/last_sae.pt after epoch {state['epoch']}")
    if runtime.is_main:
        save_effective_config(cfg, cfg.OUT_DIR)
    result = fit(cfg, sae, optimizer, model, clf_ckpt, train, val, labels, state, runtime, log)
    cleanup(runtime)
    return result


def fit(cfg, sae, optimizer, model, clf_ckpt, train, val, labels, state, runtime, log) -> dict:
    """The epoch loop: train over the token cache, validate, resample, checkpoint."""
    n_steps = steps_per_epoch(train, cfg.BATCH_SIZE, runtime)
    total_steps = max(1, cfg.EPOCHS * n_steps)
    tau = cfg.USAGE_EMA_EPOCHS * n_steps * cfg.BATCH_SIZE * runtime.world_size
    writer = artifacts.open_tensorboard(cfg.OUT_DIR, cfg.TENSORBOARD) if runtime.is_main else None
    log(f"SAE M={cfg.LATENT_DIM} K={cfg.TOP_K}, {n_steps} steps/epoch of {cfg.BATCH_SIZE} tokens x "
        f"{runtime.world_size} ranks, dead latents: {cfg.DEAD_LATENTS}, device {runtime.device}")
    for epoch in range(state["epoch"] + 1, cfg.EPOCHS + 1):
        t0 = time.time()
        row = train_epoch(cfg, sae, optimizer, train, epoch, n_steps, total_steps, tau, state, runtime)
        row["resampled"] = maybe_resample(cfg, sae, optimizer, train, epoch, state, runtime)
        row["tokens_per_s"] = n_steps * cfg.BATCH_SIZE * runtime.world_size / (time.time() - t0)
        val_m = st.evaluate_sae(sae, model.head, val, labels, runtime)
        row.update({f"val_{k}": v for k, v in val_m.items()}, epoch=epoch, seconds=time.time() - t0,
                   ema_dead_fraction=st.dead_mask(state["usage_ema"], cfg.TOP_K, cfg.DEAD_USAGE).float().mean().item())
        is_best = row["val_fvu"] < state["best_fvu"]
        state["best_fvu"] = min(state["best_fvu"], row["val_fvu"])
        state["epoch"] = epoch
        state["history"].append(row)
        log(f"epoch {epoch}/{cfg.EPOCHS} loss {row['train_fvu']:.4f} val_fvu {row['val_fvu']:.4f} "
            f"L0 {row['val_l0']:.1f} dead {row['val_dead_fraction']:.3f} spliced_acc {row['val_spliced_accuracy']:.4f} "
            f"(own {row['val_classifier_accuracy']:.4f}) resampled {row['resampled']} "
            f"{row['tokens_per_s']:.0f} tok/s{' *best*' if is_best else ''}")
        if writer is not None:
            _log_tensorboard(writer, row, epoch)
        if runtime.is_main:
            save_checkpoints(cfg, sae, optimizer, state, clf_ckpt, is_best)
        barrier(runtime)
    if writer is not None:
        writer.close()
    if runtime.distributed:
        if not st.replicas_agree(sae, runtime):
            raise RuntimeError("DDP ranks ended with different SAE weights")
        log(f"all {runtime.world_size} ranks hold identical SAE weights")
    return finish(cfg, state, runtime, log)


def train_epoch(cfg, sae, optimizer, train, epoch, n_steps, total_steps, tau, state, runtime) -> dict:
    """One pass over this rank's shuffled token shard; returns mean train losses."""
    sae.train()
    use_aux = cfg.DEAD_LATENTS in ("auxk", "both")
    sums = torch.zeros(2, device=runtime.device)
    bar = tqdm(total=n_steps * cfg.BATCH_SIZE * runtime.world_size, desc=f"epoch {epoch}/{cfg.EPOCHS}",
               unit="tok", unit_scale=True, disable=None if runtime.is_main else True, leave=False)
    for raw in train.iter_batches(cfg.BATCH_SIZE, [cfg.SEED, epoch, runtime.rank], n_steps):
        x = sae.standardize(raw.to(runtime.device, non_blocking=True).float())
        for group in optimizer.param_groups:
            group["lr"] = lr_at(state["step"], total_steps, cfg.LR, cfg.WARMUP_FRACTION)
        dead = st.dead_mask(state["usage_ema"], cfg.TOP_K, cfg.DEAD_USAGE) if use_aux else None
        out = st.train_step(sae, optimizer, x, dead=dead, k_aux=cfg.AUXK_K if use_aux else 0,
                            aux_coef=cfg.AUXK_COEF, amp=cfg.AMP, runtime=runtime)
        st.update_usage_ema(state["usage_ema"], out["counts"], out["n"] * runtime.world_size, tau)
        sums += torch.stack([out["loss"], out["aux_loss"]])
        state["step"] += 1
        bar.update(len(x) * runtime.world_size)
    bar.close()
    means = (sums / n_steps).tolist()
    return {"train_fvu": means[0], "train_aux_loss": means[1], "lr": optimizer.param_groups[0]["lr"]}


def maybe_resample(cfg, sae, optimizer, train, epoch, state, runtime) -> int:
    """At an epoch end (before RESAMPLE_STOP of training), resample latents dead by usage EMA."""
    if cfg.DEAD_LATENTS not in ("resample", "both") or epoch > cfg.RESAMPLE_STOP * cfg.EPOCHS or epoch == cfg.EPOCHS:
        return 0
    dead_idx = torch.nonzero(st.dead_mask(state["usage_ema"], cfg.TOP_K, cfg.DEAD_USAGE)).flatten()
    if len(dead_idx) == 0:
        return 0
    sample = next(train.iter_batches(min(cfg.RESAMPLE_SAMPLE, train.n_tokens), [cfg.SEED, epoch, 7], 1))
    x = sae.standardize(sample.to(runtime.device).float())
    gen = torch.Generator(device=runtime.device).manual_seed(cfg.SEED * 1000 + epoch)
    st.resample_dead_(sae, optimizer, dead_idx, x, gen, runtime)
    state["usage_ema"][dead_idx] = cfg.TOP_K / cfg.LATENT_DIM  # a fresh grace period
    return len(dead_idx)


# ----------------------------------------------------------------------------- checkpoints
def save_checkpoints(cfg, sae, optimizer, state, clf_ckpt, is_best) -> None:
    ckpt = artifacts.sae_checkpoint(sae, classifier_fingerprint=clf_ckpt["fingerprint"],
                                    classifier_path=cfg.CLASSIFIER_CKPT, config=dict(cfg), epoch=state["epoch"],
                                    metrics=state["history"][-1], usage_ema=state["usage_ema"])
    if is_best:
        artifacts.save_checkpoint(ckpt, f"{cfg.OUT_DIR}/best_sae.pt")
    ckpt.update(optimizer=optimizer.state_dict(), step=state["step"], best_fvu=state["best_fvu"],
                history=state["history"])
    artifacts.save_checkpoint(ckpt, f"{cfg.OUT_DIR}/last_sae.pt")


def restore(cfg, sae, optimizer, clf_ckpt, runtime) -> dict:
    """Load OUT_DIR/last_sae.pt (same classifier required); returns the loop state."""
    ckpt = artifacts.load_checkpoint(f"{cfg.OUT_DIR}/last_sae.pt", "sae", map_location=runtime.device)
    if ckpt["classifier_fingerprint"] != clf_ckpt["fingerprint"]:
        raise UserError(f"{cfg.OUT_DIR}/last_sae.pt was trained on another classifier; start fresh (--resume=False)")
    if (ckpt["n_latents"], ckpt["k"]) != (cfg.LATENT_DIM, cfg.TOP_K):
        raise UserError(f"{cfg.OUT_DIR}/last_sae.pt has M={ckpt['n_latents']} K={ckpt['k']}; "
                        f"resume with --latent_dim={ckpt['n_latents']} --top_k={ckpt['k']}")
    sae.load_state_dict(ckpt["state"])
    optimizer.load_state_dict(ckpt["optimizer"])
    return {"epoch": ckpt["epoch"], "step": ckpt["step"], "best_fvu": ckpt["best_fvu"], "history": ckpt["history"],
            "usage_ema": ckpt["usage_ema"].to(runtime.device)}


def finish(cfg, state, runtime, log) -> dict:
    """Write metrics.json: the best epoch's validation figures and the history."""
    if not state["history"]:
        return {"epochs": state["epoch"], "history": []}
    best = min(state["history"], key=lambda r: r["val_fvu"])
    keys = ("val_fvu", "val_l0", "val_dead_fraction", "val_spliced_accuracy", "val_classifier_accuracy")
    metrics = {k: best[k] for k in keys}
    metrics.update(best_epoch=best["epoch"], epochs=state["epoch"], latent_dim=cfg.LATENT_DIM, top_k=cfg.TOP_K,
                   dead_latents=cfg.DEAD_LATENTS, world_size=runtime.world_size, tokens_per_s=float(np.mean([r["tokens_per_s"] for r in state["history"]])),
                   history=state["history"])
    if runtime.is_main:
        artifacts.write_json(f"{cfg.OUT_DIR}/metrics.json", metrics)
        log(f"best epoch {best['epoch']}: val_fvu {best['val_fvu']:.4f} L0 {best['val_l0']:.1f} dead "
            f"{best['val_dead_fraction']:.3f} spliced_acc {best['val_spliced_accuracy']:.4f} "
            f"(classifier {best['val_classifier_accuracy']:.4f}) -> {cfg.OUT_DIR}/best_sae.pt")
    return metrics


def _log_tensorboard(writer, row, epoch) -> None:
    for key in ("train_fvu", "train_aux_loss", "val_fvu", "val_l0", "val_dead_fraction", "ema_dead_fraction",
                "val_spliced_accuracy", "val_classifier_accuracy", "lr", "tokens_per_s", "resampled"):
        writer.add_scalar(key.replace("_", "/", 1), row[key], epoch)
    writer.flush()


if __name__ == "__main__":
    maybe_launch_torchrun(__file__)
    run_cli(main, globals())
