"""parallel_decoding.results: reading, matching, settings, atomic writes with the umask's mode, the one-writer lock."""

import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from parallel_decoding.runs.results import (
    ResultsError,
    ResultsFile,
    ResultsLocked,
    SettingsMismatch,
    atomic_file,
    match_existing,
    read_numbered_rows,
    read_rows,
    settings_difference,
    write_rows_atomic,
    write_text_atomic,
)

REPO = Path(__file__).resolve().parents[1]
RESULT_COLUMNS = ("full_prompt", "normal_response", "error", "settings")


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# --- reading ----------------------------------------------------------------------------------------------------


def test_read_rows_drops_a_torn_last_line_only(tmp_path):
    path = tmp_path / "r.jsonl"
    assert read_rows(path) == []  # no file yet
    path.write_text('{"a": 1}\n\n{"a": 2}\n{"a": 3, "b": "cut sh', encoding="utf-8")
    assert read_rows(path) == [{"a": 1}, {"a": 2}]
    assert read_numbered_rows(path) == [(1, {"a": 1}), (3, {"a": 2})]
    with pytest.raises(ResultsError, match=rf"^{path}:4: does not parse as JSON \(Unterminated string"):
        read_rows(path, tolerate_torn_tail=False)
    path.write_text('{"a": 1}\n{"a": \n{"a": 3}\n', encoding="utf-8")
    with pytest.raises(ResultsError, match=rf"^{path}:2: does not parse as JSON"):
        read_rows(path)
    path.write_text('{"a": 1}\n[1, 2]\n', encoding="utf-8")
    with pytest.raises(ResultsError, match=rf"^{path}:2: expected a JSON object, got list$"):
        read_rows(path)
    path.write_text('{"full_prompt": "p"}\n{"a": 1}\n', encoding="utf-8")
    with pytest.raises(ResultsError, match=rf"^{path}:2: row has no 'full_prompt' column$"):
        read_rows(path, required_column="full_prompt")


def test_non_utf8_file_is_one_line_error(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes('{"prompt": "a"}\n{"prompt": "caf\u00e9"}\n'.encode("latin-1"))
    with pytest.raises(ResultsError) as info:
        read_rows(path)
    assert str(info.value) == f"{path}:2: not UTF-8 text (invalid continuation byte at byte 31)"


def test_rows_match_by_their_dataset_columns_also_after_eval_scored_them():
    dataset = [{"_id": 1, "prompt": "a"}, {"_id": 2, "prompt": "b"}, {"_id": 3, "prompt": "c"}]
    scored = {
        "_id": 2,
        "prompt": "b",
        "full_prompt": "B",
        "normal_response": "x",
        "error": None,
        "settings": {"seed": None},
        "normal_score": 4,
        "normal_rationale": "ok",
    }
    stray = {"_id": 9, "prompt": "z", "full_prompt": "Z", "error": None}
    results, unmatched = match_existing(dataset, [stray, scored], RESULT_COLUMNS)
    assert results == [None, scored, None]
    assert unmatched == [stray]


# --- writing ----------------------------------------------------------------------------------------------------


def test_atomic_writes_get_the_umask_mode_and_keep_an_existing_mode(tmp_path):
    rows_path, text_path, binary_path = tmp_path / "new" / "r.jsonl", tmp_path / "s.md", tmp_path / "p.png"
    write_rows_atomic(rows_path, [{"a": 1}, {"b": "é"}])
    write_text_atomic(text_path, "# summary\n")
    with atomic_file(binary_path, "wb") as f:
        f.write(b"\x89PNG")
    expected = 0o666 & ~_umask()
    for path in (rows_path, text_path, binary_path):
        assert stat.S_IMODE(path.stat().st_mode) == expected, path
    assert rows_path.read_text(encoding="utf-8") == '{"a": 1}\n{"b": "é"}\n'
    assert binary_path.read_bytes() == b"\x89PNG"
    os.chmod(text_path, 0o600)  # a user's choice is kept on rewrite
    write_text_atomic(text_path, "# again\n")
    assert stat.S_IMODE(text_path.stat().st_mode) == 0o600


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "r.jsonl"
    write_rows_atomic(path, [{"a": 1}])
    with pytest.raises(TypeError):
        write_rows_atomic(path, [{"a": 2}, {"b": object()}])
    assert path.read_text() == '{"a": 1}\n'
    assert os.listdir(tmp_path) == ["r.jsonl"]


# --- settings ---------------------------------------------------------------------------------------------------


def test_settings_difference_names_old_and_new_values():
    old = {"model": "/m/a", "do_sample": False, "seed": None, "modes": ["normal", "parallel"]}
    new = {"model": "/m/a", "do_sample": True, "seed": 0, "modes": ["parallel"]}
    assert settings_difference(old, new) == [
        "do_sample: false -> true",
        'modes: ["normal", "parallel"] -> ["parallel"]',
        "seed: null -> 0",
    ]
    assert settings_difference(old, dict(old)) == []
    # a setting recorded only by a newer version counts as the value it had before (implied), else null
    assert settings_difference(old, {**old, "compile": False}, implied={"compile": False}) == []
    assert settings_difference(old, {**old, "compile": True}, implied={"compile": False}) == ["compile: false -> true"]


def test_check_settings(tmp_path):
    results = ResultsFile(tmp_path / "r.jsonl", RESULT_COLUMNS)
    settings = {"max_new_tokens": 16, "dtype": "float32"}
    legacy = {"prompt": "a", "full_prompt": "A"}
    same = {"prompt": "b", "full_prompt": "B", "settings": dict(settings)}
    assert results.check_settings([legacy, same, legacy], settings) == 2  # rows that record none: counted, kept
    other = {"prompt": "c", "full_prompt": "C", "settings": {"max_new_tokens": 64, "dtype": "bfloat16"}}
    with pytest.raises(SettingsMismatch) as info:
        results.check_settings([same, other], settings)
    assert str(info.value) == (
        f'{tmp_path / "r.jsonl"} holds rows made with other settings (dtype: "bfloat16" -> "float32"; '
        "max_new_tokens: 64 -> 16); pass --overwrite to replace them, or another --output_dir to keep both"
    )


# --- the lock ---------------------------------------------------------------------------------------------------


def test_one_writer_per_file(tmp_path):
    results = ResultsFile(tmp_path / "out" / "r.jsonl")
    with results.locked():
        assert results.lock_path.read_text() == f"{os.getpid()}\n"
        with pytest.raises(ResultsLocked) as info:  # flock locks per open file: a second open conflicts too
            with ResultsFile(tmp_path / "out" / "r.jsonl").locked(hint="or use another --output_dir"):
                pass
        assert str(info.value) == (
            f"{results.path} is being written by another run (pid {os.getpid()}); or use another --output_dir"
        )
        with ResultsFile(tmp_path / "out" / "other.jsonl").locked():  # another file: its own lock
            pass
    assert not results.lock_path.exists()  # removed on release
    with results.locked():
        pass


HOLD_LOCK = """
import sys, time
from parallel_decoding.runs.results import ResultsFile
with ResultsFile(sys.argv[1]).locked():
    print("locked", flush=True)
    time.sleep(600)
"""


def test_a_killed_holder_never_blocks_the_next_run(tmp_path):
    path = tmp_path / "r.jsonl"
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(path)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "locked\n"
        with pytest.raises(ResultsLocked, match=rf"\(pid {holder.pid}\)"):
            with ResultsFile(path).locked():
                pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=60)
    assert ResultsFile(path).lock_path.exists()  # left behind by the killed run ...
    with ResultsFile(path).locked():  # ... and no obstacle: the kernel released its flock
        pass


