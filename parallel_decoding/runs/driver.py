"""One generate.py run: gather its pieces before the model loads (:func:`prepare`), load the model (:func:`load`),
then decode the selected dataset rows that have no result yet (:func:`decode_rows`).

One process, or tensor parallel: rank 0 rewrites the results file after each row. Data parallel: each rank decodes
its share of the rows and adds each finished row to its own shard; rank 0 merges the shards into the results file
once all ranks are done (and, at the start, merges those an interrupted run left). With --batch_size N > 1 the rows
go N at a time through a batch engine (runs/batching.py) and the file is rewritten after each batch.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from parallel_decoding.cli import EXIT_ROWS_FAILED
from parallel_decoding.tasks import (
    FormatPrompt,
    build_prompt,
    default_data_path,
    get_task,
    load_dataset,
    resolve_format_prompt,
)

from . import batching, comparison, distributed, loading, served
from .comparison import RESULT_COLUMNS
from .distributed import DATA_PARALLEL, Ranks
from .results import ResultsError, ResultsFile
from .settings import (
    check_compile_flags,
    generation_kwargs,
    output_path,
    run_modes,
    run_settings,
    upgraded_settings,
)
from .throughput import batch_passes, next_batch_id, throughput

if TYPE_CHECKING:
    import torch
    from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

    from parallel_decoding.decoding.arena import FastDecoder


@dataclass
class Run:
    """The pieces of one run: made by :func:`prepare` before the model loads; :func:`load` adds the model."""

    args: argparse.Namespace  # the parsed flags
    ranks: Ranks
    rows: list  # the dataset's rows, in file order
    data_path: str
    model_path: str
    settings: dict  # run_settings(args), recorded in every result row
    format_prompt: FormatPrompt
    results_file: ResultsFile
    existing: list  # the result rows an earlier run left in the results file
    modes: tuple
    device: torch.device
    dtype: torch.dtype
    attention: dict[str, str]  # the transformers attention implementation of each mode
    log: Callable[[str], None]
    model: PreTrainedModel | None = field(default=None, repr=False)
    tokenizer: PreTrainedTokenizerBase | None = field(default=None, repr=False)
    config: PretrainedConfig | None = field(default=None, repr=False)  # --engine vllm/openai: no weights here
    session: served.Session | None = field(default=None, repr=False)  # --engine vllm/openai: the client


@dataclass
class Work:
    """Which dataset rows this run decodes, and the result rows (its own and earlier ones) the file will hold."""

    results: list  # per dataset row: its result row, or None
    unmatched: list  # earlier result rows that match no dataset row: kept at the end of the file
    selected: range  # the dataset rows --max_samples selects
    pending: list  # indices of the selected rows decoded now (no result yet, or an earlier error)
    skipped: list  # indices of selected rows whose prompt is longer than the model's usable context


def logger(ranks: Ranks) -> Callable[[str], None]:
    """`generate: ...` lines on stderr, from rank 0 only."""

    def log(message: str) -> None:
        if ranks.is_main:
            print(f"generate: {message}", file=sys.stderr, flush=True)

    return log


def prepare(args, ranks: Ranks, held: ExitStack, log) -> Run:
    """Read and check every input before the model loads; rank 0 takes the results file's lock (held until `held`
    closes) and reads what an earlier run left there. Raises UsageError, DatasetError, FormatPromptError,
    ResultsError or DistributedError, each one line."""
    data_path = args.data_path or str(default_data_path(args.task))
    rows = load_dataset(args.task, data_path)
    model_path = loading.resolve_model_path(args.model_path)
    format_prompt = resolve_format_prompt(args.format_prompt_file, model_path)
    settings = run_settings(args)
    results_file = ResultsFile(
        output_path(args.output_dir, model_path, data_path), RESULT_COLUMNS, required_column="full_prompt"
    )
    existing = []
    if ranks.is_main:  # the run's one writer of the results file; data-parallel ranks write only shards
        held.enter_context(results_file.locked(hint="wait for it to finish, or use another --output_dir"))
        existing = earlier_rows(args, results_file, settings, log)
    modes = run_modes(args)
    device, dtype = loading.choose_device(args, ranks)
    check_compile_flags(args, device)
    attention = loading.attention_per_mode(args.attn_implementation, device, args.normal_stock_flash_attn)
    the_run = Run(
        args,
        ranks,
        rows,
        data_path,
        model_path,
        settings,
        format_prompt,
        results_file,
        existing,
        modes,
        device,
        dtype,
        attention,
        log,
    )
    if args.engine != "transformers":
        held.callback(served.close, the_run)  # the serving engine stops before the lock is released
    return the_run


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
    unrecorded = results_file.check_settings(
        existing + shard_rows, settings, upgraded_settings, implied=served.ENGINE_DEFAULTS
    )
    if unrecorded:
        log(
            f"{unrecorded} rows of {results_file} record no settings (an earlier version or the reference "
            f"implementation wrote them): kept and resumed as if made with this run's settings"
        )
    return existing


def load(run: Run) -> None:
    """The model and tokenizer, on every rank (collective under --tp: each rank loads its part of the weights); with
    --engine vllm/openai the tokenizer and the serving engine's client instead."""
    if run.args.engine != "transformers":
        served.load(run)
        return
    run.model, run.tokenizer = loading.load_model(
        run.args, run.model_path, run.attention[run.modes[0]], run.device, run.dtype, run.ranks
    )


