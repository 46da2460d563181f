"""Token-space Top-K sparse autoencoder over the classifier's layer4 map: all of its maths.

Every spatial position of the layer4 map A (B, C, H, W) is a token a in R^C. Tokens are
standardised per channel, ã = (a - μ) / σ, then

    s = W_e ã + b_e,   z = TopK(ReLU(s)),   â = D z + b_d

with unit-norm decoder columns d_i. Two sparsity rules (``arch``, recorded in the checkpoint):

* ``topk``: each token keeps its K largest ReLU pre-activations, in training and after.
* ``batchtopk`` (Bussmann et al. 2024): in training a batch of B tokens keeps its K·B
  largest ReLU pre-activations, so busy tokens take more latents and plain ones fewer;
  at inference every token uses one threshold θ estimated in training (a running mean
  of the smallest kept activation per batch): z = ReLU(s) · (s > θ). The sparse form
  (values, indices) then holds each token's ``k_max`` = BATCH_K_CAP·K largest
  pre-activations with the ones at or below θ zeroed, so a token can use up to 4K
  latents (mean L0 ≈ K); the zeros decode to nothing, so the code is exactly what
  the SAE decodes. In the original space the reconstruction is
Â = σ ⊙ (D z + b_d) + μ, which is what gets spliced back into the classifier head.
Decoding gathers only the K active columns (``embedding_bag``), so its cost does not
grow with the number of latents M (a code using a large share of the M, AuxK's, goes
through one dense matmul instead: :meth:`TopKSAE.decode_sparse`).

Training, statistics and explanation all use the functions here: tokens <-> map,
encoding (:meth:`TopKSAE.encode_topk`, and :class:`TopKEncode` for training, same
forward with a sparse backward), decoding (:meth:`TopKSAE.decode_sparse`), the FVU,
the neuron logit lens and the bias term.

Speed notes (2-core CPU, C=512, M=2048, K=20, 4096 tokens, ``bench/bench_sae.py``):

* The encoder matmul W_e ã is the one dense (N, M) product left. Its backward is not:
  only K entries per token carry gradient, so ``dL/dW_e = Sᵀ ã`` with S sparse (N, M).
  :class:`TopKEncode` computes it as a CSR sparse x dense product instead of a dense
  (N, M) x (N, C) matmul (autograd) or an (N·K, C) ``index_add_`` (sparsify).
* ``embedding_bag`` wants a contiguous (M, C) table; ``D.t()`` is a strided view and
  measured ~30x slower, so decoding gathers from ``D.t().contiguous()``.
"""
from __future__ import annotations

import contextlib
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

ENCODER_INIT_SCALE = 3 ** -0.5  # encoder rows start at this norm (decoder columns at 1)
ARCHS = ("topk", "batchtopk")   # the sparsity rules (see the module docstring)
BATCH_K_CAP = 4                 # batchtopk: at most BATCH_K_CAP·K active latents per token (sparse storage width)
DENSE_DECODE_SHARE = 1 / 6      # decode_sparse: codes at least this wide (share of M) decode through a dense matmul


