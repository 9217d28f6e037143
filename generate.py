"""Run normal and parallel decoding over a task's dataset and write one result row per dataset row.

    python generate.py --task retrieval                       # the embedded tiny model, data/retrieval_4.jsonl
    python generate.py --model_path Qwen/Qwen2.5-7B-Instruct --task planning --attn_implementation sdpa
    torchrun --nproc_per_node 8 generate.py --tp --model_path Qwen/Qwen2.5-72B-Instruct --task planning
    torchrun --nproc_per_node 4 generate.py --data_parallel --model_path Qwen/Qwen2.5-7B-Instruct --task retrieval
    python generate.py --device_map auto --model_path Qwen/Qwen2.5-72B-Instruct --task planning

Output: <output_dir>/<basename of model_path>/<stem of dataset file>.jsonl, one JSON object per dataset row: the
row's own columns, then the columns in RESULT_COLUMNS. The file is rewritten atomically after every row, so an
interrupted run leaves a valid file; a rerun with the same settings (run_settings) resumes (rows already written
without an error are skipped) unless --overwrite is given, and a rerun with other settings is refused. One run at a
time writes a results file (a lock beside it). See docs/generate.md.
"""

import argparse
import contextlib
import importlib.util
import json
import os
import re
import sys
from pathlib import Path

try:  # torch and transformers load here, for seconds: a Ctrl-C now ends the run in one line, not a traceback
    from parallel_decoding.runs import distributed
    from parallel_decoding.runs.comparison import MODES, BackendError, mode_generator, mode_order
    from parallel_decoding.runs.comparison import attention_backends as choose_attention_backends
    from parallel_decoding.runs.comparison import describe_attention
    from parallel_decoding.runs.distributed import DATA_PARALLEL, SINGLE, TENSOR_PARALLEL, DistributedError, Ranks
    from parallel_decoding.runs.results import ResultsError, ResultsFile
    from parallel_decoding.tasks import (
        TASKS, DatasetError, FormatPromptError, build_prompt, default_data_path, get_task, load_dataset,
        model_task_warning, resolve_format_prompt,
    )
except KeyboardInterrupt:
    print("generate.py: interrupted while loading; no results file was changed", file=sys.stderr)
    sys.exit(130)

REPO_ROOT = Path(__file__).resolve().parent
DEFAULT_MODEL_PATH = REPO_ROOT / "models" / "tiny-qwen2-retrieval"
RESULT_COLUMNS = (
    "full_prompt",
    "normal_response", "normal_time", "normal_length", "normal_speed", "normal_steps",
    "parallel_response", "parallel_time", "parallel_length", "parallel_speed", "parallel_steps",
    "num_parallel_branches", "stage1_response", "branches", "stage1_time", "stage2_time", "stage3_time",
    "fallback", "normal_caps", "parallel_caps", "first_mode", "normal_attention", "parallel_attention", "error",
    "settings",  # run_settings() of the run that made the row (parallel_decoding/results.py says why per row)
)
# The value a setting had in rows written before it was recorded (a key added to run_settings later goes here).
IMPLIED_SETTINGS = {
    "compile": False,  # rows recorded before --compile existed were decoded on the eager path
    # Rows recorded before the format instruction was: the project's default of that time (no worked example).
    "format_prompt": {"file": None,
                      "sha256": "cfef567291969f9ae0e9e6d891d577ac6eb300a086b0e22a1da60a86f3c3be84"},
    # Rows recorded before max_new_tokens bounded the whole parallel answer (each branch had its own budget).
    "token_budget": "each branch",
}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")  # "org/name": left to from_pretrained, not checked on disk


