"""Stage 5: explain a prediction with the SAE's concepts.

Usage
-----
    python why_did_you.py --image=my_sketch.png
    python why_did_you.py my_sketch.png other.png              # bare names are the images
    python why_did_you.py --image=test:0                      # first held-out test image of the classifier's dataset
    python why_did_you.py --image=[a.png,b.png] --json=True   # one JSON object per image, one line each
    python why_did_you.py --image="['a.png', 'b, c.png']"     # a list literal: names with commas stay whole
    python why_did_you.py --image=sketches/ --json=True       # every image in a folder and its subfolders
    python why_did_you.py --image=a.png --overlay=why.png     # heat maps of the top concepts, with a legend
    python why_did_you.py --image=sketches/ --overlay=why.png # one overlay per image: why_<image name>.png
    python why_did_you.py --image=a.png --versus=runner_up --overlay=why.png  # a second panel: the contrast's concepts
    python why_did_you.py --image=a.png --llm=True            # plus a one-sentence answer from the LLM backend
    python why_did_you.py --image=test:0 --versus=runner_up   # also: why this class rather than the second one
    python why_did_you.py --image=a.png --versus=cat          # ... or rather than a class you name
    python why_did_you.py --serve=True --port=8000            # draw a sketch in the browser and see why

For the predicted class it prints the probability, the top-5, and the SAE neurons that
supplied the most evidence, each with its concept (stage 4's LLM answer, else stage 3's
statistics summary, else "neuron <id>") and its share of the positive evidence. The
numbers are exact: logit = Σ cited contributions + others + bias + SAE error (see
selfexplain/explain.py). The evidence line whites out INK_SHARE of the sketch's ink where
the cited concepts fire (their token maps, upsampled, times the ink that carries their
activation: gradient x ink), reruns the classifier, and compares the logit's drop with the same
amount of ink where random active neurons fire and where CAM is highest (--fast=True skips
it); the consistency line zeroes the cited neurons in the code, which is true by
construction and printed only as a check of the arithmetic. Every explanation
carries a familiarity verdict (the input's percentile among validation sketches, and an
"unfamiliar" warning when it is unlike them), calibrated once per model pair and stored in
REPORT_DIR/familiarity.json (none with --familiarity=False, or under 20 validation images).
With --versus it also explains the margin over another class (the runner-up, or one
named): a part both classes hold counts for both and cancels, so the neurons cited are the
ones that tell the two apart.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from selfexplain import artifacts, explain, explain_io, familiarity, prompts, serve
from selfexplain.config import BOOL_WORDS, make_config, module_constants, require_ranges, run_cli
from selfexplain.distributed import exit_on_sigterm, resolve_device, set_threads
from selfexplain.errors import UserError
from selfexplain.llm_backends import LLMError, make_backend
from selfexplain.logs import log

# ----------------------------------------------------------------------------- config
IMAGE = "test:0"                           # image file, [list], folder/, pattern (*.png), or test:K (K-th test image)
CLASSIFIER_CKPT = artifacts.CLASSIFIER_CKPT  # stage 1 checkpoint
SAE_CKPT = artifacts.SAE_CKPT              # stage 2 checkpoint (must match the classifier)
REPORT_DIR = artifacts.REPORT_DIR          # stage 3/4 outputs: neurons.jsonl, llm_output.jsonl (must exist)
N = 5                                      # concepts cited per image
TOP_ACTIVE = 20                            # most-active list: at most this many neurons (top_neuron_ids_for_image's N)
PERCENTILE = 99.0                          # most-active list: neurons above this percentile of the image's scores
AGG = "max"                                # most-active list: max | mean | sum of each neuron's code over tokens
RANDOM_DRAWS = 8                           # random active-neuron sets for the faithfulness baselines
FAST = False                               # skip the input-space check (no classifier reruns)
INK_SHARE = 0.2                            # input-space check: share of the sketch's ink whited out
VERSUS = ""                                # also explain "rather than" this class: '' (off), runner_up, or a class name
JSON = False                               # print one JSON object per image instead of text
OVERLAY = ""                               # PNG path for the heat-map overlay ('' = none; several images get _<name> suffixes)
LLM = False                                # add a one-sentence answer from the LLM backend
BACKEND = "auto"                           # auto | replicate | openai | offline (for --llm)
MODEL = ""                                 # LLM model ('' = the backend's default)
DEVICE = "auto"                            # auto | cpu | cuda
NUM_THREADS = 0                            # CPU intra-op threads (0 = torch default; 1 is faster on busy cores)
SEED = 0                                   # seeds the random faithfulness baseline
CACHE_DIR = artifacts.CACHE_DIR            # decoded image cache (for test:K images)
DATA_ROOT = ""                             # the classifier's data, if it moved since stage 1 ('' = where stage 1 read it; the same images are required)
BATCH_SIZE = 64                            # images per forward pass
FAMILIARITY = True                         # flag inputs unlike the training sketches (calibrated once on validation)
SERVE = False                              # serve the draw-and-explain page instead of explaining IMAGE
HOST = "127.0.0.1"                         # --serve: address to listen on (127.0.0.1 = this machine only)
PORT = 8000                                # --serve: port


def llm_sentence(backend, exp: explain.Explanation, overlay: Path | None) -> str | None:
    """Ask the stage 4 backend for a one-sentence answer; a failure is a notice, not an error."""
    text = prompts.why_prompt(exp.predicted_class, exp.probability, [(n.concept, n.share) for n in exp.neurons],
                              exp.extra.get("versus"))
    try:
        return backend.ask(prompts.why_system_prompt(), text, images=(overlay,) if overlay else (),
                           fallback=exp.sentence)
    except LLMError as exc:
        log(f"note: LLM answer failed ({exc}); keeping the composed sentence")
        return None


def _models(classifier_ckpt, sae_ckpt, device, data_root: str, report_dir, versus: str = "") -> explain.Models:
    """The model pair, reading its data where it is now, refused before anything (a test:K image, the
    familiarity calibration) is written into a report that stage 3 made for another SAE, or for a
    ``versus`` class the classifier does not have."""
    models = explain.relocated(explain.load_models(classifier_ckpt, sae_ckpt, resolve_device(str(device))), data_root)
    explain.require_own_report(models, report_dir)
    if versus:
        explain.versus_index(models, versus)
    return models


def explain_images(images, classifier_ckpt=CLASSIFIER_CKPT, sae_ckpt=SAE_CKPT, report_dir=REPORT_DIR,
                   device=DEVICE, batch_size: int = BATCH_SIZE, *, cache_dir=CACHE_DIR, familiar: bool = FAMILIARITY,
                   data_root: str = DATA_ROOT, **settings) -> list[explain.Explanation]:
    """Explain several images as the command line does, one explanation per image, in order.

    The notebook API. An image is a path, ``"test:K"`` (the K-th test image of the classifier's
    dataset, with its true class), a PIL image, or an array (:func:`selfexplain.imaging.array_to_sketch`);
    one image alone is also taken, and a folder or a pattern (``"sketches/*.png"``) stands for its image
    files, as with ``--image``. A bad image is a UserError, not skipped; so is an empty list. ``exp.to_json()`` is
    the ``--json=True`` object, with the familiarity verdict (``familiar=False`` skips it; the
    calibration is fitted once per model pair into ``report_dir``) and the most-active list
    (TOP_ACTIVE, PERCENTILE, AGG defaults). ``settings`` are
    :class:`selfexplain.explain.ExplainSettings` fields (``n_cite``, ``n_random``, ``seed``,
    ``input_check``, ``ink_share``, ``active``, ``versus``).
    """
    entries = explain_io.expand_paths(explain_io.as_image_list(images))
    settings.setdefault("active", explain.MostActive(TOP_ACTIVE, PERCENTILE, AGG))
    explain.ExplainSettings.from_kwargs(settings)  # a wrong name fails before any model loads
    require_report_dir(report_dir, classifier_ckpt, sae_ckpt)
    models = _models(classifier_ckpt, sae_ckpt, device, data_root, report_dir, settings.get("versus", ""))
    inputs = explain_io.read_inputs(entries, models, cache_dir, report_dir)
    judge = familiarity.verdict_judge(models, report_dir, cache_dir) if familiar else None
    explanations = explain.explain_images(explain_io.as_batch(inputs), classifier_ckpt, sae_ckpt, report_dir,
                                          models.device, batch_size, judge=judge, **settings)
    for exp, item in zip(explanations, inputs):
        explain_io.name_after_input(exp, item)
    return explanations


def require_report_dir(report_dir, classifier_ckpt=CLASSIFIER_CKPT, sae_ckpt=SAE_CKPT) -> None:
    """A missing REPORT_DIR is refused: a typo would explain with unnamed neurons and calibrate into a new folder.
    The message names the first stage to run (after ``make clean`` that is stage 1, not stage 3)."""
    if Path(report_dir).is_dir():
        return
    elsewhere = "" if Path(report_dir).is_absolute() else \
        f" (read from the working folder {Path.cwd()}; from elsewhere, pass absolute paths)"
    for name, path, stages in (("CLASSIFIER_CKPT", classifier_ckpt, "train_standard_cnn.py, train_sae.py"),
                               ("SAE_CKPT", sae_ckpt, "train_sae.py")):  # a new classifier needs a new SAE too
        if not Path(path).is_file():
            raise UserError(f"REPORT_DIR={report_dir} does not exist{elsewhere}, nor {name} "
                            f"({artifacts.missing_message(Path(path), None)}): run {stages} and sae_summarize.py "
                            "first (make demo runs them on the synthetic sketches)")
    raise UserError(f"REPORT_DIR={report_dir} does not exist{elsewhere}: run sae_summarize.py first (it writes the "
                    "concepts and the atlas there), or create the folder to explain with neurons named by id")


def _one_image(pil_or_path, refusal: str):
    """The one image ``pil_or_path`` names (a folder or pattern of one: its file); a folder or pattern of several
    is a UserError ending in ``refusal``. Listed once: its one entry is what the caller reads."""
    entries = explain_io.expand_paths([pil_or_path])
    if len(entries) > 1:
        raise UserError(f"{pil_or_path} holds {len(entries)} images and {refusal}")
    return entries[0][0]


def explain_image(pil_or_path, classifier_ckpt=CLASSIFIER_CKPT, sae_ckpt=SAE_CKPT, report_dir=REPORT_DIR,
                  device=DEVICE, cache_dir=CACHE_DIR, familiar: bool = FAMILIARITY, data_root: str = DATA_ROOT,
                  **settings) -> explain.Explanation:
    """Explain one image (path, ``"test:K"``, PIL image or array) as the command line does:
    :func:`explain_images` of one. A folder or pattern of several images is refused (explain_images takes it)."""
    one = _one_image(pil_or_path, f"explain_image explains one: explain_images({str(pil_or_path)!r}) explains them all")
    return explain_images([one], classifier_ckpt, sae_ckpt, report_dir, device, cache_dir=cache_dir,
                          familiar=familiar, data_root=data_root, **settings)[0]


def top_neuron_ids_for_image(pil_or_path, classifier_ckpt=CLASSIFIER_CKPT, sae_ckpt=SAE_CKPT, N: int = TOP_ACTIVE,
                             percentile: float = PERCENTILE, agg: str = AGG, device=DEVICE, *,
                             cache_dir=CACHE_DIR, report_dir=REPORT_DIR, data_root: str = DATA_ROOT):
    """The image's most active SAE neurons: :func:`selfexplain.explain.top_neuron_ids_for_image`,
    which also takes ``"test:K"`` here (saved as ``report_dir/test_images/test_K.png``, as the CLI does).

    Parameters
    ----------
    pil_or_path : one image: a path, ``"test:K"``, a PIL image, an array or a tensor (a folder or a pattern of
        several is refused: call it per image, or :func:`explain_images` for them all).
    N : at most this many neurons (TOP_ACTIVE).
    percentile : a neuron is listed when its score reaches this percentile of the image's M scores (PERCENTILE).
    agg : ``max`` | ``mean`` | ``sum`` over the image's tokens of each neuron's sparse code (AGG).

    Returns
    -------
    ``(ids, scores, threshold, predicted_class, predicted_prob, top5)``: the neurons' ids, highest score first,
    their scores, the percentile's value, the predicted class and its probability, and the top 5 classes.
    """
    pil_or_path = _one_image(pil_or_path, "top_neuron_ids_for_image reads one: call it per image, or explain_images "
                                          "for them all")
    if explain_io.test_entry(pil_or_path) is not None:
        require_report_dir(report_dir, classifier_ckpt, sae_ckpt)  # the sketch is saved there: no typo'd folder
        models = _models(classifier_ckpt, sae_ckpt, device, data_root, report_dir)
        pil_or_path = explain_io.read_input(pil_or_path, models, cache_dir, report_dir).image
    return explain.top_neuron_ids_for_image(pil_or_path, classifier_ckpt, sae_ckpt, N, percentile, agg, device)


# ----------------------------------------------------------------------------- main
def main(**overrides) -> list[dict]:
    image = next((v for k, v in overrides.items() if str(k).lower() == "image"), None)
    if image is not None and not isinstance(image, (str, os.PathLike, list, tuple)):  # it read an array as a pattern
        raise UserError(f"main(image=...) takes file paths or 'test:K'; for a {type(image).__name__} call "
                        "why_did_you.explain_image(image) (explain_images for several)")
    cfg = make_config(module_constants(globals()), overrides)
    active = explain.MostActive(cfg.TOP_ACTIVE, cfg.PERCENTILE, cfg.AGG)  # bad values fail before any model loads
    settings = explain.ExplainSettings(n_cite=cfg.N, n_random=cfg.RANDOM_DRAWS, seed=cfg.SEED, active=active,
                                       input_check=not cfg.FAST, ink_share=cfg.INK_SHARE, versus=cfg.VERSUS)
    require_ranges(cfg, {"NUM_THREADS": (0, None)})
    require_report_dir(cfg.REPORT_DIR, cfg.CLASSIFIER_CKPT, cfg.SAE_CKPT)
    set_threads(cfg.NUM_THREADS)
    if cfg.SERVE:
        serve.run_server(cfg.CLASSIFIER_CKPT, cfg.SAE_CKPT, cfg.REPORT_DIR, cfg.CACHE_DIR, cfg.HOST, cfg.PORT,
                         cfg.DEVICE, data_root=cfg.DATA_ROOT, familiar=cfg.FAMILIARITY,
                         **vars(settings))  # the --json object, as the CLI
        return []
    entries = explain_io.image_list(cfg.IMAGE)
    backend = make_backend(cfg.BACKEND, cfg.MODEL) if cfg.LLM else None  # a missing key fails before the work
    models = _models(cfg.CLASSIFIER_CKPT, cfg.SAE_CKPT, cfg.DEVICE, cfg.DATA_ROOT, cfg.REPORT_DIR, cfg.VERSUS)
    inputs, skipped = explain_io.load_inputs(entries, models, cfg.CACHE_DIR, cfg.REPORT_DIR)
    for _, _, reason in skipped:  # named on stderr now; in the output at their place, as {"image", "skipped"}
        log(f"skipped: {reason}")
    overlays = (explain_io.overlay_paths(cfg.OVERLAY, [item.name for item in inputs], [n for _, n, _ in skipped])
                if cfg.OVERLAY else [None] * len(inputs))  # before the model passes: an overlay onto an input is refused
    judge = familiarity.verdict_judge(models, cfg.REPORT_DIR, cfg.CACHE_DIR) if cfg.FAMILIARITY else None
    batch = explain_io.as_batch(inputs) if inputs else []  # decoded (and noted) once: no second dark note
    explanations = explain.explain_images(batch, cfg.CLASSIFIER_CKPT, cfg.SAE_CKPT,
                                          cfg.REPORT_DIR, models.device, cfg.BATCH_SIZE, judge=judge,
                                          **vars(settings))
    results = []
    skipped_at = {position: (name, reason) for position, name, reason in skipped}
    explained = iter(zip(explanations, inputs, overlays))
    for position in range(len(entries)):  # in the order of the inputs, a skipped one at its place
        if position in skipped_at:
            results.append(print_skipped(*skipped_at[position], cfg.JSON))
            continue
        exp, item, overlay = next(explained)
        explain_io.name_after_input(exp, item)
        if overlay is not None:
            explain.save_overlay(item.image, exp, overlay)
            exp.extra["overlay"] = str(overlay)
            log(f"overlay: {overlay}")
        if backend is not None:
            exp.extra["llm_sentence"] = llm_sentence(backend, exp, overlay)
        print(exp.to_json() if cfg.JSON else explain_io.format_text(exp) + ("\n" if len(inputs) > 1 else ""),
              flush=True)
        results.append(exp.to_dict())
    return results


def print_skipped(name: str, reason: str, as_json: bool) -> dict:
    """An unreadable image's entry: a JSON line in the ``--json`` stream (the text output named it on stderr)."""
    entry = {"image": name, "skipped": reason}
    if as_json:
        print(json.dumps(entry, ensure_ascii=False), flush=True)
    return entry


