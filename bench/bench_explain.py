"""Benchmark: why_did_you's latency, and evidence its explanations could fail (issue 14).

Latency, per image, on CPU, models already loaded, in alternating rounds (median kept):
bare classifier forward; the explanation without the input-space check (the fast path);
the explanation with it (one batched gradient pass for the pixel attribution of the
1 + RANDOM_DRAWS neuron sets, then one batched rerun of the classifier on 2 + RANDOM_DRAWS
edited sketches).

With trained checkpoints, over the classifier's test split (MAX_IMAGES, 0 = all):

* input-space deletion: white out INK_SHARE of the ink where the cited concepts fire, where
  random active neurons fire (RANDOM_DRAWS draws) and where CAM is highest; logit and
  probability drops, and their ratios;
* deletion / insertion curves: the cited concepts' regions (REGION_SHARE of the ink each)
  removed from the sketch / added to a blank page one concept at a time in the
  explanation's order, a random order, CAM-ranked ink and random ink of equal amounts; AUC
  of the class logit over the steps (deletion: lower is better, insertion: higher);
* counterfactuals (synthetic data): each part left out by a true re-render; correlation
  of actual and predicted logit change over (image, part) pairs, and mean predicted / mean
  actual, for three ways of attributing the evidence to a part and CAM's share as the baseline;
* the code-space check (zeroing cited neurons in the code), labelled as the consistency
  check it is: its drop equals the cited contributions by construction.

With trained checkpoints it also times the draw-and-explain page's request (a local
``serve`` server, the sketch POSTed as PNG, the JSON with the overlay read back). Without
checkpoints it times untrained stand-ins of the demo's shape (latency only, no page).

Usage: python bench/bench_explain.py [--classifier_ckpt=runs/standard_cnn/best.pt] [--sae_ckpt=runs/sae_topk/best_sae.pt]
"""
from __future__ import annotations

import contextlib
import http.client
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.plot_explain import plot_counterfactuals, plot_curves  # noqa: E402
from bench.run_all import machine  # noqa: E402
from bench.sections import write_section  # noqa: E402
from selfexplain import artifacts, data, evidence, explain, stats, synthetic  # noqa: E402
from selfexplain.imaging import png_bytes  # noqa: E402
from selfexplain.logs import log  # noqa: E402
from selfexplain.config import make_config, module_constants, run_cli  # noqa: E402
from selfexplain.model import SketchResNet  # noqa: E402
from selfexplain.sae import TopKSAE  # noqa: E402

CLASSIFIER_CKPT = artifacts.CLASSIFIER_CKPT   # trained classifier (stand-ins are used when missing)
SAE_CKPT = artifacts.SAE_CKPT                 # trained SAE (stand-ins are used when missing)
REPORT_DIR = artifacts.REPORT_DIR             # stage 3's neurons (best part per neuron) and concepts
CACHE_DIR = artifacts.CACHE_DIR               # image cache for the test split
IMAGE_SIZE = 64                               # stand-ins only: input side (the demo's)
LATENT_DIM = 512                              # stand-ins only: M (train_sae's default)
TOP_K = 8                                     # stand-ins only: K (train_sae's default)
ITERS = 30                                    # timed images per side per round
ROUNDS = 3                                    # alternating rounds
N_CITE = 5                                    # cited concepts (why_did_you's default)
RANDOM_DRAWS = 8                              # random active-neuron sets per image (why_did_you's default)
INK_SHARE = 0.2                               # share of the ink the input-space check whites out
REGION_SHARE = 0.2                            # curves: share of the ink in each concept's region
MAX_IMAGES = 0                                # test images evaluated (0 = the whole test split)
SEED = 0                                      # random draws, random orders, random ink
THREADS = 0                                   # torch intra-op threads (0 = torch default)
OUT = "bench/results/explain.md"              # markdown written here (merged into RESULTS.md)
PLOTS = "bench"                               # explain_curves.png and explain_counterfactuals.png go here

_PAGE_REQUEST = "page request: POST /explain (PNG in, JSON + overlay out)"   # the latency row of the page
_AUTOGRAD_CHECK = "explain + input check, attribution by autograd through D copies (before; reference)"


