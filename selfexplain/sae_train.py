"""Stage 2's logic: train the Top-K or BatchTopK SAE on cached layer4 tokens.

``train_sae.py`` reads the settings and calls :func:`cache_split_tokens`,
:func:`new_sae` (or :func:`restore`) and :func:`fit`. The pieces are reusable on their
own: :func:`train_step` (the fast sparse step), the dead-latent tools
(:func:`update_usage_ema`, :func:`dead_mask`, :func:`resample_dead_`) and the metrics
(:class:`SAEMetrics`, :func:`evaluate_sae`). The SAE maths itself lives in ``sae.py``.

bf16 autocast is emulated on CPUs without AVX512-BF16/AMX (2.5x slower matmul), so the
encoder matmul stays fp32 there (``distributed.amp_dtype``).
"""
from __future__ import annotations

import hashlib
import math
import time
from dataclasses import dataclass, field, fields, replace
from functools import partial
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from . import artifacts, data
from .artifacts import TrainState
from .config import register_choices, require_choice
from .distributed import (Runtime, all_reduce_min, all_reduce_sum, amp_dtype, barrier, broadcast, lr_at,
                          main_rank_first, precision_note)
from .errors import UserError
from .features import TokenStore, cache_tokens, standardization
from .sae import ARCHS, TopKEncode, TopKSAE, fvu_loss, tokens_to_map

DEAD_LATENT_MODES = register_choices("DEAD_LATENTS", ("resample", "auxk", "both", "none"))
register_choices("ARCH", ARCHS)  # sae.py owns the rules; the setting is stage 2's
INITS = register_choices("INIT", ("random", "channels"))  # how the dictionary starts (TopKSAE.start_at_channels_)
DEAD_MIN_FIRES = 10  # dead is counted over splits of at least this many average-rate firings per latent
TOKEN_CACHE_DIR = "sae_tokens"  # inside CACHE_DIR: token caches too big for TOKEN_RAM_GB, reused by later runs


@dataclass
class SAETrainSettings:
    """Stage 2's training settings (the script's constants of the same names, lower-case).

    The bare defaults below are a small, quick configuration (tests, notebooks); the
    demo's defaults are ``train_sae.py``'s constants (``from_config``), which a benchmark
    meaning "as stage 2 trains" must use (bench_dead does).
    """

    out_dir: str                   # checkpoints, metrics and TensorBoard go here
    classifier_ckpt: str           # recorded in the SAE checkpoint
    latent_dim: int = 64           # M
    top_k: int = 8                 # K
    arch: str = "topk"             # topk | batchtopk
    threshold_rate: float = 0.01   # batchtopk: EMA weight of each batch's smallest kept activation in θ
    epochs: int = 30               # passes over the cached training tokens
    min_steps: int = 0             # ... raised until they make at least this many optimiser steps
    batch_size: int = 512          # tokens per optimiser step (per process under DDP)
    lr: float = 2e-3               # peak Adam learning rate
    warmup_fraction: float = 0.05  # share of steps warming up, then cosine
    dead_latents: str = "both"     # resample | auxk | both | none
    auxk_k: int = 256              # AuxK: dead latents reconstructing the residual
    auxk_coef: float = 0.125       # AuxK loss weight
    resample_sample: int = 8192    # tokens scored when choosing where to resample
    resample_stop: float = 0.95    # no resampling after this share of the epochs
    usage_ema_epochs: float = 0.25  # usage EMA time constant, in epochs of tokens
    dead_usage: float = 0.05       # dead when usage EMA < dead_usage x K/M
    amp: str = "auto"              # encoder matmul autocast mode
    tensorboard: bool = True       # TensorBoard logs in out_dir/tb
    seed: int = 0                  # init, batch order and resampling
    init: str = "random"           # random | channels (latent i < C starts as channel i; needs M >= C)
    config: dict = field(default_factory=dict)  # the effective config, recorded in checkpoints

    @classmethod
    def from_config(cls, cfg: dict) -> "SAETrainSettings":
        """Pick this record's fields from a script config (UPPER_CASE keys)."""
        values = {f.name: cfg[f.name.upper()] for f in fields(cls) if f.name.upper() in cfg}
        return cls(**{**values, "config": dict(cfg)})

    def check(self) -> None:
        """Refuse impossible settings before any work starts."""
        if not 0 < self.top_k <= self.latent_dim:
            raise UserError(f"need 0 < TOP_K <= LATENT_DIM, got TOP_K={self.top_k}, LATENT_DIM={self.latent_dim}")
        if self.batch_size < 1 or self.epochs < 0 or self.lr <= 0:
            raise UserError("BATCH_SIZE must be >= 1, EPOCHS >= 0 and LR > 0")
        require_choice("ARCH", self.arch, ARCHS)
        require_choice("DEAD_LATENTS", self.dead_latents, DEAD_LATENT_MODES)
        require_choice("INIT", self.init, INITS)
        if self.use_resample and self.arch == "batchtopk":  # revived rows clear θ on many tokens: FVU 0.44 vs 0.03
            raise UserError(f"DEAD_LATENTS={self.dead_latents} resamples, which works with ARCH=topk only: under "
                            "batchtopk the revived latents fire on most tokens (validation FVU 0.44 against 0.03 with "
                            "auxk, measured); use DEAD_LATENTS=auxk (the default) or ARCH=topk")
        if self.use_resample and self.resample_sample < 1:
            raise UserError(f"RESAMPLE_SAMPLE must be >= 1 when resampling, got {self.resample_sample}")
        if self.auxk_k < 0 or self.min_steps < 0:
            raise UserError(f"AUXK_K and MIN_STEPS must be >= 0, got {self.auxk_k}, {self.min_steps}")
        amp_dtype(torch.device("cpu"), self.amp)  # an unknown AMP mode fails here, not after the token pass

    @property
    def use_auxk(self) -> bool:
        return self.dead_latents in ("auxk", "both")

    @property
    def use_resample(self) -> bool:
        return self.dead_latents in ("resample", "both")


