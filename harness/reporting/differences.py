"""Figures that show what differs between methods, drawn from leaderboard rows alone.

- `draw_position_curves`: token perplexity per bucket of position within the document (the `pos:<start>-<end>` rows
  of the perplexity tasks), and each method's change relative to vanilla per bucket, one line per method, on a log2
  position axis: the picture long-context papers use to show that memory helps more the farther a token is from the
  document's start.
- `draw_metric_dots`: each method's headline value as a dot on an axis fitted to the values (one panel per task),
  instead of bars from zero that hide a 108-vs-117 difference in a 0-117 bar.
"""

from __future__ import annotations

import re
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib
import matplotlib.ticker
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from unimem_bench.harness.reporting import tables as lb
from unimem_bench.harness.reporting.plots import (
    LEGEND_CHARS,
    STYLE,
    fit,
    method_color,
    metric_table,
    new_figure,
    pretty,
    row_colors,
    save_figure,
    save_formats,
)
from unimem_bench.harness.reporting.results import ALPHABETICAL, Order, latest_runs

POSITION = re.compile(r"^pos:(?P<start>\d+)-(?P<end>\d+)$")
BASELINE = "vanilla"
"""Relative curves compare every method with this one (a plain segment-by-segment reading without memory)."""


def position_tasks(frame: pd.DataFrame) -> list[str]:
    """Tasks with rows for at least two position buckets (one bucket has no curve), in order of appearance."""
    rows = frame[frame["subtask"].str.match(POSITION.pattern)]
    buckets = rows.groupby("task", sort=False)["subtask"].nunique()
    return list(buckets[buckets > 1].index)


def position_table(frame: pd.DataFrame, task: str, metric: str = "token_ppl",
                   order: Order = ALPHABETICAL) -> pd.DataFrame:
    """Methods (in `order`) x position buckets (columns: bucket end in tokens, ascending) of one task and model's
    rows; each method's newest run when the leaderboard holds several."""
    rows = frame[(frame["task"] == task) & (frame["metric"] == metric) & frame["subtask"].str.match(POSITION.pattern)]
    if rows.empty:
        raise ValueError(f"no position-bucket rows of {task!r} for metric {metric!r}")
    rows = latest_runs(rows, ["method"])
    ends = rows["subtask"].str.extract(POSITION)["end"].astype(int)
    table = rows.assign(end=ends, value=rows["value"].astype(float)).pivot_table(
        index="method", columns="end", values="value", aggfunc="first")
    return table.loc[order.sort_methods(table.index)].sort_index(axis=1)


def bucket_label(end: int, first: int) -> str:
    """`0-512`, `512-1K`, `1K-2K` ... for the bucket that ends at `end` (`first`: the first bucket's end)."""
    def short(n: int) -> str:
        return f"{n // 1024}K" if n >= 1024 and n % 1024 == 0 else f"{n:,}"
    return f"{short(0 if end == first else end // 2)}-{short(end)}"


def draw_position_curves(table: pd.DataFrame, *, task: str, model: str = "", metric: str = "token_ppl",
                         order: Order = ALPHABETICAL) -> Figure:
    """Left: `metric` per position bucket, one line per method (log y). Right: each method's change relative to
    vanilla per bucket in percent (vanilla is the zero line; below zero = memory helps). Without a vanilla run only
    the left panel is drawn."""
    relative = BASELINE in table.index and len(table) > 1
    methods = [str(m) for m in table.index]

    def color(method: str) -> Any:
        return method_color(method, order, methods)

    fig, axes = new_figure(2 if relative else 1, width=5.6, height=4.2)
    ends = list(table.columns)
    labels = [bucket_label(end, ends[0]) for end in ends]
    with matplotlib.rc_context(STYLE):
        for method, values in table.iterrows():
            axes[0].plot(ends, values.to_numpy(dtype=float), marker="o", label=method, color=color(str(method)))
        axes[0].set_yscale("log")
        axes[0].yaxis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
        axes[0].yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda y, _: f"{y:g}"))
        axes[0].yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        axes[0].set_ylabel(f"{pretty(metric)} (log scale)")
        axes[0].set_title(f"{pretty(metric)} by position")
        if relative:
            base = table.loc[BASELINE].to_numpy(dtype=float)
            axes[1].axhline(0.0, color=color(BASELINE), linewidth=1.2, linestyle="--", label=BASELINE)
            for method, values in table.drop(index=BASELINE).iterrows():
                change = 100.0 * (values.to_numpy(dtype=float) / base - 1.0)
                axes[1].plot(ends, change, marker="o", label=method, color=color(str(method)))
                last = int(np.flatnonzero(~np.isnan(change))[-1]) if (~np.isnan(change)).any() else None
                if last is not None:
                    axes[1].annotate(f"{change[last]:+.1f}%", (ends[last], change[last]), xytext=(5, 0),
                                     textcoords="offset points", va="center", fontsize=8,
                                     color=color(str(method)))
            axes[1].yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda y, _: f"{y:+g}%"))
            axes[1].set_ylabel(f"change in {pretty(metric)} vs {BASELINE} (%)")
            axes[1].set_title(f"relative to {BASELINE} (below 0: better)")
        for ax in axes:
            ax.set_xscale("log", base=2)
            ax.set_xticks(ends, labels, rotation=30)
            ax.minorticks_off()
            ax.set_xlabel("token position in the document (bucket)")
        axes[-1].legend(title="method", loc="upper left", bbox_to_anchor=(1.01, 1.0))
        where = f"{task}, {lb.short_model(model)}" if model else task
        fig.suptitle(fit(f"{where}: {pretty(metric)} by position within the document", fig))
    return fig