def standins(cfg, folder: Path) -> tuple[Path, Path, np.ndarray]:
    """Untrained classifier + SAE checkpoints of the demo's shape, and random sketches."""
    torch.manual_seed(0)
    model = SketchResNet(12).eval()
    split = {"train": np.arange(8), "val": np.arange(0), "test": np.arange(0)}
    prep = {"image_size": cfg.IMAGE_SIZE, "mean": 0.1, "std": 0.25, "ink": True}
    ckpt = artifacts.classifier_checkpoint(model, arch={"name": "resnet18", "num_classes": 12, "in_channels": 1},
                                           preprocess=prep, dataset={}, split=split,
                                           class_names=[f"class{i}" for i in range(12)], config={}, epoch=0, metrics={})
    clf = artifacts.save_checkpoint(ckpt, folder / artifacts.BEST_CLASSIFIER)
    sae = TopKSAE(512, cfg.LATENT_DIM, cfg.TOP_K)
    sae_path = artifacts.save_checkpoint(artifacts.sae_checkpoint(
        sae, classifier_fingerprint=ckpt["fingerprint"], classifier_path=str(clf), config={}, epoch=0, metrics={},
        usage_ema=torch.zeros(cfg.LATENT_DIM)), folder / artifacts.BEST_SAE)
    rng = np.random.default_rng(0)
    images = np.where(rng.random((64, cfg.IMAGE_SIZE, cfg.IMAGE_SIZE)) < 0.08, 0, 255).astype(np.uint8)
    return clf, sae_path, images


# ----------------------------------------------------------------------------- one image's evidence
def cited_and_random(models, analysis, b: int, cls: int, cfg, rng) -> tuple[list[int], list[np.ndarray]]:
    """The explanation's cited neurons (top positive contributions) and the random active sets."""
    contrib = analysis.z_mean[b] * models.lens[:, cls]
    order = torch.argsort(contrib, descending=True)[:cfg.N_CITE]
    cited = [int(i) for i in order if contrib[i] > 0]
    active = torch.nonzero(analysis.z_mean[b] > 0).flatten().cpu().numpy()
    return cited, explain.random_active_sets(active, len(cited), cfg.RANDOM_DRAWS, rng)


def image_evidence(models, image, analysis, b, index, cfg) -> dict:
    """Input-space drops and deletion / insertion curves for one test image."""
    cls = int(analysis.logits[b].argmax())
    rng = np.random.default_rng([cfg.SEED, index])
    cited, sets = cited_and_random(models, analysis, b, cls, cfg, rng)
    code = analysis.z_mean[b, cited] * models.lens[cited, cls]  # the cited contributions, in the explanation's order
    out = {"deletion": evidence.input_deletion(models, image, analysis, b, cited, cls, sets, cfg.INK_SHARE),
           "code_cited": float(code.sum())}
    out["deletion"].update(class_pixel_drops(models, image, analysis, b, cls, cfg.INK_SHARE))
    if len(cited) >= 2:
        pixels = evidence.set_activation_pixels(models, image, [[i] for i in cited]) if evidence.PIXEL_MAPS else None
        regions = evidence.concept_regions(image, evidence.token_maps(analysis, b, cited), cfg.REGION_SHARE, pixels)
        out["curves"] = evidence.region_curves(image, regions, evidence.cam_map(models, analysis, b, cls),
                                               lambda ims: evidence.class_scores(models, ims, cls)[0], rng)
        out["alone"] = regions_alone(models, image, regions, cls, float(analysis.logits[b, cls])) | {
            "code": code.cpu().numpy()}
    return out


def regions_alone(models, image, regions: np.ndarray, cls: int, logit0: float) -> dict[str, np.ndarray]:
    """Per cited concept, by its rank in the explanation: the class logit with only its region on a blank page
    (``insert``: what it is worth alone) and the logit's drop with only its region whited out (``delete``: what
    the sketch loses without it), one batched forward. Tells apart what the curves' orders mix."""
    logits = evidence.class_scores(models, np.concatenate([evidence.insert_ink(image, regions),
                                                           evidence.delete_ink(image, regions)]), cls)[0]
    return {"insert": logits[:len(regions)], "delete": logit0 - logits[len(regions):]}


