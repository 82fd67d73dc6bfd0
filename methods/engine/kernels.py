"""Attention kernels of the engine: SDPA over [prefix ; local] (with or without its log-sum-exp) and RoPE rotation in
transformers' convention. No engine state: `attention.py` and `split_read.py` both build on them."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import rotate_half

# Query rows per block of the manual (log-sum-exp) attention: bounds each [rows x keys] score block.
QUERY_CHUNK = 1024

# Rows per step of `rotated`: its temporaries (the turned half, the rows' tables) stay at 1,024 rows of a block
# (a 4,096-slot block of the split read made three block-sized temporaries beside the result).
ROTATE_ROWS = 1024

# PyTorch's fused CPU flash attention, which also returns the log-sum-exp (a private op: absent -> manual path).
CPU_FLASH_WITH_LSE = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


@dataclass
class FusedKernel:
    """How `fused_with_lse` calls PyTorch's fused CPU op with fewer KV heads than query heads: the op reads them
    itself (recent PyTorch, 2.13) or refuses them (older). Probed by the first such call and remembered, so later
    calls make no failing try; the engine keeps one per model (`MemoryLM.kernel`), handed down by each context."""

    native_gqa: bool | None = None
    """True: the op takes the KV heads as they are; False: they are folded into batch rows; None: not probed yet."""


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE with transformers' own half-rotation convention: x [..., n, dim], cos/sin [n, dim], or [n, dim / 2]
    when the table's two halves are equal (`rotary_memo.halves`): each half of x then meets the same values."""
    if cos.shape[-1] == x.shape[-1]:
        return x * cos + rotate_half(x) * sin
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)  # [n, 1, dim / 2], broadcast over x's two halves
    halves = (-1, (2, cos.shape[-1]))
    return (x.unflatten(*halves) * cos + rotate_half(x).unflatten(*halves) * sin).flatten(-2)


def unrotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """RoPE undone, x [..., n, dim] at the positions of (cos, sin) [n, dim] moved back to position 0, divided by
    scale**2 (RoPE's attention scaling): bit for bit `rotate(x, cos, -sin) / scale**2` (b * -s is -(b * s), and
    a + -c is a - c), without negating the table, and no division when the scale is 1 (x / 1 is x)."""
    turned = rotate_half(x).mul_(sin)
    out = (x * cos).sub_(turned)
    return out if scale == 1.0 else out.div_(scale**2)


def rotate_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """`rotate` in place on x (a fresh tensor or a view of one), the same operations in the same order: one
    temporary the size of x instead of four (x is the whole memory when a compact memory is read)."""
    if cos.shape[-1] == x.shape[-1]:
        turned = rotate_half(x).mul_(sin)
        return x.mul_(cos).add_(turned)
    halves = (-1, (2, cos.shape[-1]))
    turned = rotate_half(x).unflatten(*halves).mul_(sin.unsqueeze(-2))
    x.unflatten(*halves).mul_(cos.unsqueeze(-2)).add_(turned)
    return x


