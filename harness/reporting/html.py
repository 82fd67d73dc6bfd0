"""`unimem-bench report`: one self-contained static HTML page from a results folder.

The page holds everything inline (styles and scripts from `report.html`, figures as base64 SVG), so it opens from
disk or an attachment with no server and no network. It shows the leaderboard as sortable tables: an overview of
each task's headline per method, then per task its metrics and its breakdowns (position buckets, lengths, depths,
datasets), the best of each column marked by the metric's direction; the figures of every task and sweep; and each
run's record (config, commit, package versions, seed, task parameters), which every number in a table opens.
"""

from __future__ import annotations

import base64
import html
import json
import math
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path
from typing import Any

import matplotlib
import matplotlib.colors
import pandas as pd

from unimem_bench.harness.reporting import tables as lb
from unimem_bench.harness.reporting.differences import (
    POSITION,
    draw_metric_dots,
    draw_position_curves,
    position_table,
    position_tasks,
)
from unimem_bench.harness.reporting.figures import length_tasks, needle_tasks, plot_sweeps
from unimem_bench.harness.reporting.heatmaps import DEPTH, plot_niah_heatmaps
from unimem_bench.harness.reporting.plots import draw_metric_bars, method_color, plot_length_curves, save_figure
from unimem_bench.harness.reporting.results import ALPHABETICAL, Order, latest_runs, list_sweeps, load, read_run_json

Row = tuple[str, str, str]
"""A table row: (model, method, setting)."""


@dataclass(frozen=True)
class Grid:
    """A table's numbers: rows x columns, each cell a (value, run_id), and each column's direction."""

    rows: list[Row]
    columns: list[str]
    labels: dict[str, tuple[str, str]]
    """Column -> (header, small second header line)."""
    cells: dict[tuple[Row, str], tuple[float, str]]
    higher: dict[str, bool]
    """Column -> whether larger is better."""
    hidden: int = 0
    """Older results not shown because a newer run fills the same cell."""


def higher_is_better(frame: pd.DataFrame, metric: str) -> bool:
    """The metric's direction, as its task declared it (the leaderboard's `higher_is_better`)."""
    return bool(frame.loc[frame["metric"] == metric, "higher_is_better"].iloc[0])


def grid(rows: pd.DataFrame, column: pd.Series, labels: dict[str, tuple[str, str]], higher: dict[str, bool],
         order: Order) -> Grid:
    """`rows` (with a `setting` column) as a Grid keyed by `column` (columns in the rows' order), rows in method
    order, then model and setting; the newest run wins a cell."""
    frame = rows.assign(column=column.to_numpy(), model=rows["model"].map(lb.short_model))
    latest = latest_runs(frame, ["model", "method", "setting", "column"])
    keys: list[Row] = sorted(set(zip(latest["model"], latest["method"], latest["setting"], strict=True)),
                             key=lambda r: (order.method_key(r[1]), r[0], lb.natural_key(r[2])))
    cells = {((m, meth, s), c): (float(v), rid) for m, meth, s, c, v, rid in zip(
        latest["model"], latest["method"], latest["setting"], latest["column"], latest["value"], latest["run_id"],
        strict=True)}
    columns = [c for c in dict.fromkeys(frame["column"]) if c in set(latest["column"])]
    return Grid(keys, columns, labels, cells, higher, hidden=len(frame) - len(latest))


def best_cells(g: Grid) -> set[tuple[Row, str]]:
    """The best finite value of each column with at least two different values (ties all count)."""
    best = set()
    for column in g.columns:
        found = {row: g.cells[(row, column)][0] for row in g.rows if (row, column) in g.cells}
        found = {row: v for row, v in found.items() if not math.isnan(v)}
        if len(set(found.values())) > 1:
            target = max(found.values()) if g.higher[column] else min(found.values())
            best |= {(row, column) for row, v in found.items() if v == target}
    return best


