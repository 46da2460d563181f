"""Stage 3's analysis: what every SAE neuron does on the images the classifier was trained on.

The pipeline, each step returning a typed record the next one (and ``report.py``) consumes:

* :func:`load_inputs` -> :class:`Inputs`: classifier, SAE (checked to belong together), dataset;
* :func:`collect` -> :class:`Activations`: one pass, per-image max/mean codes, logits, positions;
* :func:`neuron_stats` -> :class:`NeuronStats`: thresholds, frequencies, PMI, lens, knockout, score;
* :func:`find_examples` -> :class:`Examples`: each neuron's strongest images and their token maps;
* on data with ground-truth parts (the synthetic set), :func:`held_out_measures` ->
  :class:`HeldOut`: per part type, the unit of each code (the SAE and, optionally, its
  baselines) chosen on the summarised training images and scored on the classifier's test
  split (AUROC, AP, class confound, pointing game, counterfactual drops on re-renders from
  :func:`rerender_test_images`; the measures are ``concept_measures.py``'s), and
  :func:`neuron_parts` -> :class:`NeuronParts`: each neuron's best part on the training split;
* :func:`summary_metrics`: the ``summary.json`` object.

Memory stays O(N·M): pass 1 keeps per-image reductions only, pass 2 recomputes token maps
for the example images alone, the held-out pass keeps per-image maxima and the chosen
units' token maps.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from . import artifacts, data, stats, synthetic
from . import concept_measures as cm
from .baselines import CodeProvider
from .errors import UserError
from .features import iter_feature_maps
from .logs import log
from .sae import TopKSAE, bias_logits, logit_lens, tokens_of


# ----------------------------------------------------------------------------- inputs
@dataclass
class Inputs:
    """Everything stage 3 reads: the models, their checkpoints and the classifier's dataset."""
    classifier: torch.nn.Module
    classifier_ckpt: dict
    classifier_path: str
    sae: TopKSAE
    sae_ckpt: dict
    sae_path: str
    sae_fingerprint: str        # the SAE's own fingerprint (verified on load), carried by every stage-3 record
    imageset: data.ImageSet
    device: torch.device

    @property
    def prep(self) -> dict:
        return self.classifier_ckpt["preprocess"]


