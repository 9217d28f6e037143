"""generate.py --batch_size N: the pending rows N at a time on one batch engine, with the answers of --batch_size 1.

The embedded model (it writes branches) on a few retrieval rows, eager passes (--compile auto is off on a CPU). One
batch-1 run and one batch-3 run are shared by the module; the other cases are short or refused before decoding.
"""

import contextlib
import io
import json
import re
from pathlib import Path

import pytest

import eval as eval_cli
import generate
from parallel_decoding.engine.batch import kv_capacity_for
from parallel_decoding.runs import batching, comparison, loading
from parallel_decoding.runs.settings import run_settings
from parallel_decoding.runs.throughput import batch_passes, next_batch_id, throughput

MODEL = generate.DEFAULT_MODEL_PATH
ROWS, BATCH, MAX_NEW_TOKENS = 4, 3, 64  # batches [0, 1, 2] and [3]; the toy's answers here take 62 tokens
ANSWER_COLUMNS = (
    "full_prompt",
    "normal_response",
    "parallel_response",
    "num_parallel_branches",
    "branches",
    "stage1_response",
    "normal_length",
    "parallel_length",
    "fallback",
    "normal_caps",
    "parallel_caps",
    "normal_steps",
    "parallel_steps",
    "error",
)
BATCH_COLUMNS = ("batch", "normal_batch_time", "normal_batch_tokens", "parallel_batch_time", "parallel_batch_tokens")

pytestmark = pytest.mark.skipif(not MODEL.is_dir(), reason=f"the embedded model {MODEL} is not in this checkout")


def _read(path: Path) -> list:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _argv(out_dir, *extra, rows=ROWS):
    return [
        "--task",
        "retrieval",
        "--max_samples",
        str(rows),
        "--max_new_tokens",
        str(MAX_NEW_TOKENS),
        "--output_dir",
        str(out_dir),
        *extra,
    ]


def _main(argv) -> tuple:
    """generate.main's exit status and its stderr (log lines and the progress bar)."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        status = generate.main(argv)
    return status, err.getvalue()


def _out(out_dir) -> Path:
    return Path(out_dir) / MODEL.name / "retrieval_4.jsonl"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{batch size: (rows, stderr)} of the same rows at batch size 1 and 3."""
    found = {}
    for size in (1, BATCH):
        out = tmp_path_factory.mktemp(f"batch{size}")
        status, err = _main(_argv(out, "--batch_size", str(size)))
        assert status == 0, err
        found[size] = (_read(_out(out)), err, out)
    return found


def _answers(rows):
    return [{column: row[column] for column in ANSWER_COLUMNS} for row in rows]


def test_batch_3_gives_the_answers_of_batch_1(runs):
    (single, _, _), (batched, err, _) = runs[1], runs[BATCH]
    assert _answers(batched) == _answers(single)
    assert all(row["num_parallel_branches"] == 4 and row["error"] is None for row in batched)  # the toy branches
    assert [row["settings"]["batch_size"] for row in batched] == [BATCH] * ROWS
    assert {k: v for k, v in batched[0]["settings"].items() if k != "batch_size"} == {
        k: v for k, v in single[0]["settings"].items() if k != "batch_size"
    }
    assert all(list(row)[-len(comparison.RESULT_COLUMNS) :] == list(comparison.RESULT_COLUMNS) for row in batched)
    assert all(row[column] is None for row in single for column in BATCH_COLUMNS)  # batch size 1: no batch
    # the modes alternate per batch: batch 0 runs normal first, batch 1 parallel first
    assert [row["first_mode"] for row in batched] == ["normal"] * BATCH + ["parallel"]
    assert "batch engine: up to 3 rows in flight per mode; KV arena of " in err and "compile: off" in err


