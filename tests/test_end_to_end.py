"""All five stages on a tiny synthetic config, through their command lines, like a user."""
import json
import os
import subprocess
import sys

from conftest import ROOT, TINY_CNN


def stage(script, *args):
    out = subprocess.run([sys.executable, str(ROOT / script), *args], cwd=ROOT, capture_output=True, text=True,
                         timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, f"{script} failed:\n{out.stdout[-1500:]}\n{out.stderr[-3000:]}"
    return out.stdout


def test_five_stages_end_to_end(tmp_path):
    cnn, sae, report, cache = tmp_path / "cnn", tmp_path / "sae", tmp_path / "report", tmp_path / "cache"
    flags = [f"--{k}={v}" for k, v in TINY_CNN.items()]
    stage("train_standard_cnn.py", *flags, f"--out_dir={cnn}", f"--cache_dir={cache}")
    assert {"best.pt", "last.pt", "label_decoder.json", "metrics.json"} <= {p.name for p in cnn.iterdir()}

    stage("train_sae.py", f"--classifier_ckpt={cnn / 'best.pt'}", f"--out_dir={sae}", "--latent_dim=64",
          "--top_k=4", "--epochs=3", "--min_steps=0", "--tensorboard=False", f"--cache_dir={cache}")
    sae_metrics = json.loads((sae / "metrics.json").read_text())
    assert (sae / "best_sae.pt").is_file()
    assert 0.0 <= sae_metrics["val_fvu"] < 1.0, sae_metrics  # better than predicting the mean token

    stage("sae_summarize.py", f"--classifier_ckpt={cnn / 'best.pt'}", f"--sae_ckpt={sae / 'best_sae.pt'}",
          f"--out_dir={report}", f"--cache_dir={cache}", "--top_examples=3")
    neurons = [json.loads(line) for line in (report / "neurons.jsonl").read_text().splitlines()]
    assert len(neurons) == 64 and all("auto_summary" in n for n in neurons)
    live = [n for n in neurons if not n["dead"]]
    assert live and all((report / n["sprite"]).is_file() for n in live)
    assert (report / "index.html").is_file() and (report / "summary.json").is_file()

    stage("sae_summary_to_llm.py", f"--report_dir={report}", "--backend=offline")
    answers = [json.loads(line) for line in (report / "llm_output.jsonl").read_text().splitlines()]
    assert {a["neuron_id"] for a in answers} == {n["neuron_id"] for n in live}

    overlay = tmp_path / "why.png"
    text = stage("why_did_you.py", "--image=test:0", f"--classifier_ckpt={cnn / 'best.pt'}",
                 f"--sae_ckpt={sae / 'best_sae.pt'}", f"--report_dir={report}", f"--cache_dir={cache}",
                 f"--overlay={overlay}")
    names = set(json.loads((cnn / "label_decoder.json").read_text()).values())
    predicted = text.split("predicted: ", 1)[1].split(" (", 1)[0]
    assert predicted in names, text[:300]
    assert overlay.is_file() and overlay.stat().st_size > 1000
    line = stage("why_did_you.py", "--image=test:1", "--json=True", f"--classifier_ckpt={cnn / 'best.pt'}",
                 f"--sae_ckpt={sae / 'best_sae.pt'}", f"--report_dir={report}", f"--cache_dir={cache}")
    exp = json.loads(line.strip().splitlines()[-1])
    total = sum(n["contribution"] for n in exp["neurons"]) + exp["others"] + exp["bias"] + exp["error"]
    assert abs(total - exp["logit"]) < 1e-3
    concepts = {a["neuron_id"]: a["answer"] for a in answers}
    assert all(n["concept"] == concepts[n["neuron_id"]] for n in exp["neurons"] if n["neuron_id"] in concepts)
    named = [n for n in exp["neurons"] if n["neuron_id"] in concepts]  # offline labels: a short name, marked
    assert named and all(n["offline"] and n["name"] and not n["name"].startswith("offline")
                         and n["concept"].startswith("offline: " + n["name"]) for n in named)
