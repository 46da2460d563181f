"""What the LLM is told, and how its answers are read.

Every prompt is a file under ``prompts/`` in this package:

* ``concept_system.txt``: stage 4's system prompt (name the concept of one neuron);
* ``concept_user.txt``: stage 4's user message, filled with one neuron's statistics;
* ``why_system.txt``, ``why_user.txt``: stage 5's optional one-sentence answer on why a
  class was predicted.

:func:`prompt_version` hashes stage 4's two files; every answer records it, so editing a
prompt makes stage 4 ask again. An answer is untrusted text from a server:
:func:`parse_concept` keeps one short line of it, and :func:`strip_controls` removes
terminal escape sequences and other control characters before anything is printed or
stored (a class name from a dataset is treated the same way).
"""
from __future__ import annotations

import hashlib
import re
import unicodedata
from pathlib import Path
from typing import Sequence

from .errors import UserError

PROMPT_DIR = Path(__file__).with_name("prompts")
CONCEPT_PROMPTS = ("concept_system", "concept_user")  # the files prompt_version() hashes
# offline labels name a ground-truth part when a neuron detects it this well on the training sketches, and as
# well among those of classes without the part (a detector of the part's four classes scores ~0.96 on the first)
PART_AUROC = 0.8
UNCLEAR = "unclear"  # what concept_system.txt asks the model to reply when it sees no concept


class MalformedAnswer(ValueError):
    """The server answered, but not with something usable (asking again may help)."""


# ----------------------------------------------------------------------------- prompt files
def load_prompt(name: str) -> str:
    """The text of ``prompts/<name>.txt``."""
    path = PROMPT_DIR / f"{name}.txt"
    if not path.is_file():
        raise UserError(f"prompt file {path} not found")
    return path.read_text(encoding="utf-8")


def prompt_version() -> str:
    """A short hash of stage 4's prompt files, recorded with each answer."""
    digest = hashlib.sha256()
    for name in CONCEPT_PROMPTS:
        digest.update(load_prompt(name).encode())
    return digest.hexdigest()[:8]


def system_prompt(max_words: int = 12) -> str:
    """Stage 4's system prompt, asking for at most ``max_words`` words."""
    return load_prompt("concept_system").replace("{max_words}", str(max_words)).strip()


def why_system_prompt() -> str:
    """Stage 5's system prompt for the one-sentence answer."""
    return load_prompt("why_system").strip()


def fixed(x: float, digits: int = 2) -> str:
    """``x`` with ``digits`` decimals, more where rounding would show 1 or 0 for a value that is
    neither (an AUROC of 0.9996 is not "1.00")."""
    text = f"{x:.{digits}f}"
    while digits < 6 and ((float(text) == 1 and 0.5 < x < 1) or (float(text) == 0 and x > 0)):
        digits += 1
        text = f"{x:.{digits}f}"
    return text


def percent(p: float, digits: int = 0) -> str:
    """A probability as a percentage with ``digits`` decimals that never reads 100% or 0% when it
    is neither (0.996 -> "99.6%", 0.9999 -> ">99.9%"; digits=1: 0.9996 -> ">99.9%"): the header
    said 99.6%, the sentence 100%."""
    text = f"{p:.{digits}%}"
    full, none = f"{1:.{digits}%}", f"{0:.{digits}%}"
    if (text == full and p < 1) or (text == none and p > 0):
        digits = max(digits, 1)
        text = f"{p:.{digits}%}"
        text = ">99.9%" if text == f"{1:.{digits}%}" else "<0.1%" if text == f"{0:.{digits}%}" else text
    return text


def share(p: float | None) -> str:
    """A share of images as the atlas prints it: 2 decimals under 1%, else 1 (0.00052 -> "0.05%", 0.372 ->
    "37.2%"), so one card, its summary and the prompt give one number (they read 0.05% and 0.1%); "?" for None."""
    return "?" if p is None else percent(p, 2 if p < 0.01 else 1)


def why_prompt(predicted_class: str, probability: float, cited: Sequence[tuple[str, float]],
               versus: dict | None = None) -> str:
    """Stage 5's user message: the prediction and its cited ``(concept, share of the evidence)``; with
    ``versus`` (an explanation's contrast block, ``--versus``), also the other class and the concepts
    that told the two apart, asked for in the same sentence."""
    text = load_prompt("why_user").format(predicted_class=strip_controls(predicted_class),
                                          probability=percent(probability), evidence=_evidence(cited)).strip()
    if not versus or not versus.get("neurons"):  # off, skipped (the prediction itself, a blank page) or no neuron
        return text
    apart = _evidence([(n["concept"], n["share"]) for n in versus["neurons"]])
    return text + "\n\n" + load_prompt("why_versus").format(
        other_class=strip_controls(versus["class"]), other_probability=percent(versus["probability"]),
        evidence=apart, predicted_class=strip_controls(predicted_class)).strip()


