"""The summary of one evaluated results file: its figures (metrics.py), the table printed and written as Markdown,
the notes under it, and the chart; written beside the results as ``<stem>.summary.json``, ``<stem>.summary.md`` and
``<stem>.png``. docs/eval.md lists the fields."""

import json
import pathlib

from ..runs.results import write_text_atomic
from . import metrics
from .figures import pyplot, save_png_atomic
from .metrics import MODES, is_blank
from .tables import cell, markdown_page, text_table

TABLE_HEADER = ("", "normal", "parallel")
TABLE_ALIGN = "<>>"  # the metric's name left, the numbers right


def summarize(rows, task, judge_model=None, results=None):
    """The summary dict of ``rows``: task, speed, answer metrics, format adherence, judge scores when there are
    some (with ``judge_model`` when this run judged), then ``results`` (the file's path) when given."""
    summary = {"task": task}
    summary.update(metrics.speed_summary(rows))
    summary.update(metrics.throughput_summary(rows))  # batched runs only
    summary.update(metrics.answer_metrics(rows, task))
    summary.update(metrics.format_summary(rows))
    scores = metrics.score_summary(rows)
    if scores:
        summary.update(scores)
        if judge_model:
            summary["judge_model"] = judge_model
    if results is not None:
        summary["results"] = str(results)
    return summary


def summary_table(summary):
    """(metric, normal, parallel) rows of the summary, for the printed and the markdown table."""
    table = [
        ("time (s, mean)", cell(summary.get("normal_time")), cell(summary.get("parallel_time"))),
        ("generated tokens (mean)", cell(summary.get("normal_length"), 1), cell(summary.get("parallel_length"), 1)),
        ("speed (tokens/s, mean)", cell(summary.get("normal_speed"), 2), cell(summary.get("parallel_speed"), 2)),
        *(
            [
                (
                    "throughput (tokens/s, batches)",
                    cell(summary.get("normal_throughput"), 2),
                    cell(summary.get("parallel_throughput"), 2),
                )
            ]
            if "throughput_ratio" in summary
            else []
        ),
        ("forward passes (mean)", cell(summary.get("normal_steps"), 1), cell(summary.get("parallel_steps"), 1)),
        (
            "tokens per forward pass (mean)",
            cell(summary.get("normal_tokens_per_step"), 3),
            cell(summary.get("parallel_tokens_per_step"), 3),
        ),
        ("answers capped (rows)", cell(summary.get("normal_capped")), cell(summary.get("parallel_capped"))),
    ]
    if "normal_accuracy" in summary:
        table.append(("accuracy (exact match)", cell(summary["normal_accuracy"]), cell(summary["parallel_accuracy"])))
    if "normal_f1" in summary:
        table.append(("token F1", cell(summary["normal_f1"]), cell(summary["parallel_f1"])))
    if "format_adherence" in summary:
        share = f"{summary['format_adherent_rows']}/{summary['format_rows']}"
        share += f" ({100 * summary['format_adherence']:.1f} %)"
        table.append(("format adherence (closed block)", "-", share))
    if "normal_score" in summary:
        table.append(("judge score (1-5, mean)", cell(summary["normal_score"], 2), cell(summary["parallel_score"], 2)))
        table.append(("answers judged", cell(summary["normal_scored"]), cell(summary["parallel_scored"])))
    return table


def _ratio(value):
    """`2.00x`, or n/a when the ratio has no value (only one mode was run, or no row was timed in both)."""
    return "n/a (needs rows timed in both modes)" if value is None else f"{cell(value, 2)}x"


def summary_notes(summary):
    """The lines under the table: row counts, the speed ratios, caps, fallback reasons, judged rows."""
    notes = [
        f"rows: {summary['rows']} ({summary['speed_rows']} timed, {summary['error_rows']} with an error - "
        f"left out of all means, {summary['fallback_rows']} fell back to normal decoding)",
        f"speedup (mean parallel tokens/s / mean normal tokens/s): {_ratio(summary['speedup'])}",
        f"step ratio (mean parallel / mean normal tokens per forward pass, the speedup if every pass cost the "
        f"same): {_ratio(summary.get('step_ratio'))}",
        f"mean per-row time ratio (normal_time / parallel_time): {_ratio(summary['time_ratio'])}",
    ]
    if "throughput_ratio" in summary:
        size = summary.get("batch_size")
        notes.append(
            f"throughput ratio (parallel / normal generated tokens per second of batch-pass wall time, over "
            f"{summary['batches']} batches{'' if size is None else f' of up to {size} rows'}): "
            f"{_ratio(summary['throughput_ratio'])}"
        )
    if summary.get("uncapped_rows") is None:
        notes.append("caps: not recorded in this file (an earlier version or the reference); no uncapped speedup")
    else:
        uncapped = summary["uncapped_speedup"]
        notes.append(
            f"rows capped in either mode: {summary['capped_rows']}; speedup over the "
            f"{summary['uncapped_rows']} rows neither mode capped: "
            f"{'-' if uncapped is None else f'{uncapped:.2f}x'}"
        )
    if summary.get("fallback_reasons"):
        kinds = ", ".join(f"{kind} {count}" for kind, count in summary["fallback_reasons"].items())
        notes.append(f"fallback reasons: {kinds}")
    if "judged_rows" in summary:
        notes.append(
            f"rows with both answers judged: {summary['judged_rows']}"
            + (f" (judge: {summary['judge_model']})" if summary.get("judge_model") else "")
        )
    return notes


