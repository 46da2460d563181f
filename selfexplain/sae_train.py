"""Training helpers for the Top-K SAE: token cache, fast sparse step, dead latents, metrics.

Speed notes (2-core AVX2 CPU, C=512, M=2048, K=20, 4096 tokens, see bench/RESULTS_sae.md):

* The encoder matmul W_e ã is the one dense (N, M) product left. Its backward is not:
  only K entries per token carry gradient, so ``dL/dW_e = Sᵀ ã`` with S sparse (N, M).
  :class:`TopKEncode` computes it as a CSR sparse x dense product instead of a dense
  (N, M) x (N, C) matmul (autograd) or an (N·K, C) ``index_add_`` (sparsify).
* ``embedding_bag`` wants a contiguous (M, C) table; ``D.t()`` is a strided view and
  measured ~30x slower, so decoding here gathers from ``D.t().contiguous()``.
* bf16 autocast is emulated on CPUs without AVX512-BF16/AMX (2.5x slower matmul), so
  AMP stays fp32 there (``distributed.amp_dtype``).
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .distributed import Runtime, all_reduce_sum, autocast, broadcast
from .features import iter_feature_maps, tokens_of
from .sae import TopKSAE

# The sparse weight-gradient product uses CSR tensors; torch flags them as beta on every call.
warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")


# ----------------------------------------------------------------------------- token cache
@dataclass
class TokenStore:
    """Cached layer4 tokens of some images: fp16 (N, C), image-major, H*W tokens per image.

    ``tokens`` is an in-RAM array or an ``np.memmap`` on disk; ``image_index`` holds the
    dataset index of each image (in token order) and ``hw`` the map's (H, W).
    """

    tokens: np.ndarray
    image_index: np.ndarray
    hw: tuple[int, int]

    @property
    def n_tokens(self) -> int:
        return len(self.tokens)

    def iter_batches(self, batch_size: int, seed, n_batches: int, chunk: int = 1 << 18):
        """Yield ``n_batches`` shuffled fp16 batches (torch) of ``batch_size`` tokens.

        Shuffles fully when in RAM; a memmap is read chunk by chunk (chunk order and rows
        within a chunk shuffled) so reads stay sequential.
        """
        rng = np.random.default_rng(seed)
        n = self.n_tokens
        in_ram = not isinstance(self.tokens, np.memmap)
        starts = [0] if in_ram else list(rng.permutation(np.arange(0, n, chunk)))
        carry, made = None, 0
        for s in starts:
            block = self.tokens if in_ram else self.tokens[s:s + chunk]
            block = np.asarray(block)[rng.permutation(len(block))]
            if carry is not None:
                block = np.concatenate([carry, block])
            full = len(block) // batch_size
            for b in range(full):
                if made == n_batches:
                    return
                yield torch.from_numpy(block[b * batch_size:(b + 1) * batch_size])
                made += 1
            carry = block[full * batch_size:]


def map_shape(model, image_size: int, device) -> tuple[int, int, int]:
    """(C, H, W) of the layer4 map for ``image_size`` inputs."""
    with torch.no_grad():
        fmap = model.eval().features(torch.zeros(1, 1, image_size, image_size, device=device))
    return tuple(fmap.shape[1:])


def cache_tokens(model, images, indices, prep, device, *, ram_gb: float, disk_path: str | Path,
                 batch_size: int = 256, amp: str = "auto", progress: bool = False, desc: str = "tokens",
                 stats: bool = False):
    """Run the frozen backbone once over ``indices`` and store the tokens as fp16.

    Returns (TokenStore, sums) where ``sums`` = (n, Σa, Σa²) in float64 when ``stats``.
    Tokens go to RAM when they fit in ``ram_gb``, else to a memory-mapped ``.npy`` at
    ``disk_path`` (written to a temp name, renamed when complete, reused next time).
    """
    c, h, w = map_shape(model, prep["image_size"], device)
    indices = np.sort(np.asarray(indices))
    n_tok = len(indices) * h * w
    disk_path = Path(disk_path)
    on_disk = n_tok * c * 2 > ram_gb * 2 ** 30
    if on_disk and disk_path.is_file() and not stats:
        arr = np.load(disk_path, mmap_mode="r")
        if arr.shape == (n_tok, c):
            return TokenStore(arr, indices, (h, w)), None
    if on_disk:
        disk_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = disk_path.with_name(disk_path.name + ".tmp.npy")
        arr = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16, shape=(n_tok, c))
    else:
        arr = np.empty((n_tok, c), dtype=np.float16)
    s1 = torch.zeros(c, dtype=torch.float64, device=device)
    s2 = torch.zeros(c, dtype=torch.float64, device=device)
    pos = 0
    for _, fmap, _ in iter_feature_maps(model, images, indices, prep, device, batch_size, amp, progress, desc):
        tok = tokens_of(fmap)
        if stats:  # float64 accumulation: sums over ~10^6 tokens lose precision in fp32
            s1 += tok.double().sum(0)
            s2 += tok.double().pow(2).sum(0)
        arr[pos:pos + len(tok)] = tok.clamp(-6e4, 6e4).half().cpu().numpy()
        pos += len(tok)
    if on_disk:
        arr.flush()
        del arr
        tmp.replace(disk_path)
        arr = np.load(disk_path, mmap_mode="r")
    return TokenStore(arr, indices, (h, w)), ((n_tok, s1, s2) if stats else None)


def standardization(n: int, s1: torch.Tensor, s2: torch.Tensor, runtime: Runtime) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel μ, σ over all ranks' training tokens (float64 sums, all-reduced).

    A channel whose σ is below 1% of the median σ (e.g. always 0 after the ReLU) gets
    that floor, so a rare non-zero value on new data cannot explode after dividing.
    """
    total = all_reduce_sum(torch.cat([s1, s2, torch.tensor([float(n)], dtype=torch.float64, device=s1.device)]),
                           runtime)
    c = len(s1)
    count = total[-1]
    mu = total[:c] / count
    var = (total[c:2 * c] / count - mu ** 2).clamp_min(0)
    sigma = var.sqrt()
    floor = 0.01 * sigma.median().clamp_min(1e-8)
    return mu.float(), sigma.clamp_min(floor).float()


