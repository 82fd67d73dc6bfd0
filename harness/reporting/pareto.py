"""The equal-budget (Pareto) view of a sweep: each task's headline metric against the KV footprint of its run.

The footprint is the run record's `memory_usage.kv_footprint` (slots x the tokens they were held, summed over
layers, KV heads and documents): what a method paid in memory for its score. One panel per task, one line per
method through its sweep points (labelled with the swept value), and the Pareto frontier over all methods (no other
point has both a smaller footprint and a better score) as a grey step line. Read from files alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib
import pandas as pd
from matplotlib.figure import Figure

from unimem_bench.harness.reporting import tables as lb
from unimem_bench.harness.reporting.plots import FORMATS, STYLE, fit, new_figure, pretty, save_formats
from unimem_bench.harness.reporting.results import ALPHABETICAL, Order, list_sweeps, read_run_json, sweep_results

BUDGET_FIELDS = ("management.budget", "management.size")
"""Sweeps varying one of these are budget sweeps: they get the Pareto view."""


def footprint_frame(out: Path, name: str) -> pd.DataFrame:
    """The sweep's headline rows with each run's `kv_footprint` and `peak_kv_bytes` (runs without a record of them,
    e.g. from before they were recorded, are left out)."""
    frame = sweep_results(out, name)
    frame = frame[frame["headline"]].copy()
    usage = {rid: read_run_json(out, rid).get("memory_usage") or {} for rid in frame["run_id"].unique()}
    frame["kv_footprint"] = frame["run_id"].map(lambda rid: usage[rid].get("kv_footprint"))
    frame["peak_kv_bytes"] = frame["run_id"].map(lambda rid: usage[rid].get("peak_kv_bytes"))
    return frame[frame["kv_footprint"].notna()].reset_index(drop=True)


def frontier(xs: Sequence[float], ys: Sequence[float], higher_is_better: bool) -> list[tuple[float, float]]:
    """The non-dominated points (smaller x and better y), by increasing x."""
    best: list[tuple[float, float]] = []
    for x, y in sorted(zip(xs, ys, strict=True), key=lambda p: (p[0], -p[1] if higher_is_better else p[1])):
        if not best or (y > best[-1][1] if higher_is_better else y < best[-1][1]):
            best.append((x, y))
    return best


def draw_pareto(frame: pd.DataFrame, field: str, title: str = "", order: Order = ALPHABETICAL) -> Figure:
    """One panel per task: headline metric against KV footprint, a line per method, the frontier in grey."""
    tasks = order.sort_tasks(frame["task"])
    methods = order.sort_methods(frame["method"])
    # A colour per method of this figure (a budget sweep compares many methods: the registry's tab10 colours repeat).
    palette = matplotlib.colormaps["tab10" if len(methods) <= 10 else "tab20"]
    colors = {method: palette(i) for i, method in enumerate(methods)}
    with matplotlib.rc_context(STYLE):
        fig, axes = new_figure(len(tasks), width=5.5, height=4.2)
        for ax, task in zip(axes, tasks, strict=True):
            rows = frame[frame["task"] == task]
            higher = bool(rows["higher_is_better"].iloc[0])
            for method in order.sort_methods(rows["method"]):
                points = rows[rows["method"] == method].sort_values("kv_footprint")
                color = colors[method]
                ax.plot(points["kv_footprint"], points["value"], "o-", color=color, label=method, markersize=4)
                if field in points:
                    for x, y, label in zip(points["kv_footprint"], points["value"], points[field], strict=True):
                        ax.annotate(str(label), (x, y), textcoords="offset points", xytext=(3, 3), fontsize=6,
                                    color=color)
            best = frontier(list(rows["kv_footprint"]), list(rows["value"]), higher)
            ax.step([x for x, _ in best], [y for _, y in best], where="post", color="0.5", linestyle="--",
                    linewidth=1, label="Pareto frontier")
            if (rows["kv_footprint"] > 0).all():
                ax.set_xscale("log")
            ax.set_xlabel("KV footprint (slots x tokens held)")
            ax.set_ylabel(pretty(rows["metric"].iloc[0]) + (" (higher is better)" if higher else " (lower is better)"))
            ax.set_title(task)
        axes[-1].legend(loc="best")
        if title:
            fig.suptitle(fit(title, fig))
    return fig


def plot_pareto(out: Path, plots_dir: Path, *, names: Sequence[str] | None = None,
                formats: Sequence[str] = FORMATS, order: Order = ALPHABETICAL) -> list[Path]:
    """`sweep_<name>_pareto` for every saved budget sweep (or those named) whose runs recorded a KV footprint."""
    written: list[Path] = []
    for sweep in list_sweeps(out):
        if (names and sweep["name"] not in names) or not set(sweep["axes"]) & set(BUDGET_FIELDS):
            continue
        frame = footprint_frame(out, sweep["name"])
        if frame.empty:
            continue
        field = next(f for f in sweep["axes"] if f in BUDGET_FIELDS)
        title = f"sweep {sweep['name']} ({lb.short_model(sweep['base']['model'])}): score vs KV footprint"
        written += save_formats(draw_pareto(frame, field, title, order), plots_dir / f"sweep_{sweep['name']}_pareto",
                                formats)
    return written
