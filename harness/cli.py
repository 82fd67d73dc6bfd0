"""`unimem-bench`: list methods and tasks, run the method x task grid, build the reference model."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

from unimem_bench.methods import METHODS, PAPER_CONTEXT, ConfigError, HookError, describe
from unimem_bench.tasks import TASKS, TaskArgError, TaskOptions
from unimem_bench.tasks.arguments import parse_task_arg, read_task_args_yaml, task_args

from .distributed import is_main_process
from .finetune_cli import add_finetune_parsers, cmd_finetune, cmd_finetune_plot
from .llama2c import Llama2cFormatError
from .models import ModelSourceError
from .registry import UnknownNameError

# Errors that mean "bad input": printed as one line, exit status 2, no traceback.
USER_ERRORS = (ConfigError, UnknownNameError, HookError, ModelSourceError, Llama2cFormatError, FileNotFoundError,
               TaskArgError)


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be >= 1")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="unimem-bench", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="the methods (as the paper's Table 1) and the tasks")

    run = sub.add_parser("run", help="evaluate methods on tasks; writes run records and the leaderboard")
    run.add_argument("--methods", default=None,
                     help="`all` or a comma list (default: all, or a fine-tuned --model's own method)")
    run.add_argument("--tasks", default="github", help="`all` or a comma list (default: github)")
    run.add_argument("--model", default=None,
                     help="local HF folder, hub id, or llama2.c .bin (default: the embedded reference model)")
    run.add_argument("--data-dir", type=Path, default=None, help="local data for the tasks")
    run.add_argument("--segment-len", type=positive_int, default=None,
                     help="tokens per segment (default: half the model's trained context)")
    run.add_argument("--max-docs", "--limit", type=positive_int, default=None,
                     help="documents (samples) per task, or per dataset for LongBench")
    run.add_argument("--max-tokens", type=positive_int, default=None, help="tokens per document")
    run.add_argument("--batch-size", type=positive_int, default=4, help="documents streamed together")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                     help="config override for every method, e.g. --set reading.topk=8 (repeatable)")
    run.add_argument("--task-arg", dest="task_args", action="append", default=[], metavar="[TASK.]KEY=VALUE",
                     help="task argument, e.g. --task-arg niah.lengths=512,1024 (repeatable; `unimem-bench list` "
                          "shows each task's arguments)")
    run.add_argument("--task-args", dest="task_args_file", type=Path, default=None, metavar="YAML",
                     help="task arguments from a YAML file: {key: value} or {task: {key: value}}")
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    run.add_argument("--out", type=Path, default=Path("results"), help="results folder (default: results/)")

    build = sub.add_parser("build-reference", help="build (or rebuild) the embedded reference model")
    build.add_argument("--force", action="store_true", help="rebuild even if it is cached")

    # Listed for --help only: main() hands everything after `lm-eval` to lm-eval verbatim (argparse's REMAINDER
    # cannot take arguments that start with a dash).
    sub.add_parser("lm-eval", add_help=False,
                   help="lm-eval's own CLI with the `unimem` model registered: unimem-bench lm-eval --model unimem "
                        "--model_args pretrained=PATH,method=NAME --tasks TASK ...")
    add_finetune_parsers(sub)
    return parser


def cmd_list(console: Console) -> None:
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
        args = ", ".join(f"{k}={format_arg(v)}" for k, v in task_args(task).items())
        tasks.add_row(name, task.version, task.headline, args)
    console.print(tasks)


def format_arg(value: object) -> str:
    if isinstance(value, tuple):
        return ",".join(map(str, value)) or "''"
    return str(value) if value != "" else "''"


def cmd_run(args: argparse.Namespace, console: Console) -> int:
    from .runner import RunRequest, plan_run, plot_run, run_grid, summary_rows

    entries = read_task_args_yaml(args.task_args_file) if args.task_args_file else []
    entries += [parse_task_arg(text) for text in args.task_args]
    options = TaskOptions(data_dir=args.data_dir, max_docs=args.max_docs, max_tokens=args.max_tokens,
                          batch_size=args.batch_size, task_args=tuple(entries))
    req = RunRequest(methods=args.methods, tasks=args.tasks, model=args.model, segment_len=args.segment_len,
                     overrides=tuple(args.overrides), options=options, seed=args.seed, out=args.out,
                     device=args.device)
    plan = plan_run(req)
    console.print(f"model [bold]{plan.source.name}[/bold], segment {plan.segment_len} tokens, "
                  f"{len(plan.cells)} results to produce")
    try:
        run_ids = run_grid(req, plan, console)
    except KeyboardInterrupt:
        console.print(f"[yellow]interrupted[/yellow]: every finished result is kept in {req.out}/leaderboard.csv; "
                      "run the same command again to resume")
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
    console.print(table)
    console.print(f"leaderboard: {req.out / 'leaderboard.csv'}")
    for figure in plot_run(req, plan):
        console.print(f"plot: {figure}")
    return 0


def cmd_lm_eval(argv: list[str]) -> int:
    from .lm_eval_model import run_lm_eval_cli  # importing it registers `unimem` with lm-eval

    return run_lm_eval_cli(argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    console = Console(quiet=not is_main_process())  # under `accelerate launch` only rank 0 prints
    try:
        if argv[:1] == ["lm-eval"]:
            return cmd_lm_eval(argv[1:])
        args = build_parser().parse_args(argv)
        if args.command == "list":
            cmd_list(console)
            return 0
        if args.command == "build-reference":
            from .reference import build_reference

            console.print(f"reference model: {build_reference(force=args.force, console=console)}")
            return 0
        if args.command == "finetune":
            return cmd_finetune(args, console)
        if args.command == "finetune-plot":
            return cmd_finetune_plot(args, console)
        return cmd_run(args, console)
    except USER_ERRORS as err:
        console.print(f"[red]error:[/red] {err}", highlight=False, soft_wrap=True)
        return 2


if __name__ == "__main__":
    sys.exit(main())
