"""What makes the normal and the parallel run of one row comparable, beyond sharing the engine's decode loop.

- **Random streams.** Each mode of each row samples from its own ``torch.Generator``, seeded with
  :func:`mode_seed` (``--seed``, the row's index in the dataset file, the mode). A mode's answer then depends on
  nothing the other mode did, so ``--modes parallel`` reproduces the parallel half of ``--modes both`` exactly.
- **Order.** :func:`mode_order`: even rows run normal first, odd rows parallel first, so whatever the first run
  of a row pays (or leaves warm: caches, allocator, clocks) falls on each mode for half the rows.
- **Kernel.** :func:`attention_per_mode`: the same attention kernel for the same kind of step. Sequential steps of
  both modes run one kernel; only the parallel mode's tree steps (branch prefill and branch decoding) use the
  branch mask. With ``flash_attention_2`` that kernel is the project's Triton kernel, in causal mode for sequential
  steps, as in ``python -m parallel_decoding.bench``; stock flash-attn for normal decoding only on request.

:func:`run_row` applies all three to one dataset row and returns its result row (the row's own columns, then
:data:`RESULT_COLUMNS`); :func:`warm_up` runs each mode once, untimed, before the first row.
"""

from __future__ import annotations

from parallel_decoding.cli import one_line

MODES = ("normal", "parallel")
STOCK_FLASH = "flash_attention_2"  # transformers' name for the flash_attn package
RESULT_COLUMNS = (
    "full_prompt",
    "normal_response",
    "normal_time",
    "normal_length",
    "normal_speed",
    "normal_steps",
    "parallel_response",
    "parallel_time",
    "parallel_length",
    "parallel_speed",
    "parallel_steps",
    "num_parallel_branches",
    "stage1_response",
    "branches",
    "stage1_time",
    "stage2_time",
    "stage3_time",
    "fallback",
    "normal_caps",
    "parallel_caps",
    "first_mode",
    "normal_attention",
    "parallel_attention",
    # --batch_size N > 1 (null at batch size 1): the batch's id, and per mode its pass's wall time and tokens
    "batch",
    "normal_batch_time",
    "normal_batch_tokens",
    "parallel_batch_time",
    "parallel_batch_tokens",
    "error",
    "settings",  # runs.settings.run_settings() of the run that made the row (runs/results.py says why per row)
)
PARALLEL_COLUMNS = ("stage1_response", "branches", "stage1_time", "stage2_time", "stage3_time", "fallback")


def mode_seed(seed: int, row_index: int, mode: str) -> int:
    """Seed of one mode of one row: ``engine.sampling.stream_seed(seed, row_index, mode)``, the engine's one recipe
    (stable across processes, machines and Python versions)."""
    from ..engine.sampling import stream_seed

    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    return stream_seed(seed, row_index, mode)


def mode_generator(seed: int, row_index: int, mode: str, device):
    """A ``torch.Generator`` on ``device`` (where the logits are sampled) seeded with :func:`mode_seed`."""
    import torch

    return torch.Generator(device=device).manual_seed(mode_seed(seed, row_index, mode))


def mode_order(row_index: int, modes: tuple[str, ...]) -> tuple[str, ...]:
    """The order the modes of row ``row_index`` run in: as given on even rows, reversed on odd rows."""
    return tuple(modes) if row_index % 2 == 0 else tuple(reversed(modes))


def asks_for_branch_kernel(attn_implementation: str) -> bool:
    """Whether --attn_implementation names the project's Triton kernel: ``branch_attention``, or the reference
    implementation's spelling ``flash_attention_2`` (an alias, ``decoding.backends.ATTN_ALIASES``)."""
    from parallel_decoding.decoding.backends import ATTN_ALIASES, BRANCH_KERNEL

    return ATTN_ALIASES.get(attn_implementation, attn_implementation) == BRANCH_KERNEL


class AttentionChoiceError(ValueError):
    """An attention choice this machine cannot run (the CLI prints it as a usage error)."""


def attention_per_mode(
    attn_implementation: str,
    branch_kernel: str | None,
    device,
    stock_flash_for_normal: bool,
    interpreter: bool,
    stock_flash_installed: bool,
) -> dict[str, str]:
    """transformers attention name per mode.

    ``branch_kernel``: the name the project's Triton kernel is registered under (needed for ``flash_attention_2``).
    ``stock_flash_for_normal`` runs normal decoding on stock flash-attn instead (a different kernel from the
    parallel mode's sequential steps: a comparison of kernels as much as of decoding schemes).
    """
    kernel = asks_for_branch_kernel(attn_implementation)
    if stock_flash_for_normal and not kernel:
        raise AttentionChoiceError("--normal_stock_flash_attn needs --attn_implementation flash_attention_2")
    if not kernel:
        return {"normal": attn_implementation, "parallel": attn_implementation}
    if device.type != "cuda" and not interpreter:
        raise AttentionChoiceError(
            "--attn_implementation flash_attention_2 runs Triton kernels: it needs a CUDA device "
            "(or TRITON_INTERPRET=1 on a CPU, for correctness checks only)"
        )
    if branch_kernel is None:
        raise AttentionChoiceError("the project's Triton kernel is not registered with transformers")
    if stock_flash_for_normal and not (device.type == "cuda" and stock_flash_installed):
        raise AttentionChoiceError("--normal_stock_flash_attn needs a CUDA device and the flash_attn package")
    return {"normal": STOCK_FLASH if stock_flash_for_normal else branch_kernel, "parallel": branch_kernel}


