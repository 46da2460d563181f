"""Benchmark: does the classifier read a person's drawing of its classes?

Draws ``N_PER_CLASS`` sketches of every synthetic class in every layout with the second
renderer (``bench/person_sketches.py``: clean PIL shapes at 1111 px, thin to thick pens,
read back through the project's ink-preserving decode at the checkpoint's input size),
classifies them and prints accuracy per layout and per pen width, beside chance, and how
much the predictions collapse onto a few classes. It trains nothing; it needs a trained
synthetic classifier (``make demo`` or ``python train_standard_cnn.py``).

With the classifier's SAE and stage 3's report it also measures the explanation's concept
agreement: do the cited concepts (the ``N_CITE`` neurons contributing most to the predicted
logit, as why_did_you cites them) name the parts actually drawn? Each neuron stands for the
part type stage 3 matched it to on the training split (``best_part`` in neurons.jsonl).

* part agreement: share of cited neurons whose best part is drawn in the sketch; beside
  ``RANDOM_DRAWS`` random sets of as many active neurons, and the prior (the share of the
  dictionary's neurons whose best part is drawn: neurons picked blindly);
* coverage: share of the drawn parts named by at least one cited neuron (beside random);
* pointing: for a cited neuron whose best part is drawn, its peak point lies inside that
  part's box (``concept_measures.pointing_game``'s rule); beside chance,
  the same rule on maps of noise;
* input-space evidence (why_did_you's check, ``evidence.input_deletion``): the logit drop
  after whiting out ``INK_SHARE`` of the ink where the cited concepts fire, beside random
  active neurons and CAM, as ``bench_explain`` measures it on the test split.

Without an SAE for the classifier or a report, that table is left out with a one-line note.

Usage: python bench/bench_person.py [--classifier_ckpt=runs/standard_cnn/best.pt] [--sae_ckpt=runs/sae_topk/best_sae.pt]
       [--report_dir=neuron_report] [--n_per_class=20] [--sheet=sheet.png]
"""
from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.bench_explain import cited_and_random, load_best_parts  # noqa: E402
from bench.person_sketches import LAYOUTS, PENS, person_set  # noqa: E402
from bench.run_all import machine  # noqa: E402
from bench.sections import write_section  # noqa: E402
from selfexplain import artifacts, data, evidence, explain  # noqa: E402
from selfexplain.concept_measures import part_boxes, pointing_game  # noqa: E402
from selfexplain.config import make_config, module_constants, run_cli  # noqa: E402
from selfexplain.errors import UserError  # noqa: E402
from selfexplain.synthetic import CLASS_NAMES, PART_TYPES  # noqa: E402

CLASSIFIER_CKPT = "runs/standard_cnn/best.pt"  # a classifier trained on DATASET=synthetic
N_PER_CLASS = 20                               # sketches per class and layout
SEED = 0                                       # seeds the second renderer
BATCH = 128                                    # images per forward pass
SHEET = ""                                     # also write a contact sheet of the sketches here ('' = no)
SAE_CKPT = artifacts.SAE_CKPT                  # the classifier's SAE (no agreement table when missing)
REPORT_DIR = artifacts.REPORT_DIR              # stage 3's report: best-matching part type per neuron
N_CITE = 5                                     # cited concepts per sketch (why_did_you's default)
RANDOM_DRAWS = 8                               # random active-neuron sets per sketch (the baseline)
INK_SHARE = 0.2                                # input-space check: share of each sketch's ink whited out
OUT = "bench/results/person.md"                # markdown written here (merged into RESULTS.md)


def predict(model: torch.nn.Module, prep: dict, images: np.ndarray, batch: int) -> np.ndarray:
    """Predicted class index per uint8 (N, S, S) image (fp32, no grad)."""
    out = []
    with torch.no_grad():
        for start in range(0, len(images), batch):
            x = data.model_input(torch.from_numpy(images[start:start + batch]), prep)
            out.append(model(x).argmax(1).numpy())
    return np.concatenate(out)