LOG_LINES = 50  # epoch lines at most per run (every epoch still goes to metrics.json and TensorBoard)


# ----------------------------------------------------------------------------- token caches
@dataclass
class SplitTokens:
    """This rank's cached train and val tokens of one classifier, the training μ, σ and the labels."""

    train: TokenStore
    val: TokenStore
    mu: torch.Tensor
    sigma: torch.Tensor
    labels: np.ndarray              # by dataset index
    classifier_fingerprint: str     # the classifier whose layer4 tokens these are
    n_train: int = 0                # tokens of every rank together (a rank's own: train.n_tokens)
    n_val: int = 0


def subsample(indices: np.ndarray, max_images: int, seed: int) -> np.ndarray:
    """At most ``max_images`` of ``indices`` (a seeded random subset, kept sorted); 0 = all."""
    if max_images <= 0 or len(indices) <= max_images:
        return indices
    return np.sort(np.random.default_rng(seed).permutation(indices)[:max_images])


def token_cache_path(cache_dir: str | Path, classifier_fingerprint: str, split_name: str, images: np.ndarray,
                     runtime: Runtime) -> Path:
    """Where one rank's tokens of ``images`` are cached: named by the classifier and the exact images.

    The digest of the image indices covers everything that selects them (split, MAX_IMAGES,
    SEED, rank and world size), so another subset never reuses old tokens.
    """
    digest = hashlib.sha256(np.ascontiguousarray(images, dtype=np.int64).tobytes()).hexdigest()[:12]
    return (Path(cache_dir) / TOKEN_CACHE_DIR /
            f"{classifier_fingerprint}-{split_name}-n{len(images)}-{digest}-r{runtime.rank}of{runtime.world_size}.npy")


def cache_split_tokens(model, clf_ckpt: dict, cache_dir: str | Path, runtime: Runtime, *, max_images: int = 0,
                       seed: int = 0, ram_gb: float = 4.0, feature_batch: int = 256) -> SplitTokens:
    """Cache this rank's shard of the train and val tokens (fp32 backbone, fp16 storage)."""
    with main_rank_first(runtime):  # one decode under DDP (every rank built the same cache at once); the rest read it
        imageset = data.load_dataset(clf_ckpt["dataset"], cache_dir, progress=runtime.is_main)
    split = {k: v.numpy() for k, v in clf_ckpt["split"].items()}
    t0 = time.time()
    stores, sums = {}, None
    for name in ("train", "val"):
        shard = subsample(split[name], max_images, seed)[runtime.rank::runtime.world_size]
        path = token_cache_path(cache_dir, clf_ckpt["fingerprint"], name, shard, runtime)
        stores[name], found = cache_tokens(model, imageset.images, shard, clf_ckpt["preprocess"], runtime.device,
                                           ram_gb=ram_gb / runtime.world_size, disk_path=path,
                                           batch_size=feature_batch, progress=runtime.is_main, stats=name == "train")
        sums = found if name == "train" else sums
    mu, sigma = standardization(*sums, runtime)
    train, val = stores["train"], stores["val"]
    # totals over ranks (shards differ by up to one image): a rank's count times the world miscounted them,
    # and a rank with no val shard called the whole split empty
    n_train, n_val = all_reduce_sum(torch.tensor([train.n_tokens, val.n_tokens], dtype=torch.int64,
                                                 device=runtime.device), runtime).tolist()
    runtime.log(f"cached {n_train} train / {n_val} val tokens ({train.hw[0]}x{train.hw[1]} per image) in "
                f"{time.time() - t0:.1f}s")
    return SplitTokens(train, val, mu, sigma, imageset.labels, clf_ckpt["fingerprint"], n_train, n_val)


def cache_only_note(tokens: SplitTokens, cache_dir: str | Path) -> str:
    """What an ``EPOCHS=0`` run leaves: tokens on disk for the next run, or nothing (they fit in RAM)."""
    if isinstance(tokens.train.tokens, np.memmap):
        return f"EPOCHS=0: the tokens are cached in {Path(cache_dir) / TOKEN_CACHE_DIR} for the next run; no SAE was trained"
    return ("EPOCHS=0: no SAE was trained, and no tokens are kept: they fit in TOKEN_RAM_GB, so a run "
            "computes them in memory each time")