def class_pixel_drops(models, image, analysis, b: int, cls: int, ink_share: float) -> dict[str, float]:
    """A baseline at pixel level, no concepts and no map: the logit drop after whiting out the ink that
    carries the class logit (its gradient x ink alone: ``class_pixels_drop``). CAM given the concepts'
    pixel rule (``cam_pixels_drop``) comes with :func:`evidence.input_deletion`."""
    masks = evidence.rank_ink(image, evidence.class_logit_pixels(models, image, cls)[None], ink_share)
    logits, _ = evidence.class_scores(models, evidence.delete_ink(image, masks), cls)
    return {"class_pixels_drop": float(analysis.logits[b, cls]) - float(logits[0])}


# ----------------------------------------------------------------------------- the test split
def load_best_parts(report_dir: str) -> dict[int, str] | None:
    """Stage 3's best-matching part type per live neuron, or None without a report."""
    path = Path(report_dir) / artifacts.NEURONS
    if not path.is_file():
        return None
    return {r["neuron_id"]: r["parts"]["best_part"] for r in artifacts.read_jsonl(path)
            if r.get("parts") and not r.get("dead")}  # a dead neuron matches no part (its AUROC is 0.5)


def evaluate(cfg, models, imageset, test: np.ndarray) -> list[dict]:
    """Evidence for every test image, batched through the classifier 64 at a time."""
    records = []
    for start in range(0, len(test), 64):
        idx = test[start:start + 64]
        batch = np.ascontiguousarray(imageset.images[idx])
        analysis = explain.analyse(models, batch)
        records += [image_evidence(models, batch[b], analysis, b, int(i), cfg) for b, i in enumerate(idx)]
        print(f"evidence: {len(records)}/{len(test)} images", flush=True)
    return records


def evaluate_counterfactuals(cfg, models, imageset, test: np.ndarray) -> tuple[list[dict], int]:
    """Counterfactual rows for the synthetic test images, and how many cached sketches differ from a re-render.

    The originals are re-rendered with the generator in this checkout, so each pair (full,
    part left out) comes from one drawing even when the cache was built by an older one.
    """
    spec = models.classifier_ckpt["dataset"]
    best_part = load_best_parts(cfg.REPORT_DIR)
    origins = [synthetic.sample_origin(i, spec["per_class"]) for i in test]
    style = synthetic.spec_style(spec)
    full = np.stack([synthetic.rerender(*o, spec["image_size"], spec["seed"], style=style)[0] for o in origins])
    stale = int(sum(not np.array_equal(full[k], imageset.images[i]) for k, i in enumerate(test)))
    rows = []
    for start in range(0, len(test), 64):
        batch = full[start:start + 64]
        analysis = explain.analyse(models, batch)
        for b in range(len(batch)):
            cls = int(analysis.logits[b].argmax())
            bias = float(models.classifier.fc.bias[cls].detach())           # no ink carries the head's bias
            cam = evidence.cam_map(models, analysis, b, cls) - bias
            rows += evidence.counterfactuals(models, batch[b], analysis, b, origins[start + b], spec["seed"], cls,
                                             best_part, cam)
        print(f"counterfactuals: {min(start + 64, len(test))}/{len(test)} images", flush=True)
    return rows, stale


def correlation(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a, b)[0, 1]) if len(a) > 2 and a.std() > 0 and b.std() > 0 else float("nan")


def summarise(records: list[dict], pairs: list[dict]) -> dict:
    """Means, ratios, AUCs and counterfactual agreement over the evaluated images."""
    dele = {k: np.array([r["deletion"][k] for r in records]) for k in records[0]["deletion"]}
    out = {"n": len(records), "drops": {k: float(v.mean()) for k, v in dele.items()},
           "code_cited": float(np.mean([r["code_cited"] for r in records]))}
    d = out["drops"]
    out["ratio_random"] = d["input_cited_drop"] / d["input_random_drop"] if d["input_random_drop"] > 0 else float("inf")
    out["ratio_cam"] = d["input_cited_drop"] / d["cam_drop"] if d["cam_drop"] > 0 else float("inf")
    curves = [r["curves"] for r in records if "curves" in r]
    if curves:
        steps = min(len(c.deletion["explanation"]) for c in curves)  # images citing fewer concepts are cut
        out["curves_n"] = len(curves)
        for kind in ("deletion", "insertion"):
            out[f"{kind}_auc"] = {o: float(np.mean([evidence.auc(getattr(c, kind)[o]) for c in curves]))
                                  for o in evidence.ORDERS}
            out[f"{kind}_mean"] = {o: np.mean([getattr(c, kind)[o][:steps] for c in curves], 0) for o in evidence.ORDERS}
        out["ink_final"] = float(np.mean([c.ink["explanation"][-1] for c in curves]))
        out["order_gap"] = {kind: paired_mean_interval([evidence.auc(getattr(c, kind)["explanation"])
                                                        - evidence.auc(getattr(c, kind)["random order"]) for c in curves])
                            for kind in ("deletion", "insertion")}
        out["alone"] = alone_by_rank([r for r in records if "alone" in r])
    if pairs:
        out["cf"] = counterfactual_figures(pairs)
    return out


