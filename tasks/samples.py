"""What generation tasks share: the prompt fields of a sample record, a key-prefixed view of a SampleLog, and the
middle truncation most long-context benchmarks apply."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from unimem_bench.tasks.base import SampleLog, ids_digest


def prompt_fields(ids: Sequence[int]) -> dict[str, Any]:
    """`prompt_tokens` and `prompt_hash` (sha256 of the ids, 16 hex digits): two runs read the same prompt exactly
    when their hashes agree."""
    return {"prompt_tokens": len(ids), "prompt_hash": ids_digest(ids)}


class PrefixedLog:
    """A view of a SampleLog whose keys carry a prefix, so the tasks of a group share one log without collisions."""

    def __init__(self, log: SampleLog, prefix: str) -> None:
        self.log, self.prefix = log, prefix

    def get(self, key: str) -> dict[str, Any] | None:
        return self.log.get(f"{self.prefix}/{key}")

    def sample(self, key: str) -> dict[str, Any]:
        return self.log.sample(f"{self.prefix}/{key}")

    def add(self, key: str, sample: dict[str, Any]) -> None:
        self.log.add(f"{self.prefix}/{key}", sample)


def truncate_middle_ids(ids: list[int], max_length: int) -> list[int]:
    """Keep the first and last max_length // 2 ids of a longer prompt (InfiniteBench's and LongBench v2's rule)."""
    if len(ids) <= max_length:
        return ids
    half = max_length // 2
    return ids[:half] + ids[-half:]


def encode(tokenizer: Any, text: str, *, bos: bool = True) -> list[int]:
    """Token ids of `text`, with the tokenizer's BOS first when it has one (as `tokenizer(text)` adds it)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return ([tokenizer.bos_token_id] if bos and tokenizer.bos_token_id is not None else []) + ids