def steps_per_epoch(store: TokenStore, batch_size: int, runtime: Runtime) -> int:
    """Equal on every rank (the smallest shard decides), at least 1."""
    fewest = int(all_reduce_min(torch.tensor([store.n_tokens], dtype=torch.int64, device=runtime.device),
                                runtime).item())  # the same figure on every rank: the same error everywhere
    if fewest < batch_size:
        where = " per process" if runtime.world_size == 1 else f" of the smallest of {runtime.world_size} processes' shares"
        advice = (f"lower --batch_size to {fewest} or less (--batch_size={data.few_steps_batch_size(fewest)} makes "
                  "about four steps per epoch)" if fewest >= 2 else "add images")
        raise UserError(f"BATCH_SIZE={batch_size} is larger than the {fewest} training tokens{where}: {advice}"
                        + (" or use fewer processes" if runtime.world_size > 1 else ""))
    return fewest // batch_size


# ----------------------------------------------------------------------------- sparse step
def train_step(sae: TopKSAE, optimizer, x: torch.Tensor, *, dead: torch.Tensor | None = None, k_aux: int = 0,
               aux_coef: float = 0.0, dtype: torch.dtype | None = None, runtime: Runtime | None = None,
               threshold_rate: float = 0.01) -> dict:
    """One optimiser step on standardised tokens ``x`` (N, C); returns detached stats.

    Loss = FVU(x, x̂) + aux_coef · FVU(e, ê), where e = x - x̂ (detached) and ê decodes the
    top ``k_aux`` dead latents (AuxK, Gao et al. 2024). topk keeps K latents per token;
    batchtopk keeps the K·N largest over the batch (at most ``sae.k_max`` per token) and
    moves θ towards the smallest kept one at ``threshold_rate``. ``dtype`` is the encoder
    matmul's autocast dtype (None = fp32). Under DDP the gradients and the latent counts
    are summed across ranks (each rank's batch keeps its own K·N). Decoder columns stay unit-norm.
    """
    k_aux = min(k_aux, int(dead.sum())) if dead is not None else 0
    dead_mask = dead if dead is not None else torch.zeros(sae.n_latents, dtype=torch.bool, device=x.device)
    k_batch = sae.k * len(x) if sae.arch == "batchtopk" else 0
    values, idx, aux_v, aux_idx = TopKEncode.apply(x, sae.W_e, sae.b_e, sae.k_max, k_aux, dead_mask, dtype, k_batch)
    if k_batch:
        distributed = runtime is not None and runtime.distributed
        sae.update_threshold_(values, threshold_rate, partial(all_reduce_sum, runtime=runtime) if distributed else None)
    recon = sae.decode_sparse(values, idx)
    loss = fvu_loss(x, recon)
    aux_loss = torch.zeros((), device=x.device)
    if k_aux > 0:
        residual = (x - recon).detach()
        aux_loss = fvu_loss(residual, sae.decode_sparse(aux_v, aux_idx, bias=False))
    optimizer.zero_grad(set_to_none=True)
    (loss + aux_coef * aux_loss).backward()
    counts = torch.bincount(idx[values > 0], minlength=sae.n_latents).float()
    if runtime is not None and runtime.distributed:
        _all_reduce_grads(sae, counts, runtime)
    sae.remove_parallel_grad_()
    optimizer.step()
    sae.normalize_decoder_()
    return {"loss": loss.detach(), "aux_loss": aux_loss.detach(), "counts": counts, "n": len(x)}


def _all_reduce_grads(sae: TopKSAE, counts: torch.Tensor, runtime: Runtime) -> None:
    """Average gradients and sum latent counts across ranks in one flat all-reduce."""
    params = [p for p in sae.parameters() if p.grad is not None]
    flat = torch.cat([p.grad.reshape(-1) for p in params] + [counts])
    all_reduce_sum(flat, runtime)
    pos = 0
    for p in params:
        p.grad.copy_(flat[pos:pos + p.numel()].view_as(p) / runtime.world_size)
        pos += p.numel()
    counts.copy_(flat[pos:])


def make_sae_optimizer(sae: TopKSAE, lr: float) -> torch.optim.Optimizer:
    """Adam (fused where supported: 3x faster than foreach on CPU here)."""
    try:
        return torch.optim.Adam(sae.parameters(), lr=lr, fused=True)
    except (RuntimeError, TypeError):
        return torch.optim.Adam(sae.parameters(), lr=lr)


# ----------------------------------------------------------------------------- dead latents
def update_usage_ema(ema: torch.Tensor, counts: torch.Tensor, n_tokens: int, tau_tokens: float) -> None:
    """ema ← β ema + (1-β) (counts / n_tokens), β = exp(-n_tokens / τ): a time constant in tokens."""
    beta = math.exp(-n_tokens / max(tau_tokens, 1.0))
    ema.mul_(beta).add_(counts / max(n_tokens, 1), alpha=1 - beta)


