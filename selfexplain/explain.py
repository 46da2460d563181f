"""Explain one prediction through the SAE: exact evidence per neuron, concepts, faithfulness.

With the classifier head ``logits = W·GAP(A) + b`` and the SAE reconstruction
``Â = σ ⊙ (D z + b_d) + μ`` (per token, ``z`` the sparse code the SAE uses at inference:
Top-K, or BatchTopK's threshold θ), every class logit splits exactly into

    logit_c = Σ_i mean_tokens(z_i) · lens[i, c]  +  bias_c  +  error_c
    lens[i] = W (d_i ⊙ σ),   bias = W (σ ⊙ b_d + μ) + b,   error = W · GAP(A − Â)

so neuron i's **contribution** to the predicted class p is ``mean_tokens(z_i) · lens[i, p]``
(positive = support), and knocking the neuron out lowers logit_p by exactly that much.

Definitions used in every explanation:

* cited neurons: the ``n_cite`` neurons with the largest *positive* contribution to the
  predicted logit, highest first (a neuron that argues against the class is never cited
  as a reason for it);
* ``share`` = contribution / (sum of the positive contributions of all neurons): the
  fraction of the positive SAE evidence a neuron supplies. Shares of all supporting
  neurons add up to 1; bias and error are reported apart, not shared out;
* ``others`` = the summed contribution of every uncited neuron (positive and negative),
  so ``logit = Σ cited + others + bias + error`` holds to float precision;
* faithfulness: the predicted logit's drop when the cited neurons' codes are zeroed and
  the edited reconstruction (plus the fixed error map ``A − Â``) goes through the real
  head, beside the mean drop for as many random *active* neurons (several seeded draws);
* contrast (``versus``): the margin ``logit_p − logit_q`` against another class q splits the
  same way, neuron i giving ``mean_tokens(z_i) · (lens[i, p] − lens[i, q])``, so what both
  classes use alike cancels and the cited neurons are those that tell p from q.

Models load once per process (:func:`load_models` caches them by resolved path, mtime
and device); importing this module reads nothing from disk. The reconstruction is the
SAE's own maths (:mod:`selfexplain.sae`): ``encode_topk``, ``decode_sparse``,
``unstandardize`` and ``tokens_to_map``.
"""
from __future__ import annotations

import base64
import copy
import html
import itertools
import json
import numbers
import os
import zlib
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

from . import artifacts, evidence
from .concepts import concepts_and_names, report_fingerprint
from .config import closest, coerce, register_choices, require_choice
from .data import model_input, relocate, uint8_tensor
from .distributed import resolve_device
from .errors import UserError
from .imaging import array_to_sketch, load_user_image, png_bytes
from .prompts import OFFLINE_PREFIX, concept_name, percent
from .sae import TopKSAE, bias_logits, logit_lens, tokens_to_map
from .stats import describe_map

AGGS = register_choices("AGG", ("max", "mean", "sum"))  # how a neuron's per-token code becomes one score per image
MIN_OVERLAY, MAX_OVERLAY = 64, 4096  # Explanation.overlay(size): the panel's side in pixels
MODEL_CACHE_SIZE = 2  # model pairs kept per process (a notebook may switch between two runs)
_MODEL_CACHE: dict = {}


# ----------------------------------------------------------------------------- settings
@dataclass(frozen=True)
class MostActive:
    """Which neurons count as an image's most active: the :func:`top_neuron_ids_for_image` rule."""

    n: int = 20                # at most this many, highest score first
    percentile: float = 99.0   # score >= this percentile of the image's M scores (and > 0)
    agg: str = "max"           # max | mean | sum of the neuron's code over tokens

    def __post_init__(self):
        if not _is_int(self.n) or not _is_number(self.percentile):  # "99" or 2.5 was a TypeError deep inside
            raise UserError(f"need an integer TOP_ACTIVE (N) and a number PERCENTILE, got {self.n!r}, "
                            f"{self.percentile!r}")
        if not 0 <= self.percentile <= 100 or self.n < 1:
            raise UserError(f"need 0 <= PERCENTILE <= 100 and TOP_ACTIVE (N) >= 1, got {self.percentile}, {self.n}")
        require_choice("AGG", self.agg, AGGS)


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)  # True is not a count


def _is_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


@dataclass(frozen=True)
class ExplainSettings:
    """How one explanation is built (the keyword arguments of :func:`explain_images`)."""

    n_cite: int = 5                    # neurons cited as the reasons for the prediction
    n_random: int = 8                  # random active-neuron sets for the faithfulness baseline
    seed: int = 0                      # seeds those draws, together with the sketch's pixels
    active: MostActive | None = None   # also record the most active neurons in extra["top_active"]
    input_check: bool = True           # white out the cited concepts' ink and rerun (False: the fast path)
    ink_share: float = evidence.INK_SHARE  # share of the sketch's ink the input-space check removes
    versus: str = ""                   # also explain "rather than" this class: "" (off), "runner_up" or a class name

    def __post_init__(self):
        if self.n_cite < 1 or self.n_random < 1:  # N=0 explained nothing, then called no neuron "standing out"
            raise UserError(f"need N >= 1 and RANDOM_DRAWS >= 1, got {self.n_cite}, {self.n_random}")
        if not 0.0 < self.ink_share < 1.0:
            raise UserError(f"INK_SHARE must be in (0, 1), got {self.ink_share}")
        if self.active is not None and not isinstance(self.active, MostActive):
            raise UserError(f"active must be None or MostActive(n, percentile, agg), got {self.active!r}")

    @classmethod
    def from_kwargs(cls, settings: dict) -> "ExplainSettings":
        """Settings from keyword arguments; an unknown name is a UserError naming the right one
        (the command line's ``N`` is ``n_cite`` here, ``FAST`` is ``input_check = not fast``)."""
        names = [f.name for f in fields(cls)]
        for key in settings:
            if key not in names:
                lower = str(key).lower()
                hint = lower if lower in names else CLI_NAMES.get(lower) or closest(lower, names)
                raise UserError(f"unknown explanation setting '{key}'" + (f" (did you mean {hint}?)" if hint else "")
                                + f"; the settings are {', '.join(names)}")
        defaults = {f.name: f.default for f in fields(cls)}
        return cls(**{key: coerce(key, value, defaults[key]) for key, value in settings.items()})  # types, too


