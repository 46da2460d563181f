"""Stage 3 (sae_summarize.py, selfexplain/summarize.py): exact knockout, outputs, held-out concept measures, errors."""
import dataclasses
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import DEVICE
import sae_summarize
from selfexplain import artifacts, baselines, data, stats, summarize, synthetic
from selfexplain import concept_measures as cm
from selfexplain.errors import UserError
from selfexplain.features import iter_feature_maps
from selfexplain.sae import TopKSAE, logit_lens


def _make_sae(folder: Path, classifier_dir: Path, m: int = 48, k: int = 4, fingerprint: str | None = None,
              dead: int = 0) -> Path:
    """A small SAE with μ, σ from real training tokens (random weights are enough here); its last ``dead``
    latents never fire (a real dictionary has some)."""
    model, ckpt = artifacts.load_classifier(classifier_dir / "best.pt")
    imageset = data.load_dataset(ckpt["dataset"], classifier_dir.parent / "cache_unused")
    idx = ckpt["split"]["train"].numpy()[:64]
    fmap = torch.cat([f for _, f, _ in iter_feature_maps(model, imageset.images, idx, ckpt["preprocess"], "cpu",
                                                         amp="off")])
    tokens = fmap.permute(0, 2, 3, 1).reshape(-1, fmap.shape[1])
    torch.manual_seed(1)
    sae = TopKSAE(fmap.shape[1], m, k)
    sae.mu.copy_(tokens.mean(0))
    sae.sigma.copy_(tokens.std(0).clamp_min(1e-3))
    with torch.no_grad():
        sae.b_d.normal_(0, 0.1)
        sae.b_e[m - dead:] = -1e4
    ckpt_sae = artifacts.sae_checkpoint(sae, classifier_fingerprint=fingerprint or ckpt["fingerprint"],
                                        classifier_path=str(classifier_dir / "best.pt"), config={}, epoch=1,
                                        metrics={}, usage_ema=torch.zeros(m))
    return artifacts.save_checkpoint(ckpt_sae, folder / "best_sae.pt")


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, tiny_classifier, cache_dir):
    folder = tmp_path_factory.mktemp("sae_s3")
    sae_path = _make_sae(folder, tiny_classifier, dead=1)
    # the tiny classifier's dataset cache lives in the session cache dir
    return {"classifier": tiny_classifier / "best.pt", "sae": sae_path, "cache": cache_dir}


@pytest.fixture(scope="module")
def report(tmp_path_factory, pipeline):
    out = tmp_path_factory.mktemp("report")
    return out, _run(pipeline, out, baselines=list(baselines.BASELINES))      # every baseline, NMF included


def test_knockout_equals_forward_pass_without_the_neuron(seed, pipeline):
    """Removing neuron i from the reconstruction moves every logit by exactly −mean_tokens(z_i)·w_i."""
    inputs = summarize.load_inputs(pipeline["classifier"], pipeline["sae"], pipeline["cache"], torch.device("cpu"))
    model, sae = inputs.classifier, inputs.sae
    idx = np.sort(inputs.classifier_ckpt["split"]["train"].numpy()[:6])
    acts = summarize.collect(inputs, idx, batch_size=8, progress=False, cache_mb=64)
    fmap = acts.fmaps
    active = np.argsort(-acts.top_mean.mean(0))[:6]                               # the strongest neurons
    assert acts.top_mean[:, active].max(0).min() > 0  # each knocked-out neuron fires on some image: not 0 == 0
    for dtype, tol in ((torch.float32, 1e-4), (torch.float64, 1e-9)):
        measured, full, codes = _knockout_forward(model, sae, fmap, active, dtype)
        # fp32: the report's own per-image mean codes; fp64: the same quantity in fp64
        codes = acts.top_mean if dtype == torch.float32 else codes
        lens = logit_lens(sae.to(dtype), model.fc.weight.to(dtype)).detach().double().numpy()
        sae.float()
        if dtype == torch.float32:  # the report's own decomposition reproduces the spliced fp32 logits
            assert np.abs(acts.sae_logits - full).max() <= tol * np.abs(full).max()
        for k, i in enumerate(active):
            predicted = -codes[:, i, None] * lens[i][None, :]            # Δ⁻ per image and class
            # fp32 subtracts two logits of size |logit|: that, not the algebra, limits the match
            scale = max(np.abs(predicted).max(), np.abs(full).max() if dtype == torch.float32 else 0.0)
            assert np.abs(measured[k] - predicted).max() <= tol * scale
            assert np.allclose(stats.knockout(codes[:, [i]], lens[[i]]),
                               predicted.mean(0, keepdims=True))


