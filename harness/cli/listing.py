"""`unimem-bench list`: the methods as the paper's Table 1, and the tasks with their arguments."""

from __future__ import annotations

import argparse
from typing import Any

from rich.table import Table

from unimem_bench.harness.cli.streams import Streams
from unimem_bench.methods import METHODS, PAPER_CONTEXT, describe
from unimem_bench.tasks import TASKS
from unimem_bench.tasks.arguments import task_args

NAME = "list"


def register(sub: Any) -> None:
    parser = sub.add_parser(NAME, help="the methods (as the paper's Table 1) and the tasks")
    parser.set_defaults(func=execute)


def execute(args: argparse.Namespace, streams: Streams) -> int:
    console = streams.out
    if not console.is_terminal:
        console.width = max(console.width, 160)  # piped output: no terminal width to respect, keep rows on one line
    table = Table(title="Methods as UniMem configs (paper setting: 22 layers, 2,048-token segments)")
    table.add_column("method", no_wrap=True)
    for column in ("memory management", "writing", "reading", "injection", "training", "position", "paper"):
        table.add_column(column)
    for name in METHODS.names():
        method = METHODS.get(name)
        d = describe(method.config(PAPER_CONTEXT))
        table.add_row(name, d["management"], d["writing"], d["reading"], d["injection"], d["training"],
                      d["position"], method.paper)
    console.print(table)
    tasks = Table(title="Tasks (arguments: --task-arg \\[task.]key=value)")
    for column in ("task", "version", "headline metric", "arguments (defaults)"):
        tasks.add_column(column)
    for name in TASKS.names():
        task = TASKS.get(name)
        arguments = ", ".join(f"{k}={format_arg(v)}" for k, v in task_args(task).items())
        tasks.add_row(name, task.version, task.headline, arguments)
    console.print(tasks)
    return 0


def format_arg(value: object) -> str:
    if isinstance(value, tuple):
        return ",".join(map(str, value)) or "''"
    return str(value) if value != "" else "''"
