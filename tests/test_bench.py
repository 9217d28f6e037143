"""The benchmark CLI at a tiny shape: the JSON summary on its last line and the sweep's files (not the speed)."""

from __future__ import annotations

import csv
import json

import pytest
import torch
from reference import decode_branches_one_by_one

from parallel_decoding.bench import branch_stage as bench
from parallel_decoding.bench.configs import MODEL_CONFIGS, qwen2_config
from parallel_decoding.decoding import flex

TINY = [
    "--config",
    "tiny",
    "--prefix_len",
    "12",
    "--branch_len",
    "3",
    "--repeats",
    "1",
    "--warmup",
    "0",
    "--device",
    "cpu",
    "--dtype",
    "float32",
]
REQUIRED = {
    "speedup",
    "efficiency",
    "sequential_tokens_per_s",
    "parallel_tokens_per_s",
    "peak_memory_mb",
    "sequential_ms_per_step",
    "parallel_ms_per_step",
    "sequential_weight_gb_per_s",
    "parallel_weight_gb_per_s",
    "num_branches",
    "branch_len",
    "prefix_len",
    "attn_implementation",
    "dtype",
    "device",
    "device_name",
    "results",
}


def last_json(capsys) -> dict:
    out = capsys.readouterr().out.strip().splitlines()
    return json.loads(out[-1])


def test_single_run_reports_json_fields(capsys):
    assert bench.main(TINY + ["--num_branches", "3", "--attn_implementation", "eager", "sdpa"]) == 0
    summary = last_json(capsys)
    assert REQUIRED <= summary.keys()
    assert summary["num_branches"] == 3 and summary["attn_implementation"] == "eager"
    assert [r["attn_implementation"] for r in summary["results"]] == ["eager", "sdpa"]
    for row in summary["results"]:
        assert row["speedup"] > 0 and row["efficiency"] == pytest.approx(row["speedup"] / 3)
        assert row["sequential_tokens_per_s"] == pytest.approx(3 * 3 / row["sequential_s"])
        assert row["peak_memory_mb"] > 0  # CPU: process peak RSS
        assert row["token_agreement"] == 1.0  # fp32: both modes decode the same greedy tokens


def test_sweep_writes_csv_and_png(tmp_path, capsys):
    assert bench.main(TINY + ["--sweep", "--out_dir", str(tmp_path), "--attn_implementation", "sdpa"]) == 0
    summary = last_json(capsys)
    assert REQUIRED <= summary.keys()
    with open(summary["csv"]) as f:
        rows = list(csv.DictReader(f))
    assert [int(r["num_branches"]) for r in rows] == list(bench.SWEEP_BRANCHES)
    assert {"speedup", "efficiency", "attn_implementation"} <= rows[0].keys()
    png = open(summary["png"], "rb").read()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_sequential_baseline_matches_engine_tokens():
    model = bench.random_model("tiny", torch.device("cpu"), torch.float32, "eager", seed=1)
    decoder = bench.EagerDecoder(model)
    decoder.forward(list(range(10, 20)))
    titles = [[5, 6], [7], [8, 9, 10]]
    one_by_one = decode_branches_one_by_one(decoder, 10, titles, 4)
    together = bench.decode_branches_together(decoder, 10, titles, 4)
    assert one_by_one == together and all(len(t) == 4 for t in together)


def test_random_model_is_finite_real_shape():
    model = bench.random_model("tiny", torch.device("cpu"), torch.bfloat16, "sdpa", seed=0)
    assert model.dtype == torch.bfloat16
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tie_word_embeddings honoured
    # tied: the one matrix is read by the LM head and counted once
    assert bench.weight_bytes(model) == sum(p.numel() * 2 for p in model.parameters())


@pytest.mark.parametrize("name, params", [("qwen2.5-0.5b", 494_032_768), ("qwen2.5-7b", 7_615_616_512)])
def test_configs_have_the_released_parameter_counts(name, params):
    config = qwen2_config(name)
    h, i, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    kv = config.num_key_value_heads * h // config.num_attention_heads
    attention = h * h + h + 2 * (h * kv + kv) + h * h  # q (with bias), k, v (with bias), o
    per_layer = attention + 3 * h * i + 2 * h
    embeddings = config.vocab_size * h * (1 if config.tie_word_embeddings else 2)
    assert layers * per_layer + embeddings + h == params
    assert config.vocab_size == MODEL_CONFIGS[name]["vocab_size"]


