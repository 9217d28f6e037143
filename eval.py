"""Evaluate a results file of normal vs parallel decoding: speed, judge-free metrics, and an LLM judge.

    python eval.py --df_path results/<model>/<data>.jsonl --task retrieval --api_key $KEY --model_name gpt-4o
    python eval.py --df_path results/<model>/<data>.jsonl --task planning --no_judge
    python eval.py --report results          # every <stem>.summary.json under results/, side by side

Reads rows written by generate.py or by the reference implementation, stores judge scores back into the results
file (atomic rewrite; a rerun only asks for what is missing), prints a summary table and writes
``<stem>.summary.json``, ``<stem>.summary.md`` and ``<stem>.png`` beside the results. ``--report DIR`` reads those
summaries and writes ``report.csv``, ``report.md`` and ``report.png`` in DIR. See docs/eval.md.
"""

import contextlib
import os
import pathlib
import sys

try:  # the project and the judge's client (openai) load here: a Ctrl-C now ends the run in one line, not a traceback
    from parallel_decoding.cli import EXIT_BAD_INPUT, EXIT_INTERRUPTED, OneLineArgumentParser, UsageError
    from parallel_decoding.evaluation import report
    from parallel_decoding.evaluation.judge import Judge, JudgeError
    from parallel_decoding.evaluation.judging import judge_and_store, pending_judgements
    from parallel_decoding.evaluation.rows import TASK_FIELDS, InputError, load_results
    from parallel_decoding.evaluation.summary import format_text, summarize, write_outputs
    from parallel_decoding.runs.results import ResultsError, ResultsFile
except KeyboardInterrupt:
    print("eval.py: interrupted while loading", file=sys.stderr)
    sys.exit(130)

EXIT_JUDGE_FAILED = 1


def bad_input(message):
    """Report bad input as one line on stderr; returns the exit code for it."""
    print(f"eval.py: error: {message}", file=sys.stderr)
    return EXIT_BAD_INPUT


def log(message):
    print(message, file=sys.stderr)


# ---------------------------------------------------------------------------------------------------------------------
# Flags


def build_parser():
    p = OneLineArgumentParser(prog="eval.py", description=__doc__.split("\n")[0])
    p.add_argument("--df_path", help="results file (jsonl) from generate.py or the reference")
    p.add_argument("--task", choices=sorted(TASK_FIELDS))
    p.add_argument(
        "--report",
        nargs="?",
        const="results",
        default=None,
        metavar="DIR",
        help="compare evaluated runs: read every *.summary.json under DIR (default: results) and write "
        "report.csv, report.md and report.png there",
    )
    p.add_argument("--api_key", default=None, help="judge API key (default: env OPENAI_API_KEY)")
    p.add_argument(
        "--base_url",
        default=None,
        help="OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1 (default: env OPENAI_BASE_URL, "
        "else api.openai.com)",
    )
    p.add_argument("--model_name", default="gpt-4o", help="judge model name")
    p.add_argument("--no_judge", action="store_true", help="speed and judge-free metrics only; no network")
    p.add_argument("--rejudge", action="store_true", help="discard stored judge scores of the evaluated rows")
    p.add_argument("--concurrency", type=int, default=8, help="judge requests in flight at once")
    p.add_argument("--max_rows", type=int, default=None, help="evaluate only the first N rows")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds per judge request")
    p.add_argument(
        "--max_retries",
        type=int,
        default=5,
        help="extra attempts per judge request on HTTP 429/5xx, timeouts and dropped connections",
    )
    p.add_argument(
        "--backoff_base",
        type=float,
        default=1.0,
        help="first retry waits this many seconds, doubling on each further retry",
    )
    p.add_argument("--backoff_max", type=float, default=60.0, help="longest wait between retries (s)")
    p.add_argument("--judge_max_tokens", type=int, default=512, help="max tokens of one verdict")
    p.add_argument("--save_every", type=int, default=8, help="rewrite the results file after this many new judgements")
    return p


