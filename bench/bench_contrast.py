"""Benchmark: does "why A rather than B" (why_did_you --versus) cite the parts that tell A from B?

On the synthetic sketches every class is three parts, and classes share parts (circle is in four of
the twelve). For each test image, A is the predicted class and B the runner-up; of A's parts, those B
lacks *distinguish* A from B and the others are *shared*. Each cited neuron is given the part stage 3
named it after (its best part on the training split, kept only where ``prompts.names_part`` holds:
train AUROC and distractor AUROC >= 0.8), so parts are assigned on the training split and scored here
on test images. Per explanation, the share of the cited evidence (contributions of the N cited
neurons) that goes to neurons of a distinguishing part, of a shared part, or to neither (another
part, or a neuron named after no part), and the distinguishing share of the evidence on A's parts
alone, d / (d + s), which is what the chance rate is on:

* the plain explanation (evidence for A's logit) is the baseline;
* the contrast (evidence for the margin logit_A - logit_B, ``explain.contrast`` itself) should move the
  evidence from shared to distinguishing parts;
* chance: the distinguishing share of A's parts, |parts(A) - parts(B)| / |parts(A)|, what a citation
  blind to B would give if it spread the evidence on A's parts evenly over them.

And in input space, without part labels: INK_SHARE of the ink is whited out where the contrast's cited
neurons fire, where the plain explanation's fire, and where RANDOM_DRAWS sets of as many random active
neurons fire (the product's own rule, ``evidence.concept_scores``), the classifier reruns, and the margin's
drop is read. If the contrast names what tells A from B, its ink should cut the margin more than the
plain explanation's, which also hits the parts both classes hold. The contrast is chosen for the margin in
the code, so this checks that the choice holds in input space (as the input check does for the logit);
the part measure above is the test that does not follow from how the neurons were chosen.

Last, true interventions: CF_IMAGES test images are re-rendered once per part with that part left out
(everything else identical, ``summarize.rerender_test_images``), and the margin's actual drop is read for
each of A's parts, split by whether the explanation cites it (a cited neuron is named after it). A
contrast that names what the margin rests on should cite the parts whose removal cuts the margin most.

Usage: python bench/bench_contrast.py [--classifier_ckpt=...] [--sae_ckpt=...] [--report_dir=neuron_report]
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.run_all import machine  # noqa: E402
from bench.sections import write_section  # noqa: E402
from selfexplain import artifacts, data, evidence, explain, summarize  # noqa: E402
from selfexplain.config import make_config, module_constants, run_cli  # noqa: E402
from selfexplain.errors import UserError  # noqa: E402
from selfexplain.logs import log  # noqa: E402
from selfexplain.prompts import names_part  # noqa: E402

CLASSIFIER_CKPT = artifacts.CLASSIFIER_CKPT   # trained classifier (synthetic data: parts are known)
SAE_CKPT = artifacts.SAE_CKPT                 # its SAE
REPORT_DIR = artifacts.REPORT_DIR             # stage 3's neurons.jsonl: the part each neuron is named after
CACHE_DIR = artifacts.CACHE_DIR               # image cache for the test split
N = 5                                         # neurons cited per explanation (why_did_you's N)
INK_SHARE = 0.2                               # input-space check: share of the ink whited out (why_did_you's)
RANDOM_DRAWS = 8                              # input-space check: random active-neuron sets (why_did_you's)
SEED = 0                                      # those draws, and the re-rendered images
CF_IMAGES = 240                               # test images re-rendered once per part left out (0 = none)
BATCH_SIZE = 64                               # images per forward pass
OUT = "bench/results/contrast.md"             # markdown section written here (merged into RESULTS.md)


def neuron_parts(report_dir: str | Path) -> dict[int, str]:
    """{neuron id: the part stage 3 names it after} for the neurons that pass ``prompts.names_part``."""
    path = Path(report_dir) / artifacts.NEURONS
    if not path.is_file():
        raise UserError(f"{path} is missing: run sae_summarize.py for these models first")
    return {r["neuron_id"]: r["parts"]["best_part"] for r in artifacts.read_jsonl(path)
            if r.get("parts") and not r.get("dead") and names_part(r["parts"])}


def evidence_shares(cited: list[tuple[int, float]], part_of: dict[int, str], distinguishing: set,
                    shared: set) -> np.ndarray:
    """(distinguishing, shared, neither): shares of the cited (neuron id, contribution) pairs' summed contribution."""
    total = sum(c for _, c in cited)
    out = np.zeros(3)
    for neuron_id, c in cited:
        part = part_of.get(neuron_id)
        out[0 if part in distinguishing else 1 if part in shared else 2] += c
    return out / total if total > 0 else out


