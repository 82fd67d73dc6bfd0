"""`unimem-bench`: evaluate long-context memory methods (run, sweep), fine-tune them, and read the results.

Argument parsing and dispatch only: each command is one module here with `register(subparsers)`, which adds its
parser and sets `func` (its `execute(args, streams) -> exit status`). A new command is a new module plus its name in
`COMMANDS`.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError, version
from types import ModuleType

from rich.console import Console

from unimem_bench.harness.cli.arguments import ArgumentParser, UsageError, read_config
from unimem_bench.harness.cli.streams import Streams, logging_to, print_error
from unimem_bench.harness.models.llama2c import Llama2cFormatError
from unimem_bench.harness.models.resolve import ModelSourceError
from unimem_bench.harness.reporting.results import ResultsFormatError
from unimem_bench.harness.runtime.distributed import is_main_process
from unimem_bench.methods import ConfigError, HookError
from unimem_bench.methods.registry import UnknownNameError
from unimem_bench.tasks import TaskArgError
from unimem_bench.tasks.data.files import DataFormatError

COMMANDS = ("listing", "run", "sweep", "leaderboard", "plot", "report", "finetune", "finetune_plot", "build_reference",
            "lm_eval")
"""Every command's module under harness/cli/, in `--help` order. A module has `NAME` (the command), `register(sub)`
(adds its parser with `set_defaults(func=execute)`) and `execute(args, streams) -> exit status`; one that takes the
rest of the command line unparsed sets `PASS_THROUGH = True`."""


def command_modules() -> list[ModuleType]:
    return [importlib.import_module(f"unimem_bench.harness.cli.{name}") for name in COMMANDS]


# Errors that mean "bad input": one line on stderr, exit status 2, no traceback. FileNotFoundError covers missing
# models, data folders and files (DataNotFoundError, DataError).
USER_ERRORS = (UsageError, ConfigError, UnknownNameError, HookError, ModelSourceError, Llama2cFormatError,
               FileNotFoundError, TaskArgError, DataFormatError, ResultsFormatError)


def package_version() -> str:
    try:
        return version("unimem-bench")
    except PackageNotFoundError:  # imported from a source tree that was never installed
        return "unknown"


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="unimem-bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", action="version", version=f"unimem-bench {package_version()}")
    add_verbosity(parser, top=True)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in command_modules():
        command.register(sub)
    for command_parser in sub.choices.values():
        add_verbosity(command_parser, top=False)
    return parser


def add_verbosity(parser: argparse.ArgumentParser, *, top: bool) -> None:
    """-v/--verbose and -q/--quiet, before or after the command (after it, the subcommand's only when given)."""
    default = logging.INFO if top else argparse.SUPPRESS
    parser.add_argument("-v", "--verbose", dest="log_level", action="store_const", const=logging.DEBUG,
                        default=default, help="also debug lines on stderr")
    parser.add_argument("-q", "--quiet", dest="log_level", action="store_const", const=logging.WARNING,
                        default=default, help="no progress or status lines on stderr: results and errors only")


def parse(parser: ArgumentParser, argv: Sequence[str]) -> argparse.Namespace:
    """The parsed command line: a pass-through command takes everything after its name verbatim, and a `--config`
    file fills the command's flags that the command line leaves unset."""
    position = next((i for i, word in enumerate(argv) if not word.startswith("-")), len(argv))
    passing = {c.NAME for c in command_modules() if getattr(c, "PASS_THROUGH", False)}
    if position < len(argv) and argv[position] in passing:
        args = parser.parse_args(argv[:position + 1])
        args.passthrough = list(argv[position + 1:])
    else:
        args = parser.parse_args(argv)
    if getattr(args, "config", None) is not None:
        command_parser = parser.command_parser(args.command)
        command_parser.set_defaults(**read_config(args.config, command_parser))
        args = parser.parse_args(argv)
    args.argv = list(argv)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; returns its exit status (2: bad input, reported as one `error:` line on stderr)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    main_process = is_main_process()  # under `accelerate launch` only rank 0 prints
    try:
        args = parse(build_parser(), argv)
    except USER_ERRORS as err:
        print_error(err)
        return 2
    except SystemExit as done:  # --help, --version
        return done.code if isinstance(done.code, int) else 0
    quiet = args.log_level >= logging.WARNING
    streams = Streams.open(quiet=quiet, main_process=main_process)
    # Under --quiet the progress console is silent, but warnings still reach stderr.
    log_console = Console(stderr=True, quiet=not main_process) if quiet else streams.err
    import matplotlib

    matplotlib.use("Agg")  # the command line draws into files only; library plotting code leaves this to its caller
    with logging_to(log_console, args.log_level):
        try:
            return args.func(args, streams)
        except USER_ERRORS as err:
            if main_process:
                print_error(err)
            return 2
        except BrokenPipeError:  # `unimem-bench list | head`: the reader has what it wanted; no traceback
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # the exit's flush writes nowhere
            return 0


if __name__ == "__main__":
    sys.exit(main())
