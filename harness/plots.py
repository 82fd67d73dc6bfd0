"""Figures drawn from the leaderboard CSV alone (never from in-memory results)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import pandas as pd


def plot_metric_bars(leaderboard: Path, out: Path, *, metric: str = "token_ppl", model: str | None = None) -> Path:
    """Grouped bars of `metric` per task (groups) and method (bars), labelled with their values."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    frame = pd.read_csv(leaderboard, keep_default_na=False)
    # Headline rows only: a run's first row of a metric; breakdowns (subtasks, other lengths) follow it.
    frame = frame[(frame["metric"] == metric) & (frame["subtask"] == "")].drop_duplicates(["run_id", "metric"])
    if model is not None:
        frame = frame[frame["model"] == model]
    if frame.empty:
        raise ValueError(f"{leaderboard} has no rows for metric {metric!r}")
    # The latest row per (task, method) when a leaderboard holds several models or configs.
    table = frame.groupby(["task", "method"], sort=False)["value"].last().unstack("method")
    tasks, methods = list(table.index), list(table.columns)
    width = 0.8 / len(methods)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.2 * len(methods) * len(tasks) + 2), 4.5), layout="constrained")
    cmap = plt.get_cmap("tab10")
    for j, name in enumerate(methods):
        xs = [i + (j - (len(methods) - 1) / 2) * width for i in range(len(tasks))]
        bars = ax.bar(xs, table[name].to_numpy(dtype=float), width, label=name, color=cmap(j % 10))
        ax.bar_label(bars, fmt="%.3g", fontsize=7, padding=2)
    ax.set_xticks(range(len(tasks)), tasks)
    ax.set_ylabel(metric.replace("_", " "))
    ax.set_xlabel("task")
    ax.set_title(f"{metric.replace('_', ' ')} per method and task" + (f" ({model})" if model else ""))
    ax.margins(y=0.15)
    ax.legend(title="method", loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    return save_figure(fig, out)


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
    cmap = plt.get_cmap("tab10")
    for j, (method, group) in enumerate(frame.groupby("method", sort=False)):
        group = group.sort_values("context_len")
        ax.plot(group["context_len"], group["value"].astype(float), marker="o", label=method, color=cmap(j % 10))
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
