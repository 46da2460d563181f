"""Stage 3: summarise every SAE neuron (statistics, examples, concept recovery, HTML atlas).

Usage
-----
    python sae_summarize.py                                   # after train_standard_cnn.py and train_sae.py
    python sae_summarize.py --max_per_class=50 --top_examples=8
    python sae_summarize.py --sae_ckpt=runs/sae_topk/last_sae.pt --out_dir=neuron_report_last

One pass over the training split (or MAX_PER_CLASS images per class) records, for every
image and neuron, the max and mean over tokens of the Top-K code (what the SAE uses), the
max of the dense ReLU code, and activation-weighted positions. A second small pass
recomputes the token maps of each neuron's top examples only (memory stays O(N·M), not
O(N·T·M)). The analysis lives in selfexplain/summarize.py, the outputs in selfexplain/report.py.

Writes OUT_DIR/neurons.jsonl (one object per neuron), summary.json (counts, timings,
concept recovery on data with ground-truth parts, fingerprints, config), thumbs/ and
sprites/ (top examples with their activation heat) and index.html (a self-contained
atlas; sae_summary_to_llm.py rebuilds it with the concepts once it has run). Records carry
the SAE's fingerprint; the images are rendered aside and swapped in only when all succeeded.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from selfexplain import artifacts, report, summarize
from selfexplain.artifacts import save_effective_config
from selfexplain.config import make_config, module_constants, run_cli
from selfexplain.distributed import exit_on_sigterm, keep_freed_memory, resolve_device, set_threads
from selfexplain.errors import UserError
from selfexplain.logs import log
from selfexplain.sae import logit_lens

# ----------------------------------------------------------------------------- config
CLASSIFIER_CKPT = artifacts.CLASSIFIER_CKPT    # stage 1 checkpoint (records dataset, preprocessing, split)
SAE_CKPT = artifacts.SAE_CKPT                  # stage 2 checkpoint (must be trained on CLASSIFIER_CKPT)
OUT_DIR = artifacts.REPORT_DIR                 # where neurons.jsonl, summary.json, thumbs/, sprites/, index.html go
CACHE_DIR = artifacts.CACHE_DIR                # decoded image cache (same as stage 1)
QUANTILE = 0.99                                # "on" = per-image max activation above this quantile over images
PMI_LAMBDA = 1.0                               # Laplace smoothing λ of the class PMI
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
SEED = 0                                       # seeds the per-class sample
OVERWRITE = False                              # replace an earlier report in OUT_DIR (stage 4's answers are kept)


def check_config(cfg) -> None:
    """Refuse settings no run could use, with one line."""
    if not 0.0 < cfg.QUANTILE < 1.0:
        raise UserError(f"QUANTILE must be in (0, 1), got {cfg.QUANTILE}")
    if cfg.PMI_LAMBDA < 0 or cfg.TOP_EXAMPLES < 1 or cfg.BATCH_SIZE < 1 or cfg.THUMB_SIZE < 8:
        raise UserError("need PMI_LAMBDA >= 0, TOP_EXAMPLES >= 1, BATCH_SIZE >= 1 and THUMB_SIZE >= 8")


# ----------------------------------------------------------------------------- main
def main(**overrides) -> dict:
    cfg = make_config(module_constants(globals()), overrides)
    check_config(cfg)
    set_threads(cfg.NUM_THREADS)
    torch.manual_seed(cfg.SEED)
    # stage 4's answers stay: they carry the SAE fingerprint, so readers set aside those of another SAE
    artifacts.prepare_out_dir(cfg.OUT_DIR, [artifacts.NEURONS, artifacts.SUMMARY], overwrite=cfg.OVERWRITE, clear=False,
                              can_resume=False)
    timings, t0 = {}, time.time()
    inputs = summarize.load_inputs(cfg.CLASSIFIER_CKPT, cfg.SAE_CKPT, cfg.CACHE_DIR, resolve_device(cfg.DEVICE),
                                   cfg.CHANNELS_LAST)
    imageset, sae = inputs.imageset, inputs.sae
    indices = summarize.select_images(inputs.classifier_ckpt["split"]["train"].numpy(), imageset.labels,
                                      cfg.MAX_PER_CLASS, cfg.SEED)
    labels = imageset.labels[indices]
    log(f"summarising {sae.n_latents} neurons (K={sae.k}) on {len(indices)} training images, device {inputs.device}")
    run = dict(batch_size=cfg.BATCH_SIZE, amp=cfg.AMP)
    acts = summarize.collect(inputs, indices, **run, cache_mb=cfg.FEATURE_CACHE_MB)
    timings["pass1"] = time.time() - t0

    t = time.time()
    lens = logit_lens(sae, inputs.classifier.fc.weight).detach().cpu().double().numpy()
    st = summarize.neuron_stats(acts, labels, lens, cfg.QUANTILE, cfg.PMI_LAMBDA)
    timings["stats"] = time.time() - t
    t = time.time()
    examples = summarize.find_examples(inputs, acts, indices, cfg.TOP_EXAMPLES, **run)
    acts.fmaps = None  # the cached layer4 maps (up to FEATURE_CACHE_MB) are no longer needed
    recovery = summarize.concept_recovery(acts, examples, imageset, indices, inputs.prep["image_size"])
    timings["pass2_and_recovery"] = time.time() - t

    t = time.time()
    out = Path(cfg.OUT_DIR)
    with report.staged_images(out) as staging:  # a failure before the swap keeps the previous run's images
        thumbs = report.render_examples(staging, lambda r: np.asarray(imageset.images[indices[r]]), examples,
                                        acts.grid, cfg.THUMB_SIZE, cfg.HEAT_ALPHA)
        entries = report.example_entries(examples, thumbs, indices, labels, imageset.class_names)
        records = report.neuron_records(st, imageset.class_names, entries, inputs.sae_fingerprint, recovery,
                                        cfg.TOP_CLASSES, cfg.ANTI_CLASSES, cfg.WEAK_PMI)
    timings["render"] = time.time() - t
    artifacts.write_jsonl(out / artifacts.NEURONS, records)
    timings["total"] = time.time() - t0
    n_clear = sum(report.has_clear_class(r, cfg.WEAK_PMI) for r in records)
    summary = {**summarize.summary_metrics(inputs, acts, st, labels, n_clear, recovery, timings), "config": dict(cfg)}
    artifacts.write_json(out / artifacts.SUMMARY, summary)
    save_effective_config(cfg, out)
    report.write_index_html(out)
    _log(summary, out)
    return summary


def _log(summary: dict, out: Path) -> None:
    log(f"{summary['n_neurons']} neurons, {summary['n_dead']} dead, {summary['n_clear_class']} with a clear class; "
        f"SAE keeps {100 * summary['sae_top1_agreement']:.1f}% of predictions; {summary['timings_s']['total']:.1f}s")
    rec = summary["concept_recovery"]
    if rec:
        log(f"concept recovery: mean best AUROC {rec['mean_best_auroc']:.3f}, "
            f"mean in-box share {rec['mean_in_box_share']:.2f} (chance {rec['mean_in_box_chance']:.2f})")
    log(f"-> {out / artifacts.NEURONS}, {out / artifacts.INDEX_HTML}")


if __name__ == "__main__":
    exit_on_sigterm()
    keep_freed_memory()
    run_cli(main, globals())
