"""Input-space evidence: each test can fail when an explanation (or the machinery) is wrong."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from selfexplain import data, evidence, explain, synthetic
from selfexplain.errors import UserError
from selfexplain.model import SketchResNet


# ----------------------------------------------------------------------------- constructed cases (no model)
def two_blocks() -> np.ndarray:
    """A 64 px page with equal ink in the top-left and bottom-right quadrants."""
    image = np.full((64, 64), 255, dtype=np.uint8)
    image[8:24, 8:24] = 0
    image[40:56, 40:56] = 0
    return image


def quadrant_logit(images: np.ndarray) -> np.ndarray:
    """A known classifier: top-left ink counts 3x, bottom-right ink 1x."""
    ink = evidence.ink_of(images)
    return 3 * ink[:, :32, :32].sum((1, 2)) + ink[:, 32:, 32:].sum((1, 2))


def test_ink_mask_covers_the_requested_share_with_the_strongest_pixels():
    image, _ = synthetic.rerender(0, 0, 64, 0)
    maps = np.random.default_rng(0).random((3, 2, 2))
    ink = evidence.ink_of(image)
    ranked = evidence.upsample(evidence.where_map(maps)[None], 64)[0]
    for share in (0.05, 0.2, 0.5):
        mask = evidence.concept_ink_mask(image, maps, share)
        covered = ink[mask].sum() / ink.sum()
        assert share <= covered <= share + ink.max() / ink.sum()  # at most one pixel over
        assert (ink[mask] > 0).all()
        assert ranked[mask].min() >= ranked[~mask & (ink > 0)].max()  # nothing stronger left behind
    assert not evidence.concept_ink_mask(image, np.zeros((0, 2, 2))).any()


def test_where_map_weighs_each_neuron_alike_and_the_overlay_scales_each_map_to_its_peak():
    maps = np.array([[[20.0, 2.0], [0.0, 0.0]], [[0.0, 0.0], [0.0, 1.0]], [[4.0, 0.0], [0.0, 0.0]],
                     np.zeros((2, 2))])
    assert np.allclose(evidence.where_map(maps), [[20 / 22 + 1.0, 2 / 22], [0.0, 1.0]])  # a silent map adds nothing
    assert evidence.peak_normalised(maps).max(0).tolist() == [[1.0, 0.1], [0.0, 1.0]]
    assert evidence.where_map(np.zeros((0, 2, 2))).shape == (2, 2)


def test_shuffled_concept_order_scores_worse_on_deletion_and_insertion():
    image = two_blocks()
    maps = np.array([[[1.0, 0.0], [0.0, 0.0]], [[0.0, 0.0], [0.0, 1.0]]])  # concept 0: top-left, 1: bottom-right
    regions = evidence.concept_regions(image, maps, 0.5)
    cam = np.array([[3.0, 0.0], [0.0, 1.0]])
    rng = np.random.default_rng(0)
    right = evidence.region_curves(image, regions, cam, quadrant_logit, rng)
    wrong = evidence.region_curves(image, regions[::-1], cam, quadrant_logit, rng)
    assert evidence.auc(right.deletion["explanation"]) < evidence.auc(wrong.deletion["explanation"])
    assert evidence.auc(right.insertion["explanation"]) > evidence.auc(wrong.insertion["explanation"])
    # the right order removes the strong block first, as CAM does; random ink does worse
    np.testing.assert_allclose(right.deletion["explanation"], right.deletion["CAM"])
    assert evidence.auc(right.deletion["explanation"]) < evidence.auc(right.deletion["random ink"])
    assert right.deletion["explanation"][-1] == pytest.approx(0.0)
    np.testing.assert_allclose(right.ink["CAM"], right.ink["explanation"], atol=1e-9)


def test_token_weights_follow_the_boxes_or_the_ink():
    boxes = [[4, 4, 28, 28], [36, 36, 60, 60]]                # parts in the top-left and bottom-right cells
    weights = evidence.token_part_weights(boxes, (2, 2), 64)
    np.testing.assert_allclose(weights, [[1, 0, 0, 0], [0, 0, 0, 1]])
    ink = np.zeros((2, 64, 64))
    ink[0, 10:20, 10:20] = 1.0                                # part 0 deep in the top-left cell
    ink[1, 14:18, 30:34] = 1.0                                # part 1 on the border of the two top cells
    by_ink = evidence.token_ink_weights(ink, (2, 2), sigma_cells=0.25)
    assert by_ink[0, 0] > 0.95 and by_ink[1, 1] > 0.95        # each token goes to the ink nearest its centre
    np.testing.assert_allclose(by_ink.sum(0), 1.0)            # every token's evidence is split fully
    assert by_ink[0, 1] > weights[0, 1] == 0                  # the boxes give token 1 nothing of part 0; its ink is near
    assert not evidence.token_ink_weights(np.zeros((1, 64, 64)), (2, 2)).any()   # a blank page belongs to no part
    # a box straddling two cells splits a cell's activation only with boxes that share that cell
    split = evidence.token_part_weights([[0, 0, 64, 16], [0, 0, 16, 16]], (2, 2), 64)
    np.testing.assert_allclose(split[:, 0], [2 / 3, 1 / 3])
    np.testing.assert_allclose(split[:, 1], [1, 0])


class BoxClassifier(torch.nn.Module):
    """A known classifier: one logit, the ink inside each part's box times that part's weight."""

    def __init__(self, weights: np.ndarray):
        super().__init__()
        self.weights = torch.as_tensor(weights, dtype=torch.float32)

    def forward(self, x):
        return (x[:, 0] * self.weights).sum((1, 2))[:, None]


def box_case(origin, part_weights, shift: int = 0):
    """Models, sketch and an explanation of it for :class:`BoxClassifier` (4x4 tokens).

    Neuron k fires on the tokens over part k's ink and contributes exactly what the part
    adds to the logit: the right explanation. ``shift`` moves every neuron's map onto
    another part's ink (contributions unchanged): a wrong explanation.
    """
    image, parts = synthetic.rerender(*origin, 64, 0)
    ink = evidence.ink_of(image)
    weight_image, maps = np.zeros((64, 64)), []
    for k, part in enumerate(parts):
        x0, y0, x1, y1 = part["box"]
        weight_image[y0:y1, x0:x1] = part_weights[k]
        inside = np.zeros((64, 64))
        inside[y0:y1, x0:x1] = ink[y0:y1, x0:x1]
        maps.append(inside.reshape(4, 16, 4, 16).sum((1, 3)).ravel())    # part k's ink per token
    maps = np.array(maps)                                                 # (P, T)
    contribution = maps.sum(1) * part_weights[:len(parts)]                # what each part adds to the logit
    maps = np.roll(maps, shift, axis=0)
    lens = contribution / maps.mean(1)                                    # mean code x lens = contribution
    models = SimpleNamespace(classifier=BoxClassifier(weight_image), classifier_ckpt={"preprocess": {"mean": 0.0, "std": 1.0}},
                             device="cpu", lens=torch.tensor(lens)[:, None])
    values = torch.tensor(maps.T, dtype=torch.float32)[None]              # (1, T, K=P): every neuron at every token
    analysis = SimpleNamespace(logits=models.classifier(torch.as_tensor(ink, dtype=torch.float32)[None, None]),
                               values=values, indices=torch.arange(len(parts)).repeat(16, 1)[None],
                               z_mean=values.mean(1), hw=(4, 4))
    return models, image, analysis


def test_counterfactual_with_the_wrong_part_attributed_does_not_match():
    right, wrong = [], []
    for origin in [(0, 0), (1, 0), (2, 0), (1, 2), (5, 3), (7, 1)]:
        weights = [3.0, 1.0, 2.0, 0.5]
        for shift, out in ((0, right), (1, wrong)):
            models, image, analysis = box_case(origin, weights, shift)
            out += [(r["actual"], r["predicted_ink"], r["predicted_box"])
                    for r in evidence.counterfactuals(models, image, analysis, 0, origin, 0, 0)]
    right, wrong = np.array(right), np.array(wrong)
    for how in (1, 2):                                      # tokens split by the parts' ink, or by their boxes
        assert np.corrcoef(right[:, 0], right[:, how])[0, 1] > 0.9
        assert np.abs(right[:, how] - right[:, 0]).mean() < 0.25 * np.abs(right[:, 0]).mean()
        assert np.corrcoef(wrong[:, 0], wrong[:, how])[0, 1] < 0.6
        assert np.abs(wrong[:, how] - wrong[:, 0]).mean() > 2 * np.abs(right[:, how] - right[:, 0]).mean()


def test_cam_baseline_of_the_counterfactuals_follows_the_map_it_is_given():
    # the box classifier's true CAM (its logit per token, times T) predicts each part's removal;
    # the same map flipped left-right (evidence in the wrong place) does not
    right, wrong = [], []
    for origin in [(0, 0), (1, 0), (2, 0), (1, 2), (5, 3), (7, 1)]:
        models, image, analysis = box_case(origin, [3.0, 1.0, 2.0, 0.5])
        true_cam = (models.classifier.weights.numpy() * evidence.ink_of(image)).reshape(4, 16, 4, 16).sum((1, 3)) * 16
        assert "predicted_cam" not in evidence.counterfactuals(models, image, analysis, 0, origin, 0, 0)[0]
        for cam, out in ((true_cam, right), (true_cam[:, ::-1], wrong)):
            out += [(r["actual"], r["predicted_cam"])
                    for r in evidence.counterfactuals(models, image, analysis, 0, origin, 0, 0, cam=cam)]
    right, wrong = np.array(right), np.array(wrong)
    assert np.corrcoef(right.T)[0, 1] > 0.9
    assert np.corrcoef(wrong.T)[0, 1] < np.corrcoef(right.T)[0, 1] - 0.3



# ----------------------------------------------------------------------------- the tiny trained pipeline
@pytest.fixture(scope="module")
def tiny(tiny_classifier, tiny_sae, cache_dir):
    models = explain.load_models(tiny_classifier / "best.pt", tiny_sae / "best_sae.pt", "cpu")
    spec = models.classifier_ckpt["dataset"]
    imageset = data.load_dataset(spec, cache_dir)
    test = np.sort(np.asarray(models.classifier_ckpt["split"]["test"]))[:12]
    images = np.ascontiguousarray(imageset.images[test])
    return models, images, explain.analyse(models, images), [synthetic.sample_origin(i, spec["per_class"]) for i in test]


def cited_of(models, analysis, b: int, cls: int, n: int = 3) -> list[int]:
    contrib = analysis.z_mean[b] * models.lens[:, cls]
    return [int(i) for i in contrib.argsort(descending=True)[:n] if contrib[i] > 0]


def test_cam_averages_to_the_head_logit(tiny):
    models, images, analysis, _ = tiny
    for b in range(3):
        cams = np.stack([evidence.cam_map(models, analysis, b, c) for c in range(len(models.class_names))])
        np.testing.assert_allclose(cams.mean((1, 2)), analysis.logits[b].numpy(), rtol=1e-4, atol=1e-4)
    # position by position: W_c · A(h, w) + b_c on the classifier's own layer4 map (a transposed CAM kept its mean)
    x = data.model_input(torch.from_numpy(images[:3]), models.classifier_ckpt["preprocess"])
    with torch.no_grad():
        fmap = models.classifier.features(x)
    fc = models.classifier.fc
    for b in range(3):
        for c in range(len(models.class_names)):
            want = torch.einsum("chw,c->hw", fmap[b], fc.weight[c]) + fc.bias[c]
            np.testing.assert_allclose(evidence.cam_map(models, analysis, b, c), want.detach().numpy(), rtol=1e-4,
                                       atol=1e-4)


def test_input_deletion_matches_separate_reruns(tiny):
    models, images, analysis, _ = tiny
    b = 1
    cls = int(analysis.logits[b].argmax())
    cited = cited_of(models, analysis, b, cls)
    active = np.flatnonzero(analysis.z_mean[b].numpy() > 0)
    sets = [active[:len(cited)], active[-len(cited):]]
    logit0 = float(analysis.logits[b, cls])

    def drop(maps, ids=None):
        pixels = None if ids is None else evidence.set_activation_pixels(models, images[b], [ids])[0]
        mask = evidence.concept_ink_mask(images[b], maps, 0.2, pixels)
        return logit0 - evidence.class_scores(models, evidence.delete_ink(images[b], mask[None]), cls)[0][0]

    for pixel in (True, False):
        out = evidence.input_deletion(models, images[b], analysis, b, cited, cls, sets, 0.2, pixel=pixel)
        ids = (lambda s: list(s)) if pixel else (lambda s: None)
        assert out["input_cited_drop"] == pytest.approx(drop(evidence.token_maps(analysis, b, cited), ids(cited)),
                                                        abs=1e-4)
        assert out["cam_drop"] == pytest.approx(drop(evidence.cam_map(models, analysis, b, cls)[None]), abs=1e-4)
        random = np.mean([drop(evidence.token_maps(analysis, b, s), ids(s)) for s in sets])
        assert out["input_random_drop"] == pytest.approx(random, abs=1e-4)
        assert 0.2 <= out["ink_removed"] < 0.22
        assert ("cam_pixels_drop" in out) == pixel
    # CAM under the concepts' pixel rule: its cells times the class logit's gradient x ink, one separate rerun
    cam = evidence.upsample(evidence.cam_map(models, analysis, b, cls)[None], images[b].shape[-1])
    ranked = evidence.pixel_scores(cam, evidence.class_logit_pixels(models, images[b], cls)[None])
    mask = evidence.rank_ink(images[b], ranked, 0.2)
    cam_pixels = logit0 - evidence.class_scores(models, evidence.delete_ink(images[b], mask), cls)[0][0]
    with_pixels = evidence.input_deletion(models, images[b], analysis, b, cited, cls, sets, 0.2, pixel=True)
    assert with_pixels["cam_pixels_drop"] == pytest.approx(cam_pixels, abs=1e-4)


def test_pixel_attribution_finds_the_ink_that_carries_the_neurons(tiny):
    """Whiting out the ink the attribution ranks first lowers the set's activation more than random ink does."""
    models, images, analysis, _ = tiny
    for b in range(4):
        ids = [int(i) for i in analysis.z_mean[b].argsort(descending=True)[:3]]
        pixels = evidence.set_activation_pixels(models, images[b], [ids, [], ids[:1]])
        assert pixels.shape == (3, *images[b].shape) and (pixels >= 0).all()
        assert not pixels[1].any()                                      # an empty set carries nothing
        assert not pixels[0][evidence.ink_of(images[b]) == 0].any()     # paper carries nothing
        rng = np.random.default_rng(b)
        masks = evidence.rank_ink(images[b], np.stack([pixels[0], rng.random(images[b].shape)]), 0.1)
        edited = explain.analyse(models, evidence.delete_ink(images[b], masks))
        summed = edited.z_sum[:, ids].sum(1)
        assert summed[0] < summed[1]                  # the ranked ink carried more of the set than random ink


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU here (bench/gpu_check.sh runs it on one)")