def _evidence(cited: Sequence[tuple[str, float]]) -> str:
    return "; ".join(f"{strip_controls(concept)} ({percent(share)} of the evidence)"
                     for concept, share in cited) or "no single concept"


# ----------------------------------------------------------------------------- untrusted text
# ESC ] ... BEL or ST (window title, hyperlinks), ESC [ ... final byte (colours, cursor), ESC + one byte
_ESCAPES = re.compile(r"\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)?|\x1b\[[0-?]*[ -/]*[@-~]|\x1b[@-_]?")
_BIDI = frozenset("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")  # can reorder what a reader sees


def strip_controls(text: str, keep_newlines: bool = False) -> str:
    """``text`` without escape sequences, control characters or bidirectional overrides.

    Line breaks and tabs become spaces unless ``keep_newlines`` (then ``\\n`` and ``\\t`` stay).
    """
    text = _ESCAPES.sub("", str(text))
    if not keep_newlines:
        text = re.sub(r"[\t\n\r\v\f]+", " ", text)
    return "".join(ch for ch in text if ch in "\n\t" or (unicodedata.category(ch) != "Cc" and ch not in _BIDI))


_THINK = re.compile(r"<think>.*?(</think>|$)", re.S | re.I)
_CLOSE_THINK = re.compile(r"</think>", re.I)
_FENCE = re.compile(r"^\s*```[\w+-]*\s*$", re.M)  # a code fence line, with its language tag ("```text")
_PREFIX = re.compile(r"^(final answer|answer|concept|label|this neuron detects|neuron)\s*[:\-–]\s*"
                     r"|^(the concept is|the neuron detects|it detects)\s*[:\-–]?\s*"
                     r"|^(i think|i believe)\s+(?:(?:it|this)(?: is|'s)\s+)?"
                     r"|^(?:this|the) neuron (?:appears|seems) to (?:detect|respond to|fire on)\s+"
                     r"|^(?:it|this) (?:appears|seems) to (?:be|detect)\s+", re.I)
# a reply that talks before it names: "Sure! Looking at the statistics, this neuron detects "a wheel". Let me know..."
_CHATTY = re.compile(r"^(sure|certainly|of course|okay|ok|great|here|looking at|based on|from the)\b", re.I)
_QUOTED = re.compile(r"[\"“]([^\"“”]+)[\"”]")
_LABELLED = re.compile(r"^(final answer|answer|concept|label)\s*[:\-–]\s*\S", re.I)  # "**Answer:** wheel"
_REFUSAL = re.compile(r"^(i'?m sorry|i am sorry|sorry,|i cannot|i can'?t|i'?m unable|i am unable|as an ai|"
                      r"as a (large )?language model|unfortunately)", re.I)


def ends_inside_think(text: str | None) -> bool:
    """The text opens a reasoning block it never closes (a reasoning model cut off mid-thought)."""
    low = (text or "").lower()
    return "<think>" in low and "</think>" not in low.rsplit("<think>", 1)[1]


def clean_text(raw: str) -> str:
    """Strip control characters, reasoning blocks, code fences and whitespace.

    A reply that closes a reasoning block it never opened (R1-style models print only the
    ``</think>``) keeps what follows it.

    Raises
    ------
    MalformedAnswer
        Nothing is left, or the reply ends inside a reasoning block.
    """
    text = strip_controls(raw or "", keep_newlines=True)
    if _CLOSE_THINK.search(text) and "<think>" not in text.lower():
        text = _CLOSE_THINK.split(text)[-1]
    cut_off = ends_inside_think(text)
    text = _FENCE.sub("", _THINK.sub("", text)).replace("```", "").strip()
    if not text:
        raise MalformedAnswer("the answer ended inside <think> (out of tokens?)" if cut_off else "empty answer")
    return text


def _bare(line: str) -> str:
    """A line without markdown emphasis, headings, quotes and list markers."""
    line = re.sub(r"[*_`#>]+", "", line).strip()
    return re.sub(r"^(\d+[.)]|[-•])\s+", "", line)


def _clean_line(line: str) -> str:
    line = _bare(line)
    for _ in range(3):  # "Answer: Concept: ..." peels twice
        line = _PREFIX.sub("", line).strip()
    line = line.strip(" \t\"'“”‘’«»")
    return line.rstrip(".;:,!").strip(" \"'“”‘’")


def is_unclear(answer: str) -> bool:
    """True for the model's "no consistent concept" reply, alone or with a reason ("unclear - the images vary"):
    not a name to cite a neuron by. "unclear boundaries" names something."""
    text = answer.strip().strip(".\"'!").strip().lower()
    return text == UNCLEAR or re.match(rf"{UNCLEAR}\s*[-–—:;,(.]", text) is not None