CLI_NAMES = {"n": "n_cite", "fast": "input_check (= not fast)", "random_draws": "n_random",
             "top_active": "active=MostActive(...)", "percentile": "active=MostActive(...)",
             "agg": "active=MostActive(...)"}  # why_did_you.py's names for ExplainSettings fields


# ----------------------------------------------------------------------------- models
@dataclass
class Models:
    """A classifier + SAE pair ready for explanations, with the precomputed logit lens."""

    classifier: torch.nn.Module
    classifier_ckpt: dict
    sae: TopKSAE
    sae_ckpt: dict
    lens: torch.Tensor         # (M, classes): neuron i adds mean(z_i) * lens[i, c] to logit c
    bias: torch.Tensor         # (classes,): the image-independent term
    class_names: list[str]
    device: torch.device

    @property
    def image_size(self) -> int:
        return int(self.classifier_ckpt["preprocess"]["image_size"])


def _file_key(path: str | Path) -> tuple[str, int]:
    p = Path(path).expanduser().resolve()
    return str(p), (p.stat().st_mtime_ns if p.is_file() else -1)


def relocated(models: Models, data_root: str) -> Models:
    """``models`` whose classifier's dataset is read from ``data_root`` (:func:`data.relocate`); a copy, so the
    cached pair keeps what its checkpoint records."""
    if not data_root:
        return models
    ckpt = {**models.classifier_ckpt, "dataset": relocate(models.classifier_ckpt["dataset"], data_root)}
    return replace(models, classifier_ckpt=ckpt)


def load_models(classifier_ckpt: str | Path = artifacts.CLASSIFIER_CKPT, sae_ckpt: str | Path = artifacts.SAE_CKPT,
                device: str | torch.device = "auto") -> Models:
    """Load (or reuse) a matching classifier/SAE pair; a mismatched pair is a :class:`UserError`.

    The cache key is (resolved path, mtime) of both files and the device, so a retrained
    checkpoint at the same path is picked up, and repeated calls return the same object.
    """
    dev = device if isinstance(device, torch.device) else resolve_device(str(device))
    key = (_file_key(classifier_ckpt), _file_key(sae_ckpt), str(dev))
    if key in _MODEL_CACHE:
        return _MODEL_CACHE[key]
    classifier, cck = artifacts.load_classifier(classifier_ckpt, dev)
    sae, sck = artifacts.load_sae(sae_ckpt, cck, dev)
    with torch.no_grad():
        lens = logit_lens(sae, classifier.fc.weight)
        bias = bias_logits(sae, classifier.fc.weight, classifier.fc.bias)
    models = Models(classifier, cck, sae, sck, lens, bias, list(cck["class_names"]), dev)
    while len(_MODEL_CACHE) >= MODEL_CACHE_SIZE:
        _MODEL_CACHE.pop(next(iter(_MODEL_CACHE)))
    _MODEL_CACHE[key] = models
    return models


# ----------------------------------------------------------------------------- concepts
def concept_of(concepts: dict[int, str], neuron_id: int) -> str:
    return concepts.get(int(neuron_id)) or f"neuron {int(neuron_id)}"


# ----------------------------------------------------------------------------- analysis
@dataclass
class Analysis:
    """Everything one batch pass yields; B images, T = H*W tokens, M latents."""

    logits: torch.Tensor       # (B, classes) from the real forward pass
    probs: torch.Tensor        # (B, classes)
    values: torch.Tensor       # (B, T, K) sparse code values (K slots per token)
    indices: torch.Tensor      # (B, T, K) their latent ids
    z_mean: torch.Tensor       # (B, M) mean over tokens of the sparse code
    z_max: torch.Tensor        # (B, M) max over tokens
    z_sum: torch.Tensor        # (B, M) sum over tokens
    residual: torch.Tensor     # (B, C, H, W) the SAE error map A - Â
    error: torch.Tensor        # (B, classes) W · GAP(A - Â)
    hw: tuple[int, int]


def to_uint8(images: Sequence, image_size: int, first: int | None = None) -> tuple[np.ndarray, list[str]]:
    """Paths, PIL images, arrays (:func:`imaging.array_to_sketch`) or tensors -> a uint8 batch
    (B, S, S) and display names. A tensor is read channels-first, as torchvision gives one:
    (H, W) or (C, H, W) with C in 1, 3, 4 (values 0-1 or 0-255, not normalised). With ``first``, the
    k-th array or PIL image is named by its place in the caller's list, ``<array {first + k}>``. A whole
    (B, S, S) uint8 array at the model's size is a batch already decoded (:func:`why_did_you.explain_images`
    passes its inputs so): taken as is, without a second round of notes."""
    if isinstance(images, np.ndarray) and images.dtype == np.uint8 and images.shape[1:] == (image_size, image_size):
        return images, [unnamed("<array>", None if first is None else first + k) for k in range(len(images))]
    arrays, names = [], []
    for k, item in enumerate(images):
        place = None if first is None else first + k
        if isinstance(item, torch.Tensor):
            item = tensor_to_array(item)
        if isinstance(item, np.ndarray):
            names.append(unnamed("<array>", place))
            arrays.append(array_to_sketch(item, image_size, names[-1]))
        elif isinstance(item, Image.Image):
            names.append(unnamed("<PIL image>", place))
            arrays.append(load_user_image(item, image_size, names[-1]))
        elif isinstance(item, (str, os.PathLike)):
            names.append(os.fspath(item))
            arrays.append(load_user_image(item, image_size))
        else:
            raise UserError(f"an image is a file path, 'test:K', a PIL image, a numpy array or a tensor; got "
                            f"{type(item).__name__}")
    return np.stack(arrays), names


def unnamed(kind: str, place: int | None) -> str:
    """The name of an image that has none (``<array>``, ``<PIL image>``): with its place in a list of several,
    ``<array 2>``, so that several arrays' explanations and notes tell apart."""
    return kind if place is None else f"{kind[:-1]} {place}>"


