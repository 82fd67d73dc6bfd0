"""`unimem-bench list`: the methods as the paper's Table 1 (with each one's fidelity to its original), and the tasks
with their arguments; `--format csv` prints the methods table as CSV."""

from __future__ import annotations

import argparse
import csv
from typing import Any

from rich.table import Table

from unimem_bench.harness.cli.streams import Streams
from unimem_bench.methods import METHODS, PAPER_CONTEXT, describe
from unimem_bench.tasks import TASKS
from unimem_bench.tasks.arguments import task_args

NAME = "list"


def register(sub: Any) -> None:
    parser = sub.add_parser(NAME, help="the methods (as the paper's Table 1) and the tasks")
    parser.add_argument("--format", choices=("table", "csv"), default="table",
                        help="table: methods and tasks as rich tables; csv: the methods table only, as CSV")
    parser.set_defaults(func=execute)


CSV_COLUMNS = ("method", "management", "writing", "reading", "injection", "training", "fidelity", "paper")
"""The columns of `list --format csv`."""


def method_rows() -> list[dict[str, str]]:
    """One row per registered method in the paper's setting: its four dimensions, training, fidelity and paper."""
    rows = []
    for name in METHODS.names():
        method = METHODS.get(name)
        d = describe(method.config(PAPER_CONTEXT))
        rows.append({"method": name, "management": d["management"], "writing": d["writing"], "reading": d["reading"],
                     "injection": d["injection"], "training": d["training"], "position": d["position"],
                     "fidelity": method.fidelity, "paper": f"{method.paper} {method.url}"})
    return rows


def execute(args: argparse.Namespace, streams: Streams) -> int:
    console = streams.out
    if args.format == "csv":
        if console.quiet:  # not the main process of a launch
            return 0
        writer = csv.DictWriter(console.file, fieldnames=CSV_COLUMNS, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        writer.writerows(method_rows())
        return 0
    if not console.is_terminal:
        console.width = max(console.width, 160)  # piped output: no terminal width to respect, keep rows on one line
    table = Table(title="Methods as UniMem configs (paper setting: 22 layers, 2,048-token segments)")
    table.add_column("method", no_wrap=True)
    for column in ("memory management", "writing", "reading", "injection", "training", "position"):
        table.add_column(column)
    # Fidelity lines are sentences: a table of their own keeps the dimensions table on one line per method.
    fidelity = Table(title="Fidelity to the original (exact / decoder variant / approximation: what differs)")
    for column in ("method", "fidelity", "paper"):
        fidelity.add_column(column, no_wrap=column == "method")
    for row in method_rows():
        table.add_row(row["method"], row["management"], row["writing"], row["reading"], row["injection"],
                      row["training"], row["position"])
        fidelity.add_row(row["method"], row["fidelity"], row["paper"])
    console.print(table)
    console.print(fidelity)
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
