"""`unimem-bench leaderboard`: paper-style tables (methods x tasks) from <out>/leaderboard.csv; the result filters
it shares with `plot`."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from unimem_bench.harness.cli.arguments import ArgumentParser
from unimem_bench.harness.cli.streams import Streams

NAME = "leaderboard"


def register(sub: Any) -> None:
    parser = sub.add_parser(NAME, help="paper-style tables (methods x tasks) from <out>/leaderboard.csv")
    add_filter_arguments(parser)
    parser.add_argument("--format", dest="fmt", choices=["rich", "markdown", "csv"], default="rich",
                        help="what to print (default: rich tables)")
    parser.add_argument("--markdown", type=Path, default=None, help="also write the tables as Markdown here")
    parser.add_argument("--csv", type=Path, default=None, help="also write the tables as CSV here")
    parser.set_defaults(func=execute)


def add_filter_arguments(parser: ArgumentParser) -> None:
    """The results folder and the rows to read from it (`leaderboard` and `plot`)."""
    parser.add_argument("--out", type=Path, default=Path("results"), help="results folder (default: results/)")
    parser.add_argument("--model", default=None, help="only models whose id contains this")
    parser.add_argument("--tasks", default=None, help="only these tasks (comma list)")
    parser.add_argument("--methods", default=None, help="only these methods (comma list)")
    parser.add_argument("--metric", default=None, help="the metric (default: each task's headline metric)")


def names(text: str | None) -> list[str] | None:
    """A comma list, or None for "all"."""
    return [t.strip() for t in text.split(",") if t.strip()] if text else None


def filters(args: argparse.Namespace) -> dict[str, Any]:
    return {"model": args.model, "tasks": names(args.tasks), "methods": names(args.methods), "metric": args.metric}


def execute(args: argparse.Namespace, streams: Streams) -> int:
    from unimem_bench.harness.cli.order import registry_order
    from unimem_bench.harness.reporting.tables import show

    show(args.out, streams.out, fmt=args.fmt, markdown=args.markdown, csv=args.csv, order=registry_order(),
         **filters(args))
    return 0
