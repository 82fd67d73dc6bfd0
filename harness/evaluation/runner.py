"""The method x task grid: validate everything cheaply, then run each unfinished cell and record it at once."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from unimem_bench.harness.evaluation import records
from unimem_bench.harness.evaluation.datastore import attach_datastore, datastore_files
from unimem_bench.harness.models.exports import SavedMethod
from unimem_bench.harness.models.resolve import (
    ModelSource,
    checkpoint_memory_layers,
    checkpoint_summary_tokens,
    load_model,
    load_model_config,
    resolve_model,
    saved_method,
    trained_context,
)
from unimem_bench.harness.runtime import environment as run_env
from unimem_bench.harness.runtime.device import default_dtype, resolve_device
from unimem_bench.harness.runtime.distributed import Processes, ShardedLM
from unimem_bench.harness.runtime.folders import check_output_folder
from unimem_bench.harness.runtime.overrides import check_override_types
from unimem_bench.methods import METHODS, ConfigError, MemoryLM, MethodContext, UniMemConfig, check_hookable
from unimem_bench.tasks import TASKS, SampleLog, Task, TaskOptions
from unimem_bench.tasks.arguments import configure


@dataclass(frozen=True)
class RunRequest:
    """Everything `unimem-bench run` was asked for."""

    methods: str | None = None
    """`all` or a comma list of method names; None: all, or a fine-tuned export's own method."""
    tasks: str = "github"
    """`all` or a comma list of task names."""
    model: str | None = None
    """`--model`; None is the embedded reference model."""
    segment_len: int | None = None
    """Tokens per segment; None = half the trained context, so one segment of memory plus the segment fit in it."""
    overrides: tuple[str, ...] = ()
    """`section.field=value` config overrides applied to every method."""
    options: TaskOptions = field(default_factory=TaskOptions)
    seed: int = 0
    out: Path = Path("results")
    device: str = "auto"


@dataclass(frozen=True)
class Cell:
    """One (method, task) result to produce."""

    method: str
    task: Task
    config: UniMemConfig
    run_id: str
    key: dict[str, Any]


@dataclass(frozen=True)
class Plan:
    source: ModelSource
    segment_len: int
    trained_context: int
    device: torch.device
    cells: list[Cell]
    saved: SavedMethod | None = None
    """The method a fine-tuned --model was trained with: its own cells use its config and learned memory."""