def _e(text: Any) -> str:
    return html.escape(str(text), quote=True)


def render_grid(g: Grid, order: Order, *, headline: str | None = None, caption: str = "") -> str:
    """A sortable table: row headers (model when several, method, setting when any), then the numbers."""
    show_model = len({r[0] for r in g.rows}) > 1
    methods = [r[1] for r in g.rows]
    show_setting = any(r[2] for r in g.rows)
    best = best_cells(g)
    sort = '<span class="sort" aria-hidden="true"></span>'
    head = [f'<th class="text" data-type="text">model{sort}</th>'] if show_model else []
    head.append(f'<th class="text" data-type="text">method{sort}</th>')
    head += [f'<th class="text" data-type="text">setting{sort}</th>'] if show_setting else []
    for column in g.columns:
        title, sub = g.labels.get(column, (column, ""))
        arrow = "higher is better" if g.higher[column] else "lower is better"
        css = ' class="headline"' if column == headline else ""
        head.append(f'<th data-type="num" title="{_e(arrow)}"{css}>{_e(title)}{sort}'
                    f'<span class="dir">{_e(sub)}{" · " if sub else ""}{"↑" if g.higher[column] else "↓"}</span></th>')
    body = []
    for row in g.rows:
        model, method, setting = row
        cells = [f'<td class="text">{_e(model)}</td>'] if show_model else []
        color = matplotlib.colors.to_hex(method_color(method, order, methods))
        cells.append(f'<td class="text"><span class="swatch" style="background:{color}"></span>'
                     f'{_e(method)}</td>')
        cells += [f'<td class="text setting">{_e(setting)}</td>'] if show_setting else []
        for column in g.columns:
            if (row, column) not in g.cells:
                cells.append('<td data-value="" class="missing">–</td>')
                continue
            value, rid = g.cells[(row, column)]
            css = " ".join(c for c in ("best" if (row, column) in best else "",
                                       "headline" if column == headline else "") if c)
            text = "–" if math.isnan(value) else f"{value:.4g}"
            cells.append(f'<td data-value="{"" if math.isnan(value) else repr(value)}"'
                         f'{f" class={chr(34)}{css}{chr(34)}" if css else ""}>'
                         f'<a href="#run-{_e(rid)}" data-run="{_e(rid)}" title="{_e(value)} · run {_e(rid)}">'
                         f'{_e(text)}</a></td>')
        body.append("<tr>" + "".join(cells) + "</tr>")
    note = f'<p class="note">{_e(caption)}</p>' if caption else ""
    if g.hidden:
        note += f'<p class="note">{g.hidden} older result(s) of the same method, setting and column not shown.</p>'
    return (f'<div class="scroll"><table class="board"><thead><tr>{"".join(head)}</tr></thead>'
            f'<tbody>{"".join(body)}</tbody></table></div>{note}')


def breakdown_key(subtask: str, context_len: int) -> tuple[Any, ...]:
    """Breakdown columns in reading order: position buckets by start, then by length and depth, else by name."""
    position = POSITION.match(subtask)
    if position:
        return (0, int(position["start"]), context_len, [])
    depth = DEPTH.match(subtask)  # the last item is always a list: a depth row and a named row can share a length
    return (1, context_len, float(depth["depth"]) if depth else math.inf, [] if depth else lb.natural_key(subtask))


def breakdown_label(subtask: str, context_len: int, several_lengths: bool) -> tuple[str, str]:
    """(header, second line) of a breakdown column: `0-512` / `tokens`, `depth 0.5` / `1,024 tokens` ..."""
    position = POSITION.match(subtask)
    if position:
        return f"{int(position['start']):,}–{int(position['end']):,}", "position"
    depth = DEPTH.match(subtask)
    if depth:
        return f"depth {float(depth['depth']):g}", f"{context_len:,} tokens"
    if not subtask:
        return f"{context_len:,}", "tokens"
    return subtask, f"{context_len:,} tokens" if several_lengths else ""


