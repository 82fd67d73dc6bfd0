"""Run records: one folder per (method, task) result, and the tidy leaderboard CSV that indexes them.

Each folder `runs/<run_id>/` holds config.yaml (the resolved method config), run.json (its `schema` version;
environment: git commit, package versions, seed, device, model id, task parameters, headline metric and each
metric's direction), samples.jsonl and metrics.json. It is written into a temporary folder and renamed into place,
so a folder either is complete or does not exist; the leaderboard is replaced atomically too, under a file lock
(`.leaderboard.csv.lock`) so that parallel workers merging at once lose no rows. The presence of
`runs/<run_id>/metrics.json` is what makes a re-run skip a cell. The formats and their one reader (which reads
older files too) are in `harness/reporting/results.py`.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import subprocess
import tempfile
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import pandas as pd
from filelock import FileLock

from unimem_bench.harness.reporting.results import (
    LEADERBOARD_COLUMNS,
    LEADERBOARD_SCHEMA,
    RUN_SCHEMA,
    read_leaderboard,
    read_run_config,
    read_run_json,
)

__all__ = ["LEADERBOARD_COLUMNS", "LEADERBOARD_SCHEMA", "RUN_SCHEMA", "read_leaderboard", "read_run_config",
           "read_run_json"]

PACKAGES = ("unimem-bench", "torch", "transformers", "tokenizers", "datasets", "faiss-cpu", "faiss-gpu-cu12",
            "pandas", "numpy")


def run_id(method: str, task: str, key: dict[str, Any]) -> str:
    """A stable id for a result: everything in `key` (model, config, task params, seed...) decides it."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:10]
    return f"{method}--{task}--{digest}"


def partial_path(out_dir: Path, rid: str) -> Path:
    """Samples of an unfinished run, appended as they finish (removed once the run folder is written)."""
    return out_dir / "runs" / f".{rid}.partial.jsonl"


def is_finished(out_dir: Path, rid: str) -> bool:
    return (out_dir / "runs" / rid / "metrics.json").exists()


def git_commit() -> str:
    """The commit of the source tree this package runs from, `+dirty` when it has changes; `unknown` outside git."""
    here = Path(__file__).resolve().parent
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def environment(*, seed: int, device: str, model: str) -> dict[str, Any]:
    """What a result depends on besides its config and task."""
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return {"commit": git_commit(), "seed": seed, "device": device, "model": model, "python": platform.python_version(),
            "platform": platform.platform(), "packages": versions}


def write_run(out_dir: Path, rid: str, *, config_yaml: str, record: dict[str, Any], samples: list[dict[str, Any]],
              metrics: dict[str, Any]) -> Path:
    """Write the run folder atomically; an existing folder for the same id is replaced."""
    runs = out_dir / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{rid}.", dir=runs))
    (tmp / "config.yaml").write_text(config_yaml)
    (tmp / "run.json").write_text(json.dumps({"schema": RUN_SCHEMA, **record}, indent=2, default=str) + "\n")
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


def leaderboard_lock(path: Path) -> FileLock:
    """The lock every writer of `path` holds across its read-merge-replace (an OS lock: freed if a writer dies)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    return FileLock(path.with_name(f".{path.name}.lock"))


def merge_leaderboard(path: Path, rows: list[dict[str, Any]]) -> pd.DataFrame:
    """Add tidy rows (LEADERBOARD_COLUMNS but `schema`); rows of a run id already present are replaced. Atomic
    replace of the CSV, under a file lock so that concurrent processes (parallel sweep workers) never drop each
    other's rows. An older-schema file is rewritten in the current schema."""
    for row in rows:
        missing = [c for c in LEADERBOARD_COLUMNS if c != "schema" and c not in row]
        if missing:
            raise ValueError(f"leaderboard row of {row.get('run_id')!r} lacks {', '.join(missing)}")
    new = pd.DataFrame([{**row, "schema": LEADERBOARD_SCHEMA} for row in rows], columns=LEADERBOARD_COLUMNS)
    with leaderboard_lock(path):
        old = read_leaderboard(path)
        old = old[~old["run_id"].isin(set(new["run_id"]))]
        merged = new if old.empty else pd.concat([old, new], ignore_index=True)
        atomic_write_csv(merged, path)
    return merged


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")
