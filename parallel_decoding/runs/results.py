"""The results file of one run: reading earlier rows, matching them to the dataset, the settings they were made with,
atomic rewrites, and the one-writer lock. generate.py and eval.py both go through this module and write results
files by no other means.

Settings are stored per row, in a ``settings`` column, not in a sidecar file: a row then says by itself how it was
made, a copied or concatenated file cannot lose its description, and rows of several shards or runs can be checked
one by one. The cost is small: a row's settings are short next to the responses it holds.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import glob
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

SETTINGS_COLUMN = "settings"
MODES = ("normal", "parallel")
JUDGE_COLUMNS = tuple(f"{mode}_{field}" for mode in MODES for field in ("score", "rationale"))  # written by eval.py

# The process umask, read once (os.umask can only be read by setting it). New files get 0o666 & ~umask, as open()
# would give them; tempfile.mkstemp's 0600 is meant for secrets, and a results file holds none.
_UMASK = os.umask(0o022)
os.umask(_UMASK)


class ResultsError(Exception):
    """A results file that cannot be used as it is: the message is one line naming the file (and line)."""


class ResultsLocked(ResultsError):
    """Another live process holds the results file's lock."""


class SettingsMismatch(ResultsError):
    """Earlier rows were made with other settings than the current run's."""


# --- atomic writes ----------------------------------------------------------------------------------------------