def one_line(error: BaseException) -> str:
    """`Type: first line of the message`, for logs and the `error` column."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


class UsageError(Exception):
    """Bad input detected before anything is written: printed as one line, exit code 2."""


class OneLineArgumentParser(argparse.ArgumentParser):
    def error(self, message):
        raise UsageError(message)


def parse_args(argv=None) -> argparse.Namespace:
    p = OneLineArgumentParser(description="Normal vs parallel decoding over a task dataset.")
    p.add_argument("--model_path", default=None,
                   help=f"local model directory or hub id (default: the embedded {DEFAULT_MODEL_PATH.name})")
    p.add_argument("--task", required=True, choices=list(TASKS))
    p.add_argument("--attn_implementation", default="sdpa", choices=["sdpa", "eager", "flash_attention_2"],
                   help="flash_attention_2: the project's Triton kernel for both modes (CUDA)")
    p.add_argument("--normal_stock_flash_attn", action="store_true",
                   help="with flash_attention_2: normal decoding on stock flash-attn (flash_attn package) instead")
    p.add_argument("--data_path", default=None, help="dataset file of the task's format (default: data/<task file>)")
    p.add_argument("--max_samples", type=int, default=None, help="use the first N rows of the dataset")
    p.add_argument("--output_dir", default="results")
    p.add_argument("--max_new_tokens", type=int, default=512)
    p.add_argument("--do_sample", action="store_true", help="sample instead of greedy decoding (both modes)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top_p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0,
                   help="sampling seed; each mode of each row samples from its own stream derived from it")
    p.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"],
                   help="default: bfloat16 on GPU, float32 on CPU")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--modes", default="both", choices=["normal", "parallel", "both"])
    p.add_argument("--compile", default="auto", choices=["auto", "on", "off"],
                   help="both modes on a static KV arena with a compiled step (CUDA graphs on GPU); auto: on for "
                        "CUDA, off on a CPU and with flash_attention_2 (docs/bench.md has the CPU measurement)")
    p.add_argument("--overwrite", action="store_true", help="discard an existing output file and start again")
    p.add_argument("--format_prompt_file", default=None,
                   help="UTF-8 text file that replaces the format instruction; a {task} placeholder in it wraps the "
                        "task text (default: the model directory's format_prompt.txt, else the project's)")
    p.add_argument("--trust_remote_code", action="store_true", help="allow custom modeling code from the model repo")
    scale = p.add_argument_group("more than one device (docs/generate.md)")
    scale.add_argument("--tp", action="store_true",
                       help="tensor parallel over the processes of `torchrun --nproc_per_node N` (one model, sharded)")
    scale.add_argument("--data_parallel", action="store_true",
                       help="data parallel over the processes of `torchrun --nproc_per_node N` (a full model each)")
    scale.add_argument("--device_map", default=None,
                       help="spread one model over devices with accelerate: auto, balanced, balanced_low_0, "
                            "sequential, or a JSON file {module name: device}")
    scale.add_argument("--offload_folder", default=None, help="where --device_map puts layers mapped to \"disk\"")
    args = p.parse_args(argv)
    if args.max_samples is not None and args.max_samples < 1:
        raise UsageError(f"--max_samples must be >= 1, got {args.max_samples}")
    if args.max_new_tokens < 1:
        raise UsageError(f"--max_new_tokens must be >= 1, got {args.max_new_tokens}")
    if args.temperature <= 0:
        raise UsageError(f"--temperature must be > 0, got {args.temperature}")
    if not 0 < args.top_p <= 1:
        raise UsageError(f"--top_p must be in (0, 1], got {args.top_p}")
    check_scale_flags(args)
    if args.compile == "on" and args.attn_implementation == "flash_attention_2":
        raise UsageError("--compile on needs --attn_implementation sdpa or eager (the fast path builds its own mask "
                         "over the KV arena; the Triton kernel runs eagerly)")
    if args.compile == "on" and (args.tp or args.device_map is not None):
        raise UsageError(f"--compile on with {'--tp' if args.tp else '--device_map'} is not supported: the KV arena "
                         f"holds every head of every layer on one device; use --compile off")
    return args


DEVICE_MAP_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")


def check_scale_flags(args) -> None:
    """The combinations of --tp, --data_parallel, --device_map and --device that this script runs."""
    if args.tp and args.data_parallel:
        raise UsageError("--tp with --data_parallel is not supported; use one of them (tensor parallel shards one "
                         "model over all processes, data parallel gives each process a full model)")
    if args.device_map is not None and (args.tp or args.data_parallel):
        raise UsageError(f"--device_map with {'--tp' if args.tp else '--data_parallel'} is not supported: "
                         f"--device_map spreads one model over the devices of a single process")
    if args.device is not None and (args.tp or args.device_map is not None):
        raise UsageError(f"--device with {'--tp' if args.tp else '--device_map'}: the devices are chosen for you "
                         f"({'cuda:LOCAL_RANK per process' if args.tp else 'by accelerate'}); drop --device")
    if args.offload_folder is not None and args.device_map is None:
        raise UsageError("--offload_folder is only used with --device_map")
    if args.device_map is not None and args.device_map not in DEVICE_MAP_STRATEGIES:
        args.device_map = read_device_map(args.device_map)


def read_device_map(path: str) -> dict:
    try:
        device_map = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as e:
        raise UsageError(f"--device_map {path}: not one of {', '.join(DEVICE_MAP_STRATEGIES)} and not a readable "
                         f"file ({e.strerror})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UsageError(f"--device_map {path}: does not parse as JSON ({e})") from None
    if not isinstance(device_map, dict) or not all(isinstance(k, str) and isinstance(v, (str, int))
                                                   for k, v in device_map.items()):
        raise UsageError(f"--device_map {path}: expected a JSON object {{module name: device}}, "
                         f"e.g. {{\"model.layers.0\": 0, \"lm_head\": \"cpu\"}}")
    for module, device in device_map.items():
        if not usable_map_device(device):
            raise UsageError(f"--device_map {path}: {module!r} -> {device!r} is not a device of this machine "
                             f"(use \"cpu\", \"disk\", or a CUDA index such as 0 or \"cuda:0\")")
    return device_map


def usable_map_device(device) -> bool:
    """"cpu", "disk", or a CUDA device (0, "0", "cuda", "cuda:0") that this machine has."""
    import torch

    if device in ("cpu", "disk"):
        return True
    text = str(device).removeprefix("cuda").removeprefix(":") or "0"
    return text.isdigit() and int(text) < torch.cuda.device_count()


def run_mode(args) -> str:
    return TENSOR_PARALLEL if args.tp else DATA_PARALLEL if args.data_parallel else SINGLE


# --- inputs and the output file ---------------------------------------------------------------------------------

def resolve_model_path(model_path) -> str:
    """A local directory, or a hub id (org/name) when no such local path exists; anything else is an error."""
    if model_path is None:
        if not DEFAULT_MODEL_PATH.is_dir():
            raise UsageError(f"the embedded default model {DEFAULT_MODEL_PATH} is missing; pass --model_path")
        return str(DEFAULT_MODEL_PATH)
    if os.path.isdir(model_path):
        missing = missing_model_files(Path(model_path))
        if missing:
            raise UsageError(f"--model_path {model_path} is not a model directory: {', '.join(missing)}")
        return model_path
    if os.path.exists(model_path):
        raise UsageError(f"--model_path {model_path} is a file, not a model directory")
    if HUB_ID.match(model_path) and not model_path.startswith("."):
        return model_path
    raise UsageError(f"--model_path {model_path} does not exist")


def missing_model_files(directory: Path) -> list:
    """What from_pretrained needs and `directory` lacks: the config, tokenizer files, weights."""
    missing = []
    if not (directory / "config.json").is_file():
        missing.append("no config.json")
    if not any((directory / name).is_file() for name in TOKENIZER_FILES) and not any(directory.glob("*.tiktoken")):
        missing.append(f"no tokenizer files ({', '.join(TOKENIZER_FILES[:3])}, ...)")
    if not any(directory.glob("*.safetensors")) and not any(directory.glob("pytorch_model*.bin")):
        missing.append("no weights (*.safetensors or pytorch_model*.bin)")
    return missing


def run_settings(args) -> dict:
    """The settings that shape a result row, recorded in its `settings` column: a rerun whose settings differ from
    the file's is refused before the model loads. Sampling settings count only with --do_sample (greedy rows do not
    depend on them). The device is not a setting: it changes timings, not what a row holds."""
    model = resolve_model_path(args.model_path)
    device, dtype = choose_device(args)
    return {
        "model": os.path.realpath(model) if os.path.isdir(model) else model,
        "dtype": str(dtype).removeprefix("torch."),
        # the kernel choice: flash_attention_2 runs the project's kernel in both modes unless normal decoding was
        # asked to run stock flash-attn
        "attn_implementation": args.attn_implementation + ("+normal_stock_flash_attn"
                                                           if args.normal_stock_flash_attn else ""),
        "max_new_tokens": args.max_new_tokens,
        # what max_new_tokens bounds; rows made before it did so for the whole parallel answer (and before each
        # mode sampled from its own stream) record no such key and are implied "each branch"
        "token_budget": "whole answer",
        "do_sample": args.do_sample,
        "temperature": args.temperature if args.do_sample else None,
        "top_p": args.top_p if args.do_sample else None,
        "seed": args.seed if args.do_sample else None,
        "modes": list(run_modes(args)),
        "format_prompt": resolve_format_prompt(args.format_prompt_file, model).setting(),
        "compile": compile_setting(args, device),
    }


def run_modes(args) -> tuple:
    return MODES if args.modes == "both" else (args.modes,)


def output_path(output_dir: str, model_path: str, data_path: str) -> Path:
    model_name = os.path.basename(os.path.normpath(model_path))
    return Path(output_dir) / model_name / f"{Path(data_path).stem}.jsonl"


# --- model ------------------------------------------------------------------------------------------------------

def register_branch_kernel() -> str:
    from parallel_decoding.decoding.attention import KernelUnavailable, register_branch_kernel as register

    try:
        return register()
    except KernelUnavailable as e:
        raise UsageError(str(e)) from None


def attention_backends(attn_implementation: str, device, normal_stock_flash_attn: bool = False) -> dict:
    """Attention implementation per mode (parallel_decoding.comparison.attention_backends)."""
    branch_kernel = register_branch_kernel() if attn_implementation == "flash_attention_2" else None
    interpreter = False
    if branch_kernel is not None:
        from flash_attn_branch._mode import interpreter_enabled

        interpreter = interpreter_enabled()
    try:
        return choose_attention_backends(attn_implementation, branch_kernel, device, normal_stock_flash_attn,
                                         interpreter, importlib.util.find_spec("flash_attn") is not None)
    except BackendError as e:
        raise UsageError(str(e)) from None


def set_attention(model, attn_implementation: str) -> None:
    if getattr(model.config, "_attn_implementation", None) != attn_implementation:
        model.set_attn_implementation(attn_implementation)


def choose_device(args, ranks: Ranks = Ranks()):
    import torch

    try:
        device = ranks.device(args.device)
    except RuntimeError as e:
        raise UsageError(f"--device {args.device}: {e}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {args.device}: CUDA is not available on this machine")
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    return device, dtype


def load_model(args, model_path: str, attn_implementation: str, device, dtype, ranks: Ranks = Ranks()):
    """The tokenizer and the model: on `device`, sharded over the ranks (--tp) or spread by --device_map."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    kwargs = {"dtype": dtype, "attn_implementation": attn_implementation, "trust_remote_code": args.trust_remote_code}
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=args.trust_remote_code)
        if ranks.mode == TENSOR_PARALLEL:
            config = AutoConfig.from_pretrained(model_path, trust_remote_code=args.trust_remote_code)
            distributed.check_heads_divide(config, ranks.world_size, model_path)
            kwargs.update(distributed.tensor_parallel_kwargs(ranks.world_size))
        elif args.device_map is not None:
            kwargs.update(distributed.device_map_kwargs(args.device_map, args.offload_folder))
        model = AutoModelForCausalLM.from_pretrained(model_path, **kwargs)
    except (OSError, ValueError, ImportError) as e:
        raise UsageError(f"cannot load model {model_path}: {one_line(e)}") from None
    if ranks.mode != TENSOR_PARALLEL and args.device_map is None:
        model.to(device)
    return model.eval(), tokenizer


