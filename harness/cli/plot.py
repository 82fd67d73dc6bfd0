"""`unimem-bench plot`: figures (PNG and SVG) from <out>/leaderboard.csv and the saved sweeps."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from unimem_bench.harness.cli.leaderboard import add_filter_arguments, filters, names
from unimem_bench.harness.cli.streams import Streams

NAME = "plot"


def register(sub: Any) -> None:
    parser = sub.add_parser(NAME, help="figures (PNG and SVG) from <out>/leaderboard.csv and the saved sweeps")
    add_filter_arguments(parser)
    parser.add_argument("--sweep", action="append", default=None, help="only this sweep's figure (repeatable)")
    parser.add_argument("--plots-dir", type=Path, default=None, help="where figures go (default: <out>/plots)")
    parser.add_argument("--formats", default="png,svg", help="comma list of file formats (default: png,svg)")
    parser.set_defaults(func=execute)


def execute(args: argparse.Namespace, streams: Streams) -> int:
    from unimem_bench.harness.cli.order import registry_order
    from unimem_bench.harness.reporting.figures import plot_results

    written = plot_results(args.out, args.plots_dir, sweeps=args.sweep, formats=names(args.formats) or ["png"],
                           order=registry_order(), **filters(args))
    for path in written:
        streams.out.print(f"wrote {path}", highlight=False, soft_wrap=True)
    return 0
