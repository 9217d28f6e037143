"""Validate the hand-written planning tasks and write them as jsonl (fields ``task``, ``answer`` plus metadata).

The tasks live in ``planning_tasks_en.py`` and ``planning_tasks_zh.py`` (written by hand for this project); this
script checks them and writes ``data/planning.jsonl``:

    python -m parallel_decoding.tasks.planning --output data/planning.jsonl
"""

import argparse
import sys

from .planning_tasks_en import PLANNING_TASKS_EN
from .planning_tasks_zh import PLANNING_TASKS_ZH
from .retrieval import write_jsonl

MIN_DIMENSIONS = 3


def _rows(tasks: list, language: str) -> list:
    rows = []
    for task_id, task, dimensions, answer in tasks:
        rows.append(
            {
                "task": task,
                "answer": answer,
                "language": language,
                "dimensions": dimensions,
                "_id": f"planning-{language}-{task_id}",
            }
        )
    return rows


def validate_planning_rows(rows: list) -> None:
    """Every task names at least MIN_DIMENSIONS dimensions and its answer covers each of them plus a synthesis."""
    ids = [r["_id"] for r in rows]
    duplicates = {i for i in ids if ids.count(i) > 1}
    if duplicates:
        raise ValueError(f"duplicate planning ids: {sorted(duplicates)}")
    for row in rows:
        if len(row["dimensions"]) < MIN_DIMENSIONS:
            raise ValueError(f"{row['_id']}: needs at least {MIN_DIMENSIONS} dimensions")
        synthesis = "综合：" if row["language"] == "zh" else "Synthesis:"
        colon = "：" if row["language"] == "zh" else ":"
        for heading in [f"{d}{colon}" for d in row["dimensions"]] + [synthesis]:
            if heading not in row["answer"]:
                raise ValueError(f"{row['_id']}: the reference answer has no paragraph {heading!r}")


def make_planning_rows() -> list:
    rows = _rows(PLANNING_TASKS_EN, "en") + _rows(PLANNING_TASKS_ZH, "zh")
    validate_planning_rows(rows)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", required=True, help="jsonl file to write (e.g. data/planning.jsonl)")
    args = parser.parse_args(argv)
    try:
        rows = make_planning_rows()
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    write_jsonl(rows, args.output)
    print(f"wrote {len(rows)} planning tasks to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
