#!/usr/bin/env bash
# One GPU session's check of the fast path (at most 8 minutes on one H100/H200, offline: random weights of the
# Qwen2.5-7B shape in bf16, nothing downloaded). Run from the repository root:
#
#     bash scripts/gpu_check.sh            # writes results/gpu_check.md; exit status 0 only if every check passed
#
# 1. python -m parallel_decoding.bench.gpu_check, in a KV arena of 32768 slots (the model's context, what the engine
#    allocates): ms/token of the eager and the fast (flex) normal step, ms per fast parallel step for N in {1, 16},
#    the bytes each step reads (weights + the K/V its attention touches) with the achieved GB/s and the ratio to the
#    bandwidth floor, the greedy token match rate of fast vs eager; then at 1k and 8k tokens of text the flex step
#    vs the dense-mask step, and one step's attention alone (flex, dense mask, the project's Triton kernel); inductor's
#    cudagraph_skips counter and the graph replays of the timed steps. A recompile or a timed step that did not replay
#    a CUDA graph fails it (one line, exit status 1, after the report is written);
# 2. python -m parallel_decoding.bench.batch on the same shape, compiled: tokens/s and p50/p99 latency of both modes at
#    batch 1, 4, 8, 16 on the batch engine, with synthetic requests (a random model writes no skeleton: each request
#    takes the method's passes in their real order and sizes, bench/synthetic.py), one repeat, two compiled widths
#    (16 and 64 rows: a one-row step pads to 16, which on this GPU reads the same weights);
# 3. python -m flash_attn_branch.bench: the project's Triton kernel against SDPA with a mask.
# Each step has its own time limit, and results/gpu_check.md is rewritten after every measurement, so a step
# that fails or runs out of time still leaves the others' results.
set -u -o pipefail

OUT=results/gpu_check.md
mkdir -p "$(dirname "$OUT")"
export PYTHONPATH="$PWD/flash-attention:$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
CHECK_LIMIT_S=290   # model build + 2 flex buckets + 1 dense bucket compiled and recorded + measurements
BATCH_LIMIT_S=140   # model build + 2 buckets compiled and recorded + 8 settings of 16 requests
KERNEL_LIMIT_S=45   # 290 + 140 + 45 s: under 8 minutes with the start

timeout "$CHECK_LIMIT_S" python3 -m parallel_decoding.bench.gpu_check --config qwen2.5-7b --device cuda --dtype bfloat16 \
    --capacity 32768 --attention flex --prompt_len 1024 --steps 32 --branches 1 16 --match_tokens 64 \
    --text_lens 1024 8192 --out "$OUT"
check_status=$?
echo "gpu_check exit status $check_status"

BATCH_LOG=$(mktemp)
timeout "$BATCH_LIMIT_S" python3 -m parallel_decoding.bench.batch --config qwen2.5-7b --device cuda --dtype bfloat16 \
    --compile on --buckets 16 64 --requests 16 --prompt_len 512 --branches 4 --branch_tokens 32 \
    --batch_sizes 1 4 8 16 --repeats 1 >"$BATCH_LOG" 2>&1
batch_status=$?
{
  echo
  echo "## Batch engine, synthetic requests (python -m parallel_decoding.bench.batch, exit status $batch_status)"
  echo
  echo '```'
  grep -v '^{' "$BATCH_LOG"   # the table (or, cut short, each measurement as it finished); the JSON line is left out
  echo '```'
} >>"$OUT"
echo "batch exit status $batch_status"

KERNEL_MD=$(mktemp)
timeout "$KERNEL_LIMIT_S" python3 -m flash_attn_branch.bench --out "$KERNEL_MD"
status=$?
{
  echo
  echo "## Branch-aware Triton kernel vs SDPA (python -m flash_attn_branch.bench, exit status $status)"
  echo
  cat "$KERNEL_MD" 2>/dev/null
  echo
  echo "- gpu_check exit status $check_status, batch exit status $batch_status (124: out of time)"
  echo "- $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null)"
  echo "- $(python3 -c "import torch, transformers, triton; print('torch', torch.__version__, 'transformers', transformers.__version__, 'triton', triton.__version__)" 2>&1)"
  echo "- commit $(git rev-parse --short HEAD 2>/dev/null)"
} >>"$OUT"
cat "$OUT"
[ "$check_status" -eq 0 ] && [ "$batch_status" -eq 0 ] && [ "$status" -eq 0 ]
