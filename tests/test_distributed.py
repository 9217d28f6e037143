"""generate.py beyond one process: --tp and --data_parallel under torchrun (2 processes, gloo, CPU), --device_map.

Each torchrun case pays two interpreter starts and a process-group rendezvous, so the cases are few and each checks
several things. The reference is one plain in-process run of the same rows.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import generate
from parallel_decoding.runs import distributed

REPO = Path(__file__).resolve().parents[1]
MODEL = generate.DEFAULT_MODEL_PATH  # the embedded model: 4 query heads, 2 key/value heads
ROWS = 4


def _args(max_samples=ROWS):
    return ["--task", "retrieval", "--max_samples", str(max_samples), "--max_new_tokens", "40"]


# Columns that depend on the tokens decoded; timings and speeds differ from run to run.
ANSWER_COLUMNS = (
    "full_prompt",
    "normal_response",
    "normal_length",
    "parallel_response",
    "parallel_length",
    "num_parallel_branches",
    "stage1_response",
    "branches",
    "fallback",
    "error",
)

pytestmark = pytest.mark.skipif(not MODEL.is_dir(), reason=f"the embedded model {MODEL} is not in this checkout")


def _read(path: Path) -> list:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _answers(rows: list) -> list:
    return [{k: row[k] for k in ("_id", *ANSWER_COLUMNS)} for row in rows]


def _torchrun_command(*argv):
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        str(REPO / "generate.py"),
        *argv,
    ]


def _torchrun(*argv, timeout=240):
    return subprocess.run(_torchrun_command(*argv), capture_output=True, text=True, cwd=REPO, timeout=timeout)


@pytest.fixture(scope="module")
def single_process_rows(tmp_path_factory):
    out = tmp_path_factory.mktemp("single")
    assert generate.main([*_args(), "--output_dir", str(out)]) == 0
    return _read(out / MODEL.name / "retrieval_4.jsonl")


@pytest.fixture(scope="module")
def even_vocab_model(tmp_path_factory):
    """The embedded model with one unused row added to its (tied) embedding, 1635 -> 1636 tokens.

    Tensor parallel splits ``lm_head``'s output over the ranks; transformers 5.17 refuses a vocabulary that the
    world size does not divide (5.24 accepts it), so the sharded run and its single-process reference both use
    this copy. The tokenizer never produces the new id.
    """
    import torch
    from safetensors.torch import load_file, save_file

    model = tmp_path_factory.mktemp("even-vocab") / "tiny-qwen2-even-vocab"
    model.mkdir()
    for path in MODEL.iterdir():
        if path.name not in ("config.json", "model.safetensors"):
            (model / path.name).symlink_to(path)
    weights = load_file(MODEL / "model.safetensors")
    config = json.loads((MODEL / "config.json").read_text())
    assert config["tie_word_embeddings"] and config["vocab_size"] % 2 == 1
    embedding = weights["model.embed_tokens.weight"]  # (V, hidden)
    weights["model.embed_tokens.weight"] = torch.cat([embedding, torch.zeros_like(embedding[:1])])  # (V + 1, hidden)
    save_file(weights, model / "model.safetensors")
    config["vocab_size"] += 1
    (model / "config.json").write_text(json.dumps(config))
    return model


def test_tensor_parallel_gives_the_single_process_answers(tmp_path, even_vocab_model):
    model = ["--model_path", str(even_vocab_model)]
    assert generate.main([*_args(max_samples=2), *model, "--output_dir", str(tmp_path / "single")]) == 0
    single_process_rows = _read(tmp_path / "single" / even_vocab_model.name / "retrieval_4.jsonl")
    proc = _torchrun("--tp", *_args(max_samples=2), *model, "--output_dir", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    rows = _read(tmp_path / even_vocab_model.name / "retrieval_4.jsonl")
    assert _answers(rows) == _answers(single_process_rows)
    assert rows[0]["num_parallel_branches"] == 4  # the branch stage ran, with its 4D mask, on the sharded model
    assert all(r["normal_time"] > 0 and r["parallel_time"] > 0 for r in rows)
    # rank 0 alone logs: one copy of each line
    assert proc.stderr.count("generate: attention: sdpa for both modes") == 1
    assert proc.stderr.count("sharded over 2 processes (tensor parallel, cpu)") == 1
    assert proc.stderr.count("2 selected rows, 2 rows in ") == 1
    assert sorted(p.name for p in (tmp_path / even_vocab_model.name).iterdir()) == ["retrieval_4.jsonl"]


def test_tensor_parallel_refuses_heads_the_world_size_does_not_divide(tmp_path):
    model = tmp_path / "six-heads"
    model.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "model.safetensors"):
        (model / name).symlink_to(MODEL / name)
    config = json.loads((MODEL / "config.json").read_text())
    config.update(num_attention_heads=6, num_key_value_heads=3)  # head_dim 32; refused before the weights load
    (model / "config.json").write_text(json.dumps(config))
    proc = _torchrun("--tp", "--model_path", str(model), *_args(), "--output_dir", str(tmp_path / "out"))
    assert proc.returncode != 0
    assert "exitcode  : 2" in proc.stderr  # torchrun's report of the workers' exit status
    ours = [line for line in proc.stderr.splitlines() if line.startswith("generate.py: error: ")]
    assert ours == [
        f"generate.py: error: --tp over 2 processes: {model} has num_key_value_heads=3, which 2 does "
        f"not divide; use a --nproc_per_node that divides 3"
    ]
    assert not list((tmp_path / "out").rglob("*.jsonl*"))  # no results file, no shard


def test_stop_frees_the_control_group_before_the_interpreter_exits(tmp_path):
    """A gloo group left for the interpreter's exit can abort the process (its worker threads still hold a finished
    collective's tensors and need the GIL): stop() destroys the control group and the default one itself."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=(tmp_path / "store").as_uri(), rank=0, world_size=1)
    control = distributed.ControlGroup(dist.new_group(backend="gloo"))
    ranks = distributed.Ranks(distributed.TENSOR_PARALLEL, 0, 0, 1, control)
    gathered = [None]
    dist.all_gather_object(gathered, "an error", group=ranks.control_group)
    assert gathered == ["an error"]
    distributed.stop(ranks)
    assert not dist.is_initialized()
    with pytest.raises(RuntimeError, match="the control group was closed"):
        _ = ranks.control_group
    distributed.stop(ranks)  # twice is harmless (generate.py's finally after an earlier stop)


