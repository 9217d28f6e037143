#!/usr/bin/env bash
# One GPU session's check of the fast path (at most 8 minutes on one H100/H200, offline: random weights of the
# Qwen2.5-7B shape in bf16, nothing downloaded). Run from the repository root:
#
#     bash scripts/gpu_check.sh            # writes results/gpu_check.md; exit status 0 only if every check passed
#
# 1. python -m parallel_decoding.bench.gpu_check, in a KV arena of 32768 slots (the model's context, what the engine
#    allocates): ms/token of the eager and the fast (flex) normal step, ms per fast parallel step for N in {1, 8, 16},
#    the bytes each step reads (weights + the K/V its attention touches) with the achieved GB/s and the ratio to the
#    bandwidth floor, the greedy token match rate of fast vs eager; then at 1k and 8k tokens of text the flex step
#    vs the dense-mask step, and one step's attention alone (flex, dense mask, the project's Triton kernel); inductor's
#    cudagraph_skips counter and the graph replays of the timed steps. A recompile or a timed step that did not replay
#    a CUDA graph fails it (one line, exit status 1, after the report is written);
# 2. python -m flash_attn_branch.bench: the project's Triton kernel against SDPA with a mask.
# Each step has its own time limit, and results/gpu_check.md is rewritten after every measurement, so a step
# that fails or runs out of time still leaves the others' results.
set -u -o pipefail

OUT=results/gpu_check.md
mkdir -p "$(dirname "$OUT")"
export PYTHONPATH="$PWD/flash-attention:$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
CHECK_LIMIT_S=390   # model build + 3 flex buckets + 1 dense bucket compiled and recorded + measurements
KERNEL_LIMIT_S=75   # 390 + 75 s: under 8 minutes with the start

timeout "$CHECK_LIMIT_S" python3 -m parallel_decoding.bench.gpu_check --config qwen2.5-7b --device cuda --dtype bfloat16 \
    --capacity 32768 --attention flex --prompt_len 1024 --steps 32 --branches 1 8 16 --match_tokens 64 \
    --text_lens 1024 8192 --out "$OUT"
check_status=$?
echo "gpu_check exit status $check_status"

KERNEL_MD=$(mktemp)
timeout "$KERNEL_LIMIT_S" python3 -m flash_attn_branch.bench --out "$KERNEL_MD"
status=$?
{
  echo
  echo "## Branch-aware Triton kernel vs SDPA (python -m flash_attn_branch.bench, exit status $status)"
  echo
  cat "$KERNEL_MD" 2>/dev/null
  echo
  echo "- gpu_check exit status $check_status (124: out of time)"
  echo "- $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null)"
  echo "- $(python3 -c "import torch, transformers, triton; print('torch', torch.__version__, 'transformers', transformers.__version__, 'triton', triton.__version__)" 2>&1)"
  echo "- commit $(git rev-parse --short HEAD 2>/dev/null)"
} >>"$OUT"
cat "$OUT"
[ "$check_status" -eq 0 ] && [ "$status" -eq 0 ]
