"""Task data from the Hugging Face hub through `datasets`, for users with a network.

`check_hub_dataset` is the cheap test every task runs in planning, before any model work: it reads the repository's
file list (no data) and fails in one line naming the hub id and the local-data option when the hub is unreachable,
the id is wrong, the repository is a script-based dataset (`datasets` 4 and later refuse to run loading scripts) or
`data_files` matches none of its files. Offline (HF_DATASETS_OFFLINE / HF_HUB_OFFLINE) it asks `datasets`' own cache
instead, where an offline `load_dataset` looks.
"""

from __future__ import annotations

import fnmatch
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any


class DataNotFoundError(FileNotFoundError):
    """Task data neither given locally nor reachable on the hub; the message names both options."""


def offline() -> bool:
    return any(os.environ.get(v, "").lower() in ("1", "true", "yes") for v in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"))


def loading_script(repo: str) -> str:
    """The file name a script-based dataset `repo` is loaded by (`datasets` looks for `<name>.py` at the root)."""
    return f"{repo.rsplit('/', 1)[-1]}.py"


def cached_offline(repo: str) -> bool:
    """Whether `datasets`' cache holds a prepared copy of `repo`, the one an offline `load_dataset` can read."""
    from datasets import config

    root = Path(config.HF_DATASETS_CACHE) / "___".join(repo.split("/"))
    return any(p.is_dir() for p in root.glob("*/*/*"))


def hub_files(repo: str) -> list[str]:
    """The repository's file paths, from one metadata request (a few seconds at most; raises when unreachable)."""
    from huggingface_hub import HfApi

    info = HfApi().dataset_info(repo, timeout=10)
    if info.siblings is None:
        return HfApi().list_repo_files(repo, repo_type="dataset")
    return [s.rfilename for s in info.siblings]


def check_hub_dataset(repo: str, *, task: str, local: str, data_files: str | None = None) -> None:
    """Raise DataNotFoundError unless `datasets` can load the hub dataset `repo` (see the module docstring)."""
    fix = f"pass --data-dir DIR with {local}"
    if offline():
        if not cached_offline(repo):
            raise DataNotFoundError(f"task {task!r}: offline (HF_HUB_OFFLINE/HF_DATASETS_OFFLINE) and hub dataset "
                                    f"{repo!r} is not in the datasets cache; {fix}")
        return
    try:
        files = hub_files(repo)
    except Exception as err:  # no network, unknown id, gated repo: all mean "use local data"
        reason = str(err).splitlines()[0][:120] if str(err) else type(err).__name__
        raise DataNotFoundError(f"task {task!r}: hub dataset {repo!r} is not reachable ({reason}); {fix}") from None
    if loading_script(repo) in files:
        raise DataNotFoundError(f"task {task!r}: hub dataset {repo!r} is script-based ({loading_script(repo)}), which "
                                f"datasets 4 and later cannot load; choose a parquet copy with --task-arg "
                                f"{task}.dataset=ID, or {fix}")
    if data_files and not any(fnmatch.fnmatch(f, data_files) for f in files):
        raise DataNotFoundError(f"task {task!r}: hub dataset {repo!r} has no file matching data_files={data_files!r} "
                                f"({len(files)} files); fix {task}.data_files, or {fix}")


def hub_records(repo: str, *, name: str | None = None, split: str = "test", data_files: str | None = None,
                streaming: bool = True) -> Iterator[dict[str, Any]]:
    """Rows of a hub dataset, streamed by default so a 100-book split is not downloaded whole."""
    from datasets import load_dataset

    kwargs: dict[str, Any] = {"split": split, "streaming": streaming}
    if data_files:
        kwargs["data_files"] = data_files
    yield from load_dataset(repo, name, **kwargs)