def test_head_check_counts_query_and_key_value_heads():
    from transformers import Qwen2Config

    distributed.check_heads_divide(Qwen2Config(num_attention_heads=8, num_key_value_heads=2), 2, "m")
    with pytest.raises(distributed.DistributedError, match="num_attention_heads=6, which 4 does not divide"):
        distributed.check_heads_divide(Qwen2Config(num_attention_heads=6, num_key_value_heads=2), 4, "m")
    with pytest.raises(distributed.DistributedError, match="num_key_value_heads=2, which 4 does not divide"):
        distributed.check_heads_divide(Qwen2Config(num_attention_heads=8, num_key_value_heads=2), 4, "m")


# --- data parallel ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", [distributed.DATA_PARALLEL, distributed.TENSOR_PARALLEL])
def test_each_rank_makes_its_cuda_device_the_current_one(monkeypatch, mode):
    """On GPUs every process starts on cuda:0; a data- or tensor-parallel rank switches to cuda:LOCAL_RANK when it
    picks its device (torch.cuda faked here: this machine has no GPU). A plain run and a CPU device change nothing."""
    import torch

    from parallel_decoding.runs import loading

    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", calls.append)
    args = generate.parse_args(["--task", "retrieval", *(["--tp"] if mode == distributed.TENSOR_PARALLEL else [])])
    device, dtype = loading.choose_device(args, distributed.Ranks(mode, rank=1, local_rank=1, world_size=2))
    assert device == torch.device("cuda", 1) and dtype == torch.bfloat16
    assert calls == [torch.device("cuda", 1)]
    loading.choose_device(args)  # one process: the device torch already has
    distributed.set_current_device(distributed.Ranks(mode, 1, 1, 2), torch.device("cpu"))
    assert calls == [torch.device("cuda", 1)]


def _rank_pid(launcher_pid: int, rank: int) -> int | None:
    """The pid of the torchrun worker whose environment says RANK=rank."""
    for task in Path(f"/proc/{launcher_pid}/task").iterdir():
        for pid in (task / "children").read_text().split():
            try:
                environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if f"RANK={rank}".encode() in environ:
                return int(pid)
    return None


