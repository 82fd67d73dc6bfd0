"""UniMem's Eq. 9 as a transformers attention function.

    Attn(Q, [K_mem ; K_seg], [V_mem ; V_seg]; A)

Registered in transformers' `AttentionInterface`; stock LLaMA-family models call it with their rotated query and
key states, and the `unimem` keyword argument (a `SegmentContext`) given to the model's forward reaches it. Layers
outside the injection set, and calls without a context, take transformers' own SDPA path unchanged.

Reading merges four disjoint key sets into one softmax: global tokens (pinned document tokens or the bank's first
slots), the window (the bank's most recent slots; sliding and dilated per query through the mask, as the official
`_generate_window_mask_for_chunk`), the top-k bank slots outside each query's window reach, and the causal local
segment; a pooled tier (writing.pooled_tier), when there is one, is read whole between the globals and the window.
Global, tier, window and local keys share one SDPA call; top-k keys differ per query, so that part is computed
apart and merged through log-sum-exp, which is exactly the paper's gate g (Eq. 12-13).
"""

from __future__ import annotations

from typing import Any, cast

import torch
import torch.nn.functional as F
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from unimem_bench.methods.engine import buckets, budgets, eviction, pages, picked_read, slot_buffer, split_read, tier
from unimem_bench.methods.engine.kernels import (
    attention_with_lse,
    prefix_causal_sdpa,
    rotate,
    rotate_,
    unrotate,
)
from unimem_bench.methods.engine.memory import LayerMemory
from unimem_bench.methods.engine.patterns import open_mask
from unimem_bench.methods.engine.plan import SegmentContext
from unimem_bench.methods.engine.retrieval import representative_scores, topk_chunk_slots, topk_exact
from unimem_bench.methods.engine.sinks import merge_sinks, sink_buffer, sink_logits

ATTENTION_NAME = "unimem"

# Prefix slots up to which an open prefix (every query reads all of it) is read joined rather than split: the
# [memory ; segment] copy and its [queries, keys] mask stay under about 1.5 MiB per layer at 4 KV heads of dim 64,
# 128 queries; pooled tiers (LongT5: 1,024 slots + a 128-slot window) and one-segment windows fall under it.
JOINED_PREFIX = 2048


def unimem_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    unimem: SegmentContext | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """The registered attention function: q [batch, heads, seq, dim], k/v [batch, kv_heads, seq, dim]."""
    layer = cast(int, module.layer_idx)  # transformers' attention modules carry their layer index
    if unimem is None or layer not in unimem.layers:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    if unimem.dense is not None and layer in unimem.config.reading.dense_layers:
        unimem = unimem.dense
    out = memory_attention(unimem, layer, query, key, value, scale)
    return out.transpose(1, 2).contiguous(), None  # [batch, seq, heads, dim], as transformers expects