def tensor_to_array(tensor: torch.Tensor) -> np.ndarray:
    """A (H, W) or channels-first (C, H, W) tensor as the (H, W[, C]) array it holds; a batch of one,
    (1, C, H, W), as its image (a DataLoader's single sample)."""
    array = tensor.detach().cpu().float().numpy() if tensor.is_floating_point() else tensor.detach().cpu().numpy()
    if array.ndim == 4 and array.shape[0] == 1:
        array = array[0]
    if array.ndim == 3 and array.shape[0] in (1, 3, 4):
        array = array[0] if array.shape[0] == 1 else array.transpose(1, 2, 0)
    elif array.ndim != 2:
        raise UserError(f"a tensor image must be shaped (H, W) or (C, H, W) with C 1, 3 or 4, got "
                        f"{tuple(tensor.shape)}")
    return array


def decode_to_map(sae: TopKSAE, values: torch.Tensor, indices: torch.Tensor, b: int, h: int, w: int) -> torch.Tensor:
    """Sparse codes (B*H*W, K) -> the reconstruction Â = σ ⊙ (D z + b_d) + μ as a (B, C, H, W) map."""
    return tokens_to_map(sae.unstandardize(sae.decode_sparse(values, indices)), b, h, w)


@torch.no_grad()
def analyse(models: Models, batch_uint8: np.ndarray) -> Analysis:
    """One fp32 pass: classifier features and logits, SAE code, reconstruction error."""
    clf, sae = models.classifier, models.sae
    x = model_input(uint8_tensor(batch_uint8), models.classifier_ckpt["preprocess"],
                    models.device)
    fmap = clf.features(x).float()
    logits = clf.head(fmap).float()
    b, _, h, w = fmap.shape
    values, indices = sae.encode_topk(sae.map_to_tokens(fmap))
    residual = fmap - decode_to_map(sae, values, indices, b, h, w)
    error = residual.mean(dim=(2, 3)) @ clf.fc.weight.float().t()
    values, indices = values.reshape(b, h * w, -1), indices.reshape(b, h * w, -1)
    # per-image sums and maxima over tokens straight from the sparse code (no dense (B, T, M) tensor)
    zeros = torch.zeros(b, sae.n_latents, device=fmap.device)
    z_sum = zeros.scatter_add(1, indices.flatten(1), values.flatten(1))
    z_max = zeros.scatter_reduce(1, indices.flatten(1), values.flatten(1), "amax")  # codes are >= 0
    return Analysis(logits, logits.softmax(-1), values, indices, z_sum / (h * w), z_max, z_sum, residual, error, (h, w))


def most_active(analysis: Analysis, b: int, query: MostActive) -> tuple[list[int], list[float], float]:
    """Image ``b``'s neurons with score >= the ``query.percentile`` of its M scores and > 0,
    highest first, at most ``query.n``; returns (ids, scores, threshold)."""
    scores = {"max": analysis.z_max, "mean": analysis.z_mean, "sum": analysis.z_sum}[query.agg][b]
    scores = scores.cpu().numpy().astype(np.float64)
    threshold = float(np.percentile(scores, query.percentile))
    keep = np.flatnonzero((scores >= threshold) & (scores > 0))
    keep = keep[np.argsort(-scores[keep], kind="stable")][:query.n]
    return [int(i) for i in keep], [float(scores[i]) for i in keep], threshold


@torch.no_grad()
def ablated_logits(models: Models, analysis: Analysis, b: int, neuron_sets: Sequence[Sequence[int]],
                   cls: int) -> np.ndarray:
    """Class ``cls``'s logit after zeroing each set of neurons in image ``b``'s code.

    A real head pass: the edited code is decoded, mapped back to layer4 space, the
    fixed error map ``A − Â`` is added, and the classifier's ``head`` runs on it.
    """
    (h, w), values, indices = analysis.hw, analysis.values[b], analysis.indices[b]   # (T, K)
    edited = []
    for ids in neuron_sets:
        drop = torch.isin(indices, torch.as_tensor(list(ids), dtype=indices.dtype, device=indices.device))
        edited.append(values.masked_fill(drop, 0.0))
    vals = torch.stack(edited)                                                         # (S, T, K)
    s, t, k = vals.shape
    maps = decode_to_map(models.sae, vals.reshape(s * t, k), indices.repeat(s, 1), s, h, w) + analysis.residual[b]
    return models.classifier.head(maps)[:, cls].float().cpu().numpy()


# ----------------------------------------------------------------------------- explanations
@dataclass
class CitedNeuron:
    neuron_id: int
    concept: str
    activation: float          # mean over tokens of the sparse code
    activation_max: float      # max over tokens
    contribution: float        # exact contribution to the predicted logit
    share: float               # contribution / sum of all positive contributions
    heatmap: np.ndarray = field(repr=False, default=None)  # (H, W) code per token
    name: str = ""             # short name (what the sentence, the page and the legend call it)
    offline: bool = False      # named by the offline backend's statistics label, not by a model