def test_bad_flags_fail_with_one_line(capsys):
    with pytest.raises(SystemExit):
        bench.main(TINY + ["--num_branches", "0"])
    assert "--num_branches must be >= 1" in capsys.readouterr().err
    assert bench.main(TINY + ["--prefix_len", "5000"]) == 2
    assert "exceeds the model's context" in capsys.readouterr().err


def test_model_path_loads_a_checkpoint(tmp_path, capsys):
    model = bench.random_model("tiny", torch.device("cpu"), torch.float32, "sdpa", seed=2)
    model.save_pretrained(tmp_path / "ckpt")
    args = [
        "--model_path",
        str(tmp_path / "ckpt"),
        "--prefix_len",
        "8",
        "--branch_len",
        "2",
        "--num_branches",
        "2",
        "--repeats",
        "1",
        "--warmup",
        "0",
        "--device",
        "cpu",
        "--dtype",
        "float32",
    ]
    assert bench.main(args) == 0
    summary = last_json(capsys)
    assert summary["model"] == str(tmp_path / "ckpt") and summary["token_agreement"] == 1.0
    assert bench.main(["--model_path", str(tmp_path / "missing")] + args[2:]) == 2
    assert "not a directory" in capsys.readouterr().err


GPU_CHECK_TINY = [
    "--config",
    "tiny",
    "--device",
    "cpu",
    "--dtype",
    "float32",
    "--compile",
    "off",
    "--prompt_len",
    "24",
    "--capacity",
    "128",
]


def test_gpu_check_report_on_a_tiny_cpu_model(tmp_path, capsys):
    from parallel_decoding.bench import gpu_check

    out = tmp_path / "gpu_check.md"
    argv = GPU_CHECK_TINY + [
        "--steps",
        "3",
        "--branches",
        "1",
        "2",
        "5",
        "--match_tokens",
        "6",
        "--text_lens",
        "16",
        "40",
        "--out",
        str(out),
    ]
    assert gpu_check.main(argv) == 0
    text = out.read_text()
    assert text == capsys.readouterr().out
    for line in (
        "| eager normal step (ms/token) |",
        "| fast normal step (ms/token) |",
        "| fast parallel step, N=1 (ms/step) |",
        "| fast parallel step, N=5 (ms/step) |",
        "| greedy token match, fast vs eager (6 tokens) | 1.000 (divergence: none) |",
        "- fast path: KV arena of 128 slots, attention flex, compile off",
        "## Flex vs dense step, by length of text in the arena",
        "| 16 | flex (uncompiled: exact-size passes) |",
        "| 40 | dense (uncompiled: exact-size passes) |",
        "## One step's attention alone, every layer (flex, dense mask, the Triton kernel)",
        "| 16 | dense |",
        "| 40 | flex |",
        "| 40 | kernel |",  # the kernel on Triton's interpreter (conftest.py)
        "## CUDA graphs and recompiles of the timed steps",
        "- fast parallel step, N=5: cudagraph_skips 0 after warm-up, 0 after the timed steps; no recompile "
        "(no CUDA graphs here)",
        "- result: passed",
    ):
        assert line in text, line
    alone = [row for row in text.splitlines() if row.startswith(("| 16 | ", "| 40 | ")) and row.count("|") == 8]
    assert len(alone) == 6 and not any("not run" in row or "error" in row for row in alone), alone
    assert all(float(row.split("|")[-2]) < 1e-5 for row in alone)  # flex and the kernel agree with the dense mask
    assert gpu_check.peak_bandwidth("NVIDIA H200") == 4800.0 and gpu_check.peak_bandwidth("AMD EPYC") is None
    assert gpu_check.match_rate([1, 2, 3, 4], [1, 2, 5, 4]) == (0.75, 2)
    with pytest.raises(SystemExit):
        gpu_check.parse_args(["--branches", "0"])
    with pytest.raises(SystemExit):
        gpu_check.parse_args(GPU_CHECK_TINY[:-1] + ["64", "--text_lens", "100"])  # the arena cannot hold the text