def usable_context(model, max_new_tokens: int):
    """Longest prompt (tokens) that leaves room for max_new_tokens; None if the config states no limit."""
    limit = getattr(model.config.get_text_config(), "max_position_embeddings", None)
    return None if limit is None else limit - max_new_tokens


# --- decoding ---------------------------------------------------------------------------------------------------

def compile_setting(args, device) -> bool:
    """--compile resolved for this run: the fast path builds its own mask, so the Triton kernel keeps the eager one,
    and its arena holds every layer's heads on one device, so a model split by --tp or --device_map does too."""
    from parallel_decoding.decoding.interface import compile_enabled

    if args.attn_implementation == "flash_attention_2" or args.tp or args.device_map is not None:
        return False
    return compile_enabled(args.compile, device)


def arena_capacity(prompt_lengths: list, max_new_tokens: int) -> int:
    """KV slots for the longest prompt and its answer: max_new_tokens bounds every answer, branches included, and
    a block's branches replace its skeleton in the cache, so no row holds more."""
    return max(prompt_lengths) + max_new_tokens


def gen_kwargs(args, max_new_tokens: int) -> dict:
    kwargs = {"max_new_tokens": max_new_tokens, "do_sample": args.do_sample}
    if args.do_sample:
        kwargs.update(temperature=args.temperature, top_p=args.top_p)
    return kwargs