def cli(**overrides) -> int:
    """``main`` for the shell: exit code 1 when some images of a folder or list were skipped."""
    return int(any("skipped" in r for r in main(**overrides)))


def shell_argv(argv: list[str]) -> list[str]:
    """``why_did_you.py a.png [b.png ...]`` reads as ``--image=...`` (bare names are the images); so does
    ``--image a.png``, with a space (it read "--image is given twice"), ``--image=a.png b.png`` as both images
    (b.png was "arguments look like --key=value"), and ``--json True`` as ``--json=True`` (it explained an
    image named True)."""
    argv = _join_values(argv)
    given = [a for a in argv if a.lower().startswith("--image=")]
    if not any(not a.startswith("-") for a in argv) or len(given) > 1 or \
            (given and explain_io.is_list_text(given[0].partition("=")[2])):
        return argv  # nothing bare, or a list beside bare names: the parser names the stray argument
    # the bare names, and --image=a.png beside them (a.png b.png: both), in the order given
    images = [a.partition("=")[2] if a in given else a for a in argv if a in given or not a.startswith("-")]
    rest = [a for a in argv if a.startswith("-") and a.lower() != "--image" and a not in given]
    return rest + [f"--image={images[0]}" if len(images) == 1 else f"--image={images!r}"]


def _join_values(argv: list[str]) -> list[str]:
    """``--flag VALUE`` as ``--flag=VALUE`` where VALUE is a yes/no word or a number (never an image's name)."""
    out = []
    for arg in argv:
        flag = out[-1] if out else ""
        if flag.startswith("--") and "=" not in flag and flag.lower() != "--image" and _looks_like_a_value(arg):
            out[-1] = f"{flag}={arg}"
        else:
            out.append(arg)
    return out


def _looks_like_a_value(arg: str) -> bool:
    """True, false, yes, no, on, off, none or a number: a setting's value, not an image name."""
    try:
        float(arg)
        return True
    except ValueError:
        return arg.lower() in ("true", "false", "none", *BOOL_WORDS)


if __name__ == "__main__":
    exit_on_sigterm()  # SIGTERM ends like Ctrl-C, after the overlay or JSON line being written
    run_cli(cli, globals(), shell_argv(sys.argv[1:]))
