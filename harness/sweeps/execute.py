"""Running a planned sweep: in this process, in parallel worker processes, or as tasks on a Ray cluster.

Every backend runs each point through `run_grid`, so records and leaderboard rows are those of `unimem-bench run`.
Local workers write into the results folder directly (run folders are renamed into place; leaderboard merges hold
a file lock). Ray tasks run into a scratch folder on their node and return the run folders and rows, which this
process writes, so a cluster needs no shared filesystem (only the model and data at the same paths on every node).
An interrupt stops the workers; finished points stay, and the same command resumes.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

from rich.console import Console

from unimem_bench.harness.evaluation import records
from unimem_bench.harness.evaluation.runner import RunRequest, plan_run, run_grid
from unimem_bench.harness.sweeps.finetuned import finetuned
from unimem_bench.harness.sweeps.plan import SweepPlan, Unit, save_definition
from unimem_bench.harness.training.recipe import FinetuneRecipe

Backend = Literal["local", "ray"]


@dataclass(frozen=True)
class UnitResult:
    """What became of one unit: which it was, the time it took, and the error if it failed."""

    point: int
    """The unit's point index."""
    method: str
    """The unit's method."""
    seconds: float
    """Wall time of the unit, model loading included."""
    error: str | None = None
    """`Type: message (file:line)` when the unit failed; None when its results were recorded."""


def pending_units(plan: SweepPlan, out: Path) -> list[Unit]:
    """Units with an unfinished run id or fine-tuning run, each distinct piece of work once (two points can be the
    same config)."""
    seen: set[str] = set()
    todo = []
    for unit in plan.units:
        trained = unit.finetune is None or finetuned(unit.finetune)
        if unit.key in seen or (trained and all(records.is_finished(out, rid) for rid in unit.run_ids())):
            continue
        seen.add(unit.key)
        todo.append(unit)
    return todo


def run_units(units: list[Unit], out: Path, console: Console, *, workers: int = 1, backend: Backend = "local",
              ray_address: str | None = None) -> Iterator[UnitResult]:
    """Run `units`, yielding each result as it finishes (in completion order)."""
    if not units:
        return
    if backend == "ray":
        yield from _run_ray(units, out, ray_address, workers)
    elif workers == 1 or len(units) == 1:
        for unit in units:
            yield _run_here(unit, console)
    else:
        yield from _run_pool(units, workers)


def _timed(point: int, method: str, work: Callable[[], object]) -> UnitResult:
    start = time.perf_counter()
    try:
        work()
    except Exception as err:  # one failed point must not stop the others; reported with its point
        return UnitResult(point, method, time.perf_counter() - start, _describe(err))
    return UnitResult(point, method, time.perf_counter() - start)


def _evaluate(request: RunRequest, recipe: FinetuneRecipe | None, console: Console) -> None:
    """Fine-tune first when the point asks for it (resuming an interrupted run), then run the evaluation."""
    if recipe is not None and not finetuned(recipe):
        from unimem_bench.harness.training.trainer import finetune

        finetune(recipe, resume=(recipe.out / "finetune.json").exists(), console=console)
    run_grid(request, plan_run(request), console)


def _run_here(unit: Unit, console: Console) -> UnitResult:
    return _timed(unit.point, unit.method, lambda: _evaluate(unit.request, unit.finetune, console))


def _describe(err: BaseException) -> str:
    last = traceback.extract_tb(err.__traceback__)[-1:] if err.__traceback__ else []
    where = f" ({last[0].filename}:{last[0].lineno})" if last else ""
    return f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}{where}"


def _init_worker(threads: int) -> None:
    # Only the parent handles Ctrl-C (it terminates the pool); workers share the cores instead of each taking all.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    import torch

    torch.set_num_threads(threads)


Job = tuple[int, str, RunRequest, FinetuneRecipe | None]
"""(point, method, evaluation request, fine-tuning recipe): what a worker process or Ray task is sent."""


def _job(unit: Unit) -> Job:
    return unit.point, unit.method, unit.request, unit.finetune


def _worker(job: Job) -> UnitResult:
    point, method, request, recipe = job
    return _timed(point, method, lambda: _evaluate(request, recipe, Console(quiet=True)))


