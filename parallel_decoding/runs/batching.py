"""``generate.py --batch_size N`` with N > 1: the pending rows, N at a time, on one batch engine per run
(``engine.batch.Engine``: continuous batching, each request in its own region of one KV arena).

- **Batches.** This run's pending rows (this rank's share under ``--data_parallel``) in dataset order, N per batch.
  Within a batch the modes run one after the other: every row of the batch in the first mode, then every row in
  the second; batch k of the run takes the order ``mode_order(k, modes)``, so the modes alternate per batch as
  they alternate per row at batch size 1.
- **Answers.** Each request samples from ``mode_generator(seed, row, mode)``, as at batch size 1, and the engine
  makes a request's answer independent of the others in flight, so the answers are those of ``--batch_size 1``.
- **Times.** A row's ``<mode>_time`` is its request's latency (admission to its last token, as the engine times
  it); ``<mode>_batch_time`` and ``<mode>_batch_tokens`` are the wall time and the generated tokens of the mode's
  whole pass over the batch, the same in every row of the batch (``runs/throughput.py`` turns them into
  throughput). ``batch`` is the batch's id, unique in the results file.
"""

from __future__ import annotations

import time

from parallel_decoding.cli import one_line

from .comparison import mode_error, mode_generator, mode_order, new_result, record_answer
from .loading import usable_context
from .throughput import batch_columns


def engine_settings(generation: dict) -> dict:
    """The generation keyword arguments of one request (the run's, without ``compile`` and ``decoder``: the engine's
    own)."""
    return {key: value for key, value in generation.items() if key not in ("compile", "decoder")}


def make_engine(run, prompts: list, generation: dict):
    """The run's batch engine: up to --batch_size requests in flight, a KV arena of --kv_capacity slots or, by
    default, room for that many of the longest prompt and its answer (each at most the model's context); compiled
    as the run resolves --compile (every bucket before the first row, untimed)."""
    from parallel_decoding.decoding.attention import set_attention

    from ..engine.batch import Engine, kv_capacity_for
    from ..engine.decode import chat_prompt_ids

    size = run.args.batch_size
    if run.args.kv_capacity is not None:
        capacity, given = run.args.kv_capacity, " (--kv_capacity)"
    else:
        lengths = [len(chat_prompt_ids(run.tokenizer, prompt)) for prompt in prompts]
        context = usable_context(run.model, 0)
        # Room for that many of the longest prompt and its answer, never for more requests than there are prompts.
        request_tokens = max(lengths) + run.args.max_new_tokens
        capacity, given = kv_capacity_for(min(size, len(lengths)), request_tokens, context), ""
    compiled = generation["compile"]
    run.log(
        f"batch engine: up to {size} rows in flight per mode; KV arena of {capacity} tokens{given}; compile: "
        + ("on, compiling the step for every bucket (untimed)" if compiled else "off (uncompiled passes)")
    )
    set_attention(run.model, run.attention[run.modes[0]])  # both modes: sdpa or eager (runs/flags.py)
    return Engine(run.model, run.tokenizer, max_batch_size=size, kv_capacity=capacity, compile=compiled)


def warm_up(engine, indices: list, prompts: dict, modes: tuple, generation: dict, log) -> None:
    """One untimed batch-sized pass per mode (the rows ``indices``) before the first timed batch."""
    for mode in modes:
        outcomes, _, _ = decode_mode(engine, indices, prompts, mode, generation, seed=0)
        failed = [out for out in outcomes.values() if isinstance(out, BaseException)]
        if failed:
            log(f"warm-up ({mode}): {len(failed)} of {len(outcomes)} requests failed, e.g. {one_line(failed[0])}")


def decode_mode(engine, indices: list, prompts: dict, mode: str, generation: dict, seed: int) -> tuple:
    """Every row of a batch in one mode, all in flight on ``engine``: ({row: the answer dict, or the exception it
    failed with}, wall time of the pass, tokens it generated). A pass that raises fails every request still in
    flight; a request refused at submission fails alone."""
    from ..engine.timing import timing_sync

    settings = engine_settings(generation)
    sync = timing_sync(engine.model)
    outcomes, requests = {}, {}
    sync()
    start = time.perf_counter()
    for i in indices:
        if settings.get("do_sample"):
            settings["generator"] = mode_generator(seed, i, mode, engine.model.device)
        try:
            requests[i] = engine.submit(prompts[i], parallel=mode == "parallel", **settings)
        except (ValueError, RuntimeError) as e:  # an empty or too-long prompt
            outcomes[i] = e
    try:
        while not engine.idle:
            engine.step()
    except (ValueError, RuntimeError) as e:  # CUDA out of memory, a kernel error: the pass failed as a whole
        for request in requests.values():
            if not request.done:
                engine.cancel(request)
                request.error = e
    sync()
    seconds = time.perf_counter() - start
    for i, request in requests.items():
        outcomes[i] = request.error if request.error is not None else request.result
    tokens = sum(out["length"] for out in outcomes.values() if isinstance(out, dict))
    return outcomes, seconds, tokens


def run_batch(run, engine, k: int, batch_id: int, indices: list, prompts: dict, generation: dict) -> list:
    """The result rows of one batch (the k-th of this run): each mode over all of its rows, in the order
    ``mode_order(k, modes)``; a row's mode that failed is recorded in its `error`, the rest still run."""
    from parallel_decoding.decoding.attention import set_attention

    order = mode_order(k, run.modes)
    results = {i: new_result(run.rows[i], prompts[i], order) for i in indices}
    errors = {i: [] for i in indices}
    for mode in order:
        set_attention(run.model, run.attention[mode])
        outcomes, seconds, tokens = decode_mode(engine, indices, prompts, mode, generation, run.args.seed)
        time_column, tokens_column = batch_columns(mode)
        for i, out in outcomes.items():
            result = results[i]
            result.update(
                {
                    f"{mode}_attention": run.attention[mode],
                    "batch": batch_id,
                    time_column: seconds,
                    tokens_column: tokens,
                }
            )
            if isinstance(out, BaseException):
                errors[i].append(mode_error(mode, out))
            else:
                record_answer(result, mode, out)
    for i in indices:
        results[i]["error"] = "; ".join(errors[i]) if errors[i] else None
    return [results[i] for i in indices]


def prepare(run, rank_rows: list, prompts: dict, generation: dict):
    """This rank's batch engine, warmed up (None for a data-parallel rank with no share of the rows)."""
    if not rank_rows:
        return None
    engine = make_engine(run, [prompts[i] for i in rank_rows], generation)
    warm_up(engine, rank_rows[: run.args.batch_size], prompts, run.modes, generation, run.log)
    return engine


def decode_batches(run, engine, rank_rows: list, prompts: dict, generation: dict, first_id: int):
    """Yield (row indices, their result rows) batch after batch. Batch ids are ``first_id + k * world_size +
    rank``: unique across the ranks of a data-parallel run and above every id already in the results file."""
    size, ranks = run.args.batch_size, run.ranks
    for k, start in enumerate(range(0, len(rank_rows), size)):
        indices = rank_rows[start : start + size]
        batch_id = first_id + k * ranks.world_size + ranks.rank
        yield indices, run_batch(run, engine, k, batch_id, indices, prompts, generation)