@torch.no_grad()
def _knockout_forward(model, sae, fmap, neurons, dtype):
    """Real forward passes through the SAE reconstruction with each neuron's Top-K entry zeroed."""
    b, c, h, w = fmap.shape
    sae = sae.to(dtype)
    fc = torch.nn.Linear(c, model.fc.out_features).to(dtype)
    fc.load_state_dict(model.fc.state_dict())
    z = sae.encode(sae.map_to_tokens(fmap).to(dtype))                                # (B*T, M) Top-K code

    def logits_from(code):
        recon = sae.unstandardize(sae.decode(code)).reshape(b, h, w, c).permute(0, 3, 1, 2)
        return fc(recon.mean(dim=(2, 3))).double()                                 # = model.head

    full = logits_from(z)
    out = []
    for i in neurons:
        z_off = z.clone()
        z_off[:, i] = 0
        out.append((logits_from(z_off) - full).numpy())
    return out, full.numpy(), z.reshape(b, h * w, -1).mean(1).double().numpy()


def test_top_examples_name_their_own_images(report, pipeline):
    """Each example's image index, class and activation belong together: a shift by one row kept every
    range check (and the wrong classes reach the LLM prompt)."""
    out, _ = report
    inputs = summarize.load_inputs(pipeline["classifier"], pipeline["sae"], pipeline["cache"], DEVICE)
    idx = np.sort(inputs.classifier_ckpt["split"]["train"].numpy())
    acts = summarize.collect(inputs, idx, batch_size=32, progress=False)
    row_of = {int(g): r for r, g in enumerate(idx)}
    names, labels = inputs.imageset.class_names, inputs.imageset.labels
    checked = 0
    for rec in artifacts.read_jsonl(out / "neurons.jsonl"):
        for e in rec["top_examples"]:
            assert e["activation"] == pytest.approx(acts.top_max[row_of[e["image_index"]], rec["neuron_id"]], rel=1e-4)
            assert e["class"] == names[labels[e["image_index"]]]
            checked += 1
    assert checked > 40


