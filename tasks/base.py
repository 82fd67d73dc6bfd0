"""The task contract: a registered, versioned evaluation that scores a model through a small LM interface."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from unimem_bench.harness.registry import Registry


class ScoringLM(Protocol):
    """What a task may ask of a model (lm-eval's LM interface in miniature); `MemoryLM` implements it."""

    def score(self, docs: Sequence[torch.Tensor], *, batch_size: int = 1,
              progress: Callable[[int], None] | None = None) -> list[torch.Tensor]:
        """Per-token negative log-likelihoods of each token-id document (all tokens after the first)."""
        ...


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


class Task(Protocol):
    """A registered task."""

    name: str
    version: str
    headline: str
    """The metric shown in summaries and plots (lower is better for perplexities)."""

    def check(self, options: TaskOptions) -> None:
        """Cheap validation before any model work: raise with one clear line if data is missing."""
        ...

    def params(self, options: TaskOptions) -> dict[str, Any]:
        """Everything that determines this task's result besides the model (recorded and hashed)."""
        ...

    def run(self, lm: ScoringLM, tokenizer: Any, options: TaskOptions,
            progress: Callable[[int, int | None], None] | None = None) -> TaskResult:
        """Evaluate `lm`; `progress(advance, total)` reports scored units."""
        ...


TASKS: Registry[Task] = Registry("task")
