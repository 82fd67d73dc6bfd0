"""The paper's figures, drawn from results files alone (leaderboard.csv, sweep definitions, run records).

`draw_*` functions take frames and return a matplotlib Figure (notebooks show them inline); `plot_*` functions read
the files and save them. `STYLE` is the one look of every figure `unimem-bench plot` writes, and each method keeps
its colour (its position in the `Order` of methods: the registry's when the CLI draws). Leaderboard figures use each
run's summary rows (the breakdowns by subtask or length have their own figures); best marks follow each row's
`higher_is_better`. Nothing here selects a backend: figures are drawn on `Figure` objects, never through pyplot.
"""

from __future__ import annotations

import os
import tempfile
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import matplotlib
import matplotlib.ticker
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from unimem_bench.harness.reporting import tables as lb
from unimem_bench.harness.reporting.results import (
    ALPHABETICAL,
    Order,
    latest_runs,
    layer_indices,
    read_leaderboard,
)

if TYPE_CHECKING:  # matplotlib.typing has RcKeyType from 3.9; the floor is 3.8
    from matplotlib.typing import RcKeyType

STYLE: dict[RcKeyType, Any] = {
    "font.size": 10, "axes.titlesize": 11, "axes.labelsize": 10, "xtick.labelsize": 9, "ytick.labelsize": 9,
    "legend.fontsize": 8, "legend.title_fontsize": 9, "axes.grid": True, "grid.alpha": 0.3,
    "axes.spines.top": False, "axes.spines.right": False, "savefig.dpi": 150, "svg.fonttype": "none",
}
FORMATS = ("png", "svg")
LEGEND_CHARS = 48
"""Legend entries wrap at this many characters (settings can name several fields)."""


def method_color(method: str, order: Order = ALPHABETICAL, present: Sequence[str] = ()) -> Any:
    """A method's colour: its position among `order`'s methods and those `present` (all of a figure's methods),
    so that it keeps its colour from figure to figure of the same results."""
    names = order.sort_methods([*order.methods, *present, method])
    return matplotlib.colormaps["tab10"](names.index(method) % 10)


def row_colors(rows: Sequence[tuple[str, str]], order: Order = ALPHABETICAL) -> list[Any]:
    """Method colours when each method has one row; otherwise one tab20 colour per row."""
    present = [m for m, _ in rows]
    if len(set(present)) == len(rows):
        return [method_color(m, order, present) for m in present]
    return [matplotlib.colormaps["tab20"](i % 20) for i in range(len(rows))]


def pretty(metric: str) -> str:
    return {"token_ppl": "token perplexity", "word_ppl": "word perplexity", "bits_per_byte": "bits per byte",
            "nll_per_token": "NLL per token (nats)"}.get(metric, metric.replace("_", " "))


def new_figure(ncols: int = 1, *, width: float = 5.0, height: float = 4.0) -> tuple[Figure, list[Any]]:
    """A Figure (never registered with pyplot, so nothing leaks between calls) with `ncols` panels."""
    with matplotlib.rc_context(STYLE):
        fig = Figure(figsize=(width * ncols, height), layout="constrained")
        axes = fig.subplots(1, ncols, squeeze=False)[0]
    return fig, list(axes)


def fit(title: str, fig: Figure) -> str:
    """`title` wrapped to the figure's width (about 9 characters per inch at the title size)."""
    return textwrap.fill(title, max(30, int(9 * fig.get_figwidth())))


def save_formats(fig: Figure, stem: Path, formats: Sequence[str] = FORMATS) -> list[Path]:
    """Save `stem.png`, `stem.svg`... (each atomically, in the house style); returns the paths."""
    with matplotlib.rc_context(STYLE):
        return [save_figure(fig, stem.with_name(f"{stem.name}.{fmt}")) for fmt in formats]