def dead_mask(ema: torch.Tensor, k: int, threshold: float) -> torch.Tensor:
    """Latents whose usage EMA is below ``threshold`` x the average rate K/M."""
    return ema < threshold * k / len(ema)


def dead_share(fired: torch.Tensor) -> float:
    """The reported dead fraction: the share of latents that fired on none of the tokens counted.

    ``fired`` (M,) counts each latent's non-zero codes over a split. The figure means
    something once the split holds at least :func:`min_tokens_for_dead` tokens.
    """
    return (fired == 0).double().mean().item()


def min_tokens_for_dead(n_latents: int, k: int) -> int:
    """10·M/K: tokens over which a latent used at the average rate K/M fires 10 times on
    average, and one used at a tenth of it about once. Fewer tokens make "never fired"
    mostly chance; more make it mean "used well below a tenth of the average"."""
    return math.ceil(DEAD_MIN_FIRES * n_latents / k)


@torch.no_grad()
def resample_dead_(sae: TopKSAE, optimizer, dead_idx: torch.Tensor, x_sample: torch.Tensor,
                   generator: torch.Generator | None = None, runtime: Runtime | None = None) -> torch.Tensor:
    """Re-initialise ``dead_idx`` latents from tokens the SAE reconstructs badly.

    Tokens of ``x_sample`` are drawn with probability ∝ (squared error)². Each dead latent
    gets its token's unit direction (x - b_d)/||x - b_d|| as decoder column (the residual
    direction was tried first: residuals of different tokens share -x̂ components, and
    revived latents crowded each other out of the top K) and the same direction as
    encoder row, scaled so that its pre-activation on that token equals the mean of the
    token's current top K (batchtopk: at least 1.05 θ; the scale is capped at twice the
    median encoder row norm); b_e = 0. Adam restarts those latents (:func:`_restart_adam_rows`).
    Under DDP rank 0 decides and broadcasts. Returns the indices of the chosen tokens
    (rows of ``x_sample``).

    Why latents died again after resampling (issue 13; stage 2 re-run with each change on the
    folder stand-in, M=256, K=8, 12.6k tokens, and on demo images through a stride-2
    classifier, M=512, K=8, 11.5k tokens): aimed just above its token's K-th
    pre-activation, a revived latent fired on that token and few others, got too little
    gradient to grow and lost its place again (60-77 of 512 re-killed every epoch, 48
    firing on at most 3 training tokens); and with Adam's second moment zeroed its first
    updates were several times lr (see :func:`_restart_adam_rows`). Aiming at the mean of
    the top K and restarting Adam at the live median cut validation-dead latents from 5.1%
    to 1.2% (folder) and 28% to 13% (demo); a stricter DEAD_USAGE (0.1) made it worse
    (44%: more churn). On the 4x4 demo maps latents also die without any resampling
    (~30% by epoch 20 once resampling stops): that part is the data, not the resampler.
    """
    n = len(dead_idx)
    if n == 0:
        return dead_idx.new_zeros(0)
    if runtime is None or runtime.is_main:
        recon, values, _ = sae(x_sample)
        err = (x_sample - recon).pow(2).sum(1)
        pick = torch.multinomial(err.pow(2) + 1e-12, n, replacement=n > len(err), generator=generator)
        token = x_sample[pick]
        centred = token - sae.b_d  # what D z has to add for this token
        direction = centred / centred.norm(dim=1, keepdim=True).clamp_min(1e-8)
        aim = sae.pre_acts(token).topk(sae.k, dim=1).values.mean(1)
        if sae.arch == "batchtopk":  # at inference it fires only above θ
            aim = torch.maximum(aim, 1.05 * sae.threshold)
        # the median-norm cap stops a ratchet (scales taken from earlier resampled rows
        # growing every round)
        proj = (direction * token).sum(1).clamp_min(0.1 * token.norm(dim=1).clamp_min(1e-6))
        scale = (aim.clamp_min(1e-3) / proj).clamp(max=2 * sae.W_e.norm(dim=1).median())
        sae.D[:, dead_idx] = direction.t().to(sae.D.dtype)
        sae.W_e[dead_idx] = (direction * scale[:, None]).to(sae.W_e.dtype)
        sae.b_e[dead_idx] = 0
    else:
        pick = dead_idx.new_zeros(n)
    if runtime is not None and runtime.distributed:
        for p in (sae.D, sae.W_e, sae.b_e):
            broadcast(p.data, runtime)
    _restart_adam_rows(optimizer, sae, dead_idx)
    return pick


def _restart_adam_rows(optimizer, sae: TopKSAE, idx: torch.Tensor) -> None:
    """Restart Adam for the latents ``idx`` (rows of W_e, b_e; columns of D).

    The first moment is zeroed (the old gradients belong to another feature). The second
    moment is set to the median over the other latents, not zeroed: Adam's bias correction
    runs on the global step count, so with a zeroed second moment the next updates are
    ``lr · m / sqrt(v)`` ≈ 3-10 lr per element for hundreds of steps, enough to throw a
    revived latent off the direction it was given.
    """
    live = torch.ones(sae.n_latents, dtype=torch.bool, device=idx.device)
    live[idx] = False
    if not live.any():
        return
    for p in (sae.W_e, sae.b_e, sae.D):
        state = optimizer.state.get(p, {})
        if "exp_avg" not in state:
            continue
        rows = 1 if p is sae.D else 0  # the latent axis
        state["exp_avg"].index_fill_(rows, idx, 0.0)
        typical = state["exp_avg_sq"].index_select(rows, torch.nonzero(live).flatten()).median(rows, keepdim=True)
        state["exp_avg_sq"].index_copy_(rows, idx, typical.values.expand_as(
            state["exp_avg_sq"].index_select(rows, idx)).contiguous())