def parse_concept(raw: str, max_words: int = 12) -> str:
    """The concept in a model's answer: first meaningful line, decorations removed, cut to words.

    Raises
    ------
    MalformedAnswer
        Nothing left, no letters, mostly symbols, or a refusal.
    """
    text = clean_text(raw)
    lines = [(_bare(ln), _clean_line(ln)) for ln in text.splitlines()]
    lines = [(bare, clean) for bare, clean in lines if clean]
    labelled = next(((bare, clean) for bare, clean in lines if _LABELLED.match(bare)), None)  # "## ... Answer: x"
    # else the first line that is not a lead-in ("Here is the concept:" above the answer)
    bare, line = labelled or next(((bare, clean) for k, (bare, clean) in enumerate(lines)
                                   if not (bare.endswith(":") and k + 1 < len(lines))), ("", ""))
    line = _named_in_prose(bare, line, max_words)
    words = line.split()
    if len(words) > max_words:
        line = " ".join(words[:max_words]).rstrip(".;:,!-–")
    letters = sum(ch.isalpha() for ch in line)
    if letters < 2 or letters < 0.4 * len(line.replace(" ", "")) or _REFUSAL.match(line):
        raise MalformedAnswer(f"unusable answer {strip_controls(raw)[:80]!r}")
    return line


def _named_in_prose(bare: str, line: str, max_words: int) -> str:
    """The concept of a reply that wraps it in prose: its quoted span when the line opens with it, runs past
    ``max_words`` or opens with small talk ("Sure! ... detects "a wheel". Let me know"); small talk with no
    quote is a :class:`MalformedAnswer` (asked again; kept cut to 12 words, it read "Sure! Looking at the ...")."""
    chatty, quoted = _CHATTY.match(bare), _QUOTED.search(bare)
    if quoted and 0 < len(quoted.group(1).split()) <= max_words and (
            chatty or len(line.split()) > max_words or bare.lstrip()[:1] in "\"“"):
        return _clean_line(quoted.group(1))
    if chatty and len(line.split()) > max_words:
        raise MalformedAnswer(f"a sentence, not a concept of at most {max_words} words: {strip_controls(bare)[:80]!r}")
    return line


# ----------------------------------------------------------------------------- stage 4 messages
def _class_name(entry: dict) -> str:
    return strip_controls(entry.get("class") or f"class {entry.get('index', '?')}")


def _fmt(value, spec: str, scale: float = 1.0) -> str:
    return "?" if value is None else format(scale * value, spec)


def _examples_line(neuron: dict, attached: Sequence[dict]) -> str:
    """What the message says about the neuron's strongest sketches (attached or only named)."""
    if not attached:
        listed = ", ".join(f"{_class_name(e)} ({_fmt(e.get('activation'), '.2f')})"
                           for e in neuron.get("top_examples", [])[:8])
        return f"Its strongest sketches are of: {listed}." if listed else ""
    listed = "; ".join(f"{i + 1}. {_class_name(e)} ({_fmt(e.get('activation'), '.2f')})"
                       for i, e in enumerate(attached))
    return (f"The attached image{'s show' if len(attached) > 1 else ' shows'} its strongest sketches "
            f"(in this order; left to right, top to bottom when tiled): {listed}. Each sketch is drawn in black; "
            "the red tint over it marks where the neuron fires (not part of the drawing).")


def _firings(entry: dict, n_on) -> str:
    """A class's part of the strongly-on sketches: counted ("56 of 58"), or, in a report without counts, the
    Laplace-smoothed share stage 3 computes PMI from (56 of 58 reads 81% there with 12 classes)."""
    if entry.get("count") is not None and n_on:
        return f"{int(entry['count'])} of {int(n_on)} strongly-on sketches"
    return f"{_fmt(entry.get('p_class_given_on'), '.0f', 100)}% of its strongly-on sketches (smoothed)"


def _strong_rule(neuron: dict) -> str:
    """How stage 3 defines "strongly on", so the model reads the frequency for what it is."""
    quantile, threshold = neuron.get("quantile"), neuron.get("threshold")
    if quantile is None or threshold is None:
        return "per-image max above the neuron's own threshold"
    if threshold <= 0:  # it fires on fewer images than the quantile leaves: "strongly on" is "on at all"
        return (f"per-image max above 0: its {_fmt(quantile, '.3g', 100)}th percentile over images is 0, since it "
                f"fires on fewer than {_fmt(1 - quantile, '.3g', 100)}% of sketches, "
                "so here strongly on means on at all")
    # .3g: a QUANTILE lowered on small data (0.875) reads 87.5th and 12.5%, not 88th and 12%
    return (f"per-image max above {_fmt(threshold, '.3g')}, the neuron's {_fmt(quantile, '.3g', 100)}th "
            f"percentile over images, so about {_fmt(1 - quantile, '.3g', 100)}% of sketches by definition")


