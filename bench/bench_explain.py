"""Benchmark: why_did_you's warm explanation latency beside a bare classifier forward pass.

Per image, on CPU, models already loaded (the process cache), in alternating rounds so
machine noise hits every side alike; the median per side is kept:

* bare forward: preprocess one decoded image and run the classifier (fp32, no grad);
* explain (array): the whole explanation of one decoded image: forward, SAE code,
  exact decomposition, cited neurons with heat maps, faithfulness ablations (1 cited +
  RANDOM_DRAWS random sets through the real head), concepts and sentence;
* explain (PNG file): the same from a PNG on disk (decode included);
* explain (batch): ``explain_images`` on BATCH images, per image.

With trained checkpoints (after ``make demo``) it also measures, over the classifier's
test split, the logit decomposition residual and the faithfulness ratio: the mean logit
drop from ablating the top 3 cited neurons over the mean drop from 3 random active ones.
Without them it times untrained stand-ins of the same shape (latency only).

Usage: python bench/bench_explain.py [--classifier_ckpt=runs/standard_cnn/best.pt] [--sae_ckpt=runs/sae_topk/best_sae.pt]
"""
from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from selfexplain import artifacts, data, explain  # noqa: E402
from sections import write_section  # noqa: E402
from selfexplain.config import make_config, module_constants, run_cli  # noqa: E402
from selfexplain.model import SketchResNet  # noqa: E402
from selfexplain.sae import TopKSAE  # noqa: E402

CLASSIFIER_CKPT = "runs/standard_cnn/best.pt"  # trained classifier (stand-ins are used when missing)
SAE_CKPT = "runs/sae_topk/best_sae.pt"         # trained SAE (stand-ins are used when missing)
REPORT_DIR = "neuron_report"                   # concepts, as why_did_you reads them
CACHE_DIR = "cache"                            # image cache for the test split
IMAGE_SIZE = 64                                # stand-ins only: input side (the demo's)
LATENT_DIM = 512                               # stand-ins only: M (train_sae's default)
TOP_K = 16                                     # stand-ins only: K (train_sae's default)
ITERS = 30                                     # timed images per side per round
ROUNDS = 3                                     # alternating rounds
BATCH = 64                                     # images in the batch timing
RANDOM_DRAWS = 8                               # random sets per faithfulness check (why_did_you's default)
THREADS = 0                                    # torch intra-op threads (0 = torch default)
OUT = "bench/results/explain.md"               # markdown written here (merged into RESULTS.md)


def standins(cfg, folder: Path) -> tuple[Path, Path, np.ndarray]:
    """Untrained classifier + SAE checkpoints of the demo's shape, and random sketches."""
    torch.manual_seed(0)
    model = SketchResNet(12).eval()
    split = {"train": np.arange(8), "val": np.arange(0), "test": np.arange(0)}
    prep = {"image_size": cfg.IMAGE_SIZE, "mean": 0.1, "std": 0.25, "ink": True}
    ckpt = artifacts.classifier_checkpoint(model, arch={"name": "resnet18", "num_classes": 12, "in_channels": 1},
                                           preprocess=prep, dataset={}, split=split,
                                           class_names=[f"class{i}" for i in range(12)], config={}, epoch=0, metrics={})
    clf = artifacts.save_checkpoint(ckpt, folder / "best.pt")
    sae = TopKSAE(512, cfg.LATENT_DIM, cfg.TOP_K)
    sae_path = artifacts.save_checkpoint(artifacts.sae_checkpoint(
        sae, classifier_fingerprint=ckpt["fingerprint"], classifier_path=str(clf), config={}, epoch=0, metrics={},
        usage_ema=torch.zeros(cfg.LATENT_DIM)), folder / "best_sae.pt")
    rng = np.random.default_rng(0)
    images = np.where(rng.random((64, cfg.IMAGE_SIZE, cfg.IMAGE_SIZE)) < 0.08, 0, 255).astype(np.uint8)
    return clf, sae_path, images


def timed(fn, items) -> float:
    """Median seconds of ``fn(item)`` over ``items``."""
    times = []
    for item in items:
        start = time.perf_counter()
        fn(item)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def latency(cfg, clf, sae, images, folder: Path) -> dict:
    models = explain.load_models(clf, sae, "cpu")
    prep = models.classifier_ckpt["preprocess"]
    pngs = []
    for k in range(min(cfg.ITERS, len(images))):
        from PIL import Image

        pngs.append(folder / f"img{k}.png")
        Image.fromarray(images[k]).save(pngs[-1])
    items = [images[k % len(images)] for k in range(cfg.ITERS)]
    batch = [images[k % len(images)] for k in range(cfg.BATCH)]
    kw = dict(classifier_ckpt=clf, sae_ckpt=sae, report_dir=cfg.REPORT_DIR, n_random=cfg.RANDOM_DRAWS, device="cpu")

    @torch.no_grad()
    def bare(image):
        models.classifier(data.model_input(torch.from_numpy(image[None]), prep))

    sides = {"bare forward": lambda: timed(bare, items),
             "explain (array)": lambda: timed(lambda im: explain.explain_image(im, **kw), items),
             "explain (PNG file)": lambda: timed(lambda p: explain.explain_image(p, **kw), pngs),
             "explain (batch, per image)": lambda: timed(lambda b: explain.explain_images(b, **kw), [batch]) / len(batch)}
    for fn in sides.values():  # warm-up: first calls allocate
        fn()
    results = {name: [] for name in sides}
    for r in range(cfg.ROUNDS):
        for name, fn in sides.items():
            results[name].append(fn())
        print(f"round {r + 1}: " + ", ".join(f"{n} {v[-1] * 1e3:.1f} ms" for n, v in results.items()))
    return {name: (statistics.median(v), min(v)) for name, v in results.items()}