# ----------------------------------------------------------------------------- metrics
class SAEMetrics:
    """Accumulates FVU, L0 and latent usage over token batches (float64, all-reducible).

    FVU = Σ||x - x̂||² / Σ||x - mean(x)||² over all tokens seen (standardised space; the
    mean is the mean of the evaluated tokens). L0 = mean number of non-zero codes per
    token. dead fraction = share of latents that are non-zero on no evaluated token.
    """

    def __init__(self, d_in: int, n_latents: int, device):
        self.sums = torch.zeros(3 + d_in, dtype=torch.float64, device=device)  # sse, Σ||x||², n, Σx
        self.fired = torch.zeros(n_latents, dtype=torch.float64, device=device)
        self.l0 = torch.zeros((), dtype=torch.float64, device=device)

    def update(self, x: torch.Tensor, recon: torch.Tensor, values: torch.Tensor, indices: torch.Tensor) -> None:
        x64 = x.double()
        self.sums[0] += (recon.double() - x64).pow(2).sum()
        self.sums[1] += x64.pow(2).sum()
        self.sums[2] += len(x)
        self.sums[3:] += x64.sum(0)
        active = values > 0
        self.l0 += active.sum()
        self.fired += torch.bincount(indices[active], minlength=len(self.fired)).double()

    def compute(self, runtime: Runtime | None = None) -> dict:
        flat = torch.cat([self.sums, self.fired, self.l0[None]])
        if runtime is not None:
            all_reduce_sum(flat, runtime)
        d = len(self.sums) - 3
        sse, sq, n = flat[0].item(), flat[1].item(), max(flat[2].item(), 1.0)
        mean = flat[3:3 + d]
        total_var = sq - n * mean.div(n).pow(2).sum().item()
        fired = flat[3 + d:-1]
        return {"fvu": sse / max(total_var, 1e-12), "l0": flat[-1].item() / n,
                "dead_fraction": dead_share(fired), "n_tokens": int(n)}


@torch.no_grad()
def evaluate_sae(sae: TopKSAE, head, store: TokenStore, labels: np.ndarray, runtime: Runtime,
                 batch_images: int = 256) -> dict:
    """Validation metrics plus spliced accuracy: ``head(Â)`` vs ``head(A)`` per image.

    ``labels`` is indexed by dataset index; ``head`` maps a (B, C, H, W) map to logits.
    """
    sae.eval()
    h, w = store.hw
    per_img = h * w
    metrics = SAEMetrics(sae.d_in, sae.n_latents, sae.mu.device)
    correct = torch.zeros(3, dtype=torch.float64, device=sae.mu.device)  # own, spliced, images
    for start in range(0, len(store.image_index), batch_images):
        img = store.image_index[start:start + batch_images]
        a = torch.from_numpy(np.array(store.tokens[start * per_img:(start + len(img)) * per_img]))
        a = a.to(sae.mu.device).float()
        x = sae.standardize(a)
        recon, values, idx = sae(x)
        metrics.update(x, recon, values, idx)
        amap = tokens_to_map(a, len(img), h, w)
        rmap = tokens_to_map(sae.unstandardize(recon), len(img), h, w)
        y = torch.from_numpy(labels[img]).to(a.device)
        correct[0] += (head(amap).argmax(1) == y).sum()
        correct[1] += (head(rmap).argmax(1) == y).sum()
        correct[2] += len(img)
    out = metrics.compute(runtime)
    all_reduce_sum(correct, runtime)
    n = max(correct[2].item(), 1.0)
    out.update(classifier_accuracy=correct[0].item() / n, spliced_accuracy=correct[1].item() / n)
    sae.train()
    return out


def replicas_agree(sae: TopKSAE, runtime: Runtime) -> bool:
    """True when every rank holds the same SAE weights and buffers (checked via a broadcast checksum)."""
    if not runtime.distributed:
        return True
    tensors = list(sae.parameters()) + [b for b in sae.buffers() if b.is_floating_point()]  # θ, μ, σ too
    mine = torch.stack([t.detach().double().sum() for t in tensors] + [t.detach().double().abs().sum() for t in tensors])
    ref = broadcast(mine.clone(), runtime)
    ok = torch.tensor([float(torch.equal(mine, ref))], device=mine.device)
    torch.distributed.all_reduce(ok, op=torch.distributed.ReduceOp.MIN)
    return bool(ok.item())


