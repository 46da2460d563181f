"""Explain one prediction through the SAE: exact evidence per neuron, concepts, faithfulness.

With the classifier head ``logits = W·GAP(A) + b`` and the SAE reconstruction
``Â = σ ⊙ (D z + b_d) + μ`` (per token, ``z`` the Top-K code the SAE uses at inference),
every class logit splits exactly into

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
  head, beside the mean drop for as many random *active* neurons (several seeded draws).

Models load once per process (:func:`load_models` caches them by resolved path, mtime
and device); importing this module reads nothing from disk.
"""
from __future__ import annotations

import io
import json
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from . import artifacts, data
from .errors import UserError
from .distributed import resolve_device
from .sae import bias_logits, logit_lens

AGGS = ("max", "mean", "sum")
LOAD_COUNT = {"models": 0, "concepts": 0}  # how often files were really read (tests check the cache)
_MODEL_CACHE: dict = {}
_CONCEPT_CACHE: dict = {}
_CACHE_SIZE = 2  # model pairs kept per process (a notebook may switch between two runs)


# ----------------------------------------------------------------------------- models
@dataclass
class Models:
    """A classifier + SAE pair ready for explanations, with the precomputed logit lens."""

    classifier: torch.nn.Module
    classifier_ckpt: dict
    sae: torch.nn.Module
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