def contact_sheet(sketches: list, path: str) -> None:
    """One row per class; columns are that class's sketches, layout after layout."""
    rows = [[s.image for s in sketches if s.label == c] for c in range(len(CLASS_NAMES))]
    side, cols = rows[0][0].shape[0] + 2, len(rows[0])
    sheet = np.full((len(rows) * side, cols * side), 128, dtype=np.uint8)
    for r, row in enumerate(rows):
        for c, image in enumerate(row):
            sheet[r * side:r * side + side - 2, c * side:c * side + side - 2] = image
    Image.fromarray(sheet).save(path)


def table(sketches: list, predicted: np.ndarray, size: int, ckpt_path: str) -> list[str]:
    """Markdown: accuracy per layout and per pen, and the share of the most predicted class."""
    labels = np.array([s.label for s in sketches])
    correct = predicted == labels
    lines = [f"## A person's drawing: second-renderer accuracy ({size} px, `{ckpt_path}`)", "",
             f"{len(sketches) // len(LAYOUTS) // len(CLASS_NAMES)} sketches per class and layout, "
             f"clean shapes drawn at 1111 px by `bench/person_sketches.py` (pens {', '.join(map(str, PENS))} px), "
             f"decoded to {size} px; chance {1 / len(CLASS_NAMES):.3f}. Measured on {machine()}.", "",
             "| layout | sketches | accuracy | " + " | ".join(f"pen {p} px" for p in PENS)
             + " | most predicted class (share) |",
             "|---|---:|---:|" + "---:|" * len(PENS) + "---|"]
    groups = [(layout, np.array([s.layout == layout for s in sketches])) for layout in LAYOUTS]
    for name, mask in groups + [("all", np.ones(len(sketches), dtype=bool))]:
        pens = [correct[mask & np.array([s.pen == p for s in sketches])] for p in PENS]
        top, count = Counter(predicted[mask].tolist()).most_common(1)[0]
        lines.append(f"| {name} | {mask.sum()} | {correct[mask].mean():.3f} | "
                     + " | ".join(f"{c.mean():.3f}" if len(c) else "-" for c in pens)
                     + f" | {CLASS_NAMES[top]} ({count / mask.sum():.2f}) |")
    return lines


# ----------------------------------------------------------------------------- concept agreement
def load_explainer(cfg) -> tuple[explain.Models | None, dict[int, str] | None, str]:
    """The classifier + SAE pair and stage 3's best part per neuron, or (None, None, why not)."""
    if not Path(cfg.SAE_CKPT).is_file():
        return None, None, f"no SAE at `{cfg.SAE_CKPT}`"
    best_part = load_best_parts(cfg.REPORT_DIR)
    if not best_part:
        return None, None, f"no stage-3 report with part matches in `{cfg.REPORT_DIR}`"
    try:
        models = explain.load_models(cfg.CLASSIFIER_CKPT, cfg.SAE_CKPT, "cpu")
    except UserError as exc:
        return None, None, f"`{cfg.SAE_CKPT}` is not this classifier's SAE ({exc})"
    summary = Path(cfg.REPORT_DIR) / artifacts.SUMMARY
    described = artifacts.read_json(summary).get("sae_fingerprint") if summary.is_file() else None
    if described and described != models.sae_ckpt["fingerprint"]:
        return None, None, f"`{cfg.REPORT_DIR}` describes SAE {described}, not `{cfg.SAE_CKPT}`"
    return models, best_part, ""


