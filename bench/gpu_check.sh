#!/usr/bin/env bash
# The CUDA paths in one prepared pass, for a lent GPU machine (results: bench/results/gpu.md).
#
# Usage:  bash bench/gpu_check.sh [OUT_FOLDER]        (default bench/_work/gpu; python: $PY, default python3)
#
# In order, each step timed and logged, a failed step never stopping the rest:
#   1. the five-stage demo on the GPU (AMP=auto, i.e. bf16), its figures beside the CPU demo's;
#   2. DDP on NCCL: stages 1 and 2 under `torchrun --nproc_per_node=1` (joins a process group, wraps in DDP),
#      stage 1 beside the same short run without torchrun;
#   3. fp16 with loss scaling (stage 1) and the SAE's fp16 encoder (stage 2), short runs;
#   4. bench_train.py on CUDA: the training loop against a bare step, at the demo's 64 px and TU-Berlin's 224 px;
#   5. the CPU test files that run the stages with DEVICE=auto, now on CUDA.
# ONLY (a regex of step names) runs some steps alone. Steps start only while BUDGET_S (default 330) seconds have
# not passed. On an H200 steps 1-4 took 300 s and the tests ~330 s more: run them in a second call (ONLY=pytest).
# The lent machines' python3 lacks python-dotenv: carry its wheel (the device tool's README says how).
set -u
O=${1:-${OUT:-bench/_work/gpu}}
mkdir -p "$O"
PY=${PY:-python3}
BUDGET_S=${BUDGET_S:-330}
DEV=${DEV:-cuda}   # cpu: a dry run of this script on a machine without a GPU
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1
LOG="$O/gpu_log.txt"; TIMES="$O/gpu_times.txt"
: >"$LOG"; : >"$TIMES"
START=$(date +%s.%N)
now() { awk -v a="$(date +%s.%N)" -v b="$1" 'BEGIN{printf "%.1f", a-b}'; }

step() {  # step NAME LIMIT_S command...: run, log, time; skipped once the budget is spent
    local name=$1 limit=$2; shift 2
    [[ -n "${ONLY:-}" && ! "$name" =~ $ONLY ]] && return  # ONLY='ddp|fp16': a rerun of some steps
    if awk -v e="$(now "$START")" -v b="$BUDGET_S" 'BEGIN{exit !(e > b)}'; then
        echo "$name skipped (budget of ${BUDGET_S} s spent)" | tee -a "$TIMES"; return
    fi
    echo "=== $name: $*" >>"$LOG"
    local t0; t0=$(date +%s.%N)
    timeout "$limit" "$@" >>"$LOG" 2>&1
    local rc=$?
    printf '%-24s rc=%-3d %7s s\n' "$name" "$rc" "$(now "$t0")" | tee -a "$TIMES"
}

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  $PY -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))"
  echo "cpu: $(lscpu | sed -n 's/^Model name: *//p'), $(nproc) cores"; } >"$O/gpu_env.txt" 2>&1
cat "$O/gpu_env.txt"

# 1. the demo, as `make demo` runs it, on the GPU
step demo_stage1 150 $PY train_standard_cnn.py --overwrite=True --epochs=8 --device=$DEV
step demo_stage2 120 $PY train_sae.py --overwrite=True --device=$DEV
step demo_stage3 120 $PY sae_summarize.py --overwrite=True --device=$DEV
step demo_stage4 60 $PY sae_summary_to_llm.py --backend=offline
step demo_stage5 60 $PY why_did_you.py --image=test:0 --device=$DEV --json=True

# 2. DDP on NCCL with one process, beside the same short run without torchrun
short=(--epochs=1 --max_batches=40 --overwrite=True --device=$DEV)
step plain_stage1 90 $PY train_standard_cnn.py "${short[@]}" --out_dir=runs/gpu_plain
step ddp_stage1 90 $PY -m torch.distributed.run --standalone --nproc_per_node=1 train_standard_cnn.py "${short[@]}" --out_dir=runs/gpu_ddp
step ddp_stage2 90 $PY -m torch.distributed.run --standalone --nproc_per_node=1 train_sae.py --classifier_ckpt=runs/gpu_ddp/best.pt \
    --out_dir=runs/gpu_ddp_sae --epochs=2 --min_steps=0 --overwrite=True --device=$DEV

# 3. fp16: GradScaler in stage 1, the fp16 encoder in stage 2
step fp16_stage1 90 $PY train_standard_cnn.py "${short[@]}" --amp=fp16 --out_dir=runs/gpu_fp16
step fp16_stage2 90 $PY train_sae.py --classifier_ckpt=runs/gpu_fp16/best.pt --out_dir=runs/gpu_fp16_sae \
    --epochs=2 --min_steps=0 --overwrite=True --amp=fp16 --device=$DEV

# 4. stage 1's loop against a bare step on CUDA (bf16 = AMP=auto; the other precisions beside it)
step bench_train_64 90 $PY bench/bench_train.py --device=$DEV --demo=False --out="$O/train_cuda_64.md"
step bench_train_224 120 $PY bench/bench_train.py --device=$DEV --demo=False --image_size=224 --batch_size=128 \
    --out="$O/train_cuda_224.md"

# the figures, beside the CPU demo's (bench/results/train_notes.md)
$PY - "$O" >>"$LOG" 2>&1 <<'EOF'
import json, sys
from pathlib import Path
def read(path):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        return {"error": str(exc)}
cnn, sae, summary = read("runs/standard_cnn/metrics.json"), read("runs/sae_topk/metrics.json"), read("neuron_report/summary.json")
out = {"stage1": {k: cnn.get(k) for k in ("test_accuracy", "val_accuracy", "device", "epochs")},
       "stage1_epoch_s": [round(h["seconds"], 2) for h in cnn.get("history", [])],
       "stage2": {k: sae.get(k) for k in ("val_fvu", "val_l0", "train_dead_fraction", "val_dead_fraction",
                                           "val_spliced_accuracy", "tokens_per_s", "epochs")},
       "stage3_timings_s": summary.get("timings_s")}
codes = summary.get("concept_measures", {}).get("codes", {})
for name, code in codes.items():
    parts = code.get("per_part", {}).values()
    out[f"held_out_auroc_{name}"] = sum(p["test_auroc"] for p in parts) / max(1, len(parts))
out["versus_best_baseline"] = summary.get("concept_measures", {}).get("sae_versus_best_baseline")
for run in ("gpu_plain", "gpu_ddp", "gpu_fp16"):
    m = read(f"runs/{run}/metrics.json")
    out[run] = {k: m.get(k) for k in ("val_accuracy", "world_size", "device")} | {
        "train_loss": [round(h["train_loss"], 4) for h in m.get("history", [])]}
for run in ("gpu_ddp_sae", "gpu_fp16_sae"):
    m = read(f"runs/{run}/metrics.json")
    out[run] = {k: m.get(k) for k in ("val_fvu", "val_dead_fraction", "world_size", "tokens_per_s")}
Path(sys.argv[1], "gpu_summary.json").write_text(json.dumps(out, indent=1))
print(json.dumps(out, indent=1))
EOF

# 5. the test files that run stages with DEVICE=auto, on CUDA (the browser tests need Chromium: not run)
step pytest_cuda 300 $PY -m pytest -q -rf -p no:cacheprovider tests/test_end_to_end.py tests/test_sae.py \
    tests/test_train_cnn.py tests/test_summarize.py tests/test_explain.py tests/test_evidence.py
echo "total $(now "$START") s" | tee -a "$TIMES"
