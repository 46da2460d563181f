"""Benchmark: does "why A rather than B" (why_did_you --versus) cite the parts that tell A from B?

On the synthetic sketches every class is three parts, and classes share parts (circle is in four of
the twelve). For each test image, A is the predicted class and B the runner-up; of A's parts, those B
lacks *distinguish* A from B and the others are *shared*. Each cited neuron is given the part stage 3
named it after (its best part on the training split, kept only where ``prompts.names_part`` holds:
train AUROC and distractor AUROC >= 0.8), so parts are assigned on the training split and scored here
on test images. Per explanation, the share of the cited evidence (contributions of the N cited
neurons) that goes to neurons of a distinguishing part, of a shared part, or to neither (another
part, or a neuron named after no part):

* the plain explanation (evidence for A's logit) is the baseline;
* the contrast (evidence for the margin logit_A - logit_B) should move the evidence from shared to
  distinguishing parts;
* chance: the distinguishing share of A's parts, |parts(A) - parts(B)| / |parts(A)|, what a citation
  blind to B would give if it spread the evidence evenly over A's parts.

Usage: python bench/bench_contrast.py [--classifier_ckpt=...] [--sae_ckpt=...] [--report_dir=neuron_report]
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.run_all import machine  # noqa: E402
from bench.sections import write_section  # noqa: E402
from selfexplain import artifacts, data, explain, summarize  # noqa: E402
from selfexplain.config import make_config, module_constants, run_cli  # noqa: E402
from selfexplain.errors import UserError  # noqa: E402
from selfexplain.logs import log  # noqa: E402
from selfexplain.prompts import names_part  # noqa: E402

CLASSIFIER_CKPT = artifacts.CLASSIFIER_CKPT   # trained classifier (synthetic data: parts are known)
SAE_CKPT = artifacts.SAE_CKPT                 # its SAE
REPORT_DIR = artifacts.REPORT_DIR             # stage 3's neurons.jsonl: the part each neuron is named after
CACHE_DIR = artifacts.CACHE_DIR               # image cache for the test split
N = 5                                         # neurons cited per explanation (why_did_you's N)
BATCH_SIZE = 64                               # images per forward pass
OUT = "bench/results/contrast.md"             # markdown section written here (merged into RESULTS.md)


def neuron_parts(report_dir: str | Path) -> dict[int, str]:
    """{neuron id: the part stage 3 names it after} for the neurons that pass ``prompts.names_part``."""
    path = Path(report_dir) / artifacts.NEURONS
    if not path.is_file():
        raise UserError(f"{path} is missing: run sae_summarize.py for these models first")
    return {r["neuron_id"]: r["parts"]["best_part"] for r in artifacts.read_jsonl(path)
            if r.get("parts") and not r.get("dead") and names_part(r["parts"])}


def evidence_shares(cited: list[explain.CitedNeuron], part_of: dict[int, str], distinguishing: set,
                    shared: set) -> np.ndarray:
    """(distinguishing, shared, neither): shares of the cited neurons' summed contribution."""
    total = sum(n.contribution for n in cited)
    out = np.zeros(3)
    for n in cited:
        part = part_of.get(n.neuron_id)
        out[0 if part in distinguishing else 1 if part in shared else 2] += n.contribution
    return out / total if total > 0 else out


def evaluate(models: explain.Models, images: np.ndarray, class_parts: list[set], part_of: dict[int, str],
             n_cite: int, batch_size: int) -> list[dict]:
    """One record per image: its classes A and B, chance, and the plain and contrastive evidence shares."""
    records = []
    for start in range(0, len(images), batch_size):
        analysis = explain.analyse(models, images[start:start + batch_size])
        for b in range(len(analysis.logits)):
            a, other = (int(i) for i in analysis.logits[b].topk(2).indices)
            distinguishing, shared = class_parts[a] - class_parts[other], class_parts[a] & class_parts[other]
            shares = {}
            for kind, lens in (("plain", models.lens[:, a]), ("contrast", models.lens[:, a] - models.lens[:, other])):
                contrib = (analysis.z_mean[b] * lens).double()
                shares[kind] = evidence_shares(explain.cite(models, analysis, b, contrib, {}, None, n_cite), part_of,
                                               distinguishing, shared)
            records.append({"a": a, "b": other, "n_shared": len(shared),
                            "chance": len(distinguishing) / max(1, len(class_parts[a])), **shares})
    return records


def summarise(records: list[dict]) -> dict:
    """Mean shares over the test images, and how many of them are mostly on distinguishing parts."""
    out = {"images": len(records), "share_a_part": sum(r["n_shared"] > 0 for r in records),
           "chance": float(np.mean([r["chance"] for r in records]))}
    for kind in ("plain", "contrast"):
        out[kind] = np.mean([r[kind] for r in records], axis=0).tolist()
        # images whose cited evidence goes more to distinguishing parts than to shared ones or to neither
        out[f"{kind}_mostly_distinguishing"] = float(np.mean([r[kind][0] > max(r[kind][1:]) for r in records]))
    return out


def render(row: dict, cfg, n_named: int, n_latents: int) -> list[str]:
    lines = ["## Why A rather than B: does the contrast cite the parts that tell the classes apart?", "",
             f"Measured on {machine()}. {cfg.CLASSIFIER_CKPT} + {cfg.SAE_CKPT}, the {row['images']} test images; A = "
             f"predicted class, B = runner-up ({row['share_a_part']} of the pairs share a part). The {cfg.N} cited "
             f"neurons' evidence, by the part stage 3 names each after ({n_named} of {n_latents} neurons, named on the "
             "training split: train and distractor AUROC >= 0.8). Chance: the distinguishing share of A's parts.", "",
             "| explanation | distinguishing parts | shared parts | neither | images mostly on distinguishing parts | "
             "chance |", "|---|---:|---:|---:|---:|---:|"]
    for kind, label in (("plain", "plain (evidence for A's logit): the baseline"),
                        ("contrast", "**contrast** (evidence for the margin A - B, `--versus=runner_up`)")):
        d, s, o = row[kind]
        lines.append(f"| {label} | {d:.3f} | {s:.3f} | {o:.3f} | {row[f'{kind}_mostly_distinguishing']:.3f} | "
                     f"{row['chance']:.3f} |")
    return lines


def main(**overrides) -> dict:
    cfg = make_config(module_constants(globals()), overrides)
    models = explain.load_models(cfg.CLASSIFIER_CKPT, cfg.SAE_CKPT, "cpu")
    imageset = data.load_dataset(models.classifier_ckpt["dataset"], cfg.CACHE_DIR, progress=False)
    if not imageset.parts:
        raise UserError(f"{cfg.CLASSIFIER_CKPT} was not trained on the synthetic set: no parts to score against")
    table = summarize.part_table(imageset)                                     # (P, C)
    class_parts = [{imageset.part_types[p] for p in np.flatnonzero(table[:, c])} for c in range(table.shape[1])]
    part_of = neuron_parts(cfg.REPORT_DIR)
    test = np.sort(np.asarray(models.classifier_ckpt["split"]["test"]))
    with torch.no_grad():
        records = evaluate(models, np.ascontiguousarray(imageset.images[test]), class_parts, part_of, cfg.N,
                           cfg.BATCH_SIZE)
    row = summarise(records)
    log(f"distinguishing share of the cited evidence: plain {row['plain'][0]:.3f}, contrast {row['contrast'][0]:.3f} "
        f"(chance {row['chance']:.3f})")
    write_section(cfg.OUT, render(row, cfg, len(part_of), models.sae.n_latents))
    return row


if __name__ == "__main__":
    run_cli(main, globals())
