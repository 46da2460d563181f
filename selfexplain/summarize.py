"""Stage 3's analysis: what every SAE neuron does on the images the classifier was trained on.

The pipeline, each step returning a typed record the next one (and ``report.py``) consumes:

* :func:`load_inputs` -> :class:`Inputs`: classifier, SAE (checked to belong together), dataset;
* :func:`collect` -> :class:`Activations`: one pass, per-image max/mean codes, logits, positions;
* :func:`neuron_stats` -> :class:`NeuronStats`: thresholds, frequencies, PMI, lens, knockout, score;
* :func:`find_examples` -> :class:`Examples`: each neuron's strongest images and their token maps;
* :func:`concept_recovery` -> :class:`ConceptRecovery`: on data with ground-truth parts, how well
  the best neuron for each part detects it and whether it fires inside the part's boxes;
* :func:`summary_metrics`: the ``summary.json`` object.

Memory stays O(N·M): pass 1 keeps per-image reductions only, pass 2 recomputes token maps
for the example images alone.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from . import artifacts, data, stats
from .errors import UserError
from .features import iter_feature_maps
from .sae import TopKSAE, bias_logits, logit_lens


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
                channels_last: bool = True) -> Inputs:
    """Load the classifier, the SAE trained on it (else a UserError) and the classifier's dataset."""
    model, ckpt = artifacts.load_classifier(classifier_path, device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    sae, sae_ckpt = artifacts.load_sae(sae_path, ckpt, device)
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
    frequency: np.ndarray          # share of images where the neuron is "on" (<= 1 - QUANTILE by definition)
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
    if fmaps is not None:
        source = ((indices[needed[i:i + batch_size]], fmaps[needed[i:i + batch_size]].to(inputs.device))
                  for i in range(0, len(needed), batch_size))
    else:
        source = ((idx, fmap) for idx, fmap, _ in iter_feature_maps(
            inputs.classifier, inputs.imageset.images, indices[needed], inputs.prep, inputs.device, batch_size, amp,
            progress, desc="pass 2: examples"))
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


# ----------------------------------------------------------------------------- concept recovery
@dataclass
class PartRecovery:
    """How well the best neuron for one part type detects it."""
    best_neuron: int
    auroc: float             # part presence vs the neuron's per-image max activation
    in_box_share: float      # share of its examples' strongest tokens inside the part's boxes
    in_box_chance: float     # the same share for a token picked at random in those examples
    best_dense_auroc: float  # the best neuron's AUROC on the dense ReLU code instead
    images_with_part: int


@dataclass
class ConceptRecovery:
    """Concept recovery on data with ground-truth parts: per part type, and per neuron."""
    per_part: dict[str, PartRecovery]
    grid: tuple[int, int]
    neuron_part: list[str]         # (M,) each neuron's best part type
    neuron_auroc: np.ndarray       # (M,) its AUROC for that part
    neuron_in_box_share: np.ndarray

    def to_dict(self) -> dict:
        """The ``concept_recovery`` table of summary.json."""
        parts = list(self.per_part.values())
        return {"per_part": {name: vars(p) for name, p in self.per_part.items()},
                "mean_best_auroc": float(np.mean([p.auroc for p in parts])),
                "mean_best_dense_auroc": float(np.mean([p.best_dense_auroc for p in parts])),
                "mean_in_box_share": float(np.mean([p.in_box_share for p in parts])),
                "mean_in_box_chance": float(np.mean([p.in_box_chance for p in parts])),
                "grid": list(self.grid), "score": "per-image max of the Top-K code"}


def part_labels(parts: list, rows_global: np.ndarray, part_types: list[str]) -> np.ndarray:
    """(N, P) bool: image holds at least one part of each type (class part or distractor)."""
    index = {p: j for j, p in enumerate(part_types)}
    out = np.zeros((len(rows_global), len(part_types)), dtype=bool)
    for n, g in enumerate(rows_global):
        for part in parts[g]:
            out[n, index[part["part"]]] = True
    return out


def token_in_box(parts: list, rows_global: np.ndarray, part_types: list[str], grid, image_size: int) -> np.ndarray:
    """(N, P, T) bool: the token's centre lies inside some box of that part type in that image."""
    rows, cols = stats.token_grid(*grid)
    ys, xs = rows * image_size, cols * image_size
    index = {p: j for j, p in enumerate(part_types)}
    out = np.zeros((len(rows_global), len(part_types), len(ys)), dtype=bool)
    for n, g in enumerate(rows_global):
        for part in parts[g]:
            x0, y0, x1, y1 = part["box"]
            out[n, index[part["part"]]] |= (xs >= x0) & (xs < x1) & (ys >= y0) & (ys < y1)
    return out


def in_box_share(inbox, local, top_token, valid, neurons, parts) -> tuple[np.ndarray, np.ndarray]:
    """Share of each (neuron, part) pair's top tokens inside that part's boxes, and its chance level.

    Parameters
    ----------
    inbox : (U, P, T) bool from :func:`token_in_box` over the example images.
    local : (M, E) row of ``inbox`` for each neuron's examples. top_token : (M, E) argmax token.
    valid : (M, E) bool, the example exists. neurons, parts : (K,) int pairs to evaluate.

    Returns
    -------
    (share (K,), chance (K,)): chance is the share of *all* tokens of the same examples
    that lie inside the boxes (what a neuron firing at random places would score).
    """
    loc, tok, ok = local[neurons], top_token[neurons], valid[neurons]          # (K, E)
    hit = inbox[loc, parts[:, None], tok] & ok
    chance = inbox[loc, parts[:, None], :].mean(2) * ok
    n = np.maximum(ok.sum(1), 1)
    return hit.sum(1) / n, chance.sum(1) / n


def concept_recovery(acts: Activations, examples: Examples, imageset: data.ImageSet, indices: np.ndarray,
                     image_size: int) -> ConceptRecovery | None:
    """Per part type: the best neuron's AUROC for the part's presence and its in-box share.

    The score of an image is the neuron's per-image max Top-K activation. None on data
    without ground-truth parts.
    """
    if not imageset.parts or not imageset.part_types:
        return None
    types = list(imageset.part_types)
    present = part_labels(imageset.parts, indices, types)
    auc = np.nan_to_num(stats.auroc(acts.top_max, present), nan=0.5)       # (P, M)
    dense_auc = np.nan_to_num(stats.auroc(acts.dense_max, present), nan=0.5)
    rows = examples.rows
    ex_rows = np.unique(rows[rows >= 0])
    inbox = token_in_box(imageset.parts, indices[ex_rows], types, acts.grid, image_size)  # (U, P, T)
    ctx = (inbox, np.searchsorted(ex_rows, np.maximum(rows, 0)), examples.maps.argmax(2), rows >= 0)
    best = auc.argmax(1)
    share, chance = in_box_share(*ctx, best, np.arange(len(types)))
    per_part = {name: PartRecovery(int(best[j]), float(auc[j, best[j]]), float(share[j]), float(chance[j]),
                                   float(dense_auc[j].max()), int(present[:, j].sum()))
                for j, name in enumerate(types)}
    neuron_part = auc.argmax(0)
    neuron_share, _ = in_box_share(*ctx, np.arange(len(neuron_part)), neuron_part)
    return ConceptRecovery(per_part, acts.grid, [types[j] for j in neuron_part], auc.max(0), neuron_share)


# ----------------------------------------------------------------------------- summary
def summary_metrics(inputs: Inputs, acts: Activations, st: NeuronStats, labels: np.ndarray, n_clear_class: int,
                    recovery: ConceptRecovery | None, timings: dict) -> dict:
    """summary.json (less the run's config): counts, SAE faithfulness on the summarised images, concept
    recovery, provenance."""
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
        "grid": list(acts.grid), "concept_recovery": recovery.to_dict() if recovery else None, "timings_s": timings,
        "sae_fingerprint": inputs.sae_fingerprint,
        "classifier": {"path": inputs.classifier_path, "fingerprint": inputs.classifier_ckpt["fingerprint"]},
        "sae": {"path": inputs.sae_path, "fingerprint": inputs.sae_fingerprint,
                "n_latents": sae_ckpt["n_latents"], "k": sae_ckpt["k"],
                "classifier_fingerprint": sae_ckpt["classifier_fingerprint"]},
        "score": "max over classes of max(PMI, 0) * max(-knockout, 0)",
    }
