"""Fault handling: bad checkpoints, malicious pickles, missing stages, kills mid-run."""
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

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
    with pytest.raises(UserError, match=r"refused: it holds objects a safe load will not run \(\w+\.system\)"):
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


@pytest.mark.parametrize("content", [b"hello\n", b'{"a": 1}\n', b"PK\x03\x04garbage", b""])
def test_a_file_that_is_not_a_checkpoint_is_named_so_and_not_called_unsafe(tmp_path, content):
    path = tmp_path / "x.pt"
    path.write_bytes(content)
    with pytest.raises(UserError, match="not a checkpoint") as err:
        artifacts.load_checkpoint(path, "classifier")
    assert "refused" not in str(err.value) and "\n" not in str(err.value)


def test_a_run_folder_given_for_its_checkpoint_names_the_file_inside(tiny_classifier):
    match = "is a folder, not a file: did you mean " + re.escape(str(tiny_classifier / "best.pt"))
    with pytest.raises(UserError, match=match):
        artifacts.load_checkpoint(tiny_classifier, "classifier")


def test_resume_after_an_interrupted_overwrite_points_at_the_run_kept_aside(tmp_path):
    (tmp_path / artifacts.REPLACED_DIR).mkdir()
    (tmp_path / artifacts.REPLACED_DIR / "last.pt").write_bytes(b"x")
    with pytest.raises(UserError, match=r"interrupted --overwrite replaced is in .*\.replaced: move its files back"):
        artifacts.require_resumable(tmp_path / "last.pt")


def test_resume_after_a_stop_before_the_first_whole_epoch_says_to_overwrite(tmp_path):
    """best.pt and config.json written, last.pt not yet: --resume had nothing, a plain rerun was refused."""
    (tmp_path / "best.pt").write_bytes(b"x")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(UserError, match=r"it left best.pt, config.json\); start again with --overwrite=True"):
        artifacts.require_resumable(tmp_path / "last.pt")
    with pytest.raises(UserError, match="start again without --resume=True"):
        artifacts.require_resumable(tmp_path / "empty" / "last.pt")


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


def test_a_missing_relative_path_says_where_it_was_looked_for(tmp_path, monkeypatch):
    """A notebook outside the repo reads the default runs/... paths from its own folder: the error says so."""
    monkeypatch.chdir(tmp_path)
    message = artifacts.missing_message(Path("runs/standard_cnn/best.pt"), "classifier")
    assert message == f"runs/standard_cnn/best.pt not found (from {tmp_path}); run train_standard_cnn.py first"
    assert "(from " not in artifacts.missing_message(tmp_path / "best.pt", "classifier")


def test_sigkill_during_sae_training_then_resume(tiny_classifier, tmp_path, cache_dir):
    args = [f"--classifier_ckpt={tiny_classifier / 'best.pt'}", f"--out_dir={tmp_path}", "--latent_dim=64",
            "--top_k=4", "--epochs=40", "--min_steps=0", "--tensorboard=False", f"--cache_dir={cache_dir}"]
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


# ----------------------------------------------------------------------------- stale or edited checkpoints
def test_classifier_with_edited_weights_is_refused(tiny_sae, tiny_classifier, tmp_path):
    """layer4.1.conv2.weight overwritten, fingerprint field kept: not the classifier the SAE was trained on."""
    ckpt = artifacts.load_checkpoint(tiny_classifier / "best.pt", "classifier")
    ckpt["model"]["layer4.1.conv2.weight"] = torch.randn_like(ckpt["model"]["layer4.1.conv2.weight"])
    torch.save(ckpt, tmp_path / "edited.pt")
    with pytest.raises(UserError, match="do not match its recorded fingerprint"):
        artifacts.load_classifier(tmp_path / "edited.pt")
    with pytest.raises(UserError, match="do not match its recorded fingerprint"):
        artifacts.load_sae(tiny_sae / "best_sae.pt", ckpt)
    out = run_script("train_sae.py", f"--classifier_ckpt={tmp_path / 'edited.pt'}", f"--out_dir={tmp_path / 'sae'}")
    assert out.returncode == 2 and "recorded fingerprint" in out.stderr and out.stderr.count("\n") == 1


