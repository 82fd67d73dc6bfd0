"""The task contract: a registered, versioned evaluation that scores a model through a small LM interface."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar, runtime_checkable

import torch

from unimem_bench.methods import Sampling
from unimem_bench.methods.registry import Registry


class ScoringLM(Protocol):
    """What a task may ask of a model (lm-eval's LM interface in miniature); `MemoryLM` implements it."""

    segment_len: int
    """Tokens per segment: what the model reads at once besides its memory."""
    trained_context: int
    """The model's trained context length in tokens."""

    def score(self, docs: Sequence[torch.Tensor], *, batch_size: int = 1,
              progress: Callable[[int], None] | None = None) -> list[torch.Tensor]:
        """Per-token negative log-likelihoods of each token-id document (all tokens after the first)."""
        ...

    def generate(self, prompt: torch.Tensor, *, max_new_tokens: int, eos_token_id: int | Sequence[int] | None = None,
                 stop: Callable[[list[int]], bool] | None = None, sampling: Sampling | None = None) -> list[int]:
        """Continue the 1-D prompt through memory; returns the new token ids."""
        ...


Item = TypeVar("Item")
Out = TypeVar("Out")


@runtime_checkable
class SampleSharding(Protocol):
    """What a model run across several processes adds to the contract: it deals a task's samples among them.

    `map_samples(fn, items)` yields `(index, fn(items[index]))` for every item on every process, each item computed
    by one process only; every process must consume the iterator to the end (results are exchanged as they come).
    `fn` must return something picklable (a sample record) and compute the same thing on any process.
    """

    def map_samples(self, fn: Callable[[Item], Out], items: Sequence[Item]) -> Iterator[tuple[int, Out]]:
        ...


def map_samples(lm: ScoringLM, fn: Callable[[Item], Out], items: Sequence[Item]) -> Iterator[tuple[int, Out]]:
    """`(index, fn(item))` for every item in order: dealt across processes when `lm` shards samples (a launched
    run), else computed here one by one. Generation tasks put each sample's whole work (prompt, generation, score)
    in `fn`, so that launched processes split it as `score` splits documents."""
    if isinstance(lm, SampleSharding):
        yield from lm.map_samples(fn, items)
        return
    for index, item in enumerate(items):
        yield index, fn(item)


@dataclass(frozen=True)
class TaskOptions:
    """Run-wide options a task reads (the CLI's flags)."""

    data_dir: Path | None = None
    """Local data for the task; each task says what it expects there."""
    max_docs: int | None = None
    """Evaluate at most this many documents (the first in the task's fixed order)."""
    max_tokens: int | None = None
    """Truncate each document to this many tokens."""
    batch_size: int = 1
    """Documents streamed together; never changes a score."""
    task_args: tuple[tuple[str, str, Any], ...] = ()
    """(task or "", field, value) settings from `--task-arg` / `--task-args`; see `configure`."""


@dataclass(frozen=True)
class MetricRow:
    """A leaderboard row below the headline: one metric of one subtask and/or context length."""

    subtask: str
    metric: str
    value: float
    n: int
    context_len: int


@dataclass
class TaskResult:
    """What a task returns: headline metrics and one record per sample."""

    metrics: dict[str, float]
    """Metric name -> value (the leaderboard rows)."""
    samples: list[dict[str, Any]] = field(default_factory=list)
    """Per-document records, written as JSONL."""
    n: int = 0
    """How many units the metrics aggregate (tokens for perplexity)."""
    context_len: int = 0
    """The longest context evaluated, in tokens."""
    rows: list[MetricRow] = field(default_factory=list)
    """Breakdown rows (per dataset, per length, per depth ...) added to the leaderboard beside `metrics`."""


class SampleLog:
    """Finished samples of a run in progress, appended one JSON line each so an interrupted run resumes.

    Tasks look a sample up by a key that names it (document id, grid cell ...) before computing it. A line cut off by
    a crash is ignored; `path=None` keeps the log in memory only, and `write=False` reads the file without adding to
    it (every process of a sharded run skips the same samples; the main one alone writes).
    """

    def __init__(self, path: Path | None = None, *, write: bool = True) -> None:
        self.path = path
        self.write = write
        self.done: dict[str, dict[str, Any]] = {}
        if path is not None and path.exists():
            for line in path.read_text().splitlines():
                try:
                    entry = json.loads(line)
                except json.JSONDecodeError:
                    continue
                self.done[entry["key"]] = entry["sample"]

    def get(self, key: str) -> dict[str, Any] | None:
        return self.done.get(key)

    def add(self, key: str, sample: dict[str, Any]) -> None:
        self.done[key] = sample
        if self.path is None or not self.write:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as f:
            f.write(json.dumps({"key": key, "sample": sample}, default=str) + "\n")
            f.flush()
            os.fsync(f.fileno())


class Task(Protocol):
    """A registered task."""

    name: str
    version: str
    headline: str
    """The metric of the run's headline leaderboard row: the one number tables and plots show for the task."""

    @property
    def higher_is_better(self) -> Mapping[str, bool]:
        """Every metric the task reports (headline, others and breakdown rows) -> whether a larger value is better
        (lm-eval's `higher_is_better`); written into each leaderboard row, so readers need not guess from names."""
        ...

    def check(self, options: TaskOptions) -> None:
        """Cheap validation before any model work: raise with one clear line if data is missing."""
        ...

    def params(self, options: TaskOptions) -> dict[str, Any]:
        """Everything that determines this task's result besides the model (recorded and hashed)."""
        ...

    def run(self, lm: ScoringLM, tokenizer: Any, options: TaskOptions, log: SampleLog | None = None,
            progress: Callable[[int, int | None], None] | None = None) -> TaskResult:
        """Evaluate `lm`, skipping samples already in `log` (None: a fresh in-memory log) and adding new ones to it;
        `progress(advance, total)` reports units done."""
        ...


TASKS: Registry[Task] = Registry("task")
