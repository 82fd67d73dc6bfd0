"""The user's cache folder for what unimem-bench builds itself (the reference model, the native kernels)."""

from __future__ import annotations

import os
from pathlib import Path

import platformdirs

CACHE_ENV = "UNIMEM_BENCH_CACHE"
"""Overrides the cache folder (default: the platform's user cache folder for unimem-bench)."""


def cache_root() -> Path:
    """`$UNIMEM_BENCH_CACHE`, else the user cache folder."""
    env = os.environ.get(CACHE_ENV)
    return Path(env) if env else Path(platformdirs.user_cache_dir("unimem-bench"))