# ----------------------------------------------------------------------------- sparse step
def _csr_grad(indices: torch.Tensor, grads: torch.Tensor, x: torch.Tensor, n_rows: int):
    """(Sᵀ x, Sᵀ 1) for the sparse S (N, n_rows) with S[n, indices[n, j]] = grads[n, j]."""
    n, kk = indices.shape
    rows = indices.reshape(-1)
    order = torch.argsort(rows, stable=True)
    cols = torch.arange(n, device=x.device).repeat_interleave(kk)[order]
    crow = torch.zeros(n_rows + 1, dtype=torch.int64, device=x.device)
    crow[1:] = torch.bincount(rows, minlength=n_rows).cumsum(0)
    vals = grads.reshape(-1)[order].to(x.dtype)
    s = torch.sparse_csr_tensor(crow, cols, vals, (n_rows, n), check_invariants=False)
    return s @ x, torch.zeros(n_rows, dtype=x.dtype, device=x.device).index_add_(0, rows, grads.reshape(-1).to(x.dtype))


class TopKEncode(torch.autograd.Function):
    """Top-K (and AuxK) codes with a sparse backward into W_e and b_e.

    Forward equals ``TopKSAE.encode_topk``: ``relu(topk(W_e x + b_e))``; with ``k_aux``
    > 0 it also returns the top ``k_aux`` ReLU pre-activations among ``dead`` latents.
    The input x gets no gradient (tokens are data).
    """

    @staticmethod
    def forward(ctx, x, w_e, b_e, k: int, k_aux: int, dead, amp_device, amp: str):
        with autocast(amp_device, amp):
            pre = F.linear(x, w_e, b_e)
        pre = pre.float()
        top, idx = pre.topk(k, dim=-1, sorted=False)
        if k_aux > 0:
            aux, aux_idx = pre.masked_fill(~dead, float("-inf")).topk(k_aux, dim=-1, sorted=False)
        else:
            aux, aux_idx = pre.new_zeros(len(x), 0), idx.new_zeros(len(x), 0)
        ctx.save_for_backward(x, idx, aux_idx, top > 0, aux > 0)
        ctx.n_latents = w_e.shape[0]
        return F.relu(top), idx, F.relu(aux), aux_idx

    @staticmethod
    def backward(ctx, g_top, _g_idx, g_aux, _g_aux_idx):
        x, idx, aux_idx, on, aux_on = ctx.saved_tensors
        grads = g_top * on
        if aux_idx.shape[1]:
            idx = torch.cat([idx, aux_idx], 1)
            grads = torch.cat([grads, g_aux * aux_on], 1)
        g_w, g_b = _csr_grad(idx, grads, x.float(), ctx.n_latents)
        return None, g_w, g_b, None, None, None, None, None


def decode(values: torch.Tensor, indices: torch.Tensor, decoder: torch.Tensor, bias: torch.Tensor | None):
    """Σ_k values_k d_{indices_k} (+ bias), gathering from a contiguous (M, C) table."""
    out = F.embedding_bag(indices, decoder.t().contiguous(), per_sample_weights=values, mode="sum")
    return out if bias is None else out + bias