def memory_attention(ctx: SegmentContext, layer: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     scale: float) -> torch.Tensor:
    """Read memory, attend, write this segment; returns [batch, heads, seq, dim] in the query's dtype.

    Gradient checkpointing runs this again during backward: that call reads what the first one read (`ctx.reads`)
    and repeats every tensor operation, but writes nothing.
    """
    plan, config, bank = ctx.plan, ctx.config, ctx.state.layers[layer]
    first_call = layer not in ctx.reads
    if first_call:
        mem = bank.snapshot()
        # Only a recomputation (under autograd) rereads the snapshot; without autograd, keeping it would hold every
        # layer's replaced bank until the segment ends (twice the memory under eviction): an empty marker instead.
        ctx.reads[layer] = mem if torch.is_grad_enabled() else LayerMemory()
        bank.note_read(plan.n_prefix, query.shape[0], plan.n_seg or query.shape[2])
    else:
        mem = ctx.reads[layer]
    policy = config.management.eviction
    # Score-based eviction by attention: the segment's attention evidence, for the write below.
    scored = first_call and plan.write and plan.n_new > 0 and policy in (*eviction.NEEDS_ALL_QUERIES,
                                                                         *eviction.NEEDS_LAST_QUERIES)
    merged = (ctx.topk_end is not None or ctx.sink_shift is not None or ctx.random_slots is not None
              or ctx.bucket_end is not None)
    # A small open prefix is read joined: one fused call over [memory ; segment] beats split_read's three calls and
    # two merges; a large one (a memory at a budget) is read split, which never copies it.
    small = plan.n_prefix <= JOINED_PREFIX and mem.depth is None and not scored
    if ctx.open_prefix and not merged and policy != "lru" and not small:
        out, fresh = split_read.split_attention(ctx, mem, query, key, value, scale, scored)
    else:
        out, fresh = joined_read(ctx, layer, mem, query, key, value, scale, scored)
    del mem  # a replaced bank is freed before the write, whose eviction builds the new one

    if plan.write and (plan.n_new or plan.to_global):
        seg = slice(plan.n_read, plan.n_read + plan.n_seg)
        seg_k = key[:, :, seg]
        if plan.store is not None:
            # Store keys unrotated (position 0): undo RoPE at the positions the segment had in this input.
            cos, sin = (t[seg] for t in plan.store)
            seg_k = unrotate(seg_k, cos, sin, plan.rope_scale)
        if first_call:  # a recomputation repeats the tensor operations above but writes nothing
            r = config.reading
            rep = (representative_scores(query[:, :, seg], key[:, :, seg])
                   if r.chunk_size and r.chunk_key == "representative" else None)
            bank.write(plan, config, seg_k, value[:, :, seg], fresh, representative=rep)
    if first_call and plan.write and config.reading.clusters:  # the Routing Transformer's online k-means step
        with torch.no_grad():  # no gradient, and nothing saved that a checkpointed recomputation would not save
            seg = slice(plan.n_read, plan.n_read + plan.n_seg)
            seg_k = key[:, :, seg]
            if plan.store is not None:
                cos, sin = (t[seg] for t in plan.store)
                seg_k = unrotate(seg_k, cos, sin, plan.rope_scale)
            buckets.write_centroids(config.reading, bank, layer, query[:, :, seg], seg_k)
    return out.to(query.dtype)  # the fused CPU kernel's float32 log-sum-exp must not promote the output