def speed(length, seconds):
    return length / seconds if length is not None and seconds else None


def run_row(model, tokenizer, row: dict, full_prompt: str, modes: tuple, backends: dict, gen: dict,
            row_index: int = 0, seed: int = 0) -> dict:
    """Decode one row in each mode, in the order `mode_order` gives for its index, each mode sampling from its own
    generator; a mode that raises is recorded in `error`, the other still runs."""
    import torch

    from parallel_decoding import normal_decode, parallel_decode

    result = dict(row)
    result.update({column: None for column in RESULT_COLUMNS})
    result["full_prompt"] = full_prompt
    order = mode_order(row_index, modes)
    result["first_mode"] = order[0]
    errors = []
    for mode in order:
        decode = normal_decode if mode == "normal" else parallel_decode
        set_attention(model, backends[mode])
        result[f"{mode}_attention"] = backends[mode]
        mode_gen = dict(gen)
        if gen.get("do_sample"):
            mode_gen["generator"] = mode_generator(seed, row_index, mode, model.device)
        try:
            out = decode(model, tokenizer, full_prompt, **mode_gen)
        except (ValueError, RuntimeError) as e:  # too-long prompt, CUDA out of memory (a RuntimeError), kernel errors
            errors.append(f"{mode}: {one_line(e)}")
            if isinstance(e, torch.OutOfMemoryError):
                torch.cuda.empty_cache()
            continue
        result[f"{mode}_response"] = out["response"]
        result[f"{mode}_time"] = out["time"]
        result[f"{mode}_length"] = out["length"]
        result[f"{mode}_speed"] = speed(out["length"], out["time"])
        result[f"{mode}_steps"] = out["steps"]
        result[f"{mode}_caps"] = out["caps"]
        if mode == "parallel":
            result["num_parallel_branches"] = out["num_branches"]
            result["stage1_response"] = out["stage1_response"]
            result["branches"] = out["branches"]
            for stage in ("stage1_time", "stage2_time", "stage3_time", "fallback"):
                result[stage] = out[stage]
    result["error"] = "; ".join(errors) if errors else None
    return result


