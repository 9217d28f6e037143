"""Parallel decoding behind transformers' ``model.generate(..., custom_generate=...)``.

transformers calls a custom decoding method in one of two ways, and each has its entry here:

- ``custom_generate="<directory or Hub repository>"`` runs that repository's ``custom_generate/generate.py``, which
  hands :func:`generate_from_arguments` every argument of ``generate`` as the user passed it;
- ``custom_generate=parallel_generate`` (a callable): transformers first prepares the call (the generation config
  merged with the loose settings, logits processors and stopping criteria built from it, positions, a cache) and
  then calls :func:`parallel_generate` as its decoding loop. transformers 5.17 to 5.24 keep ``tokenizer=`` and
  ``streamer=`` to themselves in this form, so they are bound with ``functools.partial``.

Both check the settings (``transformers_settings``: what cannot be honoured is a ValueError naming it), strip each
row's left padding, and decode every row exactly as ``parallel_decode`` (or ``normal_decode`` with
``parallel=False``) decodes that prompt's ids: one prompt on the same scheduler as ``parallel_decode``, a batch on
the batch engine (``engine.batch.Engine``), each row its own answer. The result is what ``generate`` returns: the
prompts as given, each followed by its answer, right-padded with ``pad_token_id``; with
``return_dict_in_generate=True`` a :class:`ParallelGenerateOutput` that also carries each row's report.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase
from transformers.utils import ModelOutput

from ..decoding.hf import check_model, context_length
from ..decoding.interface import compile_enabled
from ..engine.batch import Engine
from ..engine.decode import MAX_BLOCKS, MAX_BRANCHES, AnswerSpec, BranchLimits, solo_scheduler
from ..engine.decode import GenerationConfig as AnswerConfig
from ..engine.scheduler import Scheduler, run_one
from ..engine.stream import AnswerStream
from .transformers_settings import (
    DecodeSettings,
    decode_settings,
    refuse_changed_eos,
    refuse_generate_arguments,
    refuse_model_inputs,
    refuse_unsupported_config,
    refuse_user_stopping_criteria,
    user_processors,
)

TOKENIZER_NEEDED = "parallel decoding needs the tokenizer to find its branch markers (####Title:, ####%%%%)"
PASS_TOKENIZER = f"{TOKENIZER_NEEDED}: pass tokenizer=<the model's tokenizer> to generate"
BIND_TOKENIZER = (
    f"{TOKENIZER_NEEDED}: transformers does not hand generate's tokenizer= (nor streamer=) to a callable "
    "custom_generate, so bind it: custom_generate=functools.partial(parallel_generate, tokenizer=tokenizer)"
)


class Streamer(Protocol):
    """transformers' streamer protocol (``TextStreamer``, ``TextIteratorStreamer``): the prompt, then new tokens."""

    def put(self, value: torch.Tensor) -> None: ...

    def end(self) -> None: ...


@dataclass
class MethodOptions:
    """The method's own knobs: parallel or normal decoding, the branch caps, and the compiled decoder."""

    parallel: bool = True
    max_branches: int = MAX_BRANCHES
    max_blocks: int = MAX_BLOCKS
    max_branch_tokens: int | None = None
    compile: bool | str = False

    def limits(self) -> BranchLimits | None:
        """The caps of a parallel answer (checked here, before any decoding), or None for normal decoding."""
        limits = BranchLimits(self.max_branches, self.max_blocks, self.max_branch_tokens)
        return limits if self.parallel else None


@dataclass
class ParallelGenerateOutput(ModelOutput):
    """What ``generate(..., return_dict_in_generate=True)`` returns with this method: ``sequences`` as ``generate``
    returns them, and per row (lists in row order) what ``parallel_decode`` reports.

    ``num_branches`` / ``num_blocks``: branches and ``####`` blocks decoded in parallel (0 with ``parallel=False``);
    ``branches``: ``{"title", "text", "block", "tokens", "stop"}`` per branch; ``fallback``: None, or why the row
    was decoded sequentially; ``caps``: the caps the row hit; ``stage_times``: seconds per stage (``stage1``
    skeleton, ``stage2`` branches, ``stage3`` merge and continuation; ``decode`` with ``parallel=False``);
    ``reports``: each row's whole result, as ``parallel_decode`` / ``normal_decode`` return it.
    """

    sequences: torch.LongTensor | None = None
    num_branches: list[int] | None = None
    num_blocks: list[int] | None = None
    branches: list[list[dict[str, Any]]] | None = None
    fallback: list[str | None] | None = None
    caps: list[list[str]] | None = None
    stage_times: list[dict[str, float]] | None = None
    reports: list[dict[str, Any]] | None = None


