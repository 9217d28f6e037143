"""Run normal and parallel decoding over a task's dataset and write one result row per dataset row.

    python generate.py --task retrieval                       # the embedded tiny model, data/retrieval_4.jsonl
    python generate.py --model_path Qwen/Qwen2.5-7B-Instruct --task planning --attn_implementation sdpa
    torchrun --nproc_per_node 8 generate.py --tp --model_path Qwen/Qwen2.5-72B-Instruct --task planning
    torchrun --nproc_per_node 4 generate.py --data_parallel --model_path Qwen/Qwen2.5-7B-Instruct --task retrieval
    python generate.py --device_map auto --model_path Qwen/Qwen2.5-72B-Instruct --task planning
    python generate.py --engine vllm --task retrieval --engine_args '{"tensor_parallel_size": 2}'
    python generate.py --engine openai --base_url http://127.0.0.1:8000/v1 --task retrieval

Output: <output_dir>/<basename of model_path>/<stem of dataset file>.jsonl, one JSON object per dataset row: the
row's own columns, then RESULT_COLUMNS (parallel_decoding/runs/comparison.py). The file is rewritten atomically
after every row, so an interrupted run leaves a valid file; a rerun with the same settings
(parallel_decoding/runs/settings.py: run_settings) resumes (rows already written without an error are skipped)
unless --overwrite is given, and a rerun with other settings is refused. One run at a time writes a results file (a
lock beside it). This file parses the flags and maps errors to exit statuses; parallel_decoding/runs/driver.py runs
the rows. See docs/generate.md.
"""

import argparse
import contextlib
import os
import sys

try:  # torch and transformers load here, for seconds: a Ctrl-C now ends the run in one line, not a traceback
    from parallel_decoding.cli import EXIT_BAD_INPUT, EXIT_INTERRUPTED, OneLineArgumentParser, UsageError
    from parallel_decoding.runs import distributed, driver, served
    from parallel_decoding.runs.distributed import DATA_PARALLEL, SINGLE, TENSOR_PARALLEL, DistributedError, Ranks
    from parallel_decoding.runs.flags import check_flags
    from parallel_decoding.runs.loading import DEFAULT_MODEL_PATH
    from parallel_decoding.runs.results import ResultsError
    from parallel_decoding.tasks import TASKS, DatasetError, FormatPromptError, model_task_warning
except KeyboardInterrupt:
    print("generate.py: interrupted while loading; no results file was changed", file=sys.stderr)
    sys.exit(130)

INPUT_ERRORS = (UsageError, DatasetError, FormatPromptError, ResultsError, DistributedError)


