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

import torch
import torch.nn.functional as F
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.models.llama.modeling_llama import rotate_half

from unimem_bench.methods.engine import buckets, budgets, eviction
from unimem_bench.methods.engine.memory import LayerMemory
from unimem_bench.methods.engine.plan import SegmentContext
from unimem_bench.methods.engine.retrieval import representative_scores, topk_chunk_slots, topk_exact

ATTENTION_NAME = "unimem"

# Query rows per block of the manual (log-sum-exp) attention: bounds each [rows x keys] score block.
QUERY_CHUNK = 1024

# PyTorch's fused CPU flash attention, which also returns the log-sum-exp (a private op: absent -> manual path).
CPU_FLASH_WITH_LSE = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE with transformers' own half-rotation convention: x [..., n, dim], cos/sin [n, dim]."""
    return x * cos + rotate_half(x) * sin


def rotate_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """`rotate` in place on x (a fresh tensor or a view of one), the same operations in the same order: one
    temporary the size of x instead of four (x is the whole memory when a compact memory is read)."""
    turned = rotate_half(x).mul_(sin)
    return x.mul_(cos).add_(turned)


def unimem_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    unimem: SegmentContext | None = None,
    **kwargs: object,
) -> tuple[torch.Tensor, None]:
    """The registered attention function: q [batch, heads, seq, dim], k/v [batch, kv_heads, seq, dim]."""
    if unimem is None or module.layer_idx not in unimem.layers:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    if unimem.dense is not None and module.layer_idx in unimem.config.reading.dense_layers:
        unimem = unimem.dense
    out = memory_attention(unimem, module.layer_idx, query, key, value, scale)
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
    pad_bias = None
    prefix_k: list[torch.Tensor] = []
    prefix_v: list[torch.Tensor] = []
    if plan.n_global:
        if plan.globals_in_bank:
            prefix_k.append(mem.keys[:, :, :plan.n_global])
            prefix_v.append(mem.values[:, :, :plan.n_global])
        else:
            prefix_k.append(mem.global_keys)
            prefix_v.append(mem.global_values)
    if plan.n_tier:
        prefix_k.append(mem.tier_keys)
        prefix_v.append(mem.tier_values)
    if plan.n_window and mem.depth is not None:  # per-layer/per-head budgets: padded to the widest bank, masked
        ids = budgets.left_pad(mem.ids, plan.n_bank, -1, key[:, :, :0, 0].long())
        prefix_k.append(budgets.left_pad(mem.keys, plan.n_bank, 0.0, key[:, :, :0]))
        prefix_v.append(budgets.left_pad(mem.values, plan.n_bank, 0.0, value[:, :, :0]))
        pad_bias = budgets.padding_bias(ids, query.shape[1], query.dtype)
    elif plan.n_window:
        prefix_k.append(mem.keys[:, :, plan.n_bank - plan.n_window:])
        prefix_v.append(mem.values[:, :, plan.n_bank - plan.n_window:])
    if prefix_k:
        keys = torch.cat([*prefix_k, key], dim=2)  # [batch, kv_heads, prefix + seq, dim]
        if plan.place is not None:  # compact: stored keys (position 0) moved to positions 0 .. prefix - 1
            rotate_(keys[:, :, :keys.shape[2] - key.shape[2]], *plan.place)
        values = torch.cat([*prefix_v, value], dim=2)
    else:
        keys, values = key, value

    policy = config.management.eviction
    # Score-based eviction by attention: the segment's attention evidence, for the write below.
    scored = first_call and plan.write and plan.n_new > 0 and policy in (*eviction.NEEDS_ALL_QUERIES,
                                                                         *eviction.NEEDS_LAST_QUERIES)
    mask = ctx.mask
    if pad_bias is not None and mask is not None:  # [batch, heads, queries, keys]: the padded slots hidden
        mask = mask + F.pad(pad_bias, (0, mask.shape[-1] - pad_bias.shape[-1]))
    if mask is not None and mask.dim() == 3 and mask.shape[0] != query.shape[1]:
        # LongNet: one row per head offset; head h takes row h mod offsets (as many offsets as heads: the mask as is)
        mask = mask[torch.arange(query.shape[1], device=mask.device) % mask.shape[0]]  # [heads, queries, keys]
    lse = None
    if (ctx.topk_end is not None or ctx.sink_shift is not None or ctx.random_slots is not None
            or ctx.bucket_end is not None):
        out, lse = attention_with_lse(query, keys, values, mask, scale)
        if ctx.bucket_end is not None:
            out, lse = buckets.merge_buckets(config.reading, bank, mem, layer, ctx.topk_start, ctx.bucket_end, query,
                                             out, lse, scale)
        if ctx.sink_shift is not None:
            out, lse = merge_sinks(ctx, mem, query, out, lse, scale)
        if ctx.random_slots is not None:
            out, lse = merge_random(ctx, mem, query, out, lse, scale)
        if ctx.topk_end is not None:
            out = merge_topk(ctx, mem, query, out, lse, scale)
    elif scored and policy in eviction.NEEDS_ALL_QUERIES:
        out, lse = attention_with_lse(query, keys, values, mask, scale)
    else:
        out = prefix_causal_sdpa(query, keys, values, mask, scale)
    fresh = None
    if scored:  # the config refuses scored eviction beside top-k, random slots and sinks: lse is this softmax's
        fresh = eviction.attention_scores(config.management, query, keys, mask, scale, lse,
                                          n_memory=plan.n_prefix, n_read=plan.n_read, n_seg=plan.n_seg,
                                          first_id=plan.first_id + plan.n_bank, n_observe=plan.n_observe)
    del keys, values, mem  # [memory ; segment] copies: freed before the write, whose eviction copies the memory too

    if plan.write and (plan.n_new or plan.to_global):
        seg = slice(plan.n_read, plan.n_read + plan.n_seg)
        seg_k = key[:, :, seg]
        if plan.store is not None:
            # Store keys unrotated (position 0): undo RoPE at the positions the segment had in this input.
            cos, sin = (t[seg] for t in plan.store)
            seg_k = rotate(seg_k, cos, -sin) / plan.rope_scale**2
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
                seg_k = rotate(seg_k, cos, -sin) / plan.rope_scale**2
            buckets.write_centroids(config.reading, bank, layer, query[:, :, seg], seg_k)
    return out.to(query.dtype)  # the fused CPU kernel's float32 log-sum-exp must not promote the output


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
                       scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Like `prefix_causal_sdpa`, also returning the log-sum-exp [batch, heads, seq] of the scaled scores.

    On CPU, PyTorch's fused flash kernel returns the log-sum-exp itself; elsewhere the query heads of each KV head
    are grouped (keys never repeated) and query rows go in blocks of QUERY_CHUNK, bounding each score block.
    """
    batch, heads, seq, dim = query.shape
    kv_heads = keys.shape[1]
    group = heads // kv_heads
    if query.device.type == "cpu" and CPU_FLASH_WITH_LSE is not None:
        flat = mask.unsqueeze(0) if mask is not None and mask.dim() == 3 else mask  # per-head: [1, heads, ...]
        if group == 1:
            return CPU_FLASH_WITH_LSE(query, keys, values, 0.0, mask is None, attn_mask=flat, scale=scale)[:2]
        # The fused op has no GQA switch: one call per KV head, its keys expanded to the group as a stride-0 view
        # (repeating them copied the whole memory `group` times, the largest transient of an eviction run).
        parts = []
        for h in range(kv_heads):
            heads_h = slice(h * group, (h + 1) * group)
            mask_h = flat[:, heads_h] if flat is not None and flat.dim() == 4 and flat.shape[1] > 1 else flat
            k = keys[:, h:h + 1].expand(-1, group, -1, -1)  # [batch, group, keys, dim], no copy
            v = values[:, h:h + 1].expand(-1, group, -1, -1)
            parts.append(CPU_FLASH_WITH_LSE(query[:, heads_h], k, v, 0.0, mask is None, attn_mask=mask_h,
                                            scale=scale)[:2])
        return torch.cat([o for o, _ in parts], dim=1), torch.cat([lse for _, lse in parts], dim=1)
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


def merge_topk(ctx: SegmentContext, mem: LayerMemory, query: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
               scale: float) -> torch.Tensor:
    """Add each query's top-k bank slots, searched in [topk_start, topk_end[query]), to the softmax of `out`/`lse`
    (one softmax over the union)."""
    batch, heads, seq, dim = query.shape
    kv_heads = mem.keys.shape[1]
    group = heads // kv_heads
    q = query.reshape(batch, kv_heads, group * seq, dim)  # [batch, kv_heads, group * seq, dim]
    end = ctx.topk_end.repeat(group)  # [group * seq]: q's rows are (group, seq) flattened
    lo, hi = ctx.topk_start, int(end.max())
    n = hi - lo
    r = ctx.config.reading
    k = min(r.topk, n)
    if mem.faiss is not None:
        # One id range per search: fetch enough to keep k after dropping what lies in a query's own window reach.
        wide = min(n, k + hi - int(end.min()))
        logits, idx = mem.faiss.search(q, wide, ctx.plan.first_id, lo, hi)
        logits = logits.masked_fill(idx >= end.view(1, 1, -1, 1), float("-inf"))
        logits, pick = logits.topk(k, dim=-1)
        idx = idx.gather(-1, pick) - lo
    elif r.chunk_size:
        # Chunks are cut over every searchable slot [lo, bank end), as every query of every segment sees them: cut
        # at the furthest limit, a short segment's last chunk would end early and count as wholly before it.
        rep = mem.representative[:, :, lo:] if mem.representative is not None else None
        idx, found = topk_chunk_slots(q, mem.keys[:, :, lo:], r.topk, r.chunk_size, r.chunk_key, limit=end - lo,
                                      scores=rep, representatives=r.representatives)
        idx = idx.clamp(max=n - 1)  # found slots lie before each query's limit; the others are masked below
        picked_k = gather_slots(mem.keys, idx + lo)  # [batch, kv_heads, g*seq, k, dim]
        logits = torch.einsum("bhqd,bhqkd->bhqk", q, picked_k).masked_fill(~found, float("-inf"))
    else:
        logits, idx = topk_exact(q, mem.keys[:, :, lo:hi], k, limit=end - lo)
    found = (idx >= 0) & (logits > float("-inf"))
    idx = idx.clamp(min=0)
    if ctx.plan.topk_place is not None:  # scaled_memory: attend the picked slots at their scaled positions
        # Rotation is elementwise: rotating the searchable slots then picking equals picking then rotating, bit for
        # bit; rotate whichever is smaller (the slots, unless a few queries decode).
        if n < idx[0, 0].numel():
            cos, sin = (t[lo:hi] for t in ctx.plan.topk_place)  # [n, head_dim]
            picked_k = gather_slots(rotate(mem.keys[:, :, lo:hi], cos, sin), idx)
        else:
            # The tables [slots, head_dim] are shared by every row and head: one index_select, no expanded copy.
            cos, sin = (t.index_select(0, (idx + lo).flatten()).view(*idx.shape, -1) for t in ctx.plan.topk_place)
            picked_k = rotate(gather_slots(mem.keys, idx + lo), cos, sin)
        logits = torch.einsum("bhqd,bhqkd->bhqk", q, picked_k)  # [batch, kv_heads, g*seq, k]
    # Bank slots lo + idx of the whole bank: a slice [lo:hi] of it is not contiguous, and gather_slots would copy it.
    picked_v = gather_slots(mem.values, idx + lo)  # [batch, kv_heads, g*seq, k, dim]
    logits = (logits * scale).masked_fill(~found, float("-inf"))
    # One softmax over [out's keys ; the picked slots]: out's (finite) log-sum-exp stands for the first part.
    joint = torch.cat([lse.to(logits.dtype).reshape(batch, kv_heads, group * seq, 1), logits], dim=-1)
    total = joint.logsumexp(-1, keepdim=True)  # [batch, kv_heads, g*seq, 1]
    probs = torch.exp(joint - total)  # [batch, kv_heads, g*seq, 1 + k]
    out_k = torch.einsum("bhqk,bhqkd->bhqd", probs[..., 1:], picked_v)  # [batch, kv_heads, g*seq, dim]
    merged = out.reshape(batch, kv_heads, group * seq, dim) * probs[..., :1] + out_k
    return merged.reshape(batch, heads, seq, dim)


def merge_sinks(ctx: SegmentContext, mem: LayerMemory, query: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Add the document globals (attention sinks) at per-query positions sink_shift + 0 .. G-1 to the softmax of
    `out`/`lse` (StreamingLLM's rolling cache, re-rotated inside the cache); returns the merged (out, lse)."""
    plan = ctx.plan
    assert ctx.sink_unshift is not None and plan.place is not None and mem.global_keys is not None
    assert mem.global_values is not None
    batch, heads, seq, dim = query.shape
    kv_heads = mem.global_keys.shape[1]
    # q(p) . k(s + j) = q(p - s) . k(j): each query rotated back by its shift reads the globals at 0 .. G-1.
    cos, sin = (t[:plan.n_global] for t in plan.place)  # [globals, head_dim]
    keys = rotate(mem.global_keys.to(query.dtype), cos, sin)  # [batch, kv_heads, globals, dim]
    back = rotate(query, *ctx.sink_unshift).reshape(batch, kv_heads, -1, dim)  # [batch, kv_heads, group * seq, dim]
    logits = torch.matmul(back, keys.transpose(-1, -2)) * scale  # [batch, kv_heads, group * seq, globals]
    # One softmax over [this attention's keys ; the globals]: its log-sum-exp stands for the first part.
    joint = torch.cat([lse.to(logits.dtype).reshape(batch, kv_heads, -1, 1), logits], dim=-1)
    total = joint.logsumexp(-1, keepdim=True)  # [batch, kv_heads, group * seq, 1]
    probs = torch.exp(joint - total)  # [batch, kv_heads, group * seq, 1 + globals]
    out_s = torch.matmul(probs[..., 1:], mem.global_values.to(query.dtype))  # [batch, kv_heads, group * seq, dim]
    merged = out.reshape(batch, kv_heads, -1, dim) * probs[..., :1] + out_s
    return merged.reshape(batch, heads, seq, dim), total.reshape(batch, heads, seq)