# ----------------------------------------------------------------------------- files on disk
def _jsonl_with_damage(path):
    lines = [b'{"neuron_id": 0}\n', b'{"neuron_id": 1, "answer": "torn', b'{"neuron_id": 2}\n',
             b'\xff\xfe not utf-8\n', b'[1, 2, 3]\n', b'{"neuron_id": 3}\n', b'{"neuron_id": 4}\n']
    lines[1] += b"\n"  # a damaged line in the middle, not only at the end
    path.write_bytes(b"".join(lines) + b'{"neuron_id": 5, "ans')  # and a torn tail
    return [0, 2, 3, 4]


def test_read_jsonl_skips_damaged_lines_and_keeps_the_rest(tmp_path):
    path = tmp_path / "neurons.jsonl"
    expected = _jsonl_with_damage(path)
    assert [r["neuron_id"] for r in artifacts.read_jsonl(path)] == expected
    assert [r["neuron_id"] for r in artifacts.read_jsonl(path, repair=True)] == expected
    assert [json.loads(line)["neuron_id"] for line in path.read_text().splitlines()] == expected  # good lines kept
    artifacts.append_jsonl(path, {"neuron_id": 9})
    assert [r["neuron_id"] for r in artifacts.read_jsonl(path)] == expected + [9]


def test_five_lines_with_the_second_damaged_keep_four(tmp_path):
    path = tmp_path / "llm_output.jsonl"
    path.write_text("".join(json.dumps({"neuron_id": i}) + "\n" if i != 1 else "{oops\n" for i in range(5)))
    assert len(artifacts.read_jsonl(path, repair=True)) == 4
    assert len(path.read_text().splitlines()) == 4


def test_written_files_are_readable_by_others(tmp_path):
    old = os.umask(0o022)
    try:
        artifacts.write_json(tmp_path / "summary.json", {"a": 1})
        artifacts.save_checkpoint({"kind": "x"}, tmp_path / "best.pt")
    finally:
        os.umask(old)
    assert (tmp_path / "summary.json").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "best.pt").stat().st_mode & 0o777 == 0o644


def test_a_failed_write_is_one_line_naming_the_path(tmp_path, monkeypatch):
    def disk_full(fd):
        raise OSError(28, "No space left on device")

    (tmp_path / "last.pt").write_bytes(b"the last whole checkpoint")
    (tmp_path / "summary.json").write_bytes(b'{"the": "old summary"}')
    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(UserError, match=f"cannot write {tmp_path / 'last.pt'}: No space left on device"):
        artifacts.save_checkpoint({"kind": "x"}, tmp_path / "last.pt")
    with pytest.raises(UserError, match="cannot write .*summary.json"):
        artifacts.write_json(tmp_path / "summary.json", {"new": 1})
    with pytest.raises(UserError, match="cannot write .*neurons.jsonl"):
        artifacts.append_jsonl(tmp_path / "neurons.jsonl", {"neuron_id": 0})
    assert [p.name for p in tmp_path.iterdir() if ".tmp" in p.name] == []
    # atomic: a failed write leaves the earlier file whole (a plain write had truncated it, and left no temp file)
    assert (tmp_path / "last.pt").read_bytes() == b"the last whole checkpoint"
    assert (tmp_path / "summary.json").read_bytes() == b'{"the": "old summary"}'


def test_sigterm_during_a_checkpoint_save_leaves_a_whole_file_and_no_temp_file(tmp_path, monkeypatch):
    from selfexplain.distributed import exit_on_sigterm

    previous = signal.getsignal(signal.SIGTERM)
    exit_on_sigterm()
    real_save = torch.save

    def save_then_terminated(obj, fh):
        real_save(obj, fh)
        os.kill(os.getpid(), signal.SIGTERM)  # arrives while the temp file is still open
        time.sleep(1)

    monkeypatch.setattr(torch, "save", save_then_terminated)
    try:
        with pytest.raises(SystemExit) as stop:
            artifacts.save_checkpoint({"kind": "x", "w": torch.zeros(1000)}, tmp_path / "last.pt")
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert stop.value.code == 143 and [p.name for p in tmp_path.iterdir()] == ["last.pt"]
    assert torch.load(tmp_path / "last.pt", weights_only=True)["w"].shape == (1000,)  # held until whole