# ----------------------------------------------------------------------------- the loop
def check_start(settings: SAETrainSettings, channels: int) -> None:
    """Refuse INIT=channels for fewer latents than the classifier's channels, before the token pass."""
    if settings.init == "channels" and settings.latent_dim < channels:
        raise UserError(f"INIT=channels starts latent i as channel i: it needs LATENT_DIM >= the classifier's "
                        f"{channels} channels, got {settings.latent_dim} (use INIT=random)")


def new_sae(tokens: SplitTokens, settings: SAETrainSettings, device) -> tuple[TopKSAE, torch.Tensor]:
    """A fresh SAE (seeded: identical on every rank) with the training μ, σ; and its usage EMA."""
    torch.manual_seed(settings.seed)
    sae = TopKSAE(tokens.train.tokens.shape[1], settings.latent_dim, settings.top_k, settings.arch).to(device)
    if settings.init == "channels":
        sae.start_at_channels_()
    sae.mu.copy_(tokens.mu)
    sae.sigma.copy_(tokens.sigma)
    return sae, torch.full((settings.latent_dim,), settings.top_k / settings.latent_dim, device=device)


def fit(sae: TopKSAE, optimizer, usage_ema: torch.Tensor, head, tokens: SplitTokens, state: TrainState,
        settings: SAETrainSettings, runtime: Runtime) -> dict:
    """The epoch loop: train over the token cache, validate, resample, checkpoint.

    ``head`` maps a layer4 map to logits (the classifier's), for spliced accuracy;
    ``usage_ema`` (M,) is updated in place.
    """
    n_steps = steps_per_epoch(tokens.train, settings.batch_size, runtime)
    s = lengthened(settings, n_steps, runtime)  # EPOCHS raised to MIN_STEPS on small token sets
    total_steps = max(1, s.epochs * n_steps)
    tau = s.usage_ema_epochs * n_steps * s.batch_size * runtime.world_size
    writer = artifacts.open_tensorboard(s.out_dir, s.tensorboard, state.epoch + 1) if runtime.is_main else None
    runtime.log(f"SAE {s.arch} M={s.latent_dim} K={s.top_k}, {n_steps} steps/epoch of {s.batch_size} tokens x "
                f"{runtime.world_size} ranks, dead latents: {s.dead_latents}, {runtime.describe()}, "
                f"{precision_note(runtime.device, s.amp)} encoder")
    need = min_tokens_for_dead(s.latent_dim, s.top_k)
    if tokens.n_val < need:
        runtime.log(f"warning: {tokens.n_val} validation tokens are fewer than "
                    f"10·M/K = {need}: the validation dead fraction is mostly chance")
    log_every = max(1, math.ceil(s.epochs / LOG_LINES))  # MIN_STEPS can make hundreds of short epochs
    for epoch in range(state.epoch + 1, s.epochs + 1):
        t0 = time.time()
        row = train_epoch(sae, optimizer, usage_ema, tokens.train, epoch, n_steps, total_steps, tau, state, s, runtime)
        row["resampled"] = maybe_resample(sae, optimizer, usage_ema, tokens.train, epoch, s, runtime)
        row["tokens_per_s"] = n_steps * s.batch_size * runtime.world_size / (time.time() - t0)
        val = evaluate_sae(sae, head, tokens.val, tokens.labels, runtime)
        row.update({f"val_{k}": v for k, v in val.items()}, epoch=epoch, seconds=time.time() - t0,
                   ema_dead_fraction=dead_mask(usage_ema, s.top_k, s.dead_usage).float().mean().item())
        is_best = row["val_fvu"] < state.best
        state.best, state.epoch = min(state.best, row["val_fvu"]), epoch
        state.history.append(row)
        if writer is not None:
            _log_tensorboard(writer, row, epoch)
        if runtime.is_main:
            save_checkpoints(sae, optimizer, usage_ema, state, s, tokens.classifier_fingerprint, is_best)
            artifacts.drop_replaced(s.out_dir)  # a run --overwrite moved aside goes once this one has a checkpoint
        barrier(runtime)
        if epoch % log_every == 0 or epoch in (1, s.epochs):  # logged after the save: Ctrl-C now keeps this epoch
            runtime.log(f"epoch {epoch}/{s.epochs} loss {row['train_fvu']:.4f} val_fvu {row['val_fvu']:.4f} "
                        f"L0 {row['val_l0']:.1f} dead train {row['train_dead_fraction']:.3f} val "
                        f"{row['val_dead_fraction']:.3f} spliced_acc "
                        f"{row['val_spliced_accuracy']:.4f} (own {row['val_classifier_accuracy']:.4f}) resampled "
                        f"{row['resampled']} {row['tokens_per_s']:.0f} tok/s{' *best*' if is_best else ''}")
    if writer is not None:
        writer.close()
    if runtime.distributed:
        if not replicas_agree(sae, runtime):
            raise RuntimeError("DDP ranks ended with different SAE weights")
        runtime.log(f"all {runtime.world_size} ranks hold identical SAE weights")
    return finish(state, s, runtime)