def parse_args(argv=None) -> argparse.Namespace:
    p = OneLineArgumentParser(description="Normal vs parallel decoding over a task dataset.")
    p.add_argument(
        "--model_path",
        default=None,
        help=f"local model directory or hub id (default: the embedded {DEFAULT_MODEL_PATH.name})",
    )
    p.add_argument("--task", required=True, choices=list(TASKS))
    p.add_argument(
        "--attn_implementation",
        default="sdpa",
        choices=["sdpa", "eager", "branch_attention", "flash_attention_2"],
        help="branch_attention: the project's Triton kernel for both modes (CUDA); flash_attention_2, the reference's "
        "name for it, is an alias",
    )
    p.add_argument(
        "--normal_stock_flash_attn",
        action="store_true",
        help="with flash_attention_2: normal decoding on stock flash-attn (flash_attn package) instead",
    )
    p.add_argument("--data_path", default=None, help="dataset file of the task's format (default: data/<task file>)")
    p.add_argument("--max_samples", type=int, default=None, help="use the first N rows of the dataset")
    p.add_argument("--output_dir", default="results")
    p.add_argument("--max_new_tokens", type=int, default=512)
    p.add_argument(
        "--temperature",
        type=float,
        default=None,
        help="0 (the default): greedy; above 0: sampling at that temperature, both modes (as the server's)",
    )
    p.add_argument("--top_p", type=float, default=1.0, help="when sampling: nucleus mass kept (1.0: all)")
    p.add_argument("--top_k", type=int, default=0, help="when sampling: most likely tokens kept (0: all)")
    p.add_argument(
        "--seed",
        type=int,
        default=0,
        help="when sampling: each mode of each row samples from its own stream derived from it",
    )
    p.add_argument("--do_sample", action="store_true", help="alias of --temperature 1.0 (when none is given)")
    p.add_argument(
        "--dtype",
        default=None,
        choices=["bfloat16", "float16", "float32"],
        help="default: bfloat16 on GPU, float32 on CPU",
    )
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--modes", default="both", choices=["normal", "parallel", "both"])
    p.add_argument(
        "--compile",
        default="auto",
        choices=["auto", "on", "off"],
        help="both modes on a static KV arena with a compiled step (CUDA graphs on GPU); auto: on for "
        "CUDA, off on a CPU and with flash_attention_2 (docs/bench.md has the CPU measurement)",
    )
    p.add_argument(
        "--kv_capacity",
        type=int,
        default=None,
        help="tokens the compiled path's KV arena holds (default: the longest selected prompt + "
        "--max_new_tokens); a row that does not fit fails alone, in its error column",
    )
    p.add_argument(
        "--batch_size",
        type=int,
        default=1,
        help="rows in flight at once on the batch engine, per mode (default 1: one row at a time, the "
        "paper's setting); each row's time is its latency, throughput per mode is logged",
    )
    p.add_argument("--overwrite", action="store_true", help="discard an existing output file and start again")
    p.add_argument(
        "--format_prompt_file",
        default=None,
        help="UTF-8 text file that replaces the format instruction; a {task} placeholder in it wraps the "
        "task text (default: the model directory's format_prompt.txt, else the project's)",
    )
    p.add_argument("--trust_remote_code", action="store_true", help="allow custom modeling code from the model repo")
    scale = p.add_argument_group("more than one device (docs/generate.md)")
    scale.add_argument(
        "--tp",
        action="store_true",
        help="tensor parallel over the processes of `torchrun --nproc_per_node N` (one model, sharded)",
    )
    scale.add_argument(
        "--data_parallel",
        action="store_true",
        help="data parallel over the processes of `torchrun --nproc_per_node N` (a full model each)",
    )
    scale.add_argument(
        "--device_map",
        default=None,
        help="spread one model over devices with accelerate: auto, balanced, balanced_low_0, "
        "sequential, or a JSON file {module name: device}",
    )
    scale.add_argument("--offload_folder", default=None, help='where --device_map puts layers mapped to "disk"')
    served.add_flags(p)
    args = p.parse_args(argv)
    served.check_flags(args)
    check_flags(args)
    return args


def main(argv=None) -> int:
    ranks = Ranks()
    try:
        args = parse_args(argv)
        ranks = distributed.start(TENSOR_PARALLEL if args.tp else DATA_PARALLEL if args.data_parallel else SINGLE)
        if ranks.mode == SINGLE and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise UsageError(
                f"torchrun started {os.environ['WORLD_SIZE']} processes: pass --tp (one model sharded "
                f"over them) or --data_parallel (a full model each), or run without torchrun"
            )
    except (UsageError, DistributedError) as e:
        print(f"generate.py: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        return run(args, ranks)
    finally:
        distributed.stop(ranks)


def run(args, ranks: Ranks) -> int:
    """Rank 0 locks and reads the results file, every rank loads the model, then the rows are decoded. Bad input seen
    by any rank stops every rank (exit status 2), with one line from rank 0."""
    log = driver.logger(ranks)

    def stopped_by(error) -> bool:
        error = distributed.first_error(ranks, None if error is None else str(error))
        if error is not None and ranks.is_main:
            print(f"generate.py: error: {error}", file=sys.stderr)
        return error is not None

    with contextlib.ExitStack() as held:
        try:  # a Ctrl-C before the first row changes no file: one line, not a traceback
            error = the_run = None
            try:
                the_run = driver.prepare(args, ranks, held, log)
            except INPUT_ERRORS as e:
                error = e
            if stopped_by(error):
                return EXIT_BAD_INPUT
            try:  # collective under --tp: every rank loads its part of the weights
                driver.load(the_run)
            except (UsageError, DistributedError) as e:
                error = e
            if stopped_by(error):
                return EXIT_BAD_INPUT
            warning = model_task_warning(the_run.model_path, args.task)  # the toy on planning: said before decoding
            if warning:
                log(warning)
        except KeyboardInterrupt:
            log("interrupted before the first row was decoded; no results file was changed")
            return EXIT_INTERRUPTED
        try:
            return driver.decode_rows(the_run)
        except KeyboardInterrupt:
            out_path = the_run.results_file.path
            where = f"{out_path} and its shards hold" if ranks.mode == DATA_PARALLEL else f"{out_path} holds"
            log(f"interrupted: {where} every finished row; run the same command again to resume")
            return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