def fvu_loss(x: torch.Tensor, recon: torch.Tensor) -> torch.Tensor:
    """Σ||x - x̂||² / Σ||x - mean(x)||² over a batch (the training objective)."""
    return (recon - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum().clamp_min(1e-12)


def train_step(sae: TopKSAE, optimizer, x: torch.Tensor, *, dead: torch.Tensor | None = None, k_aux: int = 0,
               aux_coef: float = 0.0, amp: str = "off", runtime: Runtime | None = None) -> dict:
    """One optimiser step on standardised tokens ``x`` (N, C); returns detached stats.

    Loss = FVU(x, x̂) + aux_coef · FVU(e, ê), where e = x - x̂ (detached) and ê decodes the
    top ``k_aux`` dead latents (AuxK, Gao et al. 2024). Under DDP the gradients and the
    latent counts are summed across ranks. Decoder columns stay unit-norm.
    """
    k_aux = min(k_aux, int(dead.sum())) if dead is not None else 0
    dead_mask = dead if dead is not None else torch.zeros(sae.n_latents, dtype=torch.bool, device=x.device)
    values, idx, aux_v, aux_idx = TopKEncode.apply(x, sae.W_e, sae.b_e, sae.k, k_aux, dead_mask, x.device, amp)
    recon = decode(values, idx, sae.D, sae.b_d)
    loss = fvu_loss(x, recon)
    aux_loss = torch.zeros((), device=x.device)
    if k_aux > 0:
        residual = (x - recon).detach()
        aux_loss = fvu_loss(residual, decode(aux_v, aux_idx, sae.D, None))
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


def make_optimizer(sae: TopKSAE, lr: float) -> torch.optim.Optimizer:
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


@torch.no_grad()
def resample_dead_(sae: TopKSAE, optimizer, dead_idx: torch.Tensor, x_sample: torch.Tensor,
                   generator: torch.Generator | None = None, runtime: Runtime | None = None) -> torch.Tensor:
    """Re-initialise ``dead_idx`` latents from tokens the SAE reconstructs badly.

    Tokens of ``x_sample`` are drawn with probability ∝ squared error²; each dead latent
    gets its token's unit direction (x - b_d)/||x - b_d|| as decoder column (residual
    directions of different tokens share -x̂ components and made revived latents crowd
    each other out of the top K), the same direction as encoder row, scaled so its pre-activation on that token just exceeds the
    token's current K-th largest (so it enters the token's top K; the scale is capped at
    twice the median encoder row norm), and b_e = 0. Adam's
    moments of those rows are zeroed. Under DDP rank 0 decides and broadcasts.
    Returns the indices of the chosen tokens (rows of ``x_sample``).
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
        kth = sae.pre_acts(token).topk(sae.k, dim=1).values[:, -1].clamp_min(1e-3)
        # aim just above the token's K-th pre-activation; the median-norm cap stops a
        # ratchet (scales taken from earlier resampled rows growing every round)
        proj = (direction * token).sum(1).clamp_min(0.1 * token.norm(dim=1).clamp_min(1e-6))
        scale = (kth * 1.05 / proj).clamp(max=2 * sae.W_e.norm(dim=1).median())
        sae.D[:, dead_idx] = direction.t().to(sae.D.dtype)
        sae.W_e[dead_idx] = (direction * scale[:, None]).to(sae.W_e.dtype)
        sae.b_e[dead_idx] = 0
    else:
        pick = dead_idx.new_zeros(n)
    if runtime is not None and runtime.distributed:
        for p in (sae.D, sae.W_e, sae.b_e):
            broadcast(p.data, runtime)
    _reset_adam_rows(optimizer, sae, dead_idx)
    return pick


def _reset_adam_rows(optimizer, sae: TopKSAE, idx: torch.Tensor) -> None:
    """Zero Adam's moments for the latents ``idx`` (rows of W_e, b_e; columns of D)."""
    for p, view in ((sae.W_e, lambda t: t[idx]), (sae.b_e, lambda t: t[idx]), (sae.D, lambda t: t[:, idx])):
        state = optimizer.state.get(p, {})
        for key in ("exp_avg", "exp_avg_sq"):
            if key in state:
                if p is sae.D:
                    state[key][:, idx] = 0
                else:
                    state[key][idx] = 0


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
                "dead_fraction": (fired == 0).double().mean().item(), "n_tokens": int(n)}


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
        values, idx = sae.encode_topk(x)
        recon = decode(values, idx, sae.D, sae.b_d)
        metrics.update(x, recon, values, idx)
        amap = a.reshape(len(img), h, w, -1).permute(0, 3, 1, 2)
        rmap = sae.unstandardize(recon).reshape(len(img), h, w, -1).permute(0, 3, 1, 2)
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
    """True when every rank holds the same SAE weights (checked via a broadcast checksum)."""
    if not runtime.distributed:
        return True
    mine = torch.stack([p.detach().double().sum() for p in sae.parameters()]
                       + [p.detach().double().abs().sum() for p in sae.parameters()])
    ref = broadcast(mine.clone(), runtime)
    ok = torch.tensor([float(torch.equal(mine, ref))], device=mine.device)
    torch.distributed.all_reduce(ok, op=torch.distributed.ReduceOp.MIN)
    return bool(ok.item())
