"""`unimem-bench report`: one self-contained HTML page (leaderboard, figures, run records) from a results folder.

A command module in the split CLI's shape: `register(subparsers)` adds the parser and sets `func`, `execute(args,
streams)` runs it (`streams.out`: the console for results, here the path of the page written).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

NAME = "report"


def register(sub: Any) -> None:
    parser = sub.add_parser(NAME, help="one self-contained static HTML page from a results folder")
    parser.add_argument("--results", type=Path, default=Path("results"), help="results folder (default: results/)")
    parser.add_argument("--out", type=Path, default=None, metavar="FILE.html",
                        help="where the page goes (default: <results>/report.html)")
    parser.add_argument("--title", default="unimem-bench results", help="the page's title")
    parser.set_defaults(func=execute)


def execute(args: argparse.Namespace, streams: Any) -> int:
    from unimem_bench.harness.reporting.html import write_report
    from unimem_bench.harness.reporting.results import Order
    from unimem_bench.methods import METHODS
    from unimem_bench.tasks import TASKS

    if args.out is not None and args.out.is_dir():
        raise FileNotFoundError(f"--out {args.out} is a folder: give the page's file name, e.g. {args.out}/report.html")
    order = Order(methods=tuple(METHODS.names()), tasks=tuple(TASKS.names()))  # as `list` and the tables show them
    page = write_report(args.results, args.out, title=args.title, order=order)
    streams.out.print(f"wrote {page} ({page.stat().st_size / 1024:,.0f} KiB)", highlight=False, soft_wrap=True)
    return 0
