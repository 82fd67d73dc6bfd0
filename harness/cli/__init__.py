"""The `unimem-bench` command line: argument parsing and dispatch only."""

from unimem_bench.harness.cli.app import main

__all__ = ["main"]