def test_sampled_rows_draw_from_their_own_streams_at_any_batch_size(tmp_path):
    """With --do_sample each row and mode samples from mode_generator(seed, row, mode): the same answers in a batch
    as alone (a hot temperature, so that the seed shows)."""
    answers = []
    for size in ("1", "2"):
        status, err = _main(
            _argv(
                tmp_path / size,
                "--batch_size",
                size,
                "--modes",
                "parallel",
                "--do_sample",
                "--temperature",
                "2",
                "--seed",
                "7",
                "--max_new_tokens",
                "40",
                rows=2,
            )
        )
        assert status == 0, err
        answers.append(
            [{c: row[c] for c in ANSWER_COLUMNS if not c.startswith("normal")} for row in _read(_out(tmp_path / size))]
        )
    assert answers[0] == answers[1]


def test_batch_columns_are_consistent(runs):
    rows, _, _ = runs[BATCH]
    assert [row["batch"] for row in rows] == [0] * BATCH + [1]
    for batch in (rows[:BATCH], rows[BATCH:]):
        for mode in ("normal", "parallel"):
            assert len({(row[f"{mode}_batch_time"], row[f"{mode}_batch_tokens"]) for row in batch}) == 1
            assert batch[0][f"{mode}_batch_tokens"] == sum(row[f"{mode}_length"] for row in batch)
            for row in batch:  # a row's time is its latency inside the pass
                assert 0 < row[f"{mode}_time"] <= row[f"{mode}_batch_time"]
                assert row[f"{mode}_speed"] == pytest.approx(row[f"{mode}_length"] / row[f"{mode}_time"])
                assert row[f"{mode}_attention"] == "sdpa"
    assert next_batch_id(rows) == 2 and len(batch_passes(rows, "normal")) == 2


def test_printed_throughput_is_tokens_over_time_from_the_file(runs):
    rows, err, _ = runs[BATCH]
    rates = {}
    for mode in ("normal", "parallel"):
        passes = {row["batch"]: (row[f"{mode}_batch_time"], row[f"{mode}_batch_tokens"]) for row in rows}
        rates[mode] = sum(n for _, n in passes.values()) / sum(t for t, _ in passes.values())
        assert throughput(rows, mode) == pytest.approx(rates[mode])
    line = re.search(
        r"generate: throughput over this run's 2 batches of up to 3 rows \(.*\): normal ([\d.]+) "
        r"tokens/s, parallel ([\d.]+) tokens/s; parallel / normal ([\d.]+)x",
        err,
    )
    assert line, err
    assert line.groups() == (
        f"{rates['normal']:.1f}",
        f"{rates['parallel']:.1f}",
        f"{rates['parallel'] / rates['normal']:.2f}",
    )
    assert f"tokens/s=normal {rates['normal']:.1f}, parallel {rates['parallel']:.1f}" in err  # the progress bar
    assert "throughput" not in runs[1][1]


def test_eval_shows_throughput_of_a_batched_file_only(runs, capsys):
    rows, _, out = runs[BATCH]
    assert eval_cli.main(["--df_path", str(_out(out)), "--task", "retrieval", "--no_judge"]) == 0
    text = capsys.readouterr().out
    summary = json.loads(_out(out).with_suffix(".summary.json").read_text())
    normal, parallel = throughput(rows, "normal"), throughput(rows, "parallel")
    assert summary["batch_size"] == BATCH and summary["batches"] == 2
    assert summary["normal_throughput"] == pytest.approx(normal)
    assert summary["parallel_throughput"] == pytest.approx(parallel)
    assert summary["throughput_ratio"] == pytest.approx(parallel / normal)
    assert any(
        line.split() == ["throughput", "(tokens/s,", "batches)", f"{normal:.2f}", f"{parallel:.2f}"]
        for line in text.splitlines()
    )
    assert (
        f"throughput ratio (parallel / normal generated tokens per second of batch-pass wall time, over 2 batches "
        f"of up to 3 rows): {parallel / normal:.2f}x"
    ) in text
    markdown = _out(out).with_suffix(".summary.md").read_text()
    assert f"| throughput (tokens/s, batches) | {normal:.2f} | {parallel:.2f} |" in markdown
    single_out = runs[1][2]
    assert eval_cli.main(["--df_path", str(_out(single_out)), "--task", "retrieval", "--no_judge"]) == 0
    assert "throughput" not in capsys.readouterr().out
    assert not {"batch_size", "batches", "normal_throughput", "throughput_ratio"} & set(
        json.loads(_out(single_out).with_suffix(".summary.json").read_text())
    )


