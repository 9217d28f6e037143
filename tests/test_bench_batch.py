"""The batch benchmark: its synthetic requests against a plain reference, and its table on a tiny model and on the
embedded one (the columns, counts and answers; not the speed)."""

from __future__ import annotations

import json

import pytest
import torch
from reference import decode_branches_one_by_one

from parallel_decoding.bench import batch as bench_batch
from parallel_decoding.bench.branch_stage import random_model
from parallel_decoding.bench.synthetic import SyntheticAnswer, SyntheticShape
from parallel_decoding.decoding.eager import EagerDecoder
from parallel_decoding.engine.batch import Engine, request_outcome

SHAPE = SyntheticShape(skeleton_tokens=3, branches=3, branch_tokens=4, conclusion_tokens=2)


def greedy_continue(decoder, token_ids: list[int], count: int) -> list[int]:
    """``count`` greedy tokens after ``token_ids``, one pass each."""
    tokens = [int(decoder.forward(token_ids, greedy=True)[-1])]
    while len(tokens) < count:
        tokens.append(int(decoder.forward([tokens[-1]], greedy=True)[0]))
    return tokens


@pytest.fixture(scope="module")
def tiny():
    return random_model("tiny", torch.device("cpu"), torch.float32, "sdpa", seed=0).eval()


@torch.inference_mode()
def test_synthetic_answers_equal_the_plain_reference_in_a_mixed_batch(tiny):
    generator = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 512, (n,), generator=generator).tolist() for n in (9, 17, 12, 20)]
    titles = [torch.randint(0, 512, (SHAPE.branches,), generator=generator).tolist() for _ in prompts]
    modes = [True, False, True, False]
    engine = Engine(tiny, None, max_batch_size=3, kv_capacity=3 * 60, compile=False)
    requests = [
        engine.scheduler.submit(SyntheticAnswer(p, parallel, SHAPE, t))
        for p, parallel, t in zip(prompts, modes, titles)
    ]
    while not engine.idle:
        engine.step()
    answers = [request_outcome(r) for r in requests]

    decoder = EagerDecoder(tiny)
    for prompt, parallel, title, answer in zip(prompts, modes, titles, answers):
        decoder.reset()
        if parallel:
            decoder.forward(prompt)
            branches = decode_branches_one_by_one(decoder, len(prompt), [[t] for t in title], SHAPE.branch_tokens)
            merged = [t for head, tokens in zip(title, branches) for t in [head, *tokens]]
            decoder.crop(len(prompt))
            expected = merged + greedy_continue(decoder, merged, SHAPE.conclusion_tokens)
        else:
            expected = greedy_continue(decoder, prompt, SHAPE.answer_tokens)
        assert answer["response"] == expected
        assert answer["length"] == SHAPE.answer_tokens == 3 * (1 + 4) + 2 and answer["time"] > 0


def test_synthetic_answer_sizes_are_checked():
    with pytest.raises(ValueError, match="every size of a synthetic answer must be >= 1"):
        SyntheticShape(branches=0)
    assert SyntheticAnswer([1] * 10, True, SHAPE, [5, 6, 7]).slots_needed == 10 + SHAPE.answer_tokens


def run_bench(capsys, argv) -> tuple[dict, str, str]:
    assert bench_batch.main(argv) == 0
    captured = capsys.readouterr()
    lines = captured.out.strip().splitlines()
    return json.loads(lines[-1]), "\n".join(lines[:-1]), captured.err


