"""The read of a memory that every query sees whole (`SegmentContext.open_prefix`): memory and segment attended
apart and merged by log-sum-exp, so no [memory ; segment] copy of the keys and values and no [queries, keys] mask
is built.

The memory is read in blocks of KEY_BLOCK slots straight from the bank (views); compact positions rotate one
block at a time into a fresh block-sized tensor. The segment's own keys are attended causally. Score-based
eviction reads the same blocks again against the merged log-sum-exp (`eviction.block_scores`). Per-layer and
per-head budgets (PyramidKV, AdaKV) read each layer's bank at its own width, its padding (id -1) hidden by a
per-KV-head bias, so nothing is padded to the widest layer.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from unimem_bench.methods.engine import eviction
from unimem_bench.methods.engine.kernels import attention_with_lse, block_attention, merge_lse, rotated
from unimem_bench.methods.engine.memory import LayerMemory
from unimem_bench.methods.engine.plan import SegmentContext, SegmentPlan

# Memory slots per block: a rotated block of keys is KEY_BLOCK x kv_heads x head_dim floats (1.25 MiB for 2 KV heads
# of 40), small beside the memory a 4x budget holds at 16K-64K tokens. Timed against 2,048 and 8,192 (one layer,
# 128 queries, 4,096 and 16,384 slots): 4,096 was the fastest, and 20-35% faster than the joined read.
KEY_BLOCK = 4096

# Logits of the rows a policy scores kept through the read rather than recomputed from re-rotated blocks, up to
# 2^20 floats (4 MiB): tova's one row always, snapkv's 32 up to 8K memory slots per layer on the reference model,
# h2o's whole segment of 128 up to 2K slots (its memory of one segment, not a 4x budget of a long document).
KEPT_LOGITS = 1 << 20


@dataclass(frozen=True)
class PrefixPart:
    """One run of memory keys in front of the segment: [batch, kv_heads, n, head_dim] views of the memory."""

    keys: torch.Tensor
    values: torch.Tensor
    first: int
    """Prefix index (row of `plan.place`) of the part's first slot."""
    ids: torch.Tensor | None
    """[batch, kv_heads, n] slot ids where some are padding (id -1, per-head budgets), else None."""


def prefix_parts(plan: SegmentPlan, mem: LayerMemory) -> list[PrefixPart]:
    """The memory this layer reads, in prefix order: globals, the pooled tier, the window (a budgeted layer's whole
    bank at its own width, placed just before the segment as if padded to the widest layer)."""
    parts = []
    if plan.n_global:
        if plan.globals_in_bank:
            assert mem.keys is not None and mem.values is not None
            parts.append(PrefixPart(mem.keys[:, :, :plan.n_global], mem.values[:, :, :plan.n_global], 0, None))
        else:
            assert mem.global_keys is not None and mem.global_values is not None
            parts.append(PrefixPart(mem.global_keys, mem.global_values, 0, None))
    if plan.n_tier:
        assert mem.tier_keys is not None and mem.tier_values is not None
        parts.append(PrefixPart(mem.tier_keys, mem.tier_values, plan.n_global, None))
    start = plan.n_global + plan.n_tier
    if plan.n_window and mem.depth is not None:
        if mem.keys is not None and mem.values is not None and mem.ids is not None:
            width = mem.keys.shape[2]
            padded = mem.ids if mem.padded else None
            parts.append(PrefixPart(mem.keys, mem.values, start + plan.n_bank - width, padded))
    elif plan.n_window:
        assert mem.keys is not None and mem.values is not None
        window = slice(plan.n_bank - plan.n_window, plan.n_bank)
        parts.append(PrefixPart(mem.keys[:, :, window], mem.values[:, :, window], start, None))
    return parts


def key_blocks(parts: list[PrefixPart], place: tuple[torch.Tensor, torch.Tensor] | None, dtype: torch.dtype,
               ) -> Iterator[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor | None]]:
    """(index of the first slot among all the parts' slots, keys at their places, values, bias [batch, kv_heads, 1, n]
    or None) per block: views of the memory where nothing moves (place None: one block per part), else rotated
    blocks of KEY_BLOCK slots."""
    offset = 0
    for part in parts:
        n = part.keys.shape[2]
        step = n if place is None else KEY_BLOCK
        for lo in range(0, n, step):
            hi = min(n, lo + step)
            bias = None
            if part.ids is not None:
                pad = part.ids[:, :, lo:hi] < 0
                if bool(pad.all()):  # nothing held here by any head
                    continue
                if bool(pad.any()):
                    bias = torch.zeros(pad.shape, dtype=dtype, device=pad.device).masked_fill(pad, float("-inf"))
                    bias = bias.unsqueeze(2)
            keys = part.keys[:, :, lo:hi]
            if place is not None:  # stored keys (position 0) moved to their prefix positions
                cos, sin = (t[part.first + lo:part.first + hi] for t in place)
                keys = rotated(keys, cos, sin)
            yield offset + lo, keys, part.values[:, :, lo:hi], bias
        offset += n


def split_attention(ctx: SegmentContext, mem: LayerMemory, query: torch.Tensor, key: torch.Tensor,
                    value: torch.Tensor, scale: float, scored: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The read of `memory_attention` when every query sees the whole prefix: (out [batch, heads, seq, dim], this
    segment's eviction evidence when `scored` else None)."""
    plan, m = ctx.plan, ctx.config.management
    parts = prefix_parts(plan, mem)
    n_memory = sum(part.keys.shape[2] for part in parts)
    lo, hi = eviction.scored_rows(m, plan.n_read, plan.n_seg, plan.n_observe)
    # The rows scored: their logits kept from this pass while small, so no block is rotated twice.
    keep = scored and (hi - lo) * query.shape[0] * query.shape[1] * n_memory <= KEPT_LOGITS
    kept: list[tuple[int, int, torch.Tensor]] = []
    out, lse = attention_with_lse(query, key, value, None, scale, ctx.kernel)  # the segment, causally
    for first, keys, values, bias in key_blocks(parts, plan.place, query.dtype):
        out, lse = merge_lse(out, lse, *block_attention(query, keys, values, bias, scale, ctx.kernel))
        if keep:
            kept += [(first, start, logits)
                     for start, logits in eviction.block_logits(query, keys, bias, scale, lo, hi)]
    if not scored:
        return out, None
    memory = (kept if keep else
              ((first, start, logits) for first, keys, _, bias in key_blocks(parts, plan.place, query.dtype)
               for start, logits in eviction.block_logits(query, keys, bias, scale, lo, hi)))
    segment = ((n_memory, start, logits) for start, logits in eviction.block_logits(
        query, key[:, :, plan.n_read:plan.n_read + plan.n_seg], None, scale, lo, hi))
    fresh = eviction.block_scores(m, itertools.chain(memory, segment), lse, n_memory=n_memory, n_read=plan.n_read,
                                  n_seg=plan.n_seg, n_observe=plan.n_observe)
    return out, fresh
