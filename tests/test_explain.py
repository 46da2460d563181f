"""Stage 5: exact decomposition, faithfulness, top neurons, caching, concepts and the CLI."""
import base64
import html
import io
import itertools
from dataclasses import replace
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import why_did_you
from conftest import ROOT
from selfexplain import artifacts, data, evidence, explain, explain_io, prompts
from selfexplain.errors import UserError
from selfexplain.imaging import png_bytes, png_text
from selfexplain.sae import TopKSAE


@pytest.fixture(scope="module")
def ckpts(tiny_classifier, tiny_sae):
    return {"classifier_ckpt": str(tiny_classifier / "best.pt"), "sae_ckpt": str(tiny_sae / "best_sae.pt")}


@pytest.fixture(scope="module")
def test_images(ckpts, cache_dir):
    """The tiny classifier's held-out test split as uint8 arrays, with labels."""
    ckpt = artifacts.load_checkpoint(ckpts["classifier_ckpt"], "classifier")
    images = data.load_dataset(ckpt["dataset"], cache_dir, progress=False)
    idx = ckpt["split"]["test"].numpy()
    return [np.array(images.images[i]) for i in idx], images.labels[idx]


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory, test_images):
    """Three test sketches saved as PNG files."""
    folder = tmp_path_factory.mktemp("sketches")
    for k in range(3):
        Image.fromarray(test_images[0][k * 5]).save(folder / f"sketch_{k}.png")
    return folder


def _explain(images, ckpts, tmp_path, **kw):
    return explain.explain_images(images, report_dir=str(tmp_path), device="cpu", **ckpts, **kw)


def test_logit_decomposes_exactly(ckpts, test_images, tmp_path):
    images, _ = test_images
    exps = _explain(images, ckpts, tmp_path)
    models = explain.load_models(ckpts["classifier_ckpt"], ckpts["sae_ckpt"], "cpu")
    x = data.model_input(torch.from_numpy(np.stack(images)), models.classifier_ckpt["preprocess"])
    with torch.no_grad():
        fmap = models.classifier.features(x)
        logits = models.classifier.head(fmap)
        recon_logits = models.classifier.head(models.sae.reconstruct_map(fmap))  # no error term
    for b, e in enumerate(exps):
        cited = sum(n.contribution for n in e.neurons)
        assert e.logit == pytest.approx(float(logits[b, e.predicted_index]), abs=1e-4)
        assert cited + e.others + e.bias + e.error == pytest.approx(e.logit, abs=1e-3)
        # neurons + bias alone are what the head makes of the SAE reconstruction
        assert cited + e.others + e.bias == pytest.approx(float(recon_logits[b, e.predicted_index]), abs=1e-3)
        # the real ablation pass removes exactly the closed-form contributions
        assert e.faithfulness["code_cited_drop"] == pytest.approx(cited, abs=1e-3)


def test_the_contrast_decomposes_the_margin_over_the_runner_up_exactly(ckpts, test_images, tmp_path):
    images, _ = test_images
    exps = _explain(images[:6], ckpts, tmp_path, versus="runner_up", input_check=False)
    models = explain.load_models(ckpts["classifier_ckpt"], ckpts["sae_ckpt"], "cpu")
    x = data.model_input(torch.from_numpy(np.stack(images[:6])), models.classifier_ckpt["preprocess"])
    with torch.no_grad():
        logits = models.classifier(x)
    for b, e in enumerate(exps):
        v = e.to_dict()["versus"]
        assert set(v) == {"class", "index", "probability", "margin", "neurons", "others", "bias", "error",
                          "sentence"}  # the README's contract
        runner_up = int(logits[b].topk(2).indices[1])
        assert (v["index"], v["class"]) == (runner_up, models.class_names[runner_up]) == (
            e.top5[1]["index"], e.top5[1]["class"])
        assert v["margin"] == pytest.approx(float(logits[b, e.predicted_index] - logits[b, runner_up]), abs=1e-4)
        cited = sum(n["contribution"] for n in v["neurons"])
        assert cited + v["others"] + v["bias"] + v["error"] == pytest.approx(v["margin"], abs=1e-3)  # an identity
        assert all(n["contribution"] > 0 and 0 < n["share"] <= 1 and n["where"] for n in v["neurons"])
        assert v["sentence"].startswith(f"{e.predicted_class} rather than {v['class']} (")


def test_a_neuron_both_classes_count_alike_is_cited_for_the_class_but_not_for_the_contrast(ckpts, test_images):
    """The point of --versus: a part both classes hold (circle, in four classes) adds to both logits, so it
    explains the class but not why this class rather than the other."""
    images, _ = test_images
    models = explain.load_models(ckpts["classifier_ckpt"], ckpts["sae_ckpt"], "cpu")
    analysis = explain.analyse(models, np.stack(images[:1]))
    plain = explain.explain_one(models, analysis, 0, "x", {}, explain.ExplainSettings(n_cite=3, input_check=False))
    top = plain.neurons[0].neuron_id
    runner_up = plain.top5[1]["index"]
    lens = models.lens.clone()
    lens[top, runner_up] = lens[top, plain.predicted_index]  # neuron `top` now argues for both classes alike
    shared = replace(models, lens=lens)
    settings = explain.ExplainSettings(n_cite=3, input_check=False, versus="runner_up")
    again = explain.explain_one(shared, analysis, 0, "x", {}, settings)
    assert again.neurons[0].neuron_id == top                                 # still the class's strongest support
    assert top not in [n["neuron_id"] for n in again.extra["versus"]["neurons"]]  # but no reason for the contrast


def test_the_command_line_notes_a_dark_image_once_under_its_file_name(ckpts, test_images, tmp_path, capsys):
    """Walkthrough (session 23): main() decoded each file, then explain_images read the decoded square again
    and printed a second note, '<array> is 73% dark' (another share: the padded square's)."""
    images, _ = test_images
    dark, light = tmp_path / "dark.png", tmp_path / "light.png"
    Image.fromarray(255 - images[0]).resize((128, 96)).save(dark)  # not the model's size: decoded, padded
    Image.fromarray(images[1]).save(light)
    capsys.readouterr()
    why_did_you.main(image=[str(dark), str(light)], report_dir=str(tmp_path), device="cpu", fast=True, **ckpts)
    notes = [line for line in capsys.readouterr().err.splitlines() if "dark strokes on white paper" in line]
    assert [n.split(" is ")[0] for n in notes] == [f"note: {dark}"]


def test_versus_a_named_class_and_its_errors(ckpts, test_images, tmp_path, capsys):
    images, _ = test_images
    models = explain.load_models(ckpts["classifier_ckpt"], ckpts["sae_ckpt"], "cpu")
    sketch = tmp_path / "s.png"
    Image.fromarray(images[0]).save(sketch)
    run = dict(image=str(sketch), report_dir=str(tmp_path), device="cpu", fast=True, **ckpts)
    predicted = why_did_you.main(**run)[0]["predicted_class"]
    other = next(c for c in models.class_names if c != predicted)
    capsys.readouterr()
    out = why_did_you.main(**run, versus=other)[0]
    assert out["versus"]["class"] == other
    text = capsys.readouterr().out
    assert f"versus {other} (" in text and f"{predicted} rather than {other}" in text and "margin " in text
    assert why_did_you.main(**run, versus=predicted)[0]["versus"]["skipped"].startswith("it is the predicted class")
    assert f"versus {predicted}: it is the predicted class" in capsys.readouterr().out
    with pytest.raises(UserError, match=f"did you mean {other}"):  # before any image is explained
        why_did_you.main(**run, versus=other[:-1] + "#")
    assert "versus" not in why_did_you.main(**run)[0]  # off by default: the output is unchanged
    assert why_did_you.main(**run, versus=f" {other.upper()}")[0]["versus"]["class"] == other  # case and spaces
    # a blank page: the plain sentence says no concept explains the guess, and the contrast does not cite any
    blank = explain_io.format_text(why_did_you.explain_image(np.full((64, 64), 255, np.uint8), report_dir=str(tmp_path),
                                                             device="cpu", input_check=False, versus="runner_up",
                                                             **ckpts))
    assert "versus " in blank and "a blank page: no concept explains either class" in blank
    assert "rather than" not in blank


def test_the_llm_is_asked_about_the_contrast_too(ckpts, test_images, tmp_path):
    """--llm=True with --versus: the one sentence is asked to say why this class rather than the other."""
    exp = _explain(test_images[0][:1], ckpts, tmp_path, versus="runner_up", input_check=False)[0]

    class Recorder:
        def ask(self, system, text, images=(), fallback=None):
            self.text = text
            return "because of the dots"

    backend = Recorder()
    assert why_did_you.llm_sentence(backend, exp, None) == "because of the dots"
    other = exp.extra["versus"]["class"]
    assert f"rather than '{other}'" in backend.text and exp.extra["versus"]["neurons"][0]["concept"] in backend.text


