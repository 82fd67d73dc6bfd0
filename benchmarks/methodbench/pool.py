"""The pool of fresh processes every measurement runs in, and their end when the benchmark stops early."""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import select
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor


def exit_with(benchmark: int) -> None:
    """Pool initializer: a measuring process exits as soon as the benchmark process `benchmark` ends, however it
    ends (`kill -9` included), instead of running its task on for minutes and slowing whatever runs next.

    Its parent is the fork server, which lives on while any process it forked does, so the process watches the
    benchmark itself: a daemon thread blocked on a pidfd of it (Linux 5.3+; elsewhere nothing is watched).
    """
    if not hasattr(os, "pidfd_open"):
        return
    try:
        watched = os.pidfd_open(benchmark)
    except ProcessLookupError:  # the benchmark ended before this process started
        os._exit(1)
    except OSError:  # a kernel without pidfds: nothing is watched
        return

    def wait_then_exit() -> None:
        select.select([watched], [], [])
        os._exit(1)

    threading.Thread(target=wait_then_exit, name="exit-with-benchmark", daemon=True).start()


@contextlib.contextmanager
def measuring_pool(preload: Sequence[str]) -> Iterator[ProcessPoolExecutor]:
    """One task per fresh process, forked from a server that imported `preload` but never ran a model (spawn where
    there is no fork): nothing carries over between measurements, and imports are paid once."""
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")
    if context.get_start_method() == "forkserver":
        context.set_forkserver_preload(list(preload))
    pool = ProcessPoolExecutor(max_workers=1, mp_context=context, max_tasks_per_child=1, initializer=exit_with,
                               initargs=(os.getpid(),))
    try:
        yield pool
    except BaseException:
        # Stopped early (Ctrl-C, an error): end the measuring process now instead of waiting for its task.
        for process in multiprocessing.active_children():
            process.kill()
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    else:
        pool.shutdown()