@dataclass
class PromptBatch:
    """The prompts as ``generate`` received them, and each row's prompt ids without its left padding."""

    input_ids: torch.Tensor  # (B, L) as given, padding included
    rows: list[list[int]]


# --- the two entries ------------------------------------------------------------------------------------------------


def generate_from_arguments(
    model: PreTrainedModel,
    inputs: torch.Tensor | None = None,
    generation_config: GenerationConfig | None = None,
    logits_processor: list[Any] | None = None,
    stopping_criteria: list[Any] | None = None,
    prefix_allowed_tokens_fn: Callable[..., list[int]] | None = None,
    synced_gpus: bool | None = None,
    assistant_model: PreTrainedModel | None = None,
    streamer: Streamer | None = None,
    negative_prompt_ids: torch.Tensor | None = None,
    negative_prompt_attention_mask: torch.Tensor | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None,
    max_branches: int = MAX_BRANCHES,
    max_blocks: int = MAX_BLOCKS,
    max_branch_tokens: int | None = None,
    compile: bool | str = False,
    parallel: bool = True,
    **kwargs: Any,
) -> torch.LongTensor | ParallelGenerateOutput:
    """``generate``'s arguments as the user passed them (what ``custom_generate/generate.py`` receives): the
    settings merge as ``generate`` merges them (the model's generation config, then ``generation_config``, then the
    loose ones), are checked, and every row is decoded as ``parallel_decode`` decodes it."""
    refuse_generate_arguments(
        prefix_allowed_tokens_fn=prefix_allowed_tokens_fn,
        synced_gpus=synced_gpus,
        assistant_model=assistant_model,
        negative_prompt_ids=negative_prompt_ids,
        negative_prompt_attention_mask=negative_prompt_attention_mask,
        stopping_criteria=stopping_criteria,
    )
    if tokenizer is None:
        raise ValueError(PASS_TOKENIZER)
    # transformers' own merge (the same method on 5.17 and 5.24): what is left over is model inputs.
    config, model_kwargs = model._prepare_generation_config(generation_config, **kwargs)
    _check_model_and_config(model, config)
    input_ids = _prompt_tensor(inputs, model_kwargs.pop("input_ids", None), model_kwargs)
    attention_mask = model_kwargs.pop("attention_mask", None)
    refuse_model_inputs(model_kwargs, prepared=False)
    options = MethodOptions(parallel, max_branches, max_blocks, max_branch_tokens, compile)
    return _generate(
        model, tokenizer, config, input_ids, attention_mask, list(logits_processor or []), streamer, options
    )


def parallel_generate(
    model: PreTrainedModel,
    input_ids: torch.Tensor | None = None,
    logits_processor: list[Any] | None = None,
    stopping_criteria: list[Any] | None = None,
    generation_config: GenerationConfig | None = None,
    streamer: Streamer | None = None,
    *,
    tokenizer: PreTrainedTokenizerBase | None = None,
    max_branches: int = MAX_BRANCHES,
    max_blocks: int = MAX_BLOCKS,
    max_branch_tokens: int | None = None,
    compile: bool | str = False,
    parallel: bool = True,
    **model_kwargs: Any,
) -> torch.LongTensor | ParallelGenerateOutput:
    """Parallel decoding as a callable ``custom_generate``:
    ``model.generate(**inputs, custom_generate=functools.partial(parallel_generate, tokenizer=tokenizer))``.

    transformers calls it after its own preparation, as its decoding loop: ``generation_config`` is the merged
    config, ``logits_processor`` / ``stopping_criteria`` the lists built from it (the user's included), and
    ``model_kwargs`` the mask plus the positions and cache it prepared (not needed: the engine makes its own).
    The method's knobs (``max_branches``, ``max_blocks``, ``max_branch_tokens``, ``compile``, ``parallel``) pass
    through ``generate`` by name. Called directly, without that preparation, it takes ``generate``'s arguments.
    """
    prepared = generation_config is not None and "use_cache" in model_kwargs  # transformers always sets use_cache
    if not prepared:
        return generate_from_arguments(
            model,
            input_ids,
            generation_config,
            logits_processor,
            stopping_criteria,
            streamer=streamer,
            tokenizer=tokenizer,
            max_branches=max_branches,
            max_blocks=max_blocks,
            max_branch_tokens=max_branch_tokens,
            compile=compile,
            parallel=parallel,
            **model_kwargs,
        )
    if tokenizer is None:
        raise ValueError(BIND_TOKENIZER)
    _check_model_and_config(model, generation_config)
    refuse_user_stopping_criteria(stopping_criteria or [])
    processors = user_processors(logits_processor or [], generation_config)
    attention_mask = model_kwargs.pop("attention_mask", None)
    input_ids = _prompt_tensor(input_ids, None, model_kwargs)
    refuse_model_inputs(model_kwargs, prepared=True)
    options = MethodOptions(parallel, max_branches, max_blocks, max_branch_tokens, compile)
    return _generate(model, tokenizer, generation_config, input_ids, attention_mask, processors, streamer, options)