def lengthened(settings: SAETrainSettings, n_steps: int, runtime: Runtime) -> SAETrainSettings:
    """``settings`` with EPOCHS raised, when needed, to make at least MIN_STEPS optimiser steps.

    An SAE learns per step, not per epoch: AuxK revives dead latents a step at a time.
    The demo's 12 epochs are 2,160 steps of 512 tokens; on a folder of 12,600 tokens 12
    epochs are 288 steps and left 12.1% of M=256 latents dead on validation (20 epochs,
    480 steps: 2.7%; lengthened to 84 epochs: 0.0%). A deterministic function of the
    token count, so a resumed run lengthens the same way.
    """
    if settings.epochs == 0 or settings.epochs * n_steps >= settings.min_steps:
        return settings
    epochs = math.ceil(settings.min_steps / n_steps)
    runtime.log(f"EPOCHS={settings.epochs} make {settings.epochs * n_steps} steps ({n_steps} per epoch), fewer than "
                f"MIN_STEPS={settings.min_steps}: training {epochs} epochs (--min_steps=0 trains exactly EPOCHS)")
    return replace(settings, epochs=epochs, config={**settings.config, "EPOCHS": epochs})  # checkpoints: what ran


def train_epoch(sae, optimizer, usage_ema, train: TokenStore, epoch: int, n_steps: int, total_steps: int, tau: float,
                state: TrainState, settings: SAETrainSettings, runtime: Runtime) -> dict:
    """One pass over this rank's shuffled token shard; returns mean train losses."""
    s = settings
    sae.train()
    dtype = amp_dtype(runtime.device, s.amp)
    sums = torch.zeros(2, device=runtime.device)
    fired = torch.zeros(sae.n_latents, device=runtime.device)  # per latent, over this epoch's tokens (all ranks)
    bar = tqdm(total=n_steps * s.batch_size * runtime.world_size, desc=f"epoch {epoch}/{s.epochs}",
               unit="tok", unit_scale=True, disable=None if runtime.is_main else True, leave=False)
    for raw in train.iter_batches(s.batch_size, [s.seed, epoch, runtime.rank], n_steps):
        x = sae.standardize(raw.to(runtime.device, non_blocking=True).float())
        for group in optimizer.param_groups:
            group["lr"] = lr_at(state.step, total_steps, s.lr, s.warmup_fraction)
        dead = dead_mask(usage_ema, s.top_k, s.dead_usage) if s.use_auxk else None
        out = train_step(sae, optimizer, x, dead=dead, k_aux=s.auxk_k if s.use_auxk else 0,
                         aux_coef=s.auxk_coef, dtype=dtype, runtime=runtime,
                         threshold_rate=max(s.threshold_rate, 1 / (state.step + 1)))  # a plain mean at first
        update_usage_ema(usage_ema, out["counts"], out["n"] * runtime.world_size, tau)
        fired += out["counts"]
        sums += torch.stack([out["loss"], out["aux_loss"]])
        state.step += 1
        bar.update(len(x) * runtime.world_size)
    bar.close()
    means = (all_reduce_sum(sums, runtime) / (n_steps * runtime.world_size)).tolist()  # every rank's tokens
    return {"train_fvu": means[0], "train_aux_loss": means[1], "lr": optimizer.param_groups[0]["lr"],
            "train_dead_fraction": dead_share(fired), "train_tokens": n_steps * s.batch_size * runtime.world_size}


def maybe_resample(sae, optimizer, usage_ema, train: TokenStore, epoch: int, settings: SAETrainSettings,
                   runtime: Runtime) -> int:
    """At an epoch end (before RESAMPLE_STOP of training), resample latents dead by usage EMA."""
    s = settings
    if not s.use_resample or epoch > s.resample_stop * s.epochs or epoch == s.epochs:
        return 0
    dead_idx = torch.nonzero(dead_mask(usage_ema, s.top_k, s.dead_usage)).flatten()
    if len(dead_idx) == 0:
        return 0
    sample = next(train.iter_batches(min(s.resample_sample, train.n_tokens), [s.seed, epoch, 7], 1))
    x = sae.standardize(sample.to(runtime.device).float())
    gen = torch.Generator(device=runtime.device).manual_seed(s.seed * 1000 + epoch)
    resample_dead_(sae, optimizer, dead_idx, x, gen, runtime)
    usage_ema[dead_idx] = s.top_k / s.latent_dim  # a fresh grace period
    return len(dead_idx)


# ----------------------------------------------------------------------------- checkpoints
def save_checkpoints(sae, optimizer, usage_ema, state: TrainState, settings: SAETrainSettings,
                     classifier_fingerprint: str, is_best: bool) -> None:
    """best_sae.pt when ``is_best``; last_sae.pt every epoch, with optimiser and loop state."""
    ckpt = artifacts.sae_checkpoint(sae, classifier_fingerprint=classifier_fingerprint,
                                    classifier_path=settings.classifier_ckpt, config=settings.config,
                                    epoch=state.epoch, metrics=state.history[-1], usage_ema=usage_ema)
    out = Path(settings.out_dir)
    if is_best:
        artifacts.save_checkpoint(ckpt, out / artifacts.BEST_SAE)
    ckpt.update(state.to_checkpoint(), optimizer=optimizer.state_dict())
    artifacts.save_checkpoint(ckpt, out / artifacts.LAST_SAE)