def joined_read(ctx: SegmentContext, layer: int, mem: LayerMemory, query: torch.Tensor, key: torch.Tensor,
                value: torch.Tensor, scale: float, scored: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The read over one [memory ; segment] copy of keys and values with the context's mask (per-query masks,
    top-k, sinks, random slots, buckets, LRU): (out [batch, heads, seq, dim], the eviction evidence or None)."""
    plan, config, bank = ctx.plan, ctx.config, ctx.state.layers[layer]
    policy = config.management.eviction
    pad_bias = None
    prefix_k: list[torch.Tensor] = []
    prefix_v: list[torch.Tensor] = []
    # Shifted sinks (StreamingLLM) enter the one fused call as zero keys whose per-query logits are the mask's sink
    # columns (q . 0 + logit): one softmax, no log-sum-exp merge. Under autograd they keep the merge (a mask that
    # needs a gradient sends SDPA to its math path).
    fold_sinks = (ctx.sink_shift is not None and ctx.mask is not None and ctx.mask.dim() == 2
                  and not query.requires_grad)
    # BigBird's random slots opened in a mask over the whole bank (`SegmentContext.random_mask`): no merge either.
    fold_random = ctx.random_mask is not None and mem.depth is None
    if plan.n_global:
        if plan.globals_in_bank:
            assert mem.keys is not None and mem.values is not None
            prefix_k.append(mem.keys[:, :, :plan.n_global])
            prefix_v.append(mem.values[:, :, :plan.n_global])
        else:
            assert mem.global_keys is not None and mem.global_values is not None
            prefix_k.append(sink_buffer(ctx, mem.global_keys, None) if fold_sinks else mem.global_keys)
            prefix_v.append(mem.global_values)
    if plan.n_tier:
        assert mem.tier_keys is not None and mem.tier_values is not None
        prefix_k.append(mem.tier_keys)
        prefix_v.append(mem.tier_values)
    if plan.n_window and mem.depth is not None:  # per-layer/per-head budgets: padded to the widest bank, masked
        ids = budgets.left_pad(mem.ids, plan.n_bank, -1, key[:, :, :0, 0].long())
        prefix_k.append(budgets.left_pad(mem.keys, plan.n_bank, 0.0, key[:, :, :0]))
        prefix_v.append(budgets.left_pad(mem.values, plan.n_bank, 0.0, value[:, :, :0]))
        pad_bias = budgets.padding_bias(ids, query.shape[1], query.dtype)
    elif plan.n_window:
        assert mem.keys is not None and mem.values is not None
        first = (plan.n_global if plan.globals_in_bank else 0) if fold_random else plan.n_bank - plan.n_window
        prefix_k.append(mem.keys[:, :, first:])
        prefix_v.append(mem.values[:, :, first:])
    # A pooled tier held at the front of its room: the window and the segment laid after it, no copy of the tier.
    joined = (tier.joined_keys(bank, prefix_k[0], prefix_v[0], (*prefix_k[1:], *prefix_v[1:]), key, value)
              if plan.n_tier and not plan.n_global and plan.place is None and len(prefix_k) <= 2 else None)
    if joined is not None:
        keys, values = joined  # [batch, kv_heads, tier + window + seq, dim]
    elif prefix_k:
        keys = torch.cat([*prefix_k, key], dim=2)  # [batch, kv_heads, prefix + seq, dim]
        if plan.place is not None:  # compact: stored keys (position 0) moved to positions 0 .. prefix - 1
            rotate_(keys[:, :, :keys.shape[2] - key.shape[2]], *plan.place)
        values = torch.cat([*prefix_v, value], dim=2)
    else:
        keys, values = key, value

    mask = ctx.random_mask if fold_random else ctx.mask
    if ctx.open_prefix and prefix_k:  # this read needs the mask the context left out: built once per context
        shape = (plan.n_prefix, key.shape[2], query.dtype, query.device)
        mask = ctx.open_masks.get(shape)
        if mask is None:
            mask = ctx.open_masks.setdefault(shape, open_mask(*shape))
    if pad_bias is not None and mask is not None:  # [batch, heads, queries, keys]: the padded slots hidden
        mask = mask + F.pad(pad_bias, (0, mask.shape[-1] - pad_bias.shape[-1]))
    merged = (ctx.topk_end is not None or (ctx.sink_shift is not None and not fold_sinks)
              or (ctx.random_slots is not None and not fold_random) or ctx.bucket_end is not None)
    # LongNet: each head reads only its patterns' keys, taken with their mask per head (`DilatedKeys.take`)
    dilated = ctx.dilated if not (merged or scored) and pad_bias is None else None
    if dilated is None and mask is not None and mask.dim() == 3 and mask.shape[0] != query.shape[1]:
        # LongNet: one row per head offset; head h takes row h mod offsets (as many offsets as heads: the mask as is)
        mask = mask[torch.arange(query.shape[1], device=mask.device) % mask.shape[0]]  # [heads, queries, keys]
    if fold_sinks:  # [batch, heads, queries, keys]: the sink columns (hidden in ctx.mask) carry the sink logits
        assert mask is not None
        mask = sink_buffer(ctx, mask, sink_logits(ctx, mem, query, scale))
    lse = None
    if merged:
        out, lse = attention_with_lse(query, keys, values, mask, scale, ctx.kernel)
        if ctx.bucket_end is not None:
            out, lse = buckets.merge_buckets(config.reading, bank, mem, layer, ctx.topk_start, ctx.bucket_end,
                                             ctx.end_bounds[0], query, out, lse, scale, ctx.kernel)
        if ctx.sink_shift is not None and not fold_sinks:
            out, lse = merge_sinks(ctx, mem, query, out, lse, scale)
        if ctx.random_slots is not None and not fold_random:
            out, lse = merge_random(ctx, mem, query, out, lse, scale)
        if ctx.topk_end is not None:
            out = merge_topk(ctx, mem, query, out, lse, scale)
    elif scored and policy in eviction.NEEDS_ALL_QUERIES:
        out, lse = attention_with_lse(query, keys, values, mask, scale, ctx.kernel)
    else:
        if dilated is not None:
            keys, values, mask = dilated.take(keys, values, query.shape[1])
        out = prefix_causal_sdpa(query, keys, values, mask, scale)
    fresh = None
    if scored:  # the config refuses scored eviction beside top-k, random slots and sinks: lse is this softmax's
        fresh = eviction.attention_scores(config.management, query, keys, mask, scale, lse,
                                          n_memory=plan.n_prefix, n_read=plan.n_read, n_seg=plan.n_seg,
                                          first_id=plan.first_id + plan.n_bank, n_observe=plan.n_observe)
    return out, fresh


def merge_topk(ctx: SegmentContext, mem: LayerMemory, query: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
               scale: float) -> torch.Tensor:
    """Add each query's top-k bank slots, searched in [topk_start, topk_end[query]), to the softmax of `out`/`lse`
    (one softmax over the union)."""
    if ctx.config.reading.chunk_size and ctx.config.reading.chunk_select == "block":  # chunks per query block
        return pages.merge_block_pages(ctx, mem, query, out, lse, scale)
    assert mem.keys is not None and mem.values is not None and ctx.topk_end is not None
    batch, heads, seq, dim = query.shape
    kv_heads = mem.keys.shape[1]
    group = heads // kv_heads
    q = query.reshape(batch, kv_heads, group * seq, dim)  # [batch, kv_heads, group * seq, dim]
    end = ctx.topk_end.repeat(group)  # [group * seq]: q's rows are (group, seq) flattened
    out_rows = out.reshape(batch, kv_heads, group * seq, dim)  # the local read, row for row with q
    lse_rows = lse.reshape(batch, kv_heads, group * seq)
    lo, hi = ctx.topk_start, ctx.end_bounds[1]
    n = hi - lo
    r = ctx.config.reading
    k = min(r.topk, n)
    if mem.faiss is not None:
        # One id range per search: fetch enough to keep k after dropping what lies in a query's own window reach.
        wide = min(n, k + hi - ctx.end_bounds[0])
        logits, idx = mem.faiss.search(q, wide, ctx.plan.first_id, lo, hi)
        logits = logits.masked_fill(idx >= end.view(1, 1, -1, 1), float("-inf"))
        logits, pick = logits.topk(k, dim=-1)
        idx = idx.gather(-1, pick) - lo
    elif r.chunk_size:
        # Chunks are cut over every searchable slot [lo, bank end), as every query of every segment sees them: cut
        # at the furthest limit, a short segment's last chunk would end early and count as wholly before it.
        rep = mem.representative[:, :, lo:] if mem.representative is not None else None
        idx, hit = topk_chunk_slots(q, mem.keys[:, :, lo:], r.topk, r.chunk_size, r.chunk_key, limit=end - lo,
                                    scores=rep, representatives=r.representatives,
                                    keyed=pages.cached_chunk_keys(ctx, mem))
        idx = idx.clamp(max=n - 1)  # found slots lie before each query's limit; the others are masked below
        if ctx.plan.topk_place is None and (merged := picked_read.merge(
                q, mem.keys, mem.values, idx.masked_fill(~hit, -1), lo, None, out_rows, lse_rows, scale)) is not None:
            return merged.reshape(batch, heads, seq, dim)  # slots scored and read in one native pass
        picked_k = gather_slots(mem.keys, idx + lo)  # [batch, kv_heads, g*seq, k, dim]
        logits = torch.einsum("bhqd,bhqkd->bhqk", q, picked_k).masked_fill(~hit, float("-inf"))
    else:
        logits, idx = topk_exact(q, mem.keys[:, :, lo:hi], k, limit=end - lo,
                                 lowest=max(0, ctx.end_bounds[0] - lo))
        # scaled_memory: the picked keys rotated to their slots' scaled positions, scored and read in one native
        # pass (no bank rotation, no gathers); a slot the search did not find (-inf, NaN) is not read.
        if ctx.plan.topk_place is not None and (merged := picked_read.merge(
                q, mem.keys, mem.values, idx.masked_fill(~(logits > float("-inf")), -1), lo, None, out_rows,
                lse_rows, scale, place=ctx.plan.topk_place)) is not None:
            return merged.reshape(batch, heads, seq, dim)
    if ctx.plan.topk_place is None and (merged := picked_read.merge(
            q, None, mem.values, idx, lo, logits, out_rows, lse_rows, scale)) is not None:
        return merged.reshape(batch, heads, seq, dim)  # the picked values read and merged in one native pass
    # The exact search finds every slot it returns (idx >= 0), and its -inf logits stay -inf once scaled: without
    # NaN (masked to -inf as not found) nothing to mask. Off the CPU the mask is built anyway: checking for NaN
    # would be a host sync per layer call.
    exact = (mem.faiss is None and not r.chunk_size and ctx.plan.topk_place is None and scale > 0
             and logits.device.type == "cpu")
    found = None if exact and not bool(logits.isnan().any()) else (idx >= 0) & (logits > float("-inf"))
    idx = idx if found is None else idx.clamp(min=0)
    if ctx.plan.topk_place is not None:  # scaled_memory: attend the picked slots at their scaled positions
        # Rotation is elementwise: rotating the searchable slots then picking equals picking then rotating, bit for
        # bit; rotate whichever is smaller (the slots, unless a few queries decode).
        table_cos, table_sin, where = ctx.plan.topk_place
        if n < idx[0, 0].numel():
            cos, sin = (t.index_select(0, where[lo:hi]) for t in (table_cos, table_sin))  # [n, head_dim]
            picked_k = gather_slots(rotate(mem.keys[:, :, lo:hi], cos, sin), idx)
        else:
            # The tables are shared by every row and head: one index_select, no expanded copy.
            at = where.index_select(0, (idx + lo).flatten())
            cos, sin = (t.index_select(0, at).view(*idx.shape, -1) for t in (table_cos, table_sin))
            picked_k = rotate(gather_slots(mem.keys, idx + lo), cos, sin)
        logits = torch.einsum("bhqd,bhqkd->bhqk", q, picked_k)  # [batch, kv_heads, g*seq, k]
    # Bank slots lo + idx of the whole bank: a slice [lo:hi] of it is not contiguous, and gather_slots would copy it.
    picked_v = gather_slots(mem.values, idx + lo)  # [batch, kv_heads, g*seq, k, dim]
    logits = logits * scale if found is None else (logits * scale).masked_fill(~found, float("-inf"))
    return merge_picked(out_rows, lse_rows, logits, picked_v).reshape(batch, heads, seq, dim)


def merge_picked(out: torch.Tensor, lse: torch.Tensor, logits: torch.Tensor, picked_v: torch.Tensor) -> torch.Tensor:
    """One softmax over [out's keys ; the picked slots] (the PyTorch path of `picked_read`): out [batch, kv_heads,
    rows, dim] and its (finite) log-sum-exp lse [batch, kv_heads, rows], the picked slots' scaled logits [..., rows,
    k] (-inf: not read) and values [..., rows, k, dim] -> the merged output [batch, kv_heads, rows, dim]."""
    joint = torch.cat([lse.to(logits.dtype).unsqueeze(-1), logits], dim=-1)
    total = joint.logsumexp(-1, keepdim=True)  # [batch, kv_heads, rows, 1]
    probs = torch.exp(joint - total)  # [batch, kv_heads, rows, 1 + k]
    out_k = torch.einsum("bhqk,bhqkd->bhqd", probs[..., 1:], picked_v)  # [batch, kv_heads, rows, dim]
    return out * probs[..., :1] + out_k


def merge_random(ctx: SegmentContext, mem: LayerMemory, query: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                 scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Add each query's random bank slots (BigBird, `ctx.random_slots`) to the softmax of `out`/`lse`."""
    assert ctx.random_slots is not None and mem.keys is not None and mem.values is not None
    if ctx.random_blocks is not None:
        return merge_per_block(query, out, lse, mem.keys, mem.values, ctx.random_blocks, scale,
                               index=ctx.random_index, padded=ctx.random_padded)
    batch, kv_heads, _, dim = mem.keys.shape
    idx = ctx.random_slots.clamp(min=0).flatten()  # [queries * R]
    # index_select over the slot axis: cheaper than advanced indexing with the [queries, R] table.
    keys = mem.keys.index_select(2, idx).view(batch, kv_heads, *ctx.random_slots.shape, dim)  # [b, kv, q, R, dim]
    values = mem.values.index_select(2, idx).view(batch, kv_heads, *ctx.random_slots.shape, dim)
    return merge_per_query(query, out, lse, keys, values, ctx.random_slots >= 0, scale)


