"""Judging a results file: every answer without a score goes to the judge, ``concurrency`` requests in flight at once,
and the verdicts go back into the file.

Threads: the pool's workers only send requests (:meth:`Judge.grade`); this module's caller thread alone writes the
row dicts and the file, so a verdict is never half-stored. One ``threading.Event`` (``stop``) ends the run: set by
the worker whose request failed for good (so no queued request starts after it), and on the way out, also on
Ctrl-C. Requests in flight then finish and their verdicts are kept.
"""

import concurrent.futures
import sys
import threading

from ..runs.results import write_rows_atomic
from .judge import JudgeCancelled
from .metrics import MODES, as_number, is_blank
from .rows import judge_inputs


def pending_judgements(rows):
    """(row index, mode) pairs that still need a verdict: a response to grade, no error, and no stored score."""
    pending = []
    for i, row in enumerate(rows):
        if not is_blank(row.get("error")):
            continue
        for mode in MODES:
            if isinstance(row.get(f"{mode}_response"), str) and as_number(row.get(f"{mode}_score")) is None:
                pending.append((i, mode))
    return pending


def forget_scores(rows):
    """Drop the stored verdicts of ``rows`` (--rejudge), so that all of them are asked for again."""
    for row in rows:
        for mode in MODES:
            row.pop(f"{mode}_score", None)
            row.pop(f"{mode}_rationale", None)


def _store_verdict(row, mode, verdict):
    score = verdict.score
    if score is not None and float(score).is_integer():
        score = int(score)  # 4, not 4.0, in the results file
    row[f"{mode}_score"] = score
    row[f"{mode}_rationale"] = verdict.rationale


def _grade_unless_stopped(stop, judge, question, reference, answer):
    """One verdict, or None without a request once another request has failed for good (``stop`` is set)."""
    if stop.is_set():
        return None
    try:
        return judge.grade(question, reference, answer, stop)
    except Exception:
        stop.set()  # set here, in the worker, so that no queued request starts after this failure
        raise


def judge_rows(rows, evaluated, task, judge, path, concurrency, save_every, progress=None):
    """Grade every pending answer of ``evaluated`` (a prefix of ``rows``) with ``concurrency`` requests in flight.

    Verdicts are written into the row dicts by this (the calling) thread only, and the whole file (all of ``rows``)
    is rewritten atomically after every ``save_every`` new verdicts and at the end, also when a request fails for
    good or on Ctrl-C. Returns the number of new verdicts; raises JudgeError after saving if a request failed for
    good (no new request starts after the first such failure; those in flight finish and are kept).
    """
    pending = pending_judgements(evaluated)
    if not pending:
        return 0
    done = unsaved = 0
    first_error = None
    stop = threading.Event()
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="judge")
    try:
        futures = {
            pool.submit(
                _grade_unless_stopped, stop, judge, *judge_inputs(rows[i], task), rows[i][f"{mode}_response"]
            ): (i, mode)
            for i, mode in pending
        }
        for future in concurrent.futures.as_completed(futures):
            if future.cancelled():
                continue
            error = future.exception()
            if error is not None:
                # Keep the failure that stopped the run, not a request cancelled because of it.
                if first_error is None or isinstance(first_error, JudgeCancelled):
                    first_error = error
                continue
            verdict = future.result()
            if verdict is None:  # skipped after a failure
                continue
            i, mode = futures[future]
            _store_verdict(rows[i], mode, verdict)
            done += 1
            unsaved += 1
            if progress is not None:
                progress.update(1)
            if unsaved >= save_every:
                write_rows_atomic(path, rows)
                unsaved = 0
    finally:
        # Also on Ctrl-C: no new requests, drop the queued ones, keep every verdict that came back.
        stop.set()
        pool.shutdown(wait=False, cancel_futures=True)
        if unsaved:
            write_rows_atomic(path, rows)
    if first_error is not None:
        raise first_error
    return done


def progress_bar(total):
    """A tqdm bar on stderr (shown on a terminal only), or None without tqdm."""
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc="judge", unit="answer", file=sys.stderr, disable=None)


def judge_and_store(rows, evaluated, task, judge, path, *, concurrency, save_every, rejudge=False, log=print):
    """Grade the answers of ``evaluated`` (a prefix of ``rows``) that have no score, all of them with ``rejudge``,
    and store the verdicts in the rows and in ``path`` (:func:`judge_rows`); says on ``log`` how many it asks for.
    Returns the number of new verdicts; raises what :func:`judge_rows` raises (JudgeError, KeyboardInterrupt)."""
    if rejudge:
        forget_scores(evaluated)
    todo = len(pending_judgements(evaluated))
    log(
        f"judging {todo} answers with {judge.model_name} ({len(evaluated) * len(MODES) - todo} already "
        f"judged or not gradable), {concurrency} at a time"
    )
    progress = progress_bar(todo)
    try:
        return judge_rows(rows, evaluated, task, judge, path, concurrency, save_every, progress)
    finally:
        if progress is not None:
            progress.close()