def test_gpu_check_fails_with_one_line_after_writing_the_report(tmp_path, capsys, monkeypatch):
    """A timed step outside a recorded CUDA graph (simulated here: no GPU) fails the run, exit status 1, once the
    report is written."""
    from parallel_decoding.bench import gpu_check, step

    def failure(self):
        return (
            f"{self.what}: a timed step ran outside a recorded graph"
            if self.what == "fast parallel step, N=1"
            else None
        )

    monkeypatch.setattr(step.StepCheck, "failure", failure)
    out = tmp_path / "gpu_check.md"
    argv = GPU_CHECK_TINY + [
        "--steps",
        "1",
        "--branches",
        "1",
        "--match_tokens",
        "1",
        "--text_lens",
        "16",
        "--out",
        str(out),
    ]
    assert gpu_check.main(argv) == 1
    captured = capsys.readouterr()
    assert captured.err.strip().splitlines() == [
        "parallel_decoding.bench.gpu_check: FAILED: fast parallel step, N=1: a timed step ran outside a recorded graph"
    ]
    text = out.read_text()
    assert text == captured.out and "| greedy token match, fast vs eager (1 tokens) |" in text
    assert "- result: FAILED: fast parallel step, N=1: a timed step ran outside a recorded graph" in text


# --- python -m parallel_decoding.bench.step -----------------------------------------------------------------------

STEP_TINY = [
    "--config",
    "tiny",
    "--prefix_len",
    "20",
    "--steps",
    "2",
    "--repeats",
    "1",
    "--device",
    "cpu",
    "--dtype",
    "float32",
    "--num_threads",
    "1",
]


def test_step_bench_prints_the_table_the_ratios_and_json(capsys):
    from parallel_decoding.bench import step

    assert step.main(STEP_TINY + ["--capacities", "160", "40"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    summary = json.loads(lines[-1])
    assert lines[1].startswith("| attention | capacity | rows | KV slots read | x heads | ms/step |")
    assert len([line for line in lines if line.startswith(("| flex |", "| dense |"))]) == 4
    assert {
        "config",
        "layers",
        "dtype",
        "device",
        "device_name",
        "prefix_len",
        "steps",
        "repeats",
        "capacities",
        "attention",
        "rows",
        "weight_bytes",
        "results",
        "capacity_ratios",
        "graphs",
        "failure",
    } <= summary.keys()
    assert (
        summary["capacities"] == [40, 160] and summary["attention"] == ["flex", "dense"] and summary["failure"] is None
    )
    for row in summary["results"]:
        assert {
            "attention",
            "capacity",
            "rows",
            "mean_written",
            "kv_slots_read",
            "kv_heads_read",
            "ms_per_step",
            "repeat_ms",
            "kv_bytes",
            "bytes_per_step",
            "gb_per_s",
        } <= row.keys()
        assert row["bytes_per_step"] == summary["weight_bytes"] + row["kv_bytes"] and row["gb_per_s"] > 0
        # tiny: 4 query heads, 2 KV heads; flex reads whole 128-slot blocks of the written text, dense the arena
        assert row["kv_heads_read"] == (2 if row["attention"] == "flex" else 4)
        assert row["kv_slots_read"] == (
            min(128, row["capacity"] + 1) if row["attention"] == "flex" else row["capacity"] + 1
        )
    ratios = {(r["attention"], r["rows"]): r for r in summary["capacity_ratios"]}
    assert ratios.keys() == {("flex", 1), ("dense", 1)}
    flex = ratios["flex", 1]
    assert (flex["capacity_min"], flex["capacity_max"]) == (40, 160)
    times = {(r["attention"], r["capacity"]): r["ms_per_step"] for r in summary["results"]}
    assert flex["ratio"] == pytest.approx(times["flex", 160] / times["flex", 40])
    assert "flex, 1 row(s): step at capacity 160 / at 40 = " in "\n".join(lines)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--rows", "0"], "--rows must be between 1 and 128"),
        (["--capacities", "22"], "--capacities must hold --prefix_len + rows x (steps + 1) = 23 tokens, got 22"),
        (["--layers", "3"], "--layers must be between 1 and 2 for tiny, got 3"),
        (["--attention", "sparse"], "argument --attention: invalid choice"),
    ],
)
def test_step_bench_bad_flags_are_one_line_with_status_2(flags, message, capsys):
    from parallel_decoding.bench import step

    with pytest.raises(SystemExit) as exit_info:
        step.main(STEP_TINY + flags)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and len(err.strip().splitlines()) == 1 and message in err, err


