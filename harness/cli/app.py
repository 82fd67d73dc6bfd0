"""`unimem-bench`: list methods and tasks, run the method x task grid, build the reference model."""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING

from rich.console import Console
from rich.table import Table

from unimem_bench.harness.cli import report
from unimem_bench.harness.cli.finetune import add_finetune_parsers, cmd_finetune, cmd_finetune_plot
from unimem_bench.harness.models.llama2c import Llama2cFormatError
from unimem_bench.harness.models.resolve import ModelSourceError
from unimem_bench.harness.reporting.results import Order, ResultsFormatError
from unimem_bench.harness.runtime.distributed import is_main_process
from unimem_bench.methods import METHODS, PAPER_CONTEXT, ConfigError, HookError, describe
from unimem_bench.methods.registry import UnknownNameError
from unimem_bench.tasks import TASKS, TaskArgError, TaskOptions
from unimem_bench.tasks.arguments import parse_task_arg, read_task_args_yaml, task_args

if TYPE_CHECKING:
    from unimem_bench.harness.evaluation.runner import RunRequest

# Errors that mean "bad input": printed as one line, exit status 2, no traceback.
USER_ERRORS = (ConfigError, UnknownNameError, HookError, ModelSourceError, Llama2cFormatError, FileNotFoundError,
               TaskArgError, ResultsFormatError)


def registry_order() -> Order:
    """Tables and figures list methods and tasks in the registries' order (vanilla first, as `list` does)."""
    return Order(methods=tuple(METHODS.names()), tasks=tuple(TASKS.names()))


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
    add_run_arguments(run)

    build = sub.add_parser("build-reference", help="build (or rebuild) the embedded reference model")
    build.add_argument("--force", action="store_true", help="rebuild even if it is cached")

    # Listed for --help only: main() hands everything after `lm-eval` to lm-eval verbatim (argparse's REMAINDER
    # cannot take arguments that start with a dash).
    sub.add_parser("lm-eval", add_help=False,
                   help="lm-eval's own CLI with the `unimem` model registered: unimem-bench lm-eval --model unimem "
                        "--model_args pretrained=PATH,method=NAME --tasks TASK ...")
    add_finetune_parsers(sub)
    add_analysis_parsers(sub)
    report.register(sub)
    return parser


def add_run_arguments(run: argparse.ArgumentParser) -> None:
    """The flags shared by `run` and `sweep` (all but --methods)."""
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


def add_analysis_parsers(sub: argparse._SubParsersAction) -> None:
    """`sweep`, `leaderboard` and `plot`."""
    from unimem_bench.harness.sweeps.presets import PRESETS

    sweep = sub.add_parser("sweep", help="run a method over a grid of config values, each point a normal run")
    sweep.add_argument("--method", "--methods", dest="methods", required=True, help="a method or a comma list")
    sweep.add_argument("--preset", choices=list(PRESETS), help="a study of the paper: " + "; ".join(
        f"{name}: {p.description}" for name, p in PRESETS.items()))
    sweep.add_argument("--vary", action="append", default=[], metavar="FIELD=V1,V2",
                       help="a swept field, e.g. reading.topk=0,4,8 or injection.layers=0-1,[0,2],all (repeatable)")
    sweep.add_argument("--zip", action="store_true", help="pair the i-th values of every --vary (default: grid)")
    sweep.add_argument("--name", default=None, help="sweep name under <out>/sweeps/ (default: derived)")
    sweep.add_argument("--finetune", type=Path, default=None, metavar="RECIPE",
                       help="fine-tune each point with this recipe (recipes/*.yaml) first, then evaluate its export")
    sweep.add_argument("--workers", type=positive_int, default=1, help="points run at once (default: 1)")
    sweep.add_argument("--backend", choices=["local", "ray"], default="local",
                       help="local processes, or tasks on Ray (pip install 'unimem-bench[ray]')")
    sweep.add_argument("--ray-address", default=None,
                       help="Ray cluster address (`auto`, ray://host:10001); default: start a local instance")
    add_run_arguments(sweep)

    board = sub.add_parser("leaderboard", help="paper-style tables (methods x tasks) from <out>/leaderboard.csv")
    plot = sub.add_parser("plot", help="figures (PNG and SVG) from <out>/leaderboard.csv and the saved sweeps")
    for p in (board, plot):
        p.add_argument("--out", type=Path, default=Path("results"), help="results folder (default: results/)")
        p.add_argument("--model", default=None, help="only models whose id contains this")
        p.add_argument("--tasks", default=None, help="only these tasks (comma list)")
        p.add_argument("--methods", default=None, help="only these methods (comma list)")
        p.add_argument("--metric", default=None, help="the metric (default: each task's headline metric)")
    board.add_argument("--format", dest="fmt", choices=["rich", "markdown", "csv"], default="rich",
                       help="what to print (default: rich tables)")
    board.add_argument("--markdown", type=Path, default=None, help="also write the tables as Markdown here")
    board.add_argument("--csv", type=Path, default=None, help="also write the tables as CSV here")
    plot.add_argument("--sweep", action="append", default=None, help="only this sweep's figure (repeatable)")
    plot.add_argument("--plots-dir", type=Path, default=None, help="where figures go (default: <out>/plots)")
    plot.add_argument("--formats", default="png,svg", help="comma list of file formats (default: png,svg)")


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


