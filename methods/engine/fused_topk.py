"""The exact top-k search of `retrieval.topk_exact` as one native pass (`fused_topk.c`), built on first use.

The kernel scores a few query rows against a few keys at a time in SIMD registers and compares each score at once
with its row's current k-th best, so the [rows x keys] score block never reaches memory and the selection reads
no score twice. Picks, their order and the tie rule are `topk_exact`'s; the scores are the same float32 dot
products (summed in the dimension's order). Measured against the matmul-and-numpy path in one process, 2 threads
(`benchmarks/bench_native.py`): FoT's search on the 62M model ([8 KV heads x 128 queries x 8,192 slots, dim
64], k = 32) 13.9 -> 5.8 ms, Memorizing Transformer's on the reference model ([2 x 256 x 1,280], dim 40) 1.28 ->
0.65 ms (one thread 1.56 -> 1.19); per token, FoT on the 62M model x1.61 -> x1.36 vanilla at 16K tokens, on the
reference model x4.03 -> x2.48.

Where the CPU has AMX tiles (Intel Xeon since Sapphire Rapids) and the head dim is at most 64 (up to 8,192 slots:
k at most 64 and at least 40 k slots; past that, k at most 256 and at least 64 k slots), the scores are first taken
on tiles in bfloat16 with a proven error bound and only the keys that bound cannot rule out are scored in float32
(`fused_topk_tiles.c`): the same picks, order and scores, bit for bit; one thread, FoT's search on the reference
model 3.3 -> 2.0 ms, Memorizing Transformer's 1.0 -> 0.74 ms, unimix's (k = 4) 0.70 -> 0.34, Unlimiformer's (k =
256 of 32,768 slots) 18.5 -> 15.2.

It is built with the other native kernels (`native`). Without a compiler, without SIMD, on other devices,
under autograd, or with `UNIMEM_BENCH_FUSED_TOPK=0`, `search` returns None and the caller's own path runs.
"""

from __future__ import annotations

import ctypes
import os

import torch

from unimem_bench.methods.engine import native

SWITCH_ENV = "UNIMEM_BENCH_FUSED_TOPK"
"""Set to 0 to keep every search on the matmul-and-numpy path (A/B timing, or a suspected kernel fault)."""

MIN_ROWS = 16
"""Query rows per (batch row, KV head) from which the kernel is used: a register block holds 64 rows (AVX-512), so
fewer waste its lanes. At 8,192 slots, dim 64, k = 32 (8 KV heads): 1, 2, 4, 8, 16 rows took 1.73, 1.74, 1.78, 1.89,
2.04 ms against the numpy path's 0.79, 0.76, 1.14, 1.95, 2.11 (at 1,280 slots, dim 40 the kernel was as fast or
faster at every row count)."""


TILES_ENV = "UNIMEM_BENCH_TILES"
"""Set to 0 to score on SIMD registers in float32 where the CPU has AMX tiles (A/B timing): the picks and scores
are the same either way."""


def enabled() -> bool:
    """False when `UNIMEM_BENCH_FUSED_TOPK=0`."""
    return os.environ.get(SWITCH_ENV, "1") != "0"


def search(queries: torch.Tensor, keys: torch.Tensor, k: int,
           limit: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor] | None:
    """`topk_exact(queries, keys, k, limit=limit)` by the kernel: queries [batch, kv_heads, q, dim], keys
    [batch, kv_heads, n, dim], limit [q] -> (scores, indices) [batch, kv_heads, q, k], best first; None where the
    kernel does not apply (see the module docstring, `MIN_ROWS`, k >= n) or a row holds NaN or a key scoring -inf
    itself (the caller's path ranks those)."""
    batch, heads, rows, dim = queries.shape
    n = keys.shape[2]
    if not (enabled() and queries.device.type == "cpu" and keys.device.type == "cpu"
            and queries.dtype == keys.dtype == torch.float32 and not queries.requires_grad and not keys.requires_grad
            and rows >= MIN_ROWS and 0 < k < n < 2**31 and keys.stride(-1) == 1):
        return None
    stride = native.group_stride(keys)
    lib = native.library()
    if lib is None or stride is None:
        return None
    return run(lib, queries, keys, k, limit, stride)


def run(lib: ctypes.CDLL, queries: torch.Tensor, keys: torch.Tensor, k: int, limit: torch.Tensor | None,
        stride: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """One call of the kernel `lib` (`search` has checked the inputs; `stride`: keys' `group_stride`)."""
    batch, heads, rows, dim = queries.shape
    q = queries.contiguous()  # [batch, kv_heads, q, dim]
    ends = None if limit is None else limit.to(device="cpu", dtype=torch.int64).contiguous()  # [q]
    scores = torch.empty(batch, heads, rows, k)
    index = torch.empty(batch, heads, rows, k, dtype=torch.int64)
    failed = lib.topk_inner_products(
        q.data_ptr(), keys.data_ptr(), batch * heads, rows, keys.shape[2], dim, rows * dim, dim, stride,
        keys.stride(2), None if ends is None else ends.data_ptr(), k, scores.data_ptr(), index.data_ptr(),
        torch.get_num_threads(), int(os.environ.get(TILES_ENV, "1") != "0"))
    return None if failed else (scores, index)
