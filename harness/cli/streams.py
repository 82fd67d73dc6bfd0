"""Where the command line writes: results and tables on stdout, progress, log lines and errors on stderr (as lm-eval,
pip and git do), so `unimem-bench ... > table.txt` keeps only results and `2>/dev/null` only hides chatter."""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from rich.console import Console

LOGGER = "unimem_bench"
"""The package's logger: `--verbose` shows its debug lines, `--quiet` only its warnings."""


@dataclass(frozen=True)
class Streams:
    """The two consoles a command writes to."""

    out: Console
    """stdout: results, tables, the paths of files written."""
    err: Console
    """stderr: progress bars and status lines (silent under --quiet and on non-main processes of a launch)."""

    @classmethod
    def open(cls, *, quiet: bool, main_process: bool) -> Streams:
        return cls(out=Console(quiet=not main_process), err=Console(stderr=True, quiet=quiet or not main_process))


class ConsoleHandler(logging.Handler):
    """Log records as plain lines on a rich console (so they interleave cleanly with its progress bars)."""

    def __init__(self, console: Console) -> None:
        super().__init__()
        self.console = console

    def emit(self, record: logging.LogRecord) -> None:
        prefix = f"{record.levelname.lower()}: " if record.levelno >= logging.WARNING else ""
        self.console.print(prefix + self.format(record), markup=False, highlight=False, soft_wrap=True)


@contextmanager
def logging_to(console: Console, level: int) -> Iterator[None]:
    """The package's log lines go to `console` at `level` for the duration (restored after: no global state left)."""
    logger = logging.getLogger(LOGGER)
    handler = ConsoleHandler(console)
    before = logger.level
    logger.addHandler(handler)
    logger.setLevel(level)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(before)


def print_error(message: object) -> None:
    """The one line a failed command leaves: `error: ...` on stderr (never wrapped, never markup)."""
    print("error: " + " ".join(str(message).split()), file=sys.stderr)