def plan_run(req: RunRequest) -> Plan:
    """Resolve and validate names, model, configs and data, reading no weights; raises one-line errors."""
    check_output_folder(req.out, "--out")
    check_override_types(req.overrides)
    source = resolve_model(req.model)
    saved = saved_method(source)
    method_names = METHODS.resolve(req.methods or (saved.method if saved else "all"))
    tasks = configure([TASKS.get(name) for name in TASKS.resolve(req.tasks)], req.options.task_args)
    model_config = load_model_config(source)
    check_hookable(model_config)
    context = trained_context(model_config)
    segment_len = req.segment_len or (saved.segment_len if saved else max(1, context // 2))
    if segment_len < 1:
        raise ConfigError(f"--segment-len {segment_len} must be >= 1")
    ctx = MethodContext(n_layers=model_config.num_hidden_layers, segment_len=segment_len, trained_context=context,
                        memory_layers=checkpoint_memory_layers(model_config),
                        summary_tokens=checkpoint_summary_tokens(model_config))
    configs = {}
    for name in method_names:
        config = (saved.config.with_overrides(list(req.overrides)) if saved is not None and name == saved.method
                  else METHODS.get(name).config(ctx, req.overrides))
        config.bind(n_layers=ctx.n_layers, segment_len=segment_len)
        datastore_files(config)
        configs[name] = config
    # Tasks check their data (local files, or the hub repository's file list) and what depends on the model's
    # trained context here, before any weights load.
    options = dataclasses.replace(req.options, trained_context=context)
    for task in tasks:
        task.check(options)
    cells = []
    for name, config in configs.items():
        for task in tasks:
            params = task.params(options)
            if params.get("query_mode") == "query_aware":
                config.check_query_aware()
            key = {"model": source.name, "config": config.to_dict(), "task": task.name, "version": task.version,
                   "params": params, "segment_len": segment_len, "seed": req.seed}
            cells.append(Cell(name, task, config, records.run_id(name, task.name, key), key))
    return Plan(source, segment_len, context, resolve_device(req.device), cells, saved)


def run_grid(req: RunRequest, plan: Plan, console: Console) -> list[str]:
    """Run every unfinished cell of `plan`; returns the run ids of all cells (finished before or now)."""
    todo = [c for c in plan.cells if not records.is_finished(req.out, c.run_id)]
    skipped = len(plan.cells) - len(todo)
    if skipped:
        console.print(f"[dim]{skipped} of {len(plan.cells)} results already in {req.out}: skipped[/dim]")
    if todo:
        _run_cells(req, plan, todo, console)
    return [c.run_id for c in plan.cells]


def _run_cells(req: RunRequest, plan: Plan, todo: list[Cell], console: Console) -> None:
    model, tokenizer = load_model(plan.source, device=plan.device, dtype=default_dtype(plan.device), console=console)
    env = run_env.environment(seed=req.seed, device=str(plan.device), model=plan.source.name)
    leaderboard = req.out / "leaderboard.csv"
    # Under `accelerate launch` documents are split across processes; the main one alone writes.
    processes = Processes.join(cpu=plan.device.type == "cpu")
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TimeRemainingColumn()]
    with Progress(*columns, console=console, disable=not processes.is_main) as progress:
        grid = progress.add_task("results", total=len(todo))
        for method in dict.fromkeys(c.method for c in todo):
            cells = [c for c in todo if c.method == method]
            with MemoryLM(model, cells[0].config, segment_len=plan.segment_len,
                          trained_context=plan.trained_context) as lm:
                if plan.saved is not None and method == plan.saved.method:
                    plan.saved.load_into(lm)
                attach_datastore(lm, tokenizer)
                for cell in cells:
                    torch.manual_seed(req.seed)
                    bar = progress.add_task(f"{method} / {cell.task.name} tokens", total=None)

                    def advance(n: int, total: int | None, bar: Any = bar) -> None:
                        progress.update(bar, advance=n, total=total)  # total None: left as it is

                    log = SampleLog(records.partial_path(req.out, cell.run_id), write=processes.is_main)
                    reused = len(log.done)
                    if reused:
                        console.print(f"[dim]{method} / {cell.task.name}: {reused} samples finished before the "
                                      "interruption are reused[/dim]")
                    start = time.perf_counter()
                    lm.reset_usage()
                    result = cell.task.run(ShardedLM(lm, processes), tokenizer, req.options, log, progress=advance)
                    seconds = time.perf_counter() - start
                    # A compression method that never read a compressed cache would report full-cache scores.
                    lm.check_compressed()
                    if processes.is_main:
                        _record(req, plan, cell, result, seconds,
                                {**env, "reused_samples": reused, "memory_usage": lm.usage_record()}, leaderboard)
                        records.partial_path(req.out, cell.run_id).unlink(missing_ok=True)
                    processes.barrier()
                    progress.remove_task(bar)
                    progress.advance(grid)


def _record(req: RunRequest, plan: Plan, cell: Cell, result: Any, seconds: float, env: dict[str, Any],
            leaderboard: Path) -> None:
    task = cell.task
    directions = dict(task.higher_is_better)
    reported = [*result.metrics, *(r.metric for r in result.rows)]
    undeclared = sorted(set(reported) - set(directions))
    if undeclared:  # a task's own bug: every metric needs its direction declared
        raise ValueError(f"task {task.name!r} reports {', '.join(undeclared)} without declaring it in higher_is_better")
    if task.headline not in result.metrics:
        raise ValueError(f"task {task.name!r} did not report its headline metric {task.headline!r}")
    finished = run_env.now()
    record = {**env, "run_id": cell.run_id, "method": cell.method, "task": task.name, "task_version": task.version,
              "task_params": cell.key["params"], "headline": task.headline, "higher_is_better": directions,
              "segment_len": plan.segment_len, "finished": finished, "seconds": round(seconds, 3),
              "units_per_second": round(result.n / seconds, 2) if seconds else None}
    records.write_run(req.out, cell.run_id, config_yaml=cell.config.to_yaml(), record=record,
                      samples=result.samples, metrics=result.metrics)
    base = {"run_id": cell.run_id, "model": plan.source.name, "method": cell.method, "task": task.name,
            "finished": finished}
    rows = [{**base, "subtask": "", "context_len": result.context_len, "metric": metric, "value": value, "n": result.n,
             "summary": True, "headline": metric == task.headline, "higher_is_better": directions[metric]}
            for metric, value in result.metrics.items()]
    rows += [{**base, "subtask": r.subtask, "context_len": r.context_len, "metric": r.metric, "value": r.value,
              "n": r.n, "summary": False, "headline": False, "higher_is_better": directions[r.metric]}
             for r in result.rows]
    records.merge_leaderboard(leaderboard, rows)


def summary_rows(req: RunRequest, run_ids: list[str]) -> list[dict[str, Any]]:
    """The summary rows of these runs, one dict per (method, task) with its metrics as keys (registry order of
    methods within each task)."""
    frame = records.read_leaderboard(req.out / "leaderboard.csv")
    frame = frame[frame["run_id"].isin(run_ids) & frame["summary"]]
    table = []
    for (method, task), group in frame.groupby(["method", "task"]):
        row: dict[str, Any] = {"method": method, "task": task, "n": int(group["n"].iloc[0])}
        row.update(dict(zip(group["metric"], group["value"].astype(float), strict=True)))
        table.append(row)
    order = {c: i for i, c in enumerate(METHODS.names())}
    return sorted(table, key=lambda r: (r["task"], order.get(r["method"], len(order))))
