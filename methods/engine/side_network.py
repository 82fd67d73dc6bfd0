"""LongMem's residual SideNet (Wang et al., 2023, arXiv 2306.07174): a trainable side network over a frozen backbone.

The backbone reads the segment alone and writes the keys/values of one layer (`injection.layers`) to a cached bank;
the side layers, copies of every other backbone layer, follow the backbone's hidden states through cross-network
residuals (side layer i adds H[hi] - H[lo] of the backbone layers it spans, official `transformer_decoder_sidenet`),
and one of them (`injection.side_fusion`) reads the bank by token-to-chunk retrieval with unrotated queries and keys
(memory keys carry no positions) and fuses memory and local attention per head through a learned gate:
out = sigmoid(g) A_mem + (1 - sigmoid(g)) A_local (official `JointMultiheadAttentionWeightedSum`, `memory_bias`).

The residual is computed as the side network's difference d from the backbone (x_i = H[lo_i] + d_i), the same sum in
another order: side layers that add nothing keep d exactly 0, so an `identity` SideNet gives the backbone's logits
bit for bit, and a closed gate (g = -inf) gives local attention exactly.
"""

from __future__ import annotations

import copy
import weakref
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers.models.llama.modeling_llama import rotate_half

from unimem_bench.methods.config import UniMemConfig
from unimem_bench.methods.engine import picked_read, slot_buffer
from unimem_bench.methods.engine.attention import gather_slots
from unimem_bench.methods.engine.memory import LayerMemory
from unimem_bench.methods.engine.plan import SegmentPlan
from unimem_bench.methods.engine.retrieval import chunk_keys, topk_chunk_slots

SCORE_BLOCK = 1 << 22
"""Scores per step of the chunk search (16 MiB in fp32): glibc serves a freed block again up to its 32 MiB mmap
threshold, while each larger one is mapped afresh and page-faulted (the 62M model's 8 heads x 128 queries x 8,192
chunks were 32 MiB a step)."""


class SideNetwork(nn.Module):
    """The side layers, their final norm and the fusion gate; the backbone is only read, never owned."""

    def __init__(self, decoder: nn.Module, config: UniMemConfig) -> None:
        super().__init__()
        inj = config.injection
        self.config = config
        backbone = cast(nn.ModuleList, decoder.get_submodule("layers"))
        self.spans = inj.side_spans(len(backbone))
        (self.source,) = inj.resolve(len(backbone))
        self.fusion = inj.side_fusion
        self.topk = config.reading.topk
        # chunk_size 0 is token-level top-k: chunks of one slot.
        self.chunk = config.reading.chunk_size or 1
        self.chunk_key = config.reading.chunk_key
        self.chunks = ChunkKeyCache(config, self.chunk)
        # Side layer i starts from the last backbone layer of its span (official: backbone layer 2i + 1).
        self.layers = nn.ModuleList(copy.deepcopy(backbone[hi - 1]) for _, hi in self.spans)
        self.norm = copy.deepcopy(decoder.get_submodule("norm"))
        attn: Any = self.layers[self.fusion].get_submodule("self_attn")  # a transformers attention module
        heads = int(attn.config.num_attention_heads)
        weight = attn.get_submodule("q_proj").get_parameter("weight")
        self.gate = nn.Parameter(torch.full((heads,), inj.side_gate, dtype=weight.dtype, device=weight.device))
        for p in self.parameters():
            p.requires_grad_(True)
        if inj.side_init == "identity":
            with torch.no_grad():
                for layer in self.layers:
                    for name in ("self_attn.o_proj", "mlp.down_proj"):
                        for p in layer.get_submodule(name).parameters():
                            p.zero_()

    def forward(self, model: PreTrainedModel, bank: LayerMemory, plan: SegmentPlan, embeds: torch.Tensor,
                positions: torch.Tensor) -> torch.Tensor:
        """Logits [batch, n, vocab] of one segment; writes the backbone's memory-layer keys/values to `bank`."""
        decoder: Any = model.get_decoder()
        source: Any = decoder.get_submodule("layers")[self.source].get_submodule("self_attn")
        with ProjectionTap(source, keep=plan.n_new > 0) as tap:  # the memory layer's keys/values, as computed
            hidden = backbone_states(decoder, embeds, positions)  # n_layers + 1 x [batch, n, hidden]
        pe = decoder.get_submodule("rotary_emb")(embeds, positions)  # (cos, sin) [batch, n, head_dim]
        mem_k, mem_v = bank.keys, bank.values  # [batch, kv_heads, slots, head_dim], read before this write
        delta: torch.Tensor | None = None
        for i, (layer, (lo, _)) in enumerate(zip(self.layers, self.spans, strict=True)):
            x = hidden[lo] if delta is None else hidden[lo] + delta
            if i == self.fusion:
                out = self.fused_layer(layer, x, pe, mem_k, mem_v, self.chunks.get(mem_k, self.chunk_key))
            else:
                out = layer(x, attention_mask=None, position_ids=positions, position_embeddings=pe)
            delta = out - hidden[lo]
        final = hidden[-1] if delta is None else hidden[-1] + delta
        if plan.n_new:
            keys, values = tap.keys_values()
            bank.write(plan, self.config, keys, values)
            self.chunks.written(plan, mem_k, keys, bank.keys, self.chunk_key)
        return model.get_output_embeddings()(self.norm(final))

    def fused_layer(self, layer: nn.Module, x: torch.Tensor, pe: tuple[torch.Tensor, torch.Tensor],
                    mem_k: torch.Tensor | None, mem_v: torch.Tensor | None,
                    chunked: torch.Tensor | None = None) -> torch.Tensor:
        """The memory-augmented side layer: a LLaMA-family decoder layer whose attention is LongMem's joint
        attention (`chunked`: the bank's chunk keys, when kept)."""
        attn: Any = layer.get_submodule("self_attn")
        q, k, v = projections(attn, layer.get_submodule("input_layernorm")(x))  # [batch, (kv_)heads, n, dim]
        out = joint_attention(q, k, v, mem_k, mem_v, self.gate, pe, scale=float(attn.scaling), topk=self.topk,
                              chunk=self.chunk, chunk_key=self.chunk_key, chunked=chunked)  # [batch, heads, n, dim]
        h = x + attn.get_submodule("o_proj")(out.transpose(1, 2).flatten(2))
        return h + layer.get_submodule("mlp")(layer.get_submodule("post_attention_layernorm")(h))