def merge_random(ctx: SegmentContext, mem: LayerMemory, query: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                 scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Add each query's random bank slots (BigBird, `ctx.random_slots`) to the softmax of `out`/`lse`."""
    assert ctx.random_slots is not None and mem.keys is not None and mem.values is not None
    if ctx.random_blocks is not None:
        return merge_per_block(query, out, lse, mem.keys, mem.values, ctx.random_blocks, scale)
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
                    bank_v: torch.Tensor, table: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Like `merge_per_query` with the extra keys shared by each block of consecutive queries: `table` [blocks, n]
    bank slots per query block (-1: none); returns the merged (out, lse)."""
    batch, heads, seq, dim = query.shape
    kv_heads = bank_k.shape[1]
    blocks, n = table.shape
    idx = table.clamp(min=0).flatten()  # [blocks * n]
    keys = bank_k.index_select(2, idx).view(batch, kv_heads, blocks, n, dim).to(query.dtype)
    values = bank_v.index_select(2, idx).view(batch, kv_heads, blocks, n, dim).to(query.dtype)
    q = query.reshape(batch, kv_heads, heads // kv_heads, blocks, seq // blocks, dim)  # [b, kv, g, blocks, q, dim]
    logits = torch.einsum("bkgnqd,bknjd->bkgnqj", q, keys) * scale  # [batch, kv_heads, group, blocks, q, n]
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
    rows = torch.arange(batch * kv_heads, device=idx.device).view(batch, kv_heads, 1, 1) * n
    flat = bank.reshape(batch * kv_heads * n, dim).index_select(0, (idx + rows).flatten())
    return flat.view(*idx.shape, dim)
