"""Evaluation tasks, each registered by name with a version in `TASKS`."""

# Importing a task file registers it; this order is the order of `--tasks all` and `unimem-bench list`.
from . import perplexity  # noqa: I001, F401
from . import pi_length  # noqa: F401
from . import longbench  # noqa: F401
from . import niah  # noqa: F401
from . import ruler  # noqa: F401
from .arguments import TaskArgError
from .base import TASKS, MetricRow, SampleLog, ScoringLM, Task, TaskOptions, TaskResult
from .hub import DataNotFoundError

__all__ = ["TASKS", "DataNotFoundError", "MetricRow", "SampleLog", "ScoringLM", "Task", "TaskArgError", "TaskOptions",
           "TaskResult"]
