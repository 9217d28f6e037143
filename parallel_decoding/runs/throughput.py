"""Throughput of a batched run (``generate.py --batch_size N`` with N > 1), from its result rows.

Every row of a batch records the batch's id (``batch``) and, per mode, the wall time of that mode's pass over the
batch (``<mode>_batch_time``: from the first request's submission to the engine's last token, after a device sync)
and the tokens that pass generated (``<mode>_batch_tokens``: every answer of the batch in that mode). A mode's
throughput is its generated tokens over its wall time, summed over the distinct batches the rows record. Pure
Python: generate.py's log and eval.py's summary compute it alike.
"""

from __future__ import annotations

import math
from typing import Any

BATCH_COLUMN = "batch"


def batch_columns(mode: str) -> tuple[str, str]:
    """The columns of one mode's batch pass: its wall time (s) and its generated tokens."""
    return f"{mode}_batch_time", f"{mode}_batch_tokens"


def _number(value):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return value


def batch_passes(rows, mode: str) -> dict:
    """``{batch id: (wall time, generated tokens)}`` of ``mode``'s passes, one per distinct batch the rows record
    (rows without a batch, or without that mode's pass, are left out)."""
    time_column, tokens_column = batch_columns(mode)
    passes: dict[Any, tuple[float, int]] = {}
    for row in rows:
        batch = row.get(BATCH_COLUMN)
        if isinstance(batch, bool) or not isinstance(batch, (int, str)):
            continue
        seconds, tokens = _number(row.get(time_column)), _number(row.get(tokens_column))
        if seconds is not None and seconds > 0 and tokens is not None:
            passes.setdefault(batch, (seconds, tokens))
    return passes


def throughput(rows, mode: str):
    """``mode``'s generated tokens per second of batch-pass wall time over the rows' batches; None without any."""
    passes = batch_passes(rows, mode).values()
    seconds = sum(s for s, _ in passes)
    return sum(n for _, n in passes) / seconds if seconds > 0 else None


def next_batch_id(rows) -> int:
    """The first batch id that no row uses yet (ids are ints, unique in a results file)."""
    ids = [row.get(BATCH_COLUMN) for row in rows if row is not None]
    return 1 + max((i for i in ids if isinstance(i, int) and not isinstance(i, bool)), default=-1)