def warm_up(model, tokenizer, prompts: list, modes: tuple, backends: dict, gen: dict, log) -> None:
    """One untimed generation per mode, with the run's settings, before the first timed row: the allocator, cuBLAS
    and Triton compilation of every kernel variant the answers reach (branch decoding comes late in an answer)."""
    from parallel_decoding import normal_decode, parallel_decode

    for mode in modes:
        decode = normal_decode if mode == "normal" else parallel_decode
        set_attention(model, backends[mode])
        for prompt in prompts:
            try:
                decode(model, tokenizer, prompt, **gen)
                break
            except (ValueError, RuntimeError) as e:
                log(f"warm-up ({mode}) skipped a prompt: {one_line(e)}")


def mean_speedup(rows: list):
    ratios = [r["parallel_speed"] / r["normal_speed"] for r in rows
              if r.get("parallel_speed") and r.get("normal_speed")]
    return sum(ratios) / len(ratios) if ratios else None


def earlier_rows(args, results_file: ResultsFile, settings: dict, log) -> list:
    """The rows an earlier run left in the results file (none with --overwrite); SettingsMismatch if they, or the
    rows in the shards of an interrupted data-parallel run, were made with other settings. Call with the file
    locked, so that no other run changes it after this read."""
    if args.overwrite:
        return []
    try:
        existing = results_file.read()
        shard_rows = [row for _, row in results_file.read_shards()]
    except ResultsError as e:
        raise ResultsError(f"{e}; pass --overwrite to start again") from None
    unrecorded = results_file.check_settings(existing + shard_rows, settings, IMPLIED_SETTINGS)
    if unrecorded:
        log(f"{unrecorded} rows of {results_file} record no settings (an earlier version or the reference "
            f"implementation wrote them): kept and resumed as if made with this run's settings")
    return existing


