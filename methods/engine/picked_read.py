"""The softmax read of each query's picked memory slots, merged into the local attention's output, as one native
pass (`picked_read.c`, built with the other native kernels by `native`).

`attention.merge_topk` reads the slots a search picked (top-k, chunks, faiss) by gathering their values (and, for
chunks, their keys) into [rows x k x dim] blocks and merging by log-sum-exp in several PyTorch ops, and LongMem's
memory attention (`side_network`) reads its chunks' slots by their own softmax in the same way. The kernel reads
each picked slot's value (and key) straight from the bank, row by row, and writes only the merged output. Its result
is the PyTorch path's up to float32 rounding (a different order of sums; tests/test_picked_read.py against that path
and a float64 reference). `merge_with_lse` also gives the merged log-sum-exp (routing's cluster members);
`merge_buckets` lists each query's slots itself, those sharing an LSH bucket (Reformer). Measured in one process
(`benchmarks/bench_native.py`, reference model, 16K tokens, 2 threads): per token memorizing_transformer x1.58 ->
x1.47 vanilla, unimix x1.61 -> x1.49, fot x2.48 -> x2.26, longmem x1.59 -> x1.55 (one thread x1.75 -> x1.57, x1.49
-> x1.40, x2.85 -> x2.66, x1.74 -> x1.64); a chunk read of 32 slots for 4 x 512 query rows at head dim 64 about 3.4
ms against 10 for the gathers, product and merge in PyTorch (one thread). On other devices, under autograd, for
other dtypes, without a compiler or with `UNIMEM_BENCH_PICKED_READ=0`, `merge` returns None and the caller's
PyTorch path runs.
"""

from __future__ import annotations

import ctypes
import os

import torch

from unimem_bench.methods.engine import native

SWITCH_ENV = "UNIMEM_BENCH_PICKED_READ"
"""Set to 0 to keep every picked-slot read on the PyTorch path (A/B timing, or a suspected kernel fault)."""

MAX_SCRATCH = 16384
"""Floats of scratch a thread keeps on its stack (k scores and a dim-wide accumulator): 64 KiB, far inside an
OpenMP thread's stack; wider reads stay on the PyTorch path."""


def enabled() -> bool:
    """False when `UNIMEM_BENCH_PICKED_READ=0`."""
    return os.environ.get(SWITCH_ENV, "1") != "0"


