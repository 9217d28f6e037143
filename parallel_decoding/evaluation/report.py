"""Runs side by side: every ``<stem>.summary.json`` under a folder as one row of a CSV, a table and a chart.

``eval.py --df_path ...`` writes one summary per results file (``results/<model>/<dataset>.summary.json``);
``eval.py --report results`` reads them all. The model is the summary's folder (relative to the report's folder),
the dataset its file stem.
A field a summary does not have (one written by an earlier version, a planning run without exact match, a run
without a judge) is an empty cell; a summary that does not parse is skipped with a warning.

Pure Python apart from the chart (matplotlib), so the table logic is tested without a model.
"""

import csv
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from ..runs.results import write_text_atomic
from .figures import pyplot, save_png_atomic
from .tables import cell, markdown_page, text_table

SUMMARY_SUFFIX = ".summary.json"
REPORT_FILES = ("report.csv", "report.md", "report.png")

# One CSV column per entry, in this order. Every column but model, dataset and path is the summary field of the same
# name (see docs/eval.md); fields added by later versions (step_ratio, uncapped_speedup, capped_rows) are empty for
# older summaries.
REPORT_COLUMNS = (
    "model",
    "dataset",
    "task",
    "rows",
    "normal_time",
    "parallel_time",
    "normal_length",
    "parallel_length",
    "normal_speed",
    "parallel_speed",
    "speedup",
    "uncapped_speedup",
    "step_ratio",
    "normal_accuracy",
    "parallel_accuracy",
    "normal_f1",
    "parallel_f1",
    "normal_score",
    "parallel_score",
    "format_adherence",
    "fallback_rows",
    "error_rows",
    "capped_rows",
    "path",
)
LOCATION_COLUMNS = ("model", "dataset", "path")
# Summary fields of batched runs (generate.py --batch_size N > 1): CSV columns after step_ratio only when some
# summary has them, so a report of batch-size-1 runs is what it was before they existed.
THROUGHPUT_COLUMNS = ("batch_size", "normal_throughput", "parallel_throughput", "throughput_ratio")

# Columns of the readable table: (header, CSV column(s), digits). Two columns are one "normal / parallel" cell.
TABLE_COLUMNS = (
    ("model", ("model",), None),
    ("dataset", ("dataset",), None),
    ("task", ("task",), None),
    ("rows", ("rows",), None),
    ("time s (n / p)", ("normal_time", "parallel_time"), 3),
    ("tokens (n / p)", ("normal_length", "parallel_length"), 1),
    ("tokens/s (n / p)", ("normal_speed", "parallel_speed"), 1),
    ("speedup", ("speedup",), 2),
    ("uncapped speedup", ("uncapped_speedup",), 2),
    ("step ratio", ("step_ratio",), 2),
    ("batch", ("batch_size",), None),
    ("throughput tokens/s (n / p)", ("normal_throughput", "parallel_throughput"), 1),
    ("throughput ratio", ("throughput_ratio",), 2),
    ("exact match (n / p)", ("normal_accuracy", "parallel_accuracy"), 3),
    ("F1 (n / p)", ("normal_f1", "parallel_f1"), 3),
    ("judge (n / p)", ("normal_score", "parallel_score"), 2),
    ("adherence", ("format_adherence",), 3),
    ("fallback", ("fallback_rows",), None),
    ("errors", ("error_rows",), None),
    ("capped", ("capped_rows",), None),
    ("path", ("path",), None),
)

# Quality compared between the modes in the chart, first one present wins: (label, field suffix, scale to points).
QUALITY_METRICS = (("judge", "score", 1.0), ("exact match", "accuracy", 100.0), ("F1", "f1", 100.0))


class ReportError(Exception):
    """The report cannot be made at all (no folder, no summary in it): one line, exit code 2."""


class SummaryError(Exception):
    """One summary file that cannot be read; it is skipped with a warning."""


@dataclass
class Report:
    rows: list = field(default_factory=list)  # one dict of REPORT_COLUMNS per readable summary
    skipped: list = field(default_factory=list)  # (path, reason) of the summaries that could not be read


