"""The benchmark CLI at a tiny shape: the JSON summary on its last line and the sweep's files (not the speed)."""

from __future__ import annotations

import csv
import json

import pytest
import torch

from parallel_decoding.bench import branch_stage as bench
from reference import decode_branches_one_by_one
from parallel_decoding.bench.configs import MODEL_CONFIGS, qwen2_config

TINY = ["--config", "tiny", "--prefix_len", "12", "--branch_len", "3", "--repeats", "1", "--warmup", "0", "--device", "cpu", "--dtype", "float32"]
REQUIRED = {
    "speedup", "efficiency", "sequential_tokens_per_s", "parallel_tokens_per_s", "peak_memory_mb",
    "sequential_ms_per_step", "parallel_ms_per_step", "sequential_weight_gb_per_s", "parallel_weight_gb_per_s",
    "num_branches", "branch_len", "prefix_len", "attn_implementation", "dtype", "device", "device_name", "results",
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
    args = ["--model_path", str(tmp_path / "ckpt"), "--prefix_len", "8", "--branch_len", "2", "--num_branches", "2",
            "--repeats", "1", "--warmup", "0", "--device", "cpu", "--dtype", "float32"]
    assert bench.main(args) == 0
    summary = last_json(capsys)
    assert summary["model"] == str(tmp_path / "ckpt") and summary["token_agreement"] == 1.0
    assert bench.main(["--model_path", str(tmp_path / "missing")] + args[2:]) == 2
    assert "not a directory" in capsys.readouterr().err


def test_gpu_check_report_on_a_tiny_cpu_model(tmp_path, capsys):
    from parallel_decoding.bench import gpu_check

    out = tmp_path / "gpu_check.md"
    argv = ["--config", "tiny", "--device", "cpu", "--dtype", "float32", "--compile", "off", "--prompt_len", "24",
            "--steps", "3", "--branches", "1", "2", "5", "--match_tokens", "6", "--out", str(out)]
    assert gpu_check.main(argv) == 0
    text = out.read_text()
    assert text == capsys.readouterr().out
    for line in ("| eager normal step (ms/token) |", "| fast normal step (ms/token) |",
                 "| fast parallel step, N=1 (ms/step) |", "| fast parallel step, N=5 (ms/step) |",
                 "| greedy token match, fast vs eager (6 tokens) | 1.000 (divergence: none) |"):
        assert line in text
    assert gpu_check.peak_bandwidth("NVIDIA H200") == 4800.0 and gpu_check.peak_bandwidth("AMD EPYC") is None
    assert gpu_check.match_rate([1, 2, 3, 4], [1, 2, 5, 4]) == (0.75, 2)
    with pytest.raises(SystemExit):
        gpu_check.parse_args(["--branches", "0"])


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
