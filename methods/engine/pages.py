"""Page (chunk) reading per query block: `reading.chunk_select=block`.

Each block of `reading.chunk_block` consecutive queries ranks the memory's chunks once per KV head (official InfLLM
ranks its blocks once per `exc_block_size` queries by their mean query), so every query of the block reads the same
chunks: one gather of the block's chunk slots and one batched matmul per block, instead of a gather of every
query's own slots. The chunks are merged into the softmax of the rest of the read through its log-sum-exp.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from unimem_bench.methods.engine import slot_buffer
from unimem_bench.methods.engine.memory import LayerMemory, MemoryState
from unimem_bench.methods.engine.plan import SegmentContext
from unimem_bench.methods.engine.retrieval import chunk_keys, chunk_queries, topk_exact


def block_chunk_slots(ctx: SegmentContext, mem: LayerMemory, query: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The bank slots each query block reads: (slots, found), each [batch, kv_heads, blocks, chunks read * chunk].

    A block's score of a chunk is the sum, over its queries and the KV head's query heads, of each query's score
    (linear in the query in `chunk_queries`' frame, Quest's bound included: one inner product with the summed
    queries); it ranks the chunks wholly before its first query's window reach (the reach only shrinks along the
    block, so no query reads a chunk slot also in its window). found is False past the bank's end and for chunks
    not found (fewer candidates than chunks read).
    """
    r = ctx.config.reading
    assert ctx.topk_end is not None and mem.keys is not None
    batch, heads, seq, _ = query.shape
    kv_heads = mem.keys.shape[1]
    size = r.chunk_block or seq
    blocks = -(-seq // size)
    lo, chunk = ctx.topk_start, r.chunk_size
    keys = mem.keys[:, :, lo:]  # [batch, kv_heads, n, dim]
    n = keys.shape[2]
    framed = chunk_queries(query, r.chunk_key)  # [batch, heads, seq, dim']: zero rows add nothing to a sum
    framed = F.pad(framed, (0, 0, 0, blocks * size - seq))
    summed = framed.view(batch, kv_heads, heads // kv_heads, blocks, size, -1).sum((2, 4))  # [b, kv, blocks, dim']
    first = ctx.topk_end[::size] - lo  # [blocks] the limit of each block's first query (the smallest)
    chunk_limit = torch.where(first >= n, -(-n // chunk), first // chunk)  # chunks wholly before it
    scores, best = topk_exact(summed, cached_chunk_keys(ctx, mem), r.topk // chunk,
                              limit=chunk_limit)  # [batch, kv_heads, blocks, chunks read]
    slots = (best.unsqueeze(-1) * chunk + torch.arange(chunk, device=best.device)).flatten(-2)
    found = (slots < n) & (scores > float("-inf")).repeat_interleave(chunk, dim=-1)
    return slots.clamp(max=n - 1) + lo, found


def merge_block_pages(ctx: SegmentContext, mem: LayerMemory, query: torch.Tensor, out: torch.Tensor,
                      lse: torch.Tensor, scale: float) -> torch.Tensor:
    """Add each query block's chunks (`block_chunk_slots`) to the softmax of `out`/`lse` (one softmax over the
    union); query [batch, heads, seq, dim] -> [batch, heads, seq, dim]."""
    assert mem.keys is not None and mem.values is not None
    batch, heads, seq, dim = query.shape
    kv_heads = mem.keys.shape[1]
    size = ctx.config.reading.chunk_block or seq
    blocks = -(-seq // size)
    pad = blocks * size - seq
    slots, found = block_chunk_slots(ctx, mem, query)  # [batch, kv_heads, blocks, read]
    keys = _pick(mem.keys, slots).to(query.dtype)  # [batch, kv_heads, blocks, read, dim]
    values = _pick(mem.values, slots).to(query.dtype)
    q = F.pad(query, (0, 0, 0, pad)).view(batch, kv_heads, heads // kv_heads, blocks, size, dim)
    logits = torch.einsum("bkgnqd,bknjd->bkgnqj", q, keys) * scale  # [batch, kv_heads, group, blocks, size, read]
    logits = logits.masked_fill(~found[:, :, None, :, None, :], float("-inf"))
    # One softmax over [out's keys ; the block's chunk slots]: out's (finite) log-sum-exp stands for the first part.
    lse = F.pad(lse.to(logits.dtype), (0, pad)).view(*logits.shape[:-1], 1)
    joint = torch.cat([lse, logits], dim=-1)
    probs = torch.exp(joint - joint.logsumexp(-1, keepdim=True))  # [batch, kv_heads, group, blocks, size, 1 + read]
    out_c = torch.einsum("bkgnqj,bknjd->bkgnqd", probs[..., 1:], values)
    merged = F.pad(out, (0, 0, 0, pad)).view(out_c.shape) * probs[..., :1] + out_c
    return merged.reshape(batch, heads, blocks * size, dim)[:, :, :seq]


def _pick(bank: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """bank [batch, kv_heads, n, dim] at slots [batch, kv_heads, blocks, read] -> [batch, kv_heads, blocks, read,
    dim] (one index_select over the bank's rows)."""
    rows, first = slot_buffer.bank_rows(bank, slots.device)  # a FIFO bank is a strided view: not copied
    return rows.index_select(0, (slots + first).flatten()).view(*slots.shape, bank.shape[3])


@dataclass(frozen=True)
class PageKeys:
    """One layer's chunk search keys of whole chunks, from memory id `first_id` on."""

    first_id: int
    """Memory id of the first slot of the first chunk."""
    params: tuple
    """(chunk size, chunk key, representatives, dtype, device, batch): what the keys were computed for."""
    keys: torch.Tensor
    """[batch, kv_heads, whole chunks, key dim] the chunks' `chunk_keys`."""


def cached_chunk_keys(ctx: SegmentContext, mem: LayerMemory) -> torch.Tensor:
    """`chunk_keys` of the searchable slots [topk_start, bank end) -> [batch, kv_heads, chunks, key dim], reusing the
    keys of whole chunks an earlier read of this layer computed (a slot's key, value and representative score never
    change once written under FIFO, so a chunk's key is a function of its first memory id): each read computes only
    the chunks written since, instead of every chunk of the bank (quest / infllm at 64K: 2,048-4,096 chunks per
    layer and segment). Recomputed whole where slots do not hold consecutive ids (score-based eviction, per-head
    budgets) or under autograd."""
    r = ctx.config.reading
    assert mem.keys is not None
    lo, chunk = ctx.topk_start, r.chunk_size
    keys = mem.keys[:, :, lo:]  # [batch, kv_heads, n, dim]
    rep = mem.representative[:, :, lo:] if mem.representative is not None else None
    layer = _layer_of(ctx.state, mem)
    if (layer is None or ctx.config.management.eviction != "fifo" or mem.ids is not None or mem.depth is not None
            or keys.requires_grad):
        return chunk_keys(keys, chunk, r.chunk_key, rep, r.representatives)
    first_id = ctx.plan.first_id + lo
    params = (chunk, r.chunk_key, r.representatives, keys.dtype, keys.device, keys.shape[0])
    hit = ctx.state.page_keys.get(layer)
    done = None
    if hit is not None and hit.params == params and hit.first_id <= first_id and (first_id - hit.first_id) % chunk == 0:
        done = hit.keys[:, :, (first_id - hit.first_id) // chunk:]  # [batch, kv_heads, cached chunks, key dim]
        if done.shape[2] * chunk > keys.shape[2]:
            done = None
    covered = 0 if done is None else done.shape[2] * chunk
    if done is not None and covered == keys.shape[2]:
        return done
    fresh = chunk_keys(keys[:, :, covered:], chunk, r.chunk_key, None if rep is None else rep[:, :, covered:],
                       r.representatives)  # [batch, kv_heads, new chunks, key dim]
    whole = (keys.shape[2] - covered) // chunk  # new whole chunks (a short last chunk is not kept: it grows)
    cached = fresh[:, :, :whole] if done is None else torch.cat([done, fresh[:, :, :whole]], dim=2)
    ctx.state.page_keys[layer] = PageKeys(first_id, params, cached)
    return cached if whole == fresh.shape[2] else torch.cat([cached, fresh[:, :, whole:]], dim=2)


def _layer_of(state: MemoryState, mem: LayerMemory) -> int | None:
    """The layer whose bank `mem` reads (its snapshot holds the bank's own keys until the write), or None."""
    return next((i for i, bank in state.layers.items() if bank.keys is mem.keys), None)