@dataclass
class Explanation:
    """One image's explanation; ``to_json()`` gives the ``why_did_you --json`` contract."""

    image: str
    predicted_class: str
    predicted_index: int
    probability: float
    top5: list[dict]
    logit: float
    neurons: list[CitedNeuron]
    others: float
    bias: float
    error: float
    faithfulness: dict
    sentence: str
    extra: dict = field(default_factory=dict)  # e.g. true_class, top_active, overlay, llm_sentence
    removed_ink: np.ndarray | None = field(default=None, repr=False)  # (S, S) bool: the input check's cited mask
    versus_neurons: list[CitedNeuron] | None = field(default=None, repr=False)  # the contrast's, with heat maps
    sketch: np.ndarray | None = field(default=None, repr=False)  # (S, S) uint8: the input as the model saw it

    def to_dict(self, heatmaps: bool = False) -> dict:
        left_out = ("neurons", "extra", "removed_ink", "versus_neurons", "sketch")
        kept = [f.name for f in fields(self) if f.name not in left_out]
        out = {k: copy.deepcopy(getattr(self, k)) for k in kept}  # as asdict copies, without the arrays left out
        out["faithfulness"] = {**dict.fromkeys(FAITHFULNESS_KEYS), **self.faithfulness}  # null: not run
        out["neurons"] = [{**{k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in asdict(n).items()
                              if heatmaps or k != "heatmap"},
                           "where": describe_map(n.heatmap) if n.heatmap is not None else None}  # in this sketch
                          for n in self.neurons]
        out.update(self.extra)
        return out

    def overlay(self, size: int = 384) -> Image.Image:
        """The ``--overlay`` picture as a PIL RGB image (a notebook shows it inline; ``.save(path)`` writes it):
        the cited concepts' heat maps on the sketch, and the contrast's panel beside them with ``versus``."""
        if self.sketch is None:
            raise UserError("this explanation holds no sketch to draw on: make it with explain_images or explain_one "
                            "given the image")
        if not _is_int(size) or not MIN_OVERLAY <= size <= MAX_OVERLAY:  # 0 was a raw ValueError, 'big' a TypeError
            raise UserError(f"overlay size is a side in pixels from {MIN_OVERLAY} to {MAX_OVERLAY}, got {size!r}")
        return overlay_image(self.sketch, self, size)

    def to_json(self, heatmaps: bool = False) -> str:
        """One line of JSON text (the CLI prints one per image); :meth:`to_dict` gives the dict."""
        return json.dumps(self.to_dict(heatmaps), ensure_ascii=False)

    def __repr__(self) -> str:
        # the dataclass's own repr printed every field (~2,900 characters for one image); the sentence says it all
        cited = "" if self.extra.get("blank") else ", ".join(f"{n.neuron_id} ({percent(n.share)})" for n in self.neurons)
        return (f"Explanation(image={self.image!r}, predicted={self.predicted_class!r} {percent(self.probability)}, "
                f"cited=[{cited}]): {self.sentence}")

    def _repr_html_(self) -> str | None:
        """What Jupyter shows for a bare ``exp``: the overlay with the sentence under it (without a sketch, or
        if drawing fails, the text repr)."""
        if self.sketch is None:
            return None
        try:
            picture = base64.b64encode(png_bytes(overlay_image(self.sketch, self, NOTEBOOK_OVERLAY))).decode()
        except Exception:  # noqa: BLE001 - a display hook must not raise: Jupyter would print a traceback instead
            return None
        return (f'<figure style="margin:0"><img src="data:image/png;base64,{picture}" alt="{html.escape(self.image)}">'
                f"<figcaption>{html.escape(self.image)}: {html.escape(self.sentence)}</figcaption></figure>")


NOTEBOOK_OVERLAY = 288  # px per panel of a notebook's inline overlay (~50 KB of PNG kept in the .ipynb)


FAITHFULNESS_KEYS = ("code_cited_drop", "code_random_drop", "random_is_cited") + evidence.INPUT_CHECK_KEYS  # in order
NO_RANDOM_SET = "none to draw (every active neuron is cited)"  # the random baseline's words (draw.html too: tested)


BLANK_ABOVE = 245  # an input with no pixel darker than this has no ink: nothing for a concept to explain


def blank_sentence(predicted: str, probability: float, image: np.ndarray | None) -> str | None:
    """The sentence for an input without ink (a blank page), else None: concepts would still be cited
    (the code is never all zero), but they would explain a guess, not a drawing."""
    if image is None or int(np.asarray(image).min()) <= BLANK_ABOVE:
        return None
    return (f"Predicted {predicted} ({percent(probability)}) for a blank page: it has no ink, so no concept explains "
            "the guess.")


def short_name(label: str) -> tuple[str, bool]:
    """``(name, offline)`` for a neuron's label: :func:`prompts.concept_name` (an offline label's
    part or classes, without marker, AUROC and place) and whether the offline backend made it."""
    return concept_name(label), label.startswith(OFFLINE_PREFIX)


def compose_sentence(predicted: str, probability: float, cited: Sequence[CitedNeuron],
                     names: dict[int, str] | None = None, head: str | None = None) -> str:
    """'Predicted bicycle (97%) mainly because of wheel (41%, 2 neurons), triangle (22%) and spokes (9%).'

    Each neuron is named by ``names`` (:func:`concepts.concepts_and_names`: no summary sentences),
    else by its concept. Neurons with the same name (:func:`prompts.concept_name`: an offline
    label's part or classes, without its AUROC and place) are named once, with their shares
    summed, largest first. Names from offline labels are marked: the whole list when all
    are, else each with ``*``. ``head`` replaces 'Predicted bicycle (97%)' (a contrast's 'bicycle rather
    than motorbike (2%)').
    """
    head = head or f"Predicted {predicted} ({percent(probability)})"
    if not cited:
        return head + ", with no single neuron standing out as positive evidence."
    named = [short_name((names or {}).get(n.neuron_id, n.concept)) for n in cited]
    offline = {is_offline for _, is_offline in named}
    mark = "*" if offline == {True, False} else ""
    shares: dict[str, list[float]] = {}
    for n, (name, is_offline) in zip(cited, named):
        shares.setdefault(name + (mark if is_offline else ""), []).append(n.share)
    ranked = sorted(shares.items(), key=lambda item: -sum(item[1]))  # stable: ties keep the contribution order
    parts = [f"{concept} ({percent(sum(s))}{f', {len(s)} neurons' if len(s) > 1 else ''})" for concept, s in ranked]
    listed = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    note = (" (* offline label, from statistics)" if mark else
            " (offline labels, from statistics)" if offline == {True} else "")
    return f"{head} mainly because of {listed}{note}."


def top5(probs: torch.Tensor, class_names: Sequence[str]) -> list[dict]:
    """The five most probable classes as ``[{"class", "index", "probability"}]``, highest first."""
    top_p, top_i = probs.topk(min(5, len(probs)))
    return [{"class": class_names[int(i)], "index": int(i), "probability": float(p)} for p, i in zip(top_p, top_i)]


def random_active_sets(active: np.ndarray, size: int, draws: int, rng: np.random.Generator) -> list[np.ndarray]:
    """``draws`` random subsets of ``size`` active neurons (all of them when fewer).

    Drawn from every active neuron, the cited ones included: a random choice, the null a
    reader would make; it shares a neuron with the cited set now and then, which narrows
    the cited-vs-random gap (conservative), never widens it.
    """
    size = min(size, len(active))
    return [rng.choice(active, size=size, replace=False) for _ in range(draws)] if size else []


