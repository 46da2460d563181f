"""bench/bench_person.py's concept agreement: do the cited concepts name the parts drawn?"""
import numpy as np
import pytest
import torch

from bench import bench_person
from selfexplain import artifacts
from selfexplain.model import SketchResNet
from selfexplain.sae import TopKSAE
from selfexplain.synthetic import CLASS_NAMES, PART_TYPES

# a 64 px sketch on a 2x2 token grid: cell centres (x, y) = (16, 16), (48, 16), (16, 48), (48, 48)
PARTS = [{"part": "circle", "box": [0, 0, 32, 32]}, {"part": "zigzag", "box": [32, 32, 64, 64]}]
BEST_PART = {0: "circle", 1: "triangle", 2: "zigzag", 3: "circle"}


def _maps(*strongest):
    """(n, 4) code maps, each neuron strongest at the given token (None: a flat map)."""
    out = np.full((len(strongest), 4), 0.5)
    for k, t in enumerate(strongest):
        if t is not None:
            out[k, t] = 2.0
    return out


def test_agreement_counts_drawn_parts_coverage_and_pointing():
    # neuron 0 (circle, drawn) points at token 0: inside the circle's box -> hit;
    # neuron 1 (triangle, not drawn) is not a pointing pair; neuron 2 (zigzag) points at token 0: miss
    r = bench_person.sketch_agreement([0, 1, 2], [np.array([1]), np.array([3])], BEST_PART, PARTS,
                                      _maps(0, 3, 0), (2, 2), 64)
    assert r["n_cited"] == 3
    assert r["part_cited"] == pytest.approx(2 / 3)
    assert r["cover_cited"] == 1.0                         # circle and zigzag both named
    assert r["part_random"] == pytest.approx(0.5)          # {triangle}: 0, {circle}: 1
    assert r["cover_random"] == pytest.approx(0.25)        # {triangle}: 0 of 2, {circle}: 1 of 2
    assert r["part_prior"] == pytest.approx(3 / 4)         # neurons 0, 2, 3 of 4 have a drawn part
    assert (r["where_pairs"], r["where_hits"]) == (2, 1.0)
    assert r["where_chance"] == pytest.approx(0.5, abs=0.03)  # noise maps point into each quarter box ~1/4 of the time


def test_agreement_misses_and_flat_maps():
    r = bench_person.sketch_agreement([1], [], BEST_PART, PARTS, _maps(0), (2, 2), 64)
    assert r["part_cited"] == 0.0 and r["cover_cited"] == 0.0 and r["where_pairs"] == 0
    assert np.isnan(r["part_random"])
    r = bench_person.sketch_agreement([2, 3], [], BEST_PART, PARTS, _maps(3, None), (2, 2), 64)
    assert r["cover_cited"] == 1.0 and r["where_pairs"] == 2
    assert r["where_hits"] == 1.0                          # zigzag at token 3: hit; a flat map points nowhere


@pytest.fixture(scope="module")
def standins(tmp_path_factory):
    """Untrained classifier on the synthetic classes and an untrained SAE trained 'on' it."""
    folder = tmp_path_factory.mktemp("person_agreement")
    torch.manual_seed(0)
    split = {"train": np.arange(4), "val": np.arange(0), "test": np.arange(0)}
    ckpt = artifacts.classifier_checkpoint(
        SketchResNet(12).eval(), arch={"name": "resnet18", "num_classes": 12, "in_channels": 1},
        preprocess={"image_size": 64, "mean": 0.1, "std": 0.25, "ink": True}, dataset={}, split=split,
        class_names=CLASS_NAMES, config={}, epoch=0, metrics={})
    clf = artifacts.save_checkpoint(ckpt, folder / "best.pt")
    sae_ckpt = artifacts.sae_checkpoint(TopKSAE(512, 32, 4), classifier_fingerprint=ckpt["fingerprint"],
                                        classifier_path=str(clf), config={}, epoch=0, metrics={},
                                        usage_ema=torch.zeros(32))
    sae = artifacts.save_checkpoint(sae_ckpt, folder / "best_sae.pt")
    return folder, clf, sae, sae_ckpt["fingerprint"]


def _report(folder, fingerprint, part):
    """A stage-3 report in which every one of the 32 neurons' best part is ``part``."""
    folder.mkdir(exist_ok=True)
    artifacts.write_jsonl(folder / artifacts.NEURONS, [{"neuron_id": i, "parts": {"best_part": part}}
                                                       for i in range(32)])
    artifacts.write_json(folder / artifacts.SUMMARY, {"sae_fingerprint": fingerprint})
    return folder


def _row(text: str, name: str) -> list[str]:
    return [c.strip() for c in next(l for l in text.splitlines() if l.startswith(f"| {name} |")).strip("|").split("|")]


def test_bench_person_agreement_table(standins):
    """Every neuron names 'circle': agreement (cited, random, prior) = the share of sketches drawing a circle."""
    folder, clf, sae, fingerprint = standins
    report, out = _report(folder / "report", fingerprint, "circle"), folder / "person.md"
    accuracy = bench_person.main(classifier_ckpt=str(clf), sae_ckpt=str(sae), report_dir=str(report),
                                 n_per_class=1, out=str(out))
    assert 0.0 <= accuracy <= 1.0
    text = out.read_text()
    assert "Concept agreement of the explanation" in text
    circles = np.mean(["circle" in name.split("-") for name in CLASS_NAMES])   # 4 of the 12 classes
    row = _row(text.split("Concept agreement")[1], "all")
    assert row[1] == "36"
    assert [float(x) for x in row[3:6]] == pytest.approx([circles] * 3, abs=1e-3)
    assert float(row[6]) == pytest.approx(circles / 3, abs=1e-3)              # 1 of the 3 drawn parts
    ink = _row(text.split("Input-space evidence on the same drawings")[1], "all")
    assert all(np.isfinite(float(x)) for x in ink[1:4])                        # cited, random, CAM drops measured
    by_pen = _row(text.split("Concept agreement")[1], f"pen {bench_person.PENS[0]} px")
    assert by_pen[1] == "36"                     # one sketch per class and layout: all drawn with the first pen
    assert f"| pen {bench_person.PENS[1]} px |" not in text.split("Concept agreement")[1]  # no empty rows
    assert "Measured on " in text.split("Concept agreement")[0]                # the machine, named


def test_bench_person_skips_agreement_without_a_matching_report(standins):
    folder, clf, sae, _ = standins
    out = folder / "person_skip.md"
    report = _report(folder / "other", "0123456789abcdef", "circle")
    bench_person.main(classifier_ckpt=str(clf), sae_ckpt=str(sae), report_dir=str(report), n_per_class=1,
                      out=str(out))
    assert "Concept agreement not measured" in out.read_text() and "| all | 36 |" in out.read_text()
    bench_person.main(classifier_ckpt=str(clf), sae_ckpt=str(folder / "missing.pt"), n_per_class=1, out=str(out))
    assert "Concept agreement not measured: no SAE" in out.read_text()