def sketch_agreement(cited: list[int], random_sets: list, best_part: dict[int, str], parts: list,
                     maps: np.ndarray, grid: tuple[int, int], image_size: int) -> dict:
    """Concept agreement of one sketch's explanation.

    Parameters
    ----------
    cited : the cited neuron ids. random_sets : id arrays of random active neurons.
    best_part : neuron id -> stage 3's best part type. parts : the sketch's [{"part", "box"}].
    maps : (len(cited), T) each cited neuron's code per token (row-major, as ``analyse``).
    grid, image_size : the token grid (H, W) of ``maps`` and the sketch's side in pixels.

    Returns
    -------
    dict: ``part_*`` share of neurons whose best part is drawn (cited, random mean, prior),
    ``cover_*`` share of the drawn parts named by one of them, ``where_pairs`` cited neurons
    whose part is drawn, ``where_hits`` those pointing inside its box and ``where_chance``
    the summed chance of doing so.
    """
    drawn = {p["part"] for p in parts}

    def share(ids) -> float:
        return float(np.mean([best_part.get(int(i)) in drawn for i in ids])) if len(ids) else float("nan")

    def cover(ids) -> float:
        return len(drawn & {best_part.get(int(i)) for i in ids}) / len(drawn)

    out = {"n_cited": len(cited), "part_cited": share(cited),
           "part_random": float(np.mean([share(r) for r in random_sets])) if random_sets else float("nan"),
           "part_prior": share(list(best_part)), "cover_cited": cover(cited),
           "cover_random": float(np.mean([cover(r) for r in random_sets])) if random_sets else float("nan"),
           "where_pairs": 0, "where_hits": 0.0, "where_chance": 0.0}
    rows = [k for k, i in enumerate(cited) if best_part.get(int(i)) in drawn]
    if rows:
        boxes = part_boxes([parts], PART_TYPES)[0][[PART_TYPES.index(best_part[int(cited[k])]) for k in rows]]
        game = pointing_game(np.asarray(maps)[rows][:, None], boxes[:, None], np.ones((len(rows), 1), bool),
                             ["cited"], grid, image_size)
        out.update(where_pairs=len(rows), where_hits=float(game.hit_rate[0] * len(rows)),
                   where_chance=float(game.chance[0] * len(rows)))
    return out


def evaluate_agreement(cfg, models: explain.Models, best_part: dict[int, str], sketches: list) -> list[dict]:
    """Explain every sketch (the project's own path) and measure its concept agreement."""
    records = []
    for start in range(0, len(sketches), cfg.BATCH):
        chunk = sketches[start:start + cfg.BATCH]
        analysis = explain.analyse(models, np.stack([s.image for s in chunk]))
        for b, s in enumerate(chunk):
            cls = int(analysis.logits[b].argmax())
            cited, sets = cited_and_random(models, analysis, b, cls, cfg, np.random.default_rng([cfg.SEED, start + b]))
            maps = evidence.token_maps(analysis, b, cited).reshape(len(cited), -1)
            record = dict(sketch_agreement(cited, sets, best_part, s.parts, maps, analysis.hw, models.image_size),
                          layout=s.layout, pen=s.pen, correct=cls == s.label)
            if cited:
                drops = evidence.input_deletion(models, s.image, analysis, b, cited, cls, sets, cfg.INK_SHARE)
                record.update(ink_cited=drops["input_cited_drop"], ink_random=drops["input_random_drop"],
                              ink_cam=drops["cam_drop"])
            records.append(record)
    return records


def summarise_agreement(records: list[dict]) -> dict:
    """Means over sketches citing something; pointing pooled over (sketch, cited neuron) pairs."""
    rs = [r for r in records if r["n_cited"]]
    out = {"sketches": len(records), "explained": len(rs)}
    for key in ("n_cited", "part_cited", "part_random", "part_prior", "cover_cited", "cover_random"):
        out[key] = float(np.nanmean([r[key] for r in rs])) if rs else float("nan")
    for key in ("ink_cited", "ink_random", "ink_cam"):
        out[key] = float(np.mean([r[key] for r in rs if key in r])) if any(key in r for r in rs) else float("nan")
    pairs = sum(r["where_pairs"] for r in rs)
    out["where_pairs"] = pairs
    out["where_hit"] = sum(r["where_hits"] for r in rs) / pairs if pairs else float("nan")
    out["where_chance"] = sum(r["where_chance"] for r in rs) / pairs if pairs else float("nan")
    return out


