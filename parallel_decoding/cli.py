"""What the command lines share: bad input is one line on stderr and exit status 2, never a traceback."""

from __future__ import annotations

import argparse

EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130
EXIT_ROWS_FAILED = 1  # generate.py: every row it decoded in this run failed


class UsageError(Exception):
    """Bad input detected before anything is written: printed as one line, exit status 2."""


class OneLineArgumentParser(argparse.ArgumentParser):
    """argparse whose errors raise :class:`UsageError` (one line) instead of printing usage and exiting."""

    def error(self, message):
        raise UsageError(message)


def one_line(error: BaseException) -> str:
    """`Type: first line of the message`, for logs and the `error` column."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__