def load_models(classifier_ckpt: str | Path, sae_ckpt: str | Path, device: str | torch.device = "auto") -> Models:
    """Load (or reuse) a matching classifier/SAE pair; a mismatched pair is a :class:`UserError`.

    The cache key is (resolved path, mtime) of both files and the device, so a retrained
    checkpoint at the same path is picked up, and repeated calls cost nothing.
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
    LOAD_COUNT["models"] += 1
    while len(_MODEL_CACHE) >= _CACHE_SIZE:
        _MODEL_CACHE.pop(next(iter(_MODEL_CACHE)))
    _MODEL_CACHE[key] = models
    return models


# ----------------------------------------------------------------------------- concepts
def load_concepts(report_dir: str | Path, quiet: bool = False) -> dict[int, str]:
    """``{neuron_id: concept}``: stage 4's LLM answer, else stage 3's ``auto_summary``.

    Neurons in neither file are named ``"neuron <id>"`` by :func:`concept_of`. When both
    files are missing, a one-line notice goes to stderr (stdout may carry JSON).
    """
    report = Path(report_dir)
    llm_path, stats_path = report / "llm_output.jsonl", report / "neurons.jsonl"
    key = (_file_key(llm_path), _file_key(stats_path))
    if key in _CONCEPT_CACHE:
        return _CONCEPT_CACHE[key]
    concepts = {}
    for record in artifacts.read_jsonl(stats_path):
        if isinstance(record.get("neuron_id"), int) and isinstance(record.get("auto_summary"), str):
            concepts[record["neuron_id"]] = record["auto_summary"]
    if llm_path.is_file():
        from .llm import load_concepts as load_llm_concepts  # lazy: stage 4 code only when its output exists

        concepts.update({i: a for i, a in load_llm_concepts(report).items() if a.strip()})
    if not llm_path.is_file() and not stats_path.is_file() and not quiet:
        print(f"note: no concepts in {report} (run sae_summarize.py and sae_summary_to_llm.py); "
              "neurons are named by id", file=sys.stderr)
    LOAD_COUNT["concepts"] += 1
    _CONCEPT_CACHE.clear()  # one report folder at a time is plenty
    _CONCEPT_CACHE[key] = concepts
    return concepts


def concept_of(concepts: dict[int, str], neuron_id: int) -> str:
    return concepts.get(int(neuron_id)) or f"neuron {int(neuron_id)}"


# ----------------------------------------------------------------------------- analysis
@dataclass
class Analysis:
    """Everything one batch pass yields; B images, T = H*W tokens, M latents."""

    logits: torch.Tensor       # (B, classes) from the real forward pass
    probs: torch.Tensor        # (B, classes)
    values: torch.Tensor       # (B, T, K) Top-K code values
    indices: torch.Tensor      # (B, T, K) their latent ids
    z_mean: torch.Tensor       # (B, M) mean over tokens of the Top-K code
    z_max: torch.Tensor        # (B, M) max over tokens
    z_sum: torch.Tensor        # (B, M) sum over tokens
    residual: torch.Tensor     # (B, C, H, W) the SAE error map A - Â
    error: torch.Tensor        # (B, classes) W · GAP(A - Â)
    hw: tuple[int, int]


def to_uint8(images: Sequence, image_size: int) -> tuple[np.ndarray, list[str]]:
    """Paths, PIL images or uint8 (S, S) arrays -> a uint8 batch (B, S, S) and display names."""
    arrays, names = [], []
    for item in images:
        if isinstance(item, np.ndarray):
            if item.dtype != np.uint8 or item.shape != (image_size, image_size):
                raise UserError(f"array input must be uint8 ({image_size}, {image_size}), got {item.dtype} {item.shape}")
            arrays.append(item)
            names.append("<array>")
        else:
            arrays.append(data.load_user_image(item, image_size))
            names.append(str(item) if isinstance(item, (str, Path)) else "<PIL image>")
    return np.stack(arrays), names


@torch.no_grad()
def analyse(models: Models, batch_uint8: np.ndarray) -> Analysis:
    """One fp32 pass: classifier features and logits, SAE code, reconstruction error."""
    clf, sae = models.classifier, models.sae
    x = data.model_input(torch.from_numpy(np.ascontiguousarray(batch_uint8)), models.classifier_ckpt["preprocess"], models.device)
    fmap = clf.features(x).float()
    logits = clf.head(fmap).float()
    b, c, h, w = fmap.shape
    values, indices = sae.encode_topk(sae.map_to_tokens(fmap))
    recon = sae.unstandardize(sae.decode_sparse(values, indices)).reshape(b, h, w, c).permute(0, 3, 1, 2)
    residual = fmap - recon
    error = residual.mean(dim=(2, 3)) @ clf.fc.weight.float().t()
    values, indices = values.reshape(b, h * w, -1), indices.reshape(b, h * w, -1)
    # per-image sums and maxima over tokens straight from the sparse code (no dense (B, T, M) tensor)
    zeros = torch.zeros(b, sae.n_latents, device=fmap.device)
    z_sum = zeros.scatter_add(1, indices.flatten(1), values.flatten(1))
    z_max = zeros.scatter_reduce(1, indices.flatten(1), values.flatten(1), "amax")  # codes are >= 0
    return Analysis(logits, logits.softmax(-1), values, indices, z_sum / (h * w), z_max, z_sum, residual, error, (h, w))


def token_scores(analysis: Analysis, agg: str) -> torch.Tensor:
    """Per-neuron scores (B, M): max, mean or sum over tokens of the Top-K code."""
    if agg not in AGGS:
        raise UserError(f"AGG must be one of {', '.join(AGGS)}, got {agg!r}")
    return {"max": analysis.z_max, "mean": analysis.z_mean, "sum": analysis.z_sum}[agg]


def most_active(scores: torch.Tensor, n: int, percentile: float) -> tuple[list[int], list[float], float]:
    """Neurons with score >= the ``percentile`` of this image's M scores and > 0, highest first, at most ``n``."""
    scores = scores.cpu().numpy().astype(np.float64)
    threshold = float(np.percentile(scores, percentile))
    keep = np.flatnonzero((scores >= threshold) & (scores > 0))
    keep = keep[np.argsort(-scores[keep], kind="stable")][:n]
    return [int(i) for i in keep], [float(scores[i]) for i in keep], threshold


def heatmap(analysis: Analysis, b: int, neuron_id: int) -> np.ndarray:
    """Neuron ``neuron_id``'s Top-K code per token of image ``b``, as an (H, W) map."""
    hit = (analysis.indices[b] == neuron_id)
    per_token = (analysis.values[b] * hit).sum(-1)
    return per_token.reshape(analysis.hw).cpu().numpy()


