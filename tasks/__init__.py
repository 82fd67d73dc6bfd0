"""Evaluation tasks, each registered by name with a version in `TASKS`."""

from . import perplexity  # noqa: F401  (importing a task file registers it)
from .base import TASKS, ScoringLM, Task, TaskOptions, TaskResult

__all__ = ["TASKS", "ScoringLM", "Task", "TaskOptions", "TaskResult"]