def main(argv=None) -> int:
    ranks = Ranks()
    try:
        args = parse_args(argv)
        ranks = distributed.start(run_mode(args))
        if ranks.mode == SINGLE and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise UsageError(f"torchrun started {os.environ['WORLD_SIZE']} processes: pass --tp (one model sharded "
                             f"over them) or --data_parallel (a full model each), or run without torchrun")
    except (UsageError, DistributedError) as e:
        print(f"generate.py: error: {e}", file=sys.stderr)
        return 2
    try:
        return run(args, ranks)
    finally:
        distributed.stop(ranks)


def run(args, ranks: Ranks) -> int:
    """Rank 0 locks and reads the results file, every rank loads the model, then the rows are decoded. Bad input seen
    by any rank stops every rank (exit code 2), with one line from rank 0."""
    def log(message):
        if ranks.is_main:
            print(f"generate: {message}", file=sys.stderr, flush=True)

    def stopped_by(error) -> bool:
        error = distributed.first_error(ranks, None if error is None else str(error))
        if error is not None and ranks.is_main:
            print(f"generate.py: error: {error}", file=sys.stderr)
        return error is not None

    with contextlib.ExitStack() as held:
        try:  # a Ctrl-C before the first row changes no file: one line, not a traceback
            error = None
            try:
                data_path = args.data_path or str(default_data_path(args.task))
                rows = load_dataset(args.task, data_path)
                model_path = resolve_model_path(args.model_path)
                out_path = output_path(args.output_dir, model_path, data_path)
                format_prompt = resolve_format_prompt(args.format_prompt_file, model_path)
                settings = run_settings(args)
                results_file = ResultsFile(out_path, RESULT_COLUMNS, required_column="full_prompt")
                existing = []
                if ranks.is_main:  # the run's one writer of the results file; data-parallel ranks write only shards
                    held.enter_context(results_file.locked(hint="wait for it to finish, or use another --output_dir"))
                    existing = earlier_rows(args, results_file, settings, log)
                modes = run_modes(args)
                device, dtype = choose_device(args, ranks)
                backends = attention_backends(args.attn_implementation, device, args.normal_stock_flash_attn)
            except (UsageError, DatasetError, FormatPromptError, ResultsError, DistributedError) as e:
                error = e
            if stopped_by(error):
                return 2
            try:  # collective under --tp: every rank loads its part of the weights
                model, tokenizer = load_model(args, model_path, backends[modes[0]], device, dtype, ranks)
            except (UsageError, DistributedError) as e:
                error = e
            if stopped_by(error):
                return 2
            warning = model_task_warning(model_path, args.task)  # the toy on planning: said before decoding
            if warning:
                log(warning)
        except KeyboardInterrupt:
            log("interrupted before the first row was decoded; no results file was changed")
            return 130
        try:
            return decode_rows(args, rows, data_path, model, tokenizer, device, dtype, modes, backends, settings,
                               format_prompt, results_file, existing, log, ranks)
        except KeyboardInterrupt:
            where = f"{out_path} and its shards hold" if ranks.mode == DATA_PARALLEL else f"{out_path} holds"
            log(f"interrupted: {where} every finished row; run the same command again to resume")
            return 130