def test_the_overlay_maps_the_contrast_in_its_own_panel(ckpts, test_images, tmp_path):
    """--versus --overlay: the class's panel as before, and beside it where the contrast's neurons fired."""
    images, _ = test_images
    plain, contrasted = (_explain(images[:1], ckpts, tmp_path, input_check=False, versus=v)[0] for v in ("", "runner_up"))
    size = 96
    assert explain.render_versus_overlay(images[0], plain, size) is None
    assert explain.overlay_image(images[0], plain, size).size == explain.render_overlay(images[0], plain, size).size
    left = np.asarray(explain.render_overlay(images[0], contrasted, size))
    assert np.array_equal(left, np.asarray(explain.render_overlay(images[0], plain, size)))  # the class's panel unchanged
    ids = [n["neuron_id"] for n in contrasted.extra["versus"]["neurons"]]
    assert ids and [n.neuron_id for n in contrasted.versus_neurons] == ids
    right = np.asarray(explain.render_versus_overlay(images[0], contrasted, size))
    # one colour is one neuron in both panels: a neuron the class's panel shows keeps its colour, the rest take
    # colours that panel does not use
    palette, shown = explain.versus_palette(contrasted), [n.neuron_id for n in contrasted.neurons]
    assert len(set(palette)) == len(palette) == len(ids)
    for neuron, colour in zip(ids, palette):
        assert colour == shown.index(neuron) if neuron in shown else colour not in range(len(shown))
    # the tint is the contrast's neurons' heat in those colours, and the legend's swatches say so (one row each,
    # under the head line "rather than B (q%)")
    tinted = explain._tinted(images[0], contrasted.versus_neurons, palette, size).clip(0, 255).astype(np.uint8)
    assert np.array_equal(right[:size], tinted)
    assert right.shape[0] == size + 2 + 16 * (len(ids) + 1) + 8  # no input-check line: it tested the class's
    swatches = [tuple(right[size + 2 + 16 * (k + 1) + 7, 9]) for k in range(len(ids))]
    assert swatches == [explain.PALETTE[c] for c in palette]
    if ids != shown:
        assert not np.array_equal(right[:size], left[:size])  # other neurons, other heat
    warned = replace(contrasted, extra={**contrasted.extra, "unfamiliar": True, "familiarity": 1.0})
    assert explain.render_versus_overlay(images[0], warned, size).height == right.shape[0] + 32  # the warning too
    both = np.asarray(explain.overlay_image(images[0], contrasted, size))
    assert both.shape[1] == 2 * size + 12 and np.array_equal(both[:left.shape[0], :size], left)
    assert np.array_equal(both[:right.shape[0], size + 12:], right)
    # a notebook gets the same picture from the explanation itself (the sketch it was made from is kept)
    assert np.array_equal(np.asarray(contrasted.overlay(size)), both)
    assert "sketch" not in contrasted.to_dict()
    with pytest.raises(UserError, match="no sketch"):
        replace(contrasted, sketch=None).overlay()
    # a contrast that was skipped (the predicted class itself) draws no second panel
    skipped = _explain(images[:1], ckpts, tmp_path, input_check=False, versus=plain.predicted_class)[0]
    assert "skipped" in skipped.extra["versus"] and explain.render_versus_overlay(images[0], skipped, size) is None


def test_the_runner_up_is_never_the_predicted_class_even_on_a_tie():
    assert explain.runner_up(torch.tensor([2.0, 2.0, 1.0]), 1) == 0
    assert explain.runner_up(torch.tensor([2.0, 2.0, 1.0]), 0) == 1
    assert explain.runner_up(torch.tensor([3.0]), 0) == 0  # one class: no other, the contrast is skipped


def test_cited_neurons_are_the_strongest_support(ckpts, test_images, tmp_path):
    images, _ = test_images
    models = explain.load_models(ckpts["classifier_ckpt"], ckpts["sae_ckpt"], "cpu")
    analysis = explain.analyse(models, np.stack(images[:6]))
    x = data.model_input(torch.from_numpy(np.stack(images[:6])), models.classifier_ckpt["preprocess"])
    with torch.no_grad():  # each neuron's code at every token, computed apart from analyse()
        codes = models.sae.codes_for_map(models.classifier.features(x)).numpy()
    for b in range(6):
        e = explain.explain_one(models, analysis, b, "x", {}, explain.ExplainSettings(n_cite=3))
        contrib = (analysis.z_mean[b] * models.lens[:, e.predicted_index]).double().numpy()
        positive = np.sort(contrib[contrib > 0])[::-1]
        assert [n.contribution for n in e.neurons] == pytest.approx(positive[:3].tolist(), abs=1e-6)
        assert [n.share for n in e.neurons] == pytest.approx((positive[:3] / positive.sum()).tolist(), abs=1e-6)
        assert e.sentence.startswith(f"Predicted {e.predicted_class} (")
        for n in e.neurons:
            assert n.concept == f"neuron {n.neuron_id}" and n.concept in e.sentence
            assert n.heatmap.shape == analysis.hw and n.heatmap.max() == pytest.approx(n.activation_max, rel=1e-5)
            assert n.heatmap.mean() == pytest.approx(n.activation, rel=1e-5)
            # the map itself, token by token, the right way up (a transposed map kept its max and mean)
            np.testing.assert_allclose(n.heatmap, codes[b, :, n.neuron_id].reshape(analysis.hw), rtol=1e-4, atol=1e-5)


def test_code_space_check_is_the_arithmetic_and_the_input_check_is_reported(ckpts, test_images, tmp_path):
    """The code-space drop is a consistency check (cited >= random by construction); the
    input-space check reruns the classifier on the sketch with 20% of its ink whited out."""
    images, _ = test_images
    exps = _explain(images, ckpts, tmp_path, n_cite=3, n_random=8, seed=0)
    for e in exps:
        f = e.faithfulness
        if not e.neurons:
            continue
        assert f["code_cited_drop"] >= f["code_random_drop"] - 1e-6  # true by construction, for any SAE
        assert 0.15 <= f["ink_removed"] <= 0.25                       # the cited mask's ink, ~20% of it
        for key in ("input_cited_drop", "input_random_drop", "cam_drop"):
            assert np.isfinite(f[key])
    # the input check whites out the cited neurons' ink, not another set's (only finiteness was checked)
    models = explain.load_models(ckpts["classifier_ckpt"], ckpts["sae_ckpt"], "cpu")
    analysis = explain.analyse(models, np.stack(images[:4]))
    for b, e in enumerate(exps[:4]):
        if e.neurons:
            alone = evidence.input_deletion(models, images[b], analysis, b, [n.neuron_id for n in e.neurons],
                                            e.predicted_index, [])
            assert e.faithfulness["input_cited_drop"] == pytest.approx(alone["input_cited_drop"], abs=1e-4)
    again = _explain(images[:4], ckpts, tmp_path, n_cite=3, n_random=8, seed=0)  # seeded draws
    # equal up to float noise: another batch may take other kernels (failed bit-exact on a 16-core Xeon)
    assert [e.faithfulness for e in again] == [pytest.approx(e.faithfulness, rel=1e-5, abs=1e-6) for e in exps[:4]]
    fast = _explain(images[:2], ckpts, tmp_path, n_cite=3, input_check=False)
    assert all("input_cited_drop" not in e.faithfulness for e in fast)
    for e in fast:  # the JSON keeps one schema: the input check's fields are null when it did not run
        stored = json.loads(e.to_json())["faithfulness"]
        assert set(evidence.INPUT_CHECK_KEYS) <= set(stored) and stored["input_cited_drop"] is None
        assert list(stored)[:3] == ["code_cited_drop", "code_random_drop", "random_is_cited"]  # the README's order
    checked = next(e for e in exps if e.neurons).faithfulness
    assert set(checked) - {"code_cited_drop", "code_random_drop", "random_is_cited"} == set(evidence.INPUT_CHECK_KEYS)
    assert checked["random_is_cited"] is False  # a sketch fires more neurons than the three cited


def test_when_every_active_neuron_is_cited_there_is_no_random_baseline(ckpts, test_images, tmp_path):
    """Citing all active neurons (a blank page did) makes each random set the cited set: the drops match and
    the output says there was no baseline, instead of printing two equal numbers as a comparison."""
    images, _ = test_images
    models = explain.load_models(ckpts["classifier_ckpt"], ckpts["sae_ckpt"], "cpu")
    analysis = explain.analyse(models, np.stack(images[:1]))
    active = [int(i) for i in torch.nonzero(analysis.z_mean[0] > 0).flatten()]
    pred = int(analysis.logits[0].argmax())
    f, _ = explain.faithfulness(models, analysis, 0, pred, active, np.random.default_rng(0), 8)
    assert f["random_is_cited"] is True
    assert f["code_random_drop"] == pytest.approx(f["code_cited_drop"], abs=1e-5)  # the sets are the same
    f_fewer, _ = explain.faithfulness(models, analysis, 0, pred, active[:-1], np.random.default_rng(0), 8)
    assert f_fewer["random_is_cited"] is False  # one active neuron left out: the random sets can differ
    on_ink, _ = explain.faithfulness(models, analysis, 0, pred, active, np.random.default_rng(0), 8, image=images[0])
    assert on_ink["random_is_cited"] is True  # the input check whites out the same ink for "random" and cited
    assert on_ink["input_random_drop"] == pytest.approx(on_ink["input_cited_drop"], abs=1e-4)
    assert "random: all cited" in explain.evidence_line(on_ink)
    e = _explain(images[:1], ckpts, tmp_path, n_cite=3)[0]
    assert e.faithfulness["random_is_cited"] is False and explain.NO_RANDOM_SET not in explain_io.format_text(e)
    every = replace(e, faithfulness={**e.faithfulness, "random_is_cited": True})
    text = explain_io.format_text(every)
    assert text.count(explain.NO_RANDOM_SET) == 2  # the evidence line and the consistency line
    none_cited = replace(e, neurons=[], faithfulness={"code_cited_drop": 0.0, "code_random_drop": 0.0,
                                                      "random_is_cited": False})
    assert "consistency: no neuron is cited, so there is nothing to zero" in explain_io.format_text(none_cited)


def test_batch_matches_single_image(ckpts, test_images, image_dir, tmp_path):
    images, _ = test_images
    batch = _explain(images[:3], ckpts, tmp_path, batch_size=2)
    for k, e in enumerate(batch):
        one = explain.explain_image(images[k], report_dir=str(tmp_path), device="cpu", **ckpts)
        assert one.predicted_index == e.predicted_index and one.logit == pytest.approx(e.logit, abs=1e-4)
        assert [n.neuron_id for n in one.neurons] == [n.neuron_id for n in e.neurons]
    # the random sets are drawn per image, not per place in a batch: the checks do not depend on the batching
    whole = _explain(images[:4], ckpts, tmp_path, batch_size=4)
    halves = _explain(images[:4], ckpts, tmp_path, batch_size=2)
    assert [e.faithfulness for e in halves] == [pytest.approx(e.faithfulness, rel=1e-5, abs=1e-6) for e in whole]
    # ... nor on its place in the list: one image, one explanation (seeded by its index, test:0 six times over
    # read random baselines from 0.42 to 1.58)
    again = _explain([images[2], images[0], images[2]], ckpts, tmp_path)
    assert again[0].faithfulness == pytest.approx(again[2].faithfulness, rel=1e-5, abs=1e-6)
    assert again[1].faithfulness == pytest.approx(whole[0].faithfulness, rel=1e-5, abs=1e-6)
    assert again[0].faithfulness == pytest.approx(whole[2].faithfulness, rel=1e-5, abs=1e-6)
    from_file = explain.explain_image(image_dir / "sketch_0.png", report_dir=str(tmp_path), device="cpu", **ckpts)
    assert from_file.image.endswith("sketch_0.png") and from_file.predicted_index == batch[0].predicted_index