# --- one path for both ----------------------------------------------------------------------------------------------


def _generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    config: GenerationConfig,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    processors: list[Any],
    streamer: Streamer | None,
    options: MethodOptions,
) -> torch.LongTensor | ParallelGenerateOutput:
    """Decode every row and lay the answers out as ``generate`` does."""
    limits = options.limits()
    batch = PromptBatch(input_ids, _unpadded_rows(input_ids, attention_mask))
    settings = decode_settings(config, input_ids.shape[1], tokenizer.pad_token_id)
    if streamer is not None and len(batch.rows) > 1:
        raise ValueError(f"streamer= streams one prompt; this batch has {len(batch.rows)} (stream them one by one)")
    answers: list[list[int]] = [[] for _ in batch.rows]
    specs = [
        _answer_spec(model, tokenizer, row, settings, processors, limits, _collector(answers[index], streamer), index)
        for index, row in enumerate(batch.rows)
    ]
    reports = _decode_streamed(model, tokenizer, specs, options.compile, batch, streamer)
    for index, (answer, report) in enumerate(zip(answers, reports)):
        if len(answer) != report["length"]:  # the stream hands over exactly the answer's tokens (engine.stream)
            raise RuntimeError(f"row {index}: {len(answer)} streamed tokens for an answer of {report['length']}")
    sequences = _sequences(batch.input_ids, answers, settings.pad_token_id)
    return _output(sequences, reports) if settings.return_dict else sequences


def _check_model_and_config(model: PreTrainedModel, config: GenerationConfig) -> None:
    check_model(model)
    refuse_unsupported_config(config)
    refuse_changed_eos(config, model)


def _prompt_tensor(
    inputs: torch.Tensor | None, input_ids: torch.Tensor | None, model_kwargs: dict[str, Any]
) -> torch.Tensor:
    """The prompt ids, (B, L): ``inputs`` (positional) or ``input_ids`` (keyword), once."""
    if inputs is not None and input_ids is not None:
        raise ValueError("the prompt came twice, as inputs and as input_ids: pass one")
    ids = inputs if inputs is not None else input_ids
    if "inputs_embeds" in model_kwargs or (ids is not None and ids.dim() == 2 and ids.shape[1] == 0):
        raise ValueError("inputs_embeds is not supported by parallel decoding: pass input_ids")
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.dtype != torch.long or ids.shape[0] == 0:
        raise ValueError("parallel decoding needs input_ids: a LongTensor of shape (batch, prompt length)")
    return ids


