"""Evaluation tasks, each registered by name with a version in `TASKS`."""

# Importing a task file registers it; this order is the order of `--tasks all` and `unimem-bench list`.
from unimem_bench.tasks import perplexity  # noqa: I001, F401
from unimem_bench.tasks import pi_length  # noqa: F401
from unimem_bench.tasks.longbench import task  # noqa: F401
from unimem_bench.tasks.longbench import v2  # noqa: F401
from unimem_bench.tasks.needle import niah  # noqa: F401
from unimem_bench.tasks.needle import ruler  # noqa: F401
from unimem_bench.tasks.needle import ruler_synthetic  # noqa: F401
from unimem_bench.tasks.needle import ruler_qa  # noqa: F401
from unimem_bench.tasks.needle import ruler_group  # noqa: F401
from unimem_bench.tasks.needle import passkey  # noqa: F401
from unimem_bench.tasks.infinitebench import synthetic  # noqa: F401
from unimem_bench.tasks.infinitebench import task as infinitebench_task  # noqa: F401
from unimem_bench.tasks.babilong import task as babilong_task  # noqa: F401
from unimem_bench.tasks.babilong import synthetic as babilong_synthetic  # noqa: F401
from unimem_bench.tasks.arguments import TaskArgError
from unimem_bench.tasks.base import TASKS, MetricRow, SampleLog, ScoringLM, Task, TaskOptions, TaskResult
from unimem_bench.tasks.data.hub import DataNotFoundError

__all__ = ["TASKS", "DataNotFoundError", "MetricRow", "SampleLog", "ScoringLM", "Task", "TaskArgError", "TaskOptions",
           "TaskResult"]
