"""Fault handling: bad checkpoints, malicious pickles, missing stages, kills mid-run."""
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import ROOT
from selfexplain import artifacts
from selfexplain.errors import UserError

SCRIPTS = ["train_sae.py", "sae_summarize.py", "why_did_you.py"]


def run_script(script, *args, timeout=300):
    return subprocess.run([sys.executable, str(ROOT / script), *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1"})


class Payload:
    """Unpickling this runs a shell command: a safe loader must refuse it."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "best.pt"
    torch.save({"kind": "classifier", "model": Payload(marker)}, path)
    with pytest.raises(UserError, match="refused"):
        artifacts.load_checkpoint(path, "classifier")
    out = run_script("train_sae.py", f"--classifier_ckpt={path}", f"--out_dir={tmp_path / 'sae'}")
    assert out.returncode == 2 and "refused" in out.stderr and out.stderr.count("\n") == 1
    assert not marker.exists()


def test_truncated_checkpoint_is_a_clear_error(tiny_classifier, tmp_path):
    data = (tiny_classifier / "best.pt").read_bytes()
    broken = tmp_path / "best.pt"
    broken.write_bytes(data[: len(data) // 3])
    with pytest.raises(UserError, match="truncated or not a checkpoint"):
        artifacts.load_checkpoint(broken, "classifier")
    out = run_script("train_sae.py", f"--classifier_ckpt={broken}", f"--out_dir={tmp_path / 'sae'}")
    assert out.returncode == 2 and "truncated" in out.stderr and "Traceback" not in out.stderr


def test_wrong_kind_of_checkpoint(tiny_classifier):
    with pytest.raises(UserError, match="not a sae checkpoint"):
        artifacts.load_sae(tiny_classifier / "best.pt")


def test_mismatched_classifier_and_sae(tiny_sae, tiny_classifier, tmp_path):
    other = artifacts.load_checkpoint(tiny_classifier / "best.pt", "classifier")
    other["model"]["fc.bias"] = other["model"]["fc.bias"] + 1.0
    other["fingerprint"] = artifacts.tensor_fingerprint(other["model"])
    artifacts.save_checkpoint(other, tmp_path / "other.pt")
    with pytest.raises(UserError, match="retrain with train_sae.py"):
        artifacts.load_sae(tiny_sae / "best_sae.pt", other)
    out = run_script("why_did_you.py", "--image=test:0", f"--classifier_ckpt={tmp_path / 'other.pt'}",
                     f"--sae_ckpt={tiny_sae / 'best_sae.pt'}", f"--report_dir={tmp_path}")
    assert out.returncode == 2 and "train_sae.py" in out.stderr


@pytest.mark.parametrize("script,missing,first", [
    ("train_sae.py", "classifier_ckpt", "train_standard_cnn.py"),
    ("sae_summarize.py", "sae_ckpt", "train_sae.py"),
    ("sae_summary_to_llm.py", "report_dir", "sae_summarize.py"),
])
def test_missing_earlier_stage_names_the_script_to_run(script, missing, first, tiny_classifier, tmp_path):
    args = [f"--{missing}={tmp_path / 'nothing_here'}"]
    if script == "sae_summarize.py":
        args.append(f"--classifier_ckpt={tiny_classifier / 'best.pt'}")
    out = run_script(script, *args)
    assert out.returncode == 2, out.stderr
    assert f"run {first} first" in out.stderr and out.stderr.count("\n") == 1


def test_sigkill_during_sae_training_then_resume(tiny_classifier, tmp_path, cache_dir):
    args = [f"--classifier_ckpt={tiny_classifier / 'best.pt'}", f"--out_dir={tmp_path}", "--latent_dim=64",
            "--top_k=4", "--epochs=40", "--tensorboard=False", f"--cache_dir={cache_dir}"]
    proc = subprocess.Popen([sys.executable, str(ROOT / "train_sae.py"), *args], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": "1"})
    last = tmp_path / "last_sae.pt"
    deadline = time.time() + 120
    while proc.poll() is None and time.time() < deadline:
        if last.exists() and artifacts.load_checkpoint(last, "sae")["epoch"] >= 2:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    saved = artifacts.load_checkpoint(last, "sae")["epoch"]
    assert saved >= 2
    out = run_script("train_sae.py", *args, "--resume=True")
    assert out.returncode == 0, out.stderr[-2000:]
    final = artifacts.load_checkpoint(last, "sae")
    assert final["epoch"] == 40
    artifacts.load_sae(tmp_path / "best_sae.pt", artifacts.load_checkpoint(tiny_classifier / "best.pt", "classifier"))
