"""`unimem-bench report`: one self-contained HTML page (leaderboard, figures, run records) from a results folder."""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `report` and its flags."""
    report = subparsers.add_parser("report", help="one self-contained static HTML page from a results folder")
    report.add_argument("--results", type=Path, default=Path("results"), help="results folder (default: results/)")
    report.add_argument("--out", type=Path, default=None, metavar="FILE.html",
                        help="where the page goes (default: <results>/report.html)")
    report.add_argument("--title", default="unimem-bench results", help="the page's title")
    return report


def cmd_report(args: argparse.Namespace, console: Console) -> int:
    from unimem_bench.harness.cli.app import registry_order
    from unimem_bench.harness.reporting.html import write_report

    if args.out is not None and args.out.is_dir():
        raise FileNotFoundError(f"--out {args.out} is a folder: give the page's file name, e.g. {args.out}/report.html")
    page = write_report(args.results, args.out, title=args.title, order=registry_order())
    console.print(f"wrote {page} ({page.stat().st_size / 1024:,.0f} KiB)", highlight=False)
    return 0