def faithfulness(models: Models, analysis: Analysis, b: int, pred: int, cited_ids: list[int],
                 rng: np.random.Generator, n_random: int, image: np.ndarray | None = None,
                 ink_share: float = evidence.INK_SHARE) -> tuple[dict, np.ndarray | None]:
    """Two checks of the cited neurons against ``n_random`` sets of as many random active ones.

    In the code (``code_*``): the logit's drop when the neurons are zeroed in the SAE code
    and the head reruns. A consistency check, true by construction: the head is linear and
    the cited neurons are the largest contributions, so no other set can drop more.
    On the input (``input_*``, ``cam_drop``, with ``image``): the drop after whiting out
    ``ink_share`` of the sketch's ink where the neurons fire (token maps times pixel
    attribution, :func:`evidence.concept_scores`), rerunning the whole
    classifier; evidence, since it could come out no better than random or than CAM.
    Returns the ``faithfulness`` fields and the ink the input check removed (None without it).
    """
    if not cited_ids:
        return {"code_cited_drop": 0.0, "code_random_drop": 0.0, "random_is_cited": False}, None
    active_ids = torch.nonzero(analysis.z_mean[b] > 0).flatten().cpu().numpy()
    random_sets = random_active_sets(active_ids, len(cited_ids), n_random, rng)
    ablated = ablated_logits(models, analysis, b, [[], cited_ids] + random_sets, pred)
    out = {"code_cited_drop": float(ablated[0] - ablated[1]),
           "code_random_drop": float(np.mean(ablated[0] - ablated[2:])) if random_sets else 0.0,
           # every active neuron cited: each "random" set is the cited set, so both drops match and say nothing
           "random_is_cited": bool(len(active_ids) <= len(cited_ids))}
    if image is None:
        return out, None
    drops, removed = evidence.input_deletion(models, image, analysis, b, cited_ids, pred, random_sets, ink_share,
                                             with_mask=True)
    return out | drops, removed


def cite(models: Models, analysis: Analysis, b: int, contrib: torch.Tensor, concepts: dict[int, str],
         names: dict[int, str] | None, n_cite: int) -> list[CitedNeuron]:
    """The ``n_cite`` neurons with the largest positive ``contrib`` (M,), each with its share of the positive
    total and its token map."""
    positive_total = float(contrib.clamp_min(0).sum())
    order = torch.argsort(contrib, descending=True)
    cited_ids = [int(i) for i in order[:n_cite] if contrib[i] > 0]
    maps = evidence.token_maps(analysis, b, cited_ids)  # (n, H, W): where each cited neuron fired
    return [CitedNeuron(i, concept_of(concepts, i), float(analysis.z_mean[b, i]), float(analysis.z_max[b, i]),
                        float(contrib[i]), float(contrib[i]) / positive_total if positive_total > 0 else 0.0,
                        maps[k], *short_name((names or {}).get(i) or concept_of(concepts, i)))
            for k, i in enumerate(cited_ids)]


VERSUS_RUNNER_UP = "runner_up"


def versus_index(models: Models, versus: str) -> int | None:
    """The class a contrast is drawn against: None for the runner-up (it depends on the image), else the
    index of the class named (a UserError naming the closest class for an unknown one)."""
    if versus in models.class_names:  # a class of that name wins, even one called runner_up
        return models.class_names.index(versus)
    if versus == VERSUS_RUNNER_UP:
        return None
    folded = [i for i, name in enumerate(models.class_names) if name.casefold() == versus.strip().casefold()]
    if len(folded) == 1:  # 'Cat' or ' cat' for cat: one class only, so no guess between two
        return folded[0]
    hint = closest(versus, [*models.class_names, VERSUS_RUNNER_UP])
    raise UserError(f"VERSUS must be '' (off), {VERSUS_RUNNER_UP} or one of the classifier's "
                    f"{len(models.class_names)} classes, got '{versus}'" + (f" (did you mean {hint}?)" if hint else ""))


def runner_up(logits: torch.Tensor, pred: int) -> int:
    """The most likely class other than ``pred`` (a tie with ``pred`` cannot name ``pred`` itself); ``pred``
    for a one-class model."""
    if len(logits) < 2:
        return pred
    others = logits.clone()
    others[pred] = -torch.inf
    return int(others.argmax())


def contrast(models: Models, analysis: Analysis, b: int, pred: int, other: int, concepts: dict[int, str],
             names: dict[int, str] | None, n_cite: int, blank: bool = False) -> tuple[dict, list[CitedNeuron]]:
    """Why ``pred`` rather than ``other``: the margin ``logit[pred] − logit[other]`` decomposed exactly as the
    logit is, neuron i giving ``mean_tokens(z_i) · (lens[i, pred] − lens[i, other])``.

    A part both classes hold adds to both logits and cancels here (exactly, where the classifier weighs it
    alike for both), so the neurons cited are those that tell the two classes apart. ``margin = cited +
    others + bias + error`` (an identity, as for the logit). Returns the JSON's ``versus`` block and the
    cited neurons (with their heat maps, for the overlay); with ``blank`` (a page without ink) the block
    says so instead of citing neurons for a guess.
    """
    if other == pred:
        return {"class": models.class_names[other], "index": other,
                "skipped": "it is the predicted class: nothing to contrast"}, []
    if blank:
        return {"class": models.class_names[other], "index": other,
                "skipped": "a blank page: no concept explains either class"}, []
    contrib = (analysis.z_mean[b] * (models.lens[:, pred] - models.lens[:, other])).double()
    cited = cite(models, analysis, b, contrib, concepts, names, n_cite)
    prob = float(analysis.probs[b, other])
    head = f"{models.class_names[pred]} rather than {models.class_names[other]} ({percent(prob)})"
    block = {"class": models.class_names[other], "index": other, "probability": prob,
             "margin": float(analysis.logits[b, pred] - analysis.logits[b, other]),
             "neurons": [{**{k: v for k, v in asdict(n).items() if k != "heatmap"}, "where": describe_map(n.heatmap)}
                         for n in cited],
             "others": float(contrib.sum()) - sum(n.contribution for n in cited),
             "bias": float(models.bias[pred] - models.bias[other]),
             "error": float(analysis.error[b, pred] - analysis.error[b, other]),
             "sentence": compose_sentence(models.class_names[pred], 0.0, cited, names, head=head)}
    return block, cited


