"""Fine-tuning logs and their plots: `train_log.csv` (one row per optimizer step), `eval_log.csv` (held-out
perplexity every few steps, before training first), `loss.png`, and the training-data-scale study of the paper's
Appendix C (held-out perplexity after N tokens, per method) drawn from several runs' logs.

Floats are written with `repr`, so a resumed run's log can be compared to an uninterrupted one bit for bit.
"""

from __future__ import annotations

import csv
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

import pandas as pd

from unimem_bench.harness.reporting.plots import save_figure

TRAIN_COLUMNS = ["step", "tokens", "loss", "lr", "grad_norm", "tokens_per_s", "elapsed_s"]
EVAL_COLUMNS = ["step", "tokens", "heldout_ppl", "heldout_nll", "heldout_tokens", "seconds"]


class CsvLog:
    """An append-only CSV of fixed columns, flushed every row; `truncate(step)` drops rows after a checkpoint."""

    def __init__(self, path: Path, columns: list[str]) -> None:
        self.path = path
        self.columns = columns

    def append(self, row: dict[str, Any]) -> None:
        new = not self.path.exists()
        with self.path.open("a", newline="") as f:
            writer = csv.writer(f)
            if new:
                writer.writerow(self.columns)
            writer.writerow([_cell(row[c]) for c in self.columns])

    def truncate(self, step: int) -> None:
        """Keep only rows of steps <= `step` (atomic rewrite): what a run resumed from that step has not redone."""
        if not self.path.exists():
            return
        with self.path.open(newline="") as f:
            rows = list(csv.reader(f))
        kept = [r for r in rows[1:] if int(r[0]) <= step]
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", dir=self.path.parent)
        with os.fdopen(fd, "w", newline="") as f:
            csv.writer(f).writerows([rows[0], *kept])
        os.replace(tmp, self.path)


def _cell(value: Any) -> str:
    return repr(value) if isinstance(value, float) else str(value)


def plot_loss(run_dir: Path, title: str) -> Path:
    """`loss.png`: training loss per step (and its running mean) and held-out perplexity, against tokens seen."""
    from matplotlib.figure import Figure  # a Figure, never pyplot: no backend is chosen for the caller

    train = pd.read_csv(run_dir / "train_log.csv") if (run_dir / "train_log.csv").exists() else None
    evals = pd.read_csv(run_dir / "eval_log.csv") if (run_dir / "eval_log.csv").exists() else None
    fig = Figure(figsize=(11, 4), layout="constrained")
    left, right = fig.subplots(1, 2)
    if train is not None and not train.empty:
        left.plot(train["tokens"], train["loss"], lw=0.8, alpha=0.4, label="step")
        # A running mean over ~5% of the steps shows the trend through the per-document noise.
        span = max(1, len(train) // 20)
        left.plot(train["tokens"], train["loss"].rolling(span, min_periods=1).mean(), lw=1.8, label=f"mean of {span}")
        left.legend()
    left.set_xlabel("training tokens")
    left.set_ylabel("loss (nats/token)")
    left.set_title("training loss")
    if evals is not None and not evals.empty:
        right.plot(evals["tokens"], evals["heldout_ppl"], marker="o")
        for x, y in zip(evals["tokens"], evals["heldout_ppl"], strict=True):
            right.annotate(f"{y:.4g}", (x, y), textcoords="offset points", xytext=(0, 6), ha="center", fontsize=7)
    right.set_xlabel("training tokens")
    right.set_ylabel("held-out token perplexity")
    right.set_title("held-out perplexity")
    fig.suptitle(title)
    return save_figure(fig, run_dir / "loss.png")


def data_scale_table(run_dirs: list[Path]) -> pd.DataFrame:
    """Held-out perplexity after N training tokens, one row per (run, evaluation): method, tokens, heldout_ppl."""
    frames = []
    for run in run_dirs:
        info_path, log = run / "finetune.json", run / "eval_log.csv"
        if not info_path.is_file() or not log.is_file():
            raise FileNotFoundError(f"{run} is not a fine-tuning run folder (needs finetune.json and eval_log.csv)")
        info = json.loads(info_path.read_text())
        frame = pd.read_csv(log)
        frame.insert(0, "method", info["method"])
        frame.insert(1, "run", str(run))
        frames.append(frame)
    return pd.concat(frames, ignore_index=True)


def plot_data_scale(run_dirs: list[Path], out: Path) -> Path:
    """The Appendix C study: held-out perplexity against training tokens, one line per method (run)."""
    from matplotlib.figure import Figure

    table = data_scale_table(run_dirs)
    fig = Figure(figsize=(7, 4.5), layout="constrained")
    ax = fig.subplots()
    for (method, _), group in table.groupby(["method", "run"], sort=False):
        # Tokens start at 0 (before fine-tuning): a symlog axis keeps that point on a log-like scale.
        ax.plot(group["tokens"], group["heldout_ppl"], marker="o", label=method)
    largest = float(table["tokens"].max())
    if largest > 0:
        ax.set_xscale("symlog", linthresh=10 ** max(0, math.floor(math.log10(largest)) - 2))
    ax.set_xlabel("fine-tuning tokens")
    ax.set_ylabel("held-out token perplexity")
    ax.set_title("Held-out perplexity after N fine-tuning tokens (UniMem Appendix C)")
    ax.legend(title="method", fontsize=8)
    return save_figure(fig, out)