@torch.no_grad()
def ablated_logits(models: Models, analysis: Analysis, b: int, neuron_sets: Sequence[Sequence[int]],
                   cls: int) -> np.ndarray:
    """Class ``cls``'s logit after zeroing each set of neurons in image ``b``'s code.

    A real head pass: the edited code is decoded, mapped back to layer4 space, the
    fixed error map ``A − Â`` is added, and the classifier's ``head`` runs on it.
    """
    sae, (h, w) = models.sae, analysis.hw
    values, indices = analysis.values[b], analysis.indices[b]          # (T, K)
    edited = []
    for ids in neuron_sets:
        drop = torch.isin(indices, torch.as_tensor(list(ids), dtype=indices.dtype, device=indices.device))
        edited.append(values.masked_fill(drop, 0.0))
    vals = torch.stack(edited)                                         # (S, T, K)
    s, t, k = vals.shape
    recon = sae.unstandardize(sae.decode_sparse(vals.reshape(s * t, k), indices.repeat(s, 1)))
    maps = recon.reshape(s, h, w, -1).permute(0, 3, 1, 2) + analysis.residual[b]
    return models.classifier.head(maps)[:, cls].float().cpu().numpy()


# ----------------------------------------------------------------------------- explanations
@dataclass
class CitedNeuron:
    neuron_id: int
    concept: str
    activation: float          # mean over tokens of the Top-K code
    activation_max: float      # max over tokens
    contribution: float        # exact contribution to the predicted logit
    share: float               # contribution / sum of all positive contributions
    heatmap: np.ndarray = field(repr=False, default=None)  # (H, W) code per token


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
    extra: dict = field(default_factory=dict)  # e.g. true_class, llm_sentence

    def to_dict(self, heatmaps: bool = False) -> dict:
        out = {k: v for k, v in asdict(self).items() if k not in ("neurons", "extra")}
        out["neurons"] = [{k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in asdict(n).items()
                           if heatmaps or k != "heatmap"} for n in self.neurons]
        out.update(self.extra)
        return out

    def to_json(self, heatmaps: bool = False) -> str:
        """One line of JSON (the CLI prints one per image)."""
        return json.dumps(self.to_dict(heatmaps), ensure_ascii=False)


def compose_sentence(predicted: str, probability: float, cited: Sequence[CitedNeuron]) -> str:
    """'Predicted bicycle (97%) mainly because of wheel (41%), triangle (22%) and spokes (9%).'"""
    head = f"Predicted {predicted} ({probability:.0%})"
    if not cited:
        return head + ", with no single neuron standing out as positive evidence."
    parts = [f"{n.concept} ({n.share:.0%})" for n in cited]
    listed = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return f"{head} mainly because of {listed}."


def random_active_sets(active: np.ndarray, size: int, draws: int, rng: np.random.Generator) -> list[np.ndarray]:
    """``draws`` random subsets of ``size`` active neurons (all of them when fewer)."""
    size = min(size, len(active))
    return [rng.choice(active, size=size, replace=False) for _ in range(draws)] if size else []


