"""What a run's flags decide: the settings recorded in every result row, the modes, the output file, the generation
arguments of both modes, and whether the compiled path (a static KV arena with a compiled step) may run and how
big its arena is."""

from __future__ import annotations

import os
from pathlib import Path

from parallel_decoding.cli import UsageError
from parallel_decoding.tasks import resolve_format_prompt

from . import loading, served
from .comparison import MODES

# The version of the recorded settings: bumped when a key is added to run_settings or one changes its meaning, and
# upgraded_settings then says what older rows were made with. Rows without a "version" key are version 1.
SETTINGS_VERSION = 2

# The default format instruction before it had a worked example: format_prompt_digest(None) as the project computed
# it then (commit c600a72), what rows recorded before the format instruction was a setting were made with.
FORMAT_PROMPT_WITHOUT_EXAMPLE = {
    "file": None,
    "sha256": "cfef567291969f9ae0e9e6d891d577ac6eb300a086b0e22a1da60a86f3c3be84",
}

# Keys added to the settings after rows were first recorded: a row that lacks one predates it and was made with
# this value.
ADDED_KEYS = {
    "compile": False,  # before --compile existed, rows were decoded on the eager path
    "format_prompt": FORMAT_PROMPT_WITHOUT_EXAMPLE,
    "token_budget": "each branch",  # before max_new_tokens bounded the whole parallel answer
    "batch_size": 1,  # before --batch_size existed, rows were decoded one at a time
}


def upgraded_settings(recorded: dict) -> dict:
    """A row's recorded settings in the current version's terms, to compare with :func:`run_settings`: each key it
    lacks takes its :data:`ADDED_KEYS` value, and top_k (version 2; not a flag before) is off (0) for sampled rows,
    null for greedy ones. A row of a newer version than this code keeps its version, so the rerun is refused."""
    upgraded = {**ADDED_KEYS, **recorded}
    upgraded.setdefault("top_k", 0 if recorded.get("do_sample") else None)
    if upgraded.get("version", 1) < SETTINGS_VERSION:
        upgraded["version"] = SETTINGS_VERSION
    return upgraded


def run_settings(args) -> dict:
    """The settings that shape a result row, recorded in its `settings` column: a rerun whose settings differ from
    the file's (after :func:`upgraded_settings`) is refused before the model loads. Sampling settings count only
    when sampling (greedy rows do not depend on them). The device is not a setting: it changes timings, not what a
    row holds; nor is --kv_capacity: it changes which rows fit, not what a row holds."""
    model = loading.resolve_model_path(args.model_path)
    device, dtype = loading.choose_device(args)
    return {
        "version": SETTINGS_VERSION,
        "model": os.path.realpath(model) if os.path.isdir(model) else model,
        "dtype": str(dtype).removeprefix("torch."),
        # the kernel choice: flash_attention_2 runs the project's kernel in both modes unless normal decoding was
        # asked to run stock flash-attn
        "attn_implementation": args.attn_implementation
        + ("+normal_stock_flash_attn" if args.normal_stock_flash_attn else ""),
        "max_new_tokens": args.max_new_tokens,
        # what max_new_tokens bounds; rows made before it did so for the whole parallel answer (and before each
        # mode sampled from its own stream) record no such key and are implied "each branch"
        "token_budget": "whole answer",
        # sampling: on when --temperature > 0 (runs/flags.py: resolve_sampling)
        "do_sample": args.do_sample,
        "temperature": args.temperature if args.do_sample else None,
        "top_p": args.top_p if args.do_sample else None,
        "top_k": args.top_k if args.do_sample else None,
        "seed": args.seed if args.do_sample else None,
        "modes": list(run_modes(args)),
        "format_prompt": resolve_format_prompt(args.format_prompt_file, model).setting(),
        "compile": compile_setting(args, device),
        # answers do not depend on it, but timings do: a file holds rows of one batch size
        "batch_size": args.batch_size,
        # the engine that decoded both modes (and vLLM's arguments): a resume on another engine is refused
        **served.settings(args),
    }


def run_modes(args) -> tuple:
    return MODES if args.modes == "both" else (args.modes,)


def output_path(output_dir: str, model_path: str, data_path: str) -> Path:
    model_name = os.path.basename(os.path.normpath(model_path))
    return Path(output_dir) / model_name / f"{Path(data_path).stem}.jsonl"


def generation_kwargs(args, device) -> dict:
    """The keyword arguments of normal_decode and parallel_decode for this run (the same for both modes)."""
    kwargs = {"max_new_tokens": args.max_new_tokens, "do_sample": args.do_sample}
    if args.do_sample:
        kwargs.update(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k)
    kwargs["compile"] = compile_setting(args, device)
    return kwargs


# --- the compiled path ------------------------------------------------------------------------------------------


def compile_refusal(args, asked_by: str = "--compile on") -> str | None:
    """May the compiled path run with these flags? None if it may; else why not, as the one line that refuses
    `asked_by` (--compile on, or a flag only that path uses). The fast path builds its own mask, so the Triton
    kernel keeps the eager path, and its arena holds every layer's heads on one device, so a model split by --tp or
    --device_map does too."""
    if args.attn_implementation == "flash_attention_2":
        return (
            f"{asked_by} needs --attn_implementation sdpa or eager (the fast path builds its own mask over the "
            f"KV arena; the Triton kernel runs eagerly)"
        )
    if args.tp or args.device_map is not None:
        remedy = "use --compile off" if asked_by == "--compile on" else f"drop {asked_by}"
        return (
            f"{asked_by} with {'--tp' if args.tp else '--device_map'} is not supported: the KV arena holds "
            f"every head of every layer on one device; {remedy}"
        )
    return None


def compile_setting(args, device) -> bool:
    """--compile resolved for this run on `device`: off where :func:`compile_refusal` refuses it, else
    auto/on/off as the engine resolves them (auto: on for CUDA, off on a CPU)."""
    from parallel_decoding.decoding.interface import compile_enabled

    return compile_refusal(args) is None and compile_enabled(args.compile, device)


def check_compile_flags(args, device=None) -> None:
    """UsageError for --compile on where the compiled path may not run, and for --kv_capacity (which sizes that
    path's arena, or with --batch_size > 1 the batch engine's, compiled or not) below 1 or where neither runs.
    Without `device` (parse_args) only what the flags decide; with it, also --compile auto, off on a CPU."""
    refusal = compile_refusal(args)
    if args.compile == "on" and refusal:
        raise UsageError(refusal)
    if args.kv_capacity is None:
        return
    if args.kv_capacity < 1:
        raise UsageError(f"--kv_capacity must be >= 1, got {args.kv_capacity}")
    if args.batch_size > 1:  # the batch engine's arena, compiled or not
        return
    needs = (
        "--kv_capacity sizes the KV arena of the compiled path, so it needs that path (--compile on; auto is "
        "on for CUDA"
    )
    if args.compile == "off":
        raise UsageError(f"{needs}), not --compile off")
    if refusal:
        raise UsageError(compile_refusal(args, asked_by="--kv_capacity"))
    if device is not None and not compile_setting(args, device):
        raise UsageError(f"{needs}, off on a CPU)")
