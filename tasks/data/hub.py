"""Task data from the Hugging Face hub through `datasets`, for users with a network.

`check_hub_dataset` is the cheap test every task runs before any model work: without a network (or with a wrong id)
it fails in one line naming the hub id and the local-data option. Offline mode (HF_DATASETS_OFFLINE /
HF_HUB_OFFLINE) skips the test and lets `datasets` read its cache.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any


class DataNotFoundError(FileNotFoundError):
    """Task data neither given locally nor reachable on the hub; the message names both options."""


def offline() -> bool:
    return any(os.environ.get(v, "").lower() in ("1", "true", "yes") for v in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"))


def check_hub_dataset(repo: str, *, task: str, local: str) -> None:
    """Raise DataNotFoundError unless the hub dataset `repo` answers (a few seconds at most)."""
    if offline():
        return
    from huggingface_hub import HfApi

    try:
        HfApi().dataset_info(repo, timeout=10)
    except Exception as err:  # no network, unknown id, gated repo: all mean "use local data"
        reason = str(err).splitlines()[0][:120] if str(err) else type(err).__name__
        raise DataNotFoundError(f"task {task!r}: hub dataset {repo!r} is not reachable ({reason}); "
                                f"pass --data-dir DIR with {local}") from None


def hub_records(repo: str, *, name: str | None = None, split: str = "test", data_files: str | None = None,
                streaming: bool = True) -> Iterator[dict[str, Any]]:
    """Rows of a hub dataset, streamed by default so a 100-book split is not downloaded whole."""
    from datasets import load_dataset

    kwargs: dict[str, Any] = {"split": split, "streaming": streaming}
    if data_files:
        kwargs["data_files"] = data_files
    yield from load_dataset(repo, name, **kwargs)