@pytest.mark.parametrize("agg", ["max", "mean", "sum"])
def test_top_neuron_ids_threshold_semantics(ckpts, test_images, agg):
    image = test_images[0][0]
    models = explain.load_models(ckpts["classifier_ckpt"], ckpts["sae_ckpt"], "cpu")
    x = data.model_input(torch.from_numpy(image[None].copy()), models.classifier_ckpt["preprocess"])
    with torch.no_grad():
        z = models.sae.codes_for_map(models.classifier.features(x))[0]  # (T, M) Top-K code
        probs = models.classifier(x).softmax(-1)[0]
    expected = {"max": z.amax(0), "mean": z.mean(0), "sum": z.sum(0)}[agg].double().numpy()
    ids, scores, threshold, cls, prob, top5 = explain.top_neuron_ids_for_image(
        image, N=20, percentile=90.0, agg=agg, device="cpu", **ckpts)
    assert threshold == pytest.approx(np.percentile(expected, 90.0), rel=1e-5, abs=1e-6)
    want = [i for i in np.argsort(-expected, kind="stable") if expected[i] >= threshold and expected[i] > 0][:20]
    assert ids == [int(i) for i in want] and scores == pytest.approx(expected[want].tolist(), rel=1e-5)
    assert cls == models.class_names[int(probs.argmax())] and prob == pytest.approx(float(probs.max()), rel=1e-5)
    assert [t["index"] for t in top5] == probs.topk(5).indices.tolist()
    few = explain.top_neuron_ids_for_image(image, N=2, percentile=0.0, agg=agg, device="cpu", **ckpts)[0]
    assert few == ids[:2]  # percentile 0 keeps every active neuron; N caps the list
    everything = explain.top_neuron_ids_for_image(image, N=10_000, percentile=0.0, agg=agg, device="cpu", **ckpts)[0]
    assert sorted(everything) == np.flatnonzero(expected > 0).tolist()


def test_bad_agg_is_a_user_error(ckpts, test_images):
    with pytest.raises(UserError, match="AGG"):
        explain.top_neuron_ids_for_image(test_images[0][0], agg="median", device="cpu", **ckpts)


def test_notebook_inputs_beyond_paths_and_arrays(ckpts, test_images, tmp_path, capsys):
    """test:K in top_neuron_ids_for_image; tensors (channels first); ~ and file:// paths; clear errors
    for URLs, dicts, bytes and bad N / percentile types (they were raw TypeErrors or 'image not found')."""
    settings = dict(device="cpu", report_dir=str(tmp_path), **ckpts)
    by_test = why_did_you.top_neuron_ids_for_image("test:0", N=5, **settings)
    assert by_test == explain.top_neuron_ids_for_image(test_images[0][0], N=5, device="cpu", **ckpts)
    image = test_images[0][1]

    def same(got, want):
        assert got[0] == want[0] and got[1] == pytest.approx(want[1], rel=1e-5) and got[3] == want[3]

    as_float = image.astype(np.float32) / 255.0
    want = explain.top_neuron_ids_for_image(as_float, device="cpu", **ckpts)  # the (H, W) float array's reading
    as_tensor = torch.from_numpy(as_float)
    for tensor in (as_tensor, as_tensor[None], as_tensor[None].repeat(3, 1, 1)):  # (H, W), (1, H, W), (3, H, W)
        same(explain.top_neuron_ids_for_image(tensor, device="cpu", **ckpts), want)
    Image.fromarray(image).save(tmp_path / "x.png")
    want = explain.top_neuron_ids_for_image(str(tmp_path / "x.png"), device="cpu", **ckpts)
    path = Path.home() / f".selfexplain_test_{os.getpid()}.png"
    try:
        Image.fromarray(image).save(path)
        same(explain.top_neuron_ids_for_image(f"~/{path.name}", device="cpu", **ckpts), want)
        same(explain.top_neuron_ids_for_image(path.as_uri(), device="cpu", **ckpts), want)
    finally:
        path.unlink(missing_ok=True)
    entry = next(e for e in os.scandir(tmp_path) if e.name == "x.png")  # an os.PathLike that is not a Path
    same(explain.top_neuron_ids_for_image(entry, device="cpu", **ckpts), want)
    with pytest.raises(UserError, match="REPORT_DIR"):  # test:K saves the sketch there: a typo is refused
        why_did_you.top_neuron_ids_for_image("test:0", device="cpu", report_dir=str(tmp_path / "typo"), **ckpts)
    Image.fromarray(image).save(tmp_path / "y.png")  # a pattern of two read 'image not found: *.png'
    with pytest.raises(UserError, match=r"\*\.png holds 2 images and top_neuron_ids_for_image reads one"):
        why_did_you.top_neuron_ids_for_image(str(tmp_path / "*.png"), **settings)
    same(why_did_you.top_neuron_ids_for_image(str(tmp_path / "x*.png"), **settings), want)  # a pattern of one
    for bad, words in [("https://example.com/x.png", "is a URL"), (b"\x89PNG", "got bytes"),
                       (None, "got NoneType"), (torch.zeros(2, 5, 8, 8), "tensor image must be")]:
        with pytest.raises(UserError, match=words):
            explain.top_neuron_ids_for_image(bad, device="cpu", **ckpts)
    for n, percentile in [(2.5, 99.0), (True, 99.0), (5, "99")]:
        with pytest.raises(UserError, match=r"integer TOP_ACTIVE \(N\) and a number PERCENTILE"):
            explain.top_neuron_ids_for_image(image, N=n, percentile=percentile, device="cpu", **ckpts)
    with pytest.raises(UserError, match=r"TOP_ACTIVE \(N\) >= 1, got 99.0, 0"):  # by its CLI name (N is the cited count there)
        explain.top_neuron_ids_for_image(image, N=0, device="cpu", **ckpts)
    with pytest.raises(UserError, match="not a dict"):
        why_did_you.explain_images({"a": image}, **settings)
    three = why_did_you.explain_images(np.stack([image] * 3), input_check=False, familiar=False, **settings)
    assert len(three) == 3 and "read as 3 grey images" in capsys.readouterr().err
    batch = why_did_you.explain_images(torch.stack([as_tensor[None]] * 2), input_check=False, familiar=False,
                                       **settings)
    assert [e.predicted_class for e in batch] == [three[0].predicted_class] * 2  # (B, C, H, W): B images


