"""Figures drawn from the leaderboard CSV alone (never from in-memory results)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pandas as pd


def plot_metric_bars(leaderboard: Path, out: Path, *, metric: str = "token_ppl", model: str | None = None) -> Path:
    """Grouped bars of `metric` per task (groups) and method (bars), labelled with their values."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    frame = pd.read_csv(leaderboard, keep_default_na=False)
    frame = frame[(frame["metric"] == metric) & (frame["subtask"] == "")]  # headline rows, not the breakdowns
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
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.stem}.", suffix=out.suffix, dir=out.parent)
    os.close(fd)
    fig.savefig(tmp, dpi=150)
    plt.close(fig)
    os.replace(tmp, out)
    return out