def _figure(path_or_fig: Any, tmp: Path, caption: str) -> str:
    """`<figure>` with the SVG inline as base64 (a Figure is saved first)."""
    if not isinstance(path_or_fig, Path):
        path_or_fig = save_figure(path_or_fig, tmp / f"fig-{len(list(tmp.iterdir()))}.svg")
    data = base64.b64encode(path_or_fig.read_bytes()).decode("ascii")
    return (f'<figure><img alt="{_e(caption)}" src="data:image/svg+xml;base64,{data}">'
            f'<figcaption>{_e(caption)}</figcaption></figure>')


def task_section(out: Path, frame: pd.DataFrame, task: str, headline: str, tmp: Path, order: Order) -> str:
    """A task's card: its metrics table (headline first), a table per breakdown metric, its figures."""
    rows = frame[frame["task"] == task].copy()
    rows["setting"] = rows["run_id"].map(lb.run_settings(out, rows))
    summary = rows[rows["summary"]]
    breakdown = rows[~rows["summary"]]
    several_lengths = rows.groupby(["run_id", "subtask", "metric"]).size().max() > 1
    metrics = [headline, *sorted(set(summary["metric"]) - {headline})]
    summary = summary.sort_values("metric", key=lambda m: m.map(metrics.index), kind="stable")
    g = grid(summary, summary["metric"], {m: (m, "headline" if m == headline else "") for m in metrics},
             {m: higher_is_better(frame, m) for m in metrics}, order)
    versions = ", ".join(sorted({str(read_run_json(out, r).get("task_version", "?"))
                                 for r in rows["run_id"].unique()}))
    parts = [f'<section class="card" id="task-{_e(task)}"><h2>{_e(task)}</h2>'
             f'<div class="meta">version {_e(versions)} · {rows["run_id"].nunique()} run(s) · '
             f'headline <b>{_e(headline)}</b> · click a header to sort, a number for its run record</div>',
             "<h3>Metrics</h3>", render_grid(g, order, headline=headline)]
    for metric in sorted(set(breakdown["metric"]), key=lambda m: (m != headline, m)):
        part = breakdown[breakdown["metric"] == metric]
        if (part["subtask"] == "").all():  # rows per evaluation length: the summary's length belongs beside them
            part = rows[(rows["metric"] == metric) & (rows["subtask"] == "")]
        keys_order = [breakdown_key(sub, int(n)) for sub, n in zip(part["subtask"], part["context_len"], strict=True)]
        part = part.iloc[sorted(range(len(part)), key=keys_order.__getitem__)]
        keys = [f"{s}@{n}" for s, n in zip(part["subtask"], part["context_len"], strict=True)]
        labels = {k: breakdown_label(s, int(n), several_lengths)
                  for k, s, n in zip(keys, part["subtask"], part["context_len"], strict=True)}
        kinds = "position in the document" if part["subtask"].str.match(POSITION.pattern).all() else \
            "needle depth and context length" if part["subtask"].str.match(DEPTH.pattern).all() else \
            "evaluation length" if (part["subtask"] == "").all() else "subtask"
        parts += [f'<h3>{_e(metric)} by {kinds}<span class="hint">{len(set(keys))} columns</span></h3>',
                  render_grid(grid(part, pd.Series(keys, index=part.index), labels,
                                   dict.fromkeys(keys, higher_is_better(frame, metric)), order), order)]
    figures = []
    for model, model_rows in rows.groupby("model", sort=False):
        where = f"{task}, {lb.short_model(str(model))}"
        if task in position_tasks(model_rows):
            table = position_table(model_rows, task, order=order)
            figures.append(_figure(draw_position_curves(table, task=task, model=str(model), order=order), tmp,
                                   f"{where}: perplexity by position and change relative to vanilla"))
        if task in needle_tasks(model_rows):
            for path in plot_niah_heatmaps(out / "leaderboard.csv", tmp / f"niah-{len(figures)}", model=str(model),
                                           tasks=[task], formats=("svg",), order=order):
                if path.stem.endswith("_methods"):
                    figures.append(_figure(path, tmp, f"{where}: accuracy by needle depth and context length"))
        if task in length_tasks(model_rows):
            for metric in [headline, *sorted(set(model_rows.loc[model_rows["subtask"] == "", "metric"]) - {headline})]:
                path = plot_length_curves(out / "leaderboard.csv", tmp / f"len-{len(figures)}.svg", task=task,
                                          metric=metric, model=str(model), order=order)
                figures.append(_figure(path, tmp, f"{where}: {metric} against evaluation length"))
    if figures:
        parts += ["<h3>Figures</h3>", '<div class="figures">', *figures, "</div>"]
    return "\n".join([*parts, "</section>"])


