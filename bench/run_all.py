"""Run the benchmarks and rewrite bench/RESULTS.md from their sections.

Usage: python bench/run_all.py [--scale=True] [--sweep=False] [--run=False]   (the scale rehearsal takes ~20 min
on 2 cores, the K x M sweep ~13 min; --run=False only rebuilds RESULTS.md from the sections in bench/results/)
"""
from __future__ import annotations

import platform
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from selfexplain.config import make_config, module_constants, run_cli  # noqa: E402

SCALE = False                 # also run the TU-Berlin-sized scale rehearsal
RUN = True                    # run the benchmarks (False: only rebuild RESULTS.md from bench/results/*.md)
SWEEP = True                  # also run the K x M sweep scored by held-out recovery (~12 min on 2 cores)
SECTIONS = ["train", "demos", "sae", "dead", "concepts", "concepts_sweep", "explain", "explain_where", "contrast",
            "familiarity", "person", "scale", "gpu"]  # bench/results/<name>.md, each followed by <name>_notes.md when present (hand-written, never rewritten)
BENCHES = {"train": "bench/bench_train.py", "demos": "bench/compare_demos.py", "sae": "bench/bench_sae.py", "dead": "bench/bench_dead.py",
           "concepts": "bench/bench_concepts.py",
           "concepts_sweep": "bench/bench_concepts.py --sweep=True",
           "explain": "bench/bench_explain.py", "explain_where": "bench/choose_where_map.py",
           "contrast": "bench/bench_contrast.py",
           "familiarity": "bench/bench_familiarity.py", "person": "bench/bench_person.py",
           "scale": "bench/scale_rehearsal.py"}


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor()) if Path("/proc/cpuinfo").exists() else platform.processor()
    return (f"{cpu}, {torch.get_num_threads()} threads, Python {platform.python_version()}, "
            f"torch {torch.__version__}, CUDA {'yes: ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'no'}")


def machine_line(ran: bool) -> str:
    """The machine the tables were measured on: this one after a run; with --run=False the one the
    last run named (a rebuild on another machine relabelled every EPYC table as measured on it)."""
    results = ROOT / "bench" / "RESULTS.md"
    if not ran and results.is_file():
        kept = next((line for line in results.read_text().splitlines() if line.startswith("Machine: ")), None)
        if kept:
            return kept
    return f"Machine: {machine()}."


def main(**overrides) -> None:
    cfg = make_config(module_constants(globals()), overrides)
    for name in SECTIONS if cfg.RUN else []:
        if name not in BENCHES:  # gpu: written by hand from bench/gpu_check.sh on a lent GPU machine
            continue
        if (name == "scale" and not cfg.SCALE) or (name == "concepts_sweep" and not cfg.SWEEP):
            continue
        print(f"== {BENCHES[name]}", flush=True)
        subprocess.run([sys.executable, *BENCHES[name].split()], cwd=ROOT, check=True)
    parts = ["# Benchmark results", "", machine_line(cfg.RUN), "",
             "Each generated table is rewritten by `make bench` (bench/run_all.py); ratios are measured side by side in one "
             "run. A section that names its own machine was measured there (a bench rerun alone on another machine). "
             "Notes (`bench/results/*_notes.md`: earlier measurements, settings compared by hand) are kept as "
             "written.", ""]
    for name in SECTIONS:
        for path in (ROOT / "bench" / "results" / f"{name}.md", ROOT / "bench" / "results" / f"{name}_notes.md"):
            if path.is_file():
                parts += [path.read_text().strip(), ""]
    (ROOT / "bench" / "RESULTS.md").write_text("\n".join(parts))
    print(f"wrote {ROOT / 'bench' / 'RESULTS.md'}")


if __name__ == "__main__":
    run_cli(main, globals())