def decode_rows(run: Run) -> int:
    """Decode the selected dataset rows that have no result yet; the exit status (EXIT_ROWS_FAILED when every row
    decoded now failed)."""
    args, ranks, log = run.args, run.ranks, run.log
    log(comparison.describe_attention(run.attention) if run.session is None else served.describe(run))
    log(run.format_prompt.describe())
    placement = (
        f"{loading.describe_placement(args, ranks, run.model, run.device)} ({str(run.dtype).replace('torch.', '')})"
        if run.session is None
        else f"on --engine {args.engine}"
    )
    log(
        f"model {run.settings['model']} {placement}; task {args.task}; {len(run.rows)} rows in {run.data_path}; "
        f"output {run.results_file.path}"
    )
    work = plan(run)
    total = len(work.selected) - len(work.skipped)
    if not work.pending:
        in_file = write(run, work) if ranks.is_main else 0  # drops a torn last line of an earlier run
        log(f"nothing to do: the {total} selected rows are done; {in_file} rows are in {run.results_file.path}")
        return 0
    prompts = {i: build_prompt(args.task, run.rows[i], run.format_prompt.text) for i in work.pending}
    generation = generation_kwargs(args, run.device)
    if run.session is not None:
        log(f"rows in flight per mode: {args.batch_size}; the prefix cache is levelled before each mode's pass")
    elif args.batch_size == 1 and generation["compile"]:  # (a batch engine makes its own arena: runs/batching.py)
        generation["decoder"] = prepare_compiled_path(run, [prompts[i] for i in work.pending])
    elif args.batch_size == 1:
        log("compile: off (eager reference path)")
    errors, in_file = decode_pending(run, work, prompts, generation)
    speedup = comparison.mean_speedup([work.results[j] for j in work.selected if work.results[j] is not None])
    summary = f"{total} selected rows, {in_file} rows in {run.results_file.path} ({errors} with errors this run)"
    if speedup is not None:
        summary += f"; mean speedup {speedup:.2f}x"
    log(summary)
    if args.batch_size > 1 and (
        line := throughput_line(run, [work.results[i] for i in work.pending if work.results[i] is not None])
    ):
        log(line)
    return distributed.from_main(ranks, EXIT_ROWS_FAILED if errors == len(work.pending) else 0)