def explain_one(models: Models, analysis: Analysis, b: int, name: str, concepts: dict[int, str],
                settings: ExplainSettings = ExplainSettings(), index: int | None = None,
                image: np.ndarray | None = None, names: dict[int, str] | None = None) -> Explanation:
    """Build image ``b``'s explanation from a batch :class:`Analysis`.

    ``concepts`` name the cited neurons; ``names`` (short ones, :func:`concepts.concepts_and_names`) name them
    in the sentence.

    The random draws are seeded by ``settings.seed`` and the sketch's pixels (``image``; without it ``index``,
    default ``b``), so an image gets the same draws, and the same explanation, wherever it stands in a list or
    batch. With ``image`` (its uint8 sketch) and ``settings.input_check``, the faithfulness block gains the
    input-space evidence.
    """
    probs, pred = analysis.probs[b], int(analysis.logits[b].argmax())
    contrib = (analysis.z_mean[b] * models.lens[:, pred]).double()
    cited = cite(models, analysis, b, contrib, concepts, names, settings.n_cite)
    cited_ids = [n.neuron_id for n in cited]
    draws_key = zlib.crc32(image.tobytes()) if image is not None else (b if index is None else index)
    rng = np.random.default_rng([settings.seed, draws_key])
    extra, versus_cited = {}, None
    if settings.active is not None:
        ids, scores, threshold = most_active(analysis, b, settings.active)
        extra["top_active"] = {"agg": settings.active.agg, "percentile": settings.active.percentile,
                               "threshold": threshold, "neuron_ids": ids, "scores": scores}
    prob, cls = float(probs[pred]), models.class_names[pred]
    blank = blank_sentence(cls, prob, image)
    if blank:  # no ink to white out: the input check would measure nothing (0% removed, drop -0.000)
        extra["blank"] = True
    if settings.versus:
        other = versus_index(models, settings.versus)
        other = runner_up(analysis.logits[b], pred) if other is None else other  # a one-class model: skipped
        extra["versus"], versus_cited = contrast(models, analysis, b, pred, other, concepts, names, settings.n_cite,
                                                 bool(blank))
    faith, removed = faithfulness(models, analysis, b, pred, cited_ids, rng, settings.n_random,
                                  image if settings.input_check and not blank else None, settings.ink_share)
    return Explanation(
        image=name, predicted_class=cls, predicted_index=pred, probability=prob,
        top5=top5(probs, models.class_names), logit=float(analysis.logits[b, pred]), neurons=cited,
        others=float(contrib.sum()) - sum(n.contribution for n in cited), bias=float(models.bias[pred]),
        error=float(analysis.error[b, pred]),
        faithfulness=faith, sentence=blank or compose_sentence(cls, prob, cited, names),
        extra=extra, removed_ink=removed, versus_neurons=versus_cited, sketch=image)


def require_own_report(models: Models, report_dir: str | Path) -> None:
    """Refuse a report that stage 3 made for another SAE (``summary.json``'s fingerprint).

    Its concepts would all be set aside (neurons named by id, the explanation still printed) and the
    familiarity calibration refitted into it for these models: the sign that the checkpoint flags
    were forgotten was one log line. A report without a recorded fingerprint is read as before.
    """
    found, own = report_fingerprint(report_dir), models.sae_ckpt["fingerprint"]
    if found is not None and found != own:
        raise UserError(f"REPORT_DIR={report_dir} describes another SAE (fingerprint {found}; SAE_CKPT's is {own}): "
                        "pass the --classifier_ckpt and --sae_ckpt that made it, or rerun sae_summarize.py "
                        "(and sae_summary_to_llm.py) for these models")


NO_VERDICT = {"familiarity": None, "unfamiliar": None}  # the familiarity keys when no judge ran (FAMILIARITY off)


def explain_images(images: Sequence, classifier_ckpt: str | Path = artifacts.CLASSIFIER_CKPT,
                   sae_ckpt: str | Path = artifacts.SAE_CKPT, report_dir: str | Path = artifacts.REPORT_DIR,
                   device: str | torch.device = "auto", batch_size: int = 64,
                   judge: Callable[[Analysis, np.ndarray], list[dict]] | None = None,
                   **settings) -> list[Explanation]:
    """Explain several images (paths, PIL images or arrays: :func:`to_uint8`), batched through the models.

    ``settings`` are the fields of :class:`ExplainSettings` (``n_cite``, ``n_random``,
    ``seed``, ``active``, ``input_check``, ``ink_share``, ``versus``). ``judge(analysis, uint8 batch)`` returns one dict per image that
    goes into the explanation as is (the familiarity calibration's ``judge`` adds
    ``familiarity`` and ``unfamiliar``), so checks of the input reuse the same forward pass; without one those
    two keys are None (the JSON's null: no verdict was made).
    """
    if batch_size < 1:
        raise UserError(f"need BATCH_SIZE >= 1, got {batch_size}")
    options = ExplainSettings.from_kwargs(settings)
    models = load_models(classifier_ckpt, sae_ckpt, device)
    require_own_report(models, report_dir)
    if options.versus:
        versus_index(models, options.versus)  # an unknown class fails before any image is explained
    concepts, short_names = concepts_and_names(report_dir, models.sae_ckpt["fingerprint"])  # of this SAE only
    out = []
    for start in range(0, len(images), batch_size):
        place = start if len(images) > 1 else None  # several arrays: <array 0>, <array 1>, ...
        batch, names = to_uint8(images[start:start + batch_size], models.image_size, place)
        analysis = analyse(models, batch)
        verdicts = judge(analysis, batch) if judge is not None else [NO_VERDICT] * len(batch)
        for b in range(len(batch)):
            exp = explain_one(models, analysis, b, names[b], concepts, options, start + b, batch[b], short_names)
            exp.extra.update(verdicts[b])
            out.append(exp)
    return out


