"""StreamingLLM's attention sinks read at per-query positions: each query of a rolling cache reads the document's
first G tokens (the globals) as if they sat at positions sink_shift + 0 .. G-1 just before its cache, re-rotated
inside the cache (Xiao et al., 2023; `injection.sink_shift`).

The read is folded into the one fused call where it can be (`sink_buffer`: zero keys whose logits fill the mask's
sink columns, `sink_logits`), or merged into a finished softmax through its log-sum-exp (`merge_sinks`).
"""

from __future__ import annotations

import torch
from transformers.models.llama.modeling_llama import rotate_half

from unimem_bench.methods.engine.kernels import rotate
from unimem_bench.methods.engine.memory import LayerMemory
from unimem_bench.methods.engine.plan import SegmentContext


def merge_sinks(ctx: SegmentContext, mem: LayerMemory, query: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Add the document globals (attention sinks) at per-query positions sink_shift + 0 .. G-1 to the softmax of
    `out`/`lse` (StreamingLLM's rolling cache, re-rotated inside the cache); returns the merged (out, lse)."""
    assert mem.global_values is not None
    batch, heads, seq, dim = query.shape
    kv_heads = mem.global_values.shape[1]
    logits = sink_logits(ctx, mem, query, scale).reshape(batch, kv_heads, -1, mem.global_values.shape[2])
    # One softmax over [this attention's keys ; the globals]: its log-sum-exp stands for the first part.
    joint = torch.cat([lse.to(logits.dtype).reshape(batch, kv_heads, -1, 1), logits], dim=-1)
    total = joint.logsumexp(-1, keepdim=True)  # [batch, kv_heads, group * seq, 1]
    probs = torch.exp(joint - total)  # [batch, kv_heads, group * seq, 1 + globals]
    out_s = torch.matmul(probs[..., 1:], mem.global_values.to(query.dtype))  # [batch, kv_heads, group * seq, dim]
    merged = out.reshape(batch, kv_heads, -1, dim) * probs[..., :1] + out_s
    return merged.reshape(batch, heads, seq, dim), total.reshape(batch, heads, seq)


def sink_logits(ctx: SegmentContext, mem: LayerMemory, query: torch.Tensor, scale: float) -> torch.Tensor:
    """Each query's scaled logits [batch, heads, seq, G] of the document globals at its positions sink_shift + 0 ..
    G-1."""
    assert ctx.sink_rotation is not None
    batch, heads, seq, dim = query.shape
    keys = placed_sinks(ctx, mem, query.dtype, scale)  # [batch, kv_heads, globals, 2 * dim], scaled
    rows = keys.shape[0] * keys.shape[1]
    # q . R(s) k = [q cos(s) ; q sin(s)] . [k ; rotate_half(k)]: each query reads the globals moved up by its shift.
    turned = (torch.cat([query, query], dim=-1) * ctx.sink_rotation).reshape(rows, -1, 2 * dim)
    # The G globals as the product's rows, not its columns: MKL's batched product takes 11 us against 27-50 us
    # with 4 output columns ([2, 256, 80] x [2, 80, 4], one thread).
    logits = torch.bmm(keys.view(rows, -1, 2 * dim), turned.transpose(1, 2))  # [batch * kv_heads, G, group * seq]
    return logits.transpose(1, 2).reshape(batch, heads, seq, -1)


def sink_buffer(ctx: SegmentContext, like: torch.Tensor, logits: torch.Tensor | None) -> torch.Tensor:
    """What the folded sinks read, kept per context and shape (`SegmentContext.sink_buffers`), so no layer builds it
    again: with `logits` None, zero keys shaped as `like` (the globals [batch, kv_heads, G, dim]); else the mask
    `like` [queries, keys] as [batch, heads, queries, keys], its G sink columns (hidden in `like`) overwritten with
    `logits` [batch, heads, queries, G] (its other columns copied once)."""
    shape = tuple(like.shape if logits is None else (*logits.shape[:2], *like.shape))
    key = (shape, like.dtype, logits is None)
    hit = ctx.sink_buffers.get(key)
    if hit is None or hit[0] is not like and logits is not None:
        made = torch.zeros_like(like) if logits is None else like.expand(shape).clone()
        hit = ctx.sink_buffers[key] = (like, made)
    if logits is not None:
        hit[1][..., :logits.shape[-1]].copy_(logits)
    return hit[1]


def placed_sinks(ctx: SegmentContext, mem: LayerMemory, dtype: torch.dtype, scale: float) -> torch.Tensor:
    """The layer's global keys at positions 0 .. G-1 as [k ; rotate_half(k)] x scale: [batch, kv_heads, G, 2 * dim],
    built once while the globals stay the same tensor (`SegmentContext.sink_keys`)."""
    assert mem.global_keys is not None and ctx.plan.place is not None
    key = (id(mem.global_keys), dtype, scale)
    hit = ctx.sink_keys.get(key)
    if hit is not None and hit[0] is mem.global_keys:
        return hit[1]
    cos, sin = (t[:ctx.plan.n_global] for t in ctx.plan.place)  # [globals, head_dim]
    placed = rotate(mem.global_keys.to(dtype), cos, sin)  # [batch, kv_heads, globals, dim]
    keys = torch.cat([placed, rotate_half(placed)], dim=-1) * scale
    if not keys.requires_grad:  # a graph is not kept across segments
        if len(ctx.sink_keys) >= 64:
            ctx.sink_keys.clear()
        ctx.sink_keys[key] = (mem.global_keys, keys)
    return keys
