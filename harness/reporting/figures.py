"""`unimem-bench plot`: every figure a results folder supports, written as PNG and SVG under plots/.

- `dots_<metric>` (lower-is-better metrics such as perplexity: dots on an axis fitted to the values) or
  `bars_<metric>` (accuracies and scores, bars from zero): the leaderboard table (tasks without a per-length
  breakdown);
- `<task>_positions`: perplexity per position bucket within the document and each method's change relative to
  vanilla (tasks with `pos:<start>-<end>` rows: pg19, github);
- `sweep_<name>`: each saved sweep, the metric against its swept field (the per-layer figure for layer placement);
- `<task>_<method>` and `<task>_methods`: depth x length heatmaps of every needle task (rows with `depth=d`
  subtasks: niah, ruler_niah_*), in a folder per model when the results hold several;
- `pi_length[_tail]_<model>`: perplexity against evaluation length (task `pi-length`, one row per length).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib
import pandas as pd

from unimem_bench.harness.reporting import tables as lb
from unimem_bench.harness.reporting.differences import draw_metric_dots, plot_position_curves
from unimem_bench.harness.reporting.heatmaps import DEPTH, plot_niah_heatmaps
from unimem_bench.harness.reporting.plots import (
    FORMATS,
    STYLE,
    draw_layer_placement,
    draw_metric_bars,
    draw_sweep_lines,
    plot_length_curves,
    save_formats,
)
from unimem_bench.harness.sweeps.plan import list_sweeps, sweep_results
from unimem_bench.tasks import TASKS


def length_tasks(frame: pd.DataFrame) -> set[str]:
    """Tasks whose runs report a metric at several lengths without a subtask (pi-length): they get length curves,
    not bars."""
    counts = frame[frame["subtask"] == ""].groupby(["task", "run_id", "metric"]).size()
    return set(counts[counts > 1].index.get_level_values("task"))


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text)


def plot_sweeps(out: Path, plots_dir: Path, *, names: Sequence[str] | None = None, model: str | None = None,
                tasks: list[str] | None = None, methods: list[str] | None = None, metric: str | None = None,
                formats: Sequence[str] = FORMATS) -> list[Path]:
    written: list[Path] = []
    saved = list_sweeps(out)
    missing = sorted(set(names or []) - {s["name"] for s in saved})
    if missing:
        raise FileNotFoundError(f"no sweep named {missing[0]!r} in {out / 'sweeps'} (saved: "
                                f"{', '.join(s['name'] for s in saved) or 'none'})")
    for sweep in saved:
        if (names and sweep["name"] not in names) or (model and model not in sweep["base"]["model"]):
            continue
        first_task = next(iter(sweep["points"][0]["runs"]))
        name = metric or (TASKS.get(first_task).headline if first_task in TASKS.names() else "token_ppl")
        frame = sweep_results(out, sweep["name"], name)
        if tasks:
            frame = frame[frame["task"].isin(tasks)]
        if methods:
            frame = frame[frame["method"].isin(methods)]
        if frame.empty:
            continue
        axes = sweep["axes"]
        for field, values in axes.items():
            title = f"sweep {sweep['name']} ({lb.short_model(sweep['base']['model'])})"
            if field == "injection.layers" and len(axes) == 1:
                fig = draw_layer_placement(frame, values, name, title)
            else:
                fig = draw_sweep_lines(frame, field, values, name, title)
            stem = f"sweep_{sweep['name']}" + (f"_{_slug(field)}" if len(axes) > 1 else "")
            written += save_formats(fig, plots_dir / stem, formats)
    return written


def plot_results(out: Path, plots_dir: Path | None = None, *, model: str | None = None,
                 tasks: list[str] | None = None, methods: list[str] | None = None, metric: str | None = None,
                 sweeps: Sequence[str] | None = None, formats: Sequence[str] = FORMATS) -> list[Path]:
    """Write every figure the filtered results support; returns the files written."""
    plots_dir = plots_dir or out / "plots"
    frame = lb.load(out, model=model, tasks=tasks, methods=methods)
    written: list[Path] = []
    if not sweeps:
        flat = frame[~frame["task"].isin(length_tasks(frame))]
        for table in lb.build_tables(flat, out, metric) if not flat.empty else []:
            if table.lower_better:
                written += save_formats(draw_metric_dots(table), plots_dir / f"dots_{table.metric}", formats)
            else:
                written += save_formats(draw_metric_bars(table), plots_dir / f"bars_{table.metric}", formats)
    written += plot_sweeps(out, plots_dir, names=sweeps, model=model, tasks=tasks, methods=methods, metric=metric,
                           formats=formats)
    if not sweeps:
        written += _breakdown_figures(out, frame, plots_dir, metric, formats)
    if not written:
        raise FileNotFoundError(f"nothing to plot in {out} with these filters (sweeps: "
                                f"{', '.join(s['name'] for s in list_sweeps(out)) or 'none'})")
    return written


def needle_tasks(frame: pd.DataFrame) -> set[str]:
    return set(frame.loc[frame["subtask"].str.match(DEPTH.pattern), "task"])


def _breakdown_figures(out: Path, frame: pd.DataFrame, plots_dir: Path, metric: str | None,
                       formats: Sequence[str]) -> list[Path]:
    """Needle heatmaps and length curves, per model, in the house style."""
    written: list[Path] = []
    leaderboard = out / "leaderboard.csv"
    models = list(dict.fromkeys(frame["model"]))
    with matplotlib.rc_context(STYLE):
        for model_id in models:
            rows = frame[frame["model"] == model_id]
            folder = plots_dir / _slug(lb.short_model(model_id)) if len(models) > 1 else plots_dir
            written += plot_position_curves(rows, folder, formats=formats)
            if needle_tasks(rows):
                written += plot_niah_heatmaps(leaderboard, folder, model=model_id, tasks=needle_tasks(rows),
                                              formats=formats)
            for task in length_tasks(rows):
                for name in [metric] if metric else sorted(set(rows.loc[rows["task"] == task, "metric"])):
                    stem = f"{_slug(task.replace('-', '_'))}_{name}_{_slug(lb.short_model(model_id))}"
                    written += [plot_length_curves(leaderboard, plots_dir / f"{stem}.{fmt}", task=task, metric=name,
                                                   model=model_id) for fmt in formats]
    return written
