"""Paper-style tables from results/leaderboard.csv: methods x tasks for one metric, the best of each column marked.

A row is a method at one setting: when a results folder holds several runs of a method (a sweep, or `--set`
overrides), the config fields that differ between them (read from each run's config.yaml and run.json) name the
setting, e.g. `injection.layers=2`. A column is a task, holding each run's headline row (its first row of the
metric; the breakdowns by depth or length have their own figures). Where a cell has several results (e.g. the
same method and setting with other `--max-docs`), the newest run in the file is shown.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from rich.console import Console
from rich.table import Table as RichTable

from unimem_bench.harness.evaluation import records
from unimem_bench.methods import METHODS
from unimem_bench.methods.config import format_layers
from unimem_bench.tasks import TASKS

LOWER_IS_BETTER = ("ppl", "nll", "bits_per", "loss", "seconds", "bytes")
"""Metric name parts meaning smaller is better; every other metric (accuracy, F1, ROUGE...) is higher-better."""


def lower_is_better(metric: str) -> bool:
    return any(part in metric for part in LOWER_IS_BETTER)


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
            flat[f"{prefix}{key}"] = format_layers(tuple(value))
        else:
            flat[f"{prefix}{key}"] = str(value)
    return flat


def run_settings(out: Path, frame: pd.DataFrame) -> dict[str, str]:
    """run_id -> the fields that differ among the runs of its method (on any model: a fine-tuned sweep gives each
    point its own model), as `field=value, ...`."""
    settings: dict[str, str] = {}
    for _, group in frame.groupby("method", sort=False):
        fields = {}
        for rid in dict.fromkeys(group["run_id"]):
            flat = _flatten(records.read_run_config(out, rid))
            record = records.read_run_json(out, rid)
            flat.update({k: str(record[k]) for k in ("segment_len", "seed") if k in record})
            flat.pop("name", None)
            fields[rid] = flat
        keys = dict.fromkeys(k for flat in fields.values() for k in flat)
        varying = [k for k in keys if len({flat.get(k) for flat in fields.values()}) > 1]
        for rid, flat in fields.items():
            settings[rid] = ", ".join(f"{k}={flat.get(k, '-')}" for k in varying)
    return settings


def load(out: Path, *, model: str | None = None, tasks: list[str] | None = None, methods: list[str] | None = None,
         metric: str | None = None, run_ids: list[str] | None = None) -> pd.DataFrame:
    """The leaderboard rows that pass the filters (model: a substring of the model id)."""
    path = out / "leaderboard.csv"
    if not path.exists():
        raise FileNotFoundError(f"no leaderboard at {path}: run `unimem-bench run` or `unimem-bench sweep` first "
                                "(or pass --out to the results folder)")
    frame = records.read_leaderboard(path)
    filters = {"model": (model, frame["model"].str.contains(model, regex=False) if model else None),
               "task": (tasks, frame["task"].isin(tasks) if tasks else None),
               "method": (methods, frame["method"].isin(methods) if methods else None),
               "metric": (metric, frame["metric"] == metric if metric else None),
               "run_id": ("of this sweep", frame["run_id"].isin(run_ids) if run_ids is not None else None)}
    for name, (wanted, mask) in filters.items():
        if mask is None:
            continue
        if not mask.any():
            known = ", ".join(sorted(map(str, frame[name].unique()))) or "none"
            raise FileNotFoundError(f"{path} has no rows with {name} {wanted!r} (it has: {known})")
        frame = frame[mask]
    frame = frame.copy()
    frame["value"] = frame["value"].astype(float)
    return frame


@dataclass(frozen=True)
class Table:
    """One metric as rows (model, method, setting) x columns (tasks), with the best cell per column."""

    metric: str
    values: pd.DataFrame
    best: pd.DataFrame
    hidden: int
    """Older results not shown because a newer one fills the same cell."""

    @property
    def lower_better(self) -> bool:
        return lower_is_better(self.metric)


def headlines(frame: pd.DataFrame) -> dict[str, str]:
    """task -> its headline metric (registered tasks that report it) or else its first metric, in order of
    appearance."""
    found = {}
    for task, group in frame.groupby("task", sort=False):
        headline = TASKS.get(task).headline if task in TASKS.names() else group["metric"].iloc[0]
        found[task] = headline if headline in set(group["metric"]) else group["metric"].iloc[0]
    return found


def headline_rows(frame: pd.DataFrame) -> pd.DataFrame:
    """Each run's first row of each metric: its headline (breakdown rows by subtask or length follow it)."""
    return frame.drop_duplicates(["run_id", "metric"], keep="first")


def build_tables(frame: pd.DataFrame, out: Path, metric: str | None = None) -> list[Table]:
    """One table per metric: `metric`, or the headline metric of each task present. A row's setting names what
    differs between the runs of its method within the table (run records under `out`)."""
    order = {name: i for i, name in enumerate(METHODS.names())}
    tables = []
    task_headline = headlines(frame)
    for name in [metric] if metric else list(dict.fromkeys(task_headline.values())):
        rows = headline_rows(frame[frame["metric"] == name]).copy()
        if not metric:
            rows = rows[rows["task"].map(task_headline) == name]
        rows["setting"] = rows["run_id"].map(run_settings(out, rows))
        rows["model"] = rows["model"].map(short_model)
        rows["column"] = rows["task"]
        rows["rank"] = rows["method"].map(lambda m: order.get(m, len(order)))
        keys = ["model", "method", "setting", "column"]
        latest = rows.drop_duplicates(keys, keep="last")
        wide = latest.pivot_table(index=["rank", "model", "method", "setting"], columns="column", values="value",
                                  aggfunc="last", sort=False)
        wide = wide.sort_index(level="rank", sort_remaining=False).droplevel("rank")
        wide = wide[list(dict.fromkeys(latest["column"]))]
        extreme = wide.min() if lower_is_better(name) else wide.max()
        best = wide.eq(extreme, axis="columns")
        tables.append(Table(name, wide, best, hidden=len(rows) - len(latest)))
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
    direction = "lower" if table.lower_better else "higher"
    out = RichTable(title=f"{title}: {table.metric}", caption=f"{direction} is better; best per column in bold")
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
    direction = "lower" if table.lower_better else "higher"
    return f"**{table.metric}** ({direction} is better; best per column in bold)\n\n" + "\n".join(lines) + "\n"


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
         markdown: Path | None = None, csv: Path | None = None) -> list[Table]:
    """Print the tables (rich, markdown or csv) and write the Markdown and CSV files asked for."""
    tables = build_tables(load(out, model=model, tasks=tasks, methods=methods, metric=metric), out, metric)
    text_md = "\n".join(to_markdown(t) for t in tables)
    text_csv = pd.concat([to_csv_frame(t) for t in tables], ignore_index=True).to_csv(index=False)
    if fmt == "rich":
        for table in tables:
            render_rich(table, console, title=f"Leaderboard ({out / 'leaderboard.csv'})")
    else:
        console.out(text_md if fmt == "markdown" else text_csv, highlight=False)
    for path, text in ((markdown, text_md), (csv, text_csv)):
        if path is not None:
            records.atomic_write_text(text, path)
            console.print(f"wrote {path}", highlight=False)
    return tables