def merge(queries: torch.Tensor, keys: torch.Tensor | None, values: torch.Tensor, slots: torch.Tensor, offset: int,
          logits: torch.Tensor | None, out: torch.Tensor | None, lse: torch.Tensor | None,
          scale: float, place: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor | None:
    """One softmax over each query's local keys (`out`, `lse`) and its picked bank slots.

    queries [batch, kv_heads, q, dim]; keys, values: banks [batch, kv_heads, n, dim] (keys only read when `logits`
    is None); slots [batch, kv_heads, q, k]: slot `offset + slots` of the bank, < 0 for none; logits [batch,
    kv_heads, q, k]: the slots' raw inner products, or None to score them here; out [batch, kv_heads, q, dim] and
    lse [batch, kv_heads, q]: the local attention's output and log-sum-exp (scaled), or both None for the picked
    slots' own softmax (LongMem's memory attention); place: (cos, sin, where) as `SegmentPlan.topk_place`, each
    scored key rotated first to its slot's position, (cos, sin)[where[slot]] (position.scaled_memory; only with
    `logits` None). A slot without a key, or of NaN or -inf logit, takes no weight. Returns the merged output
    [batch, kv_heads, q, dim], or None where the kernel does not apply (module docstring).
    """
    merged = merge_with_lse(queries, keys, values, slots, offset, logits, out, lse, scale, place, lse_too=False)
    return None if merged is None else merged[0]


def merge_with_lse(queries: torch.Tensor, keys: torch.Tensor | None, values: torch.Tensor, slots: torch.Tensor,
                   offset: int, logits: torch.Tensor | None, out: torch.Tensor | None, lse: torch.Tensor | None,
                   scale: float, place: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
                   lse_too: bool = True) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """`merge`, and with `lse_too` the merged softmax's log-sum-exp [batch, kv_heads, q] (scaled), which a read
    merged after this one needs (routing's cluster members); None where the kernel does not apply."""
    batch, heads, rows, dim = queries.shape
    k = slots.shape[-1]
    tables = () if place is None else place[:2]
    tensors = [t for t in (queries, keys, values, logits, out, lse, *tables) if t is not None]
    banks = [values] if keys is None else [keys, values]
    if not (enabled() and scale > 0 and k + dim <= MAX_SCRATCH and (out is None) == (lse is None)
            and slots.dtype == torch.int64 and slots.device.type == "cpu"
            and all(t.device.type == "cpu" and t.dtype == torch.float32 and not t.requires_grad for t in tensors)
            and all(bank.stride(-1) == 1 and native.group_stride(bank) is not None for bank in banks)
            and (place is None or _rotates(place, dim) and keys is not None and logits is None)):
        return None
    lib = native.library()
    rows_held = [bank.shape[2] for bank in banks] + ([] if place is None else [place[2].shape[0]])
    if lib is None or not _in_bank(slots, offset, min(rows_held)):
        return None
    return run(lib, queries, keys, values, slots, offset, logits, out, lse, scale, place, lse_too)


def run(lib: ctypes.CDLL, queries: torch.Tensor, keys: torch.Tensor | None, values: torch.Tensor,
        slots: torch.Tensor, offset: int, logits: torch.Tensor | None, out: torch.Tensor | None,
        lse: torch.Tensor | None, scale: float, place: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
        lse_too: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One call of the kernel `lib` (`merge` has checked the inputs): the merged output and, with `lse_too`, its
    log-sum-exp."""
    batch, heads, rows, dim = queries.shape
    merged = torch.empty(batch, heads, rows, dim)
    merged_lse = torch.empty(batch, heads, rows) if lse_too else None
    q, picks = queries.contiguous(), slots.contiguous()  # [batch, kv_heads, q, dim], [batch, kv_heads, q, k]
    lse_rows = None if lse is None else lse.contiguous()  # [batch, kv_heads, q]
    local = None if out is None else out.contiguous()  # [batch, kv_heads, q, dim]
    given = None if logits is None else logits.contiguous()  # [batch, kv_heads, q, k]
    key_group, key_row = (0, 0) if keys is None else (native.group_stride(keys), keys.stride(2))
    lib.read_picked(q.data_ptr(), None if keys is None else keys.data_ptr(), values.data_ptr(), key_group, key_row,
                    native.group_stride(values), values.stride(2), picks.data_ptr(),
                    None if given is None else given.data_ptr(), None if local is None else local.data_ptr(),
                    None if lse_rows is None else lse_rows.data_ptr(),
                    merged.data_ptr(), None if merged_lse is None else merged_lse.data_ptr(), batch * heads, rows,
                    slots.shape[-1], dim, offset, scale,
                    *((None,) * 3 if place is None else (t.data_ptr() for t in place)),
                    torch.get_num_threads())
    return merged, merged_lse


def merge_buckets(queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, q_proj: torch.Tensor,
                  k_proj: torch.Tensor, half: int, limit: torch.Tensor | None, offset: int, out: torch.Tensor,
                  lse: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor] | None:
    """`merge_with_lse` of the slots sharing an LSH bucket with each query (Reformer's read, `buckets.lsh_hash`):
    the kernel takes each row's ids and the n bank slots' (from `offset`) from their projections q_proj [batch,
    kv_heads, q, rounds * half] and k_proj [batch, kv_heads, n, rounds * half] (laid out vector fastest, as
    `buckets.lsh_projections` gives them, they are read without a copy), and reads the slots below limit[i] ([q]
    int64, or None: all n) that share a bucket with row i in some round. None where the kernel does not apply."""
    batch, heads, rows, dim = queries.shape
    n, width = k_proj.shape[2], k_proj.shape[3]
    tensors = (queries, keys, values, q_proj, k_proj, out, lse)
    # the stack: n + dim floats of scores and sums, two int64 lists of n + 1 slots (5 (n + 1) + dim floats' room)
    if not (enabled() and scale > 0 and half > 0 and width % half == 0 and 5 * (n + 1) + dim <= MAX_SCRATCH
            and q_proj.shape == (batch, heads, rows, width) and k_proj.shape[:2] == (batch, heads)
            and all(t.device.type == "cpu" and t.dtype == torch.float32 and not t.requires_grad for t in tensors)
            and all(bank.stride(-1) == 1 and native.group_stride(bank) is not None for bank in (keys, values))
            and offset >= 0 and offset + n <= min(keys.shape[2], values.shape[2])
            and (limit is None or limit.dtype == torch.int64 and limit.shape == (rows,))):
        return None
    lib = native.library()
    return None if lib is None else run_buckets(lib, queries, keys, values, q_proj, k_proj, half, limit, offset,
                                                out, lse, scale)


def run_buckets(lib: ctypes.CDLL, queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                q_proj: torch.Tensor, k_proj: torch.Tensor, half: int, limit: torch.Tensor | None, offset: int,
                out: torch.Tensor, lse: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor] | None:
    """One call of the kernel `lib`'s bucket read (`merge_buckets` has checked the inputs); None when the kernel
    could not allocate its scratch."""
    batch, heads, rows, dim = queries.shape
    n, width = k_proj.shape[2], k_proj.shape[3]
    merged, merged_lse = torch.empty(batch, heads, rows, dim), torch.empty(batch, heads, rows)
    # the kernel takes projections vector fastest ([batch, kv_heads, width, q or n]); free when so laid out
    q, qp, kp = queries.contiguous(), q_proj.transpose(2, 3).contiguous(), k_proj.transpose(2, 3).contiguous()
    local, local_lse = out.contiguous(), lse.contiguous()  # [batch, kv_heads, q, dim], [batch, kv_heads, q]
    ends = None if limit is None else limit.contiguous()
    failed = lib.read_buckets(q.data_ptr(), keys.data_ptr(), values.data_ptr(), native.group_stride(keys),
                              keys.stride(2), native.group_stride(values), values.stride(2), qp.data_ptr(),
                              kp.data_ptr(), width // half, half, None if ends is None else ends.data_ptr(),
                              local.data_ptr(), local_lse.data_ptr(), merged.data_ptr(), merged_lse.data_ptr(),
                              batch * heads, rows, n, dim, offset, scale, torch.get_num_threads())
    return None if failed else (merged, merged_lse)


def _rotates(place: tuple[torch.Tensor, torch.Tensor, torch.Tensor], dim: int) -> bool:
    """Rotation tables the kernel reads without bounds checks: (cos, sin) [positions, dim] contiguous float32, an
    even dim, and every slot's row (where, int64) among them."""
    cos, sin, where = place
    return (dim % 2 == 0 and cos.shape == sin.shape and cos.shape[1:] == (dim,) and cos.is_contiguous()
            and sin.is_contiguous() and where.dtype == torch.int64 and where.device.type == "cpu"
            and where.dim() == 1 and where.is_contiguous()
            and (not where.numel() or (int(where.min()) >= 0 and int(where.max()) < cos.shape[0])))


def _in_bank(slots: torch.Tensor, offset: int, n: int) -> bool:
    """Every slot to read (>= 0) lies in the bank: the kernel reads without bounds checks."""
    return not slots.numel() or (offset >= 0 and int(slots.max()) + offset < n)
