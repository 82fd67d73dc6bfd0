"""Score-based eviction (Memory Management): which slots a full memory gives up, per layer and KV head.

When a segment's write would overflow the memory, the candidates are [held slots ; the segment's tokens], in
document order. Each gets a score per KV head; sinks (the document's first tokens) and recent tokens are protected;
the `size` best are kept in document order, ties kept for the newer slot. Where a policy needs attention
probabilities, they come from the segment's own queries over [memory ; segment] (the keys the engine attended),
computed in bounded blocks of query rows against the log-sum-exp the attention returned (H2O, LRU: every query)
or over the few rows a policy reads (TOVA: the last query; SnapKV: the last `observe`), never as a [queries x keys]
matrix.

Where ours differs from the official code (kvpress, FMInference/H2O), all because eviction runs while a document
streams in segments instead of once after a prefill or once per generated token:
- H2O evicts at the end of every segment, not after every token; GQA query heads add up into their KV head.
- TOVA and SnapKV score with the segment's last queries at every eviction (kvpress: once, with the prompt's).
- SnapKV pools over the candidates in memory order, which after per-head eviction are not adjacent tokens.
- LRU (UniMem's future work; no official code): a slot is used by a query that gives it at least the uniform share
  1/visible-keys of its attention, averaged over the KV head's query heads; never used = its write time.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
import torch.nn.functional as F

from unimem_bench.methods.config import Management

NEEDS_ALL_QUERIES = ("h2o", "lru")
"""Policies scored by every query's attention (the attention returns its log-sum-exp for them)."""

NEEDS_LAST_QUERIES = ("tova", "snapkv")
"""Policies scored by the attention of the segment's last queries."""

KNORM_GRID = 1e4
"""Key norms compare at 1e-4: a repeated token's identical layer-0 keys, stored from different positions, differ by
rounding only, and must tie (then the newer is kept) rather than be ordered by rounding noise."""

# Elements per probability block [heads, rows, keys]: 2^18 floats (1 MiB in float32) whatever the model's width.
# Small beside the memory a 4x budget holds at 16K-64K tokens (10-40 MiB on the reference model), yet thousands
# of elements per query row, so the per-block overhead stays small (2^24 was a 34 MiB transient at 64K, 2^20 4 MiB).
BLOCK_ELEMENTS = 1 << 18

# Slots per block of an in-place compaction (`take`): a 1,024-slot copy instead of a second copy of the memory.
TAKE_BLOCK = 1024
# Up to this many [held ; new] slots `take` joins them and gathers once: x0.22 of the in-place compaction's time at
# 128 + 128 slots (H2O's default budget of one segment), x0.74 at 2,048 + 128, and the joined copy (at most 2,048
# slots per KV head) is small beside any memory whose peak the in-place path is there to bound.
SMALL_TAKE = 2048


def _row_mask(mask: torch.Tensor | None, lo: int, hi: int, n_keys: int, device: torch.device) -> torch.Tensor:
    """Additive mask [rows, keys] (or [batch, heads, rows, keys] for a per-head mask) of query rows lo..hi-1; None
    means causal over keys (no memory in front)."""
    if mask is not None:
        return mask[..., lo:hi, :]
    rows = torch.arange(lo, hi, device=device)[:, None]
    keys = torch.arange(n_keys, device=device)[None, :]
    return torch.zeros(hi - lo, n_keys, device=device).masked_fill(keys > rows, float("-inf"))


