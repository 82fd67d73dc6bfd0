"""Argument parsing shared by every command: the one positive-int parser, a parser whose errors are one line, and
`--config FILE.yaml` files holding a command's flags (flags given on the command line win)."""

from __future__ import annotations

import argparse
import difflib
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

import yaml

from unimem_bench.methods import ConfigError

# Options that steer the command line itself, never read from or written to a config file.
NOT_IN_CONFIG = ("config", "help", "version", "log_level")


class UsageError(Exception):
    """A command line argparse rejects; str() is one line naming the flag and the problem."""


def positive_int(text: str) -> int:
    """An integer >= 1 (every count and length flag of every command)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number (expected an integer >= 1)") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be >= 1")
    return value


class ArgumentParser(argparse.ArgumentParser):
    """Raises `UsageError` instead of printing usage and exiting, and records its options (`options`) so that a
    `--config` file can be checked against them."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # Set before argparse's own __init__, which adds -h/--help through add_argument.
        self.options: list[argparse.Action] = []
        self.repeatable: set[str] = set()
        """Dests of `action="append"` options (a config file gives them a list)."""
        self.declared_defaults: dict[str, Any] = {}
        """Each option's default as declared (`set_defaults`, which a config file uses, changes `Action.default`)."""
        super().__init__(*args, **kwargs)

    def add_argument(self, *args: Any, **kwargs: Any) -> argparse.Action:
        action = super().add_argument(*args, **kwargs)
        self.options.append(action)
        self.declared_defaults.setdefault(action.dest, action.default)
        if kwargs.get("action") == "append":
            self.repeatable.add(action.dest)
        return action

    def add_subparsers(self, **kwargs: Any) -> Any:
        """Subcommands, parsed by this class too (remembered for `command_parser`)."""
        self.commands = super().add_subparsers(parser_class=ArgumentParser, **kwargs)
        return self.commands

    def command_parser(self, name: str) -> ArgumentParser:
        """The parser of subcommand `name`."""
        return self.commands.choices[name]

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{self.prog}: {message} (see {self.prog} --help)")


def add_config_option(parser: ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, default=None, metavar="FILE.yaml",
                        help="flags from a YAML file ({flag: value}, e.g. max-docs: 8, set: [reading.topk=8]) or a "
                             "saved sweep definition (<out>/sweeps/<name>.yaml); flags given here win, repeatable "
                             "flags add to the file's")


def config_keys(action: argparse.Action) -> set[str]:
    """The names a config file may use for an option: its long flags without dashes, with `-` or `_`, and its dest."""
    names = {s.lstrip("-") for s in action.option_strings if s.startswith("--")} | {action.dest}
    return names | {n.replace("-", "_") for n in names} | {n.replace("_", "-") for n in names}


def read_config(path: Path, parser: ArgumentParser) -> dict[str, Any]:
    """The option values (argparse dest -> typed value) a `--config` file sets; one-line errors naming the file."""
    if not path.is_file():
        raise FileNotFoundError(f"--config {path}: no such file")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"--config {path}{where} is not valid YAML ({getattr(err, 'problem', None) or err})"
                          ) from None
    if isinstance(data, dict) and "points" in data:  # a saved sweep definition: re-run it by its flags
        if not isinstance(data.get("flags"), dict):
            raise ConfigError(f"--config {path}: this sweep definition records no flags (saved by an older "
                              "version): re-run it by its `command`")
        data = data["flags"]
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path} must be a mapping of flag: value")
    usable = [a for a in parser.options if a.option_strings and a.dest not in NOT_IN_CONFIG]
    by_key = {key: action for action in usable for key in config_keys(action)}
    values: dict[str, Any] = {}
    for key, value in data.items():
        action = by_key.get(str(key))
        if action is None:
            flags = sorted(s.lstrip("-") for a in usable for s in a.option_strings if s.startswith("--"))
            close = difflib.get_close_matches(str(key).replace("_", "-"), flags, n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"flags: {', '.join(flags)}"
            raise ConfigError(f"--config {path}: unknown flag {key!r}; {hint}")
        if value is not None:
            values[action.dest] = _typed(action, value, action.dest in parser.repeatable, f"--config {path}: {key}")
    return values


def _typed(action: argparse.Action, value: Any, repeatable: bool, where: str) -> Any:
    """A YAML value as the option would hold it had it been typed as a flag."""
    if action.nargs == 0:  # store_true, store_false, --x/--no-x
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: {value!r} is not true or false")
        return value if action.const is None else action.const if value else not action.const
    if repeatable:
        return [_one(action, item, where) for item in (value if isinstance(value, list) else [value])]
    if isinstance(value, list):  # a comma list flag (--methods a,b) written as a YAML list
        value = ",".join(str(v) for v in value)
    return _one(action, value, where)


def _one(action: argparse.Action, value: Any, where: str) -> Any:
    if isinstance(value, dict | list | bool):
        raise ConfigError(f"{where}: {value!r} is not a single value")
    text = str(value)
    try:
        typed = action.type(text) if callable(action.type) else text
    except (argparse.ArgumentTypeError, TypeError, ValueError) as err:
        raise ConfigError(f"{where}: {err}") from None
    if action.choices is not None and typed not in action.choices:
        raise ConfigError(f"{where}: {typed!r} is not one of {', '.join(map(str, action.choices))}")
    return typed


def flag_values(args: argparse.Namespace, parser: ArgumentParser, *, skip: Sequence[str] = ()) -> dict[str, Any]:
    """The options set in `args` (from flags or a config file) that differ from their declared defaults, as a
    `--config` file would hold them."""
    out: dict[str, Any] = {}
    for action in parser.options:
        if not action.option_strings or action.dest in (*NOT_IN_CONFIG, *skip):
            continue
        value = getattr(args, action.dest, None)
        if value is None or value == parser.declared_defaults[action.dest]:
            continue
        name = next(s for s in action.option_strings if s.startswith("--")).lstrip("-")
        out[name] = [str(v) if isinstance(v, Path) else v for v in value] if isinstance(value, list) else \
            str(value) if isinstance(value, Path) else value
    return out