def decode_rows(args, rows, data_path, model, tokenizer, device, dtype, modes, backends, settings, format_prompt,
                results_file, existing, log, ranks: Ranks = Ranks()) -> int:
    """Decode the selected rows that have no result yet.

    One process, or tensor parallel: rank 0 rewrites the results file after each row. Data parallel: each rank
    decodes its share of the rows and adds each finished row to its own shard; rank 0 merges the shards into the
    results file once all ranks are done (and, at the start, merges those an interrupted run left)."""
    from tqdm import tqdm

    from parallel_decoding import chat_prompt_ids

    out_path = results_file.path
    log(describe_attention(backends))
    log(format_prompt.describe())
    log(f"model {settings['model']} {describe_placement(args, ranks, model, device)} "
        f"({str(dtype).replace('torch.', '')}); task {args.task}; {len(rows)} rows in {data_path}; output {out_path}")

    # Earlier results stay in the file (in dataset order, also beyond --max_samples); selected rows that have none,
    # or whose earlier run recorded an error, are decoded now. Rank 0 decides; the other ranks follow its list.
    results, unmatched = results_file.match(rows, existing)
    if ranks.is_main:
        if args.overwrite:
            results_file.remove_shards()
        elif merged := results_file.merge_shards(rows, results, unmatched):
            log(f"merged {merged} rows from the shards of an interrupted data-parallel run into {out_path}")
    if unmatched:
        log(f"{len(unmatched)} rows of {out_path} match no row of {data_path}; they are kept at the end")
    selected = range(len(rows) if args.max_samples is None else min(args.max_samples, len(rows)))
    pending = [i for i in selected if results[i] is None or results[i].get("error") is not None]
    if len(pending) < len(selected):
        log(f"resuming: {len(selected) - len(pending)} rows already done")

    limit = usable_context(model, args.max_new_tokens)
    skipped = []
    if get_task(args.task).skip_too_long and limit is not None:
        skipped = [i for i in pending
                   if len(chat_prompt_ids(tokenizer, build_prompt(args.task, rows[i], format_prompt.text))) > limit]
        if skipped:
            log(f"skipped {len(skipped)} rows whose prompt exceeds the usable context of {limit} tokens "
                f"(max positions minus --max_new_tokens {args.max_new_tokens})")
            pending = [i for i in pending if i not in set(skipped)]
            for i in skipped:
                results[i] = None  # an earlier errored attempt of a row that cannot run is not kept either
    pending = distributed.from_main(ranks, pending)
    prompts = {i: build_prompt(args.task, rows[i], format_prompt.text) for i in pending}

    def write() -> int:
        file_rows = [r for r in results if r is not None] + unmatched
        results_file.write(file_rows)
        return len(file_rows)

    total = len(selected) - len(skipped)
    if not pending:
        in_file = write() if ranks.is_main else 0  # drops a torn last line of an earlier run
        log(f"nothing to do: the {total} selected rows are done; {in_file} rows are in {out_path}")
        return 0

    gen = gen_kwargs(args, args.max_new_tokens)
    gen["compile"] = compile_setting(args, device)
    if gen["compile"]:
        # One arena for the whole run, and every bucket compiled now: nothing compiles inside a timed row.
        from parallel_decoding.decoding.arena import prepare_fast_decoder

        capacity = arena_capacity([len(chat_prompt_ids(tokenizer, prompts[i])) for i in pending], args.max_new_tokens)
        log(f"compile: on; KV arena of {capacity} tokens; compiling the step for every bucket (untimed)")
        set_attention(model, backends[modes[0]])
        prepare_fast_decoder(model, capacity, warm_up=True)
    else:
        log("compile: off (eager reference path)")
    mine = ranks.share(pending)
    shard = results_file.shard(ranks.rank) if ranks.mode == DATA_PARALLEL else None
    warm_up(model, tokenizer, [prompts[i] for i in mine[:3]], modes, backends, gen, log)

    errors = in_file = 0
    if shard is None:
        bar = tqdm(total=total, initial=total - len(pending), desc=args.task, unit="row", dynamic_ncols=True,
                   disable=not ranks.is_main)
    else:
        bar = tqdm(total=len(mine), desc=f"{args.task} (rank 0's share)", unit="row", dynamic_ncols=True,
                   disable=not ranks.is_main)
    try:
        for i in mine:
            # Sampling draws from a generator seeded by (seed, row, mode): the same on every rank, so tensor-parallel
            # ranks pick the same tokens, and a row decoded by any data-parallel rank samples as in one process.
            results[i] = run_row(model, tokenizer, rows[i], prompts[i], modes, backends, gen, row_index=i, seed=args.seed)
            results[i]["settings"] = settings
            if shard is not None:
                shard.add(i, results[i])
            elif ranks.is_main:
                in_file = write()
            if results[i]["error"]:
                errors += 1
                if ranks.is_main or shard is not None:
                    tqdm.write(f"{'' if ranks.is_main else f'rank {ranks.rank}: '}row {i}: {results[i]['error']}",
                               file=sys.stderr)
            speedup = mean_speedup([results[j] for j in selected if results[j] is not None])
            if speedup is not None:
                bar.set_postfix(speedup=f"{speedup:.2f}x")
            bar.update(1)
    finally:
        bar.close()
    if shard is not None:
        distributed.wait_for_all(ranks)  # every shard is complete
        if ranks.is_main:
            results_file.merge_shards(rows, results, unmatched)
            in_file = sum(r is not None for r in results) + len(unmatched)
            errors = sum(results[i] is not None and results[i]["error"] is not None for i in pending)
    speedup = mean_speedup([results[j] for j in selected if results[j] is not None])
    summary = f"{total} selected rows, {in_file} rows in {out_path} ({errors} with errors this run)"
    if speedup is not None:
        summary += f"; mean speedup {speedup:.2f}x"
    log(summary)
    return distributed.from_main(ranks, 1 if errors == len(pending) else 0)


def describe_placement(args, ranks: Ranks, model, device) -> str:
    if ranks.mode == TENSOR_PARALLEL:
        return f"sharded over {ranks.world_size} processes (tensor parallel, {device.type})"
    if ranks.mode == DATA_PARALLEL:
        return f"copied to each of {ranks.world_size} processes (data parallel, {device.type})"
    if args.device_map is not None:
        placed = sorted({str(d) for d in getattr(model, "hf_device_map", {}).values()})
        return f"spread by --device_map over {', '.join(placed) or model.device}"
    return f"on {device}"


if __name__ == "__main__":
    sys.exit(main())
