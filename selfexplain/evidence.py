"""Evidence an explanation can fail: experiments on the input, not on the code.

Zeroing cited neurons in the SAE code lowers the logit by exactly their contributions
(the head is linear and the SAE error is held fixed), so that figure is a consistency
check, true by construction. The experiments here change the *image* and rerun the whole
classifier, so a wrong explanation shows:

* input-space deletion (:func:`input_deletion`): white out the ink where the cited
  concepts fire and measure the predicted class's logit and probability drop; beside it
  the same amount of ink under random active neurons' maps (mean over draws, the same
  rule) and under CAM, the class activation map ``W_c · A(h, w) + b_c`` of the GAP +
  linear head (its mean over tokens is the logit). "Where a set of neurons fires" at
  pixel level (:func:`concept_scores`): their sparse-code token maps, each scaled to
  sum 1, then summed (:func:`where_map`), and upsampled bilinearly, times the ink that carries
  their activation (:func:`set_activation_pixels`: gradient x ink of the set's summed
  code, positive part); ink pixels are ranked by it, the strongest covering ``ink_share``
  of the ink;
* deletion and insertion curves (:func:`region_curves`): remove from the sketch (or add
  back onto a blank page) the cited concepts' ink regions one concept at a time in the
  explanation's order, beside a random order of the same regions, CAM-ranked ink of equal
  amount and random ink of equal amount; :func:`auc` summarises each curve;
* counterfactuals on the synthetic set (:func:`counterfactuals`): re-render a test sketch
  with one part left out and compare the real change of the class logit with the change
  the explanation predicts: minus the contributions (on the original image) of the
  tokens it attributes to that part, each token's evidence split among the parts by their
  ink near it (:func:`token_ink_weights`).

Ink is darkness, ``1 - pixel / 255``; shares of ink are shares of that total, so a faint
anti-aliased pixel counts for little. Model inputs are uint8 ``(S, S)`` sketches; the
``models`` and ``analysis`` arguments are ``explain.Models`` and ``explain.Analysis``
(this module takes them as values and imports nothing from explain, which calls it).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from . import data, synthetic
from .errors import UserError

INK_SHARE = 0.2  # default share of the sketch's ink an input-space check removes
# rank ink by token maps x pixel attribution (True) or by the upsampled token maps alone (False); chosen on the
# validation split (bench/choose_where_map.py): cited / random active 1.67x against 1.34x for the best token-only
# rule (session 9's models; session 8's: 1.69x against 1.43x)
PIXEL_MAPS = True
# counterfactuals: σ of the window, in cells, that splits a token's evidence among the parts' ink (chosen on the
# validation split among 1/16 .. 6/4 of a cell and the boxes: bench/results/explain_notes.md)
INK_SIGMA = 0.25
ORDERS = ("explanation", "random order", "CAM", "random ink")  # the curves region_curves draws


# ----------------------------------------------------------------------------- maps
def token_maps(analysis, b: int, ids: Sequence[int]) -> np.ndarray:
    """Top-K code maps (n, H, W) of neurons ``ids`` on image ``b`` (zero where a neuron is off)."""
    indices, values = analysis.indices[b], analysis.values[b]                  # (T, K)
    wanted = torch.as_tensor(list(ids), dtype=indices.dtype, device=indices.device)
    hit = indices[None] == wanted[:, None, None]                                # (n, T, K)
    return (values[None] * hit).sum(-1).reshape(len(wanted), *analysis.hw).cpu().numpy()


def code_per_token(analysis, b: int) -> torch.Tensor:
    """Image ``b``'s Top-K code as a dense (T, M) tensor."""
    m = int(analysis.z_mean.shape[1])
    zeros = torch.zeros(analysis.values.shape[1], m, dtype=analysis.values.dtype, device=analysis.values.device)
    return zeros.scatter_add(1, analysis.indices[b], analysis.values[b])