def check_resumable(path: str | Path, settings: SAETrainSettings, classifier_fingerprint: str,
                    map_location="cpu", world_size: int = 1) -> dict:
    """``last_sae.pt`` if the run can go on with these settings (same classifier, M, K and ARCH),
    else a UserError saying what to pass; stage 2 asks before its token pass, not after it."""
    artifacts.require_resumable(path)
    ckpt = artifacts.load_checkpoint(path, "sae", map_location=map_location)
    if ckpt["classifier_fingerprint"] != classifier_fingerprint:
        raise UserError(f"{path} was trained on another classifier; start a new run with --overwrite=True")
    saved = (ckpt["n_latents"], ckpt["k"], ckpt.get("arch", "topk"))
    if saved != (settings.latent_dim, settings.top_k, settings.arch):
        raise UserError(f"{path} has M={saved[0]} K={saved[1]} ARCH={saved[2]}; "
                        f"resume with --latent_dim={saved[0]} --top_k={saved[1]} --arch={saved[2]}")
    artifacts.require_same_schedule(path, ckpt.get("config") or {},
                                    {"BATCH_SIZE": settings.batch_size, "WORLD_SIZE": world_size})
    return ckpt


def restore(path: str | Path, sae, optimizer, settings: SAETrainSettings, classifier_fingerprint: str,
            runtime: Runtime) -> tuple[TrainState, torch.Tensor]:
    """Load ``last_sae.pt`` (see :func:`check_resumable`); returns (loop state, usage EMA)."""
    ckpt = check_resumable(path, settings, classifier_fingerprint, runtime.device, runtime.world_size)
    sae.load_state_dict(ckpt["state"])
    optimizer.load_state_dict(ckpt["optimizer"])
    return TrainState.from_checkpoint(ckpt), ckpt["usage_ema"].to(runtime.device)


def finish(state: TrainState, settings: SAETrainSettings, runtime: Runtime) -> dict:
    """Write metrics.json: the best epoch's validation figures and the history."""
    if not state.history:
        return {"epochs": state.epoch, "history": []}
    best = min(state.history, key=lambda r: r["val_fvu"])
    keys = ("val_fvu", "val_l0", "train_dead_fraction", "val_dead_fraction", "val_spliced_accuracy",
            "val_classifier_accuracy", "train_tokens", "val_n_tokens")
    metrics = {k: best[k] for k in keys}
    metrics.update(best_epoch=best["epoch"], epochs=state.epoch, latent_dim=settings.latent_dim,
                   top_k=settings.top_k, arch=settings.arch, dead_latents=settings.dead_latents,
                   dead_min_tokens=min_tokens_for_dead(settings.latent_dim, settings.top_k),
                   world_size=runtime.world_size,
                   tokens_per_s=float(np.mean([r["tokens_per_s"] for r in state.history])), history=state.history)
    out = Path(settings.out_dir)
    if runtime.is_main:
        artifacts.write_json(out / artifacts.METRICS, metrics)
    runtime.log(f"best epoch {best['epoch']}: val_fvu {best['val_fvu']:.4f} L0 {best['val_l0']:.1f} dead train "
                f"{best['train_dead_fraction']:.3f} val {best['val_dead_fraction']:.3f} spliced_acc {best['val_spliced_accuracy']:.4f} "
                f"(classifier {best['val_classifier_accuracy']:.4f}) -> {out / artifacts.BEST_SAE}")
    note = dead_note(best["val_dead_fraction"], best["val_n_tokens"], settings.latent_dim, settings.top_k)
    if note:
        runtime.log(note)
    return metrics


DEAD_TARGET = 0.05  # the share of latents firing on no validation token we aim under (README's checklist)


def dead_note(val_dead: float, val_tokens: int, latent_dim: int, top_k: int) -> str:
    """A warning for a dead share above :data:`DEAD_TARGET`, with what to try; '' otherwise, and ''
    where the validation tokens are too few to tell (the run's first lines already said so).

    Stage 3's "dead" (never active on the summarised training images, many more tokens) is a
    smaller count than this one: a user saw 15.6% here and "4 dead" (1.6%) in the atlas.
    """
    if not val_dead > DEAD_TARGET or val_tokens < min_tokens_for_dead(latent_dim, top_k):
        return ""
    return (f"warning: {100 * val_dead:.1f}% of the {latent_dim} latents fired on none of the {val_tokens} "
            f"validation tokens (we aim for <= {100 * DEAD_TARGET:.0f}%): try a smaller --latent_dim or more images; "
            "stage 3 counts as dead only those that never fire on the training images")


def _log_tensorboard(writer, row: dict, epoch: int) -> None:
    for key in ("train_fvu", "train_aux_loss", "val_fvu", "val_l0", "train_dead_fraction", "val_dead_fraction",
                "ema_dead_fraction",
                "val_spliced_accuracy", "val_classifier_accuracy", "lr", "tokens_per_s", "resampled"):
        writer.add_scalar(key.replace("_", "/", 1), row[key], epoch)
    writer.flush()