def test_data_parallel_survives_a_killed_rank_and_gives_the_single_process_answers(tmp_path, single_process_rows):
    out = tmp_path / MODEL.name / "retrieval_4.jsonl"
    shard1 = out.with_name("retrieval_4.jsonl.shard-1")  # rank 1 decodes rows 1 and 3
    launcher = subprocess.Popen(
        _torchrun_command("--data_parallel", *_args(), "--output_dir", str(tmp_path)),
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 240
        while not (shard1.exists() and shard1.read_text().count("\n") == 1):
            assert launcher.poll() is None and time.monotonic() < deadline, "rank 1 never finished a row"
            time.sleep(0.1)
        os.kill(_rank_pid(launcher.pid, rank=1), signal.SIGKILL)  # rank 1 dies after its first row
        launcher.communicate(timeout=120)  # torchrun then stops rank 0
    finally:
        if launcher.poll() is None:
            launcher.kill()
    assert launcher.returncode != 0
    finished = {entry["index"]: entry["row"] for shard in out.parent.glob("*.shard-*") for entry in _read(shard)}
    # rank 1's first row is kept; the kill left the run unfinished (rank 1 may have begun row 3, not more)
    assert 1 in finished and len(finished) < ROWS

    proc = _torchrun("--data_parallel", *_args(), "--output_dir", str(tmp_path))  # the same command again
    assert proc.returncode == 0, proc.stderr
    assert f"merged {len(finished)} rows from the shards of an interrupted data-parallel run" in proc.stderr
    assert f"resuming: {len(finished)} rows already done" in proc.stderr
    rows = _read(out)
    assert _answers(rows) == _answers(single_process_rows)  # dataset order, the one-process answers
    assert all(rows[i] == row for i, row in finished.items())  # rows finished before the kill were kept, not redone
    assert sorted(p.name for p in out.parent.iterdir()) == ["retrieval_4.jsonl"]


def test_shards_of_any_rank_count_resume_without_torchrun(tmp_path, single_process_rows, capsys):
    """Shards left by a 3-rank run (one with a torn last line) and a results file: a plain run merges them."""
    out = tmp_path / MODEL.name / "retrieval_4.jsonl"
    out.parent.mkdir(parents=True)
    out.write_text(json.dumps(single_process_rows[3]) + "\n")
    entries = {0: [0], 1: [1], 2: [2]}  # rank -> dataset rows it finished
    for rank, indices in entries.items():
        lines = [json.dumps({"index": i, "row": single_process_rows[i]}) for i in indices]
        torn = '{"index": 9, "row": {"_id"' if rank == 2 else ""
        out.with_name(f"retrieval_4.jsonl.shard-{rank}").write_text("\n".join(lines) + "\n" + torn)
    assert generate.main(["--data_parallel", *_args(), "--output_dir", str(tmp_path)]) == 0
    err = capsys.readouterr().err
    assert "merged 3 rows from the shards of an interrupted data-parallel run" in err
    assert "nothing to do: the 4 selected rows are done; 4 rows are in" in err
    assert _read(out) == single_process_rows
    assert sorted(p.name for p in out.parent.iterdir()) == ["retrieval_4.jsonl"]


# --- bad combinations: one line, exit 2, before any model is loaded --------------------------------------------


def _bad(capsys, argv) -> str:
    assert generate.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("generate.py: error: ")
    return err


def test_bad_combinations_exit_2_with_one_line(tmp_path, capsys, monkeypatch):
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    out = ["--output_dir", str(tmp_path)]
    assert "--tp with --data_parallel is not supported" in _bad(capsys, [*_args(), *out, "--tp", "--data_parallel"])
    assert "--device_map with --tp is not supported" in _bad(capsys, [*_args(), *out, "--tp", "--device_map", "auto"])
    assert "--device_map with --data_parallel is not supported" in _bad(
        capsys, [*_args(), *out, "--data_parallel", "--device_map", "auto"]
    )
    assert "--device with --tp" in _bad(capsys, [*_args(), *out, "--tp", "--device", "cpu"])
    assert "--offload_folder is only used with --device_map" in _bad(capsys, [*_args(), *out, "--offload_folder", "x"])
    missing = tmp_path / "map.json"
    assert f"--device_map {missing}: not one of auto, balanced" in _bad(
        capsys, [*_args(), *out, "--device_map", str(missing)]
    )
    missing.write_text('["model.layers.0"]')
    assert f"--device_map {missing}: expected a JSON object" in _bad(
        capsys, [*_args(), *out, "--device_map", str(missing)]
    )
    missing.write_text('{"model.embed_tokens": "cpu", "model.layers": "gpu7"}')
    assert f"--device_map {missing}: 'model.layers' -> 'gpu7' is not a device of this machine" in _bad(
        capsys, [*_args(), *out, "--device_map", str(missing)]
    )
    assert "--tp shards the model over the processes torchrun starts" in _bad(capsys, [*_args(), *out, "--tp"])
    monkeypatch.setenv("WORLD_SIZE", "2")  # torchrun's environment, without --tp or --data_parallel
    assert "torchrun started 2 processes: pass --tp" in _bad(capsys, [*_args(), *out])
    assert not list(tmp_path.rglob("*.jsonl*"))


# --- device map ------------------------------------------------------------------------------------------------


def test_device_map_with_disk_offload_gives_the_plain_answers(tmp_path, single_process_rows, capsys):
    """Layer 1 offloaded to disk: accelerate's hooks load them per forward pass and move the engine's
    inputs (4D branch mask, positions) to each layer's execution device. On this CPU every device is the CPU,
    so this checks the hooked path, not a transfer between GPUs."""
    device_map = {
        "model.embed_tokens": "cpu",
        "model.rotary_emb": "cpu",
        "model.norm": "cpu",
        "lm_head": "cpu",
        **{f"model.layers.{i}": "disk" if i == 1 else "cpu" for i in range(4)},
    }
    map_file = tmp_path / "device_map.json"
    map_file.write_text(json.dumps(device_map))
    argv = [
        *_args(max_samples=1),
        "--modes",
        "parallel",
        "--output_dir",
        str(tmp_path),
        "--device_map",
        str(map_file),
        "--offload_folder",
        str(tmp_path / "offload"),
    ]
    assert generate.main(argv) == 0
    assert "spread by --device_map over cpu, disk" in capsys.readouterr().err
    (row,) = _read(tmp_path / MODEL.name / "retrieval_4.jsonl")
    parallel_columns = [c for c in ANSWER_COLUMNS if not c.startswith("normal_")]
    assert {c: row[c] for c in parallel_columns} == {c: single_process_rows[0][c] for c in parallel_columns}
    assert row["num_parallel_branches"] == 4
