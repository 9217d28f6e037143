"""Start ``python -m parallel_decoding.serve`` as a subprocess on 127.0.0.1 and wait for its address (for the load
benchmark and the tests; a user starts the server from the command line)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
READY = re.compile(r"serving \S+ at (http://127\.0\.0\.1:\d+/v1)")  # the line server.serve prints once listening


class ServerDidNotStart(RuntimeError):
    """The server exited, or printed no address in time; the message ends with its last lines of output."""


def start_server(flags: list[str], timeout: float, env: dict[str, str] | None = None) -> tuple[subprocess.Popen, str]:
    """A server subprocess with ``flags`` on 127.0.0.1, port 0 (any free one), and ``env`` added to this process's
    environment; returns it and its /v1 URL."""
    command = [sys.executable, "-m", "parallel_decoding.serve", "--host", "127.0.0.1", "--port", "0", *flags]
    proc = subprocess.Popen(
        command,
        cwd=REPO,
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
        env={**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"},
    )
    assert proc.stderr is not None  # stderr=PIPE
    deadline, lines = time.monotonic() + timeout, []
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:
            break
        lines.append(line)
        match = READY.search(line)
        if match:
            threading.Thread(target=proc.stderr.read, daemon=True).start()  # keep draining the pipe
            return proc, match.group(1)
    proc.kill()
    proc.wait(30)
    raise ServerDidNotStart("the server did not start:\n" + "".join(lines[-20:]))
