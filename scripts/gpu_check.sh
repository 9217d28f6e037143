#!/usr/bin/env bash
# One GPU session's check of the fast path (offline: the embedded model and random weights of the Qwen2.5-7B shape
# in bf16, nothing downloaded). Run from the repository root:
#
#     bash scripts/gpu_check.sh                # every step; exit status 0 only if every check passed
#     bash scripts/gpu_check.sh correctness    # steps 0 and 1 alone (at most 4 minutes): results/gpu_check_correctness.md
#     bash scripts/gpu_check.sh timing         # steps 2 to 5 alone (at most 8 minutes): results/gpu_check.md
#
# The device tool runs one command for at most 10 minutes: there, run the two halves as two calls, correctness first.
#
# 0. the Quick start's answers on the GPU: generate.py over 8 rows of data/retrieval_4.jsonl on the embedded model in
#    float32, on the eager path and on the compiled one (CUDA graphs, FlexAttention's Triton kernels), and
#    python -m parallel_decoding.bench.same_answers holds the compiled answers to the eager ones in both modes (the
#    tests hold the two equal on a CPU; on the first H200 run, 2026-12-04, bf16, the compiled parallel answers were
#    wrong: docs/bench.md);
# 1. python -m parallel_decoding.bench.flex_rows: one compiled FlexAttention call of a tree pass, by head shape and
#    number of query rows, with torch's kernel choice and with the main kernel forced, each against sdpa in float32
#    under the dense mask; it fails if the kernel the arena uses (flex.kernel_options) is off. It tells whether the
#    split-KV decoding kernel that torch picks for a short query is what garbled step 0's passes of several rows;
# 2. python -m parallel_decoding.bench.gpu_check, in a KV arena of 32768 slots (the model's context, what the engine
#    allocates): ms/token of the eager and the fast (flex) normal step, ms per fast parallel step for N in {1, 16},
#    the bytes each step reads (weights + the K/V its attention touches) with the achieved GB/s and the ratio to the
#    bandwidth floor, the greedy token match rate of fast vs eager; then at 1k and 8k tokens of text the flex step
#    vs the dense-mask step, and one step's attention alone (flex, dense mask, the project's Triton kernel); inductor's
#    cudagraph_skips counter and the graph replays of the timed steps. A recompile or a timed step that did not replay
#    a CUDA graph fails it (one line, exit status 1, after the report is written);
# 3. python -m parallel_decoding.bench.batch on the same shape, compiled: tokens/s and p50/p99 latency of both modes at
#    batch 1, 4, 8, 16 on the batch engine, with synthetic requests (a random model writes no skeleton: each request
#    takes the method's passes in their real order and sizes, bench/synthetic.py), one repeat, two compiled widths
#    (16 and 64 rows: a one-row step pads to 16, which on this GPU reads the same weights);
# 4. python -m flash_attn_branch.bench: the project's Triton kernel against SDPA with a mask;
# 5. vLLM's branch stage, where vllm imports.
# Each step has its own time limit, and the report is rewritten after every measurement, so a step that fails or
# runs out of time still leaves the others' results.
set -u -o pipefail

PART=${1:-all}
case "$PART" in
  all|correctness|timing) ;;
  *) echo "gpu_check.sh: the part is all, correctness or timing, not '$PART'" >&2; exit 2 ;;
esac
OUT=results/gpu_check.md
CORRECTNESS_OUT=results/gpu_check_correctness.md
mkdir -p "$(dirname "$OUT")"
export PYTHONPATH="$PWD/flash-attention:$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
ANSWERS_LIMIT_S=150  # two runs of generate.py over 8 rows (one compiling its buckets)
FLEX_ROWS_LIMIT_S=90 # 8 compiled attention calls (2 head shapes x 2 row counts x 2 kernels)
CHECK_LIMIT_S=240    # model build + 2 flex buckets + 1 dense bucket compiled and recorded + measurements
BATCH_LIMIT_S=200    # model build + 2 buckets compiled and recorded + 8 settings of 16 requests (146 s on an H200)
KERNEL_LIMIT_S=45    # correctness 240 s, timing 485 s (+ vLLM's 240 where it imports)

