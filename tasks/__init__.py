"""Evaluation tasks, each registered by name with a version in `TASKS`."""

from . import (
           perplexity,  # noqa: F401  (importing a task file registers it)
           pi_length,  # noqa: F401
)
from .arguments import TaskArgError
from .base import TASKS, MetricRow, SampleLog, ScoringLM, Task, TaskOptions, TaskResult
from .hub import DataNotFoundError

__all__ = ["TASKS", "DataNotFoundError", "MetricRow", "SampleLog", "ScoringLM", "Task", "TaskArgError", "TaskOptions",
           "TaskResult"]