def test_report_adds_throughput_columns_when_a_run_has_them(runs, tmp_path, capsys):
    import csv
    import shutil

    for size, name in ((1, "one"), (BATCH, "three")):
        (tmp_path / name).mkdir()
        shutil.copy(_out(runs[size][2]), tmp_path / name / "retrieval_4.jsonl")
        assert (
            eval_cli.main(
                ["--df_path", str(tmp_path / name / "retrieval_4.jsonl"), "--task", "retrieval", "--no_judge"]
            )
            == 0
        )
    capsys.readouterr()
    assert eval_cli.main(["--report", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    with open(tmp_path / "report.csv", encoding="utf-8", newline="") as f:
        one, three = list(csv.DictReader(f))
    header = list(one)
    assert header[header.index("step_ratio") + 1 : header.index("step_ratio") + 5] == [
        "batch_size",
        "normal_throughput",
        "parallel_throughput",
        "throughput_ratio",
    ]
    assert one["batch_size"] == one["throughput_ratio"] == "" and three["batch_size"] == str(BATCH)
    assert float(three["normal_throughput"]) == pytest.approx(throughput(runs[BATCH][0], "normal"))
    assert "throughput ratio" in text.splitlines()[0]


def test_resume_after_an_interruption_with_batch_size_3(runs, tmp_path, monkeypatch):
    """Ctrl-C in the second batch leaves the first batch's rows; the rerun decodes the rest in a batch of its own
    (a new id); a row whose earlier attempt failed is decoded again. Answers as at batch size 1 throughout."""
    real_run_batch, calls = batching.run_batch, []

    def interrupted_in_second_batch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_run_batch(*args, **kwargs)

    monkeypatch.setattr(batching, "run_batch", interrupted_in_second_batch)
    argv = _argv(tmp_path, "--batch_size", str(BATCH), "--modes", "normal")
    status, err = _main(argv)
    assert status == 130 and "run the same command again to resume" in err
    first = _read(_out(tmp_path))
    assert [row["batch"] for row in first] == [0] * BATCH
    monkeypatch.setattr(batching, "run_batch", real_run_batch)
    status, err = _main(argv)
    assert status == 0 and "resuming: 3 rows already done" in err
    resumed = _read(_out(tmp_path))
    assert resumed[:BATCH] == first and resumed[BATCH]["batch"] == 1
    normal = ("normal_response", "normal_length", "normal_caps", "normal_steps")
    single = runs[1][0]
    assert [[row[c] for c in normal] for row in resumed] == [[row[c] for c in normal] for row in single]
    failed = dict(resumed[1], error="normal: RuntimeError: CUDA out of memory")
    _out(tmp_path).write_text("".join(json.dumps(r) + "\n" for r in (resumed[0], failed, *resumed[2:])))
    status, err = _main(argv)
    retried = _read(_out(tmp_path))
    assert status == 0 and retried[1]["error"] is None and retried[1]["batch"] == 2
    assert [row["normal_response"] for row in retried] == [row["normal_response"] for row in single]


def _no_model_load(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(loading, "load_model", fail)


def test_a_rerun_with_another_batch_size_is_refused_before_the_model_loads(runs, tmp_path, monkeypatch):
    rows = runs[BATCH][0]
    _out(tmp_path).parent.mkdir(parents=True)
    _out(tmp_path).write_text("".join(json.dumps(r) + "\n" for r in rows))
    _no_model_load(monkeypatch)
    for size, old, new in (("2", BATCH, 2), ("1", BATCH, 1)):
        status, err = _main(_argv(tmp_path, "--batch_size", size))
        assert status == 2 and err.count("\n") == 1
        assert f"holds rows made with other settings (batch_size: {old} -> {new}); pass --overwrite" in err
    # rows made before --batch_size existed were decoded one at a time
    before = dict(rows[0], settings={k: v for k, v in rows[0]["settings"].items() if k != "batch_size"})
    _out(tmp_path).write_text(json.dumps(before) + "\n")
    status, err = _main(_argv(tmp_path, "--batch_size", str(BATCH)))
    assert status == 2 and "(batch_size: 1 -> 3)" in err
    monkeypatch.setattr(loading, "load_model", lambda *a: (None, None))
    monkeypatch.setattr(loading, "usable_context", lambda *a: None)
    status, err = _main(_argv(tmp_path, rows=1))
    assert status == 0 and "nothing to do" in err


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--batch_size", "0"], "--batch_size must be >= 1, got 0"),
        (["--batch_size", "-2"], "--batch_size must be >= 1, got -2"),
        (
            ["--batch_size", "4", "--tp"],
            "--batch_size 4 with --tp is not supported: the batch engine keeps every "
            "request's KV cache in one arena on one device; use --batch_size 1, or "
            "--data_parallel to batch on each device",
        ),
        (["--batch_size", "4", "--device_map", "auto"], "--batch_size 4 with --device_map is not supported"),
        (
            ["--batch_size", "2", "--attn_implementation", "flash_attention_2"],
            "--batch_size 2 needs --attn_implementation sdpa or eager",
        ),
        (["--batch_size", "two"], "argument --batch_size: invalid int value: 'two'"),
    ],
)
def test_batch_size_usage_errors(tmp_path, monkeypatch, extra, message):
    _no_model_load(monkeypatch)
    status, err = _main(_argv(tmp_path, *extra))
    assert status == 2 and err.count("\n") == 1 and err.startswith("generate.py: error: ") and message in err
    assert not list(tmp_path.rglob("*.jsonl"))


def test_batch_flags_and_arena_size():
    args = generate.parse_args(["--task", "retrieval", "--batch_size", "3", "--kv_capacity", "900"])
    assert args.batch_size == 3 and args.kv_capacity == 900  # the engine's arena: fine with --compile off too
    assert run_settings(args)["batch_size"] == 3
    assert generate.parse_args(["--task", "retrieval"]).batch_size == 1
    assert kv_capacity_for(2, max([120, 300, 90]) + 64) == 2 * 364
    assert kv_capacity_for(min(8, len([120, 300])), 300 + 64) == 2 * 364  # runs/batching: never more than rows
    assert kv_capacity_for(2, 3000 + 64, context=2048) == 2 * 2048
    with pytest.raises(ValueError, match="batch_size and request_tokens >= 1"):
        kv_capacity_for(0, 64)


def test_a_row_that_fails_fails_alone_in_its_batch(tmp_path):
    """A prompt longer than the model's context is refused at submission, in both modes; the rows beside it in
    its batch are decoded as at batch size 1, and the run goes on."""
    from parallel_decoding.tasks import default_data_path, load_dataset

    good = load_dataset("retrieval", default_data_path("retrieval"))[:2]
    data = tmp_path / "mixed.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in (good[0], {"prompt": "word " * 2500}, good[1])))
    status, err = _main(
        [
            "--task",
            "retrieval",
            "--data_path",
            str(data),
            "--max_new_tokens",
            "8",
            "--batch_size",
            "3",
            "--output_dir",
            str(tmp_path),
        ]
    )
    assert status == 0, err
    rows = _read(tmp_path / MODEL.name / "mixed.jsonl")
    assert [row["error"] is None for row in rows] == [True, False, True]
    assert re.fullmatch(
        r"normal: ValueError: the prompt has \d+ tokens; the model's context is 2048; "
        r"parallel: ValueError: the prompt has \d+ tokens; the model's context is 2048",
        rows[1]["error"],
    )
    assert rows[1]["batch"] == rows[0]["batch"] == 0 and rows[1]["normal_response"] is None
    assert rows[0]["normal_batch_tokens"] == rows[0]["normal_length"] + rows[2]["normal_length"]
    assert "row 1: normal: ValueError" in err


def test_data_parallel_ranks_batch_their_own_share(runs, tmp_path):
    """torchrun, 2 processes (gloo, CPU): rank r batches rows r, r + 2, ... (here one row each, to keep it short);
    batch ids stay unique in the merged file, and the answers are those of one process at batch size 1."""
    import subprocess
    import sys

    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        str(Path(generate.__file__)),
        "--data_parallel",
        *_argv(tmp_path, "--batch_size", "2", rows=2),
    ]
    proc = subprocess.run(command, capture_output=True, text=True, cwd=Path(generate.__file__).parent, timeout=300)
    assert proc.returncode == 0, proc.stderr
    rows = _read(_out(tmp_path))
    assert _answers(rows) == _answers(runs[1][0][:2])
    assert [row["batch"] for row in rows] == [0, 1]  # rank 0's first batch, rank 1's first batch
    assert [row["first_mode"] for row in rows] == ["normal", "normal"]  # each rank's first batch
    assert proc.stderr.count("generate: throughput over this run's 2 batches of up to 2 rows") == 1


