"""What a result depends on besides its config and task: source commit, package versions, seed, device, model.

Shared by evaluation's run records and training's run folders, so it sits below both.
"""

from __future__ import annotations

import platform
import subprocess
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

PACKAGES = ("unimem-bench", "torch", "transformers", "tokenizers", "datasets", "faiss-cpu", "faiss-gpu-cu12",
            "pandas", "numpy")


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


def now() -> str:
    """The current UTC time, ISO 8601 to the second."""
    return datetime.now(UTC).isoformat(timespec="seconds")