def find_summaries(folder) -> list:
    """Every ``*.summary.json`` under ``folder``, recursively, in path order; ReportError if there is none."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ReportError(f"--report {folder}: no such folder")
    paths = sorted(p for p in folder.rglob(f"*{SUMMARY_SUFFIX}") if p.is_file())
    if not paths:
        raise ReportError(
            f"--report {folder}: no *{SUMMARY_SUFFIX} under it; run eval.py --df_path on a results file first"
        )
    return paths


def load_summary(path) -> dict:
    """The summary object in ``path``; SummaryError naming what is wrong with it."""
    try:
        summary = json.loads(Path(path).read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise SummaryError(f"not UTF-8 text ({e.reason})") from None
    except json.JSONDecodeError as e:
        raise SummaryError(f"not valid JSON (line {e.lineno}: {e.msg})") from None
    except OSError as e:
        raise SummaryError(f"cannot read ({e.strerror})") from None
    if not isinstance(summary, dict):
        raise SummaryError(f"expected a JSON object, got {type(summary).__name__}")
    return summary


def _number(value):
    """``value`` if it is a finite int or float, else None. Unlike metrics.as_number, an int stays an int (the CSV
    writes rows as ``4``, not ``4.0``) and a numeric string is not a number: a summary holds JSON numbers."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return value if math.isfinite(value) else None


def model_name(path: Path, folder: Path) -> str:
    """The folder of a summary, relative to the report's folder: ``results/<model>/x.summary.json`` gives the model
    name; deeper trees (one ``--output_dir`` per prompt, say) keep every level, so runs stay apart."""
    relative = path.parent.relative_to(folder)
    return relative.as_posix() if relative.parts else path.parent.resolve().name


def report_row(summary: dict, path, folder) -> dict:
    """The report's row of one summary: model = its folder (:func:`model_name`), dataset = its file stem, missing
    fields None."""
    path, folder = Path(path), Path(folder)
    row = {
        column: summary.get(column) for column in REPORT_COLUMNS + THROUGHPUT_COLUMNS if column not in LOCATION_COLUMNS
    }
    for column, value in row.items():  # a field of an unexpected type is an empty cell, not a crash
        if column != "task" and _number(value) is None:
            row[column] = None
    row["task"] = summary.get("task") if isinstance(summary.get("task"), str) else None
    row.update(model=model_name(path, folder), dataset=path.name[: -len(SUMMARY_SUFFIX)], path=str(path))
    return {column: row[column] for column in REPORT_COLUMNS + THROUGHPUT_COLUMNS}


def csv_columns(rows: list) -> tuple:
    """REPORT_COLUMNS, with THROUGHPUT_COLUMNS after step_ratio when some row has one of them."""
    if not any(row[column] is not None for row in rows for column in THROUGHPUT_COLUMNS):
        return REPORT_COLUMNS
    at = REPORT_COLUMNS.index("step_ratio") + 1
    return REPORT_COLUMNS[:at] + THROUGHPUT_COLUMNS + REPORT_COLUMNS[at:]


def collect(folder) -> Report:
    """Read every summary under ``folder``; unreadable ones go to ``skipped``. ReportError if there is none."""
    report = Report()
    for path in find_summaries(folder):
        try:
            report.rows.append(report_row(load_summary(path), path, folder))
        except SummaryError as e:
            report.skipped.append((path, str(e)))
    return report


def quality_change(row: dict):
    """(metric label, parallel - normal in points) of the first quality metric both modes have, else None."""
    for label, suffix, scale in QUALITY_METRICS:
        normal, parallel = row.get(f"normal_{suffix}"), row.get(f"parallel_{suffix}")
        if normal is not None and parallel is not None:
            return label, (parallel - normal) * scale
    return None


# --- output --------------------------------------------------------------------------------------------------------


def to_csv(rows: list) -> str:
    """One line per row, every column of :func:`csv_columns`; a missing value is an empty cell, numbers in full."""
    columns = csv_columns(rows)
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow(["" if row[c] is None else row[c] for c in columns])
    return out.getvalue()