def test_a_pass_that_raises_fails_only_the_requests_in_flight():
    """A pass that raises (CUDA out of memory, say) fails the requests still in flight, not the ones that ended;
    the engine is left idle with every slot free, and the next batch decodes as usual."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from parallel_decoding import Engine, normal_decode
    from parallel_decoding.tasks import build_prompt, default_data_path, load_dataset, read_format_prompt

    model = AutoModelForCausalLM.from_pretrained(MODEL).eval()
    tokenizer = AutoTokenizer.from_pretrained(MODEL)
    own = read_format_prompt(MODEL / "format_prompt.txt")
    rows = load_dataset("retrieval", default_data_path("retrieval"))[:3]
    prompts = {i: build_prompt("retrieval", row, own) for i, row in enumerate(rows)}
    generation = {"max_new_tokens": 8, "do_sample": False, "compile": False}
    engine = Engine(model, tokenizer, max_batch_size=2, kv_capacity=1200, compile=False)
    real_step = engine.scheduler.step

    def failing_once_the_last_request_runs():
        if not engine.scheduler.waiting and engine.scheduler.running:  # rows 0 and 1 ended, row 2 is in flight
            raise RuntimeError("CUDA out of memory (simulated)")
        return real_step()

    engine.scheduler.step = failing_once_the_last_request_runs
    outcomes, seconds, tokens = batching.decode_mode(engine, [0, 1, 2], prompts, "normal", generation, seed=0)
    assert isinstance(outcomes[2], RuntimeError) and str(outcomes[2]) == "CUDA out of memory (simulated)"
    alone = [normal_decode(model, tokenizer, prompts[i], max_new_tokens=8) for i in range(3)]
    assert [outcomes[i]["response"] for i in (0, 1)] == [alone[i]["response"] for i in (0, 1)]
    assert tokens == outcomes[0]["length"] + outcomes[1]["length"] and seconds > 0
    assert engine.idle and engine.scheduler.runner.allocator.free_slots == 1200
    engine.scheduler.step = real_step
    outcomes, _, _ = batching.decode_mode(engine, [0, 1, 2], prompts, "normal", generation, seed=0)
    assert [outcomes[i]["response"] for i in range(3)] == [a["response"] for a in alone]