def describe_attention(attention: dict[str, str]) -> str:
    """One log line naming the kernel of each kind of step."""
    normal, parallel = attention["normal"], attention["parallel"]
    if normal == parallel:
        if parallel in ("sdpa", "eager"):
            return f"attention: {parallel} for both modes (tree steps with a 4D branch mask)"
        return (
            f"attention: the project's Triton kernel ({parallel}) for both modes, causal for sequential steps, "
            f"branch-aware for tree steps"
        )
    return (
        f"attention: normal decoding uses stock flash-attn ({normal}); parallel decoding uses the project's "
        f"Triton kernel ({parallel}) for all of its steps"
    )


# --- one row ----------------------------------------------------------------------------------------------------


def speed(length, seconds):
    return length / seconds if length is not None and seconds else None


def mean_speedup(results: list):
    """Mean over result rows of parallel_speed / normal_speed (rows where either mode has no speed left out)."""
    ratios = [
        r["parallel_speed"] / r["normal_speed"] for r in results if r.get("parallel_speed") and r.get("normal_speed")
    ]
    return sum(ratios) / len(ratios) if ratios else None


def _decoder_of(mode: str):
    from ..engine.decode import normal_decode, parallel_decode

    return normal_decode if mode == "normal" else parallel_decode


def new_result(row: dict, full_prompt: str, order: tuple) -> dict:
    """A result row before decoding: the row's own columns, then every result column empty; ``order`` the modes in
    the order they run."""
    result = dict(row)
    result.update({column: None for column in RESULT_COLUMNS})
    result["full_prompt"] = full_prompt
    result["first_mode"] = order[0]
    return result


def record_answer(result: dict, mode: str, out: dict) -> None:
    """One mode's answer (what normal_decode / parallel_decode return) into its result row."""
    for column in ("response", "time", "length", "steps", "caps"):
        result[f"{mode}_{column}"] = out[column]
    result[f"{mode}_speed"] = speed(out["length"], out["time"])
    if mode == "parallel":
        result["num_parallel_branches"] = out["num_branches"]
        result.update({column: out[column] for column in PARALLEL_COLUMNS})


def mode_error(mode: str, error: BaseException) -> str:
    """One mode's error as the `error` column says it (CUDA memory is given back after an out-of-memory error)."""
    import torch

    if isinstance(error, torch.OutOfMemoryError):
        torch.cuda.empty_cache()
    return f"{mode}: {one_line(error)}"


def run_row(
    model,
    tokenizer,
    row: dict,
    full_prompt: str,
    modes: tuple,
    attention: dict[str, str],
    generation: dict,
    row_index: int = 0,
    seed: int = 0,
) -> dict:
    """Decode one dataset row in each mode, in the order `mode_order` gives for its index, each mode on its own
    attention implementation and sampling from its own generator; a mode that raises is recorded in `error`, the other
    still runs. ``generation``: the keyword arguments of normal_decode / parallel_decode for this run."""
    from parallel_decoding.decoding.attention import set_attention

    order = mode_order(row_index, modes)
    result = new_result(row, full_prompt, order)
    errors = []
    for mode in order:
        set_attention(model, attention[mode])
        result[f"{mode}_attention"] = attention[mode]
        mode_generation = dict(generation)
        if generation.get("do_sample"):
            mode_generation["generator"] = mode_generator(seed, row_index, mode, model.device)
        try:
            out = _decoder_of(mode)(model, tokenizer, full_prompt, **mode_generation)
        except (ValueError, RuntimeError) as e:  # too-long prompt, full KV arena, CUDA out of memory, kernel errors
            errors.append(mode_error(mode, e))
            continue
        record_answer(result, mode, out)
    result["error"] = "; ".join(errors) if errors else None
    return result


def warm_up(model, tokenizer, prompts: list, modes: tuple, attention: dict[str, str], generation: dict, log) -> None:
    """One untimed generation per mode, with the run's settings, before the first timed row: the allocator, cuBLAS
    and Triton compilation of every kernel variant the answers reach (branch decoding comes late in an answer)."""
    from parallel_decoding.decoding.attention import set_attention

    for mode in modes:
        set_attention(model, attention[mode])
        for prompt in prompts:
            try:
                _decoder_of(mode)(model, tokenizer, prompt, **generation)
                break
            except (ValueError, RuntimeError) as e:
                log(f"warm-up ({mode}) skipped a prompt: {one_line(e)}")