def format_text(summary, title):
    """The summary for the terminal: the title, the table and the notes, indented by two spaces."""
    lines = [title, *text_table(TABLE_HEADER, summary_table(summary), TABLE_ALIGN, indent="  ")]
    lines += [f"  {note}" for note in summary_notes(summary)]
    return "\n".join(lines) + "\n"


def format_markdown(summary, title):
    """The summary as Markdown: the same table, the notes as a list."""
    header = ("metric",) + TABLE_HEADER[1:]
    notes = [f"- {note}" for note in summary_notes(summary)]
    return markdown_page(title, header, summary_table(summary), TABLE_ALIGN, notes)


# --- the chart: one panel per figure, side by side ---------------------------------------------------------------


def _per_row_axis(ax, ylabel, title):
    import matplotlib.ticker

    ax.set_xlabel("row")
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()


def _speed_panel(ax, rows, summary):
    """Tokens/s of each mode, per row without an error."""
    for mode, marker in zip(MODES, ("o", "s")):
        points = [(i, metrics.row_speed(r, mode)) for i, r in enumerate(rows) if is_blank(r.get("error"))]
        points = [(i, s) for i, s in points if s is not None]
        if points:
            ax.plot(
                *zip(*points),
                marker=marker,
                linestyle="-",
                linewidth=0.8,
                markersize=4,
                label=f"{mode} (mean {cell(summary.get(f'{mode}_speed'), 1)})",
            )
    speedup = summary.get("speedup")
    title = "decoding speed per row" + ("" if speedup is None else f", speedup {cell(speedup, 2)}x")
    _per_row_axis(ax, "tokens/s", title)


def _ratio_panel(ax, rows, summary):
    """Per-row wall-clock speedup next to the step ratio (its bound if every forward pass cost the same)."""
    timed = [r for r in rows if is_blank(r.get("error"))]
    ratios = {
        f"wall-clock speedup (mean {cell(summary.get('speedup'), 2)}x)": [metrics.row_speedup(r) for r in timed],
        f"step ratio (mean {cell(summary.get('step_ratio'), 2)}x)": [metrics.row_step_ratio(r) for r in timed],
    }
    for (label, values), marker in zip(ratios.items(), ("o", "s")):
        points = [(i, v) for i, v in enumerate(values) if v is not None]
        if points:
            ax.plot(*zip(*points), marker=marker, linestyle="-", linewidth=0.8, markersize=4, label=label)
    ax.axhline(1.0, color="k", linewidth=0.6, linestyle=":")
    _per_row_axis(ax, "parallel / normal", "speedup per row: wall clock vs forward passes")


def _score_panel(ax, rows, summary):
    """How many answers of each mode got each judge score."""
    import matplotlib.ticker

    grid = list(range(metrics.SCORE_MIN, metrics.SCORE_MAX + 1))
    width = 0.4
    for k, mode in enumerate(MODES):
        scores = [metrics.as_number(r.get(f"{mode}_score")) for r in rows if is_blank(r.get("error"))]
        counts = [sum(1 for s in scores if s is not None and round(s) == g) for g in grid]
        ax.bar(
            [g + (k - 0.5) * width for g in grid],
            counts,
            width=width,
            label=f"{mode} (mean {cell(summary.get(f'{mode}_score'), 2)})",
        )
    ax.set_xticks(grid)
    ax.yaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_xlabel("judge score")
    ax.set_ylabel("answers")
    ax.set_title("judge score distribution")
    ax.legend()


def plot_summary(rows, summary, png_path):
    """Per-row tokens/s of both modes, per-row speedup and step ratio and, when judged, the score distribution per
    mode; written to ``png_path`` atomically."""
    panels = [_speed_panel, _ratio_panel] + ([_score_panel] if "normal_score" in summary else [])
    fig, axes = pyplot().subplots(1, len(panels), figsize=(6 * len(panels), 4.5), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        panel(ax, rows, summary)
    fig.tight_layout()
    save_png_atomic(fig, png_path)


def output_paths(df_path):
    """<stem>.summary.json, <stem>.summary.md and <stem>.png beside the results file."""
    df_path = pathlib.Path(df_path)
    stem = df_path.with_suffix("") if df_path.suffix else df_path
    return (
        stem.with_name(stem.name + ".summary.json"),
        stem.with_name(stem.name + ".summary.md"),
        stem.with_name(stem.name + ".png"),
    )


def write_outputs(rows, summary, df_path, title):
    """Write the summary beside the results file (JSON, Markdown, chart), each atomically; returns their paths."""
    json_path, md_path, png_path = output_paths(df_path)
    write_text_atomic(json_path, json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    write_text_atomic(md_path, format_markdown(summary, title))
    plot_summary(rows, summary, png_path)
    return json_path, md_path, png_path