def load_inputs(classifier_path: str, sae_path: str, cache_dir: str, device: torch.device,
                channels_last: bool = True, data_root: str = "") -> Inputs:
    """Load the classifier, the SAE trained on it (else a UserError) and the classifier's dataset
    (from ``data_root`` when it moved: :func:`data.relocate`)."""
    model, ckpt = artifacts.load_classifier(classifier_path, device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    sae, sae_ckpt = artifacts.load_sae(sae_path, ckpt, device)
    ckpt["dataset"] = data.relocate(ckpt["dataset"], data_root)
    imageset = data.load_dataset(ckpt["dataset"], cache_dir)
    return Inputs(model, ckpt, str(classifier_path), sae, sae_ckpt, str(sae_path), sae_ckpt["fingerprint"], imageset,
                  device)


def select_images(train: np.ndarray, labels: np.ndarray, max_per_class: int, seed: int) -> np.ndarray:
    """Sorted training indices, at most ``max_per_class`` per class (0 = all), drawn at random."""
    if max_per_class <= 0:
        return np.sort(train)
    rng = np.random.default_rng(seed)
    keep = [rng.permutation(train[labels[train] == c])[:max_per_class] for c in np.unique(labels[train])]
    return np.sort(np.concatenate(keep))


# ----------------------------------------------------------------------------- pass 1
@dataclass
class Activations:
    """Per-image reductions of the SAE code over one pass, rows aligned with the sorted indices."""
    top_max: np.ndarray         # (N, M) per-image max over tokens of the Top-K code (what the SAE uses)
    top_mean: np.ndarray        # (N, M) per-image mean over tokens of the Top-K code
    dense_max: np.ndarray       # (N, M) per-image max of the dense ReLU code
    logits: np.ndarray          # (N, classes) the classifier's logits
    sae_logits: np.ndarray      # (N, classes) Σ_i mean code · lens + bias: the decomposition without ε
    tokens_active: np.ndarray   # (M,) tokens where the Top-K code is > 0
    n_tokens: int
    grid: tuple[int, int]       # (H, W) of the layer4 map
    position_sums: dict         # w, r, c, rr, cc (M,): see stats.weighted_position
    fmaps: torch.Tensor | None  # (N, C, H, W) layer4 maps on the CPU when they fit the cache budget


@torch.no_grad()
def collect(inputs: Inputs, indices: np.ndarray, batch_size: int = 128, amp: str = "off", cache_mb: float = 0,
            progress: bool = True) -> Activations:
    """One pass over ``indices`` (sorted): per-image codes, logits, token counts, position moments.

    The layer4 maps are kept on the CPU while they fit in ``cache_mb`` MiB, so pass 2 can skip
    the backbone.
    """
    sae, model, device = inputs.sae, inputs.classifier, inputs.device
    lens = logit_lens(sae, model.fc.weight)
    bias = bias_logits(sae, model.fc.weight, model.fc.bias)
    out = {k: [] for k in ("top_max", "top_mean", "dense_max", "logits", "sae_logits")}
    moments = {k: torch.zeros(sae.n_latents, dtype=torch.float64, device=device) for k in ("w", "r", "c", "rr", "cc")}
    active = torch.zeros(sae.n_latents, dtype=torch.float64, device=device)
    n_tokens, grid, fmaps = 0, None, []
    for _, fmap, logits in iter_feature_maps(model, inputs.imageset.images, indices, inputs.prep, device,
                                             batch_size, amp, progress, desc="pass 1: codes"):
        grid = tuple(fmap.shape[2:])
        if fmaps is not None and len(indices) * fmap[0].numel() * 4 <= cache_mb * 2 ** 20:
            fmaps.append(fmap.cpu())
        else:
            fmaps = None
        rows, cols = (torch.as_tensor(a, device=device, dtype=torch.float32) for a in stats.token_grid(*grid))
        z = sae.codes_for_map(fmap)                                           # (B, T, M) Top-K
        z_mean = z.mean(1)
        for key, value in (("top_max", z.amax(1)), ("top_mean", z_mean),
                           ("dense_max", sae.codes_for_map(fmap, dense=True).amax(1)),
                           ("logits", logits), ("sae_logits", z_mean @ lens + bias)):
            out[key].append(value.float().cpu().numpy())
        zs = z.sum(0)                                                         # (T, M)
        for key, weight in (("w", torch.ones_like(rows)), ("r", rows), ("c", cols), ("rr", rows ** 2),
                            ("cc", cols ** 2)):
            moments[key] += (weight @ zs).double()
        active += (z > 0).sum((0, 1)).double()
        n_tokens += z.shape[0] * z.shape[1]
    if grid is None:
        raise UserError("no images to summarise (empty training split?)")
    return Activations(**{k: np.concatenate(v) for k, v in out.items()},
                       tokens_active=active.cpu().numpy(), n_tokens=n_tokens, grid=grid,
                       position_sums={k: v.cpu().numpy() for k, v in moments.items()},
                       fmaps=torch.cat(fmaps) if fmaps else None)


# ----------------------------------------------------------------------------- statistics
@dataclass
class NeuronStats:
    """Per-neuron statistics: (M,) vectors and (M, classes) tables (see stats.py for the maths)."""
    quantile: float                # the QUANTILE that defines tau
    tau: np.ndarray                # threshold: QUANTILE of the per-image max
    on: np.ndarray                 # (N, M) bool: per-image max above tau
    dead: np.ndarray               # never active in the Top-K code
    frequency: np.ndarray          # share of images where the neuron is "on" (~1 - QUANTILE by definition, +1 image)
    image_frequency: np.ndarray    # share of images where it fires at all (max Top-K code > 0)
    token_frequency: np.ndarray    # share of tokens where it is in the Top-K
    dense_frequency: np.ndarray    # share of images where its dense ReLU code is > 0
    mean_on_activation: np.ndarray
    max_activation: np.ndarray
    pmi: np.ndarray                # (M, C)
    counts: np.ndarray             # (M, C) "on" images per class
    p_class_given_on: np.ndarray   # (M, C)
    lens: np.ndarray               # (M, C) logit lens w_i
    knockout: np.ndarray           # (M, C) Δ⁻ averaged over "on" images
    score: np.ndarray              # ranking score (0 for dead neurons)
    best_class: np.ndarray         # class attaining the score, -1 where it is 0
    position: dict                 # row, col, spread (M,)


QUANTILE_FLOOR = 0.8  # the lowest QUANTILE small data lowers it to: "on" stays the top fifth at most


def effective_quantile(quantile: float, n_images: int, min_on: int) -> float:
    """QUANTILE, lowered where it would leave fewer than ``min_on`` of ``n_images`` above τ.

    On 160 training images the default 0.99 left ~2 images above each neuron's threshold, so
    no neuron could show a class preference (it needs report.MIN_SUPPORT images of one class)
    and every offline label read "no clear class preference". Never below ``QUANTILE_FLOOR``:
    "on" must still mean strongly on (21 images would otherwise give 0.05, nearly all on).
    ``min_on`` = 0 keeps QUANTILE.
    """
    if min_on <= 0:
        return quantile
    return min(quantile, max(1.0 - min_on / n_images, QUANTILE_FLOOR))


def neuron_stats(acts: Activations, labels: np.ndarray, lens: np.ndarray, quantile: float = 0.99,
                 pmi_lambda: float = 1.0) -> NeuronStats:
    """Every per-neuron statistic of the atlas from one pass's activations and the logit lens (M, C)."""
    n_classes = lens.shape[1]
    top_max = acts.top_max
    tau = stats.thresholds(top_max, quantile)
    on = stats.on_mask(top_max, tau)
    n_on = on.sum(0)
    pmi = stats.pmi(on, labels, n_classes, pmi_lambda)
    ko = stats.knockout(acts.top_mean, lens, on)
    score, best = stats.ranking_score(pmi, ko)
    dead = top_max.max(0) <= 0
    score[dead] = 0.0
    return NeuronStats(
        quantile=float(quantile), tau=tau, on=on, dead=dead, frequency=n_on / len(labels), image_frequency=(top_max > 0).mean(0),
        token_frequency=acts.tokens_active / acts.n_tokens, dense_frequency=(acts.dense_max > 0).mean(0),
        mean_on_activation=np.where(on, top_max, 0.0).sum(0) / np.maximum(n_on, 1),
        max_activation=top_max.max(0), pmi=pmi,
        counts=stats.class_counts(on, labels, n_classes),
        p_class_given_on=stats.p_class_given_on(on, labels, n_classes, pmi_lambda), lens=lens, knockout=ko,
        score=score, best_class=best, position=stats.weighted_position(acts.position_sums))


# ----------------------------------------------------------------------------- pass 2
@dataclass
class Examples:
    """Each neuron's strongest images: rows into the summarised indices and their token maps."""
    rows: np.ndarray    # (M, E) rows, -1 where the neuron has fewer than E images it fires on
    values: np.ndarray  # (M, E) per-image max activation (0 where none)
    maps: np.ndarray    # (M, E, T) Top-K token maps, T = H*W (0 where none)


def top_examples(top_max: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Per neuron, rows of its ``n`` strongest images: (M, n) rows (-1 = none) and activations."""
    n = min(n, top_max.shape[0])
    values, rows = torch.from_numpy(np.ascontiguousarray(top_max.T)).topk(n, dim=1)
    values, rows = values.numpy(), rows.numpy()
    rows = np.where(values > 0, rows, -1)  # an image where the neuron is silent is no example
    return rows, np.where(rows >= 0, values, 0.0)


def find_examples(inputs: Inputs, acts: Activations, indices: np.ndarray, n: int, batch_size: int = 128,
                  amp: str = "off", progress: bool = True) -> Examples:
    """Top ``n`` examples per neuron with their token maps (from the cached maps when ``acts`` has them)."""
    rows, values = top_examples(acts.top_max, n)
    return Examples(rows, values, example_token_maps(inputs, indices, rows, acts.fmaps, batch_size, amp, progress))


@torch.no_grad()
def example_token_maps(inputs: Inputs, indices: np.ndarray, rows: np.ndarray, fmaps: torch.Tensor | None = None,
                       batch_size: int = 128, amp: str = "off", progress: bool = True) -> np.ndarray:
    """Top-K token maps of each neuron on its example images: (M, E, T) float32 (0 where none).

    Uses the layer4 maps ``fmaps`` (aligned with ``indices``) when given, else runs the
    backbone again on the example images only.
    """
    m, e = rows.shape
    needed = np.unique(rows[rows >= 0])
    maps = np.zeros((m, e, 0), dtype=np.float32)
    neuron_of, slot_of = np.nonzero(rows >= 0)
    pair_rows = rows[neuron_of, slot_of]
    source = feature_batches(inputs, inputs.imageset.images, indices[needed],
                             None if fmaps is None else fmaps[needed], batch_size, amp, progress, "pass 2: examples")
    for batch_idx, fmap in source:
        z = inputs.sae.codes_for_map(fmap)                                    # (B, T, M)
        if maps.shape[2] == 0:
            maps = np.zeros((m, e, z.shape[1]), dtype=np.float32)
        batch_rows = np.searchsorted(indices, batch_idx)                      # rows of this batch
        hit = np.isin(pair_rows, batch_rows)
        sel = torch.as_tensor(np.searchsorted(batch_rows, pair_rows[hit]), device=z.device)
        neurons = torch.as_tensor(neuron_of[hit], device=z.device)
        maps[neuron_of[hit], slot_of[hit]] = z[sel, :, neurons].float().cpu().numpy()
    return maps


# ----------------------------------------------------------------------------- held-out concept measures
def feature_batches(inputs: Inputs, images: np.ndarray, indices: np.ndarray, fmaps: torch.Tensor | None = None,
                    batch_size: int = 128, amp: str = "off", progress: bool = True,
                    desc: str = "features") -> Iterator[tuple[np.ndarray, torch.Tensor]]:
    """Yield (indices, layer4 maps on the device) over sorted ``indices`` of ``images``.

    Sliced from ``fmaps`` (rows aligned with ``indices``) when given, else from the backbone.
    """
    if fmaps is not None:
        for i in range(0, len(indices), batch_size):
            yield indices[i:i + batch_size], fmaps[i:i + batch_size].to(inputs.device)
        return
    for idx, fmap, _ in iter_feature_maps(inputs.classifier, images, indices, inputs.prep, inputs.device, batch_size,
                                          amp, progress, desc=desc):
        yield idx, fmap


def part_table(imageset: data.ImageSet) -> np.ndarray:
    """(P, C) bool: which part types are each class's own parts, read off the whole dataset."""
    return cm.class_parts(imageset.parts, imageset.labels, imageset.part_types, len(imageset.class_names))


def part_ground_truth(imageset: data.ImageSet, indices: np.ndarray, grid: tuple[int, int]) -> cm.PartTruth:
    """Part presence, the class-part table and the token-in-box masks of the images at ``indices``."""
    return cm.part_truth([imageset.parts[i] for i in indices], imageset.labels[indices], imageset.part_types,
                         part_table(imageset), grid, imageset.spec["image_size"])


@dataclass
class Rerenders:
    """Test images re-rendered with exactly one part left out: the counterfactuals."""
    images: np.ndarray   # (R, S, S) uint8
    row: np.ndarray      # (R,) row, in the test indices, of the image each re-render comes from
    part: np.ndarray     # (R,) index of the part type left out
    n_images: int        # test images re-rendered


def rerender_test_images(imageset: data.ImageSet, test_idx: np.ndarray, n_images: int, seed: int) -> Rerenders | None:
    """Re-render ``n_images`` test images (drawn at random) once per part, that part left out.

    None, with one log line, when ``synthetic.rerender`` no longer reproduces the cached
    images (the drawing changed): a re-render would then differ in more than the part.
    """
    spec, rng = imageset.spec, np.random.default_rng(seed)
    draw = dict(image_size=spec["image_size"], seed=spec["seed"], style=synthetic.spec_style(spec))
    rows = np.sort(rng.permutation(len(test_idx))[:n_images])
    index = {p: j for j, p in enumerate(imageset.part_types)}
    images, image_row, part = [], [], []
    for r in rows:
        c, j = imageset.origins[test_idx[r]]
        if not np.array_equal(synthetic.rerender(c, j, **draw)[0], imageset.images[test_idx[r]]):
            log("counterfactuals skipped: synthetic.rerender no longer reproduces the cached test images")
            return None
        for k, record in enumerate(imageset.parts[test_idx[r]]):
            images.append(synthetic.rerender(c, j, omit=k, **draw)[0])
            image_row.append(r)
            part.append(index[record["part"]])
    if not images:
        return None
    return Rerenders(np.stack(images), np.array(image_row), np.array(part), len(rows))


def training_tokens(inputs: Inputs, acts: Activations, indices: np.ndarray, n_tokens: int, seed: int,
                    batch_size: int = 128, amp: str = "off") -> torch.Tensor:
    """Raw layer4 tokens (about ``n_tokens``) of training images drawn at random: what PCA and NMF fit on."""
    per_image = acts.grid[0] * acts.grid[1]
    rows = np.sort(np.random.default_rng(seed).permutation(len(indices))[:max(1, -(-n_tokens // per_image))])
    fmaps = None if acts.fmaps is None else acts.fmaps[rows]
    return torch.cat([tokens_of(fmap) for _, fmap in feature_batches(inputs, inputs.imageset.images, indices[rows],
                                                                      fmaps, batch_size, amp, progress=False)])


@torch.no_grad()
def code_maxima(codes: dict[str, CodeProvider], batches, units: dict[str, np.ndarray] | None = None
                ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """One stream of layer4 maps through every code.

    Parameters
    ----------
    codes : code providers by key. batches : iterable of (indices, layer4 map (B, C, H, W)).
    units : per code key, (P,) units whose token maps to keep.

    Returns
    -------
    (per code, per-image max over tokens (N, U); per code in ``units``, those units' maps (N, P, T)).
    """
    units = units or {}
    maxima, maps = {k: [] for k in codes}, {k: [] for k in units}
    for _, fmap in batches:
        for key, code in codes.items():
            z = code.codes_for_map(fmap)                                      # (B, T, U)
            maxima[key].append(z.amax(1).float().cpu().numpy())
            if key in units:
                maps[key].append(z[:, :, torch.as_tensor(units[key], device=z.device)].transpose(1, 2).float()
                                 .cpu().numpy())
    return {k: np.concatenate(v) for k, v in maxima.items()}, {k: np.concatenate(v) for k, v in maps.items()}


def score_codes(codes: dict[str, CodeProvider], train_max: dict[str, np.ndarray], train: cm.PartTruth,
                test: cm.PartTruth, test_batches, cf_batches=None, rerenders: Rerenders | None = None
                ) -> tuple[dict[str, cm.ConceptReport], np.ndarray]:
    """Choose each code's units on the training images, then one pass over the test (and re-rendered) images.

    Parameters
    ----------
    codes : code providers by key, ``"sae"`` among them. train_max : per key, (N_train, U)
        per-image max over tokens on the training images whose ground truth is ``train``.
    test_batches, cf_batches : (indices, layer4 maps) of the test images (ground truth ``test``)
        and of ``rerenders`` (None: no counterfactuals), in order.

    Returns
    -------
    (per key, every measure of that code; the SAE's (P, M) training AUROC of every neuron per part).
    """
    train_auc = {k: stats.auroc(v, train.present) for k, v in train_max.items()}
    units = {k: cm.best_units(auc) for k, auc in train_auc.items()}
    test_max, unit_maps = code_maxima(codes, test_batches, units)
    with_zero = {k: c for k, c in codes.items() if c.natural_zero}
    cf_max = {} if cf_batches is None else code_maxima(with_zero, cf_batches)[0]
    row, part = (None, None) if rerenders is None else (rerenders.row, rerenders.part)
    # relative drops need a code whose 0 means "absent": none for PCA (its origin is the training mean)
    reports = {k: cm.concept_report(codes[k].name, train_auc[k], test_max[k], unit_maps[k], test,
                                    cf_max.get(k) if codes[k].natural_zero else None, row, part) for k in codes}
    return reports, train_auc["sae"]


@dataclass
class HeldOut:
    """Stage 3's held-out concept measures: per code, units chosen on train and scored on test."""
    reports: dict[str, cm.ConceptReport]   # by code key, "sae" first
    n_train: int
    n_test: int
    rerenders: Rerenders | None
    sae_train_auroc: np.ndarray            # (P, M) every SAE neuron's AUROC per part on the training images
    versus: dict | None = None             # the SAE minus the best baseline, paired interval (cm.versus_best_baseline)

    def to_dict(self) -> dict:
        """The ``concept_measures`` block of summary.json."""
        cf = self.rerenders
        return {"choose_on": "train", "score_on": "test", "n_train_images": self.n_train,
                "n_test_images": self.n_test, "pointing_rule": cm.POINTING_RULE,
                "pointing_cell_rule": cm.POINTING_CELL_RULE,
                "counterfactual": {"test_images": cf.n_images, "rerenders": len(cf.row)} if cf else None,
                "codes": {key: report.to_dict() for key, report in self.reports.items()},
                "sae_versus_best_baseline": self.versus}


def held_out_measures(inputs: Inputs, acts: Activations, indices: np.ndarray, codes: dict[str, CodeProvider],
                      cf_images: int = 0, seed: int = 0, batch_size: int = 128, amp: str = "off",
                      progress: bool = True) -> HeldOut:
    """Every code's units chosen on the summarised training images, scored on the classifier's test split.

    Parameters
    ----------
    acts : pass 1 over ``indices``; its ``top_max`` is the SAE's training score, its cached
        maps (when kept) feed the baselines.
    codes : the codes to measure, keyed; ``"sae"`` (the SAE's own code) is required.
    cf_images : test images to re-render without each of their parts (0: no counterfactuals).
    seed : draws those test images.
    """
    imageset = inputs.imageset
    test_idx = np.sort(inputs.classifier_ckpt["split"]["test"].numpy())
    rerenders = (rerender_test_images(imageset, test_idx, cf_images, seed)
                 if cf_images > 0 and imageset.origins else None)
    train, test = (part_ground_truth(imageset, idx, acts.grid) for idx in (indices, test_idx))
    run = dict(batch_size=batch_size, amp=amp, progress=progress)
    others = {k: c for k, c in codes.items() if k != "sae"}
    train_max = {"sae": acts.top_max}
    if others:
        train_max.update(code_maxima(others, feature_batches(inputs, imageset.images, indices, acts.fmaps,
                                                             desc="baselines: train", **run))[0])
    test_batches = feature_batches(inputs, imageset.images, test_idx, desc="test split", **run)
    cf_batches = None if rerenders is None else feature_batches(
        inputs, rerenders.images, np.arange(len(rerenders.row)), desc="counterfactuals", **run)
    reports, train_auc = score_codes(codes, train_max, train, test, test_batches, cf_batches, rerenders)
    versus = cm.versus_best_baseline(reports, test.present, seed=seed)   # is the SAE's lead more than these images' noise?
    return HeldOut(reports, len(indices), len(test_idx), rerenders, train_auc, versus)


@dataclass
class NeuronParts:
    """Each neuron's best part type on the training split, for the per-neuron records."""
    part: list[str]              # (M,) the part type with its best AUROC
    auroc: np.ndarray            # (M,) that AUROC, chosen and scored on the training images (optimistic)
    distractor_auroc: np.ndarray  # (M,) its AUROC for that part among training images of classes without it
    pointing: np.ndarray         # (M,) of its example images holding that part, share where its peak is inside
    pointing_chance: np.ndarray  # (M,) the same rule on maps of noise, against the same images' boxes
    n_holding: np.ndarray        # (M,) how many of its example images hold that part (what pointing rests on)


def neuron_parts(train_auroc: np.ndarray, train_max: np.ndarray, examples: Examples, imageset: data.ImageSet,
                 indices: np.ndarray, grid: tuple[int, int]) -> NeuronParts:
    """Best part per neuron (``train_auroc`` (P, M), from ``train_max`` (N, M) on ``indices``), its AUROC where
    only distractors carry the part (a part AUROC cannot tell a part detector from a detector of the part's
    classes) and its pointing game on the neuron's own examples."""
    types = list(imageset.part_types)
    best = np.nan_to_num(train_auroc, nan=0.5).argmax(0)                     # (M,)
    train = part_ground_truth(imageset, indices, grid)
    distractor = cm.distractor_auroc(train_max, train.present, train.labels, train.part_classes, best)
    m, e = examples.rows.shape
    ex_parts = [imageset.parts[g] for g in indices[np.maximum(examples.rows, 0)].ravel()]
    boxes = cm.part_boxes(ex_parts, types)
    boxes = boxes.reshape(m, e, *boxes.shape[1:])                             # (M, E, P, B, 4)
    present = cm.part_presence(ex_parts, types).reshape(m, e, len(types))
    neuron = np.arange(m)[:, None]
    holds = present[neuron, np.arange(e), best[:, None]] & (examples.rows >= 0)          # (M, E)
    own_boxes = boxes[neuron, np.arange(e), best[:, None]]                               # (M, E, B, 4)
    maps = examples.maps if examples.maps.shape[2] else np.zeros((m, e, grid[0] * grid[1]))  # no examples: all dead
    # neurons take the place of parts: one column each, its examples the images
    point = cm.pointing_game(maps.transpose(1, 0, 2), own_boxes.transpose(1, 0, 2, 3), holds.T,
                             [types[j] for j in best], grid, imageset.spec["image_size"])
    auc = np.asarray(train_auroc)[best, np.arange(m)]
    return NeuronParts([types[j] for j in best], auc, distractor, point.hit_rate, point.chance, holds.sum(1))


# ----------------------------------------------------------------------------- summary
def summary_metrics(inputs: Inputs, acts: Activations, st: NeuronStats, labels: np.ndarray, n_clear_class: int,
                    held_out: HeldOut | None, timings: dict) -> dict:
    """summary.json (less the run's config): counts, SAE faithfulness on the summarised images, the
    held-out concept measures (``concept_measures``, None without ground-truth parts), provenance."""
    err = acts.logits - acts.sae_logits                                      # ε per image and class
    live = ~st.dead
    sae_ckpt = inputs.sae_ckpt
    return {
        "n_images": int(len(labels)), "n_neurons": int(len(st.dead)), "n_dead": int(st.dead.sum()),
        "dead_fraction": float(st.dead.mean()), "n_clear_class": int(n_clear_class),
        "mean_image_frequency_live": float(st.image_frequency[live].mean()) if live.any() else 0.0,
        "mean_token_frequency": float(st.token_frequency.mean()),
        "classifier_train_accuracy": float((acts.logits.argmax(1) == labels).mean()),
        "sae_top1_agreement": float((acts.sae_logits.argmax(1) == acts.logits.argmax(1)).mean()),
        "sae_error_logit_rms": float(np.sqrt((err ** 2).mean())),
        "grid": list(acts.grid), "concept_measures": held_out.to_dict() if held_out else None, "timings_s": timings,
        "sae_fingerprint": inputs.sae_fingerprint,
        "classifier": {"path": inputs.classifier_path, "fingerprint": inputs.classifier_ckpt["fingerprint"]},
        "sae": {"path": inputs.sae_path, "fingerprint": inputs.sae_fingerprint,
                "n_latents": sae_ckpt["n_latents"], "k": sae_ckpt["k"],
                "classifier_fingerprint": sae_ckpt["classifier_fingerprint"]},
        "score": "max over classes of max(PMI, 0) * max(-knockout, 0)",
    }