def merge_per_query(query: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, keys: torch.Tensor,
                    values: torch.Tensor, valid: torch.Tensor | None,
                    scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One softmax over `out`'s keys and per-query extra keys/values [batch, kv_heads, queries or 1, n, dim] (`valid`
    [queries, n] marks the real ones); returns the merged (out, lse)."""
    batch, heads, seq, dim = query.shape
    kv_heads = keys.shape[1]
    q = query.reshape(batch, kv_heads, heads // kv_heads, seq, dim)  # [batch, kv_heads, group, queries, dim]
    logits = torch.einsum("bkgqd,bkqjd->bkgqj", q, keys.to(q.dtype).expand(-1, -1, seq, -1, -1)) * scale
    if valid is not None:
        logits = logits.masked_fill(~valid, float("-inf"))
    # One softmax over [out's keys ; the extra keys]: out's log-sum-exp stands for the first part (always finite: a
    # query reads at least itself, so a query without extra keys keeps out unchanged).
    joint = torch.cat([lse.to(logits.dtype).reshape(batch, kv_heads, -1, seq, 1), logits], dim=-1)
    total = joint.logsumexp(-1, keepdim=True)  # [batch, kv_heads, group, queries, 1]
    probs = torch.exp(joint - total)  # [batch, kv_heads, group, queries, 1 + n]
    out_s = torch.einsum("bkgqj,bkqjd->bkgqd", probs[..., 1:], values.to(q.dtype).expand(-1, -1, seq, -1, -1))
    merged = out.reshape(batch, kv_heads, -1, seq, dim) * probs[..., :1] + out_s
    return merged.reshape(batch, heads, seq, dim), total.reshape(batch, heads, seq)


def merge_per_block(query: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, bank_k: torch.Tensor,
                    bank_v: torch.Tensor, table: torch.Tensor, scale: float, *, index: torch.Tensor | None = None,
                    padded: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Like `merge_per_query` with the extra keys shared by each block of consecutive queries: `table` [blocks, n]
    bank slots per query block (-1: none); returns the merged (out, lse). `index`: the table flattened with -1 read
    as 0, when the caller has it; `padded`: False when the table has no -1 (nothing to hide)."""
    batch, heads, seq, dim = query.shape
    kv_heads = bank_k.shape[1]
    blocks, n = table.shape
    idx = table.clamp(min=0).flatten() if index is None else index  # [blocks * n]
    keys = bank_k.index_select(2, idx).view(batch, kv_heads, blocks, n, dim).to(query.dtype)
    values = bank_v.index_select(2, idx).view(batch, kv_heads, blocks, n, dim).to(query.dtype)
    q = query.reshape(batch, kv_heads, heads // kv_heads, blocks, seq // blocks, dim)  # [b, kv, g, blocks, q, dim]
    logits = torch.einsum("bkgnqd,bknjd->bkgnqj", q, keys) * scale  # [batch, kv_heads, group, blocks, q, n]
    if padded:
        logits = logits.masked_fill((table < 0)[:, None, :], float("-inf"))
    joint = torch.cat([lse.to(logits.dtype).reshape(*logits.shape[:-1], 1), logits], dim=-1)
    total = joint.logsumexp(-1, keepdim=True)  # [batch, kv_heads, group, blocks, q, 1]
    probs = torch.exp(joint - total)
    out_s = torch.einsum("bkgnqj,bknjd->bkgnqd", probs[..., 1:], values)
    merged = out.reshape(out_s.shape) * probs[..., :1] + out_s
    return merged.reshape(batch, heads, seq, dim), total.reshape(batch, heads, seq)


def gather_slots(bank: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Per query, the bank slots `idx` [batch, kv_heads, q, k] of bank [batch, kv_heads, n, dim] -> [..., k, dim]."""
    batch, kv_heads, n, dim = bank.shape
    # One index_select over the bank's rows (half the time of a gather over the expanded [.., q, n, dim] view).
    rows, first = slot_buffer.bank_rows(bank, idx.device)
    flat = rows.index_select(0, (idx + first).flatten())
    return flat.view(*idx.shape, dim)
