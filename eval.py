"""Evaluate a results file of normal vs parallel decoding: speed, judge-free metrics, and an LLM judge.

    python eval.py --df_path results/<model>/<data>.jsonl --task retrieval --api_key $KEY --model_name gpt-4o
    python eval.py --df_path results/<model>/<data>.jsonl --task planning --no_judge
    python eval.py --report results          # every <stem>.summary.json under results/, side by side

Reads rows written by generate.py or by the reference implementation, stores judge scores back into the results
file (atomic rewrite; a rerun only asks for what is missing), prints a summary table and writes
``<stem>.summary.json``, ``<stem>.summary.md`` and ``<stem>.png`` beside the results. ``--report DIR`` reads those
summaries and writes ``report.csv``, ``report.md`` and ``report.png`` in DIR. See docs/eval.md.
"""

import argparse
import concurrent.futures
import contextlib
import json
import math
import os
import pathlib
import sys
import threading

try:  # torch loads here, for seconds: a Ctrl-C now ends the run in one line, not a traceback
    from parallel_decoding.evaluation import metrics, report
    from parallel_decoding.evaluation.judge import Judge, JudgeCancelled, JudgeError
    from parallel_decoding.evaluation.metrics import MODES, is_blank
    from parallel_decoding.runs.results import (
        ResultsError, ResultsFile, atomic_file, read_numbered_rows, write_rows_atomic, write_text_atomic,
    )
except KeyboardInterrupt:
    print("eval.py: interrupted while loading", file=sys.stderr)
    sys.exit(130)

# task -> (column shown to the judge as the question, column holding the reference answer)
TASK_FIELDS = {
    "retrieval": ("prompt", "gold_keys"),
    "multi-document-qa": ("input", "answers"),
    "planning": ("task", "answer"),
}
RESULT_FIELDS = ("response", "time", "length")  # per mode: <mode>_response, <mode>_time, <mode>_length

EXIT_BAD_INPUT = 2
EXIT_JUDGE_FAILED = 1
EXIT_INTERRUPTED = 130


class InputError(Exception):
    """Bad input: reported as one line on stderr with exit code 2, before anything is written."""


class OneLineArgumentParser(argparse.ArgumentParser):
    def error(self, message):
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message}\n")