@pytest.mark.parametrize("stride,size,device", [(1, 64, "cpu"), (2, 64, "cpu"), (1, 56, "cpu"),
                                                pytest.param(1, 64, "cuda", marks=CUDA)])
def test_one_traced_forward_gives_autograds_input_gradients_for_many_objectives(stride, size, device, monkeypatch):
    """input_gradients (one forward, transposed convs) against autograd through D copies, on a ResNet whose
    BatchNorms hold non-trivial running statistics; the module's train mode does not change the trace."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # on a GPU: both sides in full fp32
    torch.manual_seed(stride)
    net = SketchResNet(num_classes=5, layer4_stride=stride)
    for bn in (m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)):
        bn.running_mean.uniform_(-0.3, 0.3), bn.running_var.uniform_(0.5, 2.0)
        bn.weight.data.uniform_(0.5, 1.5), bn.bias.data.uniform_(-0.2, 0.2)
    net = net.to(device)
    x = torch.randn(1, 1, size, size, device=device)
    net.train()                                       # the trace reads running statistics in either mode
    fmap, trace = net.traced_features(x)
    net.eval()
    with torch.no_grad():
        np.testing.assert_allclose(fmap.cpu().numpy(), net.features(x).cpu().numpy(), rtol=1e-5, atol=1e-5)
    cotangents = torch.randn(3, *fmap.shape[1:], device=device)
    copies = x.repeat(3, 1, 1, 1).requires_grad_(True)
    want, = torch.autograd.grad((net.features(copies) * cotangents).sum(), copies)
    got = net.input_gradients(trace, cotangents)
    assert got.shape == want.shape and got.device == want.device and want.abs().max() > 0
    np.testing.assert_allclose(got.cpu().numpy(), want.cpu().numpy(), rtol=1e-4, atol=1e-5 * float(want.abs().max()))
    with pytest.raises(ValueError, match="one input"):
        net.traced_features(x.repeat(2, 1, 1, 1))


def test_pixel_attribution_works_inside_inference_mode(tiny):
    models, images, analysis, _ = tiny
    ids = [int(i) for i in analysis.z_mean[0].argsort(descending=True)[:3]]
    expected = evidence.set_activation_pixels(models, images[0], [ids])
    with torch.inference_mode():                      # as a notebook might wrap explain_images
        np.testing.assert_allclose(evidence.set_activation_pixels(models, images[0], [ids]), expected)


def test_pixel_scores_rank_attributed_ink_first_then_by_the_token_map():
    token = np.array([[[1.0, 4.0, 2.0, 3.0]]])               # (1, 1, 4): where the set fires
    pixels = np.array([[[0.0, 0.0, 5.0, 0.0]]])              # only the third pixel carries its code
    scores = evidence.pixel_scores(token, pixels)[0, 0]
    assert list(np.argsort(-scores)) == [2, 1, 3, 0]         # attributed ink, then the rest by the token map
    assert scores[2] == pytest.approx(10.0)                  # the product itself barely moves


def test_class_logit_pixels_rank_the_ink_that_carries_the_logit(tiny):
    models, images, analysis, _ = tiny
    wins = 0
    for b in range(6):
        cls = int(analysis.logits[b].argmax())
        pixels = evidence.class_logit_pixels(models, images[b], cls)
        masks = evidence.rank_ink(images[b], np.stack([pixels, -pixels]), 0.1)   # strongest vs weakest ink
        logits, _ = evidence.class_scores(models, evidence.delete_ink(images[b], masks), cls)
        wins += logits[0] < logits[1]
    assert wins >= 5


def test_counterfactuals_refuse_an_image_that_does_not_rerender(tiny):
    models, images, analysis, origins = tiny
    other = origins[1] if origins[1] != origins[0] else (origins[0][0], origins[0][1] + 1)
    with pytest.raises(UserError, match="re-render"):
        evidence.counterfactuals(models, images[0], analysis, 0, other, models.classifier_ckpt["dataset"]["seed"], 0)