def _probabilities(query: torch.Tensor, keys: torch.Tensor, mask: torch.Tensor | None, scale: float, lo: int,
                   hi: int, lse: torch.Tensor | None) -> Iterator[tuple[int, torch.Tensor]]:
    """Attention probabilities of query rows lo..hi-1, in blocks: (first row, [batch, kv_heads, group, rows, keys])."""
    batch, heads, _, dim = query.shape
    kv_heads = keys.shape[1]
    wide = torch.promote_types(query.dtype, torch.float32)
    k = keys.to(wide)
    rows = max(1, BLOCK_ELEMENTS // (batch * heads * keys.shape[2]))
    for start in range(lo, hi, rows):
        stop = min(hi, start + rows)
        q = query[:, :, start:stop].to(wide).reshape(batch, kv_heads, heads // kv_heads, stop - start, dim)
        # In place on the fresh logits: the same operations in the same order, without a temporary per step.
        logits = torch.einsum("bkgsd,bktd->bkgst", q, k).mul_(scale)
        rows_mask = _row_mask(mask, start, stop, keys.shape[2], query.device).to(wide)
        if rows_mask.dim() == 4:  # per-head padding of budgeted banks: [batch, heads, rows, keys]
            rows_mask = rows_mask.unflatten(1, (kv_heads, -1))
        logits.add_(rows_mask)
        if lse is None:
            probs = torch.softmax(logits, dim=-1)
        else:
            row_lse = lse[:, :, start:stop].to(wide).reshape(batch, kv_heads, -1, stop - start, 1)
            probs = logits.sub_(row_lse).exp_()
        yield start, probs


def attention_scores(m: Management, query: torch.Tensor, keys: torch.Tensor, mask: torch.Tensor | None, scale: float,
                     lse: torch.Tensor | None, *, n_memory: int, n_read: int, n_seg: int,
                     first_id: int, n_observe: int = 0) -> torch.Tensor:
    """This segment's attention evidence per candidate [batch, kv_heads, n_memory + n_seg].

    query [batch, heads, input, dim]; keys [batch, kv_heads, n_memory + input, dim] (memory, then the input:
    n_read read slots, n_seg segment tokens, write slots); `first_id`: the id (document position) of the first
    segment token. h2o: attention received, summed over queries and the KV head's query heads; lru: the id of the
    latest query giving at least 1/visible of its attention (-1: none); tova: the last query's attention averaged
    over all heads; snapkv: the last `observe` queries' attention averaged, pooled, averaged over the group.
    `n_observe` question rows right after the segment (no RMT slots then) score too, as its last queries.
    """
    policy = m.eviction
    candidates = torch.cat([torch.arange(n_memory), n_memory + n_read + torch.arange(n_seg)]).to(query.device)
    every_key = n_read == 0 and keys.shape[2] == n_memory + n_seg  # no RMT slots: the candidates are all the keys
    last = n_read + n_seg + n_observe  # rows after it are RMT write slots
    if policy in NEEDS_ALL_QUERIES:
        batch, kv_heads = keys.shape[:2]
        out = torch.zeros(batch, kv_heads, len(candidates), dtype=torch.promote_types(query.dtype, torch.float32),
                          device=query.device)
        if policy == "lru":
            out -= 1
        for start, probs in _probabilities(query, keys, mask, scale, 0, last, lse):
            probs = probs if every_key else probs[..., candidates]
            if policy == "h2o":
                out += probs.sum(dim=(2, 3))
                continue
            share = probs.mean(2)  # [batch, kv_heads, rows, candidates]
            visible = torch.isfinite(_row_mask(mask, start, start + share.shape[2], keys.shape[2], query.device))
            if visible.dim() == 4:  # per-head padding: the KV head's first query head counts for the group
                visible = visible[:, ::visible.shape[1] // keys.shape[1]]
            uniform = 1.0 / visible.sum(-1).clamp(min=1)  # [rows] or [batch, kv_heads, rows]
            rows = first_id + torch.arange(start, start + share.shape[2], device=query.device) - n_read
            used = share >= uniform[..., None].to(share.dtype)
            when = torch.where(used, rows[:, None].to(share.dtype), torch.full_like(share, -1.0))
            out = torch.maximum(out, when.amax(2))
        return out
    observe = 1 if policy == "tova" else min(m.observe, n_seg + n_observe)
    total = None
    for _, probs in _probabilities(query, keys, mask, scale, last - observe, last, None):
        part = (probs if every_key else probs[..., candidates]).sum(3)  # [batch, kv_heads, group, candidates]
        total = part if total is None else total + part
    assert total is not None  # observe >= 1
    return _last_query_scores(m, total, observe)


def _last_query_scores(m: Management, total: torch.Tensor, observe: int) -> torch.Tensor:
    """tova / snapkv scores [batch, kv_heads, candidates] from the observed rows' summed attention `total`
    [batch, kv_heads, group, candidates]."""
    mean = total / observe
    batch, kv_heads, group, n = mean.shape
    if m.eviction == "tova":
        return mean.mean(dim=(1, 2), keepdim=True).squeeze(2).expand(-1, kv_heads, -1)
    pooled = F.avg_pool1d(mean.reshape(-1, 1, n), m.pool_kernel, stride=1, padding=m.pool_kernel // 2)
    return pooled.reshape(batch, kv_heads, group, n).mean(2)


def scored_rows(m: Management, n_read: int, n_seg: int, n_observe: int) -> tuple[int, int]:
    """The query rows [lo, hi) whose attention a policy scores with (h2o: every row before the RMT write slots;
    tova: the last; snapkv: the last `observe`)."""
    last = n_read + n_seg + n_observe  # rows after it are RMT write slots
    if m.eviction in NEEDS_ALL_QUERIES:
        return 0, last
    return last - (1 if m.eviction == "tova" else min(m.observe, n_seg + n_observe)), last


def block_logits(query: torch.Tensor, keys: torch.Tensor, bias: torch.Tensor | None, scale: float, lo: int,
                 hi: int) -> Iterator[tuple[int, torch.Tensor]]:
    """Scaled logits (first row, [batch, kv_heads, group, rows, n]) of query rows lo..hi-1 on one block of keys
    [batch, kv_heads, n, dim], in row blocks of at most BLOCK_ELEMENTS; `bias` [batch, kv_heads, 1, n] hides keys.
    No causal mask: `block_scores` zeroes the probabilities of the segment's later keys."""
    batch, heads, _, dim = query.shape
    kv_heads, n = keys.shape[1], keys.shape[2]
    group = heads // kv_heads
    wide = torch.promote_types(query.dtype, torch.float32)
    k = keys.to(wide).reshape(batch * kv_heads, n, dim).transpose(1, 2)  # [batch * kv_heads, dim, n]
    rows = max(1, BLOCK_ELEMENTS // (batch * heads * n))
    for start in range(lo, hi, rows):
        stop = min(hi, start + rows)
        q = query[:, :, start:stop].to(wide).reshape(batch * kv_heads, group * (stop - start), dim)
        # The batched product einsum("bkgsd,bktd->bkgst") makes, called directly (einsum's planning cost a third).
        logits = torch.bmm(q, k).view(batch, kv_heads, group, stop - start, n).mul_(scale)
        if bias is not None:
            logits.add_(bias.to(wide).unsqueeze(2))
        yield start, logits


def block_scores(m: Management, blocks: Iterable[tuple[int, int, torch.Tensor]], lse: torch.Tensor, *,
                 n_memory: int, n_read: int, n_seg: int, n_observe: int = 0) -> torch.Tensor:
    """`attention_scores` of a read done in parts (h2o, tova, snapkv) from its logits: (index of the block's first
    candidate among [n_memory memory slots ; n_seg segment tokens], first row, `block_logits`) over the rows of
    `scored_rows`, turned into probabilities against the read's log-sum-exp `lse` [batch, heads, input]. No
    [memory ; segment] keys and no [queries, keys] matrix. The segment's blocks (first candidate >= n_memory, keys
    from input index n_read) come unmasked: a later key's probability is zeroed after the exponential, as exp(-inf)
    (and every underflowing exp) runs 10-100x slower than a finite one on CPU."""
    policy = m.eviction
    assert policy in ("h2o", "tova", "snapkv")
    lo, hi = scored_rows(m, n_read, n_seg, n_observe)
    total = None
    for first, start, logits in blocks:
        batch, kv_heads, group, rows, n = logits.shape
        if total is None:
            shape = (batch, kv_heads) if policy == "h2o" else (batch, kv_heads, group)
            total = torch.zeros(*shape, n_memory + n_seg, dtype=logits.dtype, device=logits.device)
        row_lse = lse[:, :, start:start + rows].to(logits.dtype).reshape(batch, kv_heads, group, rows, 1)
        probs = logits.sub_(row_lse).exp_()
        if first >= n_memory:  # segment key first - n_memory + j is seen by row start + r iff n_read + j <= start + r
            probs.tril_(start - n_read - (first - n_memory))
        total[..., first:first + n] += probs.sum(dim=(2, 3)) if policy == "h2o" else probs.sum(3)
    assert total is not None  # the segment's own block always comes
    return total if policy == "h2o" else _last_query_scores(m, total, hi - lo)


def combine(m: Management, held: torch.Tensor | None, fresh: torch.Tensor | None,
            keys: tuple[torch.Tensor, ...], ids: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Scores [batch, kv_heads, candidates] of the candidates (keys: their [batch, kv_heads, n, dim] parts in
    candidate order, e.g. (held slots, segment), never concatenated; ids [batch, kv_heads, candidates]); `held`
    carries the held slots' running scores (h2o, lru) and `fresh` this segment's `attention_scores`. Higher is
    kept."""
    policy = m.eviction
    if policy == "knorm":  # the largest key norms go (Devoto et al., 2024)
        norm = torch.cat([k.to(torch.promote_types(k.dtype, torch.float32)).norm(dim=-1) for k in keys], dim=2)
        return -torch.round(norm * KNORM_GRID)
    if policy == "random":
        return torch.rand(ids.shape, generator=generator, dtype=torch.float64).to(ids.device)
    assert fresh is not None  # an attention policy: memory_attention computed it
    if policy in NEEDS_LAST_QUERIES:
        return fresh
    n_held = 0 if held is None else held.shape[2]
    if policy == "h2o":
        return fresh if held is None else fresh + F.pad(held, (0, fresh.shape[2] - n_held))
    # lru: written counts as used; a held slot keeps its last use
    since = ids.to(fresh.dtype) if held is None else torch.cat([held, ids[..., n_held:].to(fresh.dtype)], dim=2)
    return torch.maximum(since, fresh)


def keep_indices(m: Management, scores: torch.Tensor, ids: torch.Tensor, kept: int, end_id: int) -> torch.Tensor:
    """Candidate indices [batch, kv_heads, kept] to keep, in document order: sinks (ids < m.sinks) and recent tokens
    (ids >= end_id - m.recent) first, then the highest scores, a tie kept for the newer slot."""
    protect = ids >= end_id - m.recent
    if m.sinks:  # ids are never negative here: without sinks nothing more is protected
        protect |= ids < m.sinks
    rank = scores.masked_fill(protect, float("inf")).flip(-1)  # flipped: a stable sort then prefers newer slots
    order = torch.sort(rank, dim=-1, descending=True, stable=True).indices[..., :kept]
    return (scores.shape[-1] - 1 - order).sort(dim=-1).values


def take(held: torch.Tensor | None, new: torch.Tensor, keep: torch.Tensor, in_place: bool = False) -> torch.Tensor:
    """Candidates `keep` [batch, kv_heads, kept] of [held ; new] ([batch, kv_heads, n, dim] each): a small pair
    (SMALL_TAKE) joined and gathered once; else without building [held ; new]: one gather from the held slots, then
    the few kept new ones written over their places.

    `in_place`: the held slots are compacted inside `held` itself, TAKE_BLOCK slots at a time (no new full-size
    tensor); the caller guarantees that nothing else reads `held` and that every row of `keep` is strictly
    increasing (no padding), so slot i is filled from a slot at or after i that no earlier block overwrote."""
    if held is None or not held.shape[2]:
        return new.gather(2, keep.unsqueeze(-1).expand(-1, -1, -1, new.shape[3]))
    n_held, kept, dim = held.shape[2], keep.shape[2], held.shape[3]
    if n_held + new.shape[2] <= SMALL_TAKE:
        joined = torch.cat([held, new.to(held.dtype)], dim=2)  # [batch, kv_heads, n_held + n_new, dim]
        return joined.gather(2, keep.unsqueeze(-1).expand(-1, -1, -1, dim))
    source = keep.clamp(max=n_held - 1)  # new slots read a held one here and are overwritten below
    if in_place and kept <= n_held:
        for lo in range(0, kept, TAKE_BLOCK):
            hi = min(kept, lo + TAKE_BLOCK)
            held[:, :, lo:hi] = held.gather(2, source[..., lo:hi].unsqueeze(-1).expand(-1, -1, -1, dim))
        out = held[:, :, :kept]
    else:
        out = held.gather(2, source.unsqueeze(-1).expand(-1, -1, -1, dim))
    b, h, slot = (keep >= n_held).nonzero(as_tuple=True)
    out[b, h, slot] = new[b, h, keep[b, h, slot] - n_held].to(out.dtype)
    return out