def table(rows: list, with_path: bool = True) -> tuple:
    """(headers, lines of cells) of the readable table; columns empty in every row are left out."""
    columns = [c for c in TABLE_COLUMNS if with_path or c[0] != "path"]
    columns = [c for c in columns if any(row[name] is not None for row in rows for name in c[1])]
    lines = []
    for row in rows:
        cells = []
        for _, names, digits in columns:
            values = [cell(row[name], digits, missing="") for name in names]
            cells.append(" / ".join(v or "-" for v in values) if len(values) > 1 and any(values) else values[0])
        lines.append(cells)
    return [c[0] for c in columns], lines


def format_text(rows: list) -> str:
    """The table for the terminal (without the path column)."""
    headers, lines = table(rows, with_path=False)
    return "\n".join(text_table(headers, lines, "<" * len(headers))) + "\n"


MARKDOWN_NOTE = (
    "n / p: normal / parallel decoding. speedup: mean parallel tokens/s over mean normal tokens/s; "
    "uncapped speedup: the same over the rows neither mode capped (capped: rows either mode capped). "
    "adherence: share of rows whose parallel answer wrote a closed `####` block. Empty: the summary has "
    "no such figure. See docs/eval.md."
)
THROUGHPUT_NOTE = (
    "batch: generate.py --batch_size; throughput: generated tokens over the wall time of each mode's batch passes "
    "(batched runs only), its ratio parallel over normal."
)


def format_markdown(rows: list, folder) -> str:
    """The table with the path column as Markdown, under a title naming ``folder``, with a note on the columns."""
    headers, lines = table(rows)
    notes = [MARKDOWN_NOTE] + ([THROUGHPUT_NOTE] if len(csv_columns(rows)) > len(REPORT_COLUMNS) else [])
    return markdown_page(f"Runs under {folder}", headers, lines, "<" * len(headers), notes)


def plot(rows: list):
    """A matplotlib figure: speedup per model x dataset (left) next to the quality change parallel - normal (right),
    one bar pair per run on a shared axis."""
    plt = pyplot()
    labels = [f"{row['model']} / {row['dataset']}" for row in rows]
    positions = list(range(len(rows)))[::-1]  # first row on top
    height = max(2.5, 0.45 * len(rows) + 1.2)
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, height), sharey=True)

    speedups = [row["speedup"] if row["speedup"] is not None else 0.0 for row in rows]
    left.barh(positions, speedups, color="tab:blue")
    left.axvline(1.0, color="black", linewidth=0.8)
    for y, value, row in zip(positions, speedups, rows):
        text = "no speedup" if row["speedup"] is None else f"{value:.2f}x"
        left.text(value, y, f" {text}", va="center", fontsize=8)
    left.set_xlim(0.0, max([1.0, *speedups]) * 1.25)  # room for the value labels
    left.set_yticks(positions, labels)
    left.set_xlabel("speedup (parallel tokens/s / normal tokens/s)")
    left.set_title("speedup")
    left.grid(axis="x", alpha=0.3)

    changes = [quality_change(row) for row in rows]
    for y, change in zip(positions, changes):
        if change is None:
            right.text(0.0, y, " no quality metric", va="center", fontsize=8)
            continue
        label, points = change
        right.barh([y], [points], color="tab:green" if points >= 0 else "tab:red")
        unit = "points" if label == "judge" else "pp"
        text = f"{label} {points:+.2f} {unit}"
        right.text(
            points,
            y,
            f" {text}" if points >= 0 else f"{text} ",
            va="center",
            fontsize=8,
            ha="left" if points >= 0 else "right",
        )
    right.axvline(0.0, color="black", linewidth=0.8)
    widest = max([1.0, *(abs(c[1]) for c in changes if c is not None)])
    right.set_xlim(-1.8 * widest, 1.8 * widest)  # symmetric, with room for the labels
    right.set_xlabel("parallel - normal (judge: score points; EM, F1: percentage points)")
    right.set_title("quality change")
    right.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    return fig


def write_report(rows: list, folder) -> tuple:
    """report.csv, report.md and report.png in ``folder``, each written atomically; returns their paths."""
    csv_path, md_path, png_path = (Path(folder) / name for name in REPORT_FILES)
    write_text_atomic(csv_path, to_csv(rows))
    write_text_atomic(md_path, format_markdown(rows, folder))
    save_png_atomic(plot(rows), png_path)
    return csv_path, md_path, png_path