def run_request(args: argparse.Namespace) -> RunRequest:
    from unimem_bench.harness.evaluation.runner import RunRequest

    entries = read_task_args_yaml(args.task_args_file) if args.task_args_file else []
    entries += [parse_task_arg(text) for text in args.task_args]
    options = TaskOptions(data_dir=args.data_dir, max_docs=args.max_docs, max_tokens=args.max_tokens,
                          batch_size=args.batch_size, task_args=tuple(entries))
    return RunRequest(methods=args.methods, tasks=args.tasks, model=args.model, segment_len=args.segment_len,
                      overrides=tuple(args.overrides), options=options, seed=args.seed, out=args.out,
                      device=args.device)


def cmd_run(args: argparse.Namespace, console: Console) -> int:
    from unimem_bench.harness.evaluation.runner import plan_run, run_grid, summary_rows
    from unimem_bench.harness.reporting.figures import plot_run

    req = run_request(args)
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
    for figure in plot_run(req.out, run_ids, order=registry_order()):  # from the files the runner wrote
        console.print(f"plot: {figure}")
    return 0


def cmd_sweep(args: argparse.Namespace, console: Console, argv: list[str]) -> int:
    from unimem_bench.harness.reporting.tables import render_rich, sweep_tables
    from unimem_bench.harness.sweeps.execute import run_sweep
    from unimem_bench.harness.sweeps.plan import SweepRequest, plan_sweep
    from unimem_bench.harness.sweeps.presets import parse_vary

    if args.backend == "ray" and importlib.util.find_spec("ray") is None:
        raise ConfigError("--backend ray needs Ray: pip install 'unimem-bench[ray]' (or drop --backend ray)")
    if args.ray_address and args.backend != "ray":
        raise ConfigError("--ray-address only applies with --backend ray")
    req = SweepRequest(base=run_request(args), axes=tuple(parse_vary(v) for v in args.vary), preset=args.preset,
                       zipped=args.zip, name=args.name, finetune=args.finetune)
    plan = plan_sweep(req)
    try:
        results = run_sweep(plan, console, workers=args.workers, backend=args.backend, ray_address=args.ray_address,
                            argv=argv)
    except KeyboardInterrupt:
        console.print(f"[yellow]interrupted[/yellow]: every finished point is kept in {args.out}; run the same "
                      "command again to resume")
        return 130
    for table in sweep_tables(args.out, plan.name, registry_order()):
        render_rich(table, console, title=f"Sweep {plan.name}")
    failed = [r for r in results if r.error]
    if failed:
        console.print(f"[red]{len(failed)} point(s) failed[/red]; the others are recorded. Re-run to retry them.")
        return 1
    return 0


def cmd_analysis(args: argparse.Namespace, console: Console) -> int:
    def names(text: str | None) -> list[str] | None:
        return [t.strip() for t in text.split(",") if t.strip()] if text else None

    filters = {"model": args.model, "tasks": names(args.tasks), "methods": names(args.methods), "metric": args.metric}
    if args.command == "leaderboard":
        from unimem_bench.harness.reporting.tables import show

        show(args.out, console, fmt=args.fmt, markdown=args.markdown, csv=args.csv, order=registry_order(), **filters)
        return 0
    from unimem_bench.harness.reporting.figures import plot_results

    written = plot_results(args.out, args.plots_dir, sweeps=args.sweep, formats=names(args.formats) or ["png"],
                           order=registry_order(), **filters)
    for path in written:
        console.print(f"wrote {path}", highlight=False)
    return 0


def cmd_lm_eval(argv: list[str]) -> int:
    from unimem_bench.harness.evaluation.lm_eval_model import (
        run_lm_eval_cli,  # importing it registers `unimem` with lm-eval
    )

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
            from unimem_bench.harness.models.reference import build_reference

            console.print(f"reference model: {build_reference(force=args.force, console=console)}")
            return 0
        if args.command == "sweep":
            return cmd_sweep(args, console, argv)
        if args.command in ("leaderboard", "plot"):
            return cmd_analysis(args, console)
        if args.command == report.NAME:
            return args.func(args, SimpleNamespace(out=console))
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
