"""`unimem-bench plot` and the figures of a finished `run`, drawn from results files alone.

- `dots_<metric>` (lower-is-better metrics such as perplexity: dots on an axis fitted to the values) or
  `bars_<metric>` (accuracies and scores, bars from zero): the leaderboard table (tasks without a per-length
  breakdown);
- `<task>_positions`: perplexity per position bucket within the document and each method's change relative to
  vanilla (tasks with `pos:<start>-<end>` rows: pg19, github);
- `sweep_<name>`: each saved sweep, the metric against its swept field (the per-layer figure for layer placement);
- `sweep_<name>_pareto`: each sweep of `management.budget` or `management.size` whose runs recorded a KV footprint,
  each task's headline metric against it per method, with the Pareto frontier (`pareto`);
- `<task>_<method>` and `<task>_methods`: depth x length heatmaps of every needle task (rows with `depth=d`
  subtasks: niah, ruler_niah_*), in a folder per model when the results hold several;
- `<task>_<metric>_<model>`: the metric against evaluation length, for tasks that report it at several lengths
  without a subtask (pi-length).

Which figure a task gets follows from the shape of its rows, never from its name.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib
import pandas as pd

from unimem_bench.harness.reporting import tables as lb
from unimem_bench.harness.reporting.differences import draw_metric_dots, plot_metric_dots, plot_position_curves
from unimem_bench.harness.reporting.heatmaps import DEPTH, plot_niah_heatmaps
from unimem_bench.harness.reporting.pareto import plot_pareto
from unimem_bench.harness.reporting.plots import (
    FORMATS,
    STYLE,
    draw_layer_placement,
    draw_metric_bars,
    draw_sweep_lines,
    plot_length_curves,
    plot_metric_bars,
    save_formats,
)
from unimem_bench.harness.reporting.results import ALPHABETICAL, Order, list_sweeps, read_leaderboard, sweep_results


def length_tasks(frame: pd.DataFrame) -> list[str]:
    """Tasks whose runs report a metric at several lengths without a subtask (pi-length): they get length curves,
    not bars."""
    return sorted(set(frame.loc[(frame["subtask"] == "") & ~frame["summary"], "task"]))


def needle_tasks(frame: pd.DataFrame) -> list[str]:
    return sorted(set(frame.loc[frame["subtask"].str.match(DEPTH.pattern), "task"]))


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text)


def plot_sweeps(out: Path, plots_dir: Path, *, names: Sequence[str] | None = None, model: str | None = None,
                tasks: list[str] | None = None, methods: list[str] | None = None, metric: str | None = None,
                formats: Sequence[str] = FORMATS, order: Order = ALPHABETICAL) -> list[Path]:
    """One figure per saved sweep (and swept field): `metric`, or each task's headline metric."""
    written: list[Path] = []
    saved = list_sweeps(out)
    missing = sorted(set(names or []) - {s["name"] for s in saved})
    if missing:
        raise FileNotFoundError(f"no sweep named {missing[0]!r} in {out / 'sweeps'} (saved: "
                                f"{', '.join(s['name'] for s in saved) or 'none'})")
    for sweep in saved:
        if (names and sweep["name"] not in names) or (model and model not in sweep["base"]["model"]):
            continue
        frame = sweep_results(out, sweep["name"], metric)
        if metric is None:
            frame = frame[frame["headline"]]
        if tasks:
            frame = frame[frame["task"].isin(tasks)]
        if methods:
            frame = frame[frame["method"].isin(methods)]
        if frame.empty:
            continue
        name = frame["metric"].iloc[0] if frame["metric"].nunique() == 1 else "value"  # tasks' headlines differ
        axes = sweep["axes"]
        for field, values in axes.items():
            title = f"sweep {sweep['name']} ({lb.short_model(sweep['base']['model'])})"
            if field == "injection.layers" and len(axes) == 1:
                fig = draw_layer_placement(frame, values, name, title, order)
            else:
                fig = draw_sweep_lines(frame, field, values, name, title, order)
            stem = f"sweep_{sweep['name']}" + (f"_{_slug(field)}" if len(axes) > 1 else "")
            written += save_formats(fig, plots_dir / stem, formats)
        written += plot_pareto(out, plots_dir, names=[sweep["name"]], formats=formats, order=order)
    return written


