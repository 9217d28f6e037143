"""generate.py end to end on a tiny random Qwen2 with its own small BPE tokenizer (built once per module).

The CLI runs as a subprocess once per task; resume, skipping, run-time errors and bad input run `generate.main`
in-process (same code path after argv parsing, without paying an interpreter start per case).
"""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import generate
from parallel_decoding.cli import UsageError
from parallel_decoding.engine.batch import kv_capacity_for
from parallel_decoding.runs import comparison, loading
from parallel_decoding.runs import settings as settings_module
from parallel_decoding.runs.settings import (
    FORMAT_PROMPT_WITHOUT_EXAMPLE,
    SETTINGS_VERSION,
    compile_refusal,
    compile_setting,
    output_path,
    run_settings,
)
from parallel_decoding.tasks import build_prompt, default_data_path, format_prompt_digest, load_dataset, task_text

REPO = Path(__file__).resolve().parents[1]
MAX_NEW_TOKENS = 16
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _train_tokenizer():
    """A 512-token byte-level BPE trained on a few rows of the project's data, markers as whole tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = []
    for task in ("retrieval", "multi-document-qa", "planning"):
        corpus += default_data_path(task).read_text(encoding="utf-8").splitlines()[:5]
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(corpus, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tokenizer.add_tokens(["####", "%%%%", "......"])
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def _save_model(tokenizer, path: Path, max_position_embeddings: int) -> Path:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    Qwen2ForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return _save_model(
        _train_tokenizer(), tmp_path_factory.mktemp("models") / "tiny-qwen2", max_position_embeddings=4096
    )


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    """The tokenizer as generate.py loads it (AutoTokenizer may pick a model-specific class from config.json)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


def _read(path: Path) -> list:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _args(model_dir, out_dir, *extra):
    # --compile off: compiling every bucket takes minutes on a CPU; tests/test_fast.py holds the compiled path to
    # this one
    return [
        "--model_path",
        str(model_dir),
        "--output_dir",
        str(out_dir),
        "--max_new_tokens",
        str(MAX_NEW_TOKENS),
        "--compile",
        "off",
        *extra,
    ]


