"""Paper-style tables from results/leaderboard.csv: methods x tasks for one metric, the best of each column marked.

A row is a method at one setting: when a results folder holds several runs of a method (a sweep, or `--set`
overrides), the config fields that differ between them (read from each run's config.yaml and run.json) name the
setting, e.g. `injection.layers=2`. A column is a task, holding each run's summary row of the metric (by default
the task's headline metric, from the leaderboard's `headline` column; breakdowns by depth or length have their own
figures). Where a cell has several results (e.g. the same method and setting with other `--max-docs`), the newest
run (by `finished`) is shown. The best cell of a column follows the metric's `higher_is_better`. Nothing here
depends on the order of the file's rows: rows follow `Order` (methods) and then the setting, columns `Order` (tasks).
"""

from __future__ import annotations

import math
import os
import re
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
from rich.console import Console
from rich.table import Table as RichTable

from unimem_bench.harness.reporting.results import (
    ALPHABETICAL,
    Order,
    latest_runs,
    layers_text,
    load,
    read_run_config,
    read_run_json,
    sweep_points,
)

__all__ = ["Order", "Table", "build_tables", "load", "run_settings", "short_model", "show", "sweep_tables"]


def short_model(name: str) -> str:
    """`hf:/path/to/stories260K` -> `stories260K`, a fine-tuned export `.../<run>/model` -> `<run>`; hub ids stay."""
    kind, sep, rest = name.partition(":")
    if not (sep and kind in ("hf", "llama2c", "reference")):
        return name
    path = Path(rest)
    return path.parent.name if path.name == "model" and (path.parent / "finetune.json").exists() else path.name


def _flatten(data: dict, prefix: str = "") -> dict[str, str]:
    flat: dict[str, str] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        elif isinstance(value, list):
            flat[f"{prefix}{key}"] = layers_text(value)
        else:
            flat[f"{prefix}{key}"] = str(value)
    return flat


def run_settings(out: Path, frame: pd.DataFrame) -> dict[str, str]:
    """run_id -> the fields that differ among the runs of its method (on any model: a fine-tuned sweep gives each
    point its own model), as `field=value, ...`."""
    settings: dict[str, str] = {}
    for _, group in frame.groupby("method"):
        fields = {}
        for rid in sorted(set(group["run_id"])):
            flat = _flatten(read_run_config(out, rid))
            record = read_run_json(out, rid)
            flat.update({k: str(record[k]) for k in ("segment_len", "seed") if k in record})
            flat.pop("name", None)
            fields[rid] = flat
        keys = sorted({k for flat in fields.values() for k in flat})
        varying = [k for k in keys if len({flat.get(k) for flat in fields.values()}) > 1]
        for rid, flat in fields.items():
            settings[rid] = ", ".join(f"{k}={flat.get(k, '-')}" for k in varying)
    return settings


def natural_key(text: str) -> list[Any]:
    """`topk=16` after `topk=4`: digit runs compare as numbers."""
    return [int(part) if i % 2 else part for i, part in enumerate(re.split(r"(\d+)", text))]


@dataclass(frozen=True)
class Table:
    """One metric as rows (model, method, setting) x columns (tasks), with the best cell per column."""

    metric: str
    values: pd.DataFrame
    best: pd.DataFrame
    hidden: int
    """Older results not shown because a newer one fills the same cell."""
    higher_is_better: dict[str, bool] = field(default_factory=dict)
    """Column (task) -> whether larger values of the metric are better there (what marks the best cell)."""

    @property
    def direction(self) -> str:
        """`higher is better`, `lower is better`, or per column when the tasks disagree."""
        kinds = set(self.higher_is_better.values())
        if len(kinds) != 1:
            return "better per task: " + ", ".join(f"{c} {'higher' if h else 'lower'}"
                                                   for c, h in self.higher_is_better.items())
        return f"{'higher' if kinds.pop() else 'lower'} is better"


def headlines(frame: pd.DataFrame) -> dict[str, str]:
    """task -> its headline metric: the `headline` row of the task's newest run."""
    rows = latest_runs(frame[frame["headline"]], ["task"])
    return dict(zip(rows["task"], rows["metric"], strict=True))


def _row_order(latest: pd.DataFrame, order: Order, position: dict[str, int]) -> list[tuple[str, str, str]]:
    """The (model, method, setting) rows sorted by method order, model, first run in `position`, then setting."""
    first = latest.assign(position=latest["run_id"].map(lambda r: position.get(r, len(position))))
    earliest = first.groupby(["model", "method", "setting"])["position"].min()
    return sorted(earliest.index, key=lambda i: (order.method_key(i[1]), i[0], earliest[i], natural_key(i[2])))