def plot_results(out: Path, plots_dir: Path | None = None, *, model: str | None = None,
                 tasks: list[str] | None = None, methods: list[str] | None = None, metric: str | None = None,
                 sweeps: Sequence[str] | None = None, formats: Sequence[str] = FORMATS,
                 order: Order = ALPHABETICAL) -> list[Path]:
    """Write every figure the filtered results support; returns the files written."""
    plots_dir = plots_dir or out / "plots"
    frame = lb.load(out, model=model, tasks=tasks, methods=methods)
    written: list[Path] = []
    if not sweeps:
        flat = frame[~frame["task"].isin(length_tasks(frame))]
        for table in lb.build_tables(flat, out, metric, order=order) if not flat.empty else []:
            if not any(table.higher_is_better.values()):
                written += save_formats(draw_metric_dots(table, order=order), plots_dir / f"dots_{table.metric}",
                                        formats)
            else:
                written += save_formats(draw_metric_bars(table, order=order), plots_dir / f"bars_{table.metric}",
                                        formats)
    written += plot_sweeps(out, plots_dir, names=sweeps, model=model, tasks=tasks, methods=methods, metric=metric,
                           formats=formats, order=order)
    if not sweeps:
        written += _breakdown_figures(out, frame, plots_dir, metric, formats, order)
    if not written:
        raise FileNotFoundError(f"nothing to plot in {out} with these filters (sweeps: "
                                f"{', '.join(s['name'] for s in list_sweeps(out)) or 'none'})")
    return written


def _breakdown_figures(out: Path, frame: pd.DataFrame, plots_dir: Path, metric: str | None,
                       formats: Sequence[str], order: Order) -> list[Path]:
    """Position curves, needle heatmaps and length curves, per model, in the house style."""
    written: list[Path] = []
    leaderboard = out / "leaderboard.csv"
    models = sorted(set(frame["model"]))
    with matplotlib.rc_context(STYLE):
        for model_id in models:
            rows = frame[frame["model"] == model_id]
            folder = plots_dir / _slug(lb.short_model(model_id)) if len(models) > 1 else plots_dir
            written += plot_position_curves(rows, folder, formats=formats, order=order)
            if needle_tasks(rows):
                written += plot_niah_heatmaps(leaderboard, folder, model=model_id, tasks=needle_tasks(rows),
                                              formats=formats, order=order)
            for task in length_tasks(rows):
                for name in [metric] if metric else sorted(set(rows.loc[rows["task"] == task, "metric"])):
                    stem = f"{_slug(task.replace('-', '_'))}_{name}_{_slug(lb.short_model(model_id))}"
                    written += [plot_length_curves(leaderboard, plots_dir / f"{stem}.{fmt}", task=task, metric=name,
                                                   model=model_id, order=order) for fmt in formats]
    return written


def plot_run(out: Path, run_ids: Sequence[str], *, order: Order = ALPHABETICAL) -> list[Path]:
    """The figures `unimem-bench run` draws after its runs are recorded, from the files alone, for the model of
    `run_ids` (every method of that model in the leaderboard): `plots/<task>_positions.png`, perplexity by position
    relative to vanilla for tasks with position-bucket rows; `plots/<metric>.png` per headline metric of their tasks
    (`/` becomes `_`; dots on a fitted axis when lower is better, bars from zero otherwise); `plots/<task>.png`
    (headline metric) and `plots/<task>_<metric>.png` length curves for tasks reported at several lengths, and the
    depth x length heatmaps of needle tasks."""
    leaderboard, plots = out / "leaderboard.csv", out / "plots"
    board = read_leaderboard(leaderboard)
    mine = board[board["run_id"].isin(run_ids)]
    figures: list[Path] = []
    for model in sorted(set(mine["model"])):
        rows = mine[mine["model"] == model]
        headline = rows[rows["headline"]]
        figures += plot_position_curves(board[(board["model"] == model) & board["task"].isin(rows["task"])], plots,
                                        order=order)
        for metric in sorted(set(headline["metric"])):
            lower = not headline.loc[headline["metric"] == metric, "higher_is_better"].any()
            figures.append((plot_metric_dots if lower else plot_metric_bars)(
                leaderboard, plots / f"{_slug(metric)}.png", metric=metric, model=model, order=order))
        for task in length_tasks(rows):
            slug = _slug(task.replace("-", "_"))
            task_headline = set(headline.loc[headline["task"] == task, "metric"])
            for metric in sorted(set(rows.loc[rows["task"] == task, "metric"])):
                stem = slug if metric in task_headline else f"{slug}_{metric}"
                figures.append(plot_length_curves(leaderboard, plots / f"{stem}.png", task=task, metric=metric,
                                                  model=model, order=order))
        figures += plot_niah_heatmaps(leaderboard, plots, model=model, tasks=needle_tasks(rows), order=order)
    return figures
