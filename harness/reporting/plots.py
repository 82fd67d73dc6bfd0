"""The paper's figures, drawn from results files alone (leaderboard.csv, sweep definitions, run records).

`draw_*` functions take frames and return a matplotlib Figure (notebooks show them inline); `plot_*` functions read
the files and save them. `STYLE` is the one look of every figure `unimem-bench plot` writes, and each method keeps
its colour (its position in the method registry). Leaderboard figures use each run's headline rows: its first row
of a metric (breakdown rows by subtask or length follow it).
"""

from __future__ import annotations

import os
import tempfile
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from unimem_bench.harness.reporting import tables as lb
from unimem_bench.methods import METHODS
from unimem_bench.methods.config import parse_layers

STYLE: dict[str, Any] = {
    "font.size": 10, "axes.titlesize": 11, "axes.labelsize": 10, "xtick.labelsize": 9, "ytick.labelsize": 9,
    "legend.fontsize": 8, "legend.title_fontsize": 9, "axes.grid": True, "grid.alpha": 0.3,
    "axes.spines.top": False, "axes.spines.right": False, "savefig.dpi": 150, "svg.fonttype": "none",
}
FORMATS = ("png", "svg")
LEGEND_CHARS = 48
"""Legend entries wrap at this many characters (settings can name several fields)."""


def method_color(method: str) -> Any:
    names = METHODS.names()
    return matplotlib.colormaps["tab10"](names.index(method) % 10 if method in names else 9)


def row_colors(rows: Sequence[tuple[str, str]]) -> list[Any]:
    """Method colours when each method has one row; otherwise one tab20 colour per row."""
    if len({m for m, _ in rows}) == len(rows):
        return [method_color(m) for m, _ in rows]
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


def draw_metric_bars(table: lb.Table, title: str = "") -> Figure:
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
        for j, (label, color) in enumerate(zip(labels, row_colors(rows), strict=True)):
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


def plot_metric_bars(leaderboard: Path, out: Path, *, metric: str = "token_ppl", model: str | None = None) -> Path:
    """The bar figure of one metric from a leaderboard file, saved as `out` (its suffix picks the format)."""
    frame = lb.load(leaderboard.parent, metric=metric)
    if model is not None:
        frame = frame[frame["model"] == model]
    if frame.empty:
        raise ValueError(f"{leaderboard} has no rows for metric {metric!r}" + (f" and model {model}" if model else ""))
    table = lb.build_tables(frame, leaderboard.parent, metric)[0]
    title = f"{pretty(metric)} per method and task" + (f" ({lb.short_model(model)})" if model else "")
    return save_figure(draw_metric_bars(table, title), out)


def _numeric(values: Sequence[str]) -> list[float] | None:
    try:
        return [float(v) for v in values]
    except ValueError:
        return None


def _doubling(xs: Sequence[float]) -> bool:
    positive = [x for x in xs if x > 0]
    return min(xs) >= 0 and len(positive) >= 3 and max(positive) / min(positive) >= 8


def draw_sweep_lines(frame: pd.DataFrame, field: str, values: Sequence[str], metric: str, title: str = "") -> Figure:
    """`metric` against the swept `field` (x in sweep order; numeric fields on a numeric axis), one line per method
    and value of the other swept fields, one panel per task."""
    others = [c for c in frame.columns if "." in c and c != field]
    tasks = list(dict.fromkeys(frame["task"]))
    xs_num = _numeric(values)
    fig, axes = new_figure(len(tasks), width=5.5, height=4.0)
    with matplotlib.rc_context(STYLE):
        for ax, task in zip(axes, tasks, strict=True):
            sub = frame[frame["task"] == task]
            for k, (key, line) in enumerate(sub.groupby(["method", *others], sort=False)):
                key = key if isinstance(key, tuple) else (key,)
                label = ", ".join([key[0], *(f"{o.split('.')[-1]}={v}" for o, v in zip(others, key[1:],
                                                                                      strict=True))])
                order = {v: i for i, v in enumerate(values)}
                line = line.sort_values(field, key=lambda s: s.map(order))
                x = [xs_num[order[v]] if xs_num else order[v] for v in line[field]]
                color = method_color(key[0]) if not others else matplotlib.colormaps["tab10"](k % 10)
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
    singles = [v for v in values if v != "all" and len(parse_layers(v)) == 1]
    groups = [v for v in values if v not in singles]
    return sorted(singles, key=lambda v: parse_layers(v)[0]), groups


def draw_layer_placement(frame: pd.DataFrame, values: Sequence[str], metric: str, title: str = "") -> Figure:
    """Bars of `metric` with memory at one layer (each index), then at groups of layers (hatched); a dashed line at
    the all-layer value and the best single layer outlined. One panel per task, one bar colour per method."""
    singles, groups = layer_order(values)
    cats = singles + groups
    tasks = list(dict.fromkeys(frame["task"]))
    methods = list(dict.fromkeys(frame["method"]))
    fig, axes = new_figure(len(tasks), width=max(5.0, 0.55 * len(cats) * len(methods) + 2.5), height=4.0)
    lower = lb.lower_is_better(metric)
    width = 0.8 / len(methods)
    with matplotlib.rc_context(STYLE):
        for ax, task in zip(axes, tasks, strict=True):
            for j, method in enumerate(methods):
                sub = frame[(frame["task"] == task) & (frame["method"] == method)].set_index("injection.layers")
                heights = [float(sub["value"].get(c, np.nan)) for c in cats]
                xs = np.arange(len(cats)) + (j - (len(methods) - 1) / 2) * width
                bars = ax.bar(xs, heights, width, color=method_color(method), label=method,
                              hatch=[None] * len(singles) + ["//"] * len(groups), edgecolor="white")
                ax.bar_label(bars, fmt="%.4g", fontsize=7, padding=2, rotation=90)
                single = [h for h in heights[:len(singles)] if not np.isnan(h)]
                if single:
                    best = heights.index(min(single) if lower else max(single))
                    bars[best].set_edgecolor("black")
                    bars[best].set_linewidth(1.5)
                if "all" in sub.index:
                    ax.axhline(float(sub["value"]["all"]), color=method_color(method), linestyle="--", linewidth=1,
                               label=f"{method}, all layers")
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
                       model: str | None = None) -> Path:
    """`metric` against evaluation length (log2 axis), one line per method: the position-interpolation figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    frame = pd.read_csv(leaderboard, keep_default_na=False)
    frame = frame[(frame["task"] == task) & (frame["metric"] == metric) & (frame["subtask"] == "")]
    if model is not None:
        frame = frame[frame["model"] == model]
    if frame.empty:
        raise ValueError(f"{leaderboard} has no {task!r} rows for metric {metric!r}")
    # The latest run per method when the leaderboard holds several.
    latest = frame.groupby("method", sort=False)["run_id"].last()
    frame = frame[frame["run_id"].isin(latest)]
    fig, ax = plt.subplots(figsize=(7.5, 4.5), layout="constrained")
    for method, group in frame.groupby("method", sort=False):
        group = group.sort_values("context_len")
        ax.plot(group["context_len"], group["value"].astype(float), marker="o", label=method,
                color=method_color(method))
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


def save_figure(fig: Any, out: Path) -> Path:
    """Write the figure atomically (PNG or SVG by suffix) and close it."""
    import matplotlib.pyplot as plt

    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.stem}.", suffix=out.suffix, dir=out.parent)
    os.close(fd)
    fig.savefig(tmp, dpi=150)
    plt.close(fig)
    os.replace(tmp, out)
    return out
