"""The order in which tables and figures list methods and tasks: the registries' (vanilla first, as `list` shows)."""

from __future__ import annotations

from unimem_bench.harness.reporting.results import Order


def registry_order() -> Order:
    """Reporting knows no registry (it reads files only); the CLI hands it the registries' order."""
    from unimem_bench.methods import METHODS
    from unimem_bench.tasks import TASKS

    return Order(methods=tuple(METHODS.names()), tasks=tuple(TASKS.names()))
