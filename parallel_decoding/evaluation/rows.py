"""The rows eval.py reads: a results file of generate.py or of the reference implementation, checked for the columns
the task and the metrics need, and what the judge is shown of a row."""

import pathlib

from ..runs.results import ResultsError, read_numbered_rows
from .metrics import MODES

# task -> (column shown to the judge as the question, column holding the reference answer)
TASK_FIELDS = {
    "retrieval": ("prompt", "gold_keys"),
    "multi-document-qa": ("input", "answers"),
    "planning": ("task", "answer"),
}
RESULT_FIELDS = ("response", "time", "length")  # per mode: <mode>_response, <mode>_time, <mode>_length


class InputError(Exception):
    """Bad input: reported as one line on stderr with exit code 2, before anything is written."""


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
            raise InputError(f"{path}:{line_number}: missing column(s) {', '.join(missing)} needed by --task {task}")
    columns = set().union(*rows)
    complete_modes = []
    for mode in MODES:
        wanted = [f"{mode}_{field}" for field in RESULT_FIELDS]
        missing = [c for c in wanted if c not in columns]
        if len(missing) == len(wanted):  # a mode the run did not decode (generate.py --modes)
            continue
        if missing:
            raise InputError(f"{path}: missing column(s) {', '.join(missing)}")
        complete_modes.append(mode)
    if not complete_modes:
        wanted = [f"{m}_{f}" for m in MODES for f in RESULT_FIELDS]
        raise InputError(f"{path}: missing column(s) {', '.join(wanted)}; is this a results file?")


def load_results(path, task):
    """Every row of the results file ``path``, in file order, checked for ``task`` (:func:`validate_rows`)."""
    rows, line_numbers = load_rows(path)
    validate_rows(rows, line_numbers, path, task)
    return rows


def _as_text(value, separator):
    if isinstance(value, (list, tuple)):
        return separator.join(str(v) for v in value)
    return "" if value is None else str(value)


def judge_inputs(row, task):
    """(question, reference answer) shown to the judge for one row; a list of references is joined with " / "."""
    question_col, reference_col = TASK_FIELDS[task]
    return _as_text(row.get(question_col), "\n"), _as_text(row.get(reference_col), " / ")
