"""Evaluation tasks, each registered by name with a version in `TASKS`."""

from . import longbench, perplexity  # noqa: F401  (importing a task file registers it)
from .arguments import TaskArgError
from .base import TASKS, MetricRow, SampleLog, ScoringLM, Task, TaskOptions, TaskResult
from .hub import DataNotFoundError

__all__ = ["TASKS", "DataNotFoundError", "MetricRow", "SampleLog", "ScoringLM", "Task", "TaskArgError", "TaskOptions",
           "TaskResult"]
