"""Benchmark: this project's Top-K SAE step vs overcomplete and EleutherAI sparsify, on CPU.

Usage
-----
    .venv/bin/pip install --no-deps -r bench/requirements-bench.txt   # once (torch stays as it is)
    python bench/bench_sae.py                                         # M=2048, K=20, batch 4096
    python bench/bench_sae.py --classifier_ckpt=/tmp/r64/best.pt --cache_dir=/tmp/cache --steps=30

All three train on the same cached, standardised layer4 tokens (train_sae's cache), with
the same M, K, batch, Adam learning rate and number of steps, fp32, same thread count;
reports tokens/s (training steps only) and validation FVU side by side, prints the table
and writes it to bench/results/sae.md.
"""
from __future__ import annotations

import importlib.util
import sys
import time
import types
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from selfexplain import artifacts, data  # noqa: E402
from selfexplain import sae_train as st  # noqa: E402
from selfexplain.config import make_config, module_constants, run_cli  # noqa: E402
from selfexplain.distributed import Runtime, keep_freed_memory, set_threads  # noqa: E402
from selfexplain.features import cache_tokens, standardization  # noqa: E402
from selfexplain.sae import TopKSAE, fvu_loss  # noqa: E402

CLASSIFIER_CKPT = artifacts.CLASSIFIER_CKPT  # classifier whose layer4 tokens are used
CACHE_DIR = artifacts.CACHE_DIR  # decoded-image cache
LATENT_DIM = 2048              # M (the TU-Berlin size)
TOP_K = 20                     # K
BATCH_SIZE = 4096              # tokens per step
STEPS = 150                    # timed optimiser steps per implementation (after WARMUP); FVU compared after them
WARMUP = 3                     # untimed steps first
LR = 1e-3                      # Adam learning rate, all implementations
NUM_THREADS = 0                # CPU threads (0 = torch default)
OUT = "bench/results/sae.md"   # where the table goes (bench/run_all.py merges it into RESULTS.md)
SEED = 0                       # init and batch order


# ----------------------------------------------------------------------------- peers
def import_overcomplete():
    """overcomplete 0.3.0 calls matplotlib.cm.get_cmap, removed in matplotlib 3.9."""
    import matplotlib
    import matplotlib.cm

    if not hasattr(matplotlib.cm, "get_cmap"):
        matplotlib.cm.get_cmap = matplotlib.colormaps.get_cmap
    from overcomplete.sae import TopKSAE as OcTopK

    return OcTopK


def import_sparsify():
    """sparsify's SparseCoder without its trainer (datasets etc.), eager decoder on CPU."""
    spec = importlib.util.find_spec("sparsify")
    if spec is None:
        raise ImportError("eai-sparsify not installed")
    if "sparsify" not in sys.modules:  # skip sparsify/__init__ (imports the trainer stack)
        pkg = types.ModuleType("sparsify")
        pkg.__path__ = list(spec.submodule_search_locations)
        sys.modules["sparsify"] = pkg
    import sparsify.sparse_coder as sc
    import sparsify.utils as su
    from sparsify.config import SparseCoderConfig

    sc.decoder_impl = su.eager_decode  # the Triton decoder crashes without a GPU driver
    return sc.SparseCoder, SparseCoderConfig


# ----------------------------------------------------------------------------- runners
def run_ours(x_train, x_val, cfg):
    torch.manual_seed(cfg.SEED)
    sae = TopKSAE(x_train.shape[1], cfg.LATENT_DIM, cfg.TOP_K)
    opt = st.make_sae_optimizer(sae, cfg.LR)
    step = lambda xb: st.train_step(sae, opt, xb)  # noqa: E731
    return step, lambda xv: sae(xv)[0]


def run_overcomplete(x_train, x_val, cfg):
    oc = import_overcomplete()
    torch.manual_seed(cfg.SEED)
    sae = oc(x_train.shape[1], nb_concepts=cfg.LATENT_DIM, top_k=cfg.TOP_K, device="cpu")
    opt = torch.optim.Adam(sae.parameters(), lr=cfg.LR)

    def step(xb):
        opt.zero_grad(set_to_none=True)
        _, z, x_hat = sae(xb)
        loss = fvu_loss(xb, x_hat)
        loss.backward()
        opt.step()
        return loss

    return step, lambda xv: sae(xv)[2]


