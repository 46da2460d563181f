"""Codes to compare the SAE against, behind one interface: per-token codes of a layer4 map.

Each provider turns a layer4 map (B, C, H, W) into per-token codes (B, H*W, U), the shape
``TopKSAE.codes_for_map`` gives, so :mod:`selfexplain.concept_measures` scores them alike:

* ``sae_code``: an SAE's Top-K code (the trained one, or a random one of the same shape as a floor);
* ``channel_code``: the classifier's own layer4 channels (identity, U = C);
* ``fit_pca``: the top principal directions of the training tokens (signed projections, both signs);
* ``nmf_dictionary`` + ``nmf_code``: non-negative matrix factorisation of the post-ReLU tokens (CRAFT's choice),
  fitted with Lee-Seung multiplicative updates on a token subsample; new tokens are coded
  against the fixed dictionary by the same updates (non-negative least squares).

:func:`comparison_codes` builds the SAE and the baselines asked for, as stage 3 and
``bench/bench_concepts.py`` score them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .errors import UserError
from .sae import TopKSAE, tokens_of

NMF_EPS = 1e-8  # keeps multiplicative updates away from 0/0
BASELINES = ("random_sae", "channels", "pca", "nmf")  # the codes :func:`comparison_codes` can add beside the SAE


@dataclass
class CodeProvider:
    """A named code: ``encode`` maps raw layer4 tokens (N, C) to codes (N, U)."""

    name: str
    n_units: int
    encode: Callable[[torch.Tensor], torch.Tensor]
    natural_zero: bool = True  # 0 means "absent" (SAE, channels, NMF): relative counterfactual drops mean something

    @torch.no_grad()
    def codes_for_map(self, feature_map: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, H*W, U), tokens row-major over (h, w)."""
        b, _, h, w = feature_map.shape
        return self.encode(tokens_of(feature_map.float())).reshape(b, h * w, self.n_units)


def sae_code(sae: TopKSAE, name: str | None = None) -> CodeProvider:
    """The SAE's inference code, as stage 3 and the explanations use it (named "SAE (M=.., K=..)" by default)."""
    return CodeProvider(name or f"SAE (M={sae.n_latents}, K={sae.k})", sae.n_latents,
                        lambda tokens: sae.encode(sae.standardize(tokens)))


def random_sae_like(sae: TopKSAE, seed: int = 0) -> TopKSAE:
    """An untrained SAE of the same shape (M, K) and standardisation: the floor any dictionary must beat.

    It codes by per-token Top-K (exactly K per token), whatever ``sae.arch``: a random SAE has no
    trained BatchTopK threshold θ to apply.
    """
    with torch.random.fork_rng(devices=[]):  # its own draws, the caller's random stream untouched
        torch.manual_seed(seed)
        rand = TopKSAE(sae.d_in, sae.n_latents, sae.k)
    rand = rand.to(sae.mu.device)
    rand.mu.copy_(sae.mu)
    rand.sigma.copy_(sae.sigma)
    return rand.eval()


def channel_code(n_channels: int) -> CodeProvider:
    """The layer4 channels themselves (post-ReLU activations)."""
    return CodeProvider("channels", n_channels, lambda tokens: tokens)


def fit_pca(tokens: torch.Tensor, n_components: int) -> CodeProvider:
    """PCA of the training tokens: codes are signed projections on the top directions, each
    direction as two units, ``+p`` then ``-p`` (2m units).

    An eigenvector's sign is arbitrary, and a unit is scored by its largest value over an
    image's tokens: with one sign only, a direction that finds a part on its negative side
    could never be chosen (4 of the demo's 9 parts; mean held-out AUROC 0.878 against 0.968
    with both). The units are chosen on the training split like every code's. The origin
    (the training mean) is arbitrary too, so PCA has no natural zero: relative
    counterfactual drops are not reported for it. ``n_components`` is capped at the token
    dimension C (PCA has no more directions).
    """
    x = tokens.double()
    mean = x.mean(0)
    cov = (x - mean).T @ (x - mean) / max(len(x) - 1, 1)
    _, vectors = torch.linalg.eigh(cov)                                   # ascending eigenvalues
    m = min(n_components, x.shape[1])
    basis = vectors[:, -m:].flip(1).float()                               # (C, m), largest first
    mean = mean.float()

    def encode(t: torch.Tensor) -> torch.Tensor:
        projections = (t - mean) @ basis
        return torch.cat([projections, -projections], 1)

    return CodeProvider("PCA", 2 * m, encode, natural_zero=False)


