#!/usr/bin/env bash
# One GPU run of the branch-stage benchmark (< 10 minutes on one H100): Qwen2.5-7B shape, random bf16 weights,
# P=2048, N in 1..32, for eager, sdpa and flash_attention_2 (the project's Triton kernel), then the kernel's own
# benchmark. Run from the repository root:
#
#     bash scripts/gpu_bench.sh [OUT_DIR]        # default: $OUT if set, else results/bench/gpu
#
# Writes OUT_DIR/gpu_bench.log (everything printed, plus a markdown table of all rows for README.md) and, per
# attention implementation, OUT_DIR/<attn>/sweep_*.csv and .png. Each step has its own time limit, so one that
# fails or hangs still leaves the others' results.
set -u -o pipefail

OUT_DIR=${1:-${OUT:-results/bench/gpu}}
mkdir -p "$OUT_DIR"
LOG="$OUT_DIR/gpu_bench.log"
export PYTHONPATH="$PWD/flash-attention:$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1

# Per-step wall-clock limits (seconds): 3 x 150 + 80 = 530 s at most.
SWEEP_LIMIT_S=150
KERNEL_LIMIT_S=80
COMMON=(--config qwen2.5-7b --device cuda --dtype bfloat16 --prefix_len 2048 --branch_len 16 --title_len 4
        --repeats 2 --warmup 1 --sweep)

{
  date -u +"%Y-%m-%dT%H:%M:%SZ"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch, transformers, triton; print('torch', torch.__version__, 'transformers', transformers.__version__, 'triton', triton.__version__)"
  git rev-parse --short HEAD 2>/dev/null
} 2>&1 | tee "$LOG"

for attn in eager sdpa flash_attention_2; do
  echo "=== $attn: python -m parallel_decoding.bench ${COMMON[*]} --attn_implementation $attn" | tee -a "$LOG"
  timeout "$SWEEP_LIMIT_S" python3 -m parallel_decoding.bench "${COMMON[@]}" --attn_implementation "$attn" \
      --out_dir "$OUT_DIR/$attn" 2>&1 | tee -a "$LOG"
  echo "=== $attn exit status ${PIPESTATUS[0]}" | tee -a "$LOG"
done

# Markdown table of every sweep row, ready for README.md.
python3 - "$OUT_DIR" <<'EOF' 2>&1 | tee -a "$LOG"
import csv, glob, sys
rows = [r for path in sorted(glob.glob(f"{sys.argv[1]}/*/sweep_*.csv")) for r in csv.DictReader(open(path))]
print("| attention | N | sequential ms/step | parallel ms/step | speedup | efficiency | parallel tok/s | peak MB |")
print("|---|---|---|---|---|---|---|---|")
for r in rows:
    print(f"| {r['attn_implementation']} | {r['num_branches']} | {float(r['sequential_ms_per_step']):.2f} | "
          f"{float(r['parallel_ms_per_step']):.2f} | {float(r['speedup']):.2f}x | {float(r['efficiency']):.2f} | "
          f"{float(r['parallel_tokens_per_s']):.0f} | {float(r['peak_memory_mb']):.0f} |")
EOF

if [ -f flash-attention/flash_attn_branch/bench.py ]; then
  echo "=== kernel: python -m flash_attn_branch.bench" | tee -a "$LOG"
  KERNEL_MD=$(mktemp -d)/flash_bench.md  # kept out of OUT_DIR: its table is appended to the log
  timeout "$KERNEL_LIMIT_S" python3 -m flash_attn_branch.bench --out "$KERNEL_MD" 2>&1 | tee -a "$LOG"
  echo "=== kernel exit status ${PIPESTATUS[0]}" | tee -a "$LOG"
  cat "$KERNEL_MD" >>"$LOG" 2>/dev/null
fi
