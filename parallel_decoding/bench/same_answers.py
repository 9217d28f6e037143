"""Do two results files of ``generate.py`` hold the same answers? Row by row, per mode, and parallel against normal.

    python -m parallel_decoding.bench.same_answers REFERENCE.jsonl CANDIDATE.jsonl

``scripts/gpu_check.sh`` runs the Quick start on the GPU twice, on the eager path and on the compiled one (float32),
and holds the compiled answers to the eager ones with this: the tests hold the two paths equal on a CPU, and this
is the same check where only a GPU runs the code (CUDA graphs, FlexAttention's Triton kernels). Exit status 0 when
every row's answers are equal in both modes, 1 otherwise, 2 for files that cannot be compared.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

MODES = ("normal", "parallel")


def read_rows(path: Path) -> list[dict]:
    """The rows of a results file (one JSON object per line)."""
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def compare(reference: list[dict], candidate: list[dict]) -> dict[str, int]:
    """Counts of rows whose answers are equal: per mode between the files, and parallel == normal in each file."""
    if len(reference) != len(candidate):
        raise ValueError(f"the files hold {len(reference)} and {len(candidate)} rows")
    counts = {
        mode: sum(r[f"{mode}_response"] == c[f"{mode}_response"] for r, c in zip(reference, candidate))
        for mode in MODES
    }
    counts["reference parallel == normal"] = sum(r["parallel_response"] == r["normal_response"] for r in reference)
    counts["candidate parallel == normal"] = sum(c["parallel_response"] == c["normal_response"] for c in candidate)
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m parallel_decoding.bench.same_answers", description=__doc__)
    parser.add_argument("reference", type=Path)
    parser.add_argument("candidate", type=Path)
    args = parser.parse_args(argv)
    try:
        reference, candidate = read_rows(args.reference), read_rows(args.candidate)
        counts = compare(reference, candidate)
    except (OSError, ValueError, KeyError) as e:
        print(f"same_answers: cannot compare {args.reference} and {args.candidate}: {e}", file=sys.stderr)
        return 2
    rows = len(reference)
    for name, count in counts.items():
        label = f"{name} answers equal to the reference's" if name in MODES else name
        print(f"{label}: {count}/{rows}")
    return 0 if all(counts[mode] == rows for mode in MODES) else 1


if __name__ == "__main__":
    sys.exit(main())
