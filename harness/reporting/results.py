"""The one reader of results/ files: leaderboard.csv, run records (runs/<run_id>/run.json, config.yaml) and saved
sweeps (sweeps/<name>.yaml, .csv). Tables, figures, sweeps and the notebooks read through it; it imports neither
torch nor the method or task registries, only what the files say.

Leaderboard schema 2 (the `schema` column): one tidy row per (run, subtask, context length, metric) with
`summary` (a whole-task metric of the run, not a breakdown by dataset, length or depth), `headline` (the summary row
of the task's headline metric: one per run), `higher_is_better` (the task's declaration for the metric) and
`finished` (when the run was recorded). Rows come back in one canonical order, so nothing downstream can depend on
the order of the file. Schema 1 files (no `schema` column) are read as their readers read them: a run's first row of
a metric is its summary, its first metric the headline, direction from the metric's name, `finished` from run.json.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

LEADERBOARD_SCHEMA = 2
"""The leaderboard format this version writes and reads (1: the unversioned format before `schema`)."""
RUN_SCHEMA = 2
"""The run record (run.json) format this version writes and reads (1: no `schema` field)."""
LEADERBOARD_COLUMNS = ["run_id", "model", "method", "task", "subtask", "context_len", "metric", "value", "n",
                       "summary", "headline", "higher_is_better", "finished", "schema"]
V1_COLUMNS = LEADERBOARD_COLUMNS[:9]
BOOL_COLUMNS = ("summary", "headline", "higher_is_better")
CANONICAL_ORDER = ["run_id", "metric", "subtask", "context_len"]
"""Rows sort by these (summary rows first within a metric): the order every reader sees."""
V1_LOWER_IS_BETTER = ("ppl", "nll", "bits_per", "loss", "seconds", "bytes")
"""Schema 1 named no direction: these name parts meant lower is better, anything else higher."""
SWEEPS_DIR = "sweeps"


class ResultsFormatError(ValueError):
    """A results file this version cannot read (a newer schema, or not a results file); one line with the fix."""


@dataclass(frozen=True)
class Order:
    """How tables and figures order methods and tasks: the names given first, in that order, then the others
    alphabetically (the CLI passes the registries' order; without it, everything is alphabetical)."""

    methods: tuple[str, ...] = ()
    """Methods in display order (e.g. the method registry's)."""
    tasks: tuple[str, ...] = ()
    """Tasks in display order (e.g. the task registry's)."""

    def method_key(self, name: str) -> tuple[int, str]:
        return (self.methods.index(name), "") if name in self.methods else (len(self.methods), name)

    def task_key(self, name: str) -> tuple[int, str]:
        return (self.tasks.index(name), "") if name in self.tasks else (len(self.tasks), name)

    def sort_methods(self, names: Iterable[str]) -> list[str]:
        return sorted(set(names), key=self.method_key)

    def sort_tasks(self, names: Iterable[str]) -> list[str]:
        return sorted(set(names), key=self.task_key)


ALPHABETICAL = Order()
"""No names given: methods and tasks alphabetically (the default of every table and figure)."""


def _bools(column: pd.Series) -> pd.Series:
    return column.map(lambda v: v is True or str(v).strip().lower() == "true").astype(bool)


def _upgrade_v1(frame: pd.DataFrame, out: Path) -> pd.DataFrame:
    """Schema 1 rows (in file order) with the schema 2 columns, as schema 1's readers understood them."""
    frame = frame.reset_index(drop=True)
    frame["summary"] = ~frame.duplicated(["run_id", "metric"], keep="first")
    first_metric = frame.groupby("run_id", sort=False)["metric"].transform("first")
    frame["headline"] = frame["summary"] & (frame["metric"] == first_metric)
    frame["higher_is_better"] = ~frame["metric"].map(lambda m: any(p in m for p in V1_LOWER_IS_BETTER))
    frame["finished"] = frame["run_id"].map({rid: str(read_run_json(out, rid).get("finished", ""))
                                             for rid in frame["run_id"].unique()})
    return frame


def read_leaderboard(path: Path) -> pd.DataFrame:
    """All rows of a leaderboard file (schema 1 or 2) in the current schema and canonical order; an absent file is
    an empty frame."""
    if not path.exists():
        return pd.DataFrame(columns=LEADERBOARD_COLUMNS)
    try:
        frame = pd.read_csv(path, keep_default_na=False, dtype={"subtask": str, "finished": str})
    except (pd.errors.ParserError, UnicodeDecodeError) as err:
        raise ResultsFormatError(f"{path} is not a leaderboard CSV ({str(err).splitlines()[0]}); move it away and "
                                 "run again") from None
    missing = [c for c in V1_COLUMNS if c not in frame.columns]
    if missing:
        raise ResultsFormatError(f"{path} is not a leaderboard CSV: it lacks the column(s) {', '.join(missing)}")
    if "schema" in frame.columns and len(frame):
        try:
            found = max(int(v) for v in frame["schema"])
        except ValueError:
            raise ResultsFormatError(f"{path}: its schema column holds {sorted(set(map(str, frame['schema'])))[:3]}, "
                                     "not version numbers; restore the file or move it away") from None
        if found > LEADERBOARD_SCHEMA:
            raise ResultsFormatError(f"{path} is leaderboard schema {found}, newer than this unimem-bench reads "
                                     f"(<= {LEADERBOARD_SCHEMA}): upgrade it (pip install -U unimem-bench)")
    if "schema" not in frame.columns:
        frame = _upgrade_v1(frame, path.parent)
    for column in BOOL_COLUMNS:
        frame[column] = _bools(frame[column])
    frame["schema"] = LEADERBOARD_SCHEMA
    frame["context_len"] = frame["context_len"].astype(int)
    frame["value"] = frame["value"].astype(float)
    frame = frame[LEADERBOARD_COLUMNS]
    key = frame.assign(rank=~frame["summary"])
    key = key.sort_values([*CANONICAL_ORDER[:2], "rank", *CANONICAL_ORDER[2:]], kind="stable")
    return frame.loc[key.index].reset_index(drop=True)


def load(out: Path, *, model: str | None = None, tasks: list[str] | None = None, methods: list[str] | None = None,
         metric: str | None = None, run_ids: list[str] | None = None) -> pd.DataFrame:
    """The leaderboard rows of `out` that pass the filters (model: a substring of the model id); a filter that
    matches nothing is an error naming what the file has."""
    path = out / "leaderboard.csv"
    if not path.exists():
        raise FileNotFoundError(f"no leaderboard at {path}: run `unimem-bench run` or `unimem-bench sweep` first "
                                "(or pass --out to the results folder)")
    frame = read_leaderboard(path)
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
    return frame.copy()


def latest_runs(frame: pd.DataFrame, by: Sequence[str]) -> pd.DataFrame:
    """For each group of `by`, the rows of its newest run (latest `finished`; ties: the greatest run id)."""
    runs = frame.drop_duplicates("run_id").sort_values(["finished", "run_id"])
    newest = set(runs.drop_duplicates(list(by), keep="last")["run_id"])
    return frame[frame["run_id"].isin(newest)]


def read_run_json(out: Path, rid: str) -> dict[str, Any]:
    """A run's record (run.json), or {} when the folder is absent."""
    path = out / "runs" / rid / "run.json"
    if not path.exists():
        return {}
    record = json.loads(path.read_text())
    if int(record.get("schema", 1)) > RUN_SCHEMA:
        raise ResultsFormatError(f"{path} is run record schema {record['schema']}, newer than this unimem-bench "
                                 f"reads (<= {RUN_SCHEMA}): upgrade it (pip install -U unimem-bench)")
    return record


def read_run_config(out: Path, rid: str) -> dict[str, Any]:
    """A run's resolved method config (config.yaml) as a dict, or {} when the folder is absent."""
    path = out / "runs" / rid / "config.yaml"
    return yaml.safe_load(path.read_text()) or {} if path.exists() else {}


def list_sweeps(out: Path) -> list[dict[str, Any]]:
    """Every saved sweep definition under `out`, oldest first."""
    files = sorted((out / SWEEPS_DIR).glob("*.yaml"))
    found = [yaml.safe_load(f.read_text()) for f in files]
    return sorted(found, key=lambda d: (d.get("created") or "", d["name"]))


def find_sweep(out: Path, name: str | None = None, *, field: str | None = None,
               preset: str | None = None) -> dict[str, Any]:
    """The sweep named `name`, else the newest one varying `field` (or made by `preset`)."""
    sweeps = list_sweeps(out)
    if name is not None:
        match = [s for s in sweeps if s["name"] == name]
    else:
        match = [s for s in sweeps if (field is None or field in s["axes"]) and (preset is None or
                                                                               s.get("preset") == preset)]
    if not match:
        what = f"named {name!r}" if name else f"varying {field}" if field else f"from preset {preset}"
        raise FileNotFoundError(f"no sweep {what} in {out / SWEEPS_DIR}: run `unimem-bench sweep` first "
                                f"(saved sweeps: {', '.join(s['name'] for s in sweeps) or 'none'})")
    return match[-1]


def sweep_points(out: Path, name: str) -> pd.DataFrame:
    """The sweep's run ids with their point number and swept values (strings), in the sweep's point order."""
    points = pd.read_csv(out / SWEEPS_DIR / f"{name}.csv", dtype=str, keep_default_na=False)
    points["point"] = points["point"].astype(int)
    return points


def sweep_results(out: Path, name: str, metric: str | None = None) -> pd.DataFrame:
    """The sweep's points joined with their summary leaderboard rows (finished runs only), plus each run's seconds;
    `metric` None keeps every summary metric.

    Columns: point, method, task, run_id, one column per swept field (strings), subtask, context_len, metric,
    value, n, summary, headline, higher_is_better, finished, schema, seconds. Rows in point order.
    """
    points = sweep_points(out, name)
    board = read_leaderboard(out / "leaderboard.csv")
    board = board[board["summary"]]
    if metric is not None:
        board = board[board["metric"] == metric]
    frame = points.merge(board.drop(columns=["method", "task", "model"]), on="run_id", how="inner")
    frame = frame.sort_values(["point", "run_id", "metric"], kind="stable").reset_index(drop=True)
    frame["seconds"] = [read_run_json(out, rid).get("seconds") for rid in frame["run_id"]]
    return frame


def layer_indices(text: str) -> tuple[int, ...] | None:
    """`3`, `0-1`, `[0,2]`, `0,4-6` -> sorted layer indices; None for anything else (`all`)."""
    out: set[int] = set()
    for part in text.strip("[]").split(","):
        found = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if found is None:
            return None
        lo, hi = int(found[1]), int(found[2] or found[1])
        out.update(range(lo, hi + 1))
    return tuple(sorted(out)) or None


def layers_text(layers: Sequence[int]) -> str:
    """(0, 4, 5, 6) -> `0,4-6`: how settings name a list of layers."""
    runs: list[list[int]] = []
    for i in layers:
        if runs and i == runs[-1][1] + 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)
