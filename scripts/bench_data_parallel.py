"""Rows per second of `generate.py --data_parallel` on 2 processes x 1 thread against 1 process x 1 thread.

    python scripts/bench_data_parallel.py --rows 16 --max_new_tokens 96

Runs the two commands back to back from empty output directories (the embedded model by default, both modes) and
prints, for each, rows/s end to end (wall clock of the whole command: interpreter start, model load, warm-up,
decoding) and rows/s of decoding alone (rows over the longest per-process sum of the rows' normal_time +
parallel_time), their ratios, and whether the two results files hold the same answers.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ANSWER_COLUMNS = ("normal_response", "parallel_response", "branches")


def timed(command: list, env: dict) -> float:
    start = time.perf_counter()
    proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"bench_data_parallel: {' '.join(command)} failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    return time.perf_counter() - start


def decode_seconds(rows: list, processes: int) -> float:
    """The longest per-process decoding time: data-parallel rank r decodes rows r, r + N, ... of a fresh run."""
    return max(sum(r["normal_time"] + r["parallel_time"] for r in rows[rank::processes]) for rank in range(processes))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=16)
    p.add_argument("--max_new_tokens", type=int, default=96)
    p.add_argument("--task", default="retrieval")
    p.add_argument("--model_path", default=None, help="default: the embedded model")
    args = p.parse_args(argv)

    env = dict(os.environ, OMP_NUM_THREADS="1")  # torchrun sets 1 per process as well
    common = [
        str(REPO / "generate.py"),
        "--task",
        args.task,
        "--max_samples",
        str(args.rows),
        "--max_new_tokens",
        str(args.max_new_tokens),
    ]
    if args.model_path:
        common += ["--model_path", args.model_path]
    model_name = os.path.basename(os.path.normpath(args.model_path or str(REPO / "models" / "tiny-qwen2-retrieval")))
    with tempfile.TemporaryDirectory() as tmp:
        runs = {
            "1 process x 1 thread": ([sys.executable, *common, "--output_dir", f"{tmp}/one"], 1, f"{tmp}/one"),
            "2 processes x 1 thread (--data_parallel)": (
                [
                    sys.executable,
                    "-m",
                    "torch.distributed.run",
                    "--standalone",
                    "--nproc_per_node",
                    "2",
                    *common,
                    "--data_parallel",
                    "--output_dir",
                    f"{tmp}/two",
                ],
                2,
                f"{tmp}/two",
            ),
        }
        measured = {}
        for name, (command, processes, out_dir) in runs.items():
            wall = timed(command, env)
            (path,) = Path(out_dir, model_name).glob("*.jsonl")
            rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
            measured[name] = (wall, decode_seconds(rows, processes), rows)

    print(f"{args.rows} rows of {args.task}, --max_new_tokens {args.max_new_tokens}, both modes")
    print(f"{'':44} {'rows/s end to end':>18} {'rows/s decoding':>16}")
    for name, (wall, decoding, _) in measured.items():
        print(f"{name:44} {args.rows / wall:18.3f} {args.rows / decoding:16.3f}")
    (one_wall, one_decoding, one_rows), (two_wall, two_decoding, two_rows) = measured.values()
    print(f"{'ratio (2 processes / 1 process)':44} {one_wall / two_wall:17.2f}x {one_decoding / two_decoding:15.2f}x")
    same = [{k: r[k] for k in ANSWER_COLUMNS} for r in one_rows] == [
        {k: r[k] for k in ANSWER_COLUMNS} for r in two_rows
    ]
    print(f"same answers in both results files: {same}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