def parse_args(argv=None):
    p = OneLineArgumentParser(prog="eval.py", description=__doc__.split("\n")[0])
    p.add_argument("--df_path", help="results file (jsonl) from generate.py or the reference")
    p.add_argument("--task", choices=sorted(TASK_FIELDS))
    p.add_argument("--report", nargs="?", const="results", default=None, metavar="DIR",
                   help="compare evaluated runs: read every *.summary.json under DIR (default: results) and write "
                        "report.csv, report.md and report.png there")
    p.add_argument("--api_key", default=None, help="judge API key (default: env OPENAI_API_KEY)")
    p.add_argument("--base_url", default=None,
                   help="OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1 (default: env OPENAI_BASE_URL, "
                        "else api.openai.com)")
    p.add_argument("--model_name", default="gpt-4o", help="judge model name")
    p.add_argument("--no_judge", action="store_true", help="speed and judge-free metrics only; no network")
    p.add_argument("--rejudge", action="store_true", help="discard stored judge scores of the evaluated rows")
    p.add_argument("--concurrency", type=int, default=8, help="judge requests in flight at once")
    p.add_argument("--max_rows", type=int, default=None, help="evaluate only the first N rows")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds per judge request")
    p.add_argument("--max_retries", type=int, default=5,
                   help="extra attempts per judge request on HTTP 429/5xx, timeouts and dropped connections")
    p.add_argument("--backoff_base", type=float, default=1.0,
                   help="first retry waits this many seconds, doubling on each further retry")
    p.add_argument("--backoff_max", type=float, default=60.0, help="longest wait between retries (s)")
    p.add_argument("--judge_max_tokens", type=int, default=512, help="max tokens of one verdict")
    p.add_argument("--save_every", type=int, default=8,
                   help="rewrite the results file after this many new judgements")
    args = p.parse_args(argv)
    if args.report is not None:
        if args.df_path is not None or args.task is not None:
            p.error("--report reads the summaries of evaluated runs; it takes no --df_path or --task")
    else:
        missing = [f"--{flag}" for flag in ("df_path", "task") if getattr(args, flag) is None]
        if missing:
            p.error(f"the following arguments are required: {', '.join(missing)}")
    for flag in ("concurrency", "max_rows", "judge_max_tokens", "save_every"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            p.error(f"--{flag} must be >= 1, got {value}")
    for flag in ("timeout",):
        if getattr(args, flag) <= 0:
            p.error(f"--{flag} must be > 0")
    for flag in ("max_retries", "backoff_base", "backoff_max"):
        if getattr(args, flag) < 0:
            p.error(f"--{flag} must be >= 0")
    return args


# ---------------------------------------------------------------------------------------------------------------------
# Loading and saving rows


def load_rows(path):
    """(rows, line numbers) of a jsonl file, blank lines skipped; InputError naming file:line on bad JSON (a torn
    last line too: eval rewrites the file and must not drop a line silently)."""
    path = pathlib.Path(path)
    if not path.exists():
        raise InputError(f"--df_path {path}: no such file")
    if not path.is_file():
        raise InputError(f"--df_path {path}: not a file")
    try:
        numbered = read_numbered_rows(path, tolerate_torn_tail=False)
    except ResultsError as error:
        raise InputError(str(error)) from None
    if not numbered:
        raise InputError(f"{path}: no rows")
    return [row for _, row in numbered], [line_number for line_number, _ in numbered]


def validate_rows(rows, line_numbers, path, task):
    """InputError unless every row has the task's question and reference columns and the file has, for at least one
    mode, all of <mode>_response/_time/_length (a mode with only some of them is an error too)."""
    question_col, reference_col = TASK_FIELDS[task]
    for row, line_number in zip(rows, line_numbers):
        missing = [c for c in (question_col, reference_col) if c not in row]
        if missing:
            raise InputError(
                f"{path}:{line_number}: missing column(s) {', '.join(missing)} needed by --task {task}"
            )
    columns = set().union(*rows)
    complete_modes = []
    for mode in MODES:
        wanted = [f"{mode}_{field}" for field in RESULT_FIELDS]
        missing = [c for c in wanted if c not in columns]
        if len(missing) == len(wanted):
            continue
        if missing:
            raise InputError(f"{path}: missing column(s) {', '.join(missing)}")
        complete_modes.append(mode)
    if not complete_modes:
        wanted = [f"{m}_{f}" for m in MODES for f in RESULT_FIELDS]
        raise InputError(f"{path}: missing column(s) {', '.join(wanted)}; is this a results file?")


def save_rows(path, rows):
    """Rewrite the results file (all rows, in order) atomically."""
    write_rows_atomic(path, rows)


# ---------------------------------------------------------------------------------------------------------------------
# Judging


def _as_text(value, separator):
    if isinstance(value, (list, tuple)):
        return separator.join(str(v) for v in value)
    return "" if value is None else str(value)


def judge_inputs(row, task):
    """(question, reference answer) shown to the judge for one row."""
    question_col, reference_col = TASK_FIELDS[task]
    return _as_text(row.get(question_col), "\n"), _as_text(row.get(reference_col), " / ")


def pending_judgements(rows, task):
    """(row index, mode) pairs that still need a verdict: a response to grade, no error, and no stored score."""
    pending = []
    for i, row in enumerate(rows):
        if not is_blank(row.get("error")):
            continue
        for mode in MODES:
            if isinstance(row.get(f"{mode}_response"), str) and metrics.as_number(row.get(f"{mode}_score")) is None:
                pending.append((i, mode))
    return pending


def _store_verdict(row, mode, verdict):
    score = verdict.score
    if score is not None and float(score).is_integer():
        score = int(score)
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

    Verdicts are written into the row dicts by this (the main) thread only, and the whole file is rewritten
    atomically after every ``save_every`` new verdicts and at the end, also when a request fails for good or on
    Ctrl-C. Returns the number of new verdicts; raises JudgeError after saving if a request failed for good (no new
    request starts after the first such failure; those in flight finish and are kept).
    """
    pending = pending_judgements(evaluated, task)
    if not pending:
        return 0
    done = unsaved = 0
    first_error = None
    stop = threading.Event()
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="judge")
    try:
        futures = {
            pool.submit(_grade_unless_stopped, stop, judge, *judge_inputs(rows[i], task),
                        rows[i][f"{mode}_response"]): (i, mode)
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
                save_rows(path, rows)
                unsaved = 0
    finally:
        # Also on Ctrl-C: no new requests, drop the queued ones, keep every verdict that came back.
        stop.set()
        pool.shutdown(wait=False, cancel_futures=True)
        if unsaved:
            save_rows(path, rows)
    if first_error is not None:
        raise first_error
    return done


# ---------------------------------------------------------------------------------------------------------------------
# Summary


def summarize(rows, task, judge_model=None):
    summary = {"task": task}
    summary.update(metrics.speed_summary(rows))
    summary.update(metrics.answer_metrics(rows, task))
    summary.update(metrics.format_summary(rows))
    scores = metrics.score_summary(rows)
    if scores:
        summary.update(scores)
        if judge_model:
            summary["judge_model"] = judge_model
    return summary


def _fmt(value, digits=3):
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def summary_table(summary):
    """(metric, normal, parallel) rows of the summary, for the printed and the markdown table."""
    table = [
        ("time (s, mean)", _fmt(summary.get("normal_time")), _fmt(summary.get("parallel_time"))),
        ("generated tokens (mean)", _fmt(summary.get("normal_length"), 1), _fmt(summary.get("parallel_length"), 1)),
        ("speed (tokens/s, mean)", _fmt(summary.get("normal_speed"), 2), _fmt(summary.get("parallel_speed"), 2)),
        ("forward passes (mean)", _fmt(summary.get("normal_steps"), 1), _fmt(summary.get("parallel_steps"), 1)),
        ("tokens per forward pass (mean)", _fmt(summary.get("normal_tokens_per_step"), 3),
         _fmt(summary.get("parallel_tokens_per_step"), 3)),
        ("answers capped (rows)", _fmt(summary.get("normal_capped")), _fmt(summary.get("parallel_capped"))),
    ]
    if "normal_accuracy" in summary:
        table.append(("accuracy (exact match)", _fmt(summary["normal_accuracy"]),
                      _fmt(summary["parallel_accuracy"])))
    if "normal_f1" in summary:
        table.append(("token F1", _fmt(summary["normal_f1"]), _fmt(summary["parallel_f1"])))
    if "format_adherence" in summary:
        share = f"{summary['format_adherent_rows']}/{summary['format_rows']}"
        share += f" ({100 * summary['format_adherence']:.1f} %)"
        table.append(("format adherence (closed block)", "-", share))
    if "normal_score" in summary:
        table.append(("judge score (1-5, mean)", _fmt(summary["normal_score"], 2), _fmt(summary["parallel_score"], 2)))
        table.append(("answers judged", _fmt(summary["normal_scored"]), _fmt(summary["parallel_scored"])))
    return table


def _ratio(value):
    """`2.00x`, or n/a when the ratio has no value (only one mode was run, or no row was timed in both)."""
    return "n/a (needs rows timed in both modes)" if value is None else f"{_fmt(value, 2)}x"


def summary_notes(summary):
    notes = [
        f"rows: {summary['rows']} ({summary['speed_rows']} timed, {summary['error_rows']} with an error - "
        f"left out of all means, {summary['fallback_rows']} fell back to normal decoding)",
        f"speedup (mean parallel tokens/s / mean normal tokens/s): {_ratio(summary['speedup'])}",
        f"step ratio (mean parallel / mean normal tokens per forward pass, the speedup if every pass cost the "
        f"same): {_ratio(summary.get('step_ratio'))}",
        f"mean per-row time ratio (normal_time / parallel_time): {_ratio(summary['time_ratio'])}",
    ]
    if summary.get("uncapped_rows") is None:
        notes.append("caps: not recorded in this file (an earlier version or the reference); no uncapped speedup")
    else:
        uncapped = summary["uncapped_speedup"]
        notes.append(f"rows capped in either mode: {summary['capped_rows']}; speedup over the "
                     f"{summary['uncapped_rows']} rows neither mode capped: "
                     f"{'-' if uncapped is None else f'{uncapped:.2f}x'}")
    if summary.get("fallback_reasons"):
        kinds = ", ".join(f"{kind} {count}" for kind, count in summary["fallback_reasons"].items())
        notes.append(f"fallback reasons: {kinds}")
    if "judged_rows" in summary:
        notes.append(f"rows with both answers judged: {summary['judged_rows']}"
                     + (f" (judge: {summary['judge_model']})" if summary.get("judge_model") else ""))
    return notes


def format_text(summary, title):
    table = [("", "normal", "parallel")] + summary_table(summary)
    widths = [max(len(r[c]) for r in table) for c in range(3)]
    lines = [title]
    for r in table:
        lines.append(f"  {r[0]:<{widths[0]}}  {r[1]:>{widths[1]}}  {r[2]:>{widths[2]}}")
    lines += [f"  {note}" for note in summary_notes(summary)]
    return "\n".join(lines) + "\n"


def format_markdown(summary, title):
    lines = [f"# {title}", "", "| metric | normal | parallel |", "|---|---:|---:|"]
    lines += [f"| {r[0]} | {r[1]} | {r[2]} |" for r in summary_table(summary)]
    lines.append("")
    lines += [f"- {note}" for note in summary_notes(summary)]
    return "\n".join(lines) + "\n"


def plot_summary(rows, summary, png_path):
    """Per-row tokens/s for both modes and, when judged, the score distribution per mode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    judged = "normal_score" in summary
    panels = 3 if judged else 2
    fig, axes = plt.subplots(1, panels, figsize=(6 * panels, 4.5), squeeze=False)
    ax = axes[0][0]
    for mode, marker in zip(MODES, ("o", "s")):
        points = [(i, metrics.row_speed(r, mode)) for i, r in enumerate(rows) if is_blank(r.get("error"))]
        points = [(i, s) for i, s in points if s is not None]
        if points:
            ax.plot(*zip(*points), marker=marker, linestyle="-", linewidth=0.8, markersize=4,
                    label=f"{mode} (mean {_fmt(summary.get(f'{mode}_speed'), 1)})")
    ax.set_xlabel("row")
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_ylabel("tokens/s")
    speedup = summary.get("speedup")
    ax.set_title("decoding speed per row" + ("" if speedup is None else f", speedup {_fmt(speedup, 2)}x"))
    ax.grid(alpha=0.3)
    ax.legend()
    ax = axes[0][1]
    timed = [r for r in rows if is_blank(r.get("error"))]
    ratios = {
        f"wall-clock speedup (mean {_fmt(summary.get('speedup'), 2)}x)": [metrics.row_speedup(r) for r in timed],
        f"step ratio (mean {_fmt(summary.get('step_ratio'), 2)}x)": [metrics.row_step_ratio(r) for r in timed],
    }
    for (label, values), marker in zip(ratios.items(), ("o", "s")):
        points = [(i, v) for i, v in enumerate(values) if v is not None]
        if points:
            ax.plot(*zip(*points), marker=marker, linestyle="-", linewidth=0.8, markersize=4, label=label)
    ax.axhline(1.0, color="k", linewidth=0.6, linestyle=":")
    ax.set_xlabel("row")
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_ylabel("parallel / normal")
    ax.set_title("speedup per row: wall clock vs forward passes")
    ax.grid(alpha=0.3)
    ax.legend()
    if judged:
        ax = axes[0][2]
        grid = list(range(metrics.SCORE_MIN, metrics.SCORE_MAX + 1))
        width = 0.4
        for k, mode in enumerate(MODES):
            scores = [metrics.as_number(r.get(f"{mode}_score")) for r in rows if is_blank(r.get("error"))]
            counts = [sum(1 for s in scores if s is not None and round(s) == g) for g in grid]
            ax.bar([g + (k - 0.5) * width for g in grid], counts, width=width,
                   label=f"{mode} (mean {_fmt(summary.get(f'{mode}_score'), 2)})")
        ax.set_xticks(grid)
        ax.yaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.set_xlabel("judge score")
        ax.set_ylabel("answers")
        ax.set_title("judge score distribution")
        ax.legend()
    fig.tight_layout()
    save_figure_atomic(fig, png_path)


def save_figure_atomic(fig, png_path):
    """Save a matplotlib figure as PNG atomically (results.atomic_file), then close it."""
    import matplotlib.pyplot as plt

    try:
        with atomic_file(png_path, "wb") as f:
            fig.savefig(f, format="png", dpi=110)
    finally:
        plt.close(fig)


def output_paths(df_path):
    """<stem>.summary.json, <stem>.summary.md and <stem>.png beside the results file."""
    df_path = pathlib.Path(df_path)
    stem = df_path.with_suffix("") if df_path.suffix else df_path
    return (stem.with_name(stem.name + ".summary.json"), stem.with_name(stem.name + ".summary.md"),
            stem.with_name(stem.name + ".png"))


# ---------------------------------------------------------------------------------------------------------------------
# CLI


def run_report(folder):
    """--report DIR: one row per summary under DIR, printed and written as report.csv, report.md, report.png."""
    try:
        found = report.collect(folder)
    except report.ReportError as error:
        print(f"eval.py: error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    for path, reason in found.skipped:
        print(f"eval.py: warning: skipped {path}: {reason}", file=sys.stderr)
    if not found.rows:
        print(f"eval.py: error: --report {folder}: none of its {len(found.skipped)} summaries could be read",
              file=sys.stderr)
        return EXIT_BAD_INPUT
    print(report.format_text(found.rows), end="")
    csv_path, md_path, png_path = (pathlib.Path(folder) / name for name in report.REPORT_FILES)
    write_text_atomic(csv_path, report.to_csv(found.rows))
    write_text_atomic(md_path, report.format_markdown(found.rows, folder))
    save_figure_atomic(report.plot(found.rows), png_path)
    print(f"wrote {csv_path}, {md_path}, {png_path} ({len(found.rows)} runs)", file=sys.stderr)
    return 0


def main(argv=None):
    args = parse_args(argv)
    if args.report is not None:
        return run_report(args.report)
    api_key = args.api_key or os.environ.get("OPENAI_API_KEY")
    base_url = args.base_url or os.environ.get("OPENAI_BASE_URL") or None
    if not args.no_judge:
        if not api_key:
            print("eval.py: error: the judge needs an API key: pass --api_key or set OPENAI_API_KEY "
                  "(or use --no_judge for speed and judge-free metrics only)", file=sys.stderr)
            return EXIT_BAD_INPUT
        if base_url is not None and not base_url.startswith(("http://", "https://")):
            print("eval.py: error: --base_url / OPENAI_BASE_URL must start with http:// or https://",
                  file=sys.stderr)
            return EXIT_BAD_INPUT
    df_path = pathlib.Path(args.df_path)
    with contextlib.ExitStack() as held:
        try:
            if not args.no_judge and df_path.is_file():  # scores go back into the file: its only writer from the read on
                held.enter_context(ResultsFile(df_path).locked())
            rows, line_numbers = load_rows(df_path)
            validate_rows(rows, line_numbers, df_path, args.task)
        except (InputError, ResultsError) as error:
            print(f"eval.py: error: {error}", file=sys.stderr)
            return EXIT_BAD_INPUT
        evaluated = rows[: args.max_rows] if args.max_rows else rows
        judge_model = None
        if not args.no_judge:
            judge_model = args.model_name
            outcome = judge_and_store(args, api_key, base_url, rows, evaluated, df_path)
            if outcome is not None:
                return outcome

    summary = summarize(evaluated, args.task, judge_model)
    summary["results"] = str(df_path)
    json_path, md_path, png_path = output_paths(df_path)
    title = f"{df_path.name} - {args.task}"
    print(format_text(summary, title), end="")
    write_text_atomic(json_path, json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    write_text_atomic(md_path, format_markdown(summary, title))
    plot_summary(evaluated, summary, png_path)
    print(f"wrote {json_path}, {md_path}, {png_path}", file=sys.stderr)
    return 0


def judge_and_store(args, api_key, base_url, rows, evaluated, df_path):
    """Grade the missing answers of ``evaluated`` and store the verdicts in ``df_path``; an exit code if the run
    cannot go on to the summary, else None."""
    judge = Judge(args.model_name, api_key, base_url, timeout=args.timeout, max_retries=args.max_retries,
                  backoff_base=args.backoff_base, backoff_max=args.backoff_max, max_tokens=args.judge_max_tokens)
    if args.rejudge:
        for row in evaluated:
            for mode in MODES:
                row.pop(f"{mode}_score", None)
                row.pop(f"{mode}_rationale", None)
    todo = len(pending_judgements(evaluated, args.task))
    print(f"judging {todo} answers with {args.model_name} ({len(evaluated) * len(MODES) - todo} already "
          f"judged or not gradable), {args.concurrency} at a time", file=sys.stderr)
    progress = _progress_bar(todo)
    try:
        judge_rows(rows, evaluated, args.task, judge, df_path, args.concurrency, args.save_every, progress)
    except JudgeError as error:
        left = len(pending_judgements(evaluated, args.task))
        print(f"eval.py: error: {judge.scrub(error)}; the verdicts received so far are saved in {df_path}, "
              f"{left} answers still to judge: rerun to continue", file=sys.stderr)
        return EXIT_JUDGE_FAILED
    except KeyboardInterrupt:
        print(f"eval.py: interrupted; the verdicts received so far are saved in {df_path}", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        if progress is not None:
            progress.close()
    return None


def _progress_bar(total):
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc="judge", unit="answer", file=sys.stderr, disable=None)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # outside judging (imports, the summary): the results file was not being written
        print("eval.py: interrupted", file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)
