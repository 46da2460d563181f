"""Scale rehearsal for TU-Berlin users: the real code paths at TU-Berlin's size and format.

Generates a stand-in (bench/make_standin.py: 20k PNGs of 1111 px, 250 classes, Hugging Face
parquet schema), then runs, each as its own process so its time and peak memory (max RSS,
children included) are measured alone:

1. stage 1 decode + cache at 224 px, then a measured fraction of one classifier epoch
   (MAX_BATCHES batches; the full-epoch time is extrapolated from it);
2. stage 2 feature caching and SAE epochs with M = 2048, K = 20 (on MAX_IMAGES train images);
3. stage 3 summary (MAX_PER_CLASS images per class).

Writes bench/results/scale.md. Usage: python bench/scale_rehearsal.py [--max_batches=10]
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.sections import write_section  # noqa: E402
from selfexplain.config import make_config, module_constants, run_cli  # noqa: E402
from selfexplain.logs import log  # noqa: E402

WORK = "bench/_work/scale"           # runs and caches of the rehearsal
STANDIN = "bench/_work/tu-berlin-standin"  # the generated dataset
PER_CLASS = 80                       # 250 x 80 = 20k sketches
IMAGE_SIZE = 224                     # TU-Berlin's usual input size
BATCH_SIZE = 64                      # classifier batch
MAX_BATCHES = 10                     # measured fraction of the classifier epoch
SAE_MAX_IMAGES = 2000                # train images whose tokens stage 2 caches (49 tokens each)
SAE_EPOCHS = 2                       # SAE epochs over those tokens
MAX_PER_CLASS = 8                    # stage 3 sample per class
HOLDOUT = 0.02                       # val and test fractions (400 images each: keeps CPU evaluation short)
OUT = "bench/results/scale.md"       # markdown section written here

PEAK_SNIPPET = ("import resource, runpy, sys; sys.argv = sys.argv[1:]; sys.path.insert(0, '.');"
                "code = 0\ntry:\n    runpy.run_path(sys.argv[0], run_name='__main__')\n"
                "except SystemExit as e:\n    code = e.code or 0\n"
                "self_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
                "kids_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss\n"
                "print(f'PEAK_RSS_KB {self_kb} {kids_kb}', file=sys.stderr); sys.exit(code)")


def run_stage(name: str, script: str, args: list[str]) -> dict:
    """Run one stage in its own interpreter; returns seconds and peak RSS (GiB)."""
    start = time.time()
    proc = subprocess.run([sys.executable, "-c", PEAK_SNIPPET, script, *args], cwd=ROOT, capture_output=True,
                          text=True, env={**os.environ, "TQDM_DISABLE": "1"})
    seconds = time.time() - start
    peak = [line for line in proc.stderr.splitlines() if line.startswith("PEAK_RSS_KB")]
    self_kb, kids_kb = (int(v) for v in peak[-1].split()[1:]) if peak else (0, 0)
    if proc.returncode != 0:
        log(f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        raise SystemExit(f"{name} failed with exit code {proc.returncode}")
    log(f"{name}: {seconds:.0f} s, peak RSS {self_kb / 2**20:.2f} GiB (workers {kids_kb / 2**20:.2f} GiB)")
    return {"stage": name, "seconds": seconds, "peak_gib": self_kb / 2**20, "worker_peak_gib": kids_kb / 2**20,
            "stdout": proc.stdout}


def main(**overrides) -> list[dict]:
    cfg = make_config(module_constants(globals()), overrides)
    work = ROOT / cfg.WORK
    rows = []
    t0 = time.time()
    subprocess.run([sys.executable, "bench/make_standin.py", f"--out={cfg.STANDIN}", f"--per_class={cfg.PER_CLASS}"],
                   cwd=ROOT, check=True)
    rows.append({"stage": "generate stand-in (20k PNG, 1111 px)", "seconds": time.time() - t0, "peak_gib": float("nan"),
                 "worker_peak_gib": float("nan"), "stdout": ""})
    common = [f"--cache_dir={work / 'cache'}", "--tensorboard=False"]
    cnn = work / "standard_cnn"
    rows.append(run_stage("stage 1: decode + cache 224 px", "train_standard_cnn.py",
                          ["--dataset=parquet", f"--data_root={cfg.STANDIN}", f"--image_size={cfg.IMAGE_SIZE}",
                           "--epochs=0", f"--out_dir={cnn}_cacheonly", *common]))
    rows.append(run_stage(f"stage 1: {cfg.MAX_BATCHES} batches of {cfg.BATCH_SIZE} + val/test", "train_standard_cnn.py",
                          ["--dataset=parquet", f"--data_root={cfg.STANDIN}", f"--image_size={cfg.IMAGE_SIZE}",
                           "--epochs=1", f"--max_batches={cfg.MAX_BATCHES}", f"--batch_size={cfg.BATCH_SIZE}",
                           f"--val_fraction={cfg.HOLDOUT}", f"--test_fraction={cfg.HOLDOUT}",
                           f"--out_dir={cnn}", *common]))
    metrics = json.loads((cnn / "metrics.json").read_text())
    rate = metrics["history"][0]["images_per_s"]
    rows.append(run_stage(f"stage 2: tokens of {cfg.SAE_MAX_IMAGES} images + {cfg.SAE_EPOCHS} SAE epochs, M=2048 K=20",
                          "train_sae.py", [f"--classifier_ckpt={cnn / 'best.pt'}", f"--out_dir={work / 'sae'}",
                                           "--latent_dim=2048", "--top_k=20", "--batch_size=4096",
                                           f"--epochs={cfg.SAE_EPOCHS}", "--min_steps=0", f"--max_images={cfg.SAE_MAX_IMAGES}", *common]))
    rows.append(run_stage(f"stage 3: summary, {cfg.MAX_PER_CLASS} images/class", "sae_summarize.py",
                          [f"--classifier_ckpt={cnn / 'best.pt'}", f"--sae_ckpt={work / 'sae' / 'best_sae.pt'}",
                           f"--out_dir={work / 'report'}", f"--max_per_class={cfg.MAX_PER_CLASS}",
                           f"--cache_dir={work / 'cache'}"]))
    write_table(cfg, rows, rate, metrics)
    return rows


def write_table(cfg, rows, rate, metrics) -> None:
    train_n = metrics["split_sizes"]["train"]
    lines = ["## Scale rehearsal: TU-Berlin-sized stand-in", "",
             f"{metrics['num_images']} sketches of 1111 px in 3 parquet shards (Hugging Face schema), "
             f"{metrics['num_classes']} classes, {cfg.IMAGE_SIZE} px, CPU (2 cores). Each stage is its own process; "
             "peak = max RSS of the process (decode workers listed apart). Stage 2 caches the tokens of "
             f"{cfg.SAE_MAX_IMAGES} training images (--max_images) and stage 3 summarises {cfg.MAX_PER_CLASS} per "
             "class, to keep the CPU run short; memory per image is what scales.", "",
             "| step | seconds | peak RSS GiB | workers' peak GiB |", "|---|---|---|---|"]
    for r in rows:
        peak, workers = (f"{r[k]:.2f}" if r[k] == r[k] else "–" for k in ("peak_gib", "worker_peak_gib"))
        lines.append(f"| {r['stage']} | {r['seconds']:.0f} | {peak} | {workers} |")
    lines += ["", f"Classifier training ran at {rate:.1f} images/s, so one full epoch over the {train_n} training "
              f"images would take about {train_n / rate / 60:.0f} minutes on this CPU (a GPU is the way for TU-Berlin).", ""]
    write_section(cfg.OUT, lines)


if __name__ == "__main__":
    run_cli(main, globals())