def test_step_bench_without_cuda_is_one_line_with_status_2(capsys):
    from parallel_decoding.bench import step

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert step.main(STEP_TINY + ["--device", "cuda", "--capacities", "64"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "parallel_decoding.bench.step: error: --device cuda: CUDA is not available"
    ]


def test_step_bench_bytes_and_layer_cut():
    from parallel_decoding.bench import step

    model = step.build_model("tiny", 1, torch.device("cpu"), torch.float32, seed=0)
    assert model.config.num_hidden_layers == 1 and len(model.model.layers) == 1
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())
    per_slot_head = 2 * 1 * 16 * 4  # K and V, 1 layer, head dim 16, float32
    assert step.attention_bytes(model, "flex", 130, 1000) == 256 * 2 * per_slot_head  # two 128-slot blocks, 2 KV heads
    assert step.attention_bytes(model, "kernel", 130, 1000) == 130 * 2 * per_slot_head  # the written slots
    assert step.attention_bytes(model, "dense", 130, 1000) == 1001 * 4 * per_slot_head  # the arena, 4 query heads
    assert step.written_lengths(600, 1, 3) == [602, 603, 604] and step.written_lengths(600, 8, 2) == [616, 624]


def test_step_check_counts_replays_and_catches_recompiles(monkeypatch):
    """The check watches inductor's CUDA-graph tree manager (stand-in methods here: no GPU): a call that re-enters
    ``_run`` counts once; a call that replays passes, one that runs eagerly (warm-up) or re-records fails."""
    from torch._inductor.cudagraph_trees import CUDAGraphTreeManager as Manager

    from parallel_decoding.bench import step

    def fake_run(self, inputs, function_id):  # the real one may re-enter itself once before it replays
        if inputs == "again":
            return self._run("replay", function_id)
        return self.execute_node(None, inputs) if inputs == "replay" else self.run_eager(inputs, function_id)

    monkeypatch.setattr(Manager, "_run", fake_run)
    monkeypatch.setattr(Manager, "execute_node", lambda self, node, inputs: "replayed")
    monkeypatch.setattr(Manager, "run_eager", lambda self, inputs, function_id: "eager")
    manager = object.__new__(Manager)
    check = step.StepCheck("timed", graphs=True, steps=2)
    with check:
        assert manager._run("again", 0) == "replayed" and manager._run("replay", 0) == "replayed"
    assert Manager._run is fake_run  # put back
    assert check.counts == {"calls": 2, "replays": 2, "recordings": 0, "eager_runs": 0} and check.failure() is None
    assert check.describe().endswith("2 compiled calls, 2 graph replays, 0 recordings, 0 eager runs")
    check = step.StepCheck("timed", graphs=True, steps=2)
    with check:
        manager._run("replay", 0)
        manager._run("warm", 0)
    assert check.failure() == (
        "timed: 2 compiled calls in 2 timed steps, 1 graph replays, 0 recordings, 1 eager runs: "
        "a timed step ran outside a recorded graph"
    )
    check.counts.update(calls=2, replays=2, eager_runs=0)
    check.skips_after = 1
    assert "inductor skipped CUDA graphs for 1 compiled graph(s)" in check.failure()

    compiled = torch.compile(lambda x: x * 2, dynamic=False)
    compiled(torch.ones(3))
    with pytest.raises(step.StepCheckFailed, match=r"^timed: a timed step recompiled \(Detected recompile"):
        with step.StepCheck("timed", graphs=False, steps=1):
            compiled(torch.ones(4))  # a new shape: a recompile
    compiled(torch.ones(5))  # the stance is back to default afterwards