# ----------------------------------------------------------------------------- tokens <-> map
def tokens_of(feature_map: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> raw tokens (B*H*W, C), row-major over (h, w)."""
    b, c, h, w = feature_map.shape
    return feature_map.permute(0, 2, 3, 1).reshape(b * h * w, c)


def tokens_to_map(tokens: torch.Tensor, b: int, h: int, w: int) -> torch.Tensor:
    """(B*H*W, C) tokens, row-major over (h, w) -> (B, C, H, W): the inverse of :func:`tokens_of`."""
    return tokens.reshape(b, h, w, -1).permute(0, 3, 1, 2)


# ----------------------------------------------------------------------------- encoding
def top_k_relu(pre: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, indices) of the ``k`` largest pre-activations per row, values through ReLU."""
    values, indices = pre.topk(k, dim=-1, sorted=False)
    return F.relu(values), indices


def fvu_loss(x: torch.Tensor, recon: torch.Tensor) -> torch.Tensor:
    """Σ||x - x̂||² / Σ||x - mean(x)||² over a batch (the training objective)."""
    return (recon - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum().clamp_min(1e-12)


class TopKSAE(nn.Module):
    """Top-K (or BatchTopK) SAE with standardisation buffers.

    Parameters
    ----------
    d_in : token dimension C (512 for ResNet-18 layer4).
    n_latents : number of latents M.
    k : active latents per token K (batchtopk: on average).
    arch : ``topk`` or ``batchtopk``; batchtopk adds the buffer ``threshold`` (θ).
    """

    def __init__(self, d_in: int, n_latents: int, k: int, arch: str = "topk"):
        super().__init__()
        if not 0 < k <= n_latents:
            raise ValueError(f"need 0 < K <= M, got K={k}, M={n_latents}")
        if arch not in ARCHS:
            raise ValueError(f"arch must be one of {ARCHS}, got {arch!r}")
        self.d_in, self.n_latents, self.k, self.arch = d_in, n_latents, k, arch
        # width of the sparse (values, indices) code: K, or the batchtopk cap
        self.k_max = k if arch == "topk" else min(n_latents, BATCH_K_CAP * k)
        if arch == "batchtopk":
            self.register_buffer("threshold", torch.zeros(()))
        decoder = torch.randn(d_in, n_latents)
        decoder /= decoder.norm(dim=0, keepdim=True)
        self.D = nn.Parameter(decoder)                        # (C, M), unit-norm columns
        # Encoder = D^T scaled to the row norm of a default nn.Linear (1/sqrt(3)): with Adam's
        # fixed step size, smaller rows let latents specialise sooner (bench: FVU 0.032 vs 0.035
        # after 150 steps at M=2048, K=20).
        self.W_e = nn.Parameter(decoder.t().clone() * ENCODER_INIT_SCALE)  # (M, C)
        self.b_e = nn.Parameter(torch.zeros(n_latents))
        self.b_d = nn.Parameter(torch.zeros(d_in))
        self.register_buffer("mu", torch.zeros(d_in))
        self.register_buffer("sigma", torch.ones(d_in))

    # ------------------------------------------------------------------ standardisation
    def standardize(self, a: torch.Tensor) -> torch.Tensor:
        return (a - self.mu) / self.sigma

    def unstandardize(self, a_std: torch.Tensor) -> torch.Tensor:
        return a_std * self.sigma + self.mu

    # ------------------------------------------------------------------ codes
    def pre_acts(self, x: torch.Tensor) -> torch.Tensor:
        """s = W_e ã + b_e for standardised tokens ``x`` (N, C) -> (N, M)."""
        return F.linear(x, self.W_e, self.b_e)

    def dense_code(self, x: torch.Tensor) -> torch.Tensor:
        """The dense ReLU code (before Top-K), (N, M)."""
        return F.relu(self.pre_acts(x))

    def encode_topk(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The inference code as (values, indices), each (N, k_max).

        topk: the K largest ReLU pre-activations per token. batchtopk: the k_max largest,
        those at or below the threshold θ set to 0 (z = ReLU(s) · (s > θ)).
        """
        values, indices = top_k_relu(self.pre_acts(x), self.k_max)
        if self.arch == "batchtopk":
            values = values.masked_fill(values <= self.threshold, 0.0)
        return values, indices

    @torch.no_grad()
    def update_threshold_(self, kept: torch.Tensor, rate: float, reduce_sum=None) -> None:
        """batchtopk: move θ towards the smallest positive kept activation of a training batch.

        ``rate`` is the running-mean weight (1/(step+1) early on, a floor later: an EMA).
        ``reduce_sum(t)`` (DDP) sums a tensor over ranks in place: θ moves towards the mean of
        the ranks' values, so every replica moves alike and the estimate is the one a single
        process makes (their minimum, used before, sat lower the more ranks: L0 4.32 for K=4
        at 8 ranks).
        """
        positive = kept[kept > 0]
        found = torch.stack([positive.min().float() if len(positive) else kept.new_zeros((), dtype=torch.float32),
                             kept.new_tensor(float(len(positive) > 0), dtype=torch.float32)])
        if reduce_sum is not None:
            reduce_sum(found)
        if found[1].item() > 0:
            self.threshold.lerp_((found[0] / found[1]).to(self.threshold.dtype), rate)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """The inference code as a dense (N, M) tensor (zeros outside the kept latents)."""
        values, indices = self.encode_topk(x)
        return torch.zeros(x.shape[0], self.n_latents, dtype=values.dtype, device=x.device).scatter_(1, indices, values)

    # ------------------------------------------------------------------ decoding
    def decode_sparse(self, values: torch.Tensor, indices: torch.Tensor, bias: bool = True) -> torch.Tensor:
        """â = Σ_k values_k d_{indices_k} (+ b_d), gathering only the active columns.

        A code at least ``DENSE_DECODE_SHARE`` of the M latents wide (AuxK's code with many dead latents)
        is scattered into a dense (N, M) code and decoded by one matmul instead: there
        ``embedding_bag``'s backward costs more than the matmul (N=512, M=512 on 2 CPU
        cores, forward + backward: k=256 11.3 ms vs 5.1 ms; k=64 4.3 vs 4.8; k=4 1.4 vs 4.9).
        """
        if indices.shape[1] >= DENSE_DECODE_SHARE * self.n_latents:
            z = values.new_zeros(len(values), self.n_latents).scatter(1, indices, values)
            return F.linear(z.to(self.D.dtype), self.D, self.b_d if bias else None)
        out = F.embedding_bag(indices, self.D.t().contiguous(), per_sample_weights=values.to(self.D.dtype), mode="sum")
        return out + self.b_d if bias else out

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """â = D z + b_d for a dense code z (N, M)."""
        return F.linear(z, self.D, self.b_d)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Standardised tokens -> (reconstruction, code values, code indices) at inference."""
        values, indices = self.encode_topk(x)
        return self.decode_sparse(values, indices), values, indices

    # ------------------------------------------------------------------ maps
    def map_to_tokens(self, feature_map: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> standardised tokens (B*H*W, C), row-major over (h, w)."""
        return self.standardize(tokens_of(feature_map.float()))

    def codes_for_map(self, feature_map: torch.Tensor, dense: bool = False) -> torch.Tensor:
        """Per-token codes of a layer4 map as (B, H*W, M): the inference code (default) or dense ReLU."""
        b, _, h, w = feature_map.shape
        x = self.map_to_tokens(feature_map)
        z = self.dense_code(x) if dense else self.encode(x)
        return z.reshape(b, h * w, self.n_latents)

    def reconstruct_map(self, feature_map: torch.Tensor) -> torch.Tensor:
        """Â = σ ⊙ (D z + b_d) + μ in the shape of ``feature_map`` (B, C, H, W)."""
        b, _, h, w = feature_map.shape
        recon, _, _ = self(self.map_to_tokens(feature_map))
        return tokens_to_map(self.unstandardize(recon), b, h, w)

    @torch.no_grad()
    def start_at_channels_(self) -> None:
        """Start latent i < C as channel i (decoder column e_i, encoder row e_i at the usual scale); latents past
        C keep their random start. A data-informed start: training moves the columns away from the axes
        (median cosine with their own axis ~0.3 after the demo's 12 epochs), but from one place for every seed."""
        if self.n_latents < self.d_in:
            raise ValueError(f"a channel start needs M >= C, got M={self.n_latents}, C={self.d_in}")
        eye = torch.eye(self.d_in, device=self.D.device, dtype=self.D.dtype)
        self.D[:, :self.d_in] = eye
        self.W_e[:self.d_in] = eye * ENCODER_INIT_SCALE

    # ------------------------------------------------------------------ constraints
    @torch.no_grad()
    def normalize_decoder_(self) -> None:
        """Renormalise decoder columns to unit norm (after every optimiser step)."""
        self.D.div_(self.D.norm(dim=0, keepdim=True).clamp_min(1e-8))

    @torch.no_grad()
    def remove_parallel_grad_(self) -> None:
        """Drop the gradient component parallel to each decoder column.

        With unit-norm columns, that component only changes the norm, which the
        renormalisation would undo anyway; removing it keeps Adam's state honest.
        """
        if self.D.grad is not None:
            parallel = (self.D.grad * self.D).sum(dim=0, keepdim=True)
            self.D.grad.sub_(parallel * self.D)


# ----------------------------------------------------------------------------- training encoder
def _csr_grad(indices: torch.Tensor, grads: torch.Tensor, x: torch.Tensor, n_rows: int):
    """(Sᵀ x, Sᵀ 1) for the sparse S (N, n_rows) with S[n, indices[n, j]] = grads[n, j].

    A latent listed twice in one row (a Top-K latent that is also an AuxK pick) gets
    both entries: the CSR product sums duplicates, as the dense gradient does.
    """
    n, kk = indices.shape
    rows = indices.reshape(-1)
    order = torch.argsort(rows, stable=True)
    cols = torch.arange(n, device=x.device).repeat_interleave(kk)[order]
    crow = torch.zeros(n_rows + 1, dtype=torch.int64, device=x.device)
    crow[1:] = torch.bincount(rows, minlength=n_rows).cumsum(0)
    vals = grads.reshape(-1)[order].to(x.dtype)
    with warnings.catch_warnings():  # torch flags CSR tensors as beta on first use; local, not process-wide
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        s = torch.sparse_csr_tensor(crow, cols, vals, (n_rows, n), check_invariants=False)
    return s @ x, torch.zeros(n_rows, dtype=x.dtype, device=x.device).index_add_(0, rows, grads.reshape(-1).to(x.dtype))


def batch_top_k_(values: torch.Tensor, k_batch: int) -> torch.Tensor:
    """Keep the ``k_batch`` largest entries of ``values`` (N, k) over the whole batch, zero the rest.

    With ``values`` each token's k largest ReLU pre-activations this is BatchTopK with at
    most k latents per token (exact BatchTopK whenever no token wants more than k).
    """
    flat = values.reshape(-1)
    keep = torch.zeros_like(flat, dtype=torch.bool)
    keep[flat.topk(min(k_batch, len(flat)), sorted=False).indices] = True
    return values.masked_fill_(~keep.view_as(values), 0.0)


class TopKEncode(torch.autograd.Function):
    """Top-K or BatchTopK (and AuxK) codes with a sparse backward into W_e and b_e.

    ``TopKEncode.apply(x, w_e, b_e, k, k_aux, dead, dtype, k_batch)``: each token's ``k``
    largest ReLU pre-activations (``top_k_relu(W_e x + b_e)``), the matmul under autocast
    to ``dtype`` (None = fp32); with ``k_batch`` > 0 only the ``k_batch`` largest of
    those over the batch are kept (BatchTopK, :func:`batch_top_k_`), the rest zeroed; with
    ``k_aux`` > 0 it also returns the top ``k_aux`` ReLU pre-activations among the
    ``dead`` latents. Returns (values, indices, aux values, aux indices). Zeroed entries
    get no gradient; the input x gets none either (tokens are data).
    """

    @staticmethod
    def forward(ctx, x, w_e, b_e, k: int, k_aux: int, dead, dtype, k_batch: int = 0):
        cast = torch.autocast(x.device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()
        with cast:
            pre = F.linear(x, w_e, b_e)
        pre = pre.float()
        values, idx = top_k_relu(pre, k)
        if k_batch > 0:
            batch_top_k_(values, k_batch)
        if k_aux > 0:
            aux, aux_idx = top_k_relu(pre.masked_fill(~dead, float("-inf")), k_aux)
        else:
            aux, aux_idx = pre.new_zeros(len(x), 0), idx.new_zeros(len(x), 0)
        ctx.save_for_backward(x, idx, aux_idx, values > 0, aux > 0)
        ctx.n_latents = w_e.shape[0]
        return values, idx, aux, aux_idx

    @staticmethod
    def backward(ctx, g_top, _g_idx, g_aux, _g_aux_idx):
        x, idx, aux_idx, on, aux_on = ctx.saved_tensors
        grads = g_top * on
        if aux_idx.shape[1]:
            idx = torch.cat([idx, aux_idx], 1)
            grads = torch.cat([grads, g_aux * aux_on], 1)
        g_w, g_b = _csr_grad(idx, grads, x.float(), ctx.n_latents)
        return None, g_w, g_b, None, None, None, None, None


# ----------------------------------------------------------------------------- the classifier head
def logit_lens(sae: TopKSAE, fc_weight: torch.Tensor) -> torch.Tensor:
    """w_i = W_out (d_i ⊙ σ) for every latent: (M, num_classes).

    A latent with mean code m over the tokens of an image adds m · w_i[c] to class c's logit.
    """
    return (sae.D * sae.sigma[:, None]).t() @ fc_weight.t().to(sae.D.dtype)


def bias_logits(sae: TopKSAE, fc_weight: torch.Tensor, fc_bias: torch.Tensor) -> torch.Tensor:
    """The image-independent term W (σ ⊙ b_d + μ) + b per class: (num_classes,)."""
    return fc_weight.to(sae.D.dtype) @ (sae.sigma * sae.b_d + sae.mu) + fc_bias.to(sae.D.dtype)
