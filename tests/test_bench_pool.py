"""The benchmark's measuring pool (benchmarks/methodbench/pool.py) ends its measuring process when the benchmark is
stopped, instead of leaving it to run its task on and slow whatever runs next."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"

SCRIPT = textwrap.dedent("""
    import multiprocessing, sys, time
    sys.path.insert(0, sys.argv[1])
    from methodbench.pool import measuring_pool

    with measuring_pool(()) as pool:
        task = pool.submit(time.sleep, 300)
        while not multiprocessing.active_children():
            time.sleep(0.01)
        print(*(p.pid for p in multiprocessing.active_children()), flush=True)
        task.result()
""")


def alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie waiting for its reaper counts as ended)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc; the watch is a Linux pidfd")
@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGKILL, signal.SIGINT])
def test_a_stopped_benchmark_leaves_no_measuring_process(stop):
    bench = subprocess.Popen([sys.executable, "-c", SCRIPT, str(BENCHMARKS)], stdout=subprocess.PIPE, text=True)
    try:
        workers = [int(pid) for pid in bench.stdout.readline().split()]
        assert workers and all(alive(pid) for pid in workers)
        os.kill(bench.pid, stop)
        bench.wait(timeout=30)
        deadline = time.monotonic() + 10
        while any(alive(pid) for pid in workers) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(alive(pid) for pid in workers), f"{stop.name} left a measuring process running"
    finally:
        bench.kill()