def test_models_load_once_per_process(ckpts, test_images, tmp_path, monkeypatch):
    first = explain.load_models(ckpts["classifier_ckpt"], ckpts["sae_ckpt"], "cpu")
    monkeypatch.setattr(artifacts, "load_classifier", None)  # any further read from disk would fail
    explain.explain_image(test_images[0][0], report_dir=str(tmp_path), device="cpu", **ckpts)
    assert explain.load_models(ckpts["classifier_ckpt"], ckpts["sae_ckpt"], "cpu") is first
    monkeypatch.undo()
    # a checkpoint rewritten in place (new mtime) is picked up
    sae_path = ckpts["sae_ckpt"]
    stat = os.stat(sae_path)
    os.utime(sae_path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    assert explain.load_models(ckpts["classifier_ckpt"], ckpts["sae_ckpt"], "cpu") is not first


def test_mismatched_sae_is_refused(ckpts, tmp_path):
    other = TopKSAE(512, 16, 2)
    path = artifacts.save_checkpoint(artifacts.sae_checkpoint(
        other, classifier_fingerprint="0" * 16, classifier_path="elsewhere", config={}, epoch=0, metrics={},
        usage_ema=torch.zeros(16)), tmp_path / "best_sae.pt")
    with pytest.raises(UserError, match="trained on classifier"):
        explain.load_models(ckpts["classifier_ckpt"], path, "cpu")


def test_a_report_of_another_sae_is_refused_before_familiarity_is_refitted_into_it(ckpts, test_images, tmp_path,
                                                                                   cache_dir):
    """Forgetting --sae_ckpt explained with the demo's models against the user's report: concepts set aside
    (neurons by id), the user's familiarity.json overwritten for the demo models; one log line said so."""
    report = tmp_path / "report"
    report.mkdir()
    artifacts.write_json(report / artifacts.SUMMARY, {"sae_fingerprint": "0123456789abcdef"})
    with pytest.raises(UserError, match="describes another SAE .*--sae_ckpt"):
        explain.explain_image(test_images[0][0], report_dir=str(report), device="cpu", **ckpts)
    with pytest.raises(UserError, match="describes another SAE"):
        why_did_you.main(image="test:0", report_dir=str(report), cache_dir=str(cache_dir), device="cpu", **ckpts)
    with pytest.raises(UserError, match="describes another SAE"):
        why_did_you.top_neuron_ids_for_image("test:0", report_dir=str(report), cache_dir=str(cache_dir), device="cpu",
                                             **ckpts)
    assert sorted(p.name for p in report.iterdir()) == ["summary.json"]  # no familiarity.json, no test_images/
    fingerprint = artifacts.load_checkpoint(ckpts["sae_ckpt"], "sae")["fingerprint"]
    artifacts.write_json(report / artifacts.SUMMARY, {"sae_fingerprint": fingerprint})  # its own report: read
    assert explain.explain_image(test_images[0][0], report_dir=str(report), device="cpu", **ckpts).neurons


def test_concepts_fall_back_from_llm_to_stats_to_id(ckpts, test_images, tmp_path, capsys):
    image = test_images[0][0]
    empty = tmp_path / "empty"
    plain = explain.explain_image(image, report_dir=str(empty), device="cpu", n_cite=3, **ckpts)
    assert "no concepts" in capsys.readouterr().err
    a, b, c = [n.neuron_id for n in plain.neurons]
    report = tmp_path / "report"
    report.mkdir()
    fingerprint = artifacts.load_checkpoint(ckpts["sae_ckpt"], "sae")["fingerprint"]
    artifacts.write_json(report / artifacts.SUMMARY, {"sae_fingerprint": fingerprint})
    artifacts.write_jsonl(report / artifacts.NEURONS, [
        {"neuron_id": a, "auto_summary": "stats for a", "top_classes": []},
        {"neuron_id": b, "auto_summary": "stats for b", "top_classes": []}])
    artifacts.write_jsonl(report / artifacts.LLM_OUTPUT, [
        {"neuron_id": a, "answer": "wheel-like circles", "backend": "offline", "model": "offline",
         "sae_fingerprint": fingerprint},
        {"neuron_id": b, "answer": "from another SAE", "backend": "offline", "model": "offline",
         "sae_fingerprint": "0" * 16}])
    e = explain.explain_image(image, report_dir=str(report), device="cpu", n_cite=3, **ckpts)
    assert [n.concept for n in e.neurons] == ["wheel-like circles", "stats for b", f"neuron {c}"]
    # the page and the legend use short names: a summary's sentence gives way to its statistics label
    assert [(n.name, n.offline) for n in e.neurons] == [
        ("wheel-like circles", False), ("strokes without a clear class preference", True), (f"neuron {c}", False)]
    assert [n["name"] for n in e.to_dict()["neurons"]] == [n.name for n in e.neurons]
    assert "wheel-like circles (" in e.sentence and "no concepts" not in capsys.readouterr().err
    assert "stats for b" not in e.sentence and "strokes without a clear class preference" in e.sentence  # a name,
    # not a summary's whole sentence (stage 3's summaries alone made a 900-character one)


def test_main_llm_answer_and_test_split_image(ckpts, cache_dir, tmp_path):
    out = why_did_you.main(image="test:1", report_dir=str(tmp_path), cache_dir=str(cache_dir), device="cpu",
                           llm=True, backend="offline", json=True, **ckpts)
    assert len(out) == 1 and (tmp_path / "test_images" / "test_1.png").is_file()
    assert out[0]["llm_sentence"] == out[0]["sentence"]  # the offline backend answers with the composed sentence
    exp = explain.explain_images([np.zeros((64, 64), np.uint8) + 255], report_dir=str(tmp_path), device="cpu",
                                 **ckpts)[0]
    exp.extra["llm_sentence"] = exp.sentence
    assert "LLM:" not in explain_io.format_text(exp)  # an echo of the sentence above is not printed twice
    exp.extra["llm_sentence"] = "It is a wheel because of the spokes."
    assert explain_io.format_text(exp).endswith("LLM: It is a wheel because of the spokes.")
    assert out[0]["true_class"] in explain.load_models(ckpts["classifier_ckpt"], ckpts["sae_ckpt"], "cpu").class_names
    with pytest.raises(UserError, match="test split has"):
        why_did_you.main(image="test:100000", report_dir=str(tmp_path), cache_dir=str(cache_dir), device="cpu", **ckpts)


def test_a_missing_report_dir_is_refused_before_anything_is_written(ckpts, image_dir, tmp_path):
    typo = tmp_path / "neuron_reprot"
    for call in (lambda: why_did_you.main(image=str(image_dir / "sketch_0.png"), report_dir=str(typo), **ckpts),
                 lambda: why_did_you.explain_image(image_dir / "sketch_0.png", report_dir=str(typo), **ckpts)):
        with pytest.raises(UserError, match="neuron_reprot does not exist: run sae_summarize.py first"):
            call()
    assert not typo.exists()
    # after `make clean` nothing exists: name the first stage to run, not stage 3 (then 2, then 1)
    gone = dict(classifier_ckpt=str(tmp_path / "runs" / "best.pt"), sae_ckpt=str(tmp_path / "runs" / "best_sae.pt"))
    run = dict(image=str(image_dir / "sketch_0.png"), report_dir=str(typo))
    with pytest.raises(UserError, match=r"nor CLASSIFIER_CKPT \(.*best.pt not found\): run train_standard_cnn.py, "
                                        r"train_sae.py and sae_summarize.py first \(make demo"):
        why_did_you.main(**run, **gone)
    with pytest.raises(UserError, match=r"nor CLASSIFIER_CKPT .*: run train_standard_cnn.py, train_sae.py"):
        why_did_you.main(**run, **{**gone, "sae_ckpt": ckpts["sae_ckpt"]})  # the SAE of an old classifier: retrain
    with pytest.raises(UserError, match=r"nor SAE_CKPT \(.*best_sae.pt not found\): run train_sae.py and "
                                        r"sae_summarize.py first"):
        why_did_you.main(**run, **{**gone, "classifier_ckpt": ckpts["classifier_ckpt"]})


def test_notebook_explain_image_gives_the_cli_json_object(ckpts, cache_dir, image_dir, tmp_path):
    """README: exp.to_json() is the --json=True object, familiarity and most-active list included."""
    path = str(image_dir / "sketch_1.png")
    cli = why_did_you.main(image=path, report_dir=str(tmp_path), cache_dir=str(cache_dir), device="cpu", **ckpts)[0]
    exp = why_did_you.explain_image(path, report_dir=str(tmp_path), cache_dir=str(cache_dir), device="cpu", **ckpts)
    api = json.loads(exp.to_json())
    assert {"familiarity", "unfamiliar", "top_active"} <= set(api)
    assert api == cli
    bare = why_did_you.explain_image(path, report_dir=str(tmp_path), device=torch.device("cpu"), familiar=False,
                                     **ckpts)
    assert bare.to_dict()["familiarity"] is None and bare.to_dict()["unfamiliar"] is None  # in the contract, null


def test_notebook_explain_images_takes_test_k_and_mixed_inputs_like_the_cli(ckpts, cache_dir, image_dir, tmp_path):
    """One explanation per input, in order, each the CLI's object; the command line's names get a pointed error."""
    kw = dict(report_dir=str(tmp_path), cache_dir=str(cache_dir), device="cpu", **ckpts)
    path = image_dir / "sketch_1.png"
    cli = why_did_you.main(image=["test:2", str(path)], **kw)
    got = [json.loads(e.to_json()) for e in why_did_you.explain_images(["test:2", path], **kw)]
    assert got == cli and got[0]["true_class"] and got[0]["image"].endswith("test_2.png")
    pictures = [Image.open(path).convert("RGB"), np.asarray(Image.open(path))]  # the same picture, as PIL and array
    got += [json.loads(e.to_json()) for e in why_did_you.explain_images(pictures, **kw)]
    assert [g["predicted_class"] for g in got[2:]] == [cli[1]["predicted_class"]] * 2
    assert [g["logit"] for g in got[2:]] == pytest.approx([cli[1]["logit"]] * 2, rel=1e-4)
    assert all({"familiarity", "unfamiliar", "top_active"} <= set(g) for g in got)
    assert len(explain_io.as_image_list(np.zeros((5, 64, 64), np.uint8))) == 5  # a stack of the cache's images
    assert len(explain_io.as_image_list(np.zeros((64, 64, 3), np.uint8))) == 1  # one colour picture
    alone = why_did_you.explain_images(path, familiar=False, **kw)  # one image alone, or a generator of them
    assert len(alone) == 1 and len(why_did_you.explain_images((p for p in [path, path]), familiar=False, **kw)) == 2
    for wrong, hint in [({"N": 3}, "n_cite"), ({"fast": True}, r"input_check \(= not fast\)"), ({"n_cites": 3}, "n_cite"),
                        ({"SEED": 1}, "seed")]:
        with pytest.raises(UserError, match=f"unknown explanation setting .*did you mean {hint}"):
            why_did_you.explain_image(path, **kw, **wrong)
    sweep = explain.ExplainSettings.from_kwargs({"n_cite": np.int64(3), "ink_share": np.float32(0.25),
                                                  "input_check": np.bool_(False)})  # a notebook sweep's numbers
    assert (sweep.n_cite, sweep.ink_share, sweep.input_check) == (3, 0.25, False) and type(sweep.n_cite) is int
    with pytest.raises(UserError, match="active must be None or MostActive"):
        explain.ExplainSettings.from_kwargs({"active": "max"})
    with pytest.raises(UserError, match="need N >= 1"):  # N=0 cited nothing, then said no neuron stood out
        why_did_you.explain_image(path, **kw, n_cite=0)
    with pytest.raises(UserError, match=r"is a folder: pass its image files"):  # the package's own call: one image
        explain.explain_image(os.path.dirname(path), kw["classifier_ckpt"], kw["sae_ckpt"], kw["report_dir"], "cpu")
    for wrong in ({"n_cite": "three"}, {"ink_share": "0.2"}, {"n_random": None}, {"input_check": "no"}):
        with pytest.raises(UserError, match=f"{next(iter(wrong))} expects"):  # not a TypeError from deep inside
            why_did_you.explain_image(path, **kw, **wrong)


def test_notebook_walkthrough_findings(ckpts, cache_dir, test_images, tmp_path, monkeypatch):
    """What a notebook user met: an array given to main() read as a file pattern; a batch-of-one tensor refused;
    overlay(size=0) a raw ValueError; each test:K reloading the dataset (~0.1 s); a relative REPORT_DIR missing
    from another working folder told them to retrain."""
    kw = dict(report_dir=str(tmp_path), cache_dir=str(cache_dir), device="cpu", **ckpts)
    image = test_images[0][1]
    with pytest.raises(UserError, match=r"main\(image=...\) takes file paths or 'test:K'; for a ndarray call "
                                        r"why_did_you.explain_image\(image\)"):
        why_did_you.main(image=image, **kw)
    batch_of_one = torch.from_numpy(image.astype(np.float32) / 255.0)[None, None]  # (1, 1, H, W)
    exp = why_did_you.explain_image(batch_of_one, familiar=False, **kw)
    assert exp.predicted_index == why_did_you.explain_image(image, familiar=False, **kw).predicted_index
    for size in (0, "big", 10 ** 6):
        with pytest.raises(UserError, match="overlay size is a side in pixels from 64 to 4096"):
            exp.overlay(size)
    assert exp.overlay(128).size[1] >= 128
    loads = []
    real = explain_io.load_dataset
    monkeypatch.setattr(explain_io, "load_dataset", lambda *a, **k: loads.append(1) or real(*a, **k))
    explain_io._LAST_DATASET.clear()
    got = why_did_you.explain_images([f"test:{k}" for k in range(4)], familiar=False, input_check=False, **kw)
    assert len(got) == 4 and len(loads) == 1  # one load for the list, not one per image
    assert explain_io.test_entry(" test:2 ") == "2"  # was "image not found:  test:2"
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match=f"REPORT_DIR=neuron_report does not exist \\(read from the working folder "
                                        f"{re.escape(str(tmp_path))}; from elsewhere, pass absolute paths\\)"):
        why_did_you.main(image="test:0", report_dir="neuron_report", **{k: v for k, v in kw.items() if k != "report_dir"})


