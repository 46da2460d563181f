"""Stage 3: summarise every SAE neuron (statistics, examples, held-out concept measures, HTML atlas).

Usage
-----
    python sae_summarize.py                                   # after train_standard_cnn.py and train_sae.py
    python sae_summarize.py --max_per_class=50 --top_examples=8
    python sae_summarize.py --sae_ckpt=runs/sae_topk/last_sae.pt --out_dir=neuron_report_last

One pass over the training split (or MAX_PER_CLASS images per class) records, for every
image and neuron, the max and mean over tokens of the Top-K code (what the SAE uses), the
max of the dense ReLU code, and activation-weighted positions. A second small pass
recomputes the token maps of each neuron's top examples only (memory stays O(N·M), not
O(N·T·M)). On data with ground-truth parts (the synthetic set) a third pass scores, per
part type, the neuron chosen on those training images on the classifier's test split
(AUROC, AP, pointing game, counterfactual drops on CF_IMAGES re-rendered test images), with
the same measures for the BASELINES beside it (a random SAE, the layer4 channels, PCA, NMF).
The analysis lives in selfexplain/summarize.py, the outputs in selfexplain/report.py.

Writes OUT_DIR/neurons.jsonl (one object per neuron), summary.json (counts, timings, the
held-out concept measures, fingerprints, config), thumbs/ and
sprites/ (top examples with their activation heat) and index.html (a self-contained
atlas; sae_summary_to_llm.py rebuilds it with the concepts once it has run). Records carry
the SAE's fingerprint; the images are rendered aside and swapped in only when all succeeded.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from selfexplain import artifacts, baselines, prompts, report, summarize
from selfexplain import concept_measures as cm
from selfexplain.artifacts import save_effective_config
from selfexplain.config import Config, make_config, module_constants, require_ranges, run_cli
from selfexplain.distributed import exit_on_sigterm, keep_freed_memory, resolve_device, set_threads
from selfexplain.errors import UserError
from selfexplain.logs import log
from selfexplain.sae import logit_lens

# ----------------------------------------------------------------------------- config
CLASSIFIER_CKPT = artifacts.CLASSIFIER_CKPT    # stage 1 checkpoint (records dataset, preprocessing, split)
SAE_CKPT = artifacts.SAE_CKPT                  # stage 2 checkpoint (must be trained on CLASSIFIER_CKPT)
OUT_DIR = artifacts.REPORT_DIR                 # where neurons.jsonl, summary.json, thumbs/, sprites/, index.html go
CACHE_DIR = artifacts.CACHE_DIR                # decoded image cache (same as stage 1)
DATA_ROOT = ""                                 # the classifier's data, if it moved since stage 1 ('' = where stage 1 read it; the same images are required)
QUANTILE = 0.99                                # "on" = per-image max activation above this quantile over images
MIN_ON_IMAGES = 20                             # QUANTILE is lowered so that this many images sit above τ (0 = never)
PMI_LAMBDA = 1.0                               # Laplace smoothing λ of the class PMI (> 0)
TOP_EXAMPLES = 8                               # strongest images kept per neuron (thumbs, sprite, LLM)
TOP_CLASSES = 5                                # classes listed per neuron (most specific first)
ANTI_CLASSES = 3                               # classes listed as avoided per neuron
WEAK_PMI = 0.5                                 # best PMI below this reads as "weak/unclear" in the summary
MAX_PER_CLASS = 0                              # summarise at most this many training images per class (0 = all)
BATCH_SIZE = 128                               # images per forward pass
FEATURE_CACHE_MB = 1024                        # keep layer4 maps in memory up to this size (skips pass 2's backbone)
THUMB_SIZE = 80                                # side of each example thumbnail in pixels
HEAT_ALPHA = 0.6                               # opacity of the red activation overlay at the peak
DEVICE = "auto"                                # auto | cpu | cuda
CHANNELS_LAST = True                           # channels_last memory format (faster convs, same maths)
AMP = "off"                                    # off keeps the closed-form contributions exact; auto | bf16 | fp16
NUM_THREADS = 0                                # CPU intra-op threads (0 = torch default)
SEED = 0                                       # seeds the per-class sample, the re-rendered test images, NMF
# nmf costs ~50 s more on 2 cores at M=512 with a 4x4 map (bench/bench_concepts.py scores all four)
BASELINES = ["random_sae", "channels", "pca"]  # ground-truth parts: codes measured beside the SAE (random_sae | channels | pca | nmf; [] = none)
CF_IMAGES = 120                                # ground-truth parts: test images re-rendered without each part (0 = none)
NMF_TOKENS = 4096                              # baselines: training tokens PCA and NMF are fitted on
NMF_ITERS = 100                                # baselines: NMF fit rounds (bench: 8192 tokens x 200, AUROC +0.003)
NMF_CODE_ITERS = 50                            # baselines: NMF coding of new tokens, update rounds
OVERWRITE = False                              # replace an earlier report in OUT_DIR (stage 4's answers are kept)


def check_config(cfg) -> None:
    """Refuse settings no run could use, with one line."""
    if not 0.0 < cfg.QUANTILE < 1.0:
        raise UserError(f"QUANTILE must be in (0, 1), got {cfg.QUANTILE}")
    # λ = 0 leaves log(0) = -inf for classes a neuron is never on with: "-Infinity" is not JSON
    if cfg.PMI_LAMBDA <= 0 or cfg.TOP_EXAMPLES < 1 or cfg.BATCH_SIZE < 1 or cfg.THUMB_SIZE < 8 or cfg.MIN_ON_IMAGES < 0:
        raise UserError("need PMI_LAMBDA > 0, TOP_EXAMPLES >= 1, BATCH_SIZE >= 1, THUMB_SIZE >= 8 and MIN_ON_IMAGES >= 0")
    if cfg.CF_IMAGES < 0 or cfg.NMF_TOKENS < 1 or cfg.NMF_ITERS < 1 or cfg.NMF_CODE_ITERS < 1:
        raise UserError("need CF_IMAGES >= 0, NMF_TOKENS >= 1, NMF_ITERS >= 1 and NMF_CODE_ITERS >= 1")
    require_ranges(cfg, {"SEED": (0, None), "TOP_CLASSES": (1, None), "ANTI_CLASSES": (0, None), "HEAT_ALPHA": (0, 1),
                         "NUM_THREADS": (0, None), "MAX_PER_CLASS": (0, None)})  # -3 summarised every image
    if not isinstance(cfg.BASELINES, (list, tuple)) or set(cfg.BASELINES) - set(baselines.BASELINES):
        raise UserError(f"BASELINES must be a list of {', '.join(baselines.BASELINES)}, got {cfg.BASELINES}")


# ----------------------------------------------------------------------------- main
def main(**overrides) -> dict:
    cfg = make_config(module_constants(globals()), overrides)
    check_config(cfg)
    set_threads(cfg.NUM_THREADS)
    torch.manual_seed(cfg.SEED)
    timings, t0 = {}, time.time()
    inputs = summarize.load_inputs(cfg.CLASSIFIER_CKPT, cfg.SAE_CKPT, cfg.CACHE_DIR, resolve_device(cfg.DEVICE),
                                   cfg.CHANNELS_LAST, cfg.DATA_ROOT)
    # after the inputs load (a missing checkpoint is the more useful error); stage 4's answers stay:
    # they carry the SAE fingerprint, so readers set aside those of another SAE
    artifacts.hold_out_dir(cfg.OUT_DIR)  # one run writes a report at a time (stage 4 locks its own file)
    artifacts.prepare_out_dir(cfg.OUT_DIR, [artifacts.NEURONS, artifacts.SUMMARY], overwrite=cfg.OVERWRITE, clear=False,
                              can_resume=False)
    imageset, sae = inputs.imageset, inputs.sae
    indices = summarize.select_images(inputs.classifier_ckpt["split"]["train"].numpy(), imageset.labels,
                                      cfg.MAX_PER_CLASS, cfg.SEED)
    labels = imageset.labels[indices]
    log(f"summarising {sae.n_latents} neurons (K={sae.k}) on {len(indices)} training images, device {inputs.device}")
    quantile = summarize.effective_quantile(cfg.QUANTILE, len(indices), cfg.MIN_ON_IMAGES)
    if quantile < cfg.QUANTILE:  # like stage 2's MIN_STEPS: small data still gets class statistics
        log(f"QUANTILE={cfg.QUANTILE} leaves about {len(indices) * (1 - cfg.QUANTILE):.1f} images above each neuron's "
            f"threshold on {len(indices)} training images (a class preference needs {report.MIN_SUPPORT} of one "
            f"class): lowered to {quantile:.4g} so that about {len(indices) * (1 - quantile):.0f} are (at least "
            f"{summarize.QUANTILE_FLOOR}; --min_on_images=0 keeps it)")
    if note := report.thin_classes_note(labels, imageset.class_names):
        log(note)
    cfg = Config({**cfg, "QUANTILE": quantile})  # the effective value: config.json and summary.json record what ran
    run = dict(batch_size=cfg.BATCH_SIZE, amp=cfg.AMP)
    acts = summarize.collect(inputs, indices, **run, cache_mb=cfg.FEATURE_CACHE_MB)
    timings["pass1"] = time.time() - t0

    t = time.time()
    lens = logit_lens(sae, inputs.classifier.fc.weight).detach().cpu().double().numpy()
    st = summarize.neuron_stats(acts, labels, lens, cfg.QUANTILE, cfg.PMI_LAMBDA)
    timings["stats"] = time.time() - t
    t = time.time()
    examples = summarize.find_examples(inputs, acts, indices, cfg.TOP_EXAMPLES, **run)
    timings["pass2"] = time.time() - t
    held_out, parts = measure_concepts(cfg, inputs, acts, indices, examples, timings)
    acts.fmaps = None  # the cached layer4 maps (up to FEATURE_CACHE_MB) are no longer needed

    t = time.time()
    out = Path(cfg.OUT_DIR)
    written = {}

    def publish() -> None:  # right after the image swap, with Ctrl-C and SIGTERM held: the atlas is never mixed
        artifacts.write_jsonl(out / artifacts.NEURONS, written["records"])
        artifacts.write_json(out / artifacts.SUMMARY, written["summary"])
        save_effective_config(cfg, out)
        report.write_index_html(out)

    with report.staged_images(out, publish) as staging:  # a failure before the swap keeps the previous run whole
        thumbs = report.render_examples(staging, lambda r: np.asarray(imageset.images[indices[r]]), examples,
                                        acts.grid, cfg.THUMB_SIZE, cfg.HEAT_ALPHA)
        entries = report.example_entries(examples, thumbs, indices, labels, imageset.class_names)
        records = report.neuron_records(st, imageset.class_names, entries, inputs.sae_fingerprint, parts,
                                        cfg.TOP_CLASSES, cfg.ANTI_CLASSES, cfg.WEAK_PMI)
        timings["render"] = time.time() - t
        timings["total"] = time.time() - t0
        n_clear = sum(report.has_clear_class(r, cfg.WEAK_PMI) for r in records)
        written.update(records=records, summary={**summarize.summary_metrics(inputs, acts, st, labels, n_clear,
                                                                             held_out, timings), "config": dict(cfg)})
    _log(written["summary"], out)
    return written["summary"]


def measure_concepts(cfg, inputs, acts, indices, examples, timings: dict) -> tuple:
    """On data with ground-truth parts: (held-out measures of the SAE and its baselines, each neuron's best
    part on the training split); (None, None) elsewhere."""
    imageset = inputs.imageset
    if not imageset.parts or not imageset.part_types:
        return None, None
    t = time.time()
    run = dict(batch_size=cfg.BATCH_SIZE, amp=cfg.AMP)
    fitted = {"pca", "nmf"} & set(cfg.BASELINES)
    tokens = summarize.training_tokens(inputs, acts, indices, cfg.NMF_TOKENS, cfg.SEED, **run) if fitted else None
    codes = baselines.comparison_codes(inputs.sae, tokens, cfg.BASELINES, cfg.NMF_ITERS, cfg.NMF_TOKENS,
                                       cfg.NMF_CODE_ITERS, cfg.SEED)
    timings["baselines_fit"] = time.time() - t
    t = time.time()
    held_out = summarize.held_out_measures(inputs, acts, indices, codes, cfg.CF_IMAGES, cfg.SEED, **run)
    timings["held_out"] = time.time() - t
    return held_out, summarize.neuron_parts(held_out.sae_train_auroc, acts.top_max, examples, imageset, indices,
                                              acts.grid)


def _log(summary: dict, out: Path) -> None:
    log(f"{summary['n_neurons']} neurons, {summary['n_dead']} dead (never active on these {summary['n_images']} "
        f"training images), {summary['n_clear_class']} with a clear class; "
        f"SAE keeps {100 * summary['sae_top1_agreement']:.1f}% of predictions on these training images; "
        f"{summary['timings_s']['total']:.1f}s")
    measures = summary["concept_measures"]
    if not measures:
        log("no ground-truth parts in this dataset: the held-out concept measures need the synthetic sketches")
    else:
        codes = measures["codes"]
        sae = codes["sae"]
        cf = (f"; counterfactual drop own part {_fmt(sae.get('mean_cf_own_drop'))}, other parts "
              f"{_fmt(sae.get('mean_cf_other_drop'))}" if measures["counterfactual"] else "")
        log(f"held out (neurons chosen on {measures['n_train_images']} training images, scored on "
            f"{measures['n_test_images']} test images): part AUROC {_fmt(sae['mean_test_auroc'])}, "
            f"AP {_fmt(sae['mean_test_ap'])}, distractor-only AUROC {_fmt(sae['mean_distractor_auroc'])} "
            f"(a perfect class-set detector: {_fmt(sae['mean_class_set_auroc'])}); pointing game "
            f"{_fmt(sae['mean_pointing'])} (chance {_fmt(sae['mean_pointing_chance'])}, shuffled "
            f"{_fmt(sae.get('mean_pointing_shuffled'))}; cell-centre rule "
            f"{_fmt(sae.get('mean_pointing_cell'))}, chance {_fmt(sae.get('mean_pointing_cell_chance'))}, ceiling "
            f"{_fmt(sae.get('mean_pointing_ceiling'))}){cf}")
        if len(codes) > 1:
            log("baselines, held-out part AUROC: " + ", ".join(
                f"{r['code']} {_fmt(r['mean_test_auroc'])}" for key, r in codes.items() if key != "sae"))
        versus = measures.get("sae_versus_best_baseline")
        if versus:
            log(cm.versus_text(versus["baseline"], versus["difference"], versus["low"], versus["high"]))
    log(f"-> {out / artifacts.NEURONS}, {out / artifacts.INDEX_HTML}")


def _fmt(x) -> str:
    return "n/a" if x is None else prompts.fixed(x, 3)  # 0.9996 is not "1.000"


if __name__ == "__main__":
    exit_on_sigterm()
    keep_freed_memory()
    run_cli(main, globals())