# --- end to end ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("task", ["retrieval", "multi-document-qa", "planning"])
def test_cli_writes_one_result_row_per_dataset_row(tmp_path, model_dir, task):
    proc = subprocess.run(
        [sys.executable, str(REPO / "generate.py"), "--task", task, "--max_samples", "2", *_args(model_dir, tmp_path)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    data_path = default_data_path(task)
    out = tmp_path / "tiny-qwen2" / f"{data_path.stem}.jsonl"
    rows, dataset = _read(out), load_dataset(task, data_path)[:2]
    assert len(rows) == 2
    assert [r["first_mode"] for r in rows] == ["normal", "parallel"]  # the order alternates per row
    for row, source in zip(rows, dataset):
        assert list(row) == list(source) + list(comparison.RESULT_COLUMNS)
        assert row["normal_attention"] == row["parallel_attention"] == "sdpa"
        for mode in ("normal", "parallel"):
            assert isinstance(row[f"{mode}_caps"], list)
            if mode == "normal" or not row["branches"]:  # sequential: capped exactly when it used the whole budget
                assert bool(row[f"{mode}_caps"]) == (row[f"{mode}_length"] == MAX_NEW_TOKENS)
        assert {k: row[k] for k in source} == source
        assert row["full_prompt"] == build_prompt(task, source)
        assert row["error"] is None
        for mode in ("normal", "parallel"):
            assert isinstance(row[f"{mode}_response"], str)
            assert 1 <= row[f"{mode}_length"] <= MAX_NEW_TOKENS
            assert row[f"{mode}_speed"] == pytest.approx(row[f"{mode}_length"] / row[f"{mode}_time"])
            assert isinstance(row[f"{mode}_steps"], int) and 1 < row[f"{mode}_steps"] <= MAX_NEW_TOKENS + 1
        assert row["num_parallel_branches"] == len(row["branches"])
        assert row["parallel_time"] == pytest.approx(row["stage1_time"] + row["stage2_time"] + row["stage3_time"])
        assert row["num_parallel_branches"] > 0 or row["fallback"]
    assert "generate: attention: sdpa for both modes" in proc.stderr
    assert f"2 rows in {out} (0 with errors this run)" in proc.stderr


def test_default_embedded_model_writes_branches(tmp_path):
    if not generate.DEFAULT_MODEL_PATH.is_dir():
        pytest.skip(f"the embedded model {generate.DEFAULT_MODEL_PATH} is not in this checkout yet")
    assert (
        generate.main(
            [
                "--task",
                "retrieval",
                "--max_samples",
                "1",
                "--max_new_tokens",
                "96",
                "--compile",
                "off",
                "--output_dir",
                str(tmp_path),
            ]
        )
        == 0
    )
    (row,) = _read(tmp_path / generate.DEFAULT_MODEL_PATH.name / "retrieval_4.jsonl")
    assert row["num_parallel_branches"] == len(row["students"]) == 4 and row["fallback"] is None
    assert row["normal_response"] and row["parallel_response"].count("####") == 5  # 4 steps + ####%%%%


def test_embedded_model_modes_alone_reproduce_both_with_sampling(tmp_path):
    """Each mode of each row samples from its own generator: --modes parallel and --modes normal give exactly the
    two halves of --modes both (CPU, float32), branches included; the order alternates per row."""
    if not generate.DEFAULT_MODEL_PATH.is_dir():
        pytest.skip(f"the embedded model {generate.DEFAULT_MODEL_PATH} is not in this checkout yet")
    runs = {}
    # A hot temperature: the toy is so sure of its answers that at 1.0 two seeds can give the same text.
    sampling = ["--do_sample", "--temperature", "2"]
    for modes in ("both", "parallel", "normal"):
        assert (
            generate.main(
                [
                    "--task",
                    "retrieval",
                    "--max_samples",
                    "2",
                    "--max_new_tokens",
                    "96",
                    *sampling,
                    "--seed",
                    "7",
                    "--modes",
                    modes,
                    "--output_dir",
                    str(tmp_path / modes),
                ]
            )
            == 0
        )
        runs[modes] = _read(tmp_path / modes / generate.DEFAULT_MODEL_PATH.name / "retrieval_4.jsonl")
    both = runs["both"]
    assert [r["first_mode"] for r in both] == ["normal", "parallel"]
    parallel_columns = (
        "parallel_response",
        "parallel_length",
        "parallel_caps",
        "num_parallel_branches",
        "stage1_response",
        "branches",
        "fallback",
    )
    for row, alone in zip(both, runs["parallel"]):
        assert row["num_parallel_branches"] >= 2 and row["fallback"] is None  # the embedded model branches
        assert {c: alone[c] for c in parallel_columns} == {c: row[c] for c in parallel_columns}
        assert alone["normal_response"] is None and alone["first_mode"] == "parallel"
        assert row["normal_attention"] == row["parallel_attention"] == "sdpa"
    for row, alone in zip(both, runs["normal"]):
        assert (alone["normal_response"], alone["normal_length"], alone["normal_caps"]) == (
            row["normal_response"],
            row["normal_length"],
            row["normal_caps"],
        )
        assert alone["parallel_response"] is None and alone["parallel_attention"] is None
    assert (
        generate.main(
            [
                "--task",
                "retrieval",
                "--max_samples",
                "2",
                "--max_new_tokens",
                "96",
                *sampling,
                "--seed",
                "8",
                "--modes",
                "parallel",
                "--output_dir",
                str(tmp_path / "seed8"),
            ]
        )
        == 0
    )
    other_seed = _read(tmp_path / "seed8" / generate.DEFAULT_MODEL_PATH.name / "retrieval_4.jsonl")
    assert [r["branches"] for r in other_seed] != [r["branches"] for r in both]  # the seed reaches the branches


def test_caps_are_recorded_per_mode(tmp_path):
    """A budget too small for the embedded model's answers caps both modes, and the parallel answer stays within
    it: the whole answer, branches included, counts against --max_new_tokens."""
    if not generate.DEFAULT_MODEL_PATH.is_dir():
        pytest.skip(f"the embedded model {generate.DEFAULT_MODEL_PATH} is not in this checkout yet")
    assert (
        generate.main(
            ["--task", "retrieval", "--max_samples", "1", "--max_new_tokens", "40", "--output_dir", str(tmp_path)]
        )
        == 0
    )
    (row,) = _read(tmp_path / generate.DEFAULT_MODEL_PATH.name / "retrieval_4.jsonl")
    assert row["num_parallel_branches"] == 4
    assert row["normal_length"] == 40 and row["normal_caps"] == ["the answer reached max_new_tokens (40)"]
    assert row["parallel_length"] <= 40
    assert any("the branch stage stopped" in c for c in row["parallel_caps"])
    assert {b["stop"] for b in row["branches"]} <= {"budget", "stop_token"}


# --- resume, overwrite, modes ---------------------------------------------------------------------------------


def test_resume_after_a_crash_keeps_finished_rows(tmp_path, model_dir, capsys):
    args = _args(model_dir, tmp_path, "--task", "retrieval", "--max_samples", "2")
    assert generate.main(args) == 0
    out = tmp_path / "tiny-qwen2" / "retrieval_4.jsonl"
    first_run = _read(out)
    lines = out.read_text(encoding="utf-8").splitlines(keepends=True)
    out.write_text(lines[0] + lines[1][: len(lines[1]) // 2], encoding="utf-8")  # killed while writing row 1
    capsys.readouterr()

    assert generate.main(args) == 0
    assert "resuming: 1 rows already done" in capsys.readouterr().err
    resumed = _read(out)
    assert resumed[0] == first_run[0]  # not decoded again (its timings would differ)
    assert [r["_id"] for r in resumed] == [r["_id"] for r in first_run]

    assert generate.main(args) == 0
    assert f"nothing to do: the 2 selected rows are done; 2 rows are in {out}" in capsys.readouterr().err
    assert _read(out) == resumed
    assert all(r["settings"] == run_settings(generate.parse_args(args)) for r in resumed)

    assert generate.main([*args[:-1], "1"]) == 0  # --max_samples 1 leaves the other finished row in the file
    assert _read(out) == resumed
    assert f"nothing to do: the 1 selected rows are done; 2 rows are in {out}" in capsys.readouterr().err

    failed = dict(resumed[1], error="normal: RuntimeError: CUDA out of memory")
    out.write_text(json.dumps(resumed[0]) + "\n" + json.dumps(failed) + "\n", encoding="utf-8")
    assert generate.main(args) == 0  # a row whose earlier run failed is decoded again
    retried = _read(out)
    assert retried[0] == resumed[0] and retried[1]["error"] is None
    assert retried[1]["normal_time"] != resumed[1]["normal_time"]

    assert generate.main([*args, "--overwrite", "--modes", "normal"]) == 0
    rerun = _read(out)
    assert rerun[0]["normal_time"] != first_run[0]["normal_time"]
    assert all(r["parallel_response"] is None and r["normal_response"] is not None for r in rerun)


# --- settings and the one-writer lock: refused before the model loads --------------------------------------------


def _no_model_load(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(loading, "load_model", fail)


def _finished_row(settings, row_index=0, **overrides):
    """A result row as generate.py writes it, without decoding (the columns that matter for resume)."""
    row = load_dataset("retrieval", default_data_path("retrieval"))[row_index]
    result = dict(row, **{column: None for column in comparison.RESULT_COLUMNS})
    result.update(
        full_prompt=build_prompt("retrieval", row),
        normal_response="x",
        parallel_response="y",
        settings=settings,
        **overrides,
    )
    return result


def test_rerun_with_other_settings_is_refused_before_loading_the_model(tmp_path, model_dir, capsys, monkeypatch):
    args = _args(model_dir, tmp_path, "--task", "retrieval", "--max_samples", "1")
    out = tmp_path / "tiny-qwen2" / "retrieval_4.jsonl"
    out.parent.mkdir(parents=True)
    settings = run_settings(generate.parse_args(args))
    assert settings == {
        "version": SETTINGS_VERSION,
        "model": str(model_dir.resolve()),
        "dtype": "float32",
        "attn_implementation": "sdpa",
        "max_new_tokens": MAX_NEW_TOKENS,
        "token_budget": "whole answer",
        "do_sample": False,
        "temperature": None,
        "top_p": None,
        "top_k": None,
        "seed": None,
        "modes": ["normal", "parallel"],
        "format_prompt": {"file": None, "sha256": format_prompt_digest(None)},
        "compile": False,
        "batch_size": 1,
    }
    stock = run_settings(
        generate.parse_args([*args, "--attn_implementation", "flash_attention_2", "--normal_stock_flash_attn"])
    )
    assert stock["attn_implementation"] == "flash_attention_2+normal_stock_flash_attn"
    # rows of the version before max_new_tokens bounded the whole parallel answer are not resumed
    before_budget = {k: v for k, v in settings.items() if k != "token_budget"}
    out.write_text(json.dumps(_finished_row(before_budget)) + "\n", encoding="utf-8")
    assert 'token_budget: "each branch" -> "whole answer"' in _bad_input(capsys, args)
    out.write_text(json.dumps(_finished_row(settings)) + "\n", encoding="utf-8")
    before = out.read_text(encoding="utf-8")
    real_load_model = loading.load_model
    _no_model_load(monkeypatch)
    for extra, difference in [
        (
            ["--do_sample"],
            "do_sample: false -> true; seed: null -> 0; temperature: null -> 1.0; top_k: null -> 0; top_p: null -> 1.0",
        ),
        (["--modes", "parallel"], 'modes: ["normal", "parallel"] -> ["parallel"]'),
        (["--dtype", "bfloat16"], 'dtype: "float32" -> "bfloat16"'),
        (["--attn_implementation", "eager"], 'attn_implementation: "sdpa" -> "eager"'),
        (["--compile", "on"], "compile: false -> true"),
    ]:
        err = _bad_input(capsys, [*args, *extra])
        assert err == (
            f"generate.py: error: {out} holds rows made with other settings ({difference}); pass "
            f"--overwrite to replace them, or another --output_dir to keep both\n"
        )
    err = _bad_input(capsys, [*args, "--max_new_tokens", "64"])  # the last flag wins
    assert f"max_new_tokens: {MAX_NEW_TOKENS} -> 64" in err
    assert out.read_text(encoding="utf-8") == before  # nothing lost
    monkeypatch.setattr(loading, "load_model", real_load_model)
    greedy = ["--seed", "7", "--top_p", "0.5", "--top_k", "3", "--temperature", "0"]
    assert generate.main([*args, *greedy]) == 0  # greedy: sampling flags shape nothing
    assert "nothing to do" in capsys.readouterr().err


def test_sampling_is_on_when_temperature_is_above_zero(tmp_path, model_dir, capsys):
    """One rule with the server: --temperature > 0 samples (0, the default, is greedy); --do_sample is an alias of
    --temperature 1.0; --top_p, --top_k and --seed are recorded only when sampling."""
    args = _args(model_dir, tmp_path, "--task", "retrieval")

    def sampling(*extra):
        settings = run_settings(generate.parse_args([*args, *extra]))
        return {k: settings[k] for k in ("do_sample", "temperature", "top_p", "top_k", "seed")}

    greedy = {"do_sample": False, "temperature": None, "top_p": None, "top_k": None, "seed": None}
    assert sampling() == greedy == sampling("--temperature", "0", "--top_k", "5")
    assert sampling("--temperature", "0.7", "--top_k", "5") == {
        "do_sample": True,
        "temperature": 0.7,
        "top_p": 1.0,
        "top_k": 5,
        "seed": 0,
    }
    assert sampling("--do_sample") == sampling("--temperature", "1")
    assert sampling("--do_sample", "--temperature", "2") == sampling("--temperature", "2")
    kwargs = settings_module.generation_kwargs(
        generate.parse_args([*args, "--temperature", "2", "--top_k", "4"]), "cpu"
    )
    assert {k: kwargs[k] for k in ("do_sample", "temperature", "top_p", "top_k")} == {
        "do_sample": True,
        "temperature": 2.0,
        "top_p": 1.0,
        "top_k": 4,
    }
    for extra, message in [
        (["--do_sample", "--temperature", "0"], "--do_sample with --temperature 0: sampling is on when --temperature"),
        (["--temperature", "-1"], "--temperature must be >= 0 (0: greedy), got -1.0"),
        (["--top_k", "-1"], "--top_k must be >= 0 (0: off), got -1"),
    ]:
        assert message in _bad_input(capsys, [*args, *extra])


def test_version_1_rows_resume_under_the_current_settings(tmp_path, model_dir, capsys, monkeypatch):
    """Rows written before settings had a version (and before top_k was a flag) resume: greedy ones under greedy
    flags, sampled ones under the same sampling flags with top_k off."""
    for flags in ([], ["--do_sample", "--seed", "3"]):
        args = _args(model_dir, tmp_path / str(len(flags)), "--task", "retrieval", "--max_samples", "1", *flags)
        out = tmp_path / str(len(flags)) / "tiny-qwen2" / "retrieval_4.jsonl"
        out.parent.mkdir(parents=True)
        version_1 = run_settings(generate.parse_args(args))
        del version_1["version"], version_1["top_k"]
        out.write_text(json.dumps(_finished_row(version_1)) + "\n", encoding="utf-8")
        monkeypatch.setattr(loading, "load_model", lambda *a: (None, None))
        monkeypatch.setattr(loading, "usable_context", lambda *a: None)
        assert generate.main(args) == 0
        assert "nothing to do" in capsys.readouterr().err
        if flags:  # top_k was not a flag: those rows sampled from every token
            assert "top_k: 0 -> 5" in _bad_input(capsys, [*args, "--top_k", "5"])


def test_rerun_with_another_format_prompt_is_refused(tmp_path, model_dir, capsys, monkeypatch):
    """The instruction file's path and its text's sha256 are settings: another file, the same file edited, or the
    default instead of a file are refused before the model loads; the same file again resumes."""
    first, second = tmp_path / "first.txt", tmp_path / "second.txt"
    first.write_text("Steps as ####Title:, then ####%%%%.", encoding="utf-8")
    second.write_text("{task}\nIndependent steps as ####Title:, then ####%%%%.", encoding="utf-8")
    args = _args(model_dir, tmp_path, "--task", "retrieval", "--max_samples", "1")
    out = tmp_path / "tiny-qwen2" / "retrieval_4.jsonl"
    out.parent.mkdir(parents=True)
    settings = run_settings(generate.parse_args([*args, "--format_prompt_file", str(first)]))
    assert settings["format_prompt"] == {
        "file": str(first.resolve()),
        "sha256": format_prompt_digest(first.read_text(encoding="utf-8")),
    }
    out.write_text(json.dumps(_finished_row(settings)) + "\n", encoding="utf-8")
    before = out.read_text(encoding="utf-8")
    _no_model_load(monkeypatch)
    for extra in (["--format_prompt_file", str(second)], []):
        err = _bad_input(capsys, [*args, *extra])
        assert f"{out} holds rows made with other settings (format_prompt: " in err and "--overwrite" in err
    first.write_text("Steps as ####Title:, then ####%%%%. Edited.", encoding="utf-8")
    err = _bad_input(capsys, [*args, "--format_prompt_file", str(first)])
    assert '"sha256": "' + settings["format_prompt"]["sha256"] in err
    assert out.read_text(encoding="utf-8") == before
    first.write_text("Steps as ####Title:, then ####%%%%.", encoding="utf-8")
    monkeypatch.setattr(loading, "load_model", lambda *a: (None, None))
    monkeypatch.setattr(loading, "usable_context", lambda *a: None)
    assert generate.main([*args, "--format_prompt_file", str(first)]) == 0
    assert "nothing to do" in capsys.readouterr().err


def test_rows_recorded_before_the_format_prompt_setting_imply_the_old_default(tmp_path, model_dir, capsys, monkeypatch):
    args = _args(model_dir, tmp_path, "--task", "retrieval", "--max_samples", "1")
    out = tmp_path / "tiny-qwen2" / "retrieval_4.jsonl"
    out.parent.mkdir(parents=True)
    settings = run_settings(generate.parse_args(args))
    del settings["format_prompt"]  # recorded by a version that did not record the format instruction yet
    out.write_text(json.dumps(_finished_row(settings)) + "\n", encoding="utf-8")
    _no_model_load(monkeypatch)
    err = _bad_input(capsys, args)  # made with the default of that time, which had no worked example
    old = FORMAT_PROMPT_WITHOUT_EXAMPLE["sha256"]
    assert f'format_prompt: {{"file": null, "sha256": "{old}"}} -> ' in err


def test_rows_without_settings_load_and_resume_with_a_note(tmp_path, model_dir, capsys, monkeypatch):
    args = _args(model_dir, tmp_path, "--task", "retrieval", "--max_samples", "1")
    out = tmp_path / "tiny-qwen2" / "retrieval_4.jsonl"
    out.parent.mkdir(parents=True)
    legacy = _finished_row(None)
    del legacy["settings"]  # an earlier version / the reference implementation
    out.write_text(json.dumps(legacy) + "\n", encoding="utf-8")
    monkeypatch.setattr(loading, "load_model", lambda *a: (None, None))
    monkeypatch.setattr(loading, "usable_context", lambda *a: None)
    assert generate.main(args) == 0
    err = capsys.readouterr().err
    assert (
        f"1 rows of {out} record no settings (an earlier version or the reference implementation wrote them): "
        "kept and resumed as if made with this run's settings"
    ) in err
    assert "nothing to do: the 1 selected rows are done; 1 rows are in" in err
    assert _read(out) == [legacy]


def test_a_second_writer_is_refused_before_loading_the_model(tmp_path, model_dir, capsys, monkeypatch):
    from parallel_decoding.runs.results import ResultsFile

    out = tmp_path / "tiny-qwen2" / "retrieval_4.jsonl"
    _no_model_load(monkeypatch)
    with ResultsFile(out).locked():  # another run writing it (flock: a second open conflicts in one process too)
        err = _bad_input(capsys, _args(model_dir, tmp_path, "--task", "retrieval"))
    assert err == (
        f"generate.py: error: {out} is being written by another run (pid {__import__('os').getpid()}); "
        f"wait for it to finish, or use another --output_dir\n"
    )
    assert not out.exists()


def test_non_utf8_results_file_is_one_line(tmp_path, model_dir, capsys, monkeypatch):
    out = tmp_path / "tiny-qwen2" / "retrieval_4.jsonl"
    out.parent.mkdir(parents=True)
    out.write_bytes(b"\xff\xfe{}\n")
    _no_model_load(monkeypatch)
    err = _bad_input(capsys, _args(model_dir, tmp_path, "--task", "retrieval"))
    assert err == (
        f"generate.py: error: {out}:1: not UTF-8 text (invalid start byte at byte 0); pass --overwrite to start again\n"
    )
    assert out.read_bytes() == b"\xff\xfe{}\n"


@pytest.mark.parametrize("phase", ["choose_device", "load_model"])
def test_ctrl_c_before_the_first_row_is_one_line(tmp_path, model_dir, capsys, monkeypatch, phase):
    def interrupted(*args, **kwargs):  # Ctrl-C while torch imports or the weights load
        raise KeyboardInterrupt

    monkeypatch.setattr(loading, phase, interrupted)
    assert generate.main(_args(model_dir, tmp_path, "--task", "retrieval")) == 130
    assert capsys.readouterr().err == (
        "generate: interrupted before the first row was decoded; no results file was changed\n"
    )
    assert not (tmp_path / "tiny-qwen2" / "retrieval_4.jsonl.lock").exists()


# --- too-long prompts ------------------------------------------------------------------------------------------


def _short_context_model(model_dir: Path, tmp_path: Path, max_position_embeddings: int) -> Path:
    path = tmp_path / "short-context"
    shutil.copytree(model_dir, path)
    config = json.loads((path / "config.json").read_text())
    config["max_position_embeddings"] = max_position_embeddings
    (path / "config.json").write_text(json.dumps(config))
    return path


def test_multi_doc_rows_longer_than_the_context_are_skipped(tmp_path, model_dir, tokenizer, capsys):
    from parallel_decoding import chat_prompt_ids

    rows = load_dataset("multi-document-qa", default_data_path("multi-document-qa"))[:4]
    lengths = [len(chat_prompt_ids(tokenizer, build_prompt("multi-document-qa", r))) for r in rows]
    usable = sorted(lengths)[1]  # two or three rows fit, the others do not
    short = _short_context_model(model_dir, tmp_path, usable + MAX_NEW_TOKENS)
    args = _args(short, tmp_path, "--task", "multi-document-qa", "--max_samples", "4", "--modes", "normal")
    assert generate.main(args) == 0
    too_long = sum(n > usable for n in lengths)
    assert (
        f"skipped {too_long} rows whose prompt exceeds the usable context of {usable} tokens" in capsys.readouterr().err
    )
    kept = _read(tmp_path / "short-context" / "multi_document_qa.jsonl")
    assert [r["_id"] for r in kept] == [r["_id"] for r, n in zip(rows, lengths) if n <= usable]


def test_row_errors_are_recorded_and_the_run_goes_on(tmp_path, model_dir, capsys):
    data = tmp_path / "mixed.jsonl"
    data.write_text(
        json.dumps({"prompt": "Hi"})
        + "\n"
        + json.dumps({"prompt": "word " * 400})
        + "\n"
        + json.dumps({"prompt": "Bye"})
        + "\n"
    )
    short = _short_context_model(model_dir, tmp_path, 600)
    assert generate.main(_args(short, tmp_path, "--task", "retrieval", "--data_path", str(data))) == 0
    rows = _read(tmp_path / "short-context" / "mixed.jsonl")
    assert [r["error"] is None for r in rows] == [True, False, True]
    assert rows[1]["first_mode"] == "parallel"  # odd row: errors in the order the modes ran
    assert rows[1]["error"].startswith("parallel: ValueError: the prompt has ")
    assert "; normal: ValueError: the prompt has " in rows[1]["error"]
    assert rows[1]["normal_response"] is None and rows[2]["normal_response"] is not None
    assert "row 1: parallel: ValueError" in capsys.readouterr().err


# --- bad input: one line, exit 2, nothing written over ---------------------------------------------------------


@pytest.fixture
def sentinel(tmp_path):
    """An existing output file (of model 'tiny-qwen2' on retrieval_4) that a failing run must leave alone."""
    path = tmp_path / "out" / "tiny-qwen2" / "retrieval_4.jsonl"
    path.parent.mkdir(parents=True)
    path.write_text("earlier results\n")
    return path


def _bad_input(capsys, argv) -> str:
    assert generate.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("generate.py: error: ")
    return err


def test_bad_inputs_exit_2_with_one_line(tmp_path, model_dir, sentinel, capsys):
    out = ["--output_dir", str(tmp_path / "out")]
    base = ["--model_path", str(model_dir), "--task", "retrieval", *out]
    err = _bad_input(capsys, ["--model_path", str(tmp_path / "tiny-qwen2"), "--task", "retrieval", *out])
    assert f"--model_path {tmp_path / 'tiny-qwen2'} does not exist" in err
    empty = tmp_path / "empty-model"
    empty.mkdir(parents=True)
    err = _bad_input(capsys, ["--model_path", str(empty), "--task", "retrieval", *out])
    assert err == (
        f"generate.py: error: --model_path {empty} is not a model directory: no config.json, no tokenizer "
        f"files (tokenizer.json, tokenizer_config.json, tokenizer.model, ...), no weights (*.safetensors or "
        f"pytorch_model*.bin)\n"
    )
    shutil.copy(model_dir / "config.json", empty)
    shutil.copy(next(model_dir.glob("*.safetensors")), empty)
    err = _bad_input(capsys, ["--model_path", str(empty), "--task", "retrieval", *out])
    assert err.endswith(
        f"{empty} is not a model directory: no tokenizer files (tokenizer.json, "
        f"tokenizer_config.json, tokenizer.model, ...)\n"
    )
    assert "invalid choice: 'summarize'" in _bad_input(capsys, ["--model_path", str(model_dir), "--task", "summarize"])
    assert "cannot read dataset" in _bad_input(capsys, [*base, "--data_path", str(tmp_path / "none.jsonl")])
    broken = tmp_path / "retrieval_4.jsonl"
    broken.write_text('{"prompt": "a"}\n{"prompt": "b",\n')
    assert f"{broken}:2: invalid JSON" in _bad_input(capsys, [*base, "--data_path", str(broken)])
    broken.write_text('{"prompt": "a"}\n{"question": "b"}\n')
    assert f"{broken}:2: row has no 'prompt' field" in _bad_input(capsys, [*base, "--data_path", str(broken)])
    assert "--max_samples must be >= 1" in _bad_input(capsys, [*base, "--max_samples", "0"])
    assert "--compile on needs --attn_implementation sdpa or eager" in _bad_input(
        capsys, [*base, "--compile", "on", "--attn_implementation", "flash_attention_2"]
    )
    assert "invalid choice: 'fast'" in _bad_input(capsys, [*base, "--compile", "fast"])
    assert "--compile on with --tp is not supported" in _bad_input(capsys, [*base, "--compile", "on", "--tp"])
    elsewhere = ["--model_path", str(model_dir), "--task", "retrieval", "--output_dir", str(tmp_path / "other")]
    assert "--normal_stock_flash_attn needs --attn_implementation flash_attention_2" in _bad_input(
        capsys, [*elsewhere, "--normal_stock_flash_attn"]
    )
    assert f"{sentinel}:1: does not parse as JSON (Expecting value); pass --overwrite to start again" in _bad_input(
        capsys, base
    )
    assert sentinel.read_text() == "earlier results\n"


# --- the format instruction ----------------------------------------------------------------------------------


def _first_prompt(tmp_path, model_dir, capsys, *extra) -> tuple:
    """full_prompt of the first retrieval row written by a short normal-only run, and the run's log."""
    out = tmp_path / "out"
    shutil.rmtree(out, ignore_errors=True)
    argv = [
        "--model_path",
        str(model_dir),
        "--output_dir",
        str(out),
        "--max_new_tokens",
        "2",
        "--task",
        "retrieval",
        "--max_samples",
        "1",
        "--modes",
        "normal",
        *extra,
    ]
    assert generate.main(argv) == 0
    (row,) = _read(out / model_dir.name / "retrieval_4.jsonl")
    return row["full_prompt"], capsys.readouterr().err


def test_format_prompt_file_replaces_the_instruction(tmp_path, model_dir, capsys):
    text = task_text("retrieval", load_dataset("retrieval", default_data_path("retrieval"))[0])
    appended = tmp_path / "appended.txt"
    appended.write_text("Write independent steps as ####Title: and close with ####%%%%.\n", encoding="utf-8")
    prompt, log = _first_prompt(tmp_path, model_dir, capsys, "--format_prompt_file", str(appended))
    assert prompt == f"{text}\nWrite independent steps as ####Title: and close with ####%%%%."
    assert f"generate: format instruction: {appended} (--format_prompt_file)" in log
    wrapping = tmp_path / "wrapping.txt"
    wrapping.write_text("You plan in parallel.\n\n{task}\n\nSteps: ####Title: ..., then ####%%%%.", encoding="utf-8")
    prompt, _ = _first_prompt(tmp_path, model_dir, capsys, "--format_prompt_file", str(wrapping))
    assert prompt == f"You plan in parallel.\n\n{text}\n\nSteps: ####Title: ..., then ####%%%%."


def test_a_model_directory_brings_its_own_format_instruction(tmp_path, model_dir, capsys):
    """format_prompt.txt in the model directory is the default for that model; --format_prompt_file overrides it."""
    text = task_text("retrieval", load_dataset("retrieval", default_data_path("retrieval"))[0])
    own = shutil.copytree(model_dir, tmp_path / "models" / "own-prompt")
    (own / "format_prompt.txt").write_text("Trained with: ####Name: step, then ####%%%%.\n", encoding="utf-8")
    prompt, log = _first_prompt(tmp_path, own, capsys)
    assert prompt == f"{text}\nTrained with: ####Name: step, then ####%%%%."
    assert f"format instruction: {own / 'format_prompt.txt'}, the one this model was trained with" in log
    other = tmp_path / "other.txt"
    other.write_text("{task}\nOther wording.", encoding="utf-8")
    prompt, _ = _first_prompt(tmp_path, own, capsys, "--format_prompt_file", str(other))
    assert prompt == f"{text}\nOther wording."
    prompt, log = _first_prompt(tmp_path, model_dir, capsys)  # no file in the directory: the project's default
    assert prompt == build_prompt("retrieval", load_dataset("retrieval", default_data_path("retrieval"))[0])
    assert "format instruction: the project's default" in log


def test_bad_format_prompt_files_exit_2(tmp_path, model_dir, sentinel, capsys):
    base = ["--model_path", str(model_dir), "--task", "retrieval", "--output_dir", str(tmp_path / "out"), "--overwrite"]
    bad = {
        "missing.txt": (None, "no such file"),
        "empty.txt": (b"\n  \n", "the file is empty"),
        "cp1252.txt": (b"caf\xe9 ####Title:", "not UTF-8 text (invalid byte at offset 3)"),
        "two.txt": (b"{task} ####Title: {task}", "2 {task} placeholders; at most one is allowed"),
    }
    for name, (content, message) in bad.items():
        path = tmp_path / name
        if content is not None:
            path.write_bytes(content)
        err = _bad_input(capsys, [*base, "--format_prompt_file", str(path)])
        assert err == f"generate.py: error: --format_prompt_file {path}: {message}\n"
    assert sentinel.read_text() == "earlier results\n"  # refused before anything was written, --overwrite or not
    broken_model = shutil.copytree(model_dir, tmp_path / "models" / "broken-prompt")
    (broken_model / "format_prompt.txt").write_bytes(b"")
    err = _bad_input(capsys, ["--model_path", str(broken_model), "--task", "retrieval", "--output_dir", str(tmp_path)])
    assert f"the model's format instruction {broken_model / 'format_prompt.txt'}: the file is empty" in err


def test_ctrl_c_leaves_finished_rows_and_exits_130(tmp_path, model_dir, monkeypatch, capsys):
    real_run_row, calls = comparison.run_row, []

    def interrupted_on_second_row(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_run_row(*args, **kwargs)

    monkeypatch.setattr(comparison, "run_row", interrupted_on_second_row)
    argv = _args(model_dir, tmp_path, "--task", "planning", "--max_samples", "3", "--modes", "normal")
    assert generate.main(argv) == 130
    assert "run the same command again to resume" in capsys.readouterr().err
    (row,) = _read(tmp_path / "tiny-qwen2" / "planning.jsonl")
    assert row["_id"] == load_dataset("planning", default_data_path("planning"))[0]["_id"]


def test_a_model_trained_for_other_tasks_is_named_before_decoding(tmp_path, model_dir, capsys):
    """The embedded toy lists the tasks it was trained for; another task runs, after one line saying so."""
    import shutil

    from parallel_decoding.tasks import MODEL_TASKS_FILE

    toy = tmp_path / "toy"
    shutil.copytree(model_dir, toy)
    (toy / MODEL_TASKS_FILE).write_text("# trained for\nretrieval\n")
    assert generate.main(_args(toy, tmp_path, "--task", "planning", "--max_samples", "1", "--modes", "normal")) == 0
    err = capsys.readouterr().err
    warning = (
        f"generate: warning: {toy} was trained for retrieval only, so its planning answers mean nothing: pass "
        "--model_path with a real checkpoint"
    )
    assert warning in err and err.index(warning) < err.index("model ")
    assert generate.main(_args(toy, tmp_path, "--task", "retrieval", "--max_samples", "1", "--modes", "normal")) == 0
    assert "warning" not in capsys.readouterr().err


def test_the_embedded_model_lists_retrieval_only():
    from parallel_decoding.tasks import model_task_warning

    assert model_task_warning(generate.DEFAULT_MODEL_PATH, "retrieval") is None
    assert "was trained for retrieval only" in model_task_warning(generate.DEFAULT_MODEL_PATH, "multi-document-qa")


def test_missing_default_model_is_named(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(loading, "DEFAULT_MODEL_PATH", tmp_path / "models" / "tiny-qwen2-retrieval")
    err = _bad_input(capsys, ["--task", "retrieval", "--output_dir", str(tmp_path)])
    assert "the embedded default model" in err and "pass --model_path" in err


def test_unknown_task_from_the_shell_exits_2(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(REPO / "generate.py"), "--task", "summarize"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )
    assert proc.returncode == 2
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("generate.py: error: argument --task: invalid choice: 'summarize' (choose from ")


def test_output_path_naming():
    assert output_path("results", "/m/Qwen2.5-7B-Instruct/", "data/retrieval_4.jsonl") == Path(
        "results/Qwen2.5-7B-Instruct/retrieval_4.jsonl"
    )
    assert output_path("r", "Qwen/Qwen2.5-0.5B-Instruct", "/x/2wikimqa.jsonl") == Path(
        "r/Qwen2.5-0.5B-Instruct/2wikimqa.jsonl"
    )


# --- attention per mode -----------------------------------------------------------------------------------------------


def test_flash_attention_per_mode(monkeypatch):
    import torch

    from parallel_decoding.decoding.attention import BRANCH_KERNEL
    from parallel_decoding.runs.comparison import attention_per_mode, describe_attention

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert loading.attention_per_mode("sdpa", cpu) == {"normal": "sdpa", "parallel": "sdpa"}
    backends = loading.attention_per_mode("flash_attention_2", cpu)  # tests run Triton's interpreter
    assert backends == {"normal": BRANCH_KERNEL, "parallel": BRANCH_KERNEL}  # one kernel for sequential steps
    assert "for both modes, causal for sequential steps, branch-aware for tree steps" in describe_attention(backends)
    # on a GPU with flash_attn installed the default is still the project's kernel for both modes ...
    assert attention_per_mode("flash_attention_2", BRANCH_KERNEL, cuda, False, False, True) == backends
    # ... and stock flash-attn for normal decoding only on request
    stock = attention_per_mode("flash_attention_2", BRANCH_KERNEL, cuda, True, False, True)
    assert stock == {"normal": "flash_attention_2", "parallel": BRANCH_KERNEL}
    assert "normal decoding uses stock flash-attn" in describe_attention(stock)
    with pytest.raises(UsageError, match="--normal_stock_flash_attn needs a CUDA device"):
        loading.attention_per_mode("flash_attention_2", cpu, normal_stock_flash_attn=True)
    with pytest.raises(UsageError, match="needs --attn_implementation flash_attention_2"):
        loading.attention_per_mode("sdpa", cpu, normal_stock_flash_attn=True)
    with pytest.raises(ValueError, match="needs a CUDA device"):
        attention_per_mode("flash_attention_2", BRANCH_KERNEL, cpu, False, False, False)


def test_flash_attention_rows_run_one_kernel_in_both_modes(model_dir, tokenizer):
    """Under Triton's interpreter (slow: a two-token prompt, three tokens per mode, run_row without the CLI)."""
    import torch
    from transformers import AutoModelForCausalLM

    backends = loading.attention_per_mode("flash_attention_2", torch.device("cpu"))
    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation=backends["normal"]).eval()
    seen = []
    model.register_forward_pre_hook(lambda module, args: seen.append(module.config._attn_implementation))
    row = comparison.run_row(
        model, tokenizer, {"prompt": "Hi"}, "Hi", comparison.MODES, backends, {"max_new_tokens": 3, "do_sample": False}
    )
    assert row["error"] is None and row["normal_length"] == row["parallel_length"] == 3
    assert row["normal_response"] == row["parallel_response"]  # no block: the same sequential steps, same kernel
    assert row["normal_attention"] == row["parallel_attention"] == "branch_attention" and row["first_mode"] == "normal"
    assert set(seen) == {"branch_attention"} and len(seen) >= 6


@pytest.mark.skipif("not __import__('torch').cuda.is_available()", reason="the Triton kernel needs a CUDA device")
def test_cli_flash_attention_on_gpu(tmp_path, model_dir):
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "generate.py"),
            "--task",
            "retrieval",
            "--max_samples",
            "2",
            "--attn_implementation",
            "flash_attention_2",
            *_args(model_dir, tmp_path),
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
        env={k: v for k, v in __import__("os").environ.items() if k != "TRITON_INTERPRET"},
    )
    assert proc.returncode == 0, proc.stderr
    assert "the project's Triton kernel (branch_attention) for both modes" in proc.stderr
    rows = _read(tmp_path / "tiny-qwen2" / "retrieval_4.jsonl")
    assert len(rows) == 2 and all(r["error"] is None and r["parallel_length"] >= 1 for r in rows)


def test_compile_setting_and_arena_size():
    import torch

    args = generate.parse_args(["--task", "retrieval"])
    assert args.compile == "auto"
    assert compile_setting(args, torch.device("cuda")) is True
    assert compile_setting(args, torch.device("cpu")) is False  # measured: compiling costs more than it saves
    args = generate.parse_args(["--task", "retrieval", "--compile", "off"])
    assert compile_setting(args, torch.device("cuda")) is False
    args = generate.parse_args(["--task", "retrieval", "--attn_implementation", "flash_attention_2"])
    assert compile_setting(args, torch.device("cuda")) is False  # auto: the Triton kernel runs eagerly
    assert kv_capacity_for(1, max([120, 300, 90]) + 64) == 300 + 64  # the arena of a run at batch size 1
    for split in (["--tp"], ["--device_map", "auto"]):  # auto: the arena holds every head on one device
        args = generate.parse_args(["--task", "retrieval", *split])
        assert compile_setting(args, torch.device("cuda")) is False
        assert compile_refusal(args).startswith(f"--compile on with {split[0]} is not supported")
    assert compile_refusal(generate.parse_args(["--task", "retrieval"])) is None


def test_kv_capacity_needs_the_compiled_path(tmp_path, model_dir, capsys, monkeypatch):
    """--kv_capacity sizes the compiled path's arena: refused in one line where that path is off, before the model
    loads (--compile auto is off on this CPU)."""
    _no_model_load(monkeypatch)
    base = ["--model_path", str(model_dir), "--output_dir", str(tmp_path), "--task", "retrieval"]  # --compile auto
    assert "--kv_capacity must be >= 1, got 0" in _bad_input(capsys, [*base, "--kv_capacity", "0"])
    needs = (
        "--kv_capacity sizes the KV arena of the compiled path, so it needs that path (--compile on; auto is on "
        "for CUDA"
    )
    assert f"{needs}), not --compile off" in _bad_input(capsys, [*base, "--kv_capacity", "64", "--compile", "off"])
    assert f"{needs}, off on a CPU)" in _bad_input(capsys, [*base, "--kv_capacity", "64"])
    assert "--kv_capacity needs --attn_implementation sdpa or eager" in _bad_input(
        capsys, [*base, "--kv_capacity", "64", "--attn_implementation", "flash_attention_2"]
    )
    assert "--kv_capacity with --device_map is not supported" in _bad_input(
        capsys, [*base, "--kv_capacity", "64", "--device_map", "auto"]
    )
    assert not list(tmp_path.rglob("*.jsonl"))


def test_rows_that_do_not_fit_the_kv_capacity_fail_alone(tmp_path, capsys, monkeypatch):
    """--compile on with an arena smaller than prompt + --max_new_tokens: every row records the arena's error in
    each mode and the run exits 1, as a run whose rows all failed does. Only the one-row bucket is compiled."""
    from transformers import AutoTokenizer

    from parallel_decoding import chat_prompt_ids
    from parallel_decoding.decoding import arena

    if not generate.DEFAULT_MODEL_PATH.is_dir():
        pytest.skip(f"the embedded model {generate.DEFAULT_MODEL_PATH} is not in this checkout yet")
    real_prepare, capacities = arena.prepare_fast_decoder, []

    def one_bucket(model, capacity=None, buckets=arena.BUCKETS, warm_up=False, compile=True):
        capacities.append(capacity)
        return real_prepare(model, capacity, buckets=(1,), warm_up=warm_up, compile=compile)

    monkeypatch.setattr(arena, "prepare_fast_decoder", one_bucket)
    argv = [
        "--task",
        "retrieval",
        "--max_samples",
        "2",
        "--max_new_tokens",
        str(MAX_NEW_TOKENS),
        "--compile",
        "on",
        "--kv_capacity",
        "260",
        "--output_dir",
        str(tmp_path),
    ]  # the prompts have 250 to 252 tokens
    assert generate.main(argv) == 1
    assert capacities == [260]
    err = capsys.readouterr().err
    assert "compile: on; KV arena of 260 tokens (--kv_capacity); compiling the step for every bucket" in err
    rows = _read(tmp_path / generate.DEFAULT_MODEL_PATH.name / "retrieval_4.jsonl")
    assert len(rows) == 2
    tokenizer = AutoTokenizer.from_pretrained(generate.DEFAULT_MODEL_PATH)
    for i, row in enumerate(rows):
        assert row["normal_response"] is None and row["parallel_response"] is None
        n = len(chat_prompt_ids(tokenizer, row["full_prompt"]))
        assert row["error"] == "; ".join(
            f"{mode}: ArenaFullError: a prompt of {n} tokens and {MAX_NEW_TOKENS} new tokens needs "
            f"{n + MAX_NEW_TOKENS} KV slots but the arena holds 260; make it larger"
            for mode in comparison.mode_order(i, comparison.MODES)
        )
        assert f"row {i}: {row['error']}" in err
        assert "kv_capacity" not in row["settings"]  # it changes which rows fit, not what a row holds
    assert "2 selected rows, 2 rows in " in err and "(2 with errors this run)" in err


@pytest.mark.parametrize(
    "script, message",
    [
        ("generate.py", "generate.py: interrupted while loading; no results file was changed"),
        ("eval.py", "eval.py: interrupted while loading"),
    ],
)
def test_a_ctrl_c_while_the_libraries_load_is_one_line(script, message):
    """Both CLIs spend seconds importing torch before main() runs; a Ctrl-C there exits 130 with one line."""
    code = (
        "import builtins, runpy\n"
        "real_import = builtins.__import__\n"
        "def interrupted(name, *args, **kwargs):\n"
        "    if name.startswith('parallel_decoding'):\n"
        "        raise KeyboardInterrupt  # as if Ctrl-C came while the project (and torch) were importing\n"
        "    return real_import(name, *args, **kwargs)\n"
        "builtins.__import__ = interrupted\n"
        f"runpy.run_path({script!r}, run_name='__main__')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 130
    assert proc.stderr.strip() == message


def test_branch_attention_is_the_kernel_flag_and_flash_attention_2_its_alias():
    """Both spellings are one choice, recorded as the reference's, so a results file resumes under either."""
    by_name = generate.parse_args(["--task", "retrieval", "--attn_implementation", "branch_attention"])
    by_alias = generate.parse_args(["--task", "retrieval", "--attn_implementation", "flash_attention_2"])
    assert by_name.attn_implementation == by_alias.attn_implementation == "flash_attention_2"
    assert run_settings(by_name) == run_settings(by_alias)