def test_compiled_bench_compiles_every_bucket_it_uses_before_timing(monkeypatch, capsys):
    from parallel_decoding.decoding import arena

    real_warm_up = arena.FastDecoder.warm_up

    def warm_up_then_forbid_compiling(self, buckets=None):
        real_warm_up(self, buckets)
        torch.compiler.set_stance("fail_on_recompile")  # --warmup 0: a bucket left out would compile while timed

    monkeypatch.setattr(arena.FastDecoder, "warm_up", warm_up_then_forbid_compiling)
    try:
        assert bench.main(TINY + ["--num_branches", "3", "--title_len", "2", "--compile"]) == 0
    finally:
        torch.compiler.set_stance("default")
    summary = last_json(capsys)
    assert summary["compile"] is True and summary["token_agreement"] == 1.0


def test_same_answers_counts_equal_rows_and_fails_on_any_difference(tmp_path, capsys):
    """scripts/gpu_check.sh's answers step: the compiled path's results file held to the eager one's."""
    from parallel_decoding.bench import same_answers

    rows = [{"normal_response": "a", "parallel_response": "a"}, {"normal_response": "b", "parallel_response": "c"}]
    reference, candidate = tmp_path / "eager.jsonl", tmp_path / "compiled.jsonl"
    reference.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    candidate.write_text(reference.read_text(encoding="utf-8"), encoding="utf-8")
    assert same_answers.main([str(reference), str(candidate)]) == 0
    assert "parallel answers equal to the reference's: 2/2" in capsys.readouterr().out
    garbled = [rows[0], {"normal_response": "b", "parallel_response": "x x x"}]
    candidate.write_text("".join(json.dumps(r) + "\n" for r in garbled), encoding="utf-8")
    assert same_answers.main([str(reference), str(candidate)]) == 1
    out = capsys.readouterr().out
    assert (
        "normal answers equal to the reference's: 2/2" in out
        and "parallel answers equal to the reference's: 1/2" in out
    )
    candidate.write_text(json.dumps(rows[0]) + "\n", encoding="utf-8")
    assert same_answers.main([str(reference), str(candidate)]) == 2
    assert "the files hold 2 and 1 rows" in capsys.readouterr().err


@pytest.mark.skipif(not flex.supported(), reason="this torch cannot build the arena's BlockMask")
def test_flex_rows_holds_each_kernel_to_the_dense_reference(capsys):
    """scripts/gpu_check.sh's kernel step, on the CPU's one template: a tree pass of one and of four rows, the
    embedded model's head shape, against sdpa under the dense mask; bad shapes get one line."""
    from parallel_decoding.bench import flex_rows

    assert flex_rows.main(["--device", "cpu", "--shapes", "4,2,48", "--rows", "1", "4", "--capacity", "256"]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = [line.split(" | ") for line in lines if line.startswith("| 4 | 2 | 48 |")]
    assert [r[3] for r in rows] == ["1", "4"]
    assert all(float(r[4]) < 1e-5 and float(r[5]) < 1e-5 and r[7] == "yes |" for r in rows)
    with pytest.raises(SystemExit) as exit_info:
        flex_rows.main(["--device", "cpu", "--shapes", "4,3,48"])
    assert exit_info.value.code == 2
    assert "H_q a multiple of H_kv" in capsys.readouterr().err


def test_flex_kernel_options_force_the_main_kernel_for_several_rows_on_cuda():
    """The arena's kernel choice: torch's own for one row or off CUDA, the main kernel for a CUDA pass of more rows."""
    from parallel_decoding.decoding.flex import kernel_options

    assert kernel_options("cuda", 1) is None and kernel_options("cpu", 16) is None
    assert kernel_options("cuda", 4) == {"FORCE_USE_FLEX_ATTENTION": True}