def neuron_prompt(neuron: dict, max_words: int = 12, attached: Sequence[dict] = ()) -> str:
    """The user message for one neuron: its statistics with class names, and its examples.

    ``attached`` are the ``top_examples`` entries whose thumbnails go with the message, in
    order; the message tells the model what each shows.
    """
    tops = [f"- {_class_name(c)}: PMI {_fmt(c.get('pmi'), '+.2f')}; {_firings(c, neuron.get('n_on'))}; "
            f"lens {_fmt(c.get('lens'), '+.2f')}" for c in neuron.get("top_classes", [])[:5]
            if (c.get("pmi") or 0) > 0]  # a class it fires for less often than chance is not one it fires for
    antis = [f"- {_class_name(c)}: PMI {_fmt(c.get('pmi'), '+.2f')}" for c in neuron.get("anti_classes", [])[:3]]
    where = neuron.get("where") or {}
    return load_prompt("concept_user").format(
        neuron_id=neuron["neuron_id"],
        image_frequency=share(neuron.get("image_frequency")),
        strong_rule=_strong_rule(neuron),
        frequency=share(neuron.get("frequency")),
        mean_on=_fmt(neuron.get("mean_on_activation"), ".3g"),
        top_classes="\n".join(tops) or "- none above chance",
        anti_classes="\n".join(antis) or "- none",
        where=strip_controls(where.get("description") or "anywhere"),
        auto_summary=strip_controls(neuron.get("auto_summary") or "none"),
        examples=_examples_line(neuron, attached),
        max_words=max_words,
    ).strip()


OFFLINE_PREFIX = "offline: "  # marks a label made from statistics, not by a model


# An offline label's place (stats.describe_position's words), also cut short by MAX_WORDS, and its AUROC
_PLACE_TAIL = re.compile(r",\s*(?:(?:upper|lower)(?: (?:left|right))?|left|right|centre|(?:all|anywhere)"
                         r"(?: (?:over|in|the|sketch))*)(?:, but(?: spread(?: out)?)?)?,?$")
_AUROC_TAIL = re.compile(r"\s*\(train(?: AUROC.*)?$")


def concept_name(label: str, keep_auroc: bool = False) -> str:
    """The concept a label names, for a sentence: an offline label's core without its marker,
    its AUROC and its typical place (``"offline: spokes (train AUROC 0.95), lower"`` ->
    ``"spokes"``; also when MAX_WORDS cut the label short), so neurons of one part read as one
    concept; a model's label as given. ``keep_auroc``: ``"spokes (train AUROC 0.95)"`` (the
    CLI's per-neuron lines, which print their own place in this sketch)."""
    if not label.startswith(OFFLINE_PREFIX):
        return label
    core = _PLACE_TAIL.sub("", label[len(OFFLINE_PREFIX):].strip())
    core = core if keep_auroc else _AUROC_TAIL.sub("", core)
    return core.rstrip(", ") or label


def names_part(parts: dict) -> bool:
    """Whether a neuron's ``parts`` record (stage 3) says it detects its best part: AUROC >= PART_AUROC on the
    training sketches and among those of classes without the part (``distractor_auroc``; a report without
    that figure, or without such sketches, is judged on the first alone)."""
    among = parts.get("distractor_auroc")
    return bool(parts.get("best_part")) and (parts.get("auroc") or 0) >= PART_AUROC and (
        among is None or among >= PART_AUROC)


def offline_label(neuron: dict, max_words: int = 12) -> str:
    """A deterministic concept from the statistics alone, marked ``offline:``.

    Example: ``"offline: strokes typical of wheel/bicycle, lower left"``; on data with
    ground-truth parts (the synthetic set), a neuron that detects one part well is named
    after it: ``"offline: spiral (train AUROC 0.92), upper right"`` (its AUROC for that part
    on the training sketches, where the part was also picked: a description, not held-out
    evidence).
    """
    if "clear_classes" in neuron:  # stage 3's verdict: PMI and support (older reports: the top two, if clear)
        classes = [strip_controls(str(c)) for c in neuron["clear_classes"]][:2]
    else:
        classes = [_class_name(c) for c in neuron.get("top_classes", [])[:2]] if neuron.get("clear_class", True) else []
    core = f"strokes typical of {'/'.join(classes)}" if classes else "strokes without a clear class preference"
    part = neuron.get("parts") or {}
    if names_part(part):  # data with ground-truth parts
        core = f"{strip_controls(part['best_part'])} (train AUROC {fixed(part['auroc'])})"
    where = strip_controls((neuron.get("where") or {}).get("description") or "")
    label = f"{core}, {where}" if where else core
    return OFFLINE_PREFIX + " ".join(label.split()[:max_words])
