"""Benchmark: held-out concept measures of the SAE beside baseline codes on the synthetic set.

Every code (the trained SAE, a random SAE of the same shape as a floor, the classifier's
own layer4 channels, PCA and NMF with as many components as the SAE) goes through the same
measures (selfexplain/concept_measures.py): per part type, the unit chosen on the training
split by AUROC, scored on the test split (AUROC, average precision, AUROC among images of
classes without the part, where only distractors carry it); the pointing game on the
test split beside its chance rate; and the counterfactual drops: the chosen unit's
activation on test images re-rendered with exactly one part left out.

A "class-set" row scores the classifier's own probability of the part's classes: the
detector a part AUROC cannot tell apart from a part detector (see the distractor column).
A "probe" row is a reference, not a baseline: a logistic regression per part on the
channels' per-image maxima, fitted with the part labels (:func:`probe_report`): how well
one linear read-out of the layer4 features can detect a part at all.

With ``FRESH_PER_CLASS`` > 0 the detection measures are read a second time on fresh
sketches drawn by the generator with another seed (no model saw them), 6,000 by default:
the 720 test images leave a paired interval about +-0.0015 wide on a mean AUROC near 0.995,
wider than the gaps between the codes there; 6,000 narrow it to about +-0.0004. SAEs of the
other seeds in ``SEED_SAES`` (same M, K and rule as the SAE given; trained here when missing)
are scored beside it, so a lead of one seed is not read as a lead of the method.

``--sweep=True`` instead trains SAEs over K x M (train_sae.main, short epochs, on the
same classifier's tokens) and scores each by held-out recovery, with its time.

Usage
-----
    python bench/bench_concepts.py [--classifier_ckpt=runs/standard_cnn/best.pt] [--sae_ckpt=runs/sae_topk/best_sae.pt]
    python bench/bench_concepts.py --sweep=True --sweep_k=[4,8,16,32] --sweep_m=[256,512,1024] --sweep_epochs=20
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train_sae  # noqa: E402
from bench.sections import write_section  # noqa: E402
from selfexplain import artifacts, baselines, data, stats, summarize, synthetic  # noqa: E402
from selfexplain import concept_measures as cm  # noqa: E402
from selfexplain.config import make_config, module_constants, run_cli  # noqa: E402
from selfexplain.distributed import set_threads  # noqa: E402
from selfexplain.errors import UserError  # noqa: E402
from selfexplain.features import iter_feature_maps  # noqa: E402
from selfexplain.sae import tokens_of  # noqa: E402
from selfexplain.logs import log  # noqa: E402

CLASSIFIER_CKPT = artifacts.CLASSIFIER_CKPT    # trained classifier (its dataset must be synthetic)
SAE_CKPT = artifacts.SAE_CKPT                  # trained SAE of that classifier
CACHE_DIR = artifacts.CACHE_DIR                # decoded-image cache
TRAIN_PER_CLASS = 0                            # training images per class for choosing units (0 = all)
CF_IMAGES = 120                                # test images re-rendered once per part left out (0 = none)
NMF_ITERS = 200                                # NMF fit: multiplicative-update rounds
NMF_CODE_ITERS = 50                            # NMF coding of new tokens: update rounds
NMF_TOKENS = 8192                              # NMF fit: training tokens sampled
BATCH_SIZE = 128                               # images per forward pass
SEED = 0                                       # image subsample, NMF init, random SAE
NUM_THREADS = 0                                # torch intra-op threads (0 = torch default)
FRESH_PER_CLASS = 500                          # also score on this many fresh sketches per class (0 = test split only)
FRESH_SEED = 123                               # generator seed of the fresh sketches (the dataset's is refused)
SEED_SAES = [1, 2]                             # also score SAEs of these seeds on the fresh sketches ([] = none)
SEED_SAE_DIR = "bench/_work/sae_seed{seed}"    # where those SAEs are trained (kept; reused while they match)
CONTENDER = 0.01                               # fresh table: each SAE also against every baseline this close to it
SWEEP = False                                  # train and score SAEs over SWEEP_K x SWEEP_M instead
SWEEP_K = [4, 8, 16, 32]                       # sweep: active latents per token
SWEEP_M = [256, 512, 1024]                     # sweep: number of latents
SWEEP_EPOCHS = 12                              # sweep: SAE epochs per cell (the demo's)
SWEEP_DIR = "bench/_work/sweep"                # sweep: SAE run folders
OUT = "bench/results/concepts.md"              # markdown written here (merged into RESULTS.md)


# ----------------------------------------------------------------------------- data
def layer4_maps(model, images, indices, prep, batch_size) -> tuple[torch.Tensor, torch.Tensor]:
    """(layer4 maps (N, C, H, W), logits (N, classes)) for sorted ``indices``, fp32 on the CPU."""
    out = list(iter_feature_maps(model, images, indices, prep, torch.device("cpu"), batch_size, amp="off"))
    return torch.cat([f for _, f, _ in out]), torch.cat([g for _, _, g in out])


def in_batches(maps: torch.Tensor, batch_size: int):
    """(None, maps) batches of in-memory layer4 maps, as ``summarize.code_maxima`` takes them."""
    return ((None, maps[i:i + batch_size]) for i in range(0, len(maps), batch_size))


# ----------------------------------------------------------------------------- measures
def measure(codes: dict, maps: dict, truth: dict, cf: dict | None, batch_size: int, train_max: dict | None = None
            ) -> dict:
    """Every concept measure for each code: ``{key: ConceptReport}``.

    ``train_max``: the codes' per-image maxima on ``maps["train"]`` where already computed
    (by key); the codes missing there are run over the training maps.
    """
    train_max = dict(train_max or {})
    missing = {k: c for k, c in codes.items() if k not in train_max}
    if missing:
        train_max.update(summarize.code_maxima(missing, in_batches(maps["train"], batch_size))[0])
    cf_batches = None if cf is None else in_batches(cf["maps"], batch_size)
    return summarize.score_codes(codes, train_max, truth["train"], truth["test"], in_batches(maps["test"], batch_size),
                                 cf_batches, None if cf is None else cf["rerenders"])[0]


def class_set_report(logits: dict, truth: dict) -> cm.ConceptReport:
    """The classifier's probability of each part's classes, scored like a code with one unit per part."""
    test = truth["test"]
    table = test.part_classes.T.astype(np.float32)                       # (C, P)
    score = {s: torch.softmax(logits[s], 1).numpy() @ table for s in ("train", "test")}
    names = test.part_names
    sel = cm.select_and_score(score["train"], truth["train"].present, score["test"], test.present, names)
    conf = cm.class_confound(score["test"], test.present, test.labels, test.part_classes, sel.unit, names)
    return cm.ConceptReport("class-set (classifier probabilities)", len(names), float("nan"), sel, conf)


def probe_report(maps: dict, truth: dict, l2: float = 1e-3) -> cm.ConceptReport:
    """A reference, not a baseline: per part, a logistic regression fitted with the part labels.

    Features: the classifier's C layer4 channels, max over tokens per image, ``log1p``, standardised
    on the training split; one probe per part fitted on the training split (L-BFGS, L2 weight
    ``l2``), scored on the test split. No unsupervised code can use the labels, so this is
    what the layer4 features allow a detector to reach, not something the SAE should match.
    """
    feats = {s: torch.log1p(maps[s].amax((2, 3)).double()) for s in ("train", "test")}
    mu, sd = feats["train"].mean(0), feats["train"].std(0) + 1e-6
    x = {s: (f - mu) / sd for s, f in feats.items()}
    y = torch.as_tensor(truth["train"].present, dtype=torch.float64)                  # (N, P)
    w = torch.zeros(x["train"].shape[1], y.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros(y.shape[1], dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=300, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = (torch.nn.functional.binary_cross_entropy_with_logits(x["train"] @ w + b, y, reduction="sum") / len(y)
                + l2 * (w ** 2).sum())
        loss.backward()
        return loss

    opt.step(closure)
    score = {s: (x[s] @ w + b).detach().numpy() for s in x}
    test, names = truth["test"], truth["test"].part_names
    own = np.eye(len(names), dtype=bool)                 # part p is scored by its own probe, never another part's
    train_auroc = np.where(own, stats.auroc(score["train"], truth["train"].present), np.nan)
    sel = cm.score_units(train_auroc, score["test"], test.present, names)
    conf = cm.class_confound(score["test"], test.present, test.labels, test.part_classes, sel.unit, names)
    return cm.ConceptReport("supervised linear probe on the channels (uses part labels: a reference)", len(names),
                            float("nan"), sel, conf)


def comparison_codes(sae, train_maps: torch.Tensor, cfg) -> dict:
    """The SAE and its baselines, the fitted ones fitted on the training tokens."""
    t = time.time()
    codes = baselines.comparison_codes(sae, tokens_of(train_maps), baselines.BASELINES, cfg.NMF_ITERS, cfg.NMF_TOKENS,
                                       cfg.NMF_CODE_ITERS, cfg.SEED)
    log(f"PCA and NMF fit: {sae.n_latents} components, {time.time() - t:.1f}s")
    return codes


# ----------------------------------------------------------------------------- output
def _fmt(x, spec=".3f") -> str:
    return "–" if x is None else format(x, spec)


def render(reports: list[dict], cfg, context: str, versus: dict | None = None) -> str:
    lines = ["## Concept measures, held out (synthetic demo)", "", context, "",
             "| code | units | held-out AUROC | AP | distractor-only AUROC | pointing (chance; shuffled) | cell-centre "
             "pointing (chance) | own-part CF drop | other-part CF drop | dead |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in reports:
        pointing = ("–" if r.get("mean_pointing") is None else f"{r['mean_pointing']:.3f} "
                    f"({r['mean_pointing_chance']:.3f}; {_fmt(r.get('mean_pointing_shuffled'))})")
        cell = ("–" if r.get("mean_pointing_cell") is None
                else f"{r['mean_pointing_cell']:.3f} ({r['mean_pointing_cell_chance']:.3f})")
        lines.append(f"| {r['code']} | {r['n_units']} | {_fmt(r['mean_test_auroc'])} | {_fmt(r['mean_test_ap'])} "
                     f"| {_fmt(r['mean_distractor_auroc'])} | {pointing} | {cell} | {_fmt(r.get('mean_cf_own_drop'))} "
                     f"| {_fmt(r.get('mean_cf_other_drop'))} | {_fmt(r['dead_share'], '.1%')} |")
    r0 = reports[0]
    lines += ["", f"Perfect class-set detector (label in the part's 4 classes): mean AUROC "
                  f"{r0['mean_class_set_auroc']:.3f}. Best unit chosen on the test split itself (upper bound, "
                  f"not evidence), {r0['code']}: {r0['mean_test_best_auroc_upper_bound']:.3f}. Cell-centre pointing "
                  f"ceiling (share of images where any cell centre lies in the part's box): "
                  f"{_fmt(r0.get('mean_pointing_ceiling'))}. Pointing rule: {cm.POINTING_RULE}. Cell-centre rule: "
                  f"{cm.POINTING_CELL_RULE}. Dead: no positive activation on any test image. PCA: each direction "
                  f"as two units (+ and - its projection: an eigenvector's sign is arbitrary), chosen on train like "
                  f"every unit; no counterfactual drop, since its zero (the training mean) is arbitrary."]
    if versus:
        lines += ["", cm.versus_text(versus["baseline"], versus["difference"], versus["low"], versus["high"])
                  + f"; {versus['n_boot']} resamples of the test images."]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- fresh sketches
def fresh_sketches(model, ckpt: dict, imageset: data.ImageSet, grid: tuple, cfg) -> tuple[torch.Tensor, cm.PartTruth]:
    """Layer4 maps and part ground truth of ``FRESH_PER_CLASS`` new sketches per class.

    Drawn by the dataset's generator, style and size with ``FRESH_SEED``: sample j of class
    c comes from the seed (FRESH_SEED, c, j), so no dataset image (seed ``spec["seed"]``)
    is among them, and the classifier, SAE and baselines never saw them.
    """
    spec = ckpt["dataset"]
    if cfg.FRESH_SEED == spec.get("seed", 0):
        raise UserError(f"FRESH_SEED={cfg.FRESH_SEED} is the dataset's own seed: its sketches would be the training images")
    t = time.time()
    drawn = synthetic.generate_synthetic(cfg.FRESH_PER_CLASS, spec["image_size"], seed=cfg.FRESH_SEED,
                                         style=synthetic.spec_style(spec))
    maps = layer4_maps(model, drawn["images"], np.arange(len(drawn["labels"])), ckpt["preprocess"], cfg.BATCH_SIZE)[0]
    truth = cm.part_truth(drawn["parts"], drawn["labels"], imageset.part_types, summarize.part_table(imageset), grid,
                          spec["image_size"])
    log(f"fresh sketches: {len(maps)} (seed {cfg.FRESH_SEED}), {time.time() - t:.1f}s")
    return maps, truth


RUN_KEYS = ("CLASSIFIER_CKPT", "OUT_DIR", "CACHE_DIR", "RESUME", "OVERWRITE", "TENSORBOARD", "SEED", "DEVICE",
            "NUM_THREADS", "WORLD_SIZE")  # recorded settings that do not change what the SAE learns (but SEED), or no flag


def sae_settings(sae_ckpt: dict) -> dict:
    """The training settings an SAE checkpoint records, less paths, run control and its seed."""
    return {k: v for k, v in sae_ckpt.get("config", {}).items() if k not in RUN_KEYS}


def seed_sae(cfg, sae_ckpt: dict, classifier_ckpt: dict, seed: int):
    """An SAE trained like the given one (its recorded settings) but with ``seed``: reused if one matches."""
    path = f"{cfg.SEED_SAE_DIR.format(seed=seed)}/{artifacts.BEST_SAE}"
    settings = sae_settings(sae_ckpt)
    if Path(path).is_file():
        try:
            sae, ckpt = artifacts.load_sae(path, classifier_ckpt)
            recorded = sae_settings(ckpt)       # a setting added since the given SAE was trained may be extra here
            if all(recorded.get(k) == v for k, v in settings.items()) and ckpt["config"].get("SEED") == seed:
                return sae
            log(f"{path} was trained with other settings: training it again")
        except UserError as exc:       # trained on another classifier: train again
            log(f"{path}: {exc}")
    log(f"training the seed-{seed} SAE into {Path(path).parent}")
    train_sae.main(classifier_ckpt=cfg.CLASSIFIER_CKPT, out_dir=str(Path(path).parent), cache_dir=cfg.CACHE_DIR,
                   tensorboard=False, overwrite=True, seed=seed, **{k.lower(): v for k, v in settings.items()})
    return artifacts.load_sae(path, classifier_ckpt)[0]


def fresh_report(cfg, codes: dict, maps: dict, truth: dict, seed_codes: dict, train_max: dict) -> list[dict]:
    """Detection measures of every code on the fresh sketches; each SAE against the best baseline.

    ``train_max``: the codes' training maxima from the test-split pass (the seed SAEs' are computed here).
    """
    codes = {"sae": codes["sae"], **seed_codes, **{k: v for k, v in codes.items() if k != "sae"}}
    measured = measure(codes, maps, truth, None, cfg.BATCH_SIZE, train_max)
    sae_keys = ["sae", *seed_codes]
    baselines_measured = {k: r for k, r in measured.items() if k not in sae_keys}
    rows = []
    present = truth["test"].present
    for key, rep in measured.items():
        row = rep.to_dict()
        if key in sae_keys:
            row["versus"] = cm.versus_best_baseline({"sae": rep, **baselines_measured}, present, seed=cfg.SEED)
            # and every baseline within CONTENDER of it here: the one picked on train need not be the best here
            row["versus_each"] = [{"baseline": b.code, **cm.paired_auroc_difference(rep.unit_scores, b.unit_scores,
                                                                                    present, seed=cfg.SEED)}
                                  for b in baselines_measured.values()
                                  if np.nanmean(b.selection.test_auroc) >= np.nanmean(rep.selection.test_auroc) - cfg.CONTENDER]
        rows.append(row)
    return rows


def render_fresh(rows: list[dict], n_images: int, cfg) -> list[str]:
    lines = ["", f"### The same units on {n_images} fresh sketches (generator seed {cfg.FRESH_SEED})", "",
             "Units chosen on the training split as above; scored on sketches no model saw. "
             f"SAE seeds {cfg.SEED_SAES}: the same settings, another initialisation and batch order "
             f"({cfg.SEED_SAE_DIR.format(seed='S')}).", "",
             "| code | held-out AUROC | AP | distractor-only AUROC | pointing (chance) | minus the best baseline "
             f"(picked on train), then every baseline within {cfg.CONTENDER} of it here (95% paired interval) |",
             "|---|---:|---:|---:|---:|---|"]
    for r in rows:
        v = r.get("versus")
        each = [e for e in r.get("versus_each", []) if not v or e["baseline"] != v["baseline"]]
        vs = "–" if not v else "; ".join(f"{e['difference']:+.4f} ({e['low']:+.4f}, {e['high']:+.4f}) vs {e['baseline']}"
                                         for e in [v, *each])
        pointing = "–" if r.get("mean_pointing") is None else f"{r['mean_pointing']:.3f} ({r['mean_pointing_chance']:.3f})"
        lines.append(f"| {r['code']} | {r['mean_test_auroc']:.4f} | {r['mean_test_ap']:.4f} | "
                     f"{_fmt(r['mean_distractor_auroc'])} | {pointing} | {vs} |")
    return lines


# ----------------------------------------------------------------------------- sweep
def sweep(cfg, maps: dict, truth: dict) -> list[dict]:
    """Train an SAE per (K, M) on the classifier's tokens and score it held out."""
    rows = []
    for m in cfg.SWEEP_M:
        for k in cfg.SWEEP_K:
            out_dir = f"{cfg.SWEEP_DIR}/m{m}_k{k}"
            t = time.time()
            metrics = train_sae.main(classifier_ckpt=cfg.CLASSIFIER_CKPT, out_dir=out_dir, cache_dir=cfg.CACHE_DIR,
                                     latent_dim=m, top_k=k, epochs=cfg.SWEEP_EPOCHS, tensorboard=False, seed=cfg.SEED,
                                     overwrite=True)
            train_s = time.time() - t
            sae, _ = artifacts.load_sae(f"{out_dir}/{artifacts.BEST_SAE}")
            rep = measure({"sae": baselines.sae_code(sae)}, maps, truth, None, cfg.BATCH_SIZE)["sae"].to_dict()
            rows.append({"M": m, "K": k, "val_fvu": metrics.get("val_fvu"), "dead": rep["dead_share"],
                         "dead_val": metrics.get("val_dead_fraction"),
                         "auroc": rep["mean_test_auroc"], "ap": rep["mean_test_ap"],
                         "distractor": rep["mean_distractor_auroc"], "pointing": rep["mean_pointing"],
                         "seconds": time.time() - t, "train_seconds": train_s})
            log(f"sweep M={m} K={k}: {rows[-1]}")
    return rows