def agreement_table(cfg, records: list[dict], n_described: int) -> list[str]:
    """Markdown: concept agreement per layout, per pen, for the correctly classified sketches, and overall."""
    lines = ["", f"Concept agreement of the explanation (`{cfg.SAE_CKPT}`, `{cfg.REPORT_DIR}`): the {cfg.N_CITE} "
             f"cited neurons (top positive contributions to the predicted logit) against {cfg.RANDOM_DRAWS} random "
             "sets of as many active neurons; a neuron stands for its *best part* (stage 3's match on the training "
             "split, whether or not its concept label names it); prior = share of the "
             f"{n_described} live described neurons whose best part is drawn. Pointing: a cited neuron whose best "
             "part is drawn has its peak (the strongest token moved to the activation-weighted centre of it and its "
             "8 neighbours) inside that part's box; chance = the same rule on maps of uniform noise.", "",
             "| sketches | explained | cited per sketch | best part drawn: cited | random active | prior | "
             "drawn parts covered: cited | random active | pointing: hit | chance | pairs |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    groups = [(layout, [r for r in records if r["layout"] == layout]) for layout in LAYOUTS]
    groups += [(f"pen {pen} px", [r for r in records if r["pen"] == pen]) for pen in PENS]  # what decoding acts on
    groups += [("correctly classified", [r for r in records if r["correct"]]), ("all", records)]
    groups = [(name, rs) for name, rs in groups if rs]  # a small --n_per_class leaves pens undrawn
    for name, rs in groups:
        f = summarise_agreement(rs)
        lines.append(f"| {name} | {f['explained']} | {f['n_cited']:.2f} | {f['part_cited']:.3f} | "
                     f"{f['part_random']:.3f} | {f['part_prior']:.3f} | {f['cover_cited']:.3f} | "
                     f"{f['cover_random']:.3f} | {f['where_hit']:.3f} | {f['where_chance']:.3f} | "
                     f"{f['where_pairs']} |")
    lines += ["", f"Input-space evidence on the same drawings (why_did_you's check): the predicted logit's drop "
              f"after whiting out {cfg.INK_SHARE:.0%} of the ink where the cited concepts fire, where random "
              "active neurons fire (the same pixel-level rule) and where CAM's token map is highest:", "",
              "| sketches | cited | random active | CAM | cited / random | cited / CAM |", "|---|---:|---:|---:|---:|---:|"]
    for name, rs in groups:
        f = summarise_agreement(rs)
        lines.append(f"| {name} | {f['ink_cited']:.3f} | {f['ink_random']:.3f} | {f['ink_cam']:.3f} | "
                     f"{f['ink_cited'] / f['ink_random']:.3f} | {f['ink_cited'] / f['ink_cam']:.3f} |")
    left_out = sum(not r["n_cited"] for r in records)
    if left_out:
        lines += ["", f"{left_out} sketches cited no neuron (no positive contribution) and are left out."]
    return lines


def main(**overrides) -> float:
    """Write the accuracy table (and the concept-agreement table when possible); return the accuracy."""
    cfg = make_config(module_constants(globals()), overrides)
    model, ckpt = artifacts.load_classifier(cfg.CLASSIFIER_CKPT)
    if list(ckpt["class_names"]) != CLASS_NAMES:
        raise UserError(f"{cfg.CLASSIFIER_CKPT} was not trained on the synthetic classes (DATASET=synthetic)")
    size = int(ckpt["preprocess"]["image_size"])
    sketches = person_set(cfg.N_PER_CLASS, size, seed=cfg.SEED)
    if cfg.SHEET:
        contact_sheet(sketches, cfg.SHEET)
    predicted = predict(model, ckpt["preprocess"], np.stack([s.image for s in sketches]), cfg.BATCH)
    lines = table(sketches, predicted, size, cfg.CLASSIFIER_CKPT)
    models, best_part, why_not = load_explainer(cfg)
    if models is None:
        lines += ["", f"Concept agreement not measured: {why_not}."]
    else:
        lines += agreement_table(cfg, evaluate_agreement(cfg, models, best_part, sketches), len(best_part))
    write_section(cfg.OUT, lines)
    return float((predicted == np.array([s.label for s in sketches])).mean())

if __name__ == "__main__":
    run_cli(main, globals())