def draw_metric_bars(table: lb.Table, title: str = "", order: Order = ALPHABETICAL) -> Figure:
    """Grouped bars: groups are the table's columns (tasks), bars its rows (method and setting), values on top."""
    values = table.values
    rows = [(idx[1], idx[2]) for idx in values.index]
    labels = [f"{m} ({s})" if s else m for m, s in rows]
    if values.index.get_level_values("model").nunique() > 1:
        labels = [f"{idx[0]}: {label}" for idx, label in zip(values.index, labels, strict=True)]
    labels = [textwrap.fill(label, LEGEND_CHARS, subsequent_indent="  ") for label in labels]
    n_rows, n_cols = values.shape
    # The legend sits right of the axes: the figure widens with its longest line (about 0.065 in per character at
    # 8 pt) and grows taller with its lines (about 0.17 in each, plus 0.06 in between entries).
    legend_width = 0.065 * max(len(line) for label in labels for line in label.splitlines()) + 0.8
    legend_height = sum(0.17 * (label.count("\n") + 1) + 0.06 for label in labels) + 0.8
    fig, (ax,) = new_figure(width=min(12.0, max(3.5, 0.45 * n_rows * n_cols + 1.5)) + legend_width,
                            height=max(4.5, legend_height))
    width = 0.8 / n_rows
    with matplotlib.rc_context(STYLE):
        for j, (label, color) in enumerate(zip(labels, row_colors(rows, order), strict=True)):
            xs = np.arange(n_cols) + (j - (n_rows - 1) / 2) * width
            bars = ax.bar(xs, values.iloc[j].to_numpy(dtype=float), width, label=label, color=color)
            ax.bar_label(bars, fmt="%.4g", fontsize=7, padding=2, rotation=90 if n_rows > 4 else 0)
        ax.set_xticks(range(n_cols), list(values.columns))
        ax.set_xlabel("task")
        ax.set_ylabel(pretty(table.metric))
        ax.margins(y=0.2)
        if np.nanmin(values.to_numpy(dtype=float)) >= 0:
            ax.set_ylim(bottom=0)
        ax.set_title(fit(title or f"{pretty(table.metric)} per method and task", fig))
        ax.legend(title="method", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return fig


def metric_table(leaderboard: Path, metric: str, model: str | None, order: Order) -> lb.Table:
    """The leaderboard table of one metric (of one model when given) that the per-method figures draw."""
    frame = lb.load(leaderboard.parent, metric=metric)
    if model is not None:
        frame = frame[frame["model"] == model]
    if frame.empty:
        raise ValueError(f"{leaderboard} has no rows for metric {metric!r}" + (f" and model {model}" if model else ""))
    return lb.build_tables(frame, leaderboard.parent, metric, order=order)[0]


def plot_metric_bars(leaderboard: Path, out: Path, *, metric: str = "token_ppl", model: str | None = None,
                     order: Order = ALPHABETICAL) -> Path:
    """The bar figure of one metric from a leaderboard file, saved as `out` (its suffix picks the format)."""
    title = f"{pretty(metric)} per method and task" + (f" ({lb.short_model(model)})" if model else "")
    return save_figure(draw_metric_bars(metric_table(leaderboard, metric, model, order), title, order), out)


def _numeric(values: Sequence[str]) -> list[float] | None:
    try:
        return [float(v) for v in values]
    except ValueError:
        return None


def _doubling(xs: Sequence[float]) -> bool:
    positive = [x for x in xs if x > 0]
    return min(xs) >= 0 and len(positive) >= 3 and max(positive) / min(positive) >= 8


def draw_sweep_lines(frame: pd.DataFrame, field: str, values: Sequence[str], metric: str, title: str = "",
                     order: Order = ALPHABETICAL) -> Figure:
    """`metric` against the swept `field` (x in sweep order; numeric fields on a numeric axis), one line per method
    and value of the other swept fields (in `order`, then sweep order), one panel per task."""
    others = [c for c in frame.columns if "." in c and c != field]
    tasks = order.sort_tasks(frame["task"])
    methods = order.sort_methods(frame["method"])
    xs_num = _numeric(values)
    rank = {v: i for i, v in enumerate(values)}
    fig, axes = new_figure(len(tasks), width=5.5, height=4.0)
    with matplotlib.rc_context(STYLE):
        for ax, task in zip(axes, tasks, strict=True):
            sub = frame[frame["task"] == task]
            groups = sub.groupby(["method", *others])
            # Lines in method order, then in the order of the sweep's points (or of the other fields' values).
            lines = sorted(groups, key=lambda g: (order.method_key(g[0][0]),
                                                  int(g[1]["point"].min()) if "point" in g[1] else 0, g[0]))
            for k, (key, line) in enumerate(lines):
                key = key if isinstance(key, tuple) else (key,)
                label = ", ".join([key[0], *(f"{o.split('.')[-1]}={v}" for o, v in zip(others, key[1:],
                                                                                      strict=True))])
                line = line.sort_values(field, key=lambda s: s.map(rank))
                x = [xs_num[rank[v]] if xs_num else rank[v] for v in line[field]]
                color = method_color(key[0], order, methods) if not others else matplotlib.colormaps["tab10"](k % 10)
                ax.plot(x, line["value"], marker="o", label=label, color=color)
            if xs_num is None:
                ax.set_xticks(range(len(values)), list(values))
            elif _doubling(xs_num):
                # top-k 0..64 and windows 0..2,048 double from point to point: even spacing reads them best.
                ax.set_xscale("symlog", base=2, linthresh=min(x for x in xs_num if x > 0))
                ax.set_xticks(xs_num, list(values))
                ax.minorticks_off()
            ax.set_xlabel(field)
            ax.set_ylabel(pretty(metric))
            ax.set_title(task)
            ax.legend(title="method")
        fig.suptitle(fit(title or f"{pretty(metric)} vs {field}", fig))
    return fig


def layer_order(values: Sequence[str]) -> tuple[list[str], list[str]]:
    """Split injection.layers values into single layers (by index) and groups (ranges, `all`), in sweep order."""
    singles = [v for v in values if len(layer_indices(v) or ()) == 1]
    groups = [v for v in values if v not in singles]
    return sorted(singles, key=lambda v: (layer_indices(v) or (0,))[0]), groups


def draw_layer_placement(frame: pd.DataFrame, values: Sequence[str], metric: str, title: str = "",
                         order: Order = ALPHABETICAL) -> Figure:
    """Bars of `metric` with memory at one layer (each index), then at groups of layers (hatched); a dashed line at
    the all-layer value and the best single layer outlined. One panel per task, one bar colour per method."""
    singles, groups = layer_order(values)
    cats = singles + groups
    tasks = order.sort_tasks(frame["task"])
    methods = order.sort_methods(frame["method"])
    fig, axes = new_figure(len(tasks), width=max(5.0, 0.55 * len(cats) * len(methods) + 2.5), height=4.0)
    lower = not frame["higher_is_better"].all()  # the rows' own declaration (sweep_results carries it)
    width = 0.8 / len(methods)
    with matplotlib.rc_context(STYLE):
        for ax, task in zip(axes, tasks, strict=True):
            for j, method in enumerate(methods):
                sub = frame[(frame["task"] == task) & (frame["method"] == method)].set_index("injection.layers")
                heights = [float(sub["value"].get(c, np.nan)) for c in cats]
                xs = np.arange(len(cats)) + (j - (len(methods) - 1) / 2) * width
                bars = ax.bar(xs, heights, width, color=method_color(method, order, methods), label=method,
                              hatch=[None] * len(singles) + ["//"] * len(groups), edgecolor="white")
                ax.bar_label(bars, fmt="%.4g", fontsize=7, padding=2, rotation=90)
                single = [h for h in heights[:len(singles)] if not np.isnan(h)]
                if single:
                    best = heights.index(min(single) if lower else max(single))
                    bars[best].set_edgecolor("black")
                    bars[best].set_linewidth(1.5)
                if "all" in sub.index:
                    ax.axhline(float(sub["value"]["all"]), color=method_color(method, order, methods), linestyle="--",
                               linewidth=1, label=f"{method}, all layers")
            if groups and singles:
                ax.axvline(len(singles) - 0.5, color="grey", linewidth=0.8)
            ax.set_xticks(range(len(cats)), cats)
            ax.set_xlabel("memory layer(s)  (single layers | groups, hatched; best single layer outlined)")
            ax.set_ylabel(pretty(metric))
            finite = frame.loc[frame["task"] == task, "value"]
            span = finite.max() - finite.min()
            ax.set_ylim(finite.min() - 0.3 * span - 1e-9, finite.max() + 0.45 * span + 1e-9)
            ax.set_title(task)
            ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0))
        fig.suptitle(fit(title or f"{pretty(metric)} by memory injection layer", fig))
    return fig