def check_args(args):
    """``args`` if the flags fit together and their values are in range, else UsageError."""
    if args.report is not None:
        if args.df_path is not None or args.task is not None:
            raise UsageError("--report reads the summaries of evaluated runs; it takes no --df_path or --task")
    else:
        missing = [f"--{flag}" for flag in ("df_path", "task") if getattr(args, flag) is None]
        if missing:
            raise UsageError(f"the following arguments are required: {', '.join(missing)}")
    for flag in ("concurrency", "max_rows", "judge_max_tokens", "save_every"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise UsageError(f"--{flag} must be >= 1, got {value}")
    if args.timeout <= 0:
        raise UsageError("--timeout must be > 0")
    for flag in ("max_retries", "backoff_base", "backoff_max"):
        if getattr(args, flag) < 0:
            raise UsageError(f"--{flag} must be >= 0")
    return args


def parse_args(argv=None):
    """The flags. A bad one ends the run as argparse does (SystemExit, status 2), in one line without the usage."""
    try:
        return check_args(build_parser().parse_args(argv))
    except UsageError as error:
        bad_input(error)
        raise SystemExit(EXIT_BAD_INPUT) from None


def judge_endpoint(args):
    """(API key, base URL or None) of the judge; UsageError without a key, or for a base URL that is not http(s)."""
    api_key = args.api_key or os.environ.get("OPENAI_API_KEY")
    base_url = args.base_url or os.environ.get("OPENAI_BASE_URL") or None
    if not api_key:
        raise UsageError(
            "the judge needs an API key: pass --api_key or set OPENAI_API_KEY "
            "(or use --no_judge for speed and judge-free metrics only)"
        )
    if base_url is not None and not base_url.startswith(("http://", "https://")):
        raise UsageError("--base_url / OPENAI_BASE_URL must start with http:// or https://")
    return api_key, base_url


# ---------------------------------------------------------------------------------------------------------------------
# Commands


def run_report(folder):
    """--report DIR: one row per summary under DIR, printed and written as report.csv, report.md, report.png."""
    try:
        found = report.collect(folder)
    except report.ReportError as error:
        return bad_input(error)
    for path, reason in found.skipped:
        log(f"eval.py: warning: skipped {path}: {reason}")
    if not found.rows:
        return bad_input(f"--report {folder}: none of its {len(found.skipped)} summaries could be read")
    print(report.format_text(found.rows), end="")
    paths = report.write_report(found.rows, folder)
    log(f"wrote {', '.join(map(str, paths))} ({len(found.rows)} runs)")
    return 0


def judge_run(args, endpoint, rows, evaluated, df_path):
    """Grade the missing answers of ``evaluated`` and store the verdicts in ``df_path``; an exit code if the run
    cannot go on to the summary, else None."""
    api_key, base_url = endpoint
    judge = Judge(
        args.model_name,
        api_key,
        base_url,
        timeout=args.timeout,
        max_retries=args.max_retries,
        backoff_base=args.backoff_base,
        backoff_max=args.backoff_max,
        max_tokens=args.judge_max_tokens,
    )
    try:
        judge_and_store(
            rows,
            evaluated,
            args.task,
            judge,
            df_path,
            concurrency=args.concurrency,
            save_every=args.save_every,
            rejudge=args.rejudge,
            log=log,
        )
    except JudgeError as error:
        left = len(pending_judgements(evaluated))
        log(
            f"eval.py: error: {judge.scrub(error)}; the verdicts received so far are saved in {df_path}, "
            f"{left} answers still to judge: rerun to continue"
        )
        return EXIT_JUDGE_FAILED
    except KeyboardInterrupt:
        log(f"eval.py: interrupted; the verdicts received so far are saved in {df_path}")
        return EXIT_INTERRUPTED
    return None


def main(argv=None):
    args = parse_args(argv)
    if args.report is not None:
        return run_report(args.report)
    try:
        endpoint = None if args.no_judge else judge_endpoint(args)
    except UsageError as error:
        return bad_input(error)
    df_path = pathlib.Path(args.df_path)
    with contextlib.ExitStack() as held:
        try:
            if endpoint and df_path.is_file():  # scores go back into the file: its only writer from the read on
                held.enter_context(ResultsFile(df_path).locked())
            rows = load_results(df_path, args.task)
        except (InputError, ResultsError) as error:
            return bad_input(error)
        evaluated = rows[: args.max_rows] if args.max_rows else rows
        if endpoint:
            outcome = judge_run(args, endpoint, rows, evaluated, df_path)
            if outcome is not None:
                return outcome

    summary = summarize(evaluated, args.task, None if args.no_judge else args.model_name, results=df_path)
    title = f"{df_path.name} - {args.task}"
    print(format_text(summary, title), end="")
    log(f"wrote {', '.join(map(str, write_outputs(evaluated, summary, df_path, title)))}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # outside judging (imports, the summary): the results file was not being written
        print("eval.py: interrupted", file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)