def draw_metric_dots(table: lb.Table, title: str = "", order: Order = ALPHABETICAL) -> Figure:
    """One panel per task (column): each row (method and setting) a dot at its value on an axis fitted to the values,
    the value printed beside it, the best ringed."""
    values = table.values
    rows = [(idx[1], idx[2]) for idx in values.index]
    labels = [textwrap.fill(f"{m} ({s})" if s else m, LEGEND_CHARS, subsequent_indent="  ") for m, s in rows]
    if values.index.get_level_values("model").nunique() > 1:
        labels = [f"{idx[0]}: {label}" for idx, label in zip(values.index, labels, strict=True)]
    colors = row_colors(rows, order)
    n_rows, n_cols = values.shape
    fig, axes = new_figure(n_cols, width=4.2, height=max(2.2, 0.75 + 0.32 * n_rows + 0.1 * sum(
        label.count("\n") for label in labels)))
    y = np.arange(n_rows)[::-1]
    with matplotlib.rc_context(STYLE):
        for k, (ax, task) in enumerate(zip(axes, values.columns, strict=True)):
            column = values[task].to_numpy(dtype=float)
            ax.hlines(y, 0, 1, transform=ax.get_yaxis_transform(), color="#e6e6e6", linewidth=0.8, zorder=0)
            ax.scatter(column, y, c=colors, s=46, zorder=3)
            best = table.best[task].to_numpy(dtype=bool)
            ax.scatter(column[best], y[best], s=150, facecolors="none", edgecolors="black", linewidths=1.2, zorder=4)
            for x, yy in zip(column, y, strict=True):
                if not np.isnan(x):
                    ax.annotate(f"{x:.4g}", (x, yy), xytext=(0, 7), textcoords="offset points", ha="center",
                                fontsize=8)
            finite = column[~np.isnan(column)]
            if finite.size:
                span = float(finite.max() - finite.min()) or abs(float(finite.max())) * 0.05 or 1.0
                ax.set_xlim(finite.min() - 0.25 * span, finite.max() + 0.25 * span)
            ax.set_ylim(-0.7, n_rows - 0.3)
            ax.set_yticks(y, labels if k == 0 else [""] * n_rows)
            ax.grid(axis="y", visible=False)
            ax.set_title(str(task))
            higher = table.higher_is_better.get(task, False)
            ax.set_xlabel(f"{pretty(table.metric)} ({'higher' if higher else 'lower'} is better)")
        fig.suptitle(fit(title or f"{pretty(table.metric)} per method (best ringed)", fig))
    return fig


def plot_metric_dots(leaderboard: Path, out: Path, *, metric: str = "token_ppl", model: str | None = None,
                     order: Order = ALPHABETICAL) -> Path:
    """The dot figure of one metric from a leaderboard file, saved as `out` (its suffix picks the format)."""
    title = f"{pretty(metric)} per method" + (f" ({lb.short_model(model)})" if model else "")
    return save_figure(draw_metric_dots(metric_table(leaderboard, metric, model, order), title, order), out)


def plot_position_curves(frame: pd.DataFrame, plots_dir: Path, *, formats: Sequence[str] = ("png",),
                         order: Order = ALPHABETICAL) -> list[Path]:
    """`<task>_positions` for every task with position-bucket rows in `frame` (one model's rows), in `formats`."""
    written: list[Path] = []
    for task in position_tasks(frame):
        model = str(frame["model"].iloc[0])
        fig = draw_position_curves(position_table(frame, task, order=order), task=task, model=model, order=order)
        written += save_formats(fig, plots_dir / f"{re.sub(r'[^A-Za-z0-9._-]+', '_', task)}_positions", formats)
    return written