def paired_mean_interval(differences, n_boot: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """Mean of per-image differences with its 95% bootstrap interval over images: (mean, low, high)."""
    diff = np.asarray(differences, dtype=np.float64)
    draws = np.random.default_rng(seed).integers(0, len(diff), (n_boot, len(diff)))
    low, high = np.percentile(diff[draws].mean(1), [2.5, 97.5])
    return float(diff.mean()), float(low), float(high)


def rank_correlation(a, b) -> float:
    """Spearman's rank correlation of two short vectors (ties at their average rank); 0 when one is flat."""
    ra, rb = (stats.average_ranks(np.asarray(v, dtype=np.float64)[:, None])[:, 0] for v in (a, b))
    return float(np.corrcoef(ra, rb)[0, 1]) if len(ra) > 1 and ra.std() > 0 and rb.std() > 0 else 0.0


def alone_by_rank(records: list[dict]) -> dict:
    """Means over images of :func:`regions_alone` per rank (images citing fewer concepts count for their ranks),
    with the blank page's and the whole sketch's class logit for scale."""
    ranks = max(len(r["alone"]["insert"]) for r in records)
    at = lambda key, k: [r["alone"][key][k] for r in records if len(r["alone"][key]) > k]  # noqa: E731
    # does the explanation's code-space order say which region matters more in the input? chance: 0
    agreement = {key: paired_mean_interval([rank_correlation(r["alone"]["code"], r["alone"][key]) for r in records])
                 for key in ("insert", "delete")}
    return {"insert": [float(np.mean(at("insert", k))) for k in range(ranks)],
            "delete": [float(np.mean(at("delete", k))) for k in range(ranks)],
            "n": [len(at("insert", k)) for k in range(ranks)], "rank_correlation": agreement,
            "blank": float(np.mean([r["curves"].insertion["explanation"][0] for r in records])),
            "whole": float(np.mean([r["curves"].deletion["explanation"][0] for r in records]))}


def counterfactual_figures(pairs: list[dict]) -> dict:
    """Correlation and mean predicted / mean actual per attribution, over all parts and class parts."""
    actual = np.array([p["actual"] for p in pairs])
    distractor = np.array([p["distractor"] for p in pairs])
    out = {"pairs": len(pairs), "class_pairs": int((~distractor).sum()), "actual": actual, "distractor": distractor}
    for key in ("predicted_ink", "predicted_box", "predicted_best_part", "predicted_cam"):
        if key not in pairs[0]:
            continue
        pred = np.array([p[key] for p in pairs])
        out[key] = {"values": pred, "r_all": correlation(actual, pred),
                    "r_class": correlation(actual[~distractor], pred[~distractor]),
                    "share_all": float(pred.mean() / actual.mean()),
                    "share_class": float(pred[~distractor].mean() / actual[~distractor].mean()),
                    "mean_pred": float(pred.mean()), "mean_actual": float(actual.mean())}
    return out


# ----------------------------------------------------------------------------- latency
def timed(fn, items) -> float:
    """Median seconds of ``fn(item)`` over ``items``."""
    times = []
    for item in items:
        start = time.perf_counter()
        fn(item)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@contextlib.contextmanager
def page_poster(cfg, clf, sae):
    """``why_did_you.py --serve=True`` in its own process, as a person runs it (this benchmark's N_CITE,
    RANDOM_DRAWS and INK_SHARE, the input check on), and a function that encodes one sketch as PNG (as a
    browser would, inside the timed call), POSTs it to ``/explain`` and reads the whole JSON answer.

    Its own process: there the model passes run on the server's main thread (``serve.run_server``); in
    this process, whose main thread has run torch already, a server thread's passes took ~35% longer.
    """
    if not Path(cfg.REPORT_DIR).is_dir():  # the page refuses a missing REPORT_DIR; the timing needs no concepts
        log(f"{cfg.REPORT_DIR} does not exist: created, the page names neurons by id")
        Path(cfg.REPORT_DIR).mkdir(parents=True)
    cmd = [sys.executable, str(ROOT / "why_did_you.py"), "--serve=True", "--port=0", "--device=cpu",
           f"--classifier_ckpt={Path(clf).resolve()}", f"--sae_ckpt={Path(sae).resolve()}",
           f"--report_dir={Path(cfg.REPORT_DIR).resolve()}", f"--cache_dir={Path(cfg.CACHE_DIR).resolve()}",
           f"--n={cfg.N_CITE}", f"--random_draws={cfg.RANDOM_DRAWS}", f"--ink_share={cfg.INK_SHARE}"]
    env = dict(os.environ, OMP_NUM_THREADS=str(cfg.THREADS)) if cfg.THREADS else None
    with tempfile.TemporaryFile() as errors:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=errors)
        conn = None
        try:
            conn = http.client.HTTPConnection("127.0.0.1", wait_for_port(proc, errors), timeout=60)

            def post(image: np.ndarray) -> None:
                conn.request("POST", "/explain", png_bytes(image), {"Content-Type": "image/png"})
                response = conn.getresponse()
                body = response.read()
                if response.status != 200:
                    raise RuntimeError(f"POST /explain answered {response.status}: {body[:200]!r}")

            yield post
        finally:
            if conn is not None:
                conn.close()
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def wait_for_port(proc: subprocess.Popen, errors, timeout_s: float = 300.0) -> int:
    """The port the server bound (port 0: the system's choice, read from its start-up line on stderr)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        errors.seek(0)
        text = errors.read().decode(errors="replace")
        found = re.search(r"page on http://[^:/]+:(\d+)/", text)
        if found:
            return int(found.group(1))
        if proc.poll() is not None:
            raise RuntimeError(f"the page server exited ({proc.returncode}): {text[-2000:]}")
        time.sleep(0.2)
    raise RuntimeError(f"the page server did not start within {timeout_s:.0f} s")


def latency(cfg, models, clf, sae, images, post=None) -> dict:
    """Per side, (median round, best round) of the per-image median seconds; ``post`` adds the page request."""
    prep = models.classifier_ckpt["preprocess"]
    items = [np.ascontiguousarray(images[k % len(images)]) for k in range(cfg.ITERS)]
    kw = dict(classifier_ckpt=clf, sae_ckpt=sae, report_dir=cfg.REPORT_DIR, n_cite=cfg.N_CITE,
              n_random=cfg.RANDOM_DRAWS, device="cpu")

    @torch.no_grad()
    def bare(image):
        models.classifier(data.model_input(torch.from_numpy(image[None]), prep))

    checked = lambda im: explain.explain_image(im, **kw, input_check=True, ink_share=cfg.INK_SHARE)  # noqa: E731

    def checked_by_autograd(im):
        with swapped(evidence, "ink_attribution", autograd_ink_attribution):
            checked(im)

    sides = {"bare forward": lambda: timed(bare, items),
             "explain, fast (no input check)": lambda: timed(
                 lambda im: explain.explain_image(im, **kw, input_check=False), items),
             "explain + input check": lambda: timed(checked, items),
             _AUTOGRAD_CHECK: lambda: timed(checked_by_autograd, items)}
    out = alternating_rounds(sides, cfg.ROUNDS)
    if post is not None:
        # after the in-process sides, not among them: the server process's OpenMP workers, spinning after each
        # request, slowed the in-process sides when the rounds alternated
        out.update(alternating_rounds({_PAGE_REQUEST: lambda: timed(post, items)}, cfg.ROUNDS))
    return out


@contextlib.contextmanager
def swapped(module, name: str, replacement):
    """``module.name`` replaced for the duration of the block (the timed reference path below)."""
    original = getattr(module, name)
    setattr(module, name, replacement)
    try:
        yield
    finally:
        setattr(module, name, original)


def autograd_ink_attribution(models, image_uint8, objective, copies: int) -> np.ndarray:
    """The input check's pixel attribution as it was before ``SketchResNet.input_gradients``: autograd through
    ``copies`` identical copies of the sketch (a D-copy forward and backward). Same values to fp32 rounding; kept
    here only as the timed reference of the latency table."""
    with torch.inference_mode(False), torch.enable_grad():
        ink = torch.from_numpy(evidence.ink_of(image_uint8).astype(np.float32)).to(models.device)
        ink = ink[None, None].repeat(copies, 1, 1, 1).requires_grad_(True)
        fmap = models.classifier.features(data.standardise_ink(ink, models.classifier_ckpt["preprocess"])).float()
        grad, = torch.autograd.grad(objective(fmap).sum(), ink)
    return (grad * ink).clamp_min(0)[:, 0].detach().cpu().numpy().astype(np.float64)


def alternating_rounds(sides: dict, rounds: int) -> dict:
    """Warm every side once, then ``rounds`` rounds over all sides in turn: (median round, best round) each."""
    for fn in sides.values():  # warm-up: first calls allocate
        fn()
    results = {name: [] for name in sides}
    for r in range(rounds):
        for name, fn in sides.items():
            results[name].append(fn())
        print(f"round {r + 1}: " + ", ".join(f"{n} {v[-1] * 1e3:.1f} ms" for n, v in results.items()), flush=True)
    return {name: (statistics.median(v), min(v)) for name, v in results.items()}


# ----------------------------------------------------------------------------- main
def main(**overrides) -> dict:
    cfg = make_config(module_constants(globals()), overrides)
    if cfg.THREADS:
        torch.set_num_threads(cfg.THREADS)
    trained = Path(cfg.CLASSIFIER_CKPT).is_file() and Path(cfg.SAE_CKPT).is_file()
    if trained:
        clf, sae = Path(cfg.CLASSIFIER_CKPT), Path(cfg.SAE_CKPT)
        models = explain.load_models(clf, sae, "cpu")
        imageset = data.load_dataset(models.classifier_ckpt["dataset"], cfg.CACHE_DIR)
        test = np.sort(np.asarray(models.classifier_ckpt["split"]["test"]))
        test = test[:cfg.MAX_IMAGES] if cfg.MAX_IMAGES else test
        images = np.ascontiguousarray(imageset.images[test])
    else:
        print(f"{cfg.CLASSIFIER_CKPT} or {cfg.SAE_CKPT} missing: timing untrained stand-ins of the demo's shape")
        clf, sae, images = standins(cfg, Path(tempfile.mkdtemp(prefix="bench_explain_")))
        models = explain.load_models(clf, sae, "cpu")
    if trained:  # the page calibrates familiarity on the validation split: stand-ins have none
        with page_poster(cfg, clf, sae) as post:
            lat = latency(cfg, models, clf, sae, images, post)
    else:
        lat = latency(cfg, models, clf, sae, images)
    figures = None
    if trained:
        synthetic_set = models.classifier_ckpt["dataset"].get("dataset") == "synthetic"
        pairs, stale = evaluate_counterfactuals(cfg, models, imageset, test) if synthetic_set else ([], 0)
        figures = summarise(evaluate(cfg, models, imageset, test), pairs)
        figures["stale"] = stale
    plots = write_plots(cfg, figures) if figures else []
    write_results(cfg, models, lat, figures, plots, trained, images.shape[-1])
    return {"latency_ms": {k: v[0] * 1e3 for k, v in lat.items()}, "figures": figures}


def write_plots(cfg, fig: dict) -> list[Path]:
    out = []
    if "deletion_mean" in fig:
        out.append(plot_curves(fig["deletion_mean"], fig["insertion_mean"], Path(cfg.PLOTS) / "explain_curves.png"))
    if "cf" in fig and "predicted_ink" in fig["cf"]:
        cf = fig["cf"]
        out.append(plot_counterfactuals(cf["actual"], cf["predicted_ink"]["values"], cf["distractor"],
                                        Path(cfg.PLOTS) / "explain_counterfactuals.png"))
    return out


def _load() -> str:
    try:
        return " / ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def _verdict(ok: bool) -> str:
    return "met" if ok else "NOT met"


def write_results(cfg, models, lat, fig, plots, trained, size) -> None:
    sae = models.sae
    what = f"`{cfg.CLASSIFIER_CKPT}` + `{cfg.SAE_CKPT}`" if trained else "untrained stand-ins"
    lines = ["## Stage 5: explanation latency and evidence", "",
             f"{what}: ResNet-18 at {size} px, SAE M={sae.n_latents}, K={sae.k}; CPU, {torch.get_num_threads()} "
             f"threads, fp32, warm, per-image median over {cfg.ITERS} images in each of {cfg.ROUNDS} alternating "
             f"rounds; load average at the end {_load()}. Measured on {machine()}.", "",
             "| per image | ms (median round) | ms (best round) |", "|---|---|---|"]
    lines += [f"| {name} | {med * 1e3:.1f} | {best * 1e3:.1f} |" for name, (med, best) in lat.items()]
    lines += ["", f"Target <= 100 ms per image with the input check: "
              f"**{_verdict(lat['explain + input check'][0] <= 0.1)}**. The input check's pixel attribution runs one "
              f"forward and a batched backward for all its objectives (`SketchResNet.input_gradients`); by autograd "
              f"through as many copies of the sketch, the same figures take "
              f"{lat[_AUTOGRAD_CHECK][0] / lat['explain + input check'][0]:.2f}x as long (median rounds, this run)."]
    if _PAGE_REQUEST in lat:
        lines += [f"The page's request (`why_did_you.py --serve=True`: the sketch posted as PNG over a kept-alive "
                  f"local HTTP connection; the client's PNG encode, decode, explanation with the input check, "
                  f"familiarity, overlay PNG, "
                  f"JSON): target <= 100 ms warm: **{_verdict(lat[_PAGE_REQUEST][0] <= 0.1)}**."]
    else:
        lines += ["The page request is timed only with trained checkpoints (the page calibrates familiarity on "
                  "their validation split)."]
    lines += [""]
    if fig:
        lines += evidence_lines(cfg, fig, plots)
    write_section(cfg.OUT, lines)


def order_lines(cfg, fig: dict) -> list[str]:
    """The explanation's order against a random order of the same regions, and each region alone by rank."""
    if "order_gap" not in fig:
        return []
    gap, alone = fig["order_gap"], fig["alone"]
    fmt = lambda g: f"{g[0]:+.3f} ({g[1]:+.3f}, {g[2]:+.3f})"  # noqa: E731
    lines = [f"Explanation minus random order, mean over images with its 95% bootstrap interval: deletion AUC "
             f"{fmt(gap['deletion'])}, insertion AUC {fmt(gap['insertion'])}. Each cited concept's region alone, "
             f"by its rank in the explanation (class logit: {alone['whole']:.3f} for the whole sketch, "
             f"{alone['blank']:.3f} for a blank page):", "",
             "| rank | images | logit with only this region on a blank page | logit drop with only this region "
             "whited out |", "|---|---|---|---|"]
    lines += [f"| {k + 1} | {n} | {ins:.3f} | {dele:.3f} |"
              for k, (n, ins, dele) in enumerate(zip(alone["n"], alone["insert"], alone["delete"]))]
    agree = alone["rank_correlation"]
    return lines + ["", "Within an image, the rank correlation (Spearman) of the cited concepts' code-space "
                    f"contributions with their region's drop: {fmt(agree['delete'])}; with their region's logit "
                    f"alone on a blank page: {fmt(agree['insert'])} (mean over images, 95% bootstrap interval; "
                    f"chance 0). The regions overlap (together they hold the share of the ink above, not {cfg.N_CITE} "
                    f"x {cfg.REGION_SHARE:.0%}), so whiting out one also takes ink the other concepts fire on.", ""]