def plan(run: Run) -> Work:
    """Earlier results stay in the file (in dataset order, also beyond --max_samples); selected rows that have
    none, or whose earlier run recorded an error, are pending. Rank 0 decides; the other ranks follow its list."""
    args, log, out_path = run.args, run.log, run.results_file.path
    results, unmatched = run.results_file.match(run.rows, run.existing)
    if run.ranks.is_main:
        if args.overwrite:
            run.results_file.remove_shards()
        elif merged := run.results_file.merge_shards(run.rows, results, unmatched):
            log(f"merged {merged} rows from the shards of an interrupted data-parallel run into {out_path}")
    if unmatched:
        log(f"{len(unmatched)} rows of {out_path} match no row of {run.data_path}; they are kept at the end")
    selected = range(len(run.rows) if args.max_samples is None else min(args.max_samples, len(run.rows)))
    pending = [i for i in selected if results[i] is None or results[i].get("error") is not None]
    if len(pending) < len(selected):
        log(f"resuming: {len(selected) - len(pending)} rows already done")
    skipped = too_long(run, pending)
    if skipped:
        pending = [i for i in pending if i not in set(skipped)]
        for i in skipped:
            results[i] = None  # an earlier errored attempt of a row that cannot run is not kept either
    return Work(results, unmatched, selected, distributed.from_main(run.ranks, pending), skipped)


def too_long(run: Run, pending: list) -> list:
    """The pending rows of a task that skips prompts longer than the model's usable context (logged)."""
    from ..engine.decode import chat_prompt_ids

    limit = loading.usable_context(run.model if run.model is not None else run.config, run.args.max_new_tokens)
    if not get_task(run.args.task).skip_too_long or limit is None:
        return []
    text = run.format_prompt.text
    skipped = [
        i
        for i in pending
        if len(chat_prompt_ids(run.tokenizer, build_prompt(run.args.task, run.rows[i], text))) > limit
    ]
    if skipped:
        run.log(
            f"skipped {len(skipped)} rows whose prompt exceeds the usable context of {limit} tokens "
            f"(max positions minus --max_new_tokens {run.args.max_new_tokens})"
        )
    return skipped


def prepare_compiled_path(run: Run, prompts: list) -> FastDecoder:
    """One KV arena for the whole run, and every bucket compiled now: nothing compiles inside a timed row. The
    arena holds --kv_capacity tokens, by default the longest pending prompt and its answer; a row that does not
    fit fails alone (ArenaFullError, in its `error` column). The run passes the decoder to every answer."""
    from parallel_decoding.decoding import arena
    from parallel_decoding.decoding.attention import set_attention

    from ..engine.batch import kv_capacity_for
    from ..engine.decode import chat_prompt_ids

    if run.args.kv_capacity is not None:
        capacity, given = run.args.kv_capacity, " (--kv_capacity)"
    else:
        lengths = [len(chat_prompt_ids(run.tokenizer, prompt)) for prompt in prompts]
        capacity, given = kv_capacity_for(1, max(lengths) + run.args.max_new_tokens), ""
    run.log(f"compile: on; KV arena of {capacity} tokens{given}; compiling the step for every bucket (untimed)")
    set_attention(run.model, run.attention[run.modes[0]])
    return arena.prepare_fast_decoder(run.model, capacity, warm_up=True)


def write(run: Run, work: Work) -> int:
    """Rewrite the results file with every result row; how many it now holds."""
    file_rows = [r for r in work.results if r is not None] + work.unmatched
    run.results_file.write(file_rows)
    return len(file_rows)


def decode_pending(run: Run, work: Work, prompts: dict, generation: dict) -> tuple:
    """Decode this rank's share of the pending rows, one row at a time or, with --batch_size N > 1, N at a time
    (runs/batching.py), writing the file after each row or batch; (rows with errors, rows in file)."""
    args, ranks, results = run.args, run.ranks, work.results
    rank_rows = ranks.share(work.pending)  # the pending dataset-row indices this rank decodes
    shard = run.results_file.shard(ranks.rank) if ranks.mode == DATA_PARALLEL else None
    if run.session is not None:  # a serving engine: one process, no shards (runs/served.py refuses the flags)
        groups = served.decode_batches(run, rank_rows, prompts, next_batch_id(results + work.unmatched))
    elif args.batch_size > 1:
        first_id = distributed.from_main(ranks, next_batch_id(results + work.unmatched))  # every rank calls it
        engine = batching.prepare(run, rank_rows, prompts, generation)
        groups = batching.decode_batches(run, engine, rank_rows, prompts, generation, first_id)
    else:
        comparison.warm_up(
            run.model, run.tokenizer, [prompts[i] for i in rank_rows[:3]], run.modes, run.attention, generation, run.log
        )
        # Sampling draws from a generator seeded by (seed, row, mode): the same on every rank, so tensor-parallel
        # ranks pick the same tokens, and a row decoded by any data-parallel rank samples as in one process.
        groups = (
            (
                [i],
                [
                    comparison.run_row(
                        run.model,
                        run.tokenizer,
                        run.rows[i],
                        prompts[i],
                        run.modes,
                        run.attention,
                        generation,
                        row_index=i,
                        seed=args.seed,
                    )
                ],
            )
            for i in rank_rows
        )
    errors, in_file = decode_groups(run, work, groups, rank_rows, shard)
    if shard is None:
        return errors, in_file
    distributed.wait_for_all(ranks)  # every shard is complete
    if ranks.is_main:
        run.results_file.merge_shards(run.rows, results, work.unmatched)
        in_file = sum(r is not None for r in results) + len(work.unmatched)
        errors = sum(results[i] is not None and results[i]["error"] is not None for i in work.pending)
    return errors, in_file