def test_overlays_of_images_with_the_same_name_do_not_overwrite_each_other(ckpts, test_images, tmp_path):
    names = ["a/cat.png", "b/cat.png", "cat.jpg"]
    for k, rel in enumerate(names):
        (tmp_path / "in" / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(test_images[0][k]).save(tmp_path / "in" / rel)
    out = why_did_you.main(image=[str(tmp_path / "in" / rel) for rel in names], overlay=str(tmp_path / "why.png"),
                           report_dir=str(tmp_path), device="cpu", json=True, **ckpts)
    overlays = [rec["overlay"] for rec in out]
    assert [os.path.basename(o) for o in overlays] == ["why_a_cat_png.png", "why_b_cat_png.png", "why_cat_jpg.png"]
    assert all(os.path.isfile(o) for o in overlays)
    # distinct stems keep the short names; a name repeated outright is numbered
    assert [p.name for p in explain_io.overlay_paths("ov", ["x/s_0.png", "y/s_1.png"])] == ["ov_s_0.png", "ov_s_1.png"]
    assert [p.name for p in explain_io.overlay_paths("ov.png", ["s.png", "s.png"])] == ["ov_s_png.png", "ov_s_png_2.png"]
    # an existing folder, or a path ending in /, holds one overlay per image (was written beside it as folder.png)
    (tmp_path / "overlays").mkdir()
    assert explain_io.overlay_paths(tmp_path / "overlays", ["x/s_0.png"]) == [tmp_path / "overlays" / "s_0_why.png"]
    assert explain_io.overlay_paths(f"{tmp_path}/new/", ["a.png", "b.jpg"]) == [tmp_path / "new" / "a_why.png",
                                                                             tmp_path / "new" / "b_why.png"]


def test_an_overlay_never_overwrites_an_input_image(ckpts, test_images, tmp_path):
    sketch = tmp_path / "sketch.png"
    Image.fromarray(test_images[0][0]).save(sketch)
    original = sketch.read_bytes()
    # --overlay=sketch.png (or sketch, saved as sketch.png) wrote the overlay over the user's sketch
    for overlay in (sketch, tmp_path / "." / "sketch"):
        with pytest.raises(UserError, match="would overwrite the input image"):
            why_did_you.main(image=str(sketch), overlay=str(overlay), report_dir=str(tmp_path), device="cpu",
                             fast=True, **ckpts)
        assert sketch.read_bytes() == original
    # a folder's earlier overlay read back as an input is not replaced either
    (tmp_path / "sketch_why.png").write_bytes(original)
    with pytest.raises(UserError, match=r"sketch_why\.png would overwrite"):
        explain_io.overlay_paths(f"{tmp_path}/", [str(sketch), str(tmp_path / "sketch_why.png")])
    assert explain_io.overlay_paths(tmp_path / "why.png", [str(sketch)]) == [tmp_path / "why.png"]
    # another image format is refused before any work, not written as PNG under another name
    for other in ("why.jpg", "why.JPEG", "sketch.jpg"):
        with pytest.raises(UserError, match=r"OVERLAY is written as PNG: name it (why|sketch)\.png"):
            explain_io.overlay_paths(tmp_path / other, [str(sketch)])


def test_rerunning_a_folder_into_itself_reads_the_sketches_again_not_its_overlays(ckpts, test_images, tmp_path,
                                                                                   capsys):
    """``--image=dir/ --overlay=dir/`` twice: the first run's x_why.png were read back as inputs and the rerun was
    refused (their overlays would overwrite them). Overlays carry a PNG text mark and folders leave them out."""
    folder = tmp_path / "sketches"
    folder.mkdir()
    for i in range(2):
        Image.fromarray(test_images[0][i]).save(folder / f"s{i}.png")
    sketches = {p.name: p.read_bytes() for p in folder.iterdir()}
    (folder / "mine_why.png").write_bytes(sketches["s0.png"])  # a sketch of the user's, named like an overlay
    run = dict(image=str(folder), overlay=f"{folder}/", report_dir=str(tmp_path), device="cpu", fast=True, **ckpts)
    first = why_did_you.main(**run)
    assert sorted(Path(r["image"]).name for r in first) == ["mine_why.png", "s0.png", "s1.png"]
    assert png_text(folder / "s0_why.png") == dict([explain.OVERLAY_MARK])
    second = why_did_you.main(**run)  # was: UserError "s0_why.png would overwrite the input image"
    assert sorted(Path(r["image"]).name for r in second) == ["mine_why.png", "s0.png", "s1.png"]
    assert "left out 3 overlays this script wrote earlier" in capsys.readouterr().err
    assert all((folder / name).read_bytes() == data for name, data in sketches.items())  # the inputs untouched
    # an overlay named on its own is explained; a folder of nothing but overlays says so
    assert why_did_you.main(**{**run, "image": str(folder / "s0_why.png"), "overlay": ""})[0]["predicted_class"]
    only = tmp_path / "only"
    only.mkdir()
    (only / "a_why.png").write_bytes((folder / "s0_why.png").read_bytes())
    with pytest.raises(UserError, match="only 1 overlay this script wrote"):
        explain_io.image_list(str(only))


def test_an_overlay_never_overwrites_an_input_that_could_not_be_read(ckpts, test_images, tmp_path):
    """A folder's unreadable file is skipped, not explained, but it is still the user's file: an overlay onto it
    (sketch.png's overlay is sketch_why.png) is refused like one onto a readable input."""
    Image.fromarray(test_images[0][0]).save(tmp_path / "sketch.png")
    (tmp_path / "sketch_why.png").write_bytes(b"a PNG cut short by a full disk")
    with pytest.raises(UserError, match=r"sketch_why\.png would overwrite"):
        why_did_you.main(image=str(tmp_path), overlay=f"{tmp_path}/", report_dir=str(tmp_path), device="cpu",
                         fast=True, **ckpts)
    assert (tmp_path / "sketch_why.png").read_bytes() == b"a PNG cut short by a full disk"


def test_png_text_reads_back_what_png_bytes_wrote(tmp_path):
    (tmp_path / "a.png").write_bytes(png_bytes(np.zeros((4, 4), np.uint8), text={"Software": "x", "Note": "y"}))
    assert png_text(tmp_path / "a.png") == {"Software": "x", "Note": "y"}
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "b.jpg")
    (tmp_path / "c.png").write_bytes(b"not a png")
    assert png_text(tmp_path / "b.jpg") == {} and png_text(tmp_path / "c.png") == {}


def test_an_overlay_is_refused_under_any_name_of_an_input(tmp_path):
    sketch = tmp_path / "A.PNG"
    sketch.write_bytes(b"the user's sketch")
    # a case-insensitive volume (macOS, a USB stick) opens a.png as A.PNG, and --overlay=a is saved as a.png:
    # resolve() keeps the two names apart there. A hard link, another name of the same file, stands in for it
    os.link(sketch, tmp_path / "a.png")
    (tmp_path / "link.png").symlink_to(sketch)
    for overlay in (tmp_path / "a", tmp_path / "link.png"):
        with pytest.raises(UserError, match="would overwrite the input image"):
            explain_io.overlay_paths(overlay, [str(sketch)])
    assert explain_io.overlay_paths(tmp_path / "b", [str(sketch)]) == [tmp_path / "b.png"]


def test_a_missing_llm_key_fails_before_any_model_loads(tmp_path, monkeypatch):
    monkeypatch.delenv("REPLICATE_API_TOKEN", raising=False)
    monkeypatch.chdir(tmp_path)  # no ./.env
    # it failed after every image was explained (minutes for a folder), printing none of them
    with pytest.raises(UserError, match="needs REPLICATE_API_TOKEN"):
        why_did_you.main(image="test:0", llm=True, backend="replicate", report_dir=str(tmp_path),
                         classifier_ckpt=str(tmp_path / "missing.pt"), sae_ckpt=str(tmp_path / "missing_sae.pt"))


def test_image_lists_keep_file_names_that_contain_commas(ckpts, test_images, tmp_path):
    comma, plain = tmp_path / "a, b.png", tmp_path / "c.png"
    for path in (comma, plain):
        Image.fromarray(test_images[0][0]).save(path)
    both = [str(comma), str(plain)]
    assert explain_io.image_list(repr(both)) == both  # --image="['a, b.png', 'c.png']"
    assert explain_io.image_list(json.dumps(both)) == both
    assert explain_io.image_list(f"[{comma},{plain}]") == both  # bare list: an existing name stays whole
    assert explain_io.image_list(str(comma)) == [str(comma)]
    nested = tmp_path / "dataset"
    for rel in ("cat/a.png", "cat/deeper/b.png", "dog/c.jpg", ".hidden/d.png", "dog/.e.png", "dog/notes.txt"):
        (nested / rel).parent.mkdir(parents=True, exist_ok=True)
        (nested / rel).write_bytes(b"x")
    assert explain_io.image_list(str(nested)) == [str(nested / r) for r in ("cat/a.png", "cat/deeper/b.png", "dog/c.jpg")]
    # a pattern the shell did not expand ('new_*.png' quoted) read "image not found: .../new_*.png"
    assert explain_io.image_list(str(nested / "*" / "*.png")) == [str(nested / "cat/a.png")]
    assert explain_io.image_list(str(nested / "**" / "[bc].*")) == [str(nested / r) for r in ("cat/deeper/b.png", "dog/c.jpg")]
    with pytest.raises(UserError, match=r"no image file .* matches .*\*\.gif"):
        explain_io.image_list(str(nested / "*.gif"))
    bracketed = tmp_path / "scan[1].png"  # a literal name that looks like a pattern: both readings, in one line
    with pytest.raises(UserError, match=r"matches .*scan\[1\]\.png, and no file has that name$"):
        explain_io.image_list(str(bracketed))
    Image.fromarray(test_images[0][0]).save(bracketed)
    assert explain_io.image_list(str(bracketed)) == [str(bracketed)]  # an existing name is a file, not a pattern
    assert explain_io.image_list(str(nested / "dog" / "*")) == [str(nested / "dog/c.jpg")]  # not notes.txt
    for nothing in ("[]", [], "", "  "):
        with pytest.raises(UserError, match="no image given"):
            explain_io.image_list(nothing)
    out = why_did_you.main(image=repr(both), report_dir=str(tmp_path), device="cpu", json=True, **ckpts)
    assert [rec["image"] for rec in out] == both
    assert why_did_you.main(image=str(comma), report_dir=str(tmp_path), device="cpu", **ckpts)[0]["image"] == str(comma)
    with pytest.raises(UserError, match="file names as strings"):
        explain_io.image_list("[1, 2]")