def overview_section(out: Path, frame: pd.DataFrame, heads: dict[str, str], tmp: Path, order: Order) -> str:
    """Each task's headline per method (one column per task) and the headline figures."""
    rows = frame[frame["summary"] & (frame["metric"] == frame["task"].map(heads))].copy()
    rows = rows.sort_values("task", key=lambda t: t.map(order.task_key), kind="stable")
    rows["setting"] = rows["run_id"].map(lb.run_settings(out, rows))
    labels = {t: (t, heads[t]) for t in heads}
    g = grid(rows, rows["task"], labels, {t: higher_is_better(frame, heads[t]) for t in heads}, order)
    flat = frame[~frame["task"].isin(length_tasks(frame))]
    figures = []
    for table in lb.build_tables(flat, out, order=order) if not flat.empty else []:
        lower = not any(table.higher_is_better.values())
        fig = draw_metric_dots(table, order=order) if lower else draw_metric_bars(table, order=order)
        figures.append(_figure(fig, tmp, f"{table.metric} per method" + (" (best ringed)" if lower else "")))
    return "\n".join(['<section class="card" id="overview"><h2>Leaderboard</h2>',
                      '<div class="meta">each task\'s headline metric per method (best per column marked ★); '
                      "click a header to sort, a number for its run record</div>",
                      render_grid(g, order), '<div class="figures">', *figures, "</div></section>"])


def record_html(out: Path, rid: str) -> str:
    """A run's record: identity, environment, task parameters, config.yaml and metrics.json."""
    record = read_run_json(out, rid)
    folder = out / "runs" / rid
    if not record:
        return f'<div class="record"><p>No run folder at {_e(folder)}.</p></div>'
    keys = ("run_id", "model", "method", "task", "task_version", "commit", "seed", "segment_len", "device", "finished",
            "seconds", "units_per_second", "reused_samples", "python", "platform")
    items = "".join(f"<dt>{_e(k)}</dt><dd>{_e(record[k])}</dd>" for k in keys if k in record)
    extra = "".join(f"<dt>{_e(k)}</dt><dd>{_e(json.dumps(v) if isinstance(v, dict | list) else v)}</dd>"
                    for k, v in record.items() if k not in (*keys, "packages", "task_params"))
    packages = "".join(f"<dt>{_e(k)}</dt><dd>{_e(v)}</dd>" for k, v in record.get("packages", {}).items())
    params = "".join(f"<dt>{_e(k)}</dt><dd>{_e(v)}</dd>" for k, v in record.get("task_params", {}).items())
    config = (folder / "config.yaml").read_text() if (folder / "config.yaml").exists() else ""
    metrics = (folder / "metrics.json").read_text() if (folder / "metrics.json").exists() else ""
    return (f'<div class="record"><dl>{items}{extra}</dl><h4>task parameters</h4><dl>{params}</dl>'
            f"<h4>package versions</h4><dl>{packages}</dl><h4>config.yaml</h4><pre>{_e(config)}</pre>"
            f"<h4>metrics.json</h4><pre>{_e(metrics)}</pre></div>")