def test_where_a_neuron_fires_is_its_activation_weighted_centre(report, pipeline):
    """The records' row/col, recomputed from the codes on the training maps (rows and cols swapped passed)."""
    out, _ = report
    inputs = summarize.load_inputs(pipeline["classifier"], pipeline["sae"], pipeline["cache"], DEVICE)
    idx = np.sort(inputs.classifier_ckpt["split"]["train"].numpy())
    fmap = torch.cat([f.cpu() for _, f, _ in iter_feature_maps(inputs.classifier, inputs.imageset.images, idx,
                                                               inputs.prep, DEVICE, amp="off")])
    h, w = fmap.shape[2:]
    with torch.no_grad():
        z = inputs.sae.cpu().codes_for_map(fmap).double().numpy()           # (N, H*W, M), tokens row-major
    token = np.arange(h * w)
    rows, cols = (token // w + 0.5) / h, (token % w + 0.5) / w
    mass = z.sum((0, 1))
    moved = 0
    for rec in artifacts.read_jsonl(out / "neurons.jsonl"):
        i = rec["neuron_id"]
        if mass[i] > 0:
            want_row, want_col = (z[:, :, i] * rows).sum() / mass[i], (z[:, :, i] * cols).sum() / mass[i]
            assert (rec["where"]["row"], rec["where"]["col"]) == pytest.approx((want_row, want_col), abs=1e-3)
            moved += abs(want_row - want_col) > 0.05
    assert moved > 3  # neurons whose row and col differ: a swap shows


def test_report_files_and_records(report):
    out, summary = report
    records = artifacts.read_jsonl(out / "neurons.jsonl")
    assert len(records) == summary["n_neurons"] == 48
    n_train = summary["concept_measures"]["n_train_images"]     # small data: QUANTILE lowered so 20 sit above τ
    assert n_train * 0.01 < 20 and records[0]["quantile"] == pytest.approx(max(1 - 20 / n_train, 0.8))
    assert summary["config"]["QUANTILE"] == records[0]["quantile"]
    assert artifacts.read_json(out / artifacts.CONFIG)["QUANTILE"] == records[0]["quantile"]
    assert [r["neuron_id"] for r in records] == list(range(48))
    keys = {"neuron_id", "dead", "threshold", "frequency", "token_frequency", "mean_on_activation", "max_activation",
            "score", "top_classes", "anti_classes", "where", "auto_summary", "top_examples", "sprite", "parts"}
    live = [r for r in records if not r["dead"]]
    assert live and all(keys <= set(r) for r in records)
    for r in live:
        assert r["top_examples"] and (out / r["sprite"]).is_file()
        acts = [e["activation"] for e in r["top_examples"]]
        assert acts == sorted(acts, reverse=True) and acts[0] == pytest.approx(r["max_activation"], rel=1e-5)
        assert all((out / e["thumb"]).is_file() for e in r["top_examples"])
        assert {"class", "index", "pmi", "p_class_given_on", "lens", "knockout"} <= set(r["top_classes"][0])
        assert 0 <= r["where"]["row"] <= 1 and r["where"]["description"]
        assert r["auto_summary"].endswith(".")
        top = {c["class"] for c in r["top_classes"]}
        assert all(c["pmi"] < 0 and c["class"] not in top for c in r["anti_classes"])
    for r in records:
        if r["dead"]:
            assert r["top_examples"] == [] and r["sprite"] is None and r["score"] == 0
    scored = [r for r in live if r["score"] > 0]
    assert scored  # some neuron is specific to a class it supports
    for r in scored:  # the score's class is supported: positive lens, negative knockout
        for c in r["top_classes"]:
            if c["class"] == r["score_class"]:
                assert c["lens"] > 0 and c["knockout"] < 0
    assert (out / "index.html").is_file() and (out / "summary.json").is_file()


def _split_scores(inputs, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Per-image max of the SAE code and part presence on one split of the classifier's checkpoint."""
    idx = np.sort(inputs.classifier_ckpt["split"][split].numpy())
    acts = summarize.collect(inputs, idx, batch_size=32, progress=False)
    imageset = inputs.imageset
    return acts.top_max, cm.part_presence([imageset.parts[i] for i in idx], imageset.part_types)


def test_held_out_units_are_chosen_on_train_and_scored_on_test(report, pipeline):
    """Each part's neuron is the best one on the training images; its reported AUROC is measured on the test split."""
    out, summary = report
    inputs = summarize.load_inputs(pipeline["classifier"], pipeline["sae"], pipeline["cache"], DEVICE)
    train_max, train_present = _split_scores(inputs, "train")
    test_max, test_present = _split_scores(inputs, "test")
    measures = summary["concept_measures"]
    assert measures["n_train_images"] == len(train_max) and measures["n_test_images"] == len(test_max)
    train_auc, test_auc = stats.auroc(train_max, train_present), stats.auroc(test_max, test_present)
    sae = measures["codes"]["sae"]
    assert list(sae["per_part"]) == inputs.imageset.part_types
    for j, row in enumerate(sae["per_part"].values()):
        if not np.isfinite(train_auc[j]).any():        # a part absent from the tiny training split
            assert row["test_auroc"] is None
            continue
        assert row["unit"] == np.nanargmax(train_auc[j])
        assert row["train_auroc"] == pytest.approx(np.nanmax(train_auc[j]))
        if np.isfinite(test_auc[j, row["unit"]]):
            assert row["test_auroc"] == pytest.approx(test_auc[j, row["unit"]])
            assert row["test_best_auroc_upper_bound"] == pytest.approx(np.nanmax(test_auc[j]))
    # the test split would pick other neurons for some part: a choice made there would fail the checks above
    chosen = [row["unit"] for row in sae["per_part"].values()]
    assert any(u != np.nanargmax(test_auc[j]) for j, u in enumerate(chosen) if np.isfinite(test_auc[j]).any())
    # the records' part is the neuron's best on the training images, labelled as such
    records = artifacts.read_jsonl(out / "neurons.jsonl")
    best = np.nan_to_num(train_auc, nan=0.5).argmax(0)
    train_idx = np.sort(inputs.classifier_ckpt["split"]["train"].numpy())
    table = summarize.part_table(inputs.imageset)                              # (P, C): which classes hold a part
    holds_part = table[:, inputs.imageset.labels[train_idx]].T                 # (N, P): the image's class holds it
    for r in records:
        if r["neuron_id"] == 47:  # the fixture's dead latent
            assert r["dead"]
        if r["dead"]:  # a constant score ties every part: no part named (it read "circle, AUROC 0.5")
            assert r["parts"]["best_part"] is None and r["parts"]["auroc"] is None
            continue
        assert r["parts"]["split"] == "train" and r["parts"]["best_part"] == inputs.imageset.part_types[best[r["neuron_id"]]]
        assert r["parts"]["auroc"] == pytest.approx(train_auc[best[r["neuron_id"]], r["neuron_id"]], abs=1e-4)
        # ... and its AUROC among training images of classes without that part, where only distractors carry it
        j, others = best[r["neuron_id"]], ~holds_part[:, best[r["neuron_id"]]]
        among = stats.auroc(train_max[others][:, [r["neuron_id"]]], train_present[others, j])[0]
        assert r["parts"]["distractor_auroc"] == (None if np.isnan(among) else pytest.approx(among, abs=1e-4))
        assert 0 <= r["parts"]["n_examples"] <= len(r["top_examples"])  # the pointing share rests on these


def test_summary_holds_every_baseline_with_finite_held_out_figures(report):
    _, summary = report
    measures = summary["concept_measures"]
    codes = measures["codes"]
    assert list(codes) == ["sae", "random_sae", "channels", "pca", "nmf"]
    assert codes["sae"]["n_units"] == codes["random_sae"]["n_units"] == codes["nmf"]["n_units"] == 48
    for key, row in codes.items():
        relative = ("mean_cf_own_drop", "mean_cf_other_drop") if key != "pca" else ()  # PCA: no natural zero
        for name in ("mean_test_auroc", "mean_test_ap", "mean_pointing", "mean_pointing_chance",
                     "mean_class_set_auroc") + relative:
            assert isinstance(row[name], float) and np.isfinite(row[name]), (row["code"], name)
        if key == "pca":
            assert row["mean_cf_own_drop"] is None and row["mean_cf_other_drop"] is None
        assert 0 <= row["mean_test_auroc"] <= 1 and 0 <= row["mean_pointing"] <= 1
    versus = measures["sae_versus_best_baseline"]   # the SAE against the other code strongest on the training split
    others = {k: r for k, r in codes.items() if k != "sae"}
    best = max(others, key=lambda k: others[k]["mean_train_auroc"])
    assert versus["baseline"] == others[best]["code"]
    assert versus["difference"] == pytest.approx(codes["sae"]["mean_test_auroc"] - others[best]["mean_test_auroc"],
                                                 abs=1e-9) and versus["low"] <= versus["high"]
    assert summary["classifier"]["fingerprint"] == summary["sae"]["classifier_fingerprint"]
    assert summary["dead_fraction"] == summary["n_dead"] / summary["n_neurons"]


def test_counterfactual_drops_on_the_test_split(report):
    """Every test image of the tiny set is re-rendered without each part; drops are relative falls, at most 1."""
    _, summary = report
    cf = summary["concept_measures"]["counterfactual"]
    assert cf and cf["test_images"] == summary["concept_measures"]["n_test_images"] and cf["rerenders"] > cf["test_images"]
    for row in summary["concept_measures"]["codes"].values():
        for part in row["per_part"].values():
            for key in ("cf_own_drop", "cf_other_drop"):
                assert part[key] is None or part[key] <= 1.0       # a = a' - a can fall by all of a at most
        assert row["code"] == "PCA" or (row["mean_cf_own_drop"] <= 1.0 and row["mean_cf_other_drop"] <= 1.0)
    # the re-renders reach the codes: a unit chosen for its part falls when that part goes, far more than when
    # another does (the unedited images in their place made every drop 0 and passed the bounds above)
    sae = summary["concept_measures"]["codes"]["sae"]
    assert sae["mean_cf_own_drop"] > sae["mean_cf_other_drop"] + 0.2


@pytest.mark.parametrize("style", synthetic.STYLES)
def test_rerendered_test_images_differ_only_in_the_part_left_out(cache_dir, style):
    spec = data.dataset_spec("synthetic", None, 64, per_class=2, seed=3, style=style)
    imageset = data.load_dataset(spec, cache_dir, progress=False)
    idx = np.arange(len(imageset))
    cf = summarize.rerender_test_images(imageset, idx, 3, seed=0)
    assert cf.n_images == 3 and len(np.unique(cf.row)) == 3
    pen = 4                                                          # a box grown by a stroke width (<= 5% of 64 px)
    for image, r, p in zip(cf.images, cf.row, cf.part):
        original = np.asarray(imageset.images[idx[r]])
        boxes = [rec["box"] for rec in imageset.parts[idx[r]] if rec["part"] == imageset.part_types[p]]
        outside = np.ones(original.shape, bool)
        for x0, y0, x1, y1 in boxes:
            outside[max(y0 - pen, 0):y1 + pen, max(x0 - pen, 0):x1 + pen] = False
        assert np.array_equal(image[outside], original[outside]) and not np.array_equal(image, original)
    changed = dataclasses.replace(imageset, images=np.asarray(imageset.images).copy())
    changed.images[:] = 255                                          # no longer what the generator draws
    assert summarize.rerender_test_images(changed, idx, 3, seed=0) is None


def test_max_per_class_samples_each_class():
    labels = np.repeat(np.arange(3), 10)
    train = np.arange(30)
    picked = summarize.select_images(train, labels, 4, seed=0)
    assert np.bincount(labels[picked]).tolist() == [4, 4, 4] and np.all(np.diff(picked) > 0)
    assert len(summarize.select_images(train, labels, 0, seed=0)) == 30


def test_clear_errors(tmp_path, pipeline, tiny_classifier):
    with pytest.raises(UserError, match="train_sae.py"):
        sae_summarize.main(classifier_ckpt=str(pipeline["classifier"]), sae_ckpt=str(tmp_path / "nope.pt"),
                           cache_dir=str(pipeline["cache"]), out_dir=str(tmp_path / "r"))
    other = _make_sae(tmp_path, tiny_classifier, fingerprint="0123456789abcdef")
    with pytest.raises(UserError, match="trained on classifier"):
        sae_summarize.main(classifier_ckpt=str(pipeline["classifier"]), sae_ckpt=str(other),
                           cache_dir=str(pipeline["cache"]), out_dir=str(tmp_path / "r"))
    with pytest.raises(UserError, match="QUANTILE"):
        sae_summarize.main(quantile=1.5)
    with pytest.raises(UserError, match="PMI_LAMBDA > 0"):  # λ = 0 wrote -Infinity into neurons.jsonl
        sae_summarize.main(pmi_lambda=0.0)


def _run(pipeline, out, **overrides):
    settings = dict(classifier_ckpt=str(pipeline["classifier"]), sae_ckpt=str(pipeline["sae"]),
                    cache_dir=str(pipeline["cache"]), out_dir=str(out), top_examples=3, thumb_size=32, batch_size=32)
    return sae_summarize.main(**{**settings, **overrides})


def test_image_frequency_is_the_share_of_images_where_a_neuron_fires(report, pipeline):
    """`frequency` is capped near 1 - QUANTILE by its definition; `image_frequency` is not."""
    out, summary = report
    records = artifacts.read_jsonl(out / "neurons.jsonl")
    inputs = summarize.load_inputs(pipeline["classifier"], pipeline["sae"], pipeline["cache"], DEVICE)
    idx = np.sort(inputs.classifier_ckpt["split"]["train"].numpy())
    acts = summarize.collect(inputs, idx, batch_size=32, progress=False)
    assert summary["n_images"] == len(idx)
    expected = (acts.top_max > 0).mean(0)
    assert np.allclose([r["image_frequency"] for r in records], expected)
    lens = np.zeros((inputs.sae.n_latents, len(inputs.imageset.class_names)))
    st = summarize.neuron_stats(acts, inputs.imageset.labels[idx], lens, summary["config"]["QUANTILE"])
    assert np.allclose([r["frequency"] for r in records], st.frequency)
    limit = 1 - summary["config"]["QUANTILE"] + 1 / len(idx)        # at most one image of slack from the quantile
    assert max(r["frequency"] for r in records) <= limit < max(r["image_frequency"] for r in records)


def test_records_and_summary_carry_the_sae_fingerprint(report, pipeline):
    out, summary = report
    own = artifacts.tensor_fingerprint(artifacts.load_checkpoint(pipeline["sae"], "sae")["state"])
    assert summary["sae_fingerprint"] == summary["sae"]["fingerprint"] == own
    assert {r["sae_fingerprint"] for r in artifacts.read_jsonl(out / "neurons.jsonl")} == {own}


def _images(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for sub in ("thumbs", "sprites")
            for p in sorted((folder / sub).glob("*"))}


def test_failed_run_keeps_the_previous_atlas_images(report, pipeline, tmp_path, monkeypatch):
    out = tmp_path / "report"
    shutil.copytree(report[0], out)
    (out / "thumbs" / "stale.png").write_bytes(b"left by an older run")
    before, neurons = _images(out), (out / "neurons.jsonl").read_bytes()

    def fail(*args, **kwargs):
        raise RuntimeError("injected failure after rendering")

    with pytest.raises(UserError, match="--overwrite=True"):               # an earlier report is never replaced silently
        _run(pipeline, out, thumb_size=24)
    monkeypatch.setattr("selfexplain.report.neuron_records", fail)
    with pytest.raises(RuntimeError, match="injected"):
        _run(pipeline, out, thumb_size=24, overwrite=True)
    assert _images(out) == before and (out / "neurons.jsonl").read_bytes() == neurons
    assert not [p for p in out.iterdir() if p.name.startswith(".staging")]  # no scratch folder left
    monkeypatch.undo()
    _run(pipeline, out, thumb_size=24, overwrite=True)                     # a good run swaps the new images in
    after = _images(out)
    assert "thumbs/stale.png" not in after and after.keys() == before.keys() - {"thumbs/stale.png"}
    assert all(after[k] != before[k] for k in after)                        # 24 px, not the old 32 px
    assert not [p for p in out.iterdir() if p.name.startswith(".staging")]


def test_a_class_preference_needs_support_not_one_or_two_images():
    """192 images at QUANTILE 0.99 leave 2 per neuron above τ: 2 of 2 in one class is not a clear class."""
    from selfexplain import report

    rec = {"dead": False, "n_on": 2, "image_frequency": 0.4, "where": {"description": "upper left"},
           "top_classes": [{"class": "circle", "pmi": 1.8, "count": 2}], "pushes_toward": {"class": "circle", "lens": 1.0}}
    assert not report.has_clear_class(rec) and "too few images above τ to judge a class (2)" in report.auto_summary(rec)
    rec["top_classes"][0]["count"] = rec["n_on"] = report.MIN_SUPPORT
    assert report.has_clear_class(rec)
    assert f"circle (PMI 1.8, {report.MIN_SUPPORT} of {report.MIN_SUPPORT} images above τ)" in report.auto_summary(rec)
    rec["top_classes"] += [{"class": "square", "pmi": 0.3, "count": 9}, {"class": "cross", "pmi": 0.9, "count": 2}]
    assert report.clear_classes(rec) == ["circle"]  # weak PMI, or too few images: not named beside it


def test_avoided_classes_have_negative_pmi_and_are_never_a_top_class():
    """3 classes: the 3 lowest-PMI classes were all of them, the favourite too ("square PMI +0.93", "not square")."""
    from selfexplain import report

    pmi, lens = np.array([-1.47, -1.47, 0.93]), np.array([-0.2, -0.5, 0.8])
    assert report.avoided_classes(pmi, lens, top=[2], n_anti=3) == [1, 0]   # ties: most negative lens first
    assert report.avoided_classes(pmi, lens, top=[1, 2], n_anti=3) == [0]
    assert report.avoided_classes(np.zeros(3), lens, top=[], n_anti=3) == []   # no preference: nothing avoided
    assert report.avoided_classes(np.array([-3.0, -2.0, -1.0, 0.5]), np.zeros(4), top=[3], n_anti=2) == [0, 1]


def test_quantile_is_lowered_so_that_small_data_keeps_class_statistics():
    """160 training images at QUANTILE 0.99 left ~2 per neuron above τ: no class could ever be clear."""
    assert summarize.effective_quantile(0.99, 160, 20) == pytest.approx(0.875)   # 20 of 160 above τ
    assert summarize.effective_quantile(0.99, 5760, 20) == 0.99                 # the demo: already 57.6
    assert summarize.effective_quantile(0.99, 160, 0) == 0.99                   # MIN_ON_IMAGES=0: kept
    assert summarize.effective_quantile(0.99, 21, 20) == summarize.QUANTILE_FLOOR == 0.8  # not 0.05: "on" stays rare
    assert summarize.effective_quantile(0.7, 160, 20) == 0.7                    # never raised


def test_classes_too_thin_for_a_class_preference_are_named():
    """On 2 classes x 4 training images no neuron can be 'typical of' a class: the log says so, it is not a finding."""
    from selfexplain import report as report_module

    note = report_module.thin_classes_note(np.array([0, 0, 0, 0, 1, 1, 1, 1, 1]), ["hot dog", "café"])
    assert note.startswith("1 of 2 classes have under 5 training images here: hot dog (4);")
    assert report_module.thin_classes_note(np.repeat([0, 1], 5), ["a", "b"]) is None