def run_sparsify(x_train, x_val, cfg):
    coder_cls, coder_cfg = import_sparsify()
    torch.manual_seed(cfg.SEED)
    sae = coder_cls(x_train.shape[1], coder_cfg(num_latents=cfg.LATENT_DIM, k=cfg.TOP_K), device="cpu")
    opt = torch.optim.Adam(sae.parameters(), lr=cfg.LR)

    def step(xb):
        opt.zero_grad(set_to_none=True)
        out = sae(xb)
        loss = fvu_loss(xb, out.sae_out)
        loss.backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        opt.step()
        sae.set_decoder_norm_to_unit_norm()
        return loss

    return step, lambda xv: sae(xv).sae_out


@torch.no_grad()
def val_fvu(recon_fn, x_val, batch=4096) -> float:
    sse = sum(float((recon_fn(x_val[i:i + batch]) - x_val[i:i + batch]).pow(2).sum()) for i in range(0, len(x_val), batch))
    return sse / float((x_val - x_val.mean(0)).pow(2).sum())


def time_impl(builder, x_train, x_val, cfg) -> dict:
    step, recon = builder(x_train, x_val, cfg)
    rng = np.random.default_rng(cfg.SEED)
    batches = [torch.from_numpy(rng.integers(0, len(x_train), cfg.BATCH_SIZE)) for _ in range(cfg.WARMUP + cfg.STEPS)]
    for b in batches[:cfg.WARMUP]:
        step(x_train[b])
    t0 = time.perf_counter()
    for b in batches[cfg.WARMUP:]:
        step(x_train[b])
    seconds = time.perf_counter() - t0
    return {"tokens_per_s": cfg.STEPS * cfg.BATCH_SIZE / seconds, "val_fvu": val_fvu(recon, x_val)}


# ----------------------------------------------------------------------------- main
def load_tokens(cfg):
    model, ckpt = artifacts.load_classifier(cfg.CLASSIFIER_CKPT)
    model = model.to(memory_format=torch.channels_last)
    images = data.load_dataset(ckpt["dataset"], cfg.CACHE_DIR, progress=False).images
    out = {}
    cpu = Runtime(torch.device("cpu"))
    for name in ("train", "val"):
        indices = ckpt["split"][name].numpy()
        store, sums = cache_tokens(model, images, indices, ckpt["preprocess"], cpu.device, ram_gb=4,
                                   disk_path=st.token_cache_path(cfg.CACHE_DIR, ckpt["fingerprint"], name, indices, cpu),
                                   stats=name == "train")
        if sums is not None:
            mu, sigma = standardization(*sums, cpu)
        out[name] = torch.from_numpy(np.asarray(store.tokens)).float()
    return ((out["train"] - mu) / sigma).contiguous(), ((out["val"] - mu) / sigma).contiguous()


def main(**overrides) -> dict:
    cfg = make_config(module_constants(globals()), overrides)
    set_threads(cfg.NUM_THREADS)
    keep_freed_memory()  # as the training scripts do
    x_train, x_val = load_tokens(cfg)
    results = {}
    for name, builder in (("selfexplain (this repo)", run_ours), ("overcomplete 0.3.0 TopKSAE", run_overcomplete),
                          ("eai-sparsify 1.3.3 SparseCoder (eager)", run_sparsify)):
        try:
            results[name] = time_impl(builder, x_train, x_val, cfg)
        except ImportError as exc:
            results[name] = {"error": f"not installed ({exc}); pip install --no-deps -r bench/requirements-bench.txt"}
        print(name, results[name], flush=True)
    table = render(results, cfg, len(x_train))
    print(table)
    Path(cfg.OUT).write_text(table)
    return results


def render(results: dict, cfg, n_train: int) -> str:
    lines = [f"## Top-K SAE training step, CPU ({torch.get_num_threads()} threads, torch {torch.__version__})", "",
             f"C=512, M={cfg.LATENT_DIM}, K={cfg.TOP_K}, batch {cfg.BATCH_SIZE} tokens, {cfg.STEPS} timed steps "
             f"(+{cfg.WARMUP} warm-up), Adam lr {cfg.LR}, fp32, {n_train} cached train tokens "
             f"({cfg.CLASSIFIER_CKPT}).", "",
             "| implementation | tokens/s | val FVU | speed vs fastest peer |", "|---|---:|---:|---:|"]
    peers = [r["tokens_per_s"] for n, r in results.items() if "error" not in r and not n.startswith("selfexplain")]
    best = max(peers) if peers else None
    for name, r in results.items():
        if "error" in r:
            lines.append(f"| {name} | – | – | {r['error']} |")
        else:
            ratio = f"{r['tokens_per_s'] / best:.2f}x" if best else "–"
            lines.append(f"| {name} | {r['tokens_per_s']:.0f} | {r['val_fvu']:.4f} | {ratio} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    run_cli(main, globals())