# ----------------------------------------------------------------------------- CLI (subprocess)
def _cli(ckpts, tmp_path, *args):
    flags = [f"--{k}={v}" for k, v in ckpts.items()] + [f"--report_dir={tmp_path}", "--device=cpu", *args]
    return subprocess.run([sys.executable, str(ROOT / "why_did_you.py"), *flags], cwd=tmp_path, capture_output=True,
                          text=True, env={**os.environ, "OMP_NUM_THREADS": "2"})


CONTRACT = {"image", "predicted_class", "predicted_index", "probability", "top5", "logit", "neurons", "others",
            "bias", "error", "faithfulness", "sentence", "familiarity", "unfamiliar"}


def test_cli_text_output_and_overlay(ckpts, image_dir, tmp_path):
    out = _cli(ckpts, tmp_path, f"--image={image_dir / 'sketch_0.png'}", f"--overlay={tmp_path / 'why.png'}")
    assert out.returncode == 0, out.stderr
    assert "predicted: " in out.stdout and "top-5: " in out.stdout and "evidence: whiting out" in out.stdout
    assert out.stdout.strip().splitlines()[-1].startswith("Predicted ")
    with Image.open(tmp_path / "why.png") as im:
        assert im.format == "PNG" and im.width == 384 and im.height > 384


def test_cli_json_for_a_folder_is_one_line_per_image(ckpts, image_dir, tmp_path):
    out = _cli(ckpts, tmp_path, f"--image={image_dir}", "--json=True", f"--overlay={tmp_path / 'ov.png'}", "--n=3")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 3
    for line, name in zip(lines, sorted(p.name for p in image_dir.iterdir())):
        rec = json.loads(line)
        assert CONTRACT <= set(rec) and rec["image"].endswith(name)
        assert len(rec["top5"]) == 5 and rec["top5"][0]["index"] == rec["predicted_index"]
        assert {"code_cited_drop", "code_random_drop", "input_cited_drop", "input_random_drop", "cam_drop",
                "ink_removed"} <= set(rec["faithfulness"]) and len(rec["neurons"]) <= 3
        assert all({"neuron_id", "concept", "activation", "contribution", "share", "where"} <= set(n)
                   for n in rec["neurons"])
        assert all(isinstance(n["where"], str) and n["where"] for n in rec["neurons"])  # the text's "here:" words
        total = sum(n["contribution"] for n in rec["neurons"]) + rec["others"] + rec["bias"] + rec["error"]
        assert total == pytest.approx(rec["logit"], abs=1e-3)
        assert (tmp_path / f"ov_{name[:-4]}.png").is_file()
        active = rec["top_active"]  # PERCENTILE / AGG: the most active neurons, as top_neuron_ids_for_image
        assert active["agg"] == "max" and len(active["neuron_ids"]) <= why_did_you.TOP_ACTIVE
        assert active["scores"] == sorted(active["scores"], reverse=True)
        assert all(s >= active["threshold"] and s > 0 for s in active["scores"])


def test_bare_image_names_on_the_command_line(ckpts, image_dir, tmp_path):
    names = sorted(str(p) for p in image_dir.iterdir())[:2]
    assert why_did_you.shell_argv(["--json=True", names[0]]) == ["--json=True", f"--image={names[0]}"]
    # both forms: every image, in order (the bare one read "arguments look like --key=value")
    assert why_did_you.shell_argv(["a.png", "--image=b.png"]) == ["--image=['a.png', 'b.png']"]
    assert why_did_you.shell_argv(["--image=b.png", "c.png", "--fast"]) == ["--fast", "--image=['b.png', 'c.png']"]
    assert why_did_you.shell_argv(["--image=[a.png,b.png]", "c.png"]) == ["--image=[a.png,b.png]", "c.png"]  # refused
    assert why_did_you.shell_argv(["--image=[draft].png", "c.png"]) == ["--image=['[draft].png', 'c.png']"]  # a name
    # --image with a space, as argparse scripts take it, read "--image is given twice; give it once"
    assert why_did_you.shell_argv(["--image", "a.png", "--json=True"]) == ["--json=True", "--image=a.png"]
    for value in ("True", "false", "3", "0.5", "yes", "Off"):  # --json True read "True" as an image named True
        assert why_did_you.shell_argv(["a.png", "--json", value]) == [f"--json={value}", "--image=a.png"]
    assert why_did_you.shell_argv(["--fast", "a.png"]) == ["--fast", "--image=a.png"]  # a bare flag, then an image
    assert why_did_you.shell_argv(["--image", "a.png", "b.png"]) == ["--image=['a.png', 'b.png']"]
    out = _cli(ckpts, tmp_path, "--json=True", "--fast=True", *names)
    assert out.returncode == 0, out.stderr
    assert [json.loads(line)["image"] for line in out.stdout.splitlines()] == names
    spaced = _cli(ckpts, tmp_path, names[0], "--json", "True", "--fast", "true")
    assert spaced.returncode == 0 and json.loads(spaced.stdout)["image"] == names[0]  # one image, as JSON
    worded = _cli(ckpts, tmp_path, names[0], "--json", "yes", "--fast=on")  # was "JSON expects True or False"
    assert worded.returncode == 0 and json.loads(worded.stdout)["image"] == names[0]


def test_an_unreadable_file_in_a_folder_is_skipped_named_and_exits_1(ckpts, image_dir, tmp_path):
    """As stage 1 skips a broken file, stage 5 explains the rest of the folder and says which one it skipped."""
    folder = tmp_path / "with_broken"
    folder.mkdir()
    for png in image_dir.iterdir():
        (folder / png.name).write_bytes(png.read_bytes())
    (folder / "sketch_1b.png").write_bytes(b"not a png")
    out = _cli(ckpts, tmp_path, f"--image={folder}", "--json=True", "--fast=True")
    assert out.returncode == 1, out.stderr
    records = [json.loads(line) for line in out.stdout.strip().splitlines()]
    assert [CONTRACT <= set(r) for r in records].count(True) == 3
    assert ["skipped" in r for r in records] == [False, False, True, False]  # at its place (was printed first)
    broken = records[2]
    assert broken["image"].endswith("sketch_1b.png") and "not an image" in broken["skipped"]
    assert "skipped:" in out.stderr
    single = _cli(ckpts, tmp_path, f"--image={folder / 'sketch_1b.png'}")  # one image: a plain error
    assert single.returncode == 2 and "not an image" in single.stderr


def test_cli_warns_about_a_blank_page_and_not_about_a_test_sketch(ckpts, image_dir, tmp_path):
    blank = tmp_path / "blank.png"
    Image.new("L", (256, 256), 255).save(blank)
    out = _cli(ckpts, tmp_path, f"--image=[{blank},{image_dir / 'sketch_0.png'}]", "--json=True")
    assert out.returncode == 0, out.stderr
    records = {json.loads(line)["image"]: json.loads(line) for line in out.stdout.strip().splitlines()}
    assert {name: r["unfamiliar"] for name, r in records.items()} == {str(blank): True, str(image_dir / "sketch_0.png"): False}
    assert "blank page: it has no ink" in records[str(blank)]["sentence"]  # no concepts credited for a guess
    assert "mainly because of" in records[str(image_dir / "sketch_0.png")]["sentence"]
    assert records[str(blank)]["blank"] is True and "blank" not in records[str(image_dir / "sketch_0.png")]
    assert records[str(blank)]["faithfulness"]["input_cited_drop"] is None  # no ink to white out: not run
    text = _cli(ckpts, tmp_path, f"--image={blank}", f"--overlay={tmp_path / 'why.png'}")
    assert "WARNING: unfamiliar input" in text.stdout and "familiarity:" not in text.stdout
    sketch = _cli(ckpts, tmp_path, f"--image={image_dir / 'sketch_0.png'}")  # the verdict is said when it is familiar too
    pct = records[str(image_dir / "sketch_0.png")]["familiarity"]
    assert f"familiarity: more familiar than {pct:.0f}% of validation sketches (flagged under 1%)" in sketch.stdout
    assert "because of: nothing (a blank page has no ink" in text.stdout and "evidence:" not in text.stdout
    assert (tmp_path / "familiarity.json").is_file()  # calibrated once, then reused
    # the overlay agrees with the text: the white page untinted (no concept's heat), no legend rows
    overlay = np.asarray(Image.open(tmp_path / "why.png").convert("RGB"))
    assert (overlay[:384] == 255).all()
    assert overlay.shape[0] == 384 + 2 + 32 + 16 + 8  # the unfamiliar warning and the head line only


@pytest.mark.parametrize("kind", ["missing", "corrupt", "not_an_image"])
def test_cli_bad_input_is_one_line_and_exit_2(ckpts, image_dir, tmp_path, kind):
    path = tmp_path / f"{kind}.png"
    if kind == "corrupt":
        path.write_bytes((image_dir / "sketch_0.png").read_bytes()[:60])  # a truncated PNG
    elif kind == "not_an_image":
        path.write_text("just some text\n")
    out = _cli(ckpts, tmp_path, f"--image={path}", "--json=True")
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.count("\n") == 1 and out.stderr.startswith("why_did_you.py: error:") and kind in out.stderr


