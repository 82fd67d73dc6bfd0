"""`unimem-bench finetune-plot`: held-out perplexity after N fine-tuning tokens, per method (the paper's Appendix C),
from fine-tuning run folders."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from rich.table import Table

from unimem_bench.harness.cli.streams import Streams

NAME = "finetune-plot"


def register(sub: Any) -> None:
    parser = sub.add_parser(NAME, help="held-out perplexity after N fine-tuning tokens, per method (the paper's "
                                       "Appendix C), from fine-tuning run folders")
    parser.add_argument("runs", nargs="+", type=Path, help="run folders written by `unimem-bench finetune`")
    parser.add_argument("--out", type=Path, default=Path("results/plots/finetune_data_scale.png"))
    parser.set_defaults(func=execute)


def execute(args: argparse.Namespace, streams: Streams) -> int:
    from unimem_bench.harness.training.log import data_scale_table, plot_data_scale

    path = plot_data_scale(args.runs, args.out)
    table = data_scale_table(args.runs)
    out = Table(title="held-out perplexity after N fine-tuning tokens")
    for column in ("method", "step", "tokens", "heldout_ppl"):
        out.add_column(column, justify="left" if column == "method" else "right")
    for row in table.itertuples():
        out.add_row(row.method, str(row.step), f"{row.tokens:,}", f"{row.heldout_ppl:.4f}")
    streams.out.print(out)
    streams.out.print(f"plot: {path}", highlight=False, soft_wrap=True)
    return 0