def margin_drops(models: explain.Models, image: np.ndarray, analysis, b: int, sets: list[list[int]], a: int,
                 other: int, ink_share: float) -> np.ndarray:
    """Per set of neurons, the drop of ``logit[a] - logit[other]`` after whiting out ``ink_share`` of the ink
    where the set fires (the input check's rule: token maps times the ink carrying the set's code)."""
    pixels = evidence.set_activation_pixels(models, image, sets) if evidence.PIXEL_MAPS else None
    scores = evidence.concept_scores(models, image, analysis, b, sets, pixels=pixels)
    masks = evidence.rank_ink(image, scores, np.array([ink_share if ids else 0.0 for ids in sets]))
    x = data.model_input(torch.from_numpy(evidence.delete_ink(image, masks)), models.classifier_ckpt["preprocess"],
                         models.device)
    with torch.no_grad():
        logits = models.classifier(x).float()
    margin = float(analysis.logits[b, a] - analysis.logits[b, other])
    return margin - (logits[:, a] - logits[:, other]).cpu().numpy()


def evaluate(models: explain.Models, images: np.ndarray, class_parts: list[set], part_of: dict[int, str], cfg
             ) -> list[dict]:
    """One record per image: its classes A and B, chance, the plain and contrastive evidence shares, and
    the margin's drop when the ink of each (and of random active neurons) is whited out."""
    records, rng = [], np.random.default_rng(cfg.SEED)
    for start in tqdm(range(0, len(images), cfg.BATCH_SIZE), desc="contrast", unit="batch"):
        batch = images[start:start + cfg.BATCH_SIZE]
        with torch.no_grad():
            analysis = explain.analyse(models, batch)
        for b in range(len(batch)):
            a = int(analysis.logits[b].argmax())
            other = explain.runner_up(analysis.logits[b], a)
            distinguishing, shared = class_parts[a] - class_parts[other], class_parts[a] & class_parts[other]
            record = {"a": a, "b": other, "n_shared": len(shared),
                      "chance": len(distinguishing) / max(1, len(class_parts[a]))}
            plain = explain.cite(models, analysis, b, (analysis.z_mean[b] * models.lens[:, a]).double(), {}, None,
                                 cfg.N)  # as explain_one cites
            _, versus = explain.contrast(models, analysis, b, a, other, {}, None, cfg.N)
            cited = {kind: [(n.neuron_id, n.contribution) for n in neurons]
                     for kind, neurons in (("plain", plain), ("contrast", versus))}
            for kind in cited:
                record[kind] = evidence_shares(cited[kind], part_of, distinguishing, shared)
            record["cited_parts"] = {kind: {part_of.get(i) for i, _ in pairs} - {None} for kind, pairs in cited.items()}
            record["margin"] = float(analysis.logits[b, a] - analysis.logits[b, other])
            active = torch.nonzero(analysis.z_mean[b] > 0).flatten().cpu().numpy()
            randoms = explain.random_active_sets(active, len(cited["contrast"]), cfg.RANDOM_DRAWS, rng)
            sets = [[i for i, _ in cited["contrast"]], [i for i, _ in cited["plain"]], *[list(r) for r in randoms]]
            drops = margin_drops(models, batch[b], analysis, b, sets, a, other, cfg.INK_SHARE)
            record["drop"] = {"contrast": float(drops[0]), "plain": float(drops[1]),
                              "random": float(drops[2:].mean()) if randoms else float("nan")}
            records.append(record)
    return records


def counterfactuals(models: explain.Models, imageset: data.ImageSet, test: np.ndarray, records: list[dict],
                    class_parts: list[set], cfg) -> dict | None:
    """The margin's actual drop when one of A's parts is left out of the drawing, by whether each explanation
    cites that part; and by the ground truth (distinguishing or shared part). None without re-renders."""
    rer = summarize.rerender_test_images(imageset, test, cfg.CF_IMAGES, cfg.SEED) if cfg.CF_IMAGES else None
    if rer is None:
        return None
    logits = []
    for start in range(0, len(rer.images), cfg.BATCH_SIZE):
        x = data.model_input(torch.from_numpy(rer.images[start:start + cfg.BATCH_SIZE]),
                             models.classifier_ckpt["preprocess"], models.device)
        with torch.no_grad():
            logits.append(models.classifier(x).float().cpu())
    logits = torch.cat(logits)
    drops: dict[str, list[float]] = {}
    for k, (r, p) in enumerate(zip(rer.row, rer.part)):
        rec, part = records[r], imageset.part_types[p]
        if part not in class_parts[rec["a"]]:  # a distractor: not one of A's parts
            continue
        drop = rec["margin"] - float(logits[k, rec["a"]] - logits[k, rec["b"]])
        truth = "distinguishing" if part not in class_parts[rec["b"]] else "shared"
        for key in (f"truth {truth}", *(f"{kind} {'cited' if part in rec['cited_parts'][kind] else 'not cited'}"
                                        for kind in ("plain", "contrast"))):
            drops.setdefault(key, []).append(drop)
    return {"images": rer.n_images, **{k: {"n": len(v), "mean_drop": float(np.mean(v))} for k, v in drops.items()}}