LENGTH_METRIC_LABELS = {"token_ppl": "perplexity of all L tokens",
                        "tail_token_ppl": "perplexity of tokens L/2 .. L"}


def plot_length_curves(leaderboard: Path, out: Path, *, task: str = "pi-length", metric: str = "token_ppl",
                       model: str | None = None, order: Order = ALPHABETICAL) -> Path:
    """`metric` against evaluation length (log2 axis), one line per method (its newest run): the
    position-interpolation figure, from a task's rows at several lengths without a subtask."""
    frame = read_leaderboard(leaderboard)
    frame = frame[(frame["task"] == task) & (frame["metric"] == metric) & (frame["subtask"] == "")]
    if model is not None:
        frame = frame[frame["model"] == model]
    if frame.empty:
        raise ValueError(f"{leaderboard} has no {task!r} rows for metric {metric!r}")
    frame = latest_runs(frame, ["method"])
    methods = order.sort_methods(frame["method"])
    fig = Figure(figsize=(7.5, 4.5), layout="constrained")
    ax = fig.subplots()
    for method in methods:
        group = frame[frame["method"] == method].sort_values("context_len")
        ax.plot(group["context_len"], group["value"].astype(float), marker="o", label=method,
                color=method_color(method, order, methods))
    lengths = sorted(frame["context_len"].unique())
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(lengths, [f"{n:,}" for n in lengths], rotation=30)
    ax.minorticks_off()
    # Plain numbers at 1-2-5 steps: a log axis spanning less than a decade would otherwise show a single label.
    ax.yaxis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda y, _: f"{y:g}"))
    ax.set_xlabel("evaluation length L (tokens)")
    label = LENGTH_METRIC_LABELS.get(metric, metric.replace("_", " "))
    ax.set_ylabel(f"{label} (log scale)")
    ax.set_title(f"{label} against evaluation length" + (f"\n{model}" if model else ""), fontsize=10)
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(title="method", loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    return save_figure(fig, out)


def save_figure(fig: Figure, out: Path) -> Path:
    """Write the figure atomically (PNG or SVG by suffix). Figures here are `Figure` objects, never registered
    with pyplot: nothing to close, and no backend chosen for the caller."""
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.stem}.", suffix=out.suffix, dir=out.parent)
    os.close(fd)
    fig.savefig(tmp, dpi=150)
    os.replace(tmp, out)
    return out
