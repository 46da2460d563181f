"""Stage 5: explain a prediction with the SAE's concepts.

Usage
-----
    python why_did_you.py --image=my_sketch.png
    python why_did_you.py --image=test:0                      # first held-out test image of the classifier's dataset
    python why_did_you.py --image=[a.png,b.png] --json=True   # one JSON object per image, one line each
    python why_did_you.py --image=sketches/ --json=True       # every image in a folder
    python why_did_you.py --image=a.png --overlay=why.png     # heat maps of the top concepts, with a legend
    python why_did_you.py --image=a.png --llm=True            # plus a one-sentence answer from the LLM backend

For the predicted class it prints the probability, the top-5, and the SAE neurons that
supplied the most evidence, each with its concept (stage 4's LLM answer, else stage 3's
statistics summary, else "neuron <id>") and its share of the positive evidence. The
numbers are exact: logit = Σ cited contributions + others + bias + SAE error (see
selfexplain/explain.py). The faithfulness line compares the logit's drop when the cited
neurons are removed with the drop for as many random active neurons.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from selfexplain import data, explain
from selfexplain.explain import explain_image, explain_images, top_neuron_ids_for_image  # noqa: F401  (notebook API)
from selfexplain.errors import UserError
from selfexplain.config import make_config, module_constants, run_cli
from selfexplain.distributed import resolve_device

# ----------------------------------------------------------------------------- config
IMAGE = "test:0"                           # image file, [list], folder/, or test:K (K-th test image of the classifier's dataset)
CLASSIFIER_CKPT = "runs/standard_cnn/best.pt"  # stage 1 checkpoint
SAE_CKPT = "runs/sae_topk/best_sae.pt"     # stage 2 checkpoint (must match the classifier)
REPORT_DIR = "neuron_report"               # stage 3/4 outputs: neurons.jsonl, llm_output.jsonl
N = 5                                      # concepts cited per image (also caps the most-active list)
PERCENTILE = 99.0                          # most-active list: neurons above this percentile of the image's scores
AGG = "max"                                # most-active list: max | mean | sum of each neuron's code over tokens
RANDOM_DRAWS = 8                           # random active-neuron sets for the faithfulness baseline
JSON = False                               # print one JSON object per image instead of text
OVERLAY = ""                               # PNG path for the heat-map overlay ('' = none; several images get _<name> suffixes)
LLM = False                                # add a one-sentence answer from the LLM backend
BACKEND = "auto"                           # auto | replicate | openai | offline (for --llm)
MODEL = ""                                 # LLM model ('' = the backend's default)
DEVICE = "auto"                            # auto | cpu | cuda
SEED = 0                                   # seeds the random faithfulness baseline
CACHE_DIR = "cache"                        # decoded image cache (for test:K images)
BATCH_SIZE = 64                            # images per forward pass

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
_LLM_SYSTEM = ("You explain an image classifier's decision to a non-expert in ONE short sentence. "
               "Use only the evidence given; mention the most important concepts; no preamble.")


# ----------------------------------------------------------------------------- inputs
def image_list(image) -> list[str]:
    """IMAGE as given -> a list of entries: a file, every image in a folder, or test:K."""
    if isinstance(image, str) and image.strip().startswith("[") and image.strip().endswith("]"):
        image = [part.strip().strip("'\"") for part in image.strip()[1:-1].split(",")]  # --image=[a.png,b.png]
    entries = image if isinstance(image, (list, tuple)) else [image]
    out = []
    for entry in (str(e).strip() for e in entries):
        if not entry:
            raise UserError("no image given; use --image=PATH (a file, a folder, a [list] or test:K)")
        path = Path(entry)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
            if not found:
                raise UserError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in folder {path}")
            out += [str(p) for p in found]
        else:
            out.append(entry)
    return out


def test_image(entry: str, models: explain.Models, cache_dir: str, report_dir: str) -> tuple[str, np.ndarray, str]:
    """``test:K`` -> (PNG path written in REPORT_DIR, uint8 image, true class name)."""
    from PIL import Image

    from selfexplain.artifacts import atomic_write_bytes

    try:
        k = int(entry.split(":", 1)[1])
    except ValueError:
        raise UserError(f"test images are named test:K with K an integer, got {entry!r}") from None
    ckpt = models.classifier_ckpt
    test = ckpt["split"]["test"]
    if not 0 <= k < len(test):
        raise UserError(f"{entry}: the classifier's test split has {len(test)} images (test:0 .. test:{len(test) - 1})")
    imageset = data.load_dataset(ckpt["dataset"], cache_dir)
    index = int(test[k])
    image = np.array(imageset.images[index])
    true_class = imageset.class_names[int(imageset.labels[index])]
    path = Path(report_dir) / "test_images" / f"test_{k}.png"
    import io

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())
    return str(path), image, true_class


def load_inputs(entries: list[str], models: explain.Models, cfg) -> tuple[list[str], list[np.ndarray], list]:
    """Decode every input up front, so a bad one fails before any output is printed."""
    names, images, truths = [], [], []
    for entry in entries:
        if entry.lower().startswith("test:") and not Path(entry).exists():
            name, image, truth = test_image(entry, models, cfg.CACHE_DIR, cfg.REPORT_DIR)
        else:
            name, image, truth = entry, data.load_user_image(entry, models.image_size), None
        names.append(name)
        images.append(image)
        truths.append(truth)
    return names, images, truths


# ----------------------------------------------------------------------------- output
def format_text(exp: explain.Explanation) -> str:
    """The compact human-readable explanation."""
    truth = f"   (true class: {exp.extra['true_class']})" if exp.extra.get("true_class") else ""
    top5 = ", ".join(f"{t['class']} {t['probability']:.1%}" for t in exp.top5)
    lines = [f"image: {exp.image}",
             f"predicted: {exp.predicted_class} ({exp.probability:.1%}){truth}",
             f"top-5: {top5}", "because of (share of the positive evidence, contribution to the logit):"]
    for n in exp.neurons:
        lines.append(f"  {n.share:6.1%}  {n.concept}  [#{n.neuron_id}, {n.contribution:+.3f}]")
    cited = sum(n.contribution for n in exp.neurons)
    lines.append(f"logit {exp.logit:.3f} = cited {cited:.3f} + others {exp.others:.3f} + bias {exp.bias:.3f} "
                 f"+ SAE error {exp.error:.3f}")
    f = exp.faithfulness
    lines.append(f"faithfulness: removing the cited neurons lowers the logit by {f['cited_drop']:.3f}; "
                 f"as many random active neurons: {f['random_drop']:.3f}")
    active = exp.extra.get("top_active")
    if active:
        listed = ", ".join(f"#{i} {s:.2f}" for i, s in zip(active["neuron_ids"], active["scores"]))
        lines.append(f"most active ({active['agg']} over tokens, >= p{active['percentile']:g}): {listed or 'none'}")
    lines.append(exp.sentence)
    if exp.extra.get("llm_sentence"):
        lines.append(f"LLM: {exp.extra['llm_sentence']}")
    return "\n".join(lines)


def overlay_path(overlay: str, name: str, several: bool) -> Path:
    """OVERLAY for one image; with several, OVERLAY's stem gets ``_<image stem>``."""
    out = Path(overlay)
    if out.suffix.lower() != ".png":
        out = out.with_suffix(".png")
    return out.with_name(f"{out.stem}_{Path(name).stem}.png") if several else out