def test_overlay_legend_cuts_long_concepts_at_a_word_boundary():
    from PIL import ImageDraw, ImageFont

    draw, font = ImageDraw.Draw(Image.new("RGB", (8, 8))), ImageFont.load_default()
    concept = "offline: circle (train AUROC 1.00), anywhere in the sketch"
    assert explain.fit_text(draw, concept, font, 10_000) == concept
    cut = explain.fit_text(draw, concept, font, draw.textlength(concept, font=font) / 2)
    assert cut.endswith("...") and concept.startswith(cut[:-3])
    assert cut[:-3].split()[-1] in concept.split()      # whole words only, no "the (20%)" mid-phrase
    assert draw.textlength(cut, font=font) <= draw.textlength(concept, font=font) / 2


def test_overlay_outlines_exactly_the_ink_the_input_check_removed(ckpts, test_images, tmp_path):
    image = test_images[0][0]
    checked = explain.explain_images([image], report_dir=str(tmp_path), device="cpu", **ckpts)[0]
    fast = explain.explain_images([image], report_dir=str(tmp_path), device="cpu", input_check=False, **ckpts)[0]
    mask = checked.removed_ink
    assert fast.removed_ink is None and "removed_ink" not in checked.to_dict()
    assert mask.shape == image.shape and (image[mask] < 255).all()       # ink only
    ink = 1.0 - image / 255.0
    assert ink[mask].sum() / ink.sum() == pytest.approx(checked.faithfulness["ink_removed"])
    size = 4 * image.shape[0]
    amber = np.all(np.asarray(explain.render_overlay(image, checked, size=size))[:size] == explain.REMOVED_RGB, -1)
    plain = np.all(np.asarray(explain.render_overlay(image, fast, size=size))[:size] == explain.REMOVED_RGB, -1)
    assert amber.any() and not plain.any()
    ring = explain.outline(mask, size)
    assert (amber == ring).all()                                          # drawn just outside the removed ink
    up = np.kron(mask, np.ones((4, 4), dtype=bool))
    assert not (ring & up).any() and ring.sum() > 0


def test_probabilities_never_read_100_or_0_percent_unless_they_are():
    assert [explain.percent(p) for p in (0.996, 0.9999, 1.0, 0.462, 0.004, 0.0004, 0.0)] == \
        ["99.6%", ">99.9%", "100%", "46%", "0.4%", "<0.1%", "0%"]
    cited = [explain.CitedNeuron(1, "circle", 1.0, 1.0, 1.0, 1.0, np.zeros((2, 2)))]
    assert explain.compose_sentence("triangle", 0.996, cited).startswith("Predicted triangle (99.6%) mainly")


def test_the_sentence_names_a_shared_concept_once_with_the_summed_share():
    def cited(i, concept, share):
        return explain.CitedNeuron(i, concept, 1.0, 1.0, share, share, np.zeros((2, 2)))

    neurons = [cited(95, "circle", 0.20), cited(124, "spokes", 0.09), cited(403, "circle", 0.17), cited(7, "dots", 0.05)]
    assert explain.compose_sentence("wheel", 0.46, neurons) == \
        "Predicted wheel (46%) mainly because of circle (37%, 2 neurons), spokes (9%) and dots (5%)."
    later = neurons + [cited(8, "dots", 0.045)]  # summed, dots (9.5%) overtakes spokes (9%): largest first
    assert explain.compose_sentence("wheel", 0.46, later).endswith("circle (37%, 2 neurons), dots (10%, 2 neurons) "
                                                                   "and spokes (9%).")
    assert explain.compose_sentence("wheel", 0.46, neurons[1:2]) == "Predicted wheel (46%) mainly because of spokes (9%)."


def test_the_sentence_reads_offline_labels_of_one_part_as_one_concept():
    def cited(i, concept, share):
        return explain.CitedNeuron(i, concept, 1.0, 1.0, share, share, np.zeros((2, 2)))

    neurons = [cited(95, "offline: circle (train AUROC 1.00), anywhere in the sketch", 0.20),
               cited(124, "offline: spokes (train AUROC 0.95), lower", 0.09),
               cited(474, "offline: spokes (train AUROC 0.99), anywhere in the sketch", 0.08),
               cited(7, "offline: strokes typical of wheel/bicycle, lower left", 0.05)]
    assert explain.compose_sentence("wheel", 0.46, neurons) == (
        "Predicted wheel (46%) mainly because of circle (20%), spokes (17%, 2 neurons) and strokes typical of "
        "wheel/bicycle (5%) (offline labels, from statistics).")
    model_label = cited(3, "spokes (train AUROC 0.95), lower", 0.1)  # a model's words are kept as given
    assert explain.compose_sentence("wheel", 0.46, [model_label]) == \
        "Predicted wheel (46%) mainly because of spokes (train AUROC 0.95), lower (10%)."
    assert explain.compose_sentence("wheel", 0.46, [model_label, neurons[1]]) == (  # mixed: each offline one marked
        "Predicted wheel (46%) mainly because of spokes (train AUROC 0.95), lower (10%) and spokes* (9%) "
        "(* offline label, from statistics).")
    part = {"parts": {"best_part": "spokes", "auroc": 0.95}, "where": {"description": "upper left, but spread out"}}
    classes = {"clear_classes": ["car (sedan)", "dog, cat"], "where": {"description": "anywhere in the sketch"}}
    for words in range(1, 14):  # MAX_WORDS may cut a label anywhere: the concept stays the same
        assert prompts.concept_name(prompts.offline_label(part, words)) == "spokes"
    from selfexplain.stats import describe_position

    for row, col, spread, diffuse in itertools.product((0.1, 0.5, 0.9), (0.1, 0.5, 0.9), (0.0, 10.0),
                                                       ("all over the sketch", "anywhere in the sketch")):
        where = {"description": describe_position(row, col, spread, diffuse)}  # every place stage 3 can write
        for words in range(3, 16):
            label = prompts.offline_label({"clear_classes": ["cat", "dog"], "where": where}, words)
            assert prompts.concept_name(label) in ("strokes typical of cat/dog", "strokes typical of",
                                                   "strokes typical", "strokes"), (label, words)
        assert prompts.concept_name(prompts.offline_label({**part, "where": where}, 12)) == "spokes"
    assert [prompts.concept_name(prompts.offline_label(classes, w)) for w in (12, 8, 6)] == \
        ["strokes typical of car (sedan)/dog, cat"] * 3


def test_cli_lines_name_offline_concepts_without_their_average_place():
    """The per-neuron lines print where the neuron fired in this sketch ("here:"); an offline
    label's own place words (its average over training images) beside it read as a contradiction
    ("anywhere in the sketch ... here: centre")."""
    heat = np.zeros((4, 4))
    heat[1:3, 1:3] = 1.0
    label = "offline: circle (train AUROC 1.00), anywhere in the sketch"
    name, offline = explain.short_name(label)
    neuron = explain.CitedNeuron(95, label, 1.0, 1.0, 0.6, 0.204, heat, name=name, offline=offline)
    exp = explain.Explanation("x.png", "wheel", 0, 0.9996, [{"class": "wheel", "index": 0, "probability": 0.9996}],
                              2.0, [neuron], 0.5, -0.3, 0.2, {}, "Predicted wheel.")
    text = explain_io.format_text(exp)
    assert "   20.4%  circle (train AUROC 1.00)  [#95, +0.600, here: centre]" in text.splitlines()
    assert "anywhere" not in text and "offline: " not in text
    assert "(names: offline labels, from statistics):" in text
    assert "predicted: wheel (>99.9%)" in text and "wheel >99.9%" in text  # never 100.0% when it is not
    model = explain.replace(neuron, concept="wheel hub", name="wheel hub", offline=False)
    exp.neurons = [model]
    text = explain_io.format_text(exp)
    assert "   20.4%  wheel hub  [#95" in text and "offline" not in text  # a model's label as given
    exp.neurons = [model, neuron]  # mixed (an offline run, then --limit with an LLM): the offline one is starred
    lines = explain_io.format_text(exp).splitlines()
    assert any(line.startswith("   20.4%  wheel hub  [") for line in lines)
    assert any(line.startswith("   20.4%  circle (train AUROC 1.00)*  [") for line in lines)
    assert any(line.endswith("(* offline label, from statistics):") for line in lines)