@contextlib.contextmanager
def atomic_file(path, mode: str = "w"):
    """A file object for ``path`` that replaces it only when the block ends without an exception: readers (and a
    crash) see the old file or the new one, never half. The new file keeps the old one's permission bits, or gets
    the umask's (0644 under the usual 022) when it is created."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, path.stat().st_mode & 0o777 if path.exists() else 0o666 & ~_UMASK)
        encoding = None if "b" in mode else {"encoding": "utf-8", "newline": "\n"}
        with os.fdopen(fd, mode, **(encoding or {})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_text_atomic(path, text: str) -> None:
    with atomic_file(path) as f:
        f.write(text)


def write_rows_atomic(path, rows: list) -> None:
    """All rows as JSON lines, replacing ``path`` atomically."""
    with atomic_file(path) as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


# --- reading and matching ---------------------------------------------------------------------------------------


def read_numbered_rows(path, required_column: str | None = None, tolerate_torn_tail: bool = True) -> list:
    """(line number, row) for each JSON object of a jsonl file ([] if it does not exist), blank lines skipped.

    A last line that starts like a row but does not parse is dropped when ``tolerate_torn_tail`` (the writer is
    atomic, but a copy or a full disk can cut a file short); anything else that does not parse, a line that is not
    an object, a row without ``required_column`` or a file that is not UTF-8 raises ResultsError naming file:line.
    """
    path = Path(path)
    if not path.exists():
        return []
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        lineno = e.object[: e.start].count(b"\n") + 1
        raise ResultsError(f"{path}:{lineno}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise ResultsError(f"{path}: cannot read ({e.strerror})") from None
    lines = text.splitlines()
    rows = []
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            if tolerate_torn_tail and lineno == len(lines) and line.startswith("{"):
                continue
            raise ResultsError(f"{path}:{lineno}: does not parse as JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise ResultsError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
        if required_column is not None and required_column not in row:
            raise ResultsError(f"{path}:{lineno}: row has no {required_column!r} column")
        rows.append((lineno, row))
    return rows


def read_rows(path, required_column: str | None = None, tolerate_torn_tail: bool = True) -> list:
    """The rows of read_numbered_rows, without their line numbers."""
    return [row for _, row in read_numbered_rows(path, required_column, tolerate_torn_tail)]


def row_key(row: dict, result_columns) -> str:
    """Identity of a dataset row: its own columns, i.e. all but the result, settings and judge columns."""
    derived = set(result_columns) | {SETTINGS_COLUMN} | set(JUDGE_COLUMNS)
    return json.dumps({k: v for k, v in row.items() if k not in derived}, sort_keys=True, ensure_ascii=False)


def match_existing(rows: list, existing: list, result_columns) -> tuple:
    """Place earlier result rows at the index of the dataset row they were made from.

    Returns (results, unmatched): results[i] is the earlier result of rows[i] or None; unmatched are earlier rows
    that belong to no dataset row (kept in the file, never silently dropped)."""
    by_key = {}
    for result in existing:
        by_key.setdefault(row_key(result, result_columns), []).append(result)
    results = []
    for row in rows:
        earlier = by_key.get(row_key(row, result_columns))
        results.append(earlier.pop(0) if earlier else None)
    unmatched = [r for group in by_key.values() for r in group]
    return results, unmatched


# --- settings ---------------------------------------------------------------------------------------------------


def _show(value) -> str:
    return json.dumps(value, ensure_ascii=False)


def settings_difference(recorded: dict, current: dict, implied: dict | None = None) -> list:
    """``name: old -> new`` for every setting whose recorded value differs from the current one.

    A setting absent from ``recorded`` (a file written before that setting was recorded) counts as
    ``implied[name]``, the value it had then (e.g. no compilation), else as null."""
    implied = implied or {}
    differences = []
    for name in sorted(set(recorded) | set(current)):
        old = recorded.get(name, implied.get(name))
        new = current.get(name, implied.get(name))
        if old != new:
            differences.append(f"{name}: {_show(old)} -> {_show(new)}")
    return differences


# --- data-parallel shards --------------------------------------------------------------------------------------

SHARD_INFIX = ".shard-"  # rank r of a data-parallel run writes <results file>.shard-<r>


class RowShard:
    """The rows one data-parallel rank has finished: ``<results file>.shard-<rank>``, one line per row,
    ``{"index": <dataset row index>, "row": <result row>}``, rewritten atomically after every row, so a rank that is
    killed loses no finished row. Rows already in the file (none after ``merge_shards``) are kept."""

    def __init__(self, path):
        self.path = Path(path)
        self.entries = [entry for _, entry in read_numbered_rows(self.path)]

    def add(self, index: int, row: dict) -> None:
        self.entries.append({"index": index, "row": row})
        write_rows_atomic(self.path, self.entries)


# --- the results file -------------------------------------------------------------------------------------------


class ResultsFile:
    """One results file (jsonl) and its lock file ``<file>.lock``.

    ``with results.locked(): ...`` makes this process the file's only writer; ``read``/``write`` handle the rows;
    ``check_settings`` refuses rows made with other settings.
    """

    def __init__(self, path, result_columns=(), required_column: str | None = None):
        self.path = Path(path)
        self.lock_path = self.path.with_name(self.path.name + ".lock")
        self.result_columns = tuple(result_columns)
        self.required_column = required_column

    def __str__(self):
        return str(self.path)

    def read(self) -> list:
        return read_rows(self.path, self.required_column)

    def write(self, rows: list) -> None:
        write_rows_atomic(self.path, rows)

    def match(self, rows: list, existing: list) -> tuple:
        return match_existing(rows, existing, self.result_columns)

    # Data-parallel shards. The lock covers them: rank 0 of a data-parallel run holds the results file's lock for
    # the whole run, merges the shards it finds before the ranks start (so every run begins with none, whatever the
    # number of ranks of the run that left them) and after they all finish; the other ranks write only their own
    # shard, between those two merges.

    def shard(self, rank: int) -> RowShard:
        return RowShard(self.path.with_name(f"{self.path.name}{SHARD_INFIX}{rank}"))

    def shard_paths(self) -> list:
        prefix = self.path.name + SHARD_INFIX
        found = self.path.parent.glob(glob.escape(prefix) + "*")
        return sorted((p for p in found if p.name[len(prefix) :].isdigit()), key=lambda p: int(p.name[len(prefix) :]))

    def read_shards(self) -> list:
        """(dataset row index, result row) of every shard entry; ResultsError naming file:line for a bad entry."""
        entries = []
        for path in self.shard_paths():
            for lineno, entry in read_numbered_rows(path):
                index, row = entry.get("index"), entry.get("row")
                if (
                    not isinstance(index, int)
                    or isinstance(index, bool)
                    or index < 0
                    or not isinstance(row, dict)
                    or (self.required_column is not None and self.required_column not in row)
                ):
                    raise ResultsError(
                        f'{path}:{lineno}: not a shard entry {{"index": <row index>, "row": <result row>}}'
                    )
                entries.append((index, row))
        return entries

    def place_shard_rows(self, rows: list, results: list, unmatched: list, entries: list) -> int:
        """Put each shard row at its dataset index in ``results`` (over the results file's row there: a shard row
        is newer); a row that does not match the dataset row at its index (the dataset changed) joins
        ``unmatched``. Returns how many shard rows were placed."""
        placed = 0
        for index, row in entries:
            if index < len(rows) and row_key(row, self.result_columns) == row_key(rows[index], self.result_columns):
                results[index] = row
                placed += 1
            else:
                unmatched.append(row)
        return placed

    def merge_shards(self, rows: list, results: list, unmatched: list) -> int:
        """Move the shards' rows into ``results``/``unmatched`` and the results file (dataset order), then remove the
        shards. A crash between the write and the removals leaves rows in both, which the next merge places at the
        same index again. Returns how many shard rows were merged."""
        paths = self.shard_paths()
        if not paths:
            return 0
        merged = self.place_shard_rows(rows, results, unmatched, self.read_shards())
        self.write([r for r in results if r is not None] + unmatched)
        for path in paths:
            path.unlink(missing_ok=True)
        return merged

    def remove_shards(self) -> None:
        for path in self.shard_paths():
            path.unlink(missing_ok=True)

    def check_settings(
        self,
        existing: list,
        current: dict,
        upgrade: Callable[[dict], dict] | None = None,
        implied: dict | None = None,
    ) -> int:
        """SettingsMismatch naming every differing setting (old -> new) of the first row made with other settings
        (each row's recorded settings first go through ``upgrade``, which puts an older version's in today's terms; a
        key absent on either side reads as its ``implied`` value);
        returns how many rows record no settings (written by an earlier version or the reference implementation:
        accepted, since nothing tells what they were made with; the caller says so)."""
        unrecorded = 0
        for row in existing:
            recorded = row.get(SETTINGS_COLUMN)
            if recorded is None:
                unrecorded += 1
                continue
            if not isinstance(recorded, dict):
                raise ResultsError(f"{self.path}: a row's {SETTINGS_COLUMN!r} column is not an object")
            differences = settings_difference(upgrade(recorded) if upgrade else recorded, current, implied)
            if differences:
                raise SettingsMismatch(
                    f"{self.path} holds rows made with other settings ({'; '.join(differences)}); pass --overwrite "
                    f"to replace them, or another --output_dir to keep both"
                )
        return unrecorded

    @contextlib.contextmanager
    def locked(self, hint: str = "wait for it to finish"):
        """Hold an exclusive flock on ``<file>.lock`` for the block; ResultsLocked naming the holder's pid (and
        ending with ``hint``) if another process has it. The kernel drops the lock when its process dies, so a
        killed run never blocks the next one; the lock file is removed on release. Taking it removes the temporary
        files a killed writer of this file or of its shards left (``atomic_file``): no live process writes them
        while the lock is free, and a run's ranks write shards only after its holder has it."""
        fd = self._acquire(hint)
        for stale in self.path.parent.glob(glob.escape(f".{self.path.name}.") + "*.tmp"):
            stale.unlink(missing_ok=True)
        try:
            yield self
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.lock_path)  # before the unlock: a waiter that got this inode sees it is stale
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def _acquire(self, hint: str) -> int:
        self.lock_path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                holder = os.read(fd, 64).decode("ascii", "replace").strip() or "unknown"
                os.close(fd)
                if e.errno not in (errno.EAGAIN, errno.EACCES):
                    raise ResultsError(f"{self.lock_path}: cannot lock ({e.strerror})") from None
                raise ResultsLocked(f"{self.path} is being written by another run (pid {holder}); {hint}") from None
            # The holder we waited on may have unlinked this file before releasing it: lock the current file instead.
            try:
                if os.fstat(fd).st_ino == os.stat(self.lock_path).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        return fd