def explain_one(models: Models, analysis: Analysis, b: int, name: str, concepts: dict[int, str],
                n_cite: int = 5, n_random: int = 8, seed: int = 0, index: int | None = None,
                active: tuple[int, float, str] | None = None) -> Explanation:
    """Build image ``b``'s explanation from a batch :class:`Analysis`.

    ``index`` (default ``b``) seeds the random draws with ``seed``, so an image gets the
    same draws whatever batch it lands in. ``active = (n, percentile, agg)`` also records
    the most active neurons (as :func:`top_neuron_ids_for_image`) in ``extra["top_active"]``.
    """
    probs = analysis.probs[b]
    pred = int(analysis.logits[b].argmax())
    top_p, top_i = probs.topk(min(5, len(probs)))
    contrib = (analysis.z_mean[b] * models.lens[:, pred]).double()
    positive_total = float(contrib.clamp_min(0).sum())
    order = torch.argsort(contrib, descending=True)
    cited_ids = [int(i) for i in order[:max(0, n_cite)] if contrib[i] > 0]
    cited = [CitedNeuron(i, concept_of(concepts, i), float(analysis.z_mean[b, i]), float(analysis.z_max[b, i]),
                         float(contrib[i]), float(contrib[i]) / positive_total if positive_total > 0 else 0.0,
                         heatmap(analysis, b, i)) for i in cited_ids]
    active_ids = torch.nonzero(analysis.z_mean[b] > 0).flatten().cpu().numpy()
    rng = np.random.default_rng([seed, b if index is None else index])
    sets = [[], cited_ids] + random_active_sets(active_ids, len(cited_ids), n_random, rng)
    ablated = ablated_logits(models, analysis, b, sets, pred) if cited_ids else np.zeros(1)
    faith = {"cited_drop": float(ablated[0] - ablated[1]) if cited_ids else 0.0,
             "random_drop": float(np.mean(ablated[0] - ablated[2:])) if len(ablated) > 2 else 0.0}
    cited_sum = sum(n.contribution for n in cited)
    prob, cls = float(probs[pred]), models.class_names[pred]
    return Explanation(
        image=name, predicted_class=cls, predicted_index=pred, probability=prob,
        top5=[{"class": models.class_names[int(i)], "index": int(i), "probability": float(p)}
              for p, i in zip(top_p, top_i)],
        logit=float(analysis.logits[b, pred]), neurons=cited, others=float(contrib.sum()) - cited_sum,
        bias=float(models.bias[pred]), error=float(analysis.error[b, pred]), faithfulness=faith,
        sentence=compose_sentence(cls, prob, cited), extra=_top_active(analysis, b, active))


def _top_active(analysis: Analysis, b: int, active: tuple[int, float, str] | None) -> dict:
    if active is None:
        return {}
    n, percentile, agg = active
    ids, scores, threshold = most_active(token_scores(analysis, agg)[b], n, percentile)
    return {"top_active": {"agg": agg, "percentile": percentile, "threshold": threshold,
                           "neuron_ids": ids, "scores": scores}}


def explain_images(images: Sequence, classifier_ckpt: str | Path = "runs/standard_cnn/best.pt",
                   sae_ckpt: str | Path = "runs/sae_topk/best_sae.pt", report_dir: str | Path = "neuron_report",
                   n_cite: int = 5, n_random: int = 8, seed: int = 0, device: str = "auto",
                   batch_size: int = 64, active: tuple[int, float, str] | None = None) -> list[Explanation]:
    """Explain several images (paths, PIL images or uint8 arrays), batched through the models.

    ``active = (n, percentile, agg)`` adds the most active neurons to each explanation.
    """
    models = load_models(classifier_ckpt, sae_ckpt, device)
    concepts = load_concepts(report_dir)
    out = []
    for start in range(0, len(images), batch_size):
        batch, names = to_uint8(images[start:start + batch_size], models.image_size)
        analysis = analyse(models, batch)
        out += [explain_one(models, analysis, b, names[b], concepts, n_cite, n_random, seed, start + b, active)
                for b in range(len(batch))]
    return out


def explain_image(pil_or_path, classifier_ckpt: str | Path = "runs/standard_cnn/best.pt",
                  sae_ckpt: str | Path = "runs/sae_topk/best_sae.pt", report_dir: str | Path = "neuron_report",
                  n_cite: int = 5, n_random: int = 8, seed: int = 0, device: str = "auto") -> Explanation:
    """Explain one image; see the module docstring for what every field means."""
    return explain_images([pil_or_path], classifier_ckpt, sae_ckpt, report_dir, n_cite, n_random, seed, device)[0]


def check_percentile(percentile: float, n: int) -> None:
    if not 0 <= percentile <= 100 or n < 1:
        raise UserError(f"need 0 <= PERCENTILE <= 100 and N >= 1, got {percentile}, {n}")