def explain_image(pil_or_path, classifier_ckpt: str | Path = artifacts.CLASSIFIER_CKPT,
                  sae_ckpt: str | Path = artifacts.SAE_CKPT, report_dir: str | Path = artifacts.REPORT_DIR,
                  device: str | torch.device = "auto", **settings) -> Explanation:
    """Explain one image; see the module docstring for what every field means."""
    return explain_images([pil_or_path], classifier_ckpt, sae_ckpt, report_dir, device, **settings)[0]


def top_neuron_ids_for_image(pil_or_path, classifier_ckpt: str | Path = artifacts.CLASSIFIER_CKPT,
                             sae_ckpt: str | Path = artifacts.SAE_CKPT, N: int = 20, percentile: float = 99.0,
                             agg: str = "max", device: str | torch.device = "auto"):
    """The image's most active SAE neurons.

    Scores are ``agg`` (max | mean | sum) over tokens of the sparse code, one per neuron;
    ``threshold = np.percentile(scores, percentile)`` over this image's M scores.

    Returns
    -------
    (ids, scores, threshold, predicted_class, predicted_prob, top5) where ``ids`` are the
    neurons with score >= threshold and > 0, highest first, at most ``N``; ``scores``
    their scores; ``top5`` a list of ``{"class", "index", "probability"}``.
    """
    query = MostActive(N, percentile, agg)
    models = load_models(classifier_ckpt, sae_ckpt, device)
    batch, _ = to_uint8([pil_or_path], models.image_size)
    analysis = analyse(models, batch)
    ids, scores, threshold = most_active(analysis, 0, query)
    probs = analysis.probs[0]
    pred = int(probs.argmax())
    return ids, scores, threshold, models.class_names[pred], float(probs[pred]), top5(probs, models.class_names)


def unfamiliar_note(explanation: Explanation) -> str | None:
    """The one-line warning the text, the overlay and the page show for an unfamiliar input, else None."""
    if not explanation.extra.get("unfamiliar"):
        return None
    more = 100.0 - float(explanation.extra.get("familiarity", 0.0))
    return (f"unfamiliar input: less familiar than {more:.1f}% of validation sketches; "
            "the prediction and its explanation may not mean much")


# ----------------------------------------------------------------------------- overlay
# a PNG text chunk on every saved overlay: a folder that holds them (--overlay=dir/ --image=dir/) is read
# again without them, so a rerun is not refused for overwriting its own inputs
OVERLAY_MARK = ("Software", "why_did_you.py overlay")
PALETTE = [(230, 25, 75), (0, 130, 200), (60, 180, 75), (245, 130, 48), (145, 30, 180),
           (70, 240, 240), (240, 50, 230), (128, 128, 0), (0, 0, 128), (170, 110, 40)]
REMOVED_RGB = (255, 190, 0)   # the outline of the ink the input check whited out (in no concept's colour)


def render_overlay(image_uint8: np.ndarray, explanation: Explanation, size: int = 384, max_concepts: int | None = None):
    """The sketch with each cited concept's heat map in its own colour, and a legend.

    Heat maps are normalised per concept; each token takes the colour of its strongest
    concept (ties to the higher-ranked), colours and strength are upsampled bilinearly,
    and pixels are tinted in proportion to that strength, strokes more than paper. The ink
    the input check whited out (``explanation.removed_ink``) is outlined in amber.
    Returns a PIL RGB image (:func:`overlay_image` adds the contrast's panel beside it).
    """
    neurons = explanation.neurons[:max_concepts]  # None: every cited concept, the region the evidence line tested
    if explanation.extra.get("blank"):  # as the text says: no ink, so no concept's heat to show
        neurons = []
    offline = " · concepts named offline, from statistics" if any(n.offline for n in neurons) else ""
    blank = ": a blank page, no concept explains the guess" if explanation.extra.get("blank") else ""
    head = f"{explanation.predicted_class} ({percent(explanation.probability)}){offline}{blank}"
    return _panel(image_uint8, neurons, list(range(len(neurons))), head, size, unfamiliar_note(explanation),
                  evidence_line(explanation.faithfulness), explanation.removed_ink)


def render_versus_overlay(image_uint8: np.ndarray, explanation: Explanation, size: int = 384):
    """The contrast's panel (``--versus``): where the neurons that tell the class from the other one fired,
    headed 'rather than B (q%)'; None without a contrast that cites a neuron (off, skipped, none positive).
    It carries no input check: that check tested the class's concepts, not these."""
    if not explanation.versus_neurons:  # None without --versus, [] when skipped or none positive
        return None
    versus = explanation.extra["versus"]
    offline = " · named offline" if any(n.offline for n in explanation.versus_neurons) else ""
    head = f"rather than {versus['class']} ({percent(versus['probability'])}){offline}"  # the class's panel names A
    return _panel(image_uint8, explanation.versus_neurons, versus_palette(explanation), head, size,
                  unfamiliar_note(explanation))


def versus_palette(explanation: Explanation) -> list[int]:
    """The contrast panel's :data:`PALETTE` index per cited neuron: a neuron the class's panel also shows keeps its
    colour there, the others take colours that panel does not use, so one colour names one neuron in both."""
    shown = {n.neuron_id: k for k, n in enumerate(explanation.neurons)}
    free = (k for k in itertools.count(len(explanation.neurons)) if k % len(PALETTE) not in shown.values())
    return [shown[n.neuron_id] if n.neuron_id in shown else next(free) % len(PALETTE)
            for n in explanation.versus_neurons or []]


def overlay_image(image_uint8: np.ndarray, explanation: Explanation, size: int = 384):
    """What ``--overlay`` saves: the class's panel, and the contrast's to its right when there is one."""
    panels = [p for p in (render_overlay(image_uint8, explanation, size),
                          render_versus_overlay(image_uint8, explanation, size)) if p is not None]
    if len(panels) == 1:
        return panels[0]
    gap = 12
    canvas = Image.new("RGB", (sum(p.width for p in panels) + gap, max(p.height for p in panels)), "white")
    canvas.paste(panels[0], (0, 0))
    canvas.paste(panels[1], (panels[0].width + gap, 0))
    return canvas


