"""The task contract: a registered, versioned evaluation that scores a model through a small LM interface."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol, TypeVar, runtime_checkable

import torch

from unimem_bench.methods import Sampling
from unimem_bench.methods.registry import Registry


class ScoringLM(Protocol):
    """What a task may ask of a model (lm-eval's LM interface in miniature); `MemoryLM` implements it.

    One meaning of a method in every task: a method without memory (vanilla, position_interpolation) reads a task's
    whole input at once, up to what the task allows; a memory method streams it through its segments and memory.
    Tasks get that through `reading_at_once` (or `generate_at_once`), never by asking which method they run.
    """

    segment_len: int
    """Tokens per segment: what the model reads at once besides its memory."""
    trained_context: int
    """The model's trained context length in tokens."""

    def score(self, docs: Sequence[torch.Tensor], *, batch_size: int = 1,
              progress: Callable[[int], None] | None = None) -> list[torch.Tensor]:
        """Per-token negative log-likelihoods of each token-id document (all tokens after the first)."""
        ...

    def generate(self, prompt: torch.Tensor, *, max_new_tokens: int, eos_token_id: int | Sequence[int] | None = None,
                 stop: Callable[[list[int]], bool] | None = None, sampling: Sampling | None = None,
                 min_new_tokens: int = 0, question: Sequence[int] | None = None) -> list[int]:
        """Continue the 1-D prompt through memory; returns the new token ids. The end-of-sequence ids cannot be
        generated before `min_new_tokens` new tokens (transformers' min_new_tokens). `question` (query_aware
        tasks): the prompt's question tokens, which a compressing memory may observe while it compresses."""
        ...

    def reading_at_once(self, length: int) -> AbstractContextManager[ScoringLM]:
        """This model while it reads inputs of up to `length` tokens (prompt plus generated tokens): a method
        without memory reads all of it at once (its local context widened to `length`: vanilla is full attention,
        position interpolation rescales RoPE to the length); a method with memory is unchanged and streams."""
        ...


def generate_at_once(lm: ScoringLM, prompt: Sequence[int], *, max_new_tokens: int, **kwargs: Any) -> list[int]:
    """`lm.generate` with the prompt and its generation budget read at once by a method without memory (see
    `ScoringLM`); keyword arguments are `generate`'s."""
    with lm.reading_at_once(len(prompt) + max_new_tokens) as view:
        return view.generate(torch.as_tensor(list(prompt), dtype=torch.long), max_new_tokens=max_new_tokens, **kwargs)


def ids_digest(ids: Sequence[int]) -> str:
    """A short hash of token ids (sha256 of their decimal list), so a sample record pins the exact prompt read."""
    return hashlib.sha256(",".join(map(str, ids)).encode()).hexdigest()[:16]


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
    trained_context: int | None = None
    """The model's trained context in tokens, set by the runner's planning from the model's config (no weights), so
    `check` and `params` can resolve defaults that depend on it; None when not known."""


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

    def sample(self, key: str) -> dict[str, Any]:
        """A sample this log holds (KeyError if it does not)."""
        return self.done[key]

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

    @property
    def name(self) -> str: ...

    @property
    def version(self) -> str: ...

    @property
    def headline(self) -> str:
        """The metric of the run's headline leaderboard row: the one number tables and plots show for the task."""
        ...

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


class AccuracyHeadline:
    """Base of the tasks whose one metric, and headline, is `accuracy` (higher is better): the needle, RULER,
    passkey, BABILong, InfiniteBench-synthetic and LongBench v2 tasks. A plain class, so no dataclass field: the
    tasks' arguments, their order and their params are unchanged."""

    headline = "accuracy"

    @property
    def higher_is_better(self) -> dict[str, bool]:
        return {"accuracy": True}


QueryMode = Literal["query_agnostic", "query_aware"]
"""Whether a compressing memory may see the question (task argument `query_mode`): `query_agnostic` compresses the
context before the question is seen, as a deployed cache would; `query_aware` (kvpress' query_aware) lets every
eviction also score with the question's queries. Methods without score-based eviction read the same either way."""


def question_kwargs(mode: str, question: Sequence[int]) -> dict[str, Any]:
    """`generate`'s keyword arguments for a prompt whose question is `question` under `mode`."""
    return {"question": list(question)} if mode == "query_aware" else {}
