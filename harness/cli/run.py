"""`unimem-bench run`: evaluate methods on tasks; writes run records and the leaderboard (shared flags: `sweep`)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.table import Table

from unimem_bench.harness.cli.arguments import ArgumentParser, add_config_option, positive_int
from unimem_bench.harness.cli.streams import Streams
from unimem_bench.tasks import TaskOptions
from unimem_bench.tasks.arguments import parse_task_arg, read_task_args_yaml

if TYPE_CHECKING:
    from unimem_bench.harness.evaluation.runner import RunRequest

NAME = "run"
log = logging.getLogger(__name__)


def register(sub: Any) -> None:
    parser = sub.add_parser(NAME, help="evaluate methods on tasks; writes run records and the leaderboard")
    parser.add_argument("--methods", default=None,
                        help="`all` or a comma list (default: all, or a fine-tuned --model's own method)")
    add_run_arguments(parser)
    add_config_option(parser)
    parser.set_defaults(func=execute)


def add_run_arguments(parser: ArgumentParser) -> None:
    """The flags shared by `run` and `sweep` (all but --methods)."""
    parser.add_argument("--tasks", default="github", help="`all` or a comma list (default: github)")
    parser.add_argument("--model", default=None,
                        help="local HF folder, hub id, or llama2.c .bin (default: the embedded reference model)")
    parser.add_argument("--data-dir", type=Path, default=None, help="local data for the tasks")
    parser.add_argument("--segment-len", type=positive_int, default=None,
                        help="tokens per segment (default: half the model's trained context)")
    parser.add_argument("--max-docs", "--limit", type=positive_int, default=None,
                        help="documents (samples) per task, or per dataset for LongBench")
    parser.add_argument("--max-tokens", type=positive_int, default=None, help="tokens per document")
    parser.add_argument("--batch-size", type=positive_int, default=4, help="documents streamed together")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                        help="config override for every method, e.g. --set reading.topk=8 (repeatable)")
    parser.add_argument("--task-arg", dest="task_args", action="append", default=[], metavar="[TASK.]KEY=VALUE",
                        help="task argument, e.g. --task-arg niah.lengths=512,1024 (repeatable; `unimem-bench list` "
                             "shows each task's arguments)")
    parser.add_argument("--task-args", dest="task_args_file", type=Path, default=None, metavar="YAML",
                        help="task arguments from a YAML file: {key: value} or {task: {key: value}}")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    parser.add_argument("--out", type=Path, default=Path("results"), help="results folder (default: results/)")


def run_request(args: argparse.Namespace) -> RunRequest:
    """The `RunRequest` the shared flags describe."""
    from unimem_bench.harness.evaluation.runner import RunRequest

    entries = read_task_args_yaml(args.task_args_file) if args.task_args_file else []
    entries += [parse_task_arg(text) for text in args.task_args]
    options = TaskOptions(data_dir=args.data_dir, max_docs=args.max_docs, max_tokens=args.max_tokens,
                          batch_size=args.batch_size, task_args=tuple(entries))
    return RunRequest(methods=args.methods, tasks=args.tasks, model=args.model, segment_len=args.segment_len,
                      overrides=tuple(args.overrides), options=options, seed=args.seed, out=args.out,
                      device=args.device)


def execute(args: argparse.Namespace, streams: Streams) -> int:
    from unimem_bench.harness.cli.order import registry_order
    from unimem_bench.harness.evaluation.runner import plan_run, run_grid, summary_rows
    from unimem_bench.harness.reporting.figures import plot_run

    req = run_request(args)
    plan = plan_run(req)
    log.info("model %s, segment %d tokens, %d results to produce", plan.source.name, plan.segment_len,
             len(plan.cells))
    try:
        run_ids = run_grid(req, plan, streams.err)
    except KeyboardInterrupt:
        log.warning("interrupted: every finished result is kept in %s; run the same command again to resume",
                    req.out / "leaderboard.csv")
        return 130
    rows = summary_rows(req, run_ids)
    table = Table(title=f"Results ({plan.source.name})")
    headlines = [cell.task.headline for cell in plan.cells]
    metrics = [m for m in dict.fromkeys(("token_ppl", "bits_per_byte", "word_ppl", *headlines))
               if any(m in r for r in rows)]
    for column in ("method", "task", *metrics, "n"):
        table.add_column(column, justify="left" if column in ("method", "task") else "right")
    for row in rows:
        table.add_row(row["method"], row["task"], *(f"{row[m]:.4g}" if m in row else "-" for m in metrics),
                      f"{row['n']:,}")
    streams.out.print(table)
    streams.out.print(f"leaderboard: {req.out / 'leaderboard.csv'}", highlight=False, soft_wrap=True)
    for figure in plot_run(req.out, run_ids, order=registry_order()):
        streams.out.print(f"plot: {figure}", highlight=False, soft_wrap=True)
    return 0