def llm_sentence(backend, exp: explain.Explanation, overlay: Path | None) -> str | None:
    """Ask the stage 4 backend for a one-sentence answer; a failure is a notice, not an error."""
    from selfexplain.llm import LLMError

    evidence = "; ".join(f"{n.concept} ({n.share:.0%} of the evidence)" for n in exp.neurons) or "no single concept"
    text = (f"The classifier predicted '{exp.predicted_class}' with probability {exp.probability:.0%}. "
            f"The concepts that supported it most: {evidence}. Say in one sentence why it predicted this.")
    try:
        return backend.ask(_LLM_SYSTEM, text, images=(overlay,) if overlay else (), fallback=exp.sentence)
    except LLMError as exc:
        print(f"note: LLM answer failed ({exc}); keeping the composed sentence", file=sys.stderr)
        return None


# ----------------------------------------------------------------------------- main
def main(**overrides) -> list[dict]:
    cfg = make_config(module_constants(globals()), overrides)
    if cfg.N < 0 or cfg.RANDOM_DRAWS < 1 or cfg.BATCH_SIZE < 1:
        raise UserError("need N >= 0, RANDOM_DRAWS >= 1 and BATCH_SIZE >= 1")
    explain.check_percentile(cfg.PERCENTILE, max(cfg.N, 1))
    if cfg.AGG not in explain.AGGS:
        raise UserError(f"AGG must be one of {', '.join(explain.AGGS)}, got {cfg.AGG!r}")
    entries = image_list(cfg.IMAGE)
    models = explain.load_models(cfg.CLASSIFIER_CKPT, cfg.SAE_CKPT, resolve_device(cfg.DEVICE))
    names, images, truths = load_inputs(entries, models, cfg)
    explanations = explain.explain_images(images, cfg.CLASSIFIER_CKPT, cfg.SAE_CKPT, cfg.REPORT_DIR, cfg.N,
                                          cfg.RANDOM_DRAWS, cfg.SEED, models.device, cfg.BATCH_SIZE,
                                          active=(max(cfg.N, 1), cfg.PERCENTILE, cfg.AGG))
    backend = None
    if cfg.LLM:
        from selfexplain.llm import make_backend  # lazy: network clients only when asked for

        backend = make_backend(cfg.BACKEND, cfg.MODEL)
    results = []
    for exp, name, image, truth in zip(explanations, names, images, truths):
        exp.image = name
        if truth is not None:
            exp.extra["true_class"] = truth
        overlay = overlay_path(cfg.OVERLAY, name, len(names) > 1) if cfg.OVERLAY else None
        if overlay is not None:
            explain.save_overlay(image, exp, overlay)
            exp.extra["overlay"] = str(overlay)
        if backend is not None:
            exp.extra["llm_sentence"] = llm_sentence(backend, exp, overlay)
        print(exp.to_json() if cfg.JSON else format_text(exp) + ("\n" if len(names) > 1 else ""), flush=True)
        results.append(exp.to_dict())
    return results


if __name__ == "__main__":
    run_cli(main, globals())
