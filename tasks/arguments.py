"""Task arguments: the fields a task lets users set, from `--task-arg [task.]key=value` or a YAML file.

A task is a frozen dataclass; fields marked with `arg(...)` are its arguments (documented by their docstrings), parsed
from strings by their type hints. `key=value` applies to every selected task that has the field, `task.key=value` to
one task; a key no selected task knows is an error that names the close matches.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml

TASK_ARG = "task_arg"


class TaskArgError(ValueError):
    """A task argument that does not exist or does not parse; one line naming it and the fix."""


def arg(default: Any) -> Any:
    """A dataclass field that users may set as a task argument."""
    if isinstance(default, list | dict | set):
        raise TypeError("task arguments must have immutable defaults (use a tuple)")
    return dataclasses.field(default=default, metadata={TASK_ARG: True})


def arg_names(task: Any) -> list[str]:
    return [f.name for f in dataclasses.fields(task) if f.metadata.get(TASK_ARG)]


def task_args(task: Any) -> dict[str, Any]:
    """The task's current argument values (recorded in its params, so they decide its run id)."""
    return {name: getattr(task, name) for name in arg_names(task)}


def convert(value: Any, hint: Any, where: str) -> Any:
    """Parse `value` (a CLI string, or a YAML scalar/list) as the type `hint`."""
    origin, params = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("", "none", "null")):
            return None
        return convert(value, next(p for p in params if p is not type(None)), where)
    if origin is tuple:
        items = value.split(",") if isinstance(value, str) else list(value)
        return tuple(convert(item.strip() if isinstance(item, str) else item, params[0], where)
                     for item in items if not (isinstance(item, str) and not item.strip()))
    if origin is typing.Literal:
        if value not in params:
            raise TaskArgError(f"{where}={value!r}: choose one of {', '.join(map(str, params))}")
        return value
    try:
        if hint is bool:
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("1", "true", "yes", "on"):
                return True
            if str(value).lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        return hint(value)
    except (TypeError, ValueError):
        raise TaskArgError(f"{where}={value!r} is not a valid {getattr(hint, '__name__', hint)}") from None


def parse_task_arg(text: str) -> tuple[str, str, str]:
    """`[task.]key=value` -> (task or "", key, value)."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise TaskArgError(f"--task-arg {text!r}: expected key=value or task.key=value")
    task, _, name = key.strip().rpartition(".")
    return task, name, value


def read_task_args_yaml(path: Path) -> list[tuple[str, str, Any]]:
    """A YAML mapping of `key: value` (every task) and/or `task: {key: value}` (one task)."""
    if not path.is_file():
        raise FileNotFoundError(f"--task-args {path}: no such file")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise TaskArgError(f"--task-args {path}{where} is not valid YAML ({getattr(err, 'problem', None) or err}): "
                           "fix the file") from None
    if not isinstance(data, dict):
        raise TaskArgError(f"--task-args {path}: expected a mapping of key: value or task: {{key: value}}")
    entries: list[tuple[str, str, Any]] = []
    for key, value in data.items():
        if isinstance(value, dict):
            entries.extend((str(key), str(k), v) for k, v in value.items())
        else:
            entries.append(("", str(key), value))
    return entries


def configure(tasks: list[Any], entries: Iterable[tuple[str, str, Any]]) -> list[Any]:
    """The tasks with the argument entries applied; raises TaskArgError naming an unknown task or key."""
    by_name = {t.name: t for t in tasks}
    changes: dict[str, dict[str, Any]] = {t.name: {} for t in tasks}
    for task_name, key, value in entries:
        if task_name and task_name not in by_name:
            raise TaskArgError(f"task argument {task_name}.{key}: task {task_name!r} is not selected "
                               f"(selected: {', '.join(by_name)})")
        targets = [by_name[task_name]] if task_name else [t for t in tasks if key in arg_names(t)]
        if not targets or key not in arg_names(targets[0]):
            known = sorted({n for t in (targets or tasks) for n in arg_names(t)})
            close = difflib.get_close_matches(key, known, n=3)
            hint = f"did you mean {', '.join(close)}?" if close else f"known: {', '.join(known) or 'none'}"
            raise TaskArgError(f"unknown task argument {key!r} for {task_name or 'the selected tasks'}; {hint}")
        for task in targets:
            hints = typing.get_type_hints(type(task))
            changes[task.name][key] = convert(value, hints[key], f"{task.name}.{key}")
    try:
        return [dataclasses.replace(t, **changes[t.name]) if changes[t.name] else t for t in tasks]
    except ValueError as err:  # a task's __post_init__ rejected the combination
        raise TaskArgError(str(err)) from None
