"""Which memory slots each query reads by position, built once per segment: LongNet's dilated patterns (a mask and
the key columns it reaches), BigBird's seeded random slots, and the mask of an open prefix (every memory key, the
input causally)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Protocol

import torch

from unimem_bench.methods.config import UniMemConfig
from unimem_bench.methods.engine.memory import MemoryState


class WindowPlan(Protocol):
    """What the patterns read of a `plan.SegmentPlan` (a protocol: plan imports this module, not the reverse)."""

    @property
    def n_bank(self) -> int: ...

    @property
    def n_window(self) -> int: ...

    @property
    def doc_start(self) -> int: ...


@dataclass(frozen=True)
class DilatedKeys:
    """LongNet's keys narrowed per head offset to those its patterns reach: the attention reads only them (the other
    columns of `dilated_mask` are -inf for every query of the offset, so the softmax is the same)."""

    columns: torch.Tensor
    """[offsets, n] per head offset, the key columns of [window ; local] its patterns reach, ascending, then (for
    offsets that reach fewer than n) columns they never reach, which `mask` keeps at -inf."""
    mask: torch.Tensor
    """[offsets, queries, n] `dilated_mask` at those columns."""
    per_head: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict, compare=False, repr=False)
    """Query heads -> (the rows `take` reads, the mask per head [heads, queries, n], a copy where heads outnumber
    offsets): built by the context's first layer call, read by the others (a context is cached per shape, so its
    keys' count is fixed)."""

    def take(self, keys: torch.Tensor, values: torch.Tensor,
             heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Each query head's keys and values [batch, heads, n, dim] out of [batch, kv_heads, keys, dim], and the
        mask [heads, queries, n]; head h reads offset h mod offsets through KV head h // (heads / kv_heads)."""
        batch, kv_heads, n_keys, dim = keys.shape
        offsets, n = self.columns.shape
        hit = self.per_head.get(heads)
        if hit is None:
            h = torch.arange(heads, device=keys.device)
            rows = self.columns if heads == offsets else self.columns[h % offsets]  # [heads, n]
            flat = (rows + (h // (heads // kv_heads) * n_keys)[:, None]).flatten()  # rows of [kv_heads * keys, dim]
            hit = self.per_head[heads] = (flat, self.mask if heads == offsets else self.mask[h % offsets])
        flat, mask = hit
        picked_k = keys.reshape(batch, kv_heads * n_keys, dim).index_select(1, flat).view(batch, heads, n, dim)
        picked_v = values.reshape(batch, kv_heads * n_keys, dim).index_select(1, flat).view(batch, heads, n, dim)
        return picked_k, picked_v, mask


def dilated_keys(mask: torch.Tensor) -> DilatedKeys:
    """The `DilatedKeys` of a `dilated_mask` [offsets, queries, keys]."""
    reached = (mask > float("-inf")).any(1)  # [offsets, keys]
    n = int(reached.sum(1).max())
    # A stable sort of (not reached) puts each offset's reached columns first, in key order.
    columns = torch.argsort((~reached).to(torch.uint8), dim=1, stable=True)[:, :n]  # [offsets, n]
    return DilatedKeys(columns=columns, mask=mask.gather(2, columns[:, None, :].expand(-1, mask.shape[1], -1)))


def random_reads(config: UniMemConfig, plan: WindowPlan, segment: int, queries: torch.Tensor,
                 start: int) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None, bool]:
    """`SegmentContext.random_slots`, `random_blocks`, `random_index` and `random_padded` of consecutive input
    indices `queries` (None, None, None, True without random slots)."""
    r = config.reading
    random = random_slots(config, plan, segment, queries, start) if r.random_slots else None
    whole_blocks = int(queries[0]) % r.random_block == 0 and len(queries) % r.random_block == 0
    if random is None or not whole_blocks:
        return random, None, None, True
    blocks = random[::r.random_block]  # [query blocks, R]
    return random, blocks, blocks.clamp(min=0).flatten(), bool((blocks < 0).any())


def random_slots(config: UniMemConfig, plan: WindowPlan, segment: int, queries: torch.Tensor,
                 start: int) -> torch.Tensor | None:
    """BigBird's seeded random slots (the rule is `Reading.random_slots`'): [queries, R] bank indices, -1 padded;
    None when no query has a candidate."""
    r = config.reading
    blocks = queries // r.random_block  # [queries]
    first_block = int(blocks[0])  # the queries are consecutive: so are their blocks
    # One generator reseeded per block (the same draws as a fresh one), each permutation written straight into its
    # row of the table (the rows' tails stay -1 - start, start added once): no per-block slice, pad or stack.
    generator = torch.Generator()
    firsts = range(first_block * r.random_block, (int(blocks[-1]) + 1) * r.random_block, r.random_block)
    sizes = [plan.n_bank - (min(max(r.window - first, 0), plan.n_window) if r.sliding else plan.n_window) - start
             for first in firsts]  # each block's candidates, decided by its first query
    if max(sizes) <= 0:
        return None
    table = torch.full((len(sizes), max(r.random_slots, *sizes)), -1 - start, dtype=torch.long)
    for block, (row, n) in enumerate(zip(table, sizes, strict=True), start=first_block):
        if n > 0:
            generator.manual_seed((r.random_seed * 1_000_003 + segment) * 1_000_003 + block)
            torch.randperm(n, generator=generator, out=row[:n])
    table = table[:, :r.random_slots] + start  # [blocks, R]
    return table.to(queries.device)[blocks - first_block]


def random_mask(mask: torch.Tensor, random: torch.Tensor, n_global: int, n_bank: int, n_window: int,
                start: int) -> torch.Tensor:
    """BigBird's random slots folded into the additive mask: `mask` [queries, globals + window + local keys] (0 /
    -inf) re-laid over [globals ; bank slots start .. n_bank - 1 ; local] with each query's `random` slots [queries,
    R] (bank indices, -1: none) opened, so one softmax reads window, globals and random slots with no merge."""
    n_query = mask.shape[0]
    n_bank_keys = n_bank - start
    n_local = mask.shape[1] - n_global - n_window
    out = torch.full((n_query, n_global + n_bank_keys + n_local), float("-inf"), dtype=mask.dtype, device=mask.device)
    out[:, :n_global] = mask[:, :n_global]
    out[:, n_global + n_bank_keys - n_window:] = mask[:, n_global:]  # the window is the bank's last slots, then local
    # Padding (-1) opens the query's own local key instead, which it reads anyway.
    own = n_global + n_bank_keys + n_local - n_query + torch.arange(n_query, device=mask.device)[:, None]
    columns = torch.where(random >= 0, random - start + n_global, own)
    return out.scatter_(1, columns, 0.0)


def dilated_mask(config: UniMemConfig, state: MemoryState, plan: WindowPlan, queries: torch.Tensor,
                 reach: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """LongNet's patterns as an additive mask [offsets, queries, window + local keys]: log(number of patterns holding
    the key) where visible, -inf elsewhere; row o is every head h with h = o mod lcm(rates)."""
    r = config.reading
    device = queries.device
    window_pos = state.positions[plan.n_bank - plan.n_window:].to(device)  # [window] document positions
    n_local = int(queries.max()) + 1
    keys = torch.cat([window_pos, plan.doc_start + torch.arange(n_local, device=device)])  # [keys]
    q = plan.doc_start + queries  # [queries] document positions
    w = torch.arange(plan.n_window, device=device)
    in_window = w[None, :] >= plan.n_window - reach[:, None]  # [queries, window]
    causal = torch.arange(n_local, device=device)[None, :] <= queries[:, None]  # [queries, local]
    base = torch.cat([in_window, causal], dim=1)  # [queries, keys]
    offsets = math.lcm(*r.dilation_rates)
    o = torch.arange(offsets, device=device)[:, None, None]  # [offsets, 1, 1]
    # Counts run to the number of patterns: uint8 while it fits (adds into a wide integer tensor are 5x slower).
    narrow = torch.uint8 if len(r.dilation_rates) < 256 else torch.long
    count = torch.zeros(offsets, len(q), len(keys), dtype=narrow, device=device)
    for length, rate in zip(r.dilated_segments, r.dilation_rates, strict=True):
        same = ((q[:, None] // length) == (keys[None, :] // length)) & base  # [queries, keys]
        on = ((q % rate)[None, :, None] == o % rate) & ((keys % rate)[None, None, :] == o % rate)
        count += same & on  # [offsets, queries, keys]
    # log(count) by lookup (counts are 0 .. patterns; log 0 = -inf): an elementwise log over the mask is slow.
    levels = torch.arange(len(r.dilation_rates) + 1, device=device).float().log()
    return levels.index_select(0, count.flatten().int()).view(count.shape).to(dtype)


def open_mask(n_prefix: int, n_local: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The additive mask [queries, prefix + local keys] of `SegmentContext.open_prefix`: every prefix key, the
    input's n_local keys causally."""
    causal = torch.ones(n_local, n_local, dtype=torch.bool, device=device).triu(1)  # [queries, local]: later keys
    mask = torch.zeros(n_local, n_prefix + n_local, dtype=dtype, device=device)
    mask[:, n_prefix:].masked_fill_(causal, float("-inf"))
    return mask