def render_sweep(rows: list[dict], cfg) -> str:
    lines = ["## L0/width sweep, scored by held-out recovery", "",
             f"SAEs trained for {cfg.SWEEP_EPOCHS} epochs on {cfg.CLASSIFIER_CKPT}'s tokens; units chosen on the "
             "training split, scored on the **validation** split (the sweep chooses the defaults; the test split is "
             "left for the headline figures). Dead (scored split): no positive activation on any of its images.", "",
             "| M | K | val FVU | dead (val tokens) | dead (scored images) | held-out AUROC | AP | distractor-only AUROC | pointing | s/cell |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['M']} | {r['K']} | {_fmt(r['val_fvu'], '.4f')} | {_fmt(r.get('dead_val'), '.1%')} | {r['dead']:.1%} | {_fmt(r['auroc'])} "
                     f"| {_fmt(r['ap'])} | {_fmt(r['distractor'])} | {_fmt(r['pointing'])} | {r['seconds']:.0f} |")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- main
def main(**overrides) -> dict:
    cfg = make_config(module_constants(globals()), overrides)
    set_threads(cfg.NUM_THREADS)
    model, ckpt = artifacts.load_classifier(cfg.CLASSIFIER_CKPT)
    imageset = data.load_dataset(ckpt["dataset"], cfg.CACHE_DIR, progress=False)
    if not imageset.parts or not imageset.origins:
        raise UserError(f"{cfg.CLASSIFIER_CKPT} was not trained on the synthetic set: no part ground truth")
    split = {s: np.sort(ckpt["split"][s].numpy()) for s in ("train", "val", "test")}
    # the sweep chooses defaults, so it scores on validation and leaves the test split to the headline figures
    scored_on = "val" if cfg.SWEEP else "test"
    idx = {"train": summarize.select_images(split["train"], imageset.labels, cfg.TRAIN_PER_CLASS, cfg.SEED),
           "test": split[scored_on]}
    t = time.time()
    maps, logits = {}, {}
    for s in ("train", "test"):
        maps[s], logits[s] = layer4_maps(model, imageset.images, idx[s], ckpt["preprocess"], cfg.BATCH_SIZE)
    grid = tuple(maps["test"].shape[2:])
    truth = {s: summarize.part_ground_truth(imageset, idx[s], grid) for s in ("train", "test")}
    log(f"layer4 maps {grid}: {len(idx['train'])} train / {len(idx['test'])} {scored_on} images, {time.time() - t:.1f}s")
    if cfg.SWEEP:
        rows = sweep(cfg, maps, truth)
        write_section(cfg.OUT.replace(".md", "_sweep.md"), render_sweep(rows, cfg).splitlines())
        return {"sweep": rows}
    sae, sae_ckpt = artifacts.load_sae(cfg.SAE_CKPT, ckpt)
    rerenders = summarize.rerender_test_images(imageset, idx["test"], cfg.CF_IMAGES, cfg.SEED) if cfg.CF_IMAGES else None
    cf, cf_note = None, "counterfactuals off."
    if rerenders is not None:
        cf = {"maps": layer4_maps(model, rerenders.images, np.arange(len(rerenders.row)), ckpt["preprocess"],
                                  cfg.BATCH_SIZE)[0], "rerenders": rerenders}
        cf_note = f"counterfactuals: {rerenders.n_images} test images x each part left out ({len(rerenders.row)} re-renders)."
    t = time.time()
    codes = comparison_codes(sae, maps["train"], cfg)
    train_max = summarize.code_maxima(codes, in_batches(maps["train"], cfg.BATCH_SIZE))[0]   # reused on fresh sketches
    measured = measure(codes, maps, truth, cf, cfg.BATCH_SIZE, train_max)
    versus = cm.versus_best_baseline(measured, truth["test"].present, seed=cfg.SEED)
    reports = [r.to_dict() for r in measured.values()]
    log("held-out AUROC: " + ", ".join(f"{r['code']} {r['mean_test_auroc']:.3f}" for r in reports)
        + f" ({time.time() - t:.1f}s)")
    reports += [class_set_report(logits, truth).to_dict(), probe_report(maps, truth).to_dict()]
    context = (f"{cfg.CLASSIFIER_CKPT} + {cfg.SAE_CKPT}; layer4 map {grid[0]}x{grid[1]}; units chosen on "
               f"{len(idx['train'])} training images, scored on {len(idx['test'])} test images; {cf_note}")
    lines, fresh = render(reports, cfg, context, versus).splitlines(), None
    if cfg.FRESH_PER_CLASS:
        fresh_maps, fresh_truth = fresh_sketches(model, ckpt, imageset, grid, cfg)
        given_seed = sae_ckpt.get("config", {}).get("SEED")
        seed_codes = {f"sae_seed{s}": baselines.sae_code(seed_sae(cfg, sae_ckpt, ckpt, s), f"{codes['sae'].name}, seed {s}")
                      for s in cfg.SEED_SAES if s != given_seed}
        codes = {"sae": baselines.sae_code(sae, f"{codes['sae'].name}, seed {given_seed} (the one given)"),
                 **{k: v for k, v in codes.items() if k != "sae"}}
        fresh = fresh_report(cfg, codes, {"train": maps["train"], "test": fresh_maps},
                             {"train": truth["train"], "test": fresh_truth}, seed_codes, train_max)
        log("fresh sketches, held-out AUROC: " + ", ".join(f"{r['code']} {r['mean_test_auroc']:.4f}" for r in fresh))
        lines += render_fresh(fresh, len(fresh_maps), cfg)
    write_section(cfg.OUT, lines)
    return {"reports": reports, "sae_versus_best_baseline": versus, "fresh": fresh}


if __name__ == "__main__":
    run_cli(main, globals())