def faithfulness(cfg, clf, sae, images) -> dict:
    """Decomposition residual and the top-3 faithfulness ratio over ``images``."""
    exps = explain.explain_images(list(images), clf, sae, cfg.REPORT_DIR, n_cite=3, n_random=cfg.RANDOM_DRAWS,
                                  device="cpu")
    residual = max(abs(e.logit - (sum(n.contribution for n in e.neurons) + e.others + e.bias + e.error)) for e in exps)
    cited = float(np.mean([e.faithfulness["cited_drop"] for e in exps]))
    random = float(np.mean([e.faithfulness["random_drop"] for e in exps]))
    error_share = float(np.mean([abs(e.error) / max(abs(e.logit), 1e-8) for e in exps]))
    return {"n": len(exps), "residual": residual, "cited": cited, "random": random,
            "ratio": cited / random if random > 0 else float("inf"), "error_share": error_share,
            "mean_logit": float(np.mean([e.logit for e in exps]))}


def main(**overrides) -> dict:
    cfg = make_config(module_constants(globals()), overrides)
    if cfg.THREADS:
        torch.set_num_threads(cfg.THREADS)
    work = Path(tempfile.mkdtemp(prefix="bench_explain_"))
    trained = Path(cfg.CLASSIFIER_CKPT).is_file() and Path(cfg.SAE_CKPT).is_file()
    if trained:
        clf, sae = Path(cfg.CLASSIFIER_CKPT), Path(cfg.SAE_CKPT)
        models = explain.load_models(clf, sae, "cpu")
        ckpt = models.classifier_ckpt
        imageset = data.load_dataset(ckpt["dataset"], cfg.CACHE_DIR)
        test = np.sort(ckpt["split"]["test"].numpy())
        images = np.ascontiguousarray(imageset.images[test])
    else:
        print(f"{cfg.CLASSIFIER_CKPT} or {cfg.SAE_CKPT} missing: timing untrained stand-ins of the demo's shape")
        clf, sae, images = standins(cfg, work)
        models = explain.load_models(clf, sae, "cpu")
    lat = latency(cfg, clf, sae, images, work)
    faith = faithfulness(cfg, clf, sae, images) if trained else None
    write_results(cfg, models, lat, faith, trained, images.shape[-1])
    return {"latency_ms": {k: v[0] * 1e3 for k, v in lat.items()}, "faithfulness": faith}


def _load() -> str:
    try:
        return " / ".join(f"{x:.1f}" for x in __import__("os").getloadavg())
    except OSError:
        return "n/a"


def write_results(cfg, models, lat, faith, trained, size) -> None:
    sae = models.sae
    what = f"`{cfg.CLASSIFIER_CKPT}` + `{cfg.SAE_CKPT}`" if trained else "untrained stand-ins"
    lines = ["## Stage 5: explanation latency and faithfulness", "",
             f"{what}: ResNet-18 at {size} px, SAE M={sae.n_latents}, K={sae.k}; CPU, {torch.get_num_threads()} "
             f"threads, fp32, warm (models cached), per-image median over {cfg.ITERS} images in each of {cfg.ROUNDS} alternating rounds; "
             f"load average at the end {_load()}.",
             "", "| per image | ms (median round) | ms (best round) |", "|---|---|---|"]
    lines += [f"| {name} | {med * 1e3:.1f} | {best * 1e3:.1f} |" for name, (med, best) in lat.items()]
    ratio = [lat["explain (array)"][i] / lat["bare forward"][i] for i in (0, 1)]
    lines += [f"| explain (array) / bare forward | {ratio[0]:.2f}x | {ratio[1]:.2f}x |", "",
              f"Target <= 100 ms per image (PNG file, median round): "
              f"**{'met' if lat['explain (PNG file)'][0] <= 0.1 else 'NOT met'}**.", ""]
    if faith:
        lines += [f"Over the test split ({faith['n']} images), top 3 cited vs 3 random active neurons "
                  f"({cfg.RANDOM_DRAWS} seeded draws each):", "",
                  "| | value |", "|---|---|",
                  f"| mean logit drop, cited | {faith['cited']:.3f} |",
                  f"| mean logit drop, random active | {faith['random']:.3f} |",
                  f"| ratio | **{faith['ratio']:.2f}** (target >= 3) |",
                  f"| max abs(logit - (cited + others + bias + error)) | {faith['residual']:.2e} |",
                  f"| mean abs(error) / logit | {faith['error_share']:.3f} |", ""]
    write_section(cfg.OUT, lines)


if __name__ == "__main__":
    run_cli(main, globals())