def test_pictures_in_any_pil_mode_or_array_form_read_like_the_file(tmp_path):
    """CMYK (what PIL opens CMYK JPEGs as), float and integer modes, transparency, and arrays of every
    usual form are the same picture as the PNG file."""
    from PIL import ImageDraw

    picture = Image.new("RGB", (200, 160), "white")
    ImageDraw.Draw(picture).ellipse((40, 30, 160, 130), outline="black", width=6)
    picture.save(tmp_path / "drawn.png")
    expected = explain.to_uint8([tmp_path / "drawn.png"], 64)[0][0]
    grey = np.asarray(picture.convert("L"))
    on_glass = Image.new("RGBA", picture.size, (0, 0, 0, 0))  # ink on a transparent canvas
    on_glass.putalpha(Image.fromarray(255 - grey))
    pil = [picture.convert("CMYK"), picture.convert("F"), Image.fromarray(grey.astype(np.float32) / 255, "F"),
           Image.fromarray(grey.astype(np.int32)), Image.fromarray(grey.astype(np.uint16) * 257),
           picture.convert("L"), on_glass, on_glass.convert("LA")]
    arrays = [np.asarray(picture), grey, grey.astype(np.float32) / 255.0, grey.astype(np.float64), grey[..., None],
              grey.astype(np.uint16) * 257, np.asarray(picture).astype(np.float32) / 255.0, np.asarray(on_glass)]
    batch, names = explain.to_uint8(pil + arrays, 64)
    for k, got in enumerate(batch):
        assert np.abs(got.astype(int) - expected).max() <= 2, k  # rounding of the CMYK and 16-bit round trips
    assert names == ["<PIL image>"] * len(pil) + ["<array>"] * len(arrays)
    _, names = explain.to_uint8(pil[:1] + arrays[:2], 64, first=3)  # in a list of several: named by place
    assert names == ["<PIL image 3>", "<array 4>", "<array 5>"]
    at_size = np.full((64, 64), 255, np.uint8)  # the model's own size: taken as is, like the cache's images
    assert (explain.to_uint8([at_size], 64)[0][0] == at_size).all()
    overshoot = grey.astype(np.float32)
    overshoot[0, 0] = 255.4  # what cubic resampling leaves: still 0-255, not 16 bits
    darkest = np.unravel_index(grey.argmin(), grey.shape)
    assert grey[darkest] == 0
    overshoot[darkest] = -50.0  # ... and below black, as torch's bicubic resize leaves it (clipped)
    unit = overshoot / 255.0    # the same on a 0-1 scale, overshooting 1 and 0 (1.0016, -0.196)
    wide = np.asarray(picture).astype(np.int64) * 257  # 16-bit colour
    batch, _ = explain.to_uint8([overshoot, unit, wide, picture.convert("RGBA").convert("La"),
                                 picture.convert("LAB")], 64)
    for k, got in enumerate(batch):
        assert np.abs(got.astype(int) - expected).max() <= 2, f"extra {k}"
    for bad, message in [(Image.new("L", (0, 0)), "<PIL image>: empty"), (np.zeros((64, 64, 3), bool), "white paper"),
                         (np.zeros((64, 64, 2), np.uint8), "shaped"), (np.full((8, 8), np.nan), "NaN"),
                         (np.full((8, 8), np.inf), "infinite"), (np.full((8, 8), -1), "outside 0-65535"),
                         (np.full((8, 8), 2 ** 32, np.int64), "outside 0-65535"),
                         (np.linspace(-2.1, 2.6, 64, dtype=np.float32).reshape(8, 8), "normalised tensor"),
                         (np.linspace(-1.0, 1.0, 64, dtype=np.float32).reshape(8, 8), "normalised tensor"),
                         (np.zeros((0, 0), np.float32), "<array>: empty")]:
        with pytest.raises(UserError, match=message):
            explain.to_uint8([bad], 64)


def test_notebook_folders_patterns_masks_and_names_of_several_arrays(ckpts, cache_dir, image_dir, tmp_path, capsys):
    """Session 20's notebook nits: a pattern or a folder read as one missing file, an empty list explained
    nothing silently, boolean masks were refused, several arrays were all '<array>', an inverted sketch
    had no hint, and repr(exp) printed ~2,900 characters."""
    kw = dict(report_dir=str(tmp_path), cache_dir=str(cache_dir), device="cpu", familiar=False, **ckpts)
    files = sorted(str(p) for p in image_dir.glob("*.png"))
    assert len(files) >= 2
    by_pattern = why_did_you.explain_images(str(image_dir / "*.png"), **kw)
    by_folder = why_did_you.explain_images([image_dir], **kw)
    assert [e.image for e in by_pattern] == [e.image for e in by_folder] == files
    assert [e.logit for e in by_folder] == pytest.approx([e.logit for e in why_did_you.explain_images(files, **kw)])
    for nothing, says in [([], "no images given"), (str(image_dir / "*.jpg"), "no image file .* matches")]:
        with pytest.raises(UserError, match=says):
            why_did_you.explain_images(nothing, **kw)
    grey = np.asarray(Image.open(files[0]).convert("L").resize((100, 100)))
    ink = grey < 128
    masks = why_did_you.explain_images([ink, ~ink, grey], **kw)  # the more common value is paper, either way
    assert [e.image for e in masks] == ["<array 0>", "<array 1>", "<array 2>"]
    assert masks[0].logit == pytest.approx(masks[1].logit)  # one drawing, either polarity of mask
    capsys.readouterr()
    wide = np.full((100, 200), 255, np.uint8)
    wide[:, 50:150] = grey  # a 2:1 picture: the square's padding is white, the picture itself inverted below
    at_size = np.asarray(Image.fromarray(grey).resize((64, 64)))  # the model's size: taken as is, noted all the same
    why_did_you.explain_images([grey, 255 - grey, 255 - wide, 255 - at_size, ink], **kw)
    notes = [line for line in capsys.readouterr().err.splitlines() if "dark strokes on white paper" in line]
    assert [n.split(" is ")[0] for n in notes] == ["note: <array 1>", "note: <array 2>", "note: <array 3>"]
    assert all("invert it" in n for n in notes)  # the mask <array 4> (True: the ink) gets neither note
    why_did_you.explain_images(~ink, **kw)  # True marks the paper: said, so a filled silhouette read wrong is seen
    assert "is a boolean mask" in capsys.readouterr().err
    filled = np.zeros_like(ink)
    filled[5:95, 5:95] = True  # one frame mostly ink (a filled shape): alone, it would read True as the paper
    stack = why_did_you.explain_images(np.stack([ink, filled, ink]), **kw)
    as_drawn = why_did_you.explain_images([np.where(f, 0, 255).astype(np.uint8) for f in (ink, filled)], **kw)
    assert [e.logit for e in stack[:2]] == pytest.approx([e.logit for e in as_drawn])  # True: the ink, every frame
    as_tensor = torch.from_numpy(np.stack([ink, filled, ink]))[:, None]  # (B, 1, H, W) bool, as a DataLoader gives
    assert [e.logit for e in why_did_you.explain_images(as_tensor, **kw)] == pytest.approx([e.logit for e in stack])
    assert "is a boolean mask" not in capsys.readouterr().err  # the stack is mostly False: no flip to note
    named = why_did_you.explain_images([image_dir, grey], **kw)  # places count in the caller's list, not after a folder
    assert [e.image for e in named] == files + ["<array 1>"]
    with pytest.raises(UserError, match=rf"holds {len(files)} images and explain_image explains one: explain_images"):
        why_did_you.explain_image(str(image_dir / "*.png"), **kw)
    assert why_did_you.explain_image(f"file://{files[0]}", **kw).image == f"file://{files[0]}"
    assert [e.image for e in why_did_you.explain_images(f"file://{image_dir}", **kw)] == files
    exp = masks[2]
    assert len(repr(exp)) < 400 and exp.sentence in repr(exp) and repr(exp).startswith("Explanation(image='<array 2>'")
    page = exp._repr_html_()  # what Jupyter shows: the overlay and the sentence under it
    picture = Image.open(io.BytesIO(base64.b64decode(re.search(r'base64,([^"]+)"', page).group(1))))
    assert picture.size == exp.overlay(explain.NOTEBOOK_OVERLAY).size and html.escape(exp.sentence) in page
    assert replace(exp, sketch=None)._repr_html_() is None  # nothing to draw: the text repr
    blank = why_did_you.explain_image(np.full((64, 64), 255, np.uint8), **kw)
    assert "cited=[])" in repr(blank) and "blank page" in repr(blank)  # as the sentence: no concept explains it


def test_num_threads_is_checked_and_set_before_the_models_run(ckpts, image_dir, tmp_path, monkeypatch):
    """Stage 5 takes NUM_THREADS like stages 1-3 (with both cores busy, one thread answered in 0.78 s against
    3.87 s with torch's default; README)."""
    calls = []
    monkeypatch.setattr(why_did_you, "set_threads", calls.append)  # torch's thread count is process-wide
    run = dict(image=str(image_dir / "sketch_0.png"), report_dir=str(tmp_path), device="cpu", fast=True, **ckpts)
    why_did_you.main(**run, num_threads=1)
    assert calls == [1]
    with pytest.raises(UserError, match="^NUM_THREADS must be >= 0, got -1"):
        why_did_you.main(**run, num_threads=-1)


def test_a_read_only_array_is_explained_without_torchs_writability_warning(ckpts, test_images, tmp_path):
    """A memmap (``np.load(mmap_mode="r")``, the image cache) explains as its writable copy does, and without
    torch's "The given NumPy array is not writable" UserWarning (once per process: so a fresh one, -W error)."""
    np.save(tmp_path / "batch.npy", np.stack(test_images[0][:2]))
    script = f"""
import json, numpy as np
from selfexplain import explain
kw = dict(device="cpu", report_dir={str(tmp_path)!r}, input_check=True, **{ckpts!r})
mapped = np.load({str(tmp_path / "batch.npy")!r}, mmap_mode="r")
assert not mapped.flags.writeable
got = [e.to_dict() | {{"image": ""}} for e in explain.explain_images(mapped, **kw)]
want = [e.to_dict() | {{"image": ""}} for e in explain.explain_images(np.array(mapped), **kw)]
assert json.dumps(got) == json.dumps(want)
"""
    run = subprocess.run([sys.executable, "-W", "error:The given NumPy array is not writable", "-c", script], cwd=ROOT, capture_output=True,
                         text=True, env={**os.environ, "OMP_NUM_THREADS": "2"})
    assert run.returncode == 0, run.stderr[-2000:]


def test_the_code_space_random_baseline_is_the_mean_over_its_random_sets(ckpts, test_images):
    """Mutation-found gap (session 23): the best random set's drop in place of the mean passed, since only
    cited >= random was checked. Each set's drop is its neurons' closed-form contributions (the head is linear)."""
    images, _ = test_images
    models = explain.load_models(ckpts["classifier_ckpt"], ckpts["sae_ckpt"], "cpu")
    analysis = explain.analyse(models, np.stack(images[:4]))
    for b in range(4):
        pred = int(analysis.probs[b].argmax())
        contrib = (analysis.z_mean[b] * models.lens[:, pred]).double()
        active = torch.nonzero(analysis.z_mean[b] > 0).flatten().numpy()
        cited = [int(i) for i in torch.argsort(contrib, descending=True)[:3]]
        out, _ = explain.faithfulness(models, analysis, b, pred, cited, np.random.default_rng(b), n_random=8)
        sets = explain.random_active_sets(active, 3, 8, np.random.default_rng(b))  # the same draws
        per_set = [float(contrib[torch.as_tensor(s)].sum()) for s in sets]
        assert len(set(per_set)) > 1  # the sets differ: mean, max and min tell apart
        assert out["code_random_drop"] == pytest.approx(np.mean(per_set), abs=1e-3)
        assert out["code_cited_drop"] == pytest.approx(float(contrib[cited].sum()), abs=1e-3)