def evidence_lines(cfg, fig: dict, plots: list[Path]) -> list[str]:
    d = fig["drops"]
    lines = [f"Over the test split ({fig['n']} images), {cfg.N_CITE} cited concepts, {cfg.RANDOM_DRAWS} random "
             f"draws; whiting out {cfg.INK_SHARE:.0%} of the ink and rerunning the classifier "
             f"(mean ink removed {d['ink_removed']:.1%}):", "",
             "| ink chosen by | logit drop | probability drop |", "|---|---|---|",
             f"| cited concepts' maps | {d['input_cited_drop']:.3f} | {d['input_cited_prob_drop']:.3f} |",
             f"| random active neurons' maps | {d['input_random_drop']:.3f} | {d['input_random_prob_drop']:.3f} |",
             f"| CAM | {d['cam_drop']:.3f} | {d['cam_prob_drop']:.3f} |"]
    if "class_pixels_drop" in d and "cam_pixels_drop" in d:
        lines += [f"| no concepts, pixel level: CAM times the class logit's pixel attribution (CAM given the "
                  f"concepts' rule) | {d['cam_pixels_drop']:.3f} | – |",
                  f"| no concepts, pixel level: the class logit's pixel attribution (gradient x ink) alone | "
                  f"{d['class_pixels_drop']:.3f} | – |"]
    pixel_words = (" times the pixel attribution of the set's activation (gradient x ink, positive part: "
                   "`evidence.set_activation_pixels`)") if evidence.PIXEL_MAPS else ""
    lines += ["", f"Cited / random: **{fig['ratio_random']:.3f}x** (target >= 1.5x, "
              f"{_verdict(fig['ratio_random'] >= 1.5)}); cited / CAM: **{fig['ratio_cam']:.3f}x** "
              f"(target >= 0.95x, {_verdict(fig['ratio_cam'] >= 0.95)}). For scale, CAM itself (the class's own "
              f"map, no concepts) / random: {d['cam_drop'] / max(d['input_random_drop'], 1e-12):.3f}x. Maps: "
              f"the neurons' token maps, each scaled to sum 1, summed (`evidence.where_map`), upsampled"
              f"{pixel_words}; the same rule for the cited and the random sets; chosen on the validation split "
              "(`bench/choose_where_map.py`). CAM here is the token-level class map the target names; given the "
              "same pixel rule (the rows without concepts) it removes more: cited / CAM at pixel level "
              f"{d['input_cited_drop'] / max(d.get('cam_pixels_drop', float('nan')), 1e-12):.3f}x. The five "
              "cited concepts carry most of the class's pixel-level evidence, not all of it.", ""]
    if "deletion_auc" in fig:
        lines += [f"Deletion / insertion over {fig['curves_n']} images citing >= 2 concepts, each concept's region "
                  f"{cfg.REGION_SHARE:.0%} of the ink (all regions together: {fig['ink_final']:.0%} on average); "
                  "AUC of the class logit over the steps:", "",
                  "| order | deletion AUC (lower = better) | insertion AUC (higher = better) |", "|---|---|---|"]
        lines += [f"| {o} | {fig['deletion_auc'][o]:.3f} | {fig['insertion_auc'][o]:.3f} |" for o in evidence.ORDERS]
        lines += [""] + order_lines(cfg, fig)
    if "cf" in fig:
        cf = fig["cf"]
        lines += [f"Counterfactuals: {cf['pairs']} (image, part) re-renders with the part left out "
                  f"({cf['class_pairs']} class parts, the rest distractors); originals re-rendered too "
                  f"({fig['stale']} of {fig['n']} differ from the cached sketch: a newer generator):", "",
                  "| evidence attributed to a part by | r (all parts) | r (class parts) | "
                  "mean predicted / mean actual (all) | (class parts) |", "|---|---|---|---|---|"]
        names = {"predicted_ink": "each token's contribution split by the parts' ink near it "
                                  "(the explanation's figure)",
                 "predicted_box": "the same split by how much of the token's cell each part's box covers",
                 "predicted_best_part": "stage 3's best part type",
                 "predicted_cam": "baseline without concepts: CAM's share of the logit, split by the parts' ink"}
        for key, name in names.items():
            if key in cf:
                c = cf[key]
                lines.append(f"| {name} | {c['r_all']:.3f} | {c['r_class']:.3f} | {c['share_all']:.2f} | "
                             f"{c['share_class']:.2f} |")
        lines += ["", "Targets: r >= 0.85, mean predicted within 10% of mean actual. The ink split (a Gaussian window of "
                  f"{evidence.INK_SIGMA:g} cell around each token) was chosen over the box split on the validation "
                  "split (bench/results/explain_notes.md). Every attribution here is linear in "
                  "the original image's evidence; removing a part also changes its neighbours' tokens (overlapping "
                  "receptive fields), which no such attribution sees.", ""]
    lines += [f"Consistency check (true by construction, not evidence): zeroing the cited neurons in the code "
              f"lowers the logit by their summed contribution, {fig['code_cited']:.3f} on average.", ""]
    lines += [f"![{p.stem}]({p.name})" for p in plots]
    return lines


if __name__ == "__main__":
    run_cli(main, globals())