def backbone_states(decoder: nn.Module, embeds: torch.Tensor, positions: torch.Tensor) -> list[torch.Tensor]:
    """The frozen backbone on the segment alone: [embeddings, output of layer 0, ..., output of the last layer]."""
    states = [embeds.detach()]
    hooks = [layer.register_forward_hook(lambda _m, _a, out: states.append(out[0] if isinstance(out, tuple) else out))
             for layer in cast(nn.ModuleList, decoder.get_submodule("layers"))]
    try:
        with torch.no_grad():
            decoder(inputs_embeds=embeds, position_ids=positions, use_cache=False)
    finally:
        for hook in hooks:
            hook.remove()
    return states


def projections(attn: Any, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Unrotated q [batch, heads, n, dim], k and v [batch, kv_heads, n, dim] of an attention module (q/k norms of
    Qwen3 applied)."""
    shape = (*h.shape[:-1], -1, int(attn.head_dim))
    q = attn.get_submodule("q_proj")(h).view(shape)
    k = attn.get_submodule("k_proj")(h).view(shape)
    v = attn.get_submodule("v_proj")(h).view(shape)
    if hasattr(attn, "q_norm"):
        q, k = attn.get_submodule("q_norm")(q), attn.get_submodule("k_norm")(k)
    return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)


def joint_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mem_k: torch.Tensor | None,
                    mem_v: torch.Tensor | None, gate: torch.Tensor, pe: tuple[torch.Tensor, torch.Tensor], *,
                    scale: float, topk: int, chunk: int, chunk_key: str = "mean",
                    chunked: torch.Tensor | None = None) -> torch.Tensor:
    """LongMem's joint attention: causal local attention at RoPE positions, memory attention over each head's best
    topk / chunk chunks (unrotated, own softmax), mixed per head by sigmoid(gate); local alone while memory is empty.

    q [batch, heads, n, dim] and k, v [batch, kv_heads, n, dim] unrotated; mem_k, mem_v [batch, kv_heads, slots,
    dim]; gate [heads]; pe (cos, sin) [batch, n, dim]. Returns [batch, heads, n, dim].
    """
    cos, sin = pe[0].unsqueeze(1), pe[1].unsqueeze(1)  # [batch, 1, n, dim]
    q_rot, k_rot = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
    local = F.scaled_dot_product_attention(q_rot, k_rot, v, is_causal=True, scale=scale,
                                           enable_gqa=q.shape[1] != k.shape[1])  # [batch, heads, n, dim]
    if mem_k is None or mem_v is None or not mem_k.shape[2]:
        return local
    memory = memory_attention(q, mem_k, mem_v, scale=scale, topk=topk, chunk=chunk, chunk_key=chunk_key,
                              chunked=chunked)
    g = torch.sigmoid(gate).view(1, -1, 1, 1).to(local.dtype)  # [1, heads, 1, 1]
    return (1 - g) * local + g * memory


def memory_attention(q: torch.Tensor, mem_k: torch.Tensor, mem_v: torch.Tensor, *, scale: float, topk: int,
                     chunk: int, chunk_key: str = "mean", chunked: torch.Tensor | None = None) -> torch.Tensor:
    """Each query head's softmax over the slots of its best topk / chunk chunks (LongMem's token-to-chunk
    retrieval, chunks ranked by their mean key; `chunked`: those chunk keys when kept); q [batch, heads, n, dim] ->
    [batch, heads, n, dim]."""
    batch, heads, n, dim = q.shape
    kv_heads = mem_k.shape[1]
    grouped = q.reshape(batch, kv_heads, heads // kv_heads * n, dim)  # [batch, kv_heads, group * n, dim]
    # Chunk keys scored per step: at most SCORE_BLOCK scores, so the block stays in glibc's reused heap.
    block = max(256, SCORE_BLOCK // (batch * heads * n))
    # [batch, kv_heads, group * n, k]
    slots, found = topk_chunk_slots(grouped, mem_k, topk, chunk, chunk_key, keyed=chunked, block=block)
    read = picked_read.merge(grouped, mem_k, mem_v, slots.masked_fill(~found, -1), 0, None, None, None, scale)
    if read is not None:  # slots scored and read in one native pass (CPU, no autograd)
        return read.reshape(batch, heads, n, dim)
    keys, values = gather_slots(mem_k, slots), gather_slots(mem_v, slots)  # [batch, kv_heads, group * n, k, dim]
    logits = torch.einsum("bhqd,bhqkd->bhqk", grouped, keys) * scale
    weights = torch.softmax(logits.masked_fill(~found, float("-inf")), dim=-1)
    out = torch.einsum("bhqk,bhqkd->bhqd", weights, values)  # [batch, kv_heads, group * n, dim]
    return out.reshape(batch, heads, n, dim)


class ProjectionTap:
    """Keeps the key and value projections [batch, n, kv_heads * dim] an attention module computes while open (the
    backbone's memory layer: its keys/values are the ones it attended with, not computed a second time)."""

    def __init__(self, attn: Any, keep: bool) -> None:
        self.attn, self.keep = attn, keep
        self.out: dict[str, torch.Tensor] = {}
        self.hooks: list[Any] = []

    def __enter__(self) -> ProjectionTap:
        if self.keep:
            self.hooks = [self.attn.get_submodule(name).register_forward_hook(
                lambda _m, _a, out, name=name: self.out.__setitem__(name, out)) for name in ("k_proj", "v_proj")]
        return self

    def __exit__(self, *exc: object) -> None:
        for hook in self.hooks:
            hook.remove()

    def keys_values(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Unrotated keys and values [batch, kv_heads, n, dim], as `memory_kv` computes them (k_norm applied)."""
        attn = self.attn
        k, v = (self.out[name].unflatten(-1, (-1, int(attn.head_dim))) for name in ("k_proj", "v_proj"))
        if hasattr(attn, "k_norm"):
            k = attn.get_submodule("k_norm")(k)
        return k.transpose(1, 2), v.transpose(1, 2)


class ChunkKeyCache:
    """The bank's chunk keys (`retrieval.chunk_keys`) carried from one segment to the next: a FIFO write keeps the
    old chunks after the evicted ones and appends the new slots' chunks, so only those are computed, while every
    held chunk is whole (bank and eviction multiples of the chunk). Anything else (a bank this cache did not see
    written, a partial chunk, another management) computes them all on the next read."""

    def __init__(self, config: UniMemConfig, chunk: int) -> None:
        m, w = config.management, config.writing
        self.chunk = chunk
        # The writes of `LayerMemory.write`'s plain path: no scored or budgeted eviction, no pooling.
        self.fifo = not (m.scored or m.budgeted) and w.kv == "direct" and not w.pooled_tier
        self.bank: weakref.ref[torch.Tensor] | None = None  # the bank keys `value` belongs to (not kept alive)
        self.value: torch.Tensor | None = None  # [batch, kv_heads, chunks, dim] (2 * dim for bounds)
        self.buffer: slot_buffer.SlotBuffer | None = None  # behind `value`: new chunks appended in place
        self.limit = -(-m.size // chunk)  # the most chunks a bank of the memory's size holds

    def get(self, keys: torch.Tensor | None, kind: str) -> torch.Tensor | None:
        """The chunk keys of bank keys [batch, kv_heads, slots, dim], computed unless kept for this very tensor."""
        if keys is None or not keys.shape[2]:
            return None
        if self.bank is None or self.bank() is not keys:
            self.value, self.bank, self.buffer = chunk_keys(keys, self.chunk, kind), weakref.ref(keys), None
        return self.value

    def written(self, plan: SegmentPlan, old: torch.Tensor | None, new: torch.Tensor, bank: torch.Tensor | None,
                kind: str) -> None:
        """After `bank = [old[drop_old:] ; new[drop_new:]]` (the FIFO write of `memory.LayerMemory.write`)."""
        kept = self.value if old is not None and self.bank is not None and self.bank() is old else None
        held = 0 if old is None else old.shape[2]
        c = self.chunk
        if (bank is None or not self.fifo or plan.to_global or (held and kept is None) or held % c
                or plan.drop_old % c):
            self.bank = self.value = self.buffer = None
            return
        fresh = chunk_keys(new[:, :, plan.drop_new:], c, kind)
        self.buffer, self.value = slot_buffer.append(self.buffer, kept, plan.drop_old // c, fresh, self.limit)
        self.bank = weakref.ref(bank)