def test_sigterm_stops_a_training_script_cleanly(tiny_classifier, tmp_path, cache_dir):
    args = [f"--classifier_ckpt={tiny_classifier / 'best.pt'}", f"--out_dir={tmp_path}", "--latent_dim=64",
            "--top_k=4", "--epochs=400", "--min_steps=0", "--tensorboard=False", f"--cache_dir={cache_dir}"]
    proc = subprocess.Popen([sys.executable, str(ROOT / "train_sae.py"), *args], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 120
    while not (tmp_path / "last_sae.pt").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err[-2000:]
    assert [p.name for p in tmp_path.iterdir() if ".tmp" in p.name] == []
    artifacts.load_checkpoint(tmp_path / "last_sae.pt", "sae")


def test_sigterm_during_an_atomic_write_exits_143_after_the_file_is_whole(tmp_path):
    # the signal arrives in the middle of the write (as it can inside torch.save's zip writer)
    script = ("import os, signal, sys\n"
              "from selfexplain import artifacts\n"
              "from selfexplain.distributed import exit_on_sigterm\n"
              "exit_on_sigterm()\n"
              "def write(fh):\n"
              "    fh.write(b'a' * 1000)\n"
              "    os.kill(os.getpid(), signal.SIGTERM)\n"
              "    fh.write(b'b' * 1000)\n"
              "artifacts.atomic_write(sys.argv[1], write)\n"
              "print('went on after SIGTERM')\n")
    target = tmp_path / "ckpt.bin"
    proc = subprocess.run([sys.executable, "-c", script, str(target)], cwd=ROOT, capture_output=True, timeout=120)
    assert proc.returncode == 143, proc.stderr.decode()[-2000:]
    assert b"went on" not in proc.stdout
    assert target.read_bytes() == b"a" * 1000 + b"b" * 1000
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.bin"]


def test_overwrites_stopped_at_any_point_never_lose_the_run_they_replace(tmp_path):
    """--overwrite moves the run aside; later stopped runs (half a checkpoint, half a move) keep it there."""
    from selfexplain.artifacts import REPLACED_DIR, drop_replaced, prepare_out_dir

    outputs = ["best.pt", "last.pt", "metrics.json", "tb"]
    run = tmp_path / "run"
    (run / "tb").mkdir(parents=True)
    for name in outputs[:3]:
        (run / name).write_text("A")                             # run A, finished
    prepare_out_dir(run, outputs, overwrite=True)                 # run B starts ...
    (run / "best.pt").write_text("B")                             # ... saves best.pt, stops before last.pt
    prepare_out_dir(run, outputs, overwrite=True)                 # run C starts
    assert {p.name: p.read_text() for p in (run / REPLACED_DIR).iterdir() if p.is_file()} == \
        {"best.pt": "A", "last.pt": "A", "metrics.json": "A"} and not (run / "best.pt").exists()
    (run / REPLACED_DIR / "last.pt").rename(run / "last.pt")      # a move that stopped halfway
    prepare_out_dir(run, outputs, overwrite=True)
    assert (run / REPLACED_DIR / "last.pt").read_text() == "A" and not (run / "last.pt").exists()
    drop_replaced(run)                                            # a run that saved a whole checkpoint
    assert not (run / REPLACED_DIR).exists()


def test_ctrl_c_between_the_image_swap_and_the_records_waits_for_the_records(tmp_path):
    """Stage 3 swaps thumbs/ and sprites/, then writes neurons.jsonl: Ctrl-C in between left a mixed atlas."""
    from selfexplain import report

    def publish():
        os.kill(os.getpid(), signal.SIGINT)   # Ctrl-C right after the swap ...
        time.sleep(0.05)
        artifacts.write_jsonl(tmp_path / "neurons.jsonl", [{"neuron_id": 0}])  # ... the records still land

    with pytest.raises(KeyboardInterrupt):
        with report.staged_images(tmp_path, publish) as staging:
            (staging / "thumbs").mkdir()
            (staging / "thumbs" / "new.png").write_bytes(b"new")
    assert (tmp_path / "thumbs" / "new.png").is_file() and (tmp_path / "neurons.jsonl").is_file()
    assert not list(tmp_path.glob(".staging-*"))


def test_a_second_run_on_the_same_output_folder_is_refused(tmp_path):
    """Two stage-1 runs into one folder both 'finished': best.pt was the other run's."""
    code = ("import sys, time; sys.path.insert(0, '.')\n"
            "from selfexplain import artifacts\n"
            f"artifacts.hold_out_dir({str(tmp_path)!r}); print('held', flush=True); time.sleep(30)\n")
    other = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert other.stdout.readline().strip() == "held"
        with pytest.raises(UserError, match="another run is writing .* choose another output folder"):
            artifacts.prepare_out_dir(tmp_path, artifacts.CLASSIFIER_OUTPUTS)
        artifacts.hold_out_dir(tmp_path / "elsewhere")   # another folder is free ...
        artifacts.hold_out_dir(tmp_path / "elsewhere")   # ... and this process may take its own lock again
    finally:
        other.kill()
        other.wait()
    artifacts.prepare_out_dir(tmp_path, artifacts.CLASSIFIER_OUTPUTS)  # its process gone: the folder is free


def test_temp_files_of_a_killed_run_are_swept_when_the_folder_is_next_written(tmp_path):
    """SIGKILL during last.pt's write left a hidden 120 MB .tmp file that even --overwrite kept."""
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)                                              # a process that has exited
    stale = tmp_path / f".last.pt.k2j4.tmp{pid}"
    stale.write_bytes(b"x" * 100)
    (tmp_path / f".staging-ab12.tmp{pid}").mkdir()
    live = tmp_path / f".best.pt.zz.tmp{os.getpid()}"                   # this process: left alone
    live.write_bytes(b"x")
    artifacts.prepare_out_dir(tmp_path, artifacts.CLASSIFIER_OUTPUTS)
    assert not stale.exists() and not (tmp_path / f".staging-ab12.tmp{pid}").exists() and live.exists()
    written = artifacts.atomic_write_bytes(tmp_path / "x.bin", b"1")  # atomic writes name their temp by pid
    assert written.read_bytes() == b"1" and not list(tmp_path.glob(".x.bin.*"))