def build_tables(frame: pd.DataFrame, out: Path, metric: str | None = None, *, order: Order = ALPHABETICAL,
                 run_order: Sequence[str] | None = None) -> list[Table]:
    """One table per metric: `metric`, or the headline metric of each task present. A row's setting names what
    differs between the runs of its method within the table (run records under `out`); rows follow `order`'s
    methods, then the model, then `run_order` (a sweep's points) or the setting."""
    tables = []
    position = {rid: i for i, rid in enumerate(run_order or [])}
    task_headline = headlines(frame)
    by_task = order.sort_tasks(task_headline)
    for name in [metric] if metric else list(dict.fromkeys(task_headline[t] for t in by_task)):
        rows = frame[(frame["metric"] == name) & frame["summary"]].copy()
        if not metric:
            rows = rows[rows["task"].map(task_headline) == name]
        if rows.empty:
            continue
        rows["setting"] = rows["run_id"].map(run_settings(out, rows))
        rows["model"] = rows["model"].map(short_model)
        rows["column"] = rows["task"]
        keys = ["model", "method", "setting", "column"]
        latest = latest_runs(rows, keys)
        wide = latest.pivot_table(index=["model", "method", "setting"], columns="column", values="value",
                                  aggfunc="first")
        wide = wide.loc[_row_order(latest, order, position), order.sort_tasks(latest["column"])]
        newest = latest_runs(latest, ["column"])
        higher = dict(zip(newest["column"], newest["higher_is_better"], strict=True))
        higher = {c: bool(higher[c]) for c in wide.columns}
        extreme = pd.Series({c: wide[c].max() if higher[c] else wide[c].min() for c in wide.columns})
        best = wide.eq(extreme, axis="columns")
        tables.append(Table(name, wide, best, hidden=len(rows) - len(latest), higher_is_better=higher))
    return tables


def _row_headers(table: Table) -> tuple[list[str], list[tuple[str, ...]]]:
    """Index levels worth showing (model only when several, setting only when any) and each row's values."""
    index = table.values.index
    levels = [n for n in index.names if n == "method" or (n == "model" and index.get_level_values(n).nunique() > 1)
              or (n == "setting" and any(index.get_level_values(n)))]
    return levels, [tuple(row[index.names.index(n)] for n in levels) for row in index]


def _fmt(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.4g}"


def render_rich(table: Table, console: Console, title: str) -> None:
    levels, heads = _row_headers(table)
    out = RichTable(title=f"{title}: {table.metric}", caption=f"{table.direction}; best per column in bold")
    for level in levels:
        out.add_column(level)
    for column in table.values.columns:
        out.add_column(str(column), justify="right")
    for head, (_, row), (_, best) in zip(heads, table.values.iterrows(), table.best.iterrows(), strict=True):
        cells = [f"[bold green]{_fmt(v)}[/bold green]" if b else _fmt(v) for v, b in zip(row, best, strict=True)]
        out.add_row(*head, *cells)
    console.print(out)
    if table.hidden:
        console.print(f"[dim]{table.hidden} older result(s) of the same method, setting and task not shown[/dim]")


def to_markdown(table: Table) -> str:
    levels, heads = _row_headers(table)
    lines = ["| " + " | ".join([*levels, *map(str, table.values.columns)]) + " |",
             "|" + "---|" * len(levels) + "---:|" * len(table.values.columns)]
    for head, (_, row), (_, best) in zip(heads, table.values.iterrows(), table.best.iterrows(), strict=True):
        cells = [f"**{_fmt(v)}**" if b else _fmt(v) for v, b in zip(row, best, strict=True)]
        lines.append("| " + " | ".join([*head, *cells]) + " |")
    return f"**{table.metric}** ({table.direction}; best per column in bold)\n\n" + "\n".join(lines) + "\n"


def to_csv_frame(table: Table) -> pd.DataFrame:
    """The table with formatted numbers; the best of each column carries a trailing `*`."""
    levels, heads = _row_headers(table)
    rows = []
    for head, (_, row), (_, best) in zip(heads, table.values.iterrows(), table.best.iterrows(), strict=True):
        cells = {str(c): _fmt(v) + ("*" if b else "") for (c, v), b in zip(row.items(), best, strict=True)}
        rows.append({**dict(zip(levels, head, strict=True)), "metric": table.metric, **cells})
    return pd.DataFrame(rows)


def show(out: Path, console: Console, *, model: str | None = None, tasks: list[str] | None = None,
         methods: list[str] | None = None, metric: str | None = None, fmt: str = "rich",
         markdown: Path | None = None, csv: Path | None = None, order: Order = ALPHABETICAL) -> list[Table]:
    """Print the tables (rich, markdown or csv) and write the Markdown and CSV files asked for."""
    tables = build_tables(load(out, model=model, tasks=tasks, methods=methods, metric=metric), out, metric,
                          order=order)
    text_md = "\n".join(to_markdown(t) for t in tables)
    text_csv = pd.concat([to_csv_frame(t) for t in tables], ignore_index=True).to_csv(index=False)
    if fmt == "rich":
        for table in tables:
            render_rich(table, console, title=f"Leaderboard ({out / 'leaderboard.csv'})")
    else:
        console.out(text_md if fmt == "markdown" else text_csv, highlight=False)
    for path, text in ((markdown, text_md), (csv, text_csv)):
        if path is not None:
            atomic_write_text(text, path)
            console.print(f"wrote {path}", highlight=False)
    return tables


def atomic_write_text(text: str, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def sweep_tables(out: Path, name: str, order: Order = ALPHABETICAL) -> list[Table]:
    """The leaderboard tables of a saved sweep's finished runs: a row per point and method, in point order."""
    run_ids = list(dict.fromkeys(sweep_points(out, name)["run_id"]))
    finished = [rid for rid in run_ids if (out / "runs" / rid / "metrics.json").exists()]
    if not finished:
        return []
    return build_tables(load(out, run_ids=finished), out, order=order, run_order=finished)
