"""The checks generate.py's flags pass after argparse: values in range, the combinations of --tp, --data_parallel,
--device_map and --device this project runs, --batch_size, and the compiled path's flags. Each failure is one
UsageError line."""

from __future__ import annotations

import json
from pathlib import Path

from parallel_decoding.cli import UsageError

from .settings import check_compile_flags

DEVICE_MAP_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")


def check_flags(args) -> None:
    """Every check that needs the flags alone (--device_map given as a file is read here, into a dict)."""
    if args.max_samples is not None and args.max_samples < 1:
        raise UsageError(f"--max_samples must be >= 1, got {args.max_samples}")
    if args.max_new_tokens < 1:
        raise UsageError(f"--max_new_tokens must be >= 1, got {args.max_new_tokens}")
    resolve_sampling(args)
    resolve_attention(args)
    check_scale_flags(args)
    check_batch_flags(args)
    check_compile_flags(args)


def resolve_attention(args) -> None:
    """``--attn_implementation branch_attention`` (the project's Triton kernel by its name, as the backend registry
    ``decoding.backends`` calls it) and ``flash_attention_2`` (the reference's name) are one choice. Rows record
    the reference's spelling, as they always have, so a results file resumes under either name."""
    if args.attn_implementation == "branch_attention":
        args.attn_implementation = "flash_attention_2"


def resolve_sampling(args) -> None:
    """One rule, as the server's: sampling is on when --temperature > 0 (its default, 0, is greedy); --top_p and
    --top_k then narrow the draw. --do_sample, the older switch, stays as an alias: sampling at --temperature 1.0
    unless --temperature is given. Sets ``args.temperature`` and ``args.do_sample`` (what the rest of the run reads)."""
    if args.temperature is None:
        args.temperature = 1.0 if args.do_sample else 0.0
    elif args.do_sample and args.temperature == 0:
        raise UsageError("--do_sample with --temperature 0: sampling is on when --temperature > 0; drop one of them")
    if args.temperature < 0:
        raise UsageError(f"--temperature must be >= 0 (0: greedy), got {args.temperature}")
    if not 0 < args.top_p <= 1:
        raise UsageError(f"--top_p must be in (0, 1], got {args.top_p}")
    if args.top_k < 0:
        raise UsageError(f"--top_k must be >= 0 (0: off), got {args.top_k}")
    args.do_sample = args.temperature > 0


def check_batch_flags(args) -> None:
    """--batch_size N: at least 1; above 1 the batch engine packs the requests into one KV arena on one device under
    its own mask, so neither a model split by --tp or --device_map nor the Triton kernel."""
    size = args.batch_size
    if size < 1:
        raise UsageError(f"--batch_size must be >= 1, got {size}")
    if size == 1:
        return
    if args.tp or args.device_map is not None:
        raise UsageError(
            f"--batch_size {size} with {'--tp' if args.tp else '--device_map'} is not supported: the "
            f"batch engine keeps every request's KV cache in one arena on one device; use --batch_size 1, "
            f"or --data_parallel to batch on each device"
        )
    if args.attn_implementation == "flash_attention_2":
        raise UsageError(
            f"--batch_size {size} needs --attn_implementation sdpa or eager (the batch engine packs the "
            f"requests into one pass under its own mask; the Triton kernel decodes one at a time)"
        )


def check_scale_flags(args) -> None:
    """The combinations of --tp, --data_parallel, --device_map and --device that generate.py runs."""
    if args.tp and args.data_parallel:
        raise UsageError(
            "--tp with --data_parallel is not supported; use one of them (tensor parallel shards one "
            "model over all processes, data parallel gives each process a full model)"
        )
    if args.device_map is not None and (args.tp or args.data_parallel):
        raise UsageError(
            f"--device_map with {'--tp' if args.tp else '--data_parallel'} is not supported: "
            f"--device_map spreads one model over the devices of a single process"
        )
    if args.device is not None and (args.tp or args.device_map is not None):
        raise UsageError(
            f"--device with {'--tp' if args.tp else '--device_map'}: the devices are chosen for you "
            f"({'cuda:LOCAL_RANK per process' if args.tp else 'by accelerate'}); drop --device"
        )
    if args.offload_folder is not None and args.device_map is None:
        raise UsageError("--offload_folder is only used with --device_map")
    if args.device_map is not None and args.device_map not in DEVICE_MAP_STRATEGIES:
        args.device_map = read_device_map(args.device_map)


def read_device_map(path: str) -> dict:
    try:
        device_map = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as e:
        raise UsageError(
            f"--device_map {path}: not one of {', '.join(DEVICE_MAP_STRATEGIES)} and not a readable file ({e.strerror})"
        ) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UsageError(f"--device_map {path}: does not parse as JSON ({e})") from None
    if not isinstance(device_map, dict) or not all(
        isinstance(k, str) and isinstance(v, (str, int)) for k, v in device_map.items()
    ):
        raise UsageError(
            f"--device_map {path}: expected a JSON object {{module name: device}}, "
            f'e.g. {{"model.layers.0": 0, "lm_head": "cpu"}}'
        )
    for module, device in device_map.items():
        if not usable_map_device(device):
            raise UsageError(
                f"--device_map {path}: {module!r} -> {device!r} is not a device of this machine "
                f'(use "cpu", "disk", or a CUDA index such as 0 or "cuda:0")'
            )
    return device_map


def usable_map_device(device) -> bool:
    """ "cpu", "disk", or a CUDA device (0, "0", "cuda", "cuda:0") that this machine has."""
    import torch

    if device in ("cpu", "disk"):
        return True
    text = str(device).removeprefix("cuda").removeprefix(":") or "0"
    return text.isdigit() and int(text) < torch.cuda.device_count()