def top_neuron_ids_for_image(pil_or_path, classifier_ckpt: str | Path = "runs/standard_cnn/best.pt",
                             sae_ckpt: str | Path = "runs/sae_topk/best_sae.pt", N: int = 20,
                             percentile: float = 99.0, agg: str = "max", device: str = "auto"):
    """The image's most active SAE neurons.

    Scores are ``agg`` (max | mean | sum) over tokens of the Top-K code, one per neuron;
    ``threshold = np.percentile(scores, percentile)`` over this image's M scores.

    Returns
    -------
    (ids, scores, threshold, predicted_class, predicted_prob, top5) where ``ids`` are the
    neurons with score >= threshold and > 0, highest first, at most ``N``; ``scores``
    their scores; ``top5`` a list of ``{"class", "index", "probability"}``.
    """
    check_percentile(percentile, N)
    models = load_models(classifier_ckpt, sae_ckpt, device)
    batch, _ = to_uint8([pil_or_path], models.image_size)
    analysis = analyse(models, batch)
    ids, scores, threshold = most_active(token_scores(analysis, agg)[0], N, percentile)
    probs = analysis.probs[0]
    top_p, top_i = probs.topk(min(5, len(probs)))
    top5 = [{"class": models.class_names[int(i)], "index": int(i), "probability": float(p)}
            for p, i in zip(top_p, top_i)]
    pred = int(top_i[0])
    return ids, scores, threshold, models.class_names[pred], float(probs[pred]), top5


# ----------------------------------------------------------------------------- overlay
PALETTE = [(230, 25, 75), (0, 130, 200), (60, 180, 75), (245, 130, 48), (145, 30, 180),
           (70, 240, 240), (240, 50, 230), (128, 128, 0), (0, 0, 128), (170, 110, 40)]


def render_overlay(image_uint8: np.ndarray, explanation: Explanation, size: int = 384, max_concepts: int = 5):
    """The sketch with each cited concept's heat map in its own colour, and a legend.

    Heat maps are normalised per concept; each token takes the colour of its strongest
    concept (ties to the higher-ranked), colours and strength are upsampled bilinearly,
    and pixels are tinted in proportion to that strength, strokes more than paper.
    Returns a PIL RGB image.
    """
    from PIL import Image, ImageDraw, ImageFont

    neurons = explanation.neurons[:max_concepts]
    base = np.asarray(Image.fromarray(image_uint8).convert("RGB").resize((size, size), Image.BILINEAR), np.float32)
    if neurons:
        heats = torch.tensor(np.stack([n.heatmap for n in neurons]), dtype=torch.float32)  # (k, H, W)
        heats = (heats / heats.flatten(1).amax(1).clamp_min(1e-8)[:, None, None]).clamp(0, 1)
        # each token takes the colour of its strongest concept; ties go to the higher-ranked one
        which = (heats * 1e4).round().argmax(0)
        colours = torch.tensor([PALETTE[i % len(PALETTE)] for i in range(len(neurons))], dtype=torch.float32)
        low = torch.cat([colours[which].permute(2, 0, 1), heats.amax(0, keepdim=True)])[None]  # (1, 4, H, W)
        up = torch.nn.functional.interpolate(low, size=(size, size), mode="bilinear", align_corners=False)[0]
        colour, strength = up[:3].permute(1, 2, 0).numpy(), up[3:].permute(1, 2, 0).numpy()
        ink = 1.0 - base.mean(-1, keepdims=True) / 255.0
        alpha = strength * (0.3 + 0.6 * ink)  # strokes take the colour, paper a tint
        base = base * (1 - alpha) + colour * alpha
    font = ImageFont.load_default()
    line = 16
    canvas = Image.new("RGB", (size, size + line * (len(neurons) + 1) + 8), "white")
    canvas.paste(Image.fromarray(base.clip(0, 255).astype(np.uint8)), (0, 0))
    draw = ImageDraw.Draw(canvas)
    draw.text((4, size + 2), f"{explanation.predicted_class} ({explanation.probability:.0%})", fill="black", font=font)
    for k, n in enumerate(neurons):
        y = size + 2 + line * (k + 1)
        draw.rectangle([4, y + 2, 14, y + 12], fill=PALETTE[k % len(PALETTE)])
        draw.text((20, y), f"{n.concept[:48]} ({n.share:.0%})", fill="black", font=font)
    return canvas


def save_overlay(image_uint8: np.ndarray, explanation: Explanation, path: str | Path) -> Path:
    """Render the overlay and write it atomically as PNG."""
    buf = io.BytesIO()
    render_overlay(image_uint8, explanation).save(buf, format="PNG")
    return artifacts.atomic_write_bytes(path, buf.getvalue())
