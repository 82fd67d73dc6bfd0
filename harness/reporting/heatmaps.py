"""Needle-in-a-haystack heatmaps (depth x context length), drawn from the leaderboard CSV alone.

A task draws here when its leaderboard rows have `depth=<d>` subtasks (niah and the ruler_niah_* tasks). Per task
and model: one PNG per method and one with every method side by side (in `Order`), all on one 0-1 colour scale.
When a method has several runs of a task in the leaderboard (other grids or settings), its newest is drawn.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.colors import LinearSegmentedColormap
from matplotlib.figure import Figure

from unimem_bench.harness.reporting.plots import save_formats
from unimem_bench.harness.reporting.results import ALPHABETICAL, Order, latest_runs, read_leaderboard

DEPTH = re.compile(r"^depth=(?P<depth>[0-9.eE+-]+)$")
# Kamradt's colours: red (miss) through yellow to green (found).
COLOURS = ("#F0496E", "#EBB839", "#0CD79F")


def needle_grids(leaderboard: Path, model: str | None = None, tasks: Collection[str] | None = None,
                 order: Order = ALPHABETICAL) -> dict[tuple[str, str], dict[str, pd.DataFrame]]:
    """{(model, task): {method: depth x length table of the metric}} for every task with depth rows (only `model`
    and `tasks` when given), models sorted, tasks and methods in `order`; each method's newest run."""
    frame = read_leaderboard(leaderboard)
    frame = frame[frame["subtask"].str.match(DEPTH.pattern)]
    if model is not None:
        frame = frame[frame["model"] == model]
    if tasks is not None:
        frame = frame[frame["task"].isin(list(tasks))]
    frame = latest_runs(frame, ["model", "task", "method"])
    grids: dict[tuple[str, str], dict[str, pd.DataFrame]] = {}
    groups = sorted(frame.groupby(["model", "task", "method"]),
                    key=lambda g: (g[0][0], order.task_key(g[0][1]), order.method_key(g[0][2])))
    for (model_name, task, method), group in groups:
        depth = group["subtask"].str.extract(DEPTH)["depth"].astype(float)
        table = (group.assign(depth=depth, context_len=group["context_len"].astype(int),
                              value=group["value"].astype(float))
                 .pivot_table(index="depth", columns="context_len", values="value", aggfunc="last")
                 .sort_index().sort_index(axis=1))
        grids.setdefault((str(model_name), str(task)), {})[str(method)] = table
    return grids


def plot_niah_heatmaps(leaderboard: Path, out_dir: Path, model: str | None = None,
                       tasks: Collection[str] | None = None, formats: Sequence[str] = ("png",),
                       order: Order = ALPHABETICAL) -> list[Path]:
    """Draw the heatmaps of every needle task in `leaderboard` (only `model`'s rows and `tasks` when given) into
    `out_dir`: `<task>_<method>.png` per method and `<task>_methods.png` side by side, in each of `formats`.
    Returns the files written."""
    # Grey for cells missing from a method's grid.
    cmap = LinearSegmentedColormap.from_list("needle", COLOURS).with_extremes(bad="#d9d9d9")
    grids = needle_grids(leaderboard, model, tasks, order)
    several_models = len({m for m, _ in grids}) > 1
    written: list[Path] = []
    for (model_name, task), tables in grids.items():
        stem = f"{task}_{_slug(model_name)}" if several_models else task
        for method, table in tables.items():
            fig = Figure(figsize=(1.0 + 0.75 * table.shape[1] + 1.6, 1.2 + 0.42 * table.shape[0]),
                         layout="constrained")
            ax = fig.subplots()
            image = _draw(ax, table, cmap)
            ax.set_title(f"{task}: {method} ({model_name})", fontsize=10)
            fig.colorbar(image, ax=ax, label="accuracy", fraction=0.08)
            written += save_formats(fig, out_dir / f"{stem}_{method}", formats)
        n = len(tables)
        cols = min(n, 4)
        rows = -(-n // cols)
        first = next(iter(tables.values()))
        width = 0.75 * first.shape[1] + 1.4
        height = 0.42 * first.shape[0] + 1.2
        fig = Figure(figsize=(cols * width + 1.2, rows * height + 0.6), layout="constrained")
        axes = fig.subplots(rows, cols, squeeze=False)
        for ax, (method, table) in zip(axes.flat, tables.items(), strict=False):
            image = _draw(ax, table, cmap)
            ax.set_title(method, fontsize=10)
        for ax in list(axes.flat)[n:]:
            ax.set_axis_off()
        fig.suptitle(f"{task}: accuracy by needle depth and context length ({model_name})", fontsize=11)
        fig.colorbar(image, ax=axes, label="accuracy", fraction=0.03)
        written += save_formats(fig, out_dir / f"{stem}_methods", formats)
    return written


def _draw(ax: Any, table: pd.DataFrame, cmap: Any) -> Any:
    """One heatmap: depth down the rows (0 = start of the haystack at the top), lengths across, values in cells."""
    image = ax.imshow(table.to_numpy(dtype=float), cmap=cmap, vmin=0.0, vmax=1.0, aspect="auto",
                      interpolation="nearest")
    ax.grid(False)  # grid lines would cross the cells (the house style draws them on every other axes)
    ax.set_xticks(range(table.shape[1]), [f"{c:,}" for c in table.columns], rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(table.shape[0]), [f"{d:g}" for d in table.index], fontsize=8)
    ax.set_xlabel("context length (tokens)", fontsize=9)
    ax.set_ylabel("needle depth", fontsize=9)
    if table.size <= 150:  # values stay legible up to about a 10 x 15 grid
        for (i, j), value in np.ndenumerate(table.to_numpy(dtype=float)):
            if not np.isnan(value):
                ax.text(j, i, f"{value:.2g}", ha="center", va="center", fontsize=7, color="black")
    return image


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "model"