@torch.no_grad()
def cam_map(models, analysis, b: int, cls: int) -> np.ndarray:
    """Class activation map (H, W) of class ``cls``: ``W_c · A(h, w) + b_c``.

    ``A = Â + (A − Â)`` is rebuilt from the SAE code and the stored error map, so its mean
    over tokens is the head's logit for ``cls`` (CAM is the head read out per position).
    """
    sae, fc = models.sae, models.classifier.fc
    recon = sae.unstandardize(sae.decode_sparse(analysis.values[b], analysis.indices[b]))        # (T, C)
    fmap = recon + analysis.residual[b].flatten(1).t()
    cam = fmap @ fc.weight[cls].float() + fc.bias[cls].float()
    return cam.reshape(analysis.hw).cpu().numpy()


def upsample(maps: np.ndarray, size: int) -> np.ndarray:
    """Token maps (n, h, w) -> (n, size, size), bilinear (the overlay's interpolation)."""
    low = torch.as_tensor(np.asarray(maps, dtype=np.float32))[:, None]
    return F.interpolate(low, size=(size, size), mode="bilinear", align_corners=False)[:, 0].numpy()


# ----------------------------------------------------------------------------- ink
def ink_of(image_uint8: np.ndarray) -> np.ndarray:
    """Darkness ``1 - pixel / 255`` per pixel (float64, paper 0)."""
    return 1.0 - np.asarray(image_uint8, dtype=np.float64) / 255.0


def rank_ink(image_uint8: np.ndarray, scores: np.ndarray, shares: np.ndarray | float) -> np.ndarray:
    """Boolean masks (D, S, S): per score map, the highest-scoring ink pixels covering a share of the ink.

    Ink pixels are taken in decreasing score (ties in raster order) until their darkness
    reaches ``shares[d]`` of the sketch's total; the pixel that crosses the line is kept,
    so the mask covers at least the share (at most one pixel more).
    """
    scores = np.asarray(scores, dtype=np.float64).reshape(len(scores), -1)
    shares = np.broadcast_to(np.asarray(shares, dtype=np.float64), (len(scores),))
    ink = ink_of(image_uint8).ravel()
    keyed = np.where(ink > 0, scores, -np.inf)
    order = np.argsort(-keyed, axis=1, kind="stable")
    ranked_ink = ink[order]
    before = np.cumsum(ranked_ink, axis=1) - ranked_ink                         # ink taken before this pixel
    take = (before < shares[:, None] * ink.sum()) & (ranked_ink > 0)
    masks = np.zeros_like(take)
    np.put_along_axis(masks, order, take, axis=1)
    return masks.reshape(len(scores), *np.shape(image_uint8))


def peak_normalised(maps: np.ndarray) -> np.ndarray:
    """Token maps (n, h, w), each divided by its own peak (a silent map stays zero)."""
    maps = np.asarray(maps, dtype=np.float64)
    peaks = maps.reshape(len(maps), -1).max(1) if len(maps) else np.zeros(0)
    return maps / np.maximum(peaks, 1e-12)[:, None, None]


def where_map(maps: np.ndarray) -> np.ndarray:
    """One (h, w) "where" of several neurons' token maps (n, h, w): each map scaled to sum 1, then summed.

    Raw activations are not comparable across neurons; scaled by its own mass, each neuron
    says where *its* code sits and weighs as much as the others. Chosen on the validation
    split (``bench/choose_where_map.py``, figures in bench/RESULTS.md) by cited / random
    active among the ways with cited >= 0.95x CAM, times the pixel attribution: on session
    9's models 1.667x against 1.644x for the plain sum (the set's code per token, session
    8's choice at 1.692x against 1.665x on its models), a lead of +0.023 whose paired
    bootstrap interval (+0.005 to +0.041) excludes 0. An all-zero map adds nothing; no maps
    (n = 0) is all zeros.
    """
    maps = np.asarray(maps, dtype=np.float64)
    if not len(maps):
        return np.zeros(maps.shape[1:], dtype=np.float64)
    mass = maps.reshape(len(maps), -1).sum(1)
    return (maps / np.maximum(mass, 1e-12)[:, None, None]).sum(0)