def test_taking_the_lock_removes_what_a_killed_writer_left(tmp_path):
    results = ResultsFile(tmp_path / "r.jsonl")
    left = [tmp_path / ".r.jsonl.k2j3.tmp", tmp_path / ".r.jsonl.shard-0.oh86tat7.tmp"]  # a killed atomic write each
    kept = [tmp_path / ".r.jsonl2.abcd.tmp", tmp_path / ".other.jsonl.abcd.tmp", tmp_path / "r.jsonl.shard-1"]
    for path in left + kept:
        path.write_text("half a row")
    with results.locked():
        assert not any(path.exists() for path in left)
        assert all(path.read_text() == "half a row" for path in kept)  # other files' temp files, and shards, stay


# --- data-parallel shards ---------------------------------------------------------------------------------------


def test_shards_merge_at_their_dataset_index_and_are_removed(tmp_path):
    results_file = ResultsFile(tmp_path / "r.jsonl", RESULT_COLUMNS, required_column="full_prompt")
    rows = [{"q": "a"}, {"q": "b"}, {"q": "c"}, {"q": "a"}]  # rows 0 and 3 have the same content
    done = [dict(row, full_prompt=row["q"], normal_response=f"answer {i}", error=None) for i, row in enumerate(rows)]
    results_file.write([dict(done[1], error="normal: RuntimeError: out of memory")])
    shard = results_file.shard(1)
    shard.add(3, done[3])
    assert results_file.shard(1).entries == [{"index": 3, "row": done[3]}]  # a reopened shard keeps its rows
    results_file.shard(4).add(1, done[1])
    stale = dict(done[2], q="changed since")  # its dataset row no longer matches: kept, as unmatched
    results_file.shard(4).add(2, stale)
    (tmp_path / "r.jsonl.shard-x").write_text("not a shard of this file\n")
    assert [p.name for p in results_file.shard_paths()] == ["r.jsonl.shard-1", "r.jsonl.shard-4"]

    results, unmatched = results_file.match(rows, results_file.read())
    assert results_file.merge_shards(rows, results, unmatched) == 2
    assert results == [None, done[1], None, done[3]]  # the shard's row replaced the file's errored one
    assert unmatched == [stale]
    assert read_rows(results_file.path) == [done[1], done[3], stale]
    assert results_file.shard_paths() == []
    assert results_file.merge_shards(rows, results, unmatched) == 0  # nothing left to merge


def test_a_bad_shard_entry_names_its_file_and_line(tmp_path):
    results_file = ResultsFile(tmp_path / "r.jsonl", RESULT_COLUMNS, required_column="full_prompt")
    shard = tmp_path / "r.jsonl.shard-0"
    shard.write_text('{"index": 0, "row": {"full_prompt": "p"}}\n{"index": -1, "row": {"full_prompt": "p"}}\n')
    with pytest.raises(ResultsError, match=rf"^{shard}:2: not a shard entry"):
        results_file.read_shards()
    shard.write_text('{"index": 0, "row": {"normal_response": "no prompt"}}\n')
    with pytest.raises(ResultsError, match=rf"^{shard}:1: not a shard entry"):
        results_file.read_shards()