def nmf_codes(tokens: torch.Tensor, dictionary: torch.Tensor, iters: int) -> torch.Tensor:
    """Non-negative codes H >= 0 minimising ||X - H W||² for a fixed dictionary W (m, C).

    Multiplicative updates H <- H ⊙ (X Wᵀ) / (H W Wᵀ); X Wᵀ and W Wᵀ are computed once,
    so each iteration costs N·m² only.
    """
    xw = (tokens @ dictionary.T).clamp_min(0)                             # (N, m)
    ww = dictionary @ dictionary.T                                        # (m, m)
    h = torch.full_like(xw, float(tokens.mean().clamp_min(NMF_EPS) / dictionary.shape[0]) ** 0.5)
    for _ in range(iters):
        h = h * xw / (h @ ww + NMF_EPS)
    return h


def nmf_dictionary(tokens: torch.Tensor, n_components: int, iters: int = 200, max_tokens: int = 8192,
                   seed: int = 0) -> torch.Tensor:
    """The NMF dictionary W (m, C) of X ≈ H W for non-negative tokens X (N, C).

    Parameters
    ----------
    tokens : (N, C) post-ReLU layer4 tokens (must be non-negative).
    n_components : m, rows of W.
    iters : alternating multiplicative-update rounds (Lee & Seung) on the fit subsample.
    max_tokens : fit on at most this many tokens, drawn at random (keeps it seconds on a CPU).

    Returns
    -------
    W with unit-norm rows, so the units' activations are on one scale.
    """
    if tokens.min() < 0:
        raise UserError("NMF needs non-negative tokens (the post-ReLU layer4 map)")
    g = torch.Generator().manual_seed(seed)                                # CPU draws: the same fit on any device
    x = tokens[torch.randperm(len(tokens), generator=g)[:max_tokens].to(tokens.device)].float()
    scale = float(x.mean().clamp_min(NMF_EPS) / n_components) ** 0.5      # scikit-learn's "random" init scale
    h = (torch.rand(len(x), n_components, generator=g) * scale).to(x.device)
    w = (torch.rand(n_components, x.shape[1], generator=g) * scale).to(x.device)
    for _ in range(iters):
        h = h * (x @ w.T) / (h @ (w @ w.T) + NMF_EPS)
        w = w * (h.T @ x) / ((h.T @ h) @ w + NMF_EPS)
    return w / w.norm(dim=1, keepdim=True).clamp_min(NMF_EPS)


def nmf_code(dictionary: torch.Tensor, code_iters: int = 50) -> CodeProvider:
    """NMF codes against a fixed dictionary from :func:`nmf_dictionary`."""
    return CodeProvider("NMF", dictionary.shape[0], lambda t: nmf_codes(t.float(), dictionary, code_iters))


def comparison_codes(sae: TopKSAE, tokens: torch.Tensor | None, which=BASELINES, nmf_iters: int = 200,
                     nmf_tokens: int = 8192, nmf_code_iters: int = 50, seed: int = 0) -> dict[str, CodeProvider]:
    """The SAE (key ``sae``, first) and the baselines named in ``which`` (keys from :data:`BASELINES`).

    Parameters
    ----------
    sae : the trained SAE; the random SAE, PCA and NMF get as many units as it has latents.
    tokens : (N, C) raw post-ReLU layer4 tokens of training images, to fit PCA and NMF on
        (unused, and may be None, when ``which`` names neither).
    nmf_iters, nmf_tokens, nmf_code_iters : see :func:`nmf_dictionary` and :func:`nmf_code`.
    seed : the random SAE's weights and NMF's token sample and initialisation.
    """
    unknown = set(which) - set(BASELINES)
    if unknown:
        raise UserError(f"unknown baseline(s) {sorted(unknown)}; choose from {', '.join(BASELINES)}")
    m = sae.n_latents
    build = {"random_sae": lambda: sae_code(random_sae_like(sae, seed), "random SAE (same shape)"),
             "channels": lambda: channel_code(sae.d_in), "pca": lambda: fit_pca(tokens, m),
             "nmf": lambda: nmf_code(nmf_dictionary(tokens, m, nmf_iters, nmf_tokens, seed), nmf_code_iters)}
    return {"sae": sae_code(sae), **{key: build[key]() for key in BASELINES if key in which}}