def concept_ink_mask(image_uint8: np.ndarray, maps: np.ndarray, ink_share: float = INK_SHARE,
                     pixels: np.ndarray | None = None) -> np.ndarray:
    """Ink pixels (S, S) to white out: the strongest region of :func:`where_map` covering ``ink_share``.

    Works for any token maps: cited concepts' code maps, random neurons' maps, or CAM as a
    single map (``cam[None]``); ``pixels`` (S, S), when given, multiplies the upsampled map
    (:func:`pixel_scores`, :func:`set_activation_pixels`). No maps (n = 0) selects nothing.
    """
    if len(maps) == 0:
        return np.zeros(np.shape(image_uint8), dtype=bool)
    scores = upsample(where_map(maps)[None], image_uint8.shape[-1])
    return rank_ink(image_uint8, scores if pixels is None else pixel_scores(scores, pixels[None]), ink_share)[0]


def ink_share_of(image_uint8: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """The share of the sketch's ink under each mask (..., S, S)."""
    ink = ink_of(image_uint8)
    return (masks * ink).sum((-2, -1)) / max(ink.sum(), 1e-12)


def delete_ink(image_uint8: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """Copies of the sketch with each mask's pixels set to paper (255): (D, S, S) uint8."""
    return np.where(masks, np.uint8(255), image_uint8[None]).astype(np.uint8)


def insert_ink(image_uint8: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """Blank pages holding only each mask's pixels of the sketch: (D, S, S) uint8."""
    return np.where(masks, image_uint8[None], np.uint8(255)).astype(np.uint8)


# ----------------------------------------------------------------------------- pixel attribution
def ink_attribution(models, image_uint8: np.ndarray, objective: Callable[[torch.Tensor], torch.Tensor],
                    copies: int) -> np.ndarray:
    """Per objective d, the positive part of ``∂objective_d/∂ink × ink`` at each pixel: (D, S, S).

    Whiting out a pixel sets its ink to 0, so ``gradient × ink`` is, to first order, how
    much of objective d its removal takes away. ``objective`` maps the classifier's layer4
    maps of ``copies`` identical copies of the sketch (D, C, H, W) to (D,), objective d
    reading copy d only. One forward of the sketch, autograd through the objectives alone,
    then one batched backward through the classifier for all D
    (:meth:`~selfexplain.model.SketchResNet.input_gradients`: the same gradients as autograd
    on D copies, without their D-copy forward).
    """
    clf, prep = models.classifier, models.classifier_ckpt["preprocess"]
    ink = torch.from_numpy(ink_of(image_uint8).astype(np.float32)).to(models.device)[None, None]
    fmap, trace = clf.traced_features(data.standardise_ink(ink, prep))
    # inference_mode(False): a caller inside torch.inference_mode (a notebook) still gets gradients here
    with torch.inference_mode(False), torch.enable_grad():
        copied = fmap.float().expand(copies, -1, -1, -1).clone().requires_grad_(True)
        grad_map, = torch.autograd.grad(objective(copied).sum(), copied)
    slope = data.standardise_ink(torch.ones(()), prep) - data.standardise_ink(torch.zeros(()), prep)  # ∂x/∂ink
    grad = clf.input_gradients(trace, grad_map.to(fmap.dtype)) * slope
    return (grad * ink).clamp_min(0)[:, 0].cpu().numpy().astype(np.float64)


def set_activation_pixels(models, image_uint8: np.ndarray, neuron_sets: Sequence[Sequence[int]],
                          class_logit: int | None = None) -> np.ndarray:
    """(D, S, S): for each set of neurons, the ink that carries its summed Top-K code (:func:`ink_attribution`).

    The code is the SAE's inference code of every token, summed over the set's neurons and
    the tokens; an empty set carries nothing (all zeros). With ``class_logit``, a last row
    (D+1 in all) holds :func:`class_logit_pixels` of that class, from the same backward pass.
    """
    sae, n_sets = models.sae, len(neuron_sets)
    member = torch.zeros(n_sets, sae.n_latents, device=models.device)
    for d, ids in enumerate(neuron_sets):
        member[d, torch.as_tensor(list(ids), dtype=torch.long)] = 1.0

    def summed_code(fmap: torch.Tensor) -> torch.Tensor:
        b, _, h, w = fmap[:n_sets].shape
        values, indices = sae.encode_topk(sae.map_to_tokens(fmap[:n_sets]))
        values, indices = values.reshape(b, h * w, -1), indices.reshape(b, h * w, -1)
        rows = torch.arange(b, device=fmap.device)[:, None, None]
        code = (values * member[rows, indices]).sum((1, 2))
        return code if class_logit is None else torch.cat([code, models.classifier.head(fmap[n_sets:])[:, class_logit]])

    return ink_attribution(models, image_uint8, summed_code, n_sets + (class_logit is not None))


def class_logit_pixels(models, image_uint8: np.ndarray, cls: int) -> np.ndarray:
    """(S, S): the ink that carries class ``cls``'s logit (gradient × ink, positive part); no concepts.

    A pixel-level class map for scale (``bench_explain``): what the best evidence at pixel
    resolution removes, against which concepts' maps can be read.
    """
    head = lambda fmap: models.classifier.head(fmap)[:, cls]  # noqa: E731
    return ink_attribution(models, image_uint8, head, 1)[0]


def concept_scores(models, image_uint8: np.ndarray, analysis, b: int, neuron_sets: Sequence[Sequence[int]],
                   combine: Callable[[np.ndarray], np.ndarray] | None = None, pixel: bool | None = None,
                   pixels: np.ndarray | None = None) -> np.ndarray:
    """Where each set of neurons fires on image ``b``, at pixel resolution: (D, S, S).

    ``combine`` (:func:`where_map` by default) of the set's token maps, upsampled; with
    ``pixel`` (default :data:`PIXEL_MAPS`), times :func:`set_activation_pixels` (the token
    map says which cells, the gradient which ink inside them; ``pixels`` when the caller
    has them already). An empty set scores zero.
    """
    combine = combine or where_map
    maps = [combine(token_maps(analysis, b, ids)) if len(ids) else np.zeros(analysis.hw) for ids in neuron_sets]
    scores = upsample(np.stack(maps), image_uint8.shape[-1]).astype(np.float64)
    if not (PIXEL_MAPS if pixel is None else pixel):
        return scores
    return pixel_scores(scores, set_activation_pixels(models, image_uint8, neuron_sets) if pixels is None else pixels)


def pixel_scores(token_scores: np.ndarray, pixels: np.ndarray) -> np.ndarray:
    """Upsampled token maps (D, S, S) times pixel attributions (D, S, S), ties broken by the token map.

    Ink the attribution gives nothing (a stroke the set does not use) would otherwise be
    taken in raster order once the attributed ink runs out; a second term, at most 1e-6 of
    the smallest positive product, ranks it by where the set fires instead and never puts
    it before attributed ink.
    """
    product = token_scores * pixels
    positive = product[product > 0]
    scale = positive.min() if positive.size else 1.0
    peak = max(float(np.abs(token_scores).max()), 1e-12)
    return product + 1e-6 * scale * token_scores / peak


# ----------------------------------------------------------------------------- the classifier, rerun
@torch.no_grad()
def class_scores(models, images_uint8: np.ndarray, cls: int) -> tuple[np.ndarray, np.ndarray]:
    """One batched forward of the whole classifier: class ``cls``'s (logits (N,), probabilities (N,))."""
    x = data.model_input(data.uint8_tensor(images_uint8),
                         models.classifier_ckpt["preprocess"], models.device)
    logits = models.classifier(x).float()
    return logits[:, cls].cpu().numpy(), logits.softmax(-1)[:, cls].cpu().numpy()


# ----------------------------------------------------------------------------- input-space deletion
INPUT_CHECK_KEYS = ("input_cited_drop", "input_random_drop", "cam_drop", "cam_pixels_drop", "input_cited_prob_drop",
                    "input_random_prob_drop", "cam_prob_drop", "cam_pixels_prob_drop", "ink_removed")


def input_deletion(models, image_uint8: np.ndarray, analysis, b: int, cited_ids: Sequence[int], cls: int,
                   random_sets: Sequence[Sequence[int]], ink_share: float = INK_SHARE,
                   combine: Callable[[np.ndarray], np.ndarray] | None = None, pixel: bool | None = None,
                   with_mask: bool = False) -> dict | tuple[dict, np.ndarray]:
    """Logit and probability drops of class ``cls`` after whiting out ``ink_share`` of the ink.

    Three ways to choose the ink: where the cited neurons fire (:func:`concept_scores`
    with ``combine`` and ``pixel``: one batched gradient pass for all the sets), where each
    random set of active neurons fires (the same rule; the drop averaged over
    ``random_sets``), and where CAM for ``cls`` is highest (its token map, upsampled); then
    one batched forward of the classifier over every edited sketch.

    Returns the ``faithfulness`` input-space fields (:data:`INPUT_CHECK_KEYS`): ``input_cited_drop``,
    ``input_random_drop``, ``cam_drop`` (logit drops), the same as probability drops
    (``*_prob_drop``) and ``ink_removed`` (share of the ink the cited mask removed); with
    pixel maps, also ``cam_pixels_drop``: CAM's cells times the class logit's gradient x
    ink, the concepts' own rule (``cam_drop`` ranks ink by CAM's cells alone, so at 4x4 it
    is the weaker baseline). With ``with_mask``, also the cited mask itself (S, S) bool.
    """
    size = image_uint8.shape[-1]
    sets = [list(cited_ids)] + [list(s) for s in random_sets]
    pixel = PIXEL_MAPS if pixel is None else pixel
    pixels = set_activation_pixels(models, image_uint8, sets, class_logit=cls) if pixel else None  # one backward
    scores = concept_scores(models, image_uint8, analysis, b, sets, combine, pixel, None if pixels is None else pixels[:-1])
    cam = upsample(cam_map(models, analysis, b, cls)[None], size)
    if pixel:  # CAM given the concepts' own rule: its cells times the ink that carries the class logit
        cam = np.concatenate([cam, pixel_scores(np.clip(cam, 0.0, None), pixels[-1:])])  # cells against: last
    shares = [ink_share if ids else 0.0 for ids in sets] + [ink_share] * len(cam)  # no neurons: no ink
    masks = rank_ink(image_uint8, np.concatenate([scores, cam]), np.array(shares))
    logits, probs = class_scores(models, delete_ink(image_uint8, masks), cls)
    logit0, prob0 = float(analysis.logits[b, cls]), float(analysis.probs[b, cls])
    drop, prob_drop = logit0 - logits, prob0 - probs
    randoms, at_cam = slice(1, len(sets)), len(sets)
    out = {"input_cited_drop": float(drop[0]),
           "input_random_drop": float(drop[randoms].mean()) if random_sets else 0.0,
           "cam_drop": float(drop[at_cam]),
           "input_cited_prob_drop": float(prob_drop[0]),
           "input_random_prob_drop": float(prob_drop[randoms].mean()) if random_sets else 0.0,
           "cam_prob_drop": float(prob_drop[at_cam]),
           "ink_removed": float(ink_share_of(image_uint8, masks[0]))}
    if pixel:
        out |= {"cam_pixels_drop": float(drop[at_cam + 1]), "cam_pixels_prob_drop": float(prob_drop[at_cam + 1])}
    return (out, masks[0]) if with_mask else out


# ----------------------------------------------------------------------------- deletion / insertion curves
@dataclass
class Curves:
    """Per order (see :data:`ORDERS`), the class logit after each step, steps 0..n."""

    deletion: dict[str, np.ndarray]    # sketch with the step's ink removed
    insertion: dict[str, np.ndarray]   # blank page with the step's ink added back
    ink: dict[str, np.ndarray]         # share of the ink removed / added at each step


def concept_regions(image_uint8: np.ndarray, maps: np.ndarray, ink_share: float = INK_SHARE,
                    pixels: np.ndarray | None = None) -> np.ndarray:
    """Each concept's own ink region (n, S, S): the ``ink_share`` of the ink where its map (n, h, w) is strongest.

    ``pixels`` (n, S, S), when given, multiplies each upsampled map (each concept's own
    :func:`set_activation_pixels`), as the input-space check ranks ink.
    """
    scores = upsample(maps, image_uint8.shape[-1])
    return rank_ink(image_uint8, scores if pixels is None else pixel_scores(scores, pixels), ink_share)


def cumulative(regions: np.ndarray, order: Sequence[int]) -> np.ndarray:
    """Step masks (n+1, S, S): nothing, then the union of the first k regions in ``order``."""
    steps = np.zeros((len(order) + 1, *regions.shape[1:]), dtype=bool)
    for k, i in enumerate(order):
        steps[k + 1] = steps[k] | regions[i]
    return steps


def region_curves(image_uint8: np.ndarray, regions: np.ndarray, cam: np.ndarray,
                  logit_fn: Callable[[np.ndarray], np.ndarray], rng: np.random.Generator) -> Curves:
    """Deletion and insertion curves for the cited concepts' ``regions`` (n, S, S), in the explanation's order.

    Beside that order: the same regions in a random order, and at every step the same
    amount of ink chosen by CAM (``cam`` (h, w)) or at random. ``logit_fn`` maps uint8
    sketches (N, S, S) to the class logit (N,); all 4 x 2 x (n+1) sketches go through it once.
    """
    n, size = len(regions), image_uint8.shape[-1]
    steps = {"explanation": cumulative(regions, range(n)), "random order": cumulative(regions, rng.permutation(n))}
    amounts = ink_share_of(image_uint8, steps["explanation"])
    cam_up = np.broadcast_to(upsample(cam[None], size), (n + 1, size, size))
    steps["CAM"] = rank_ink(image_uint8, cam_up, amounts)
    steps["random ink"] = rank_ink(image_uint8, rng.random((n + 1, size, size)), amounts)
    masks = np.concatenate([steps[o] for o in ORDERS])
    logits = logit_fn(np.concatenate([delete_ink(image_uint8, masks), insert_ink(image_uint8, masks)]))
    deletion, insertion = logits[:len(masks)].reshape(len(ORDERS), n + 1), logits[len(masks):].reshape(len(ORDERS), n + 1)
    return Curves({o: deletion[k] for k, o in enumerate(ORDERS)}, {o: insertion[k] for k, o in enumerate(ORDERS)},
                  {o: ink_share_of(image_uint8, steps[o]) for o in ORDERS})


def auc(curve: np.ndarray) -> float:
    """Area under a curve sampled at evenly spaced steps over [0, 1] (trapezoids)."""
    curve = np.asarray(curve, dtype=np.float64)
    if len(curve) < 2:
        return float(curve[0]) if len(curve) else 0.0
    return float(((curve[1:] + curve[:-1]) / 2).mean())


# ----------------------------------------------------------------------------- counterfactuals
def token_part_weights(boxes: Sequence[Sequence[int]], hw: tuple[int, int], image_size: int) -> np.ndarray:
    """(P, T): how each token's activation is split among the parts whose boxes cover its cell.

    A token's cell is its 1/(h·w) patch of the image; it is shared among the boxes in
    proportion to the area of the cell each covers; a cell no box touches belongs to no part.
    """
    h, w = hw
    ys, xs = np.arange(h) * image_size / h, np.arange(w) * image_size / w
    y0, x0 = np.meshgrid(ys, xs, indexing="ij")
    y0, x0 = y0.ravel(), x0.ravel()
    y1, x1 = y0 + image_size / h, x0 + image_size / w
    area = np.zeros((len(boxes), h * w))
    for p, (bx0, by0, bx1, by1) in enumerate(boxes):
        area[p] = (np.clip(np.minimum(x1, bx1) - np.maximum(x0, bx0), 0, None)
                   * np.clip(np.minimum(y1, by1) - np.maximum(y0, by0), 0, None))
    return area / np.maximum(area.sum(0, keepdims=True), 1e-12)


def token_ink_weights(part_ink: np.ndarray, hw: tuple[int, int], sigma_cells: float = INK_SIGMA) -> np.ndarray:
    """(P, T): how each token's evidence is split among the parts by their ink near the token.

    Each part's ink (``part_ink``, (P, S, S)) is weighed by a Gaussian around the token's cell
    centre (σ = ``sigma_cells`` of a cell); token t's share for part k is part k's weighed ink
    over all parts' (a token with no part's ink near it belongs to none). Unlike
    :func:`token_part_weights` it follows the strokes, not the boxes, and lets a token near a
    cell border share its evidence with the part across it.
    """
    h, w = hw
    size = part_ink.shape[-1]
    pixels = np.arange(size) + 0.5

    def window(n: int) -> np.ndarray:                                        # (n, S): cells along one axis
        centres = (np.arange(n) + 0.5) * size / n
        return np.exp(-0.5 * ((pixels[None] - centres[:, None]) / (sigma_cells * size / n)) ** 2)

    mass = np.einsum("pyx,hy,wx->phw", np.asarray(part_ink, dtype=np.float64), window(h), window(w))
    mass = mass.reshape(len(part_ink), h * w)
    total = mass.sum(0, keepdims=True)
    return np.where(total > 1e-6, mass / np.maximum(total, 1e-12), 0.0)


def counterfactuals(models, image_uint8: np.ndarray, analysis, b: int, origin: tuple[int, int], seed: int, cls: int,
                    best_part: dict[int, str] | None = None, cam: np.ndarray | None = None) -> list[dict]:
    """Re-render a synthetic sketch without each of its parts; actual vs predicted change of ``cls``'s logit.

    The explanation's prediction for part k is minus the contributions (on the original
    image, every active neuron) of the neurons it attributes to the part:

    * ``predicted_ink``: each token's contribution split among the parts by their ink near
      it (:func:`token_ink_weights`; each part's ink is the full sketch's less the re-render's
      without it): the code's own "where" at stroke level, no labels used;
    * ``predicted_box``: the same split by how much of the token's cell each part's box
      covers (:func:`token_part_weights`);
    * ``predicted_best_part`` (with ``best_part``, stage 3's ``{neuron_id: best part}``):
      the whole contribution of the neurons whose best-matching part type is the part's;
    * ``predicted_cam`` (with ``cam``: :func:`cam_map` of ``cls`` on the image less the head's
      bias ``b_c``, which no ink carries), the baseline without concepts: CAM's share of the
      logit split as ``predicted_ink`` splits the concepts' (the logit is CAM's mean over tokens).

    Returns one dict per part: ``part``, ``distractor``, ``actual``, ``predicted_ink``,
    ``predicted_box`` and, with ``best_part`` / ``cam``, ``predicted_best_part`` /
    ``predicted_cam``. A sketch that does not re-render byte-identically (another generator
    version) is a :class:`UserError`.
    """
    size = image_uint8.shape[-1]
    style = synthetic.spec_style(models.classifier_ckpt.get("dataset", {}))  # the style the sketch was drawn in
    full, parts = synthetic.rerender(*origin, size, seed, style=style)
    if not np.array_equal(full, image_uint8):
        raise UserError(f"synthetic sample {origin} does not re-render identically: rebuild the cache for this generator")
    removed = np.stack([synthetic.rerender(*origin, size, seed, omit=k, style=style)[0] for k in range(len(parts))])
    actual = class_scores(models, removed, cls)[0] - float(analysis.logits[b, cls])
    code = code_per_token(analysis, b).double().cpu().numpy()                        # (T, M)
    lens = models.lens[:, cls].double().cpu().numpy()                                # (M,) per unit of mean code
    tokens = code @ lens / len(code)                                                  # (T,) each token's contribution
    part_ink = np.clip(ink_of(full)[None] - ink_of(removed), 0.0, None)              # (P, S, S)
    weights = {"ink": token_ink_weights(part_ink, analysis.hw),
               "box": token_part_weights([p["box"] for p in parts], analysis.hw, size)}   # (P, T) each
    if cam is not None and np.size(cam) != len(tokens):
        raise UserError(f"cam has {np.size(cam)} cells, the token map {len(tokens)}")
    out = []
    for k, part in enumerate(parts):
        row = {"part": part["part"], "distractor": bool(part["distractor"]), "actual": float(actual[k]),
               **{f"predicted_{how}": float(-(w[k] @ tokens)) for how, w in weights.items()}}
        if cam is not None:
            row["predicted_cam"] = float(-(weights["ink"][k] @ np.ravel(cam)) / len(tokens))
        if best_part is not None:
            ids = [i for i, p in best_part.items() if p == part["part"]]
            row["predicted_best_part"] = float(-(code.mean(0)[ids] @ lens[ids]))
        out.append(row)
    return out