def test_synthetic_table_on_a_tiny_model(capsys):
    result, table, err = run_bench(
        capsys,
        [
            "--config",
            "tiny",
            "--requests",
            "5",
            "--prompt_len",
            "20",
            "--skeleton_tokens",
            "3",
            "--branches",
            "3",
            "--branch_tokens",
            "4",
            "--conclusion_tokens",
            "2",
            "--batch_sizes",
            "1",
            "3",
            "--repeats",
            "2",
            "--num_threads",
            "1",
        ],
    )
    settings = result["settings"]
    assert [(s["batch_size"], s["mode"]) for s in settings] == [
        (1, "normal"),
        (1, "parallel"),
        (3, "normal"),
        (3, "parallel"),
    ]
    for s in settings:
        assert s["tokens"] == 5 * 17 and s["same_answers_as_first"] == 5  # float32: the same answers at any batch size
        assert len(s["tokens_per_s_repeats"]) == 2 and s["tokens_per_s"] == min(s["tokens_per_s_repeats"])
        assert s["capacity"] == 3 * (20 + 17) and s["p99_s"] >= s["p50_s"] > 0
    by = {(s["batch_size"], s["mode"]): s for s in settings}
    assert by[1, "normal"]["passes"] == 5 * 17  # one token per pass
    assert by[1, "parallel"]["passes"] == 5 * (
        3 + 4 + 2
    )  # skeleton, branch steps (titles prefilled), merge + conclusion
    assert by[3, "normal"]["passes"] < by[1, "normal"]["passes"]
    assert by[1, "normal"]["speedup_vs_first"] == 1.0
    assert set(result["parallel_over_normal"]) == {"1", "3"}  # JSON keys
    assert "median of 2 interleaved repeats" in table and "5 synthetic requests of 20 prompt tokens" in table
    assert table.splitlines()[1].split() == [
        "batch",
        "mode",
        "tokens/s",
        "vs",
        "first",
        "p50",
        "s",
        "p99",
        "s",
        "passes",
        "same",
        "answers",
    ]
    progress = [line for line in err.splitlines() if line.startswith("repeat ")]
    assert len(progress) == 8 and progress[0].startswith("repeat 1, batch 1, normal: ")
    assert progress[4].startswith("repeat 2, batch 1, parallel: ")  # the modes alternate from one repeat to the next


def test_task_table_on_the_embedded_model(capsys):
    result, table, _ = run_bench(
        capsys,
        [
            "--max_samples",
            "3",
            "--max_new_tokens",
            "48",
            "--batch_sizes",
            "1",
            "2",
            "--repeats",
            "1",
            "--num_threads",
            "1",
        ],
    )
    assert result["requests"] == 3 and result["model"] == "models/tiny-qwen2-retrieval"
    assert all(s["same_answers_as_first"] == 3 and s["tokens"] > 0 for s in result["settings"])
    assert "3 rows, max_new_tokens 48" in table


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--repeats", "0"], "--batch_sizes and --repeats must be >= 1"),
        (["--config", "tiny", "--branches", "0"], "every size of a synthetic answer must be >= 1"),
        (["--config", "tiny", "--requests", "0"], "--requests and --prompt_len must be >= 1"),
        (["--data_path", "missing.jsonl"], "cannot read dataset missing.jsonl"),
        (["--model_path", "no/such/model", "--max_samples", "1"], "--model_path no/such/model: not a directory"),
    ],
)
def test_bad_settings_are_one_line(capsys, argv, message):
    assert bench_batch.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("bench.batch: error: ") and message in err and len(err.splitlines()) == 1


def test_engine_batch_size_can_change_between_admissions(tiny):
    engine = Engine(tiny, None, max_batch_size=4, kv_capacity=64, compile=False)
    engine.max_batch_size = 1
    assert engine.max_batch_size == 1 and engine.scheduler.max_batch_size == 1
    with pytest.raises(ValueError, match="max_batch_size must be >= 1, got 0"):
        engine.max_batch_size = 0


def test_compiled_synthetic_table_as_gpu_check_runs_it(capsys):
    """The GPU script's batch call (compiled, two widths) at the tiny shape: every answer the same at every batch
    size, the compiled passes included (a pass of the prefills runs at its exact size)."""
    result, _, _ = run_bench(
        capsys,
        [
            "--config",
            "tiny",
            "--compile",
            "on",
            "--buckets",
            "4",
            "16",
            "--requests",
            "3",
            "--prompt_len",
            "24",
            "--skeleton_tokens",
            "2",
            "--branches",
            "4",
            "--branch_tokens",
            "3",
            "--conclusion_tokens",
            "2",
            "--batch_sizes",
            "1",
            "3",
            "--repeats",
            "1",
            "--num_threads",
            "1",
        ],
    )
    assert result["compile"] == "on"
    assert all(s["same_answers_as_first"] == 3 and s["tokens"] == 3 * (4 * 4 + 2) for s in result["settings"])