def test_an_output_folder_that_is_a_file_is_named_so(tmp_path):
    (tmp_path / "run").write_text("not a folder")
    for call in (lambda: artifacts.prepare_out_dir(tmp_path / "run", artifacts.SAE_OUTPUTS),
                 lambda: artifacts.hold_out_dir(tmp_path / "run")):
        with pytest.raises(UserError, match="run is a file, not a folder"):   # was "config.json: File exists"
            call()


def test_a_read_only_output_folder_is_refused_before_the_token_pass(tiny_classifier, tmp_path, monkeypatch):
    """Stage 2 found an unwritable OUT_DIR only when it saved, after caching every token. (os.access
    is patched: this suite runs as root in CI, which no permission bit stops.)"""
    import train_sae

    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access
    monkeypatch.setattr(artifacts.os, "access", lambda p, mode: Path(p) != locked and real_access(p, mode))
    cache = tmp_path / "cache"
    with pytest.raises(UserError, match=r"locked/sae cannot be written \(.*locked is read-only"):
        train_sae.main(classifier_ckpt=str(tiny_classifier / "best.pt"), out_dir=str(locked / "sae"),
                       cache_dir=str(cache), latent_dim=64, top_k=4, epochs=1, tensorboard=False)
    assert not (cache / "sae_tokens").exists() and not (locked / "sae").exists()  # no token was cached