correctness_status=0
if [ "$PART" != timing ]; then

ANSWERS_DIR=$(mktemp -d)
ANSWERS_ROWS=(--task retrieval --device cuda --dtype float32 --max_samples 8)
timeout "$ANSWERS_LIMIT_S" bash -c "python3 generate.py ${ANSWERS_ROWS[*]} --compile off --output_dir $ANSWERS_DIR/eager \
    && python3 generate.py ${ANSWERS_ROWS[*]} --compile on --output_dir $ANSWERS_DIR/compiled" >"$ANSWERS_DIR/log" 2>&1
answers_run=$?
python3 -m parallel_decoding.bench.same_answers "$ANSWERS_DIR"/eager/*/retrieval_4.jsonl \
    "$ANSWERS_DIR"/compiled/*/retrieval_4.jsonl >"$ANSWERS_DIR/same" 2>&1
answers_status=$?
[ "$answers_run" -eq 0 ] || answers_status=$answers_run
{
  echo "# Answers on the GPU: the compiled path against the eager one (generate.py, 8 rows, float32; exit status $answers_status)"
  echo
  echo '```'
  cat "$ANSWERS_DIR/same"
  grep -E "^generate: .*(rows|error)" "$ANSWERS_DIR/log"
  echo '```'
  echo
} >"$CORRECTNESS_OUT"
echo "answers exit status $answers_status"

FLEX_ROWS_MD=$(mktemp)
timeout "$FLEX_ROWS_LIMIT_S" python3 -m parallel_decoding.bench.flex_rows --device cuda --dtype float32 \
    --shapes 4,2,48 16,2,128 --rows 1 4 >"$FLEX_ROWS_MD" 2>&1
flex_rows_status=$?
{
  echo "# FlexAttention by row count (python -m parallel_decoding.bench.flex_rows, exit status $flex_rows_status)"
  echo
  cat "$FLEX_ROWS_MD"
  echo
} >>"$CORRECTNESS_OUT"
echo "flex_rows exit status $flex_rows_status"
[ "$answers_status" -eq 0 ] && [ "$flex_rows_status" -eq 0 ] || correctness_status=1
cat "$CORRECTNESS_OUT"
fi
[ "$PART" = correctness ] && exit "$correctness_status"

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
[ "$correctness_status" -eq 0 ] && [ "$check_status" -eq 0 ] && [ "$batch_status" -eq 0 ] && [ "$status" -eq 0 ]
overall=$?

# 5. vLLM (issue 30): the branch stage on vLLM for the Qwen2.5-0.5B shape (8 branches of 64 tokens sharing a 512-token
#    prefix vs one request writing 512 tokens; python -m parallel_decoding.bench.vllm --part branches), where vLLM
#    imports; else one line says it was skipped (pip install -e ".[vllm]" adds it).
VLLM_LIMIT_S=240
if python3 -c "import vllm" >/dev/null 2>&1; then
    VLLM_LOG=$(mktemp)
    timeout "$VLLM_LIMIT_S" python3 -m parallel_decoding.bench.vllm --part branches --dtype bfloat16 --repeats 3 \
        --engine_args '{"gpu_memory_utilization": 0.5}' >"$VLLM_LOG" 2>&1
    vllm_status=$?
    {
      echo
      echo "## vLLM branch stage (python -m parallel_decoding.bench.vllm --part branches, exit status $vllm_status)"
      echo
      echo '```'
      grep -E '^(repeat |bench.vllm)' "$VLLM_LOG"
      echo '```'
    } | tee -a "$OUT"
    [ "$vllm_status" -eq 0 ] || overall=1
else
    echo "vLLM step skipped: vllm does not import on this machine (pip install -e \".[vllm]\" adds it)" | tee -a "$OUT"
fi
exit "$overall"