def rotated(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """`rotate` into one new tensor (x [..., n, dim], a view of the memory, is not copied first), ROTATE_ROWS rows
    at a time, half tables made whole for those rows: the same values, with temporaries of ROTATE_ROWS rows only."""
    out = torch.empty(x.shape, dtype=torch.promote_types(x.dtype, cos.dtype), device=x.device)
    half = cos.shape[-1] != x.shape[-1]
    for lo in range(0, x.shape[-2], ROTATE_ROWS):
        part = x[..., lo:lo + ROTATE_ROWS, :]
        c, s = cos[lo:lo + ROTATE_ROWS], sin[lo:lo + ROTATE_ROWS]
        turned = rotate_half(part).mul_(torch.cat([s, s], dim=-1) if half else s)
        torch.mul(part, torch.cat([c, c], dim=-1) if half else c, out=out[..., lo:lo + ROTATE_ROWS, :]).add_(turned)
    return out


def prefix_causal_sdpa(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None,
                       scale: float) -> torch.Tensor:
    """SDPA over [prefix ; local] with GQA kept unexpanded: q [batch, heads, seq, dim] -> same shape; the mask is
    [queries, keys] or per head [heads, queries, keys]."""
    gqa = query.shape[1] != keys.shape[1]
    if mask is None:
        return F.scaled_dot_product_attention(query, keys, values, is_causal=True, scale=scale, enable_gqa=gqa)
    # A 3-d mask sends SDPA to its math path, which materialises [batch, heads, queries, keys] weights and their
    # softmax; as [1, heads, queries, keys] it takes the fused kernel, which works in bounded blocks (same values).
    flat = mask.unsqueeze(0) if mask.dim() == 3 else mask
    return F.scaled_dot_product_attention(query, keys, values, attn_mask=flat, scale=scale, enable_gqa=gqa)


def attention_with_lse(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None,
                       scale: float, kernel: FusedKernel | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Like `prefix_causal_sdpa`, also returning the log-sum-exp [batch, heads, seq] of the scaled scores.

    On CPU, PyTorch's fused flash kernel returns the log-sum-exp itself (`kernel`: what is known of it, a fresh
    one when None); elsewhere the query heads of each KV head are grouped (keys never repeated) and query rows go
    in blocks of QUERY_CHUNK, bounding each score block.
    """
    batch, heads, seq, dim = query.shape
    kv_heads = keys.shape[1]
    group = heads // kv_heads
    if query.device.type == "cpu" and CPU_FLASH_WITH_LSE is not None:
        flat = mask.unsqueeze(0) if mask is not None and mask.dim() == 3 else mask  # per-head: [1, heads, ...]
        return fused_with_lse(query, keys, values, flat, mask is None, scale, kernel or FusedKernel())
    q = query.reshape(batch, kv_heads, group, seq, dim)  # [batch, kv_heads, group, seq, dim]
    if mask is None:
        causal = torch.ones(seq, seq, dtype=torch.bool, device=query.device).tril()
        mask = torch.zeros(seq, seq, dtype=query.dtype, device=query.device).masked_fill(~causal, float("-inf"))
    outs, lses = [], []
    for lo in range(0, seq, QUERY_CHUNK):
        hi = min(seq, lo + QUERY_CHUNK)
        block = (mask[lo:hi] if mask.dim() == 2 else mask[:, lo:hi].unflatten(0, (kv_heads, group)) if mask.dim() == 3
                 else mask[:, :, lo:hi].unflatten(1, (kv_heads, group)))
        scores = torch.einsum("bkgsd,bktd->bkgst", q[:, :, :, lo:hi], keys) * scale + block
        lse = scores.logsumexp(-1)  # [batch, kv_heads, group, rows]
        probs = torch.exp(scores - lse.unsqueeze(-1))
        outs.append(torch.einsum("bkgst,bktd->bkgsd", probs, values))
        lses.append(lse)
    out = torch.cat(outs, dim=3).reshape(batch, heads, seq, dim)
    return out, torch.cat(lses, dim=3).reshape(batch, heads, seq)


def fused_with_lse(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None,
                   causal: bool, scale: float, kernel: FusedKernel) -> tuple[torch.Tensor, torch.Tensor]:
    """PyTorch's fused CPU kernel with its log-sum-exp, in ONE call for every KV head. `mask`: None, [queries, keys]
    or [batch or 1, heads or 1, queries, keys]. Returns (out [batch, heads, seq, dim], log-sum-exp [batch, heads,
    seq]).

    Recent PyTorch (2.13) reads fewer KV heads than query heads itself, as SDPA's GQA switch does (keys never
    repeated); where it refuses them, each KV head becomes a batch row whose keys are expanded to its query heads as
    a stride-0 view (no copy; one call per KV head before: x0.7-1.0 of its time, and the native call x0.8 of this).
    Which of the two is decided by the first call with fewer KV heads and kept in `kernel`.
    """
    batch, heads, seq, dim = query.shape
    kv_heads, n = keys.shape[1], keys.shape[2]
    group = heads // kv_heads
    op = CPU_FLASH_WITH_LSE
    assert op is not None, "callers check for the fused op"
    if group == 1 or kernel.native_gqa:
        out, lse = op(query, keys, values, 0.0, causal, attn_mask=mask, scale=scale)[:2]
        return out, lse
    if kernel.native_gqa is None:
        try:
            out, lse = op(query, keys, values, 0.0, causal, attn_mask=mask, scale=scale)[:2]
        except RuntimeError:
            kernel.native_gqa = False
        else:
            kernel.native_gqa = True
            return out, lse
    q = query.reshape(batch * kv_heads, group, seq, dim)  # [batch * kv_heads, group, seq, dim]
    k = keys.reshape(batch * kv_heads, 1, n, dim).expand(-1, group, -1, -1)  # no copy
    v = values.reshape(batch * kv_heads, 1, n, dim).expand(-1, group, -1, -1)
    out, lse = op(q, k, v, 0.0, causal, attn_mask=fold_mask(mask, batch, kv_heads), scale=scale)[:2]
    return out.reshape(batch, heads, seq, dim), lse.reshape(batch, heads, seq)


def fold_mask(mask: torch.Tensor | None, batch: int, kv_heads: int) -> torch.Tensor | None:
    """A mask [queries, keys] (as is) or [batch or 1, heads or 1, queries, keys] as `fused_with_lse` reads it:
    [batch * kv_heads or 1, group or 1, queries, keys]."""
    if mask is None or mask.dim() == 2:
        return mask
    if mask.shape[1] == 1:  # the same for every head
        return mask if mask.shape[0] == 1 else mask.repeat_interleave(kv_heads, dim=0)
    heads = mask.shape[1]
    return mask.expand(batch, -1, -1, -1).reshape(batch * kv_heads, heads // kv_heads, *mask.shape[2:])


def block_attention(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, bias: torch.Tensor | None,
                    scale: float, kernel: FusedKernel | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Every query over every key of one block (no causality), keys [batch, kv_heads, n, dim] (a view is read in
    place); `bias` [batch, kv_heads, 1, n] hides keys per KV head (-inf) or is None. Returns (out [batch, heads,
    seq, dim], log-sum-exp [batch, heads, seq]); a query that sees no key gets out 0 and log-sum-exp -inf."""
    batch, heads, seq, _ = query.shape
    kv_heads = keys.shape[1]
    group = heads // kv_heads
    if query.device.type == "cpu" and CPU_FLASH_WITH_LSE is not None:
        per_head = None if bias is None else bias.repeat_interleave(group, dim=1)  # [batch, heads, 1, n]
        out, lse = fused_with_lse(query, keys, values, per_head, False, scale, kernel or FusedKernel())
    else:
        mask = (torch.zeros(seq, keys.shape[2], dtype=query.dtype, device=query.device) if bias is None
                else bias.repeat_interleave(group, dim=1).expand(-1, -1, seq, -1))  # [batch, heads, seq, n]
        out, lse = attention_with_lse(query, keys, values, mask, scale, kernel)
    if bias is not None:  # a KV head whose whole block is hidden: no contribution (the fused kernel returns lse 0)
        hidden = (bias == float("-inf")).all(-1).repeat_interleave(group, dim=1)  # [batch, heads, 1]
        out, lse = out.nan_to_num(0.0), lse.masked_fill(hidden, float("-inf"))
    return out, lse


def merge_lse(out: torch.Tensor, lse: torch.Tensor, part_out: torch.Tensor,
              part_lse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One softmax over two disjoint key sets from their attentions: out [batch, heads, seq, dim] and log-sum-exp
    [batch, heads, seq] each (lse -inf: the set is empty for that query); returns the merged (out, lse)."""
    total = torch.logaddexp(lse, part_lse)
    # exp(-inf - total) is 0 for an empty set; total is finite while either set is not empty
    first = torch.exp(lse - total).nan_to_num(0.0).unsqueeze(-1)
    second = torch.exp(part_lse - total).nan_to_num(0.0).unsqueeze(-1)
    return out * first.to(out.dtype) + part_out.to(out.dtype) * second.to(out.dtype), total
