"""`unimem-bench plot`: every figure a results folder supports, written as PNG and SVG under plots/.

- `bars_<metric>`: the leaderboard table as grouped bars (tasks without a per-length or per-depth breakdown);
- `sweep_<name>`: each saved sweep, the metric against its swept field (the per-layer figure for layer placement);
- `niah_<model>`: needle-in-a-haystack heatmaps (task `niah`, subtask `depth=d`, context_len = haystack length);
- `pi_length_<model>`: perplexity against evaluation length (task `pi-length`, one row per length).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from unimem_bench.tasks import TASKS

from . import leaderboard as lb
from .plots import (
    FORMATS,
    draw_layer_placement,
    draw_length_curves,
    draw_metric_bars,
    draw_niah_heatmap,
    draw_sweep_lines,
    save_figure,
)
from .sweep import list_sweeps, sweep_results


def breakdown_tasks(frame: pd.DataFrame) -> set[str]:
    """Tasks where a run reports several rows of one metric (depths, lengths): they get their own figures."""
    counts = frame.groupby(["task", "run_id", "metric"]).size()
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
            written += save_figure(fig, plots_dir / stem, formats)
    return written


def plot_results(out: Path, plots_dir: Path | None = None, *, model: str | None = None,
                 tasks: list[str] | None = None, methods: list[str] | None = None, metric: str | None = None,
                 sweeps: Sequence[str] | None = None, formats: Sequence[str] = FORMATS) -> list[Path]:
    """Write every figure the filtered results support; returns the files written."""
    plots_dir = plots_dir or out / "plots"
    frame = lb.load(out, model=model, tasks=tasks, methods=methods)
    broken = breakdown_tasks(frame)
    written: list[Path] = []
    flat = frame[~frame["task"].isin(broken)]
    if not flat.empty and not sweeps:
        for table in lb.build_tables(flat, metric):
            written += save_figure(draw_metric_bars(table), plots_dir / f"bars_{table.metric}", formats)
    written += plot_sweeps(out, plots_dir, names=sweeps, model=model, tasks=tasks, methods=methods, metric=metric,
                           formats=formats)
    for task, draw, default in (("niah", draw_niah_heatmap, "accuracy"), ("pi-length", draw_length_curves,
                                                                        "token_ppl")):
        rows = frame[(frame["task"] == task) & (frame["metric"] == (metric or default))]
        if sweeps or rows.empty:
            continue
        for model_id, sub in rows.groupby("model", sort=False):
            short = lb.short_model(model_id)
            fig = draw(sub, metric or default, title=f"{task} {metric or default} ({short})")
            written += save_figure(fig, plots_dir / f"{_slug(task.replace('-', '_'))}_{_slug(short)}", formats)
    if not written:
        raise FileNotFoundError(f"nothing to plot in {out} with these filters (sweeps: "
                                f"{', '.join(s['name'] for s in list_sweeps(out)) or 'none'})")
    return written