def summarise(records: list[dict]) -> dict:
    """Mean shares over the test images, the share on A's own parts, how many images put over half their evidence
    on distinguishing parts, and the margin drops with the contrast's paired difference from the plain one."""
    out = {"images": len(records), "share_a_part": sum(r["n_shared"] > 0 for r in records),
           "chance": float(np.mean([r["chance"] for r in records]))}
    for kind in ("plain", "contrast"):
        out[kind] = np.mean([r[kind] for r in records], axis=0).tolist()
        on_parts = [r[kind][0] / (r[kind][0] + r[kind][1]) for r in records if r[kind][0] + r[kind][1] > 0]
        out[f"{kind}_of_own_parts"] = float(np.mean(on_parts)) if on_parts else float("nan")  # chance's base
        out[f"{kind}_over_half"] = float(np.mean([r[kind][0] > 0.5 for r in records]))  # a majority, not a plurality
    drops = {k: np.array([r["drop"][k] for r in records]) for k in ("contrast", "plain", "random")}
    out["drop"] = {k: float(np.nanmean(v)) for k, v in drops.items()}
    out["contrast_beats_plain"] = float(np.mean(drops["contrast"] > drops["plain"]))
    diff = drops["contrast"] - drops["plain"]  # paired over images: a bootstrap interval of the mean difference
    boot = np.random.default_rng(0).choice(diff, size=(1000, len(diff))).mean(1)
    out["contrast_minus_plain"] = [float(diff.mean()), *np.percentile(boot, [2.5, 97.5]).tolist()]
    out["contrast_beats_random"] = float(np.mean(drops["contrast"] > drops["random"]))
    return out


def render(row: dict, cfg, n_named: int, n_latents: int) -> list[str]:
    lines = ["## Why A rather than B: does the contrast cite the parts that tell the classes apart?", "",
             f"Measured on {machine()}. {cfg.CLASSIFIER_CKPT} + {cfg.SAE_CKPT}, the {row['images']} test images; A = "
             f"predicted class, B = runner-up ({row['share_a_part']} of the pairs share a part). The {cfg.N} cited "
             f"neurons' evidence, by the part stage 3 names each after ({n_named} of {n_latents} neurons, named on the "
             "training split: train and distractor AUROC >= 0.8). Chance: the distinguishing share of A's parts.", "",
             "| explanation | distinguishing parts | shared parts | neither | distinguishing of the evidence on A's parts, "
             "d / (d + s) | chance | images with over half on distinguishing parts |", "|---|---:|---:|---:|---:|---:|---:|"]
    for kind, label in (("plain", "plain (evidence for A's logit): the baseline"),
                        ("contrast", "**contrast** (evidence for the margin A - B, `--versus=runner_up`)")):
        d, s, o = row[kind]
        lines.append(f"| {label} | {d:.3f} | {s:.3f} | {o:.3f} | {row[f'{kind}_of_own_parts']:.3f} | "
                     f"{row['chance']:.3f} | {row[f'{kind}_over_half']:.3f} |")
    drop = row["drop"]
    lines += ["", f"In input space (no part labels): whiting out {cfg.INK_SHARE:.0%} of the ink where each set of "
              "neurons fires, the mean drop of the margin logit_A - logit_B:", "",
              "| ink whited out where ... fire | margin drop | the contrast's drop is larger on |", "|---|---:|---:|",
              f"| the contrast's {cfg.N} cited neurons | **{drop['contrast']:.3f}** | |",
              f"| the plain explanation's {cfg.N} | {drop['plain']:.3f} | {row['contrast_beats_plain']:.1%} of images "
              "(mean difference {:+.3f}, 95% paired interval {:+.3f} to {:+.3f}) |".format(*row["contrast_minus_plain"]),
              f"| as many random active neurons (mean of {cfg.RANDOM_DRAWS} draws) | {drop['random']:.3f} | "
              f"{row['contrast_beats_random']:.1%} of images |"]
    cf = row.get("counterfactuals")
    if cf:
        cell = lambda key: (f"{cf[key]['mean_drop']:.3f} ({cf[key]['n']})" if key in cf else "–")  # noqa: E731
        lines += ["", f"True interventions: {cf['images']} test images re-rendered once per part left out; the "
                  "margin's mean actual drop when one of A's parts is removed (pairs in brackets):", "",
                  "| parts of A | cited | not cited |", "|---|---:|---:|",
                  f"| by the **contrast** | **{cell('contrast cited')}** | {cell('contrast not cited')} |",
                  f"| by the plain explanation | {cell('plain cited')} | {cell('plain not cited')} |",
                  f"| ground truth: parts B lacks / parts both hold | {cell('truth distinguishing')} | "
                  f"{cell('truth shared')} |"]
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
    records = evaluate(models, np.ascontiguousarray(imageset.images[test]), class_parts, part_of, cfg)
    row = summarise(records)
    row["counterfactuals"] = counterfactuals(models, imageset, test, records, class_parts, cfg)
    log(f"distinguishing share of the cited evidence: plain {row['plain'][0]:.3f}, contrast {row['contrast'][0]:.3f} "
        f"(chance {row['chance']:.3f}); margin drop: contrast {row['drop']['contrast']:.3f}, plain "
        f"{row['drop']['plain']:.3f}, random {row['drop']['random']:.3f}")
    write_section(cfg.OUT, render(row, cfg, len(part_of), models.sae.n_latents))
    return row


if __name__ == "__main__":
    run_cli(main, globals())