def _unpadded_rows(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> list[list[int]]:
    """Each row's prompt ids: the columns its mask keeps, which must be left padding (zeros, then ones)."""
    ids = input_ids.tolist()
    if attention_mask is None:
        return ids
    if attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, input_ids {tuple(input_ids.shape)}")
    rows = []
    for index, (row, mask) in enumerate(zip(ids, attention_mask.tolist())):
        start = len(mask) - sum(1 for m in mask if m)
        if mask != [0] * start + [1] * (len(mask) - start):
            raise ValueError(
                f"attention_mask row {index} is not left padding; a decoder-only model generates after the prompt's "
                "last token, so pad on the left (tokenizer padding_side='left')"
            )
        if start == len(mask):
            raise ValueError(f"row {index} is all padding")
        rows.append(row[start:])
    return rows


def _collector(answer: list[int], streamer: Streamer | None) -> Callable[[list[int]], None]:
    """The ``on_tokens`` of a row: settled tokens (in the final answer's order) join the row's answer ids and go
    to the streamer, if any."""

    def on_tokens(tokens: list[int]) -> None:
        answer.extend(tokens)
        if streamer is not None:
            streamer.put(torch.tensor(tokens, dtype=torch.long))

    return on_tokens


def _answer_spec(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompt_ids: list[int],
    settings: DecodeSettings,
    processors: list[Any],
    limits: BranchLimits | None,
    on_tokens: Callable[[list[int]], None],
    index: int,
) -> AnswerSpec:
    """One row as the engine's answer: ``engine.decode.prepare_prompt`` for prompt ids instead of a chat message
    (the same budget: ``max_new_tokens``, or fewer where the model's context ends first)."""
    config = AnswerConfig(**settings.engine_settings())
    limit = context_length(model)
    if len(prompt_ids) >= limit:
        raise ValueError(f"row {index}: the prompt has {len(prompt_ids)} tokens; the model's context is {limit}")
    budget = min(config.max_new_tokens, limit - len(prompt_ids))
    return AnswerSpec(model, tokenizer, prompt_ids, config, budget, processors, limits, AnswerStream(on_tokens))


def _decode_streamed(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    specs: list[AnswerSpec],
    compile: bool | str,
    batch: PromptBatch,
    streamer: Streamer | None,
) -> list[dict[str, Any]]:
    """Decode the rows; a streamer first gets the prompt, as ``generate`` gives it, and always its end."""
    if streamer is None:
        return _decode_rows(model, tokenizer, specs, compile)
    streamer.put(batch.input_ids.cpu())
    try:
        return _decode_rows(model, tokenizer, specs, compile)
    finally:
        streamer.end()  # also after an error, so that a reader of a TextIteratorStreamer is not left waiting


def _decode_rows(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, specs: list[AnswerSpec], compile: bool | str
) -> list[dict[str, Any]]:
    """Each row's report: one row on the scheduler ``parallel_decode`` uses, several on the batch engine. Its KV
    arena holds every row's prompt and budget at once; compiled, it is the engine's default (the model's context,
    rows beyond it wait for room), so that every call has the arena shape the compiled steps were made for."""
    if len(specs) == 1:
        return [run_one(solo_scheduler(model, compile), specs[0])]
    capacity = None if compile_enabled(compile, model.device) else sum(spec.slots_needed for spec in specs)
    engine = Engine(model, tokenizer, max_batch_size=len(specs), kv_capacity=capacity, compile=compile)
    return _run_batch(engine.scheduler, specs)


def _run_batch(scheduler: Scheduler, specs: list[AnswerSpec]) -> list[dict[str, Any]]:
    requests = [scheduler.submit(spec) for spec in specs]
    scheduler.run_until_idle()
    for request in requests:
        if request.error is not None:
            raise request.error
    return [request.result for request in requests]


def _sequences(input_ids: torch.Tensor, answers: list[list[int]], pad_token_id: int | None) -> torch.LongTensor:
    """The prompts as given, each followed by its answer, right-padded with ``pad_token_id`` to the longest."""
    width = max(len(answer) for answer in answers)
    if pad_token_id is None and any(len(answer) < width for answer in answers):
        raise ValueError("the answers differ in length and there is no pad_token_id to pad them: pass pad_token_id=")
    batch_size, prompt_width = input_ids.shape
    fill = 0 if pad_token_id is None else pad_token_id  # without a pad id every answer has the same length
    sequences = torch.full((batch_size, prompt_width + width), fill, dtype=torch.long)
    sequences[:, :prompt_width] = input_ids.cpu()
    for index, answer in enumerate(answers):
        sequences[index, prompt_width : prompt_width + len(answer)] = torch.tensor(answer, dtype=torch.long)
    return sequences.to(input_ids.device)


def _output(sequences: torch.LongTensor, reports: list[dict[str, Any]]) -> ParallelGenerateOutput:
    return ParallelGenerateOutput(
        sequences=sequences,
        num_branches=[report.get("num_branches", 0) for report in reports],
        num_blocks=[report.get("num_blocks", 0) for report in reports],
        branches=[report.get("branches", []) for report in reports],
        fallback=[report.get("fallback") for report in reports],
        caps=[report["caps"] for report in reports],
        stage_times=[_stage_times(report) for report in reports],
        reports=reports,
    )


def _stage_times(report: dict[str, Any]) -> dict[str, float]:
    if "stage1_time" not in report:  # normal decoding: one stage
        return {"decode": report["time"]}
    return {stage: report[f"{stage}_time"] for stage in ("stage1", "stage2", "stage3")}
