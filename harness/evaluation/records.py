"""Run records: one folder per (method, task) result, and the tidy leaderboard CSV that indexes them.

Each folder `runs/<run_id>/` holds config.yaml (the resolved method config), run.json (environment: git commit,
package versions, seed, device, model id, task parameters), samples.jsonl and metrics.json. It is written into a
temporary folder and renamed into place, so a folder either is complete or does not exist; the leaderboard is
replaced atomically too, under a file lock (`.leaderboard.csv.lock`) so that parallel workers merging at once lose
no rows. The presence of `runs/<run_id>/metrics.json` is what makes a re-run skip a cell.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import pandas as pd
import yaml
from filelock import FileLock

LEADERBOARD_COLUMNS = ["run_id", "model", "method", "task", "subtask", "context_len", "metric", "value", "n"]


def run_id(method: str, task: str, key: dict[str, Any]) -> str:
    """A stable id for a result: everything in `key` (model, config, task params, seed...) decides it."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:10]
    return f"{method}--{task}--{digest}"


def partial_path(out_dir: Path, rid: str) -> Path:
    """Samples of an unfinished run, appended as they finish (removed once the run folder is written)."""
    return out_dir / "runs" / f".{rid}.partial.jsonl"


def is_finished(out_dir: Path, rid: str) -> bool:
    return (out_dir / "runs" / rid / "metrics.json").exists()


def write_run(out_dir: Path, rid: str, *, config_yaml: str, record: dict[str, Any], samples: list[dict[str, Any]],
              metrics: dict[str, Any]) -> Path:
    """Write the run folder atomically; an existing folder for the same id is replaced."""
    runs = out_dir / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{rid}.", dir=runs))
    (tmp / "config.yaml").write_text(config_yaml)
    (tmp / "run.json").write_text(json.dumps(record, indent=2, default=str) + "\n")
    with (tmp / "samples.jsonl").open("w") as f:
        for sample in samples:
            f.write(json.dumps(sample, default=str) + "\n")
    (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    final = runs / rid
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    return final


def install_run(out_dir: Path, rid: str, files: dict[str, bytes]) -> Path:
    """Write a run folder made elsewhere (a remote worker's `name -> content` files) atomically into `out_dir`."""
    runs = out_dir / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{rid}.", dir=runs))
    for name, content in files.items():
        (tmp / name).write_bytes(content)
    final = runs / rid
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    return final


def read_run_json(out_dir: Path, rid: str) -> dict[str, Any]:
    """A run's record (run.json), or {} when the folder is absent."""
    path = out_dir / "runs" / rid / "run.json"
    return json.loads(path.read_text()) if path.exists() else {}


def read_run_config(out_dir: Path, rid: str) -> dict[str, Any]:
    """A run's resolved method config (config.yaml) as a dict, or {} when the folder is absent."""
    path = out_dir / "runs" / rid / "config.yaml"
    return yaml.safe_load(path.read_text()) or {} if path.exists() else {}


def atomic_write_text(text: str, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def atomic_write_csv(frame: pd.DataFrame, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    frame.to_csv(tmp, index=False)
    os.replace(tmp, path)


def read_leaderboard(path: Path) -> pd.DataFrame:
    if not path.exists():
        return pd.DataFrame(columns=LEADERBOARD_COLUMNS)
    return pd.read_csv(path, keep_default_na=False, dtype={"subtask": str})


def leaderboard_lock(path: Path) -> FileLock:
    """The lock every writer of `path` holds across its read-merge-replace (an OS lock: freed if a writer dies)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    return FileLock(path.with_name(f".{path.name}.lock"))


def merge_leaderboard(path: Path, rows: list[dict[str, Any]]) -> pd.DataFrame:
    """Add tidy rows; rows of a run id already present are replaced. Atomic replace of the CSV, under a file lock
    so that concurrent processes (parallel sweep workers) never drop each other's rows."""
    new = pd.DataFrame(rows, columns=LEADERBOARD_COLUMNS)
    with leaderboard_lock(path):
        old = read_leaderboard(path)
        old = old[~old["run_id"].isin(set(new["run_id"]))]
        merged = new if old.empty else pd.concat([old, new], ignore_index=True)
        atomic_write_csv(merged, path)
    return merged