def decode_groups(run: Run, work: Work, groups, rank_rows: list, shard) -> tuple:
    """Store each decoded group of rows (one row, or one batch) as it comes, in the shard or the results file, with
    a progress bar; (rows with errors, rows in file)."""
    from tqdm import tqdm

    args, ranks, results = run.args, run.ranks, work.results
    errors = in_file = 0
    if shard is None:
        total = len(work.selected) - len(work.skipped)
        bar = tqdm(
            total=total,
            initial=total - len(work.pending),
            desc=args.task,
            unit="row",
            dynamic_ncols=True,
            disable=not ranks.is_main,
        )
    else:
        bar = tqdm(
            total=len(rank_rows),
            desc=f"{args.task} (rank 0's share)",
            unit="row",
            dynamic_ncols=True,
            disable=not ranks.is_main,
        )
    try:
        for indices, decoded in groups:
            for i, result in zip(indices, decoded):
                results[i] = result
                results[i]["settings"] = run.settings
                if shard is not None:
                    shard.add(i, results[i])
            if shard is None and ranks.is_main:
                in_file = write(run, work)
            for i in indices:
                if results[i]["error"]:
                    errors += 1
                    if ranks.is_main or shard is not None:
                        tqdm.write(
                            f"{'' if ranks.is_main else f'rank {ranks.rank}: '}row {i}: {results[i]['error']}",
                            file=sys.stderr,
                        )
            postfix = progress(
                run,
                [results[j] for j in work.selected if results[j] is not None],
                [results[j] for j in rank_rows if results[j] is not None],
            )
            if postfix:
                bar.set_postfix(postfix)
            bar.update(len(indices))
    finally:
        bar.close()
    return errors, in_file


def progress(run: Run, selected: list, decoded: list) -> dict:
    """The progress bar's figures: the mean speedup over the selected rows done, and with --batch_size N > 1 each
    mode's throughput over this rank's batches of this run."""
    postfix = {}
    speedup = comparison.mean_speedup(selected)
    if speedup is not None:
        postfix["speedup"] = f"{speedup:.2f}x"
    if run.args.batch_size > 1:
        figures = [f"{mode} {rate:.1f}" for mode in run.modes if (rate := throughput(decoded, mode)) is not None]
        if figures:
            postfix["tokens/s"] = ", ".join(figures)
    return postfix


def throughput_line(run: Run, rows: list) -> str | None:
    """The log's line on each mode's throughput over this run's batches (rows: the result rows decoded now)."""
    rates = {mode: throughput(rows, mode) for mode in run.modes}
    if any(rate is None for rate in rates.values()):
        return None
    batches = len(batch_passes(rows, run.modes[0]))
    line = (
        f"throughput over this run's {batches} batches of up to {run.args.batch_size} rows (generated tokens / "
        f"wall time of each mode's passes): " + ", ".join(f"{mode} {rates[mode]:.1f} tokens/s" for mode in rates)
    )
    if len(rates) == 2 and rates["normal"] > 0:
        line += f"; parallel / normal {rates['parallel'] / rates['normal']:.2f}x"
    return line
