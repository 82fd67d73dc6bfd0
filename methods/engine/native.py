"""The engine's native kernels (`fused_topk.c`: the exact top-k search, on AMX tiles where the CPU has them in
`fused_topk_tiles.c`, with the selection shared in `topk_select.h` and `topk_intervals.h`; `picked_read.c`: the
softmax read of the picked slots), built on first use into one library.

They are built by the system's C compiler (`$CC`, else `cc`) with `-O3 -march=native -fopenmp` into
`<cache>/native/<hash>/` (`methods.cache`: `$UNIMEM_BENCH_CACHE`, else the user cache folder, as the reference model),
keyed by the sources, the compiler command and this CPU's flags, so a home folder shared by machines of different
CPUs keeps one build each. Without a compiler, or without SIMD (a build of SIMD width 1), `library` is None and the
callers keep their PyTorch and numpy paths.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shlex
import subprocess
import tempfile
from pathlib import Path

import torch

from unimem_bench.methods.cache import cache_root

SOURCES = tuple(Path(__file__).with_name(name) for name in
                ("topk_select.h", "topk_intervals.h", "fused_topk.c", "fused_topk_tiles.c", "picked_read.c",
                 "kmeans_step.c"))
FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC")
NAME = "unimem_native.so"

log = logging.getLogger(__name__)


def cpu_signature() -> str:
    """This CPU's model and instruction-set flags (Linux), else what `platform` knows: `-march=native` builds for it."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        lines = []
    wanted = [line for line in lines if line.startswith(("model name", "flags", "Features", "CPU part"))]
    return "\n".join(sorted(set(wanted))) or f"{platform.machine()} {platform.processor()}"


def build(root: Path, compiler: str) -> Path | None:
    """Compile the kernels into the cache folder `root` (once: a finished build is reused); None when the compiler
    or the folder fails."""
    command = [*shlex.split(compiler), *FLAGS]
    text = [source.read_text() for source in SOURCES]
    key = hashlib.sha256("\0".join([*text, *command, cpu_signature()]).encode()).hexdigest()[:16]
    target = root / "native" / key / NAME
    if target.exists():
        return target
    try:  # a cache folder that cannot be written, or a compiler that fails, leaves the PyTorch and numpy paths
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            built = Path(tmp) / target.name
            units = [str(source) for source in SOURCES if source.suffix == ".c"]
            subprocess.run([*command, *units, "-o", str(built)], check=True, capture_output=True,
                           text=True)
            os.replace(built, target)  # atomic: a concurrent process sees no half-written library
    except (OSError, subprocess.CalledProcessError) as error:
        detail = getattr(error, "stderr", "") or str(error)
        log.info("native kernels not built (%s): the numpy and PyTorch paths run. %s", compiler, detail.strip()[:500])
        return None
    return target


def load(path: Path) -> ctypes.CDLL:
    """A built library, its entry points typed."""
    lib = ctypes.CDLL(str(path))
    size, pointer = ctypes.c_int64, ctypes.c_void_p
    lib.topk_inner_products.restype = ctypes.c_int
    lib.topk_inner_products.argtypes = [pointer, pointer, *[size] * 8, pointer, size, pointer, pointer, size, size]
    lib.tiles_usable.restype = ctypes.c_int
    lib.tiles_take.restype = ctypes.c_int
    lib.tiles_take.argtypes = [size] * 3
    lib.read_picked.restype = None
    lib.read_picked.argtypes = [*[pointer] * 3, *[size] * 4, *[pointer] * 6, *[size] * 5, ctypes.c_float,
                               *[pointer] * 3, size]
    lib.kmeans_step.restype = ctypes.c_int
    lib.kmeans_step.argtypes = [pointer, *[size] * 3, pointer, *[size] * 3, pointer, pointer, *[size] * 3,
                                ctypes.c_float, ctypes.c_float, size]
    lib.read_buckets.restype = ctypes.c_int
    lib.read_buckets.argtypes = [*[pointer] * 3, *[size] * 4, *[pointer] * 2, *[size] * 2, *[pointer] * 5,
                                 *[size] * 5, ctypes.c_float, size]
    return lib


@functools.cache
def library() -> ctypes.CDLL | None:
    """The built kernels, loaded once per process; None when they cannot be built or have no SIMD. The library is
    loaded after torch, so where torch ships GNU OpenMP (its Linux wheels) the kernels run on torch's own OpenMP
    threads, which are awake after each op, instead of starting threads that would contend with them."""
    path = build(cache_root(), os.environ.get("CC", "cc"))
    if path is None:
        return None
    try:
        lib = load(path)
    except OSError as error:  # e.g. its OpenMP runtime missing where it runs
        log.info("native kernels not loaded: the numpy and PyTorch paths run. %s", error)
        return None
    return lib if lib.simd_width() >= 8 else None  # plain C: the top-k search is slower than the numpy path


def group_stride(keys: torch.Tensor) -> int | None:
    """The element stride between keys' (batch row, KV head) groups taken in order, or None when it is not one."""
    batch, heads = keys.shape[:2]
    if heads == 1 or batch == 1:
        return keys.stride(0 if heads == 1 else 1)
    return keys.stride(1) if keys.stride(0) == heads * keys.stride(1) else None