def _run_pool(units: list[Unit], workers: int) -> Iterator[UnitResult]:
    workers = min(workers, len(units))
    threads = max(1, (os.cpu_count() or 1) // workers)
    # spawn, not fork: torch and its thread pools are not fork-safe once initialised in the parent.
    pool = multiprocessing.get_context("spawn").Pool(workers, initializer=_init_worker, initargs=(threads,))
    try:
        yield from pool.imap_unordered(_worker, [_job(u) for u in units])
        pool.close()
    except BaseException:
        pool.terminate()
        raise
    finally:
        pool.join()


def _ray_task(job: Job) -> tuple[UnitResult, dict[str, dict[str, bytes]], list[dict[str, Any]]]:
    """Run one unit into a scratch folder on the worker; return its result, run folders and leaderboard rows (a
    fine-tuning run goes to its own folder, which must be on storage the driver sees)."""
    point, method, request, recipe = job
    with tempfile.TemporaryDirectory(prefix="unimem-sweep-") as tmp:
        result = _worker((point, method, replace(request, out=Path(tmp)), recipe))
        runs = Path(tmp) / "runs"
        folders = {d.name: {f.name: f.read_bytes() for f in d.iterdir() if f.is_file()}
                   for d in (runs.iterdir() if runs.exists() else []) if not d.name.startswith(".")}
        rows = records.read_leaderboard(Path(tmp) / "leaderboard.csv").to_dict("records")
    return result, folders, rows


def _run_ray(units: list[Unit], out: Path, address: str | None, workers: int) -> Iterator[UnitResult]:
    import ray

    started_here = not ray.is_initialized()
    if started_here:
        # No address: a local Ray instance with `workers` CPUs; "auto" or ray://host:port: an existing cluster.
        ray.init(address=address, num_cpus=None if address else workers, include_dashboard=False,
                 log_to_driver=False)
    remote: Any = ray.remote(num_cpus=1)(_ray_task)  # a Ray remote function (ray has no type information)
    pending = {remote.remote(_job(u)): u for u in units}
    try:
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            unit = pending.pop(done[0])
            try:
                result, folders, rows = ray.get(done[0])
            except Exception as err:  # the task or its worker died: report this point, keep the others going
                yield UnitResult(unit.point, unit.method, 0.0, _describe(err))
                continue
            for rid, files in folders.items():  # the scratch folder held this unit's runs only
                records.install_run(out, rid, files)
            if rows:
                records.merge_leaderboard(out / "leaderboard.csv", rows)
            yield result
    except BaseException:
        for ref in pending:
            ray.cancel(ref, force=True)
        raise
    finally:
        if started_here:
            ray.shutdown()


def run_sweep(plan: SweepPlan, console: Console, *, workers: int = 1, backend: Backend = "local",
              ray_address: str | None = None, argv: list[str] | None = None,
              flags: dict[str, Any] | None = None) -> list[UnitResult]:
    """Save the sweep's definition (with the command line `argv` and the `flags` that re-run it through
    `sweep --config`), then run its unfinished points; returns what became of each."""
    out = plan.request.base.out
    path = save_definition(plan, out, argv, flags)
    todo = pending_units(plan, out)
    points = len({u.point for u in plan.units})
    where = f"ray ({ray_address or 'local instance'})" if backend == "ray" else (
        f"{workers} worker processes" if workers > 1 else "this process")
    console.print(f"sweep [bold]{plan.name}[/bold]: {points} points x {len({u.method for u in plan.units})} "
                  f"method(s); {len(plan.units) - len(todo)} finished or duplicate: skipped; {len(todo)} to run in "
                  f"{where}. Definition: {path}", soft_wrap=True)
    labels = {(u.point, u.method): f"{u.method} {u.label}" for u in plan.units}
    results = []
    for i, result in enumerate(run_units(todo, out, console, workers=workers, backend=backend,
                                         ray_address=ray_address), 1):
        label = labels[(result.point, result.method)]
        if result.error:
            console.print(f"[red]{i}/{len(todo)} {label} failed[/red] after {result.seconds:.1f} s: {result.error}",
                          highlight=False)
        else:
            console.print(f"{i}/{len(todo)} {label} done in {result.seconds:.1f} s", highlight=False)
            if plan.request.finetune is not None:  # its run ids exist now: record them with the definition
                save_definition(plan, out, argv, flags)
        results.append(result)
    return results