def runs_section(out: Path, frame: pd.DataFrame, order: Order) -> str:
    runs = frame.drop_duplicates("run_id")
    runs = runs.assign(task_key=runs["task"].map(order.task_key), method_key=runs["method"].map(order.method_key))
    runs = runs.sort_values(["task_key", "method_key", "finished"], kind="stable")
    items = [f'<details class="run" id="run-{_e(r.run_id)}"><summary>{_e(r.method)} · {_e(r.task)} · '
             f"{_e(lb.short_model(r.model))} <code>{_e(r.run_id)}</code></summary>{record_html(out, r.run_id)}"
             "</details>" for r in runs.itertuples()]
    return "\n".join(['<section class="card" id="runs"><h2>Run records</h2>',
                      '<div class="meta">config, commit, package versions, seed and task parameters of every run '
                      "(<code>runs/&lt;run_id&gt;/</code>)</div>", *items, "</section>"])


def build_page(out: Path, *, title: str = "unimem-bench results", order: Order = ALPHABETICAL) -> str:
    """The whole page as a string (no file written); methods and tasks in `order`."""
    frame = load(out)
    heads = dict(sorted(lb.headlines(frame).items(), key=lambda item: order.task_key(item[0])))
    commits = sorted({str(read_run_json(out, r).get("commit", "?")) for r in frame["run_id"].unique()})
    chips = {"models": frame["model"].nunique(), "methods": frame["method"].nunique(), "tasks": len(heads),
             "runs": frame["run_id"].nunique(), "rows": len(frame)}
    with tempfile.TemporaryDirectory() as name, matplotlib.rc_context({"svg.hashsalt": "unimem-bench"}):
        tmp = Path(name)
        sections = [overview_section(out, frame, heads, tmp, order)]
        sections += [task_section(out, frame, task, metric, tmp, order) for task, metric in heads.items()]
        sweeps = [s["name"] for s in list_sweeps(out)]
        if sweeps:
            figures = [_figure(p, tmp, p.stem.replace("_", " ")) for p in plot_sweeps(out, tmp / "sweeps",
                                                                                      formats=("svg",), order=order)]
            sections.append('<section class="card" id="sweeps"><h2>Sweeps</h2><div class="meta">'
                            f'{_e(", ".join(sweeps))}</div><div class="figures">{"".join(figures)}</div></section>')
    sections.append(runs_section(out, frame, order))
    nav = "".join(f'<a href="#{a}">{_e(t)}</a>' for a, t in [("overview", "Leaderboard"),
                                                            *((f"task-{t}", t) for t in heads),
                                                            *([("sweeps", "Sweeps")] if sweeps else []),
                                                            ("runs", "Run records")])
    models = ", ".join(lb.short_model(m) for m in dict.fromkeys(frame["model"]))
    body = (f'<header class="top"><h1>{_e(title)}</h1><div class="sub">{_e(out.resolve())} · models: {_e(models)} · '
            f'generated {datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")}</div><div class="chips">'
            + "".join(f'<span class="chip"><b>{n}</b> {k}</span>' for k, n in chips.items())
            + f'<span class="chip">commit {_e(", ".join(c[:12] for c in commits))}</span></div></header>'
            f'<nav class="toc">{nav}</nav><main>{"".join(sections)}</main>'
            '<footer>written by <code>unimem-bench report</code> from leaderboard.csv and runs/ · '
            "self-contained: no server, no network</footer>")
    template = resources.files("unimem_bench.harness.reporting").joinpath("report.html").read_text()
    return template.replace("{{title}}", _e(title)).replace("{{body}}", body)


def write_report(out: Path, page: Path | None = None, *, title: str = "unimem-bench results",
                 order: Order = ALPHABETICAL) -> Path:
    """Write the page (default `<out>/report.html`) atomically; returns its path."""
    page = page or out / "report.html"
    lb.atomic_write_text(build_page(out, title=title, order=order), page)
    return page