def _tinted(image_uint8: np.ndarray, neurons: Sequence[CitedNeuron], colour_ids: Sequence[int],
            size: int) -> np.ndarray:
    """(size, size, 3) float: the sketch tinted by the neurons' heat maps (see :func:`render_overlay`)."""
    base = np.asarray(Image.fromarray(image_uint8).convert("RGB").resize((size, size), Image.BILINEAR), np.float32)
    if not neurons:
        return base
    # each concept on its own scale, so that a quiet concept stays visible beside a loud one
    heats = torch.tensor(evidence.peak_normalised(np.stack([n.heatmap for n in neurons])),
                         dtype=torch.float32).clamp(0, 1)                                  # (k, H, W)
    # each token takes the colour of its strongest concept; ties go to the higher-ranked one
    which = (heats * 1e4).round().argmax(0)
    colours = torch.tensor([PALETTE[i % len(PALETTE)] for i in colour_ids], dtype=torch.float32)
    low = torch.cat([colours[which].permute(2, 0, 1), heats.amax(0, keepdim=True)])[None]  # (1, 4, H, W)
    up = F.interpolate(low, size=(size, size), mode="bilinear", align_corners=False)[0]
    colour, strength = up[:3].permute(1, 2, 0).numpy(), up[3:].permute(1, 2, 0).numpy()
    ink = 1.0 - base.mean(-1, keepdims=True) / 255.0
    alpha = strength * (0.3 + 0.6 * ink)  # strokes take the colour, paper a tint
    return base * (1 - alpha) + colour * alpha


def _panel(image_uint8: np.ndarray, neurons: Sequence[CitedNeuron], colour_ids: Sequence[int], head: str, size: int,
           note: str | None, check: str | None = None, removed_ink: np.ndarray | None = None):
    """One overlay panel: the tinted sketch, then the warning, the head line, one legend line per neuron
    (its colour, :data:`PALETTE` index ``colour_ids[k]``, name, share and id) and the input check's line."""
    base = _tinted(image_uint8, neurons, colour_ids, size)
    if removed_ink is not None:
        base = np.where(outline(removed_ink, size)[..., None], np.float32(REMOVED_RGB), base)
    font = ImageFont.load_default()
    line = 16
    top = 2 + (2 * line if note else 0)  # the warning takes two lines above the legend
    canvas = Image.new("RGB", (size, size + top + line * (len(neurons) + 1 + bool(check)) + 8), "white")
    canvas.paste(Image.fromarray(base.clip(0, 255).astype(np.uint8)), (0, 0))
    draw = ImageDraw.Draw(canvas)
    if note:
        cut = note.index(";") + 1
        draw.text((4, size + 2), note[:cut], fill=(200, 0, 0), font=font)
        draw.text((4, size + 2 + line), note[cut:].strip(), fill=(200, 0, 0), font=font)
    draw.text((4, size + top), fit_text(draw, head, font, size - 8), fill="black", font=font)
    for k, n in enumerate(neurons):
        y = size + top + line * (k + 1)
        draw.rectangle([4, y + 2, 14, y + 12], fill=PALETTE[colour_ids[k] % len(PALETTE)])
        share = f" ({percent(n.share)}, #{n.neuron_id})"  # the id tells apart neurons that share a concept
        label = fit_text(draw, n.name or n.concept, font, size - 24 - draw.textlength(share, font=font))
        draw.text((20, y), label + share, fill="black", font=font)
    if check:
        y = size + top + line * (len(neurons) + 1)
        left = 4
        if removed_ink is not None:
            draw.rectangle([4, y + 2, 14, y + 12], outline=REMOVED_RGB, width=2)
            left = 20
        draw.text((left, y), fit_text(draw, check, font, size - left - 4), fill=(90, 90, 90), font=font)
    return canvas


def outline(mask: np.ndarray, size: int) -> np.ndarray:
    """(size, size) bool: a 2-pixel ring just outside a mask (S, S) scaled to ``size`` (nearest)."""
    rows = np.arange(size) * mask.shape[0] // size
    cols = np.arange(size) * mask.shape[1] // size
    up = np.asarray(mask, dtype=bool)[rows][:, cols]
    grown = up.copy()
    for axis in (0, 1):       # a 5 x 5 maximum filter, one axis at a time (0.2 ms here; PIL's MaxFilter 4.6 ms)
        step = grown.copy()
        for d in (1, 2):
            lead, lag = [slice(None)] * 2, [slice(None)] * 2
            lead[axis], lag[axis] = slice(d, None), slice(None, -d)
            step[tuple(lead)] |= grown[tuple(lag)]
            step[tuple(lag)] |= grown[tuple(lead)]
        grown = step
    return grown & ~up


def fit_text(draw, text: str, font, width: float) -> str:
    """``text`` cut at a word boundary (with "...", which every font has) so that it fits ``width`` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    words = text.split()
    while len(words) > 1 and draw.textlength(" ".join(words) + "...", font=font) > width:
        words.pop()
    cut = " ".join(words).rstrip(",;:")
    while len(cut) > 1 and draw.textlength(cut + "...", font=font) > width:  # one word wider than the room
        cut = cut[:-1]
    return cut + "..."


def evidence_line(faith: dict) -> str | None:
    """The input-space check in one short line (overlay legend), or None when it did not run."""
    if "input_cited_drop" not in faith:
        return None
    pixels = f", CAM pixels -{faith['cam_pixels_drop']:.2f}" if faith.get("cam_pixels_drop") is not None else ""
    random = "random: all cited" if faith.get("random_is_cited") else f"random -{faith['input_random_drop']:.2f}"
    return (f"ink {faith['ink_removed']:.0%} removed: logit -{faith['input_cited_drop']:.2f} "
            f"({random}, CAM cells -{faith['cam_drop']:.2f}{pixels})")


def save_overlay(image_uint8: np.ndarray, explanation: Explanation, path: str | Path) -> Path:
    """Render the overlay and write it atomically as PNG, marked (:data:`OVERLAY_MARK`) as this tool's output."""
    return artifacts.atomic_write_bytes(path, png_bytes(overlay_image(image_uint8, explanation),
                                                        text=dict([OVERLAY_MARK])))
