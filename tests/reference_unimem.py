"""An independent float64 reference of UniMem (Fang et al., 2024, arXiv 2402.03009) for the engine's exactness tests.

Written from the paper's equations and the official code (thunlp/UniMem, `MemoryLayer` in its modeling_llama.py),
never from the engine, which it does not import: a LLaMA decoder computed by hand from a state dict (RMSNorm, RoPE,
grouped-query attention, SwiGLU), and UniMem's Eq. 9 as explicit loops: every query of every head builds its own list
of visible (key, value) pairs from an explicit Python list of memory slots per layer, then takes one softmax.

- Transformer-XL (Eq. 3, 10): the window, the most recent memory slots read by position; `sliding` lets 0-based
  query i reach only the last min(W - i, slots) of them (the official `_generate_window_mask_for_chunk`: the W
  tokens before it, plus itself), `stride` s keeps the slots whose memory index is congruent to i mod s.
- Memorizing Transformer (Eq. 5, 11-13): per query and head, the k memory slots with the largest dot product among
  those before the query's window reach (official `_generate_topk_index_out_of_windows` searches outside each
  query's window; globals excluded), in the same softmax as the local segment (the paper's gate is its split).
- RMT (Eq. 6, 14): m read slots before the segment and m write slots after it, causal; the next read slots are the
  final-norm outputs at the write slots (the official `update_rmt_memory` takes them after `self.norm`), and the
  next write slots are those outputs too (`memory`) or the learned embeddings again (`learned`). The first segment
  reads the learned embeddings (the official code has no read slots in its first segment).
- Longformer (Eq. 8, 15): the window plus G global slots every query sees: the document's first G tokens (from as
  many first segments as they span), pinned and never written to memory (`document`), or the first G slots of the
  current memory (`memory`, official), the window then being the last W of the slots after them.
- Management: `fifo` drops the oldest slots; `clear` (official `reset`) empties a memory the segment would overflow
  and writes nothing of it; `clear-and-write` empties it, then writes the segment. An empty memory always takes a
  write (its last `size` slots). Pooling writes the mean of every `pool_ratio` consecutive tokens (a shorter last
  group on its own).
- Positions: `official` puts every memory key at position 0 and restarts the input (read slots, segment, write
  slots) at 0 every segment; `compact` gives globals, window and input consecutive positions from 0 and top-k keys
  position 0; `absolute` gives every token its document position (read slots just before the segment).
- StreamingLLM (`sink_shift`): compact positions with each query's globals moved up by the window slots its sliding
  reach skips; `rolling_cache_nll` is its official token-by-token evaluation, written on its own.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from fractions import Fraction

import torch

F64 = torch.float64


@dataclass(frozen=True)
class Description:
    """A method as plain values: what the reference computes (built by the tests from a config's fields)."""

    segment_len: int
    """Tokens per streamed segment: the method's local context."""
    layers: frozenset[int] = frozenset()
    """Layers that read and write the key/value memory."""
    size: int = 0
    """Key/value memory slots per layer (pinned document globals not counted)."""
    overflow: str = "fifo"
    """fifo | clear | clear-and-write."""
    kv: str = "none"
    """direct | pooling | none: what a segment writes to the key/value memory."""
    pool_ratio: int = 4
    """Tokens averaged into one slot when kv is pooling."""
    memory_tokens: int = 0
    """RMT read/write slots m."""
    write_slots: str = "learned"
    """learned | memory: what fills the write slots after the first segment."""
    window: int = 0
    """Most recent memory slots read by position."""
    sliding: bool = False
    """Query i reaches only the last min(window - i, slots) window slots."""
    stride: int = 1
    """Window dilation: query i reads window slots whose memory index is congruent to i mod stride."""
    global_tokens: int = 0
    """Global slots every query reads."""
    global_source: str = "document"
    """document (the document's first tokens, pinned) | memory (the current memory's first slots)."""
    topk: int = 0
    """Memory slots read per query and head by largest dot product, among those before the query's window reach."""
    read_all: bool = False
    """Read the whole memory by position (the window is all of it)."""
    position: str = "compact"
    """official | compact | absolute."""
    rope_factor: float = 1.0
    """Linear position interpolation: RoPE angles at position p / rope_factor."""
    random_slots: int = 0
    """BigBird: memory slots per query block drawn at random among those before the block's first query's reach."""
    random_block: int = 64
    """Queries per block sharing their random slots."""
    random_seed: int = 0
    """Seed of the random draw."""
    dilated_segments: tuple[int, ...] = ()
    """LongNet: segment length w_j of each dilated pattern."""
    dilation_rates: tuple[int, ...] = ()
    """LongNet: dilation rate r_j of each pattern (head h takes offset h mod r_j)."""
    sink_shift: bool = False
    """StreamingLLM: a query's global keys sit at the positions just before its first visible window slot (compact
    positions moved up by the number of window slots its sliding reach skips)."""
    chunk_size: int = 0
    """Chunk-level retrieval when > 0: the slots top-k may pick, in memory order, form consecutive chunks of this
    many (the last possibly shorter); a query ranks the chunks all of whose slots lie before its window reach and
    reads every slot of its best topk / chunk_size chunks."""
    chunk_key: str = "mean"
    """mean (a chunk's score is q . the mean of its keys) | bounds (sum over dimensions of the larger of q_d times
    the chunk's smallest and largest key in that dimension)."""
    scaled_memory: bool = False
    """Unlimiformer's LLaMA mode: with L document tokens before the segment and R = trained_context - segment_len,
    a top-k slot searched by its unrotated key is attended rotated to floor(p * min(1, R / L)) (p its document
    position), and the segment's positions start at min(L, R). Direct FIFO memory only here."""
    trained_context: int = 0
    """The model's trained context (scaled_memory)."""


class ReferenceLlama:
    """A LLaMA decoder in float64 from a state dict and the architecture's numbers (no transformers code runs)."""

    def __init__(self, state: dict[str, torch.Tensor], *, heads: int, kv_heads: int, eps: float,
                 rope_theta: float) -> None:
        self.w = {name: t.detach().to(F64) for name, t in state.items()}
        self.heads, self.kv_heads, self.eps = heads, kv_heads, eps
        self.n_layers = 1 + max(int(n.split(".")[2]) for n in self.w if n.startswith("model.layers."))
        self.head_dim = self.w["model.layers.0.self_attn.q_proj.weight"].shape[0] // heads
        self.inv_freq = 1.0 / rope_theta ** (torch.arange(0, self.head_dim, 2, dtype=F64) / self.head_dim)
        self.lm_head = self.w.get("lm_head.weight", self.w["model.embed_tokens.weight"])

    def linear(self, x: torch.Tensor, name: str) -> torch.Tensor:
        bias = self.w.get(name + ".bias")
        y = x @ self.w[name + ".weight"].T
        return y if bias is None else y + bias

    def rms_norm(self, x: torch.Tensor, name: str) -> torch.Tensor:
        return x / torch.sqrt((x * x).mean(-1, keepdim=True) + self.eps) * self.w[name]

    def rope(self, x: torch.Tensor, position: float, factor: float) -> torch.Tensor:
        """Rotate x [..., head_dim] to `position` (half-split pairs, as LLaMA checkpoints in HF layout use)."""
        angle = position / factor * self.inv_freq
        cos, sin = torch.cat([angle.cos(), angle.cos()]), torch.cat([angle.sin(), angle.sin()])
        half = self.head_dim // 2
        rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
        return x * cos + rotated * sin


@dataclass
class Slot:
    """One memory slot of one layer: [kv_heads, head_dim] tensors."""

    key: torch.Tensor
    """Unrotated key (position 0); pooled slots: the mean of their tokens' unrotated keys."""
    key_doc: torch.Tensor
    """Key rotated at its document position; pooled slots: the mean of their tokens' rotated keys."""
    value: torch.Tensor
    position: int = -1
    """Document position of the slot's (first) token."""


@dataclass
class Memory:
    """Everything carried between segments."""

    banks: dict[int, list[Slot]]
    """Per injected layer, the memory slots, oldest first."""
    globals_: dict[int, list[Slot]]
    """Per injected layer, the document's pinned global tokens (global_source document)."""
    read: torch.Tensor | None = None
    """[m, hidden] RMT read slots of the next segment."""
    write: torch.Tensor | None = None
    """[m, hidden] RMT write slots of the next segment."""
    segments: int = 0
    """Segments processed so far."""
    learned: torch.Tensor | None = field(default=None, repr=False)
    """[m, hidden] the learned memory embeddings: the first read and write slots, and every write slot of
    write_slots learned."""


def reference_nll(llama: ReferenceLlama, spec: Description, doc: torch.Tensor,
                  memory_embeddings: torch.Tensor | None = None) -> torch.Tensor:
    """Per-token NLL [len(doc) - 1] of `doc` streamed in segments; every token after the first is scored once, a
    segment's first token by the previous segment's last position."""
    memory = Memory(banks={i: [] for i in spec.layers}, globals_={i: [] for i in spec.layers})
    if spec.memory_tokens:
        learned = memory_embeddings.detach().to(F64)
        memory.read, memory.write, memory.learned = learned, learned, learned
    out = []
    for start in range(0, len(doc) - 1, spec.segment_len):
        width = min(spec.segment_len, len(doc) - 1 - start)
        logits = forward_segment(llama, spec, memory, doc[start:start + width], start)
        logp = torch.log_softmax(logits, dim=-1)
        targets = doc[start + 1:start + width + 1]
        out.append(-logp[torch.arange(width), targets])
    return torch.cat(out)


def forward_segment(llama: ReferenceLlama, spec: Description, memory: Memory, ids: torch.Tensor,
                    doc_start: int) -> torch.Tensor:
    """Logits [n, vocab] of one segment; updates `memory`."""
    m, n = spec.memory_tokens, len(ids)
    x = llama.w["model.embed_tokens.weight"][ids]
    if m:
        x = torch.cat([memory.read, x, memory.write])
    views = {i: segment_view(llama, spec, memory, i, doc_start) for i in spec.layers}
    n_prefix = next(iter(views.values())).n_prefix if views else 0
    positions = input_positions(spec, n_prefix, doc_start, m, n)
    written = {}
    for layer in range(llama.n_layers):
        p = f"model.layers.{layer}."
        h = llama.rms_norm(x, p + "input_layernorm.weight")
        q = llama.linear(h, p + "self_attn.q_proj").view(len(x), llama.heads, -1)  # [T, heads, dim]
        k = llama.linear(h, p + "self_attn.k_proj").view(len(x), llama.kv_heads, -1)  # [T, kv_heads, dim]
        v = llama.linear(h, p + "self_attn.v_proj").view(len(x), llama.kv_heads, -1)
        q_rot = torch.stack([llama.rope(q[t], positions[t], spec.rope_factor) for t in range(len(x))])
        k_rot = torch.stack([llama.rope(k[t], positions[t], spec.rope_factor) for t in range(len(x))])
        attn = torch.zeros_like(q)
        for t in range(len(x)):
            for head in range(llama.heads):
                g = head // (llama.heads // llama.kv_heads)
                keys, values = k_rot[:t + 1, g], v[:t + 1, g]  # the input, causally
                log_count = torch.zeros(t + 1, dtype=F64)
                if layer in spec.layers and spec.dilation_rates:
                    keys, values, log_count = dilated_read(spec, views[layer], keys, values, g, head, t, doc_start)
                elif layer in spec.layers:
                    mem_keys, mem_values = read_memory(spec, views[layer], q_rot[t, head], g, t, llama)
                    keys, values = torch.cat([mem_keys, keys]), torch.cat([mem_values, values])
                    log_count = torch.zeros(len(keys), dtype=F64)
                logits = keys @ q_rot[t, head] / math.sqrt(llama.head_dim) + log_count
                weights = torch.softmax(logits, dim=0)
                attn[t, head] = weights @ values
        x = x + llama.linear(attn.reshape(len(x), -1), p + "self_attn.o_proj")
        h = llama.rms_norm(x, p + "post_attention_layernorm.weight")
        gate = llama.linear(h, p + "mlp.gate_proj")
        x = x + llama.linear(gate * torch.sigmoid(gate) * llama.linear(h, p + "mlp.up_proj"), p + "mlp.down_proj")
        if layer in spec.layers:
            doc_keys = torch.stack([llama.rope(k[m + j], doc_start + j, spec.rope_factor) for j in range(n)])
            written[layer] = (k[m:m + n], doc_keys, v[m:m + n])
    x = llama.rms_norm(x, "model.norm.weight")
    for layer, (keys, doc_keys, values) in written.items():
        write_memory(spec, memory, layer, keys, doc_keys, values, doc_start)
    if m:
        memory.read = x[m + n:]
        memory.write = x[m + n:] if spec.write_slots == "memory" else memory.learned
    memory.segments += 1
    return x[m:m + n] @ llama.lm_head.T


def input_positions(spec: Description, n_prefix: int, doc_start: int, m: int, n: int) -> list[int]:
    """Positions of [read slots ; segment ; write slots]."""
    if spec.scaled_memory:
        first = min(doc_start, max(0, spec.trained_context - spec.segment_len))
        return list(range(first, first + n))
    if spec.position == "absolute":
        return list(range(doc_start - m, doc_start + n + m))
    first = n_prefix if spec.position == "compact" else 0
    return list(range(first, first + 2 * m + n))


def segment_view(llama: ReferenceLlama, spec: Description, memory: Memory, layer: int, doc_start: int = 0) -> View:
    """One layer's memory as this segment reads it."""
    bank = memory.banks[layer]
    if spec.global_source == "memory":
        global_slots = bank[:min(spec.global_tokens, len(bank))]
        first = len(global_slots)
    else:
        global_slots, first = memory.globals_[layer], 0
    n_window = len(bank) - first if spec.read_all else min(spec.window, len(bank) - first)
    window_start = len(bank) - n_window

    def at(slot: Slot, frame: int | None) -> torch.Tensor:
        if spec.position == "absolute":
            return slot.key_doc
        if spec.position == "compact" and frame is not None:
            return llama.rope(slot.key, frame, spec.rope_factor)
        return slot.key  # position 0: official for every memory key, compact for top-k

    def stack(items: list[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
        return torch.stack(items) if items else like.new_zeros(0, *like.shape[1:])

    empty = llama.w["model.embed_tokens.weight"].new_zeros(0, llama.kv_heads, llama.head_dim)
    window = range(window_start, len(bank))
    searchable = range(first, len(bank)) if spec.topk or spec.random_slots else range(0)
    return View(
        global_keys=stack([at(s, j) for j, s in enumerate(global_slots)], empty),
        global_values=stack([s.value for s in global_slots], empty),
        window_index=list(window),
        window_keys=stack([at(bank[b], len(global_slots) + b - window_start) for b in window], empty),
        window_values=stack([bank[b].value for b in window], empty),
        search_index=list(searchable),
        search_keys=stack([at(bank[b], None) for b in searchable], empty),
        search_values=stack([bank[b].value for b in searchable], empty),
        n_bank=len(bank), n_prefix=len(global_slots) + n_window, segment=memory.segments,
        window_positions=[bank[b].position for b in window],
        attend_keys=scaled_keys(llama, spec, bank, searchable, doc_start) if spec.scaled_memory else None,
    )


@dataclass
class View:
    """One layer's memory for one segment, keys at their read positions: [slots, kv_heads, head_dim] tensors."""

    global_keys: torch.Tensor
    """Read by every query."""
    global_values: torch.Tensor
    window_index: list[int]
    """Memory index of each window slot."""
    window_keys: torch.Tensor
    window_values: torch.Tensor
    search_index: list[int]
    """Memory index of each slot top-k may pick (every non-global slot; a query searches those before its reach)."""
    search_keys: torch.Tensor
    search_values: torch.Tensor
    n_bank: int
    """Slots in the layer's memory."""
    n_prefix: int
    """Globals plus window: where compact positions put the input."""
    segment: int = 0
    """0-based index of the segment reading this view (the random draw depends on it)."""
    window_positions: list[int] = field(default_factory=list)
    """Document position of each window slot."""
    attend_keys: torch.Tensor | None = None
    """The keys top-k slots are attended with when not their searched keys (scaled_memory), like search_keys."""


def read_memory(spec: Description, view: View, query: torch.Tensor, g: int, t: int,
                llama: ReferenceLlama) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values [n, head_dim] of the memory slots that query `t` (0-based input index, RMT read slots
    first) of KV head `g` reads: the globals, its window slots, then its top-k among the slots before its reach."""
    n_window = len(view.window_index)
    reach = max(0, min(spec.window - t, n_window)) if spec.sliding and not spec.read_all else n_window
    seen = [j for j, b in enumerate(view.window_index)
            if b >= view.n_bank - reach and b % spec.stride == t % spec.stride]
    global_keys = view.global_keys[:, g]
    if spec.sink_shift:  # the globals move up to just before the first window slot this query sees
        global_keys = llama.rope(global_keys, n_window - reach, spec.rope_factor)
    keys = [global_keys, view.window_keys[seen, g]]
    values = [view.global_values[:, g], view.window_values[seen, g]]
    if spec.random_slots:
        keys_r, values_r = random_read(spec, view, g, t)
        keys.append(keys_r)
        values.append(values_r)
    candidates = [j for j, b in enumerate(view.search_index) if b < view.n_bank - reach]
    if candidates and spec.topk and spec.chunk_size:
        picked = best_chunk_slots(spec, view, query, g, len(candidates))
        keys.append((view.search_keys if view.attend_keys is None else view.attend_keys)[picked, g])
        values.append(view.search_values[picked, g])
    elif candidates and spec.topk:
        scores = view.search_keys[candidates, g] @ query
        picked = [candidates[j] for j in scores.topk(min(spec.topk, len(candidates))).indices.tolist()]
        keys.append((view.search_keys if view.attend_keys is None else view.attend_keys)[picked, g])
        values.append(view.search_values[picked, g])
    return torch.cat(keys), torch.cat(values)


def write_memory(spec: Description, memory: Memory, layer: int, keys: torch.Tensor, doc_keys: torch.Tensor,
                 values: torch.Tensor, doc_start: int = 0) -> None:
    """Write a segment's keys/values [n, kv_heads, dim] to one layer's memory under the overflow policy."""
    if spec.kv == "none" or not spec.size:
        return
    pinned = memory.globals_[layer]
    if spec.global_source == "document" and len(pinned) < spec.global_tokens:  # the document's first G tokens
        g = min(spec.global_tokens - len(pinned), len(keys))
        pinned.extend(Slot(keys[j], doc_keys[j], values[j], doc_start + j) for j in range(g))
        keys, doc_keys, values = keys[g:], doc_keys[g:], values[g:]
        doc_start += g
    step = spec.pool_ratio if spec.kv == "pooling" else 1
    new = [Slot(keys[j:j + step].mean(0), doc_keys[j:j + step].mean(0), values[j:j + step].mean(0), doc_start + j)
           for j in range(0, len(keys), step)]
    bank = memory.banks[layer]
    if bank and len(bank) + len(new) > spec.size and spec.overflow != "fifo":
        bank.clear()
        if spec.overflow == "clear":
            return
    bank.extend(new)
    del bank[:max(0, len(bank) - spec.size)]


def rolling_cache_nll(llama: ReferenceLlama, doc: torch.Tensor, *, sinks: int, recent: int) -> torch.Tensor:
    """Per-token NLL [len(doc) - 1] of StreamingLLM as its official evaluation runs it: one token at a time through
    a per-layer Python list of (unrotated key, value) pairs; after every step the list keeps its first `sinks` and
    last `recent` entries (`StartRecentKVCache`). Keys are rotated at their index in the list and the query at the
    list's last index (`pos_shift`: positions inside the cache, not in the document)."""
    cache: list[list[tuple[torch.Tensor, torch.Tensor]]] = [[] for _ in range(llama.n_layers)]
    group = llama.heads // llama.kv_heads
    out = []
    for t in range(len(doc) - 1):
        x = llama.w["model.embed_tokens.weight"][doc[t]]  # [hidden]
        for layer in range(llama.n_layers):
            p = f"model.layers.{layer}."
            h = llama.rms_norm(x, p + "input_layernorm.weight")
            q = llama.linear(h, p + "self_attn.q_proj").view(llama.heads, -1)
            k = llama.linear(h, p + "self_attn.k_proj").view(llama.kv_heads, -1)
            v = llama.linear(h, p + "self_attn.v_proj").view(llama.kv_heads, -1)
            entries = cache[layer]
            entries.append((k, v))
            keys = torch.stack([llama.rope(key, j, 1.0) for j, (key, _) in enumerate(entries)])  # [n, kv, dim]
            values = torch.stack([value for _, value in entries])
            q_rot = llama.rope(q, len(entries) - 1, 1.0)  # [heads, dim]
            attn = torch.stack([torch.softmax(keys[:, hd // group] @ q_rot[hd] / math.sqrt(llama.head_dim), 0)
                                @ values[:, hd // group] for hd in range(llama.heads)])
            x = x + llama.linear(attn.reshape(-1), p + "self_attn.o_proj")
            h = llama.rms_norm(x, p + "post_attention_layernorm.weight")
            gate = llama.linear(h, p + "mlp.gate_proj")
            x = x + llama.linear(gate * torch.sigmoid(gate) * llama.linear(h, p + "mlp.up_proj"),
                                 p + "mlp.down_proj")
            if len(entries) > sinks + recent:
                del entries[sinks:len(entries) - recent]
        logits = llama.rms_norm(x, "model.norm.weight") @ llama.lm_head.T
        out.append(-torch.log_softmax(logits, -1)[doc[t + 1]])
    return torch.stack(out)


def random_read(spec: Description, view: View, g: int, t: int) -> tuple[torch.Tensor, torch.Tensor]:
    """BigBird's random slots of query `t`: its block is t // random_block; the candidates are the non-global
    memory slots older than everything the block's first query reaches by window; the block takes the first
    random_slots entries of a permutation drawn from a generator seeded by (seed, segment, block)."""
    block = t // spec.random_block
    first = block * spec.random_block
    n_window = len(view.window_index)
    reach = max(0, min(spec.window - first, n_window)) if spec.sliding else n_window
    candidates = [j for j, b in enumerate(view.search_index) if b < view.n_bank - reach]
    seed = (spec.random_seed * 1_000_003 + view.segment) * 1_000_003 + block
    order = torch.randperm(len(candidates), generator=torch.Generator().manual_seed(seed)).tolist()
    picked = [candidates[j] for j in order[:spec.random_slots]]
    return view.search_keys[picked, g], view.search_values[picked, g]


def dilated_read(spec: Description, view: View, local_keys: torch.Tensor, local_values: torch.Tensor, g: int,
                 head: int, t: int, doc_start: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """LongNet: the window slots and causal input keys that query `t` of `head` reads, each with the log of the
    number of patterns holding it. Pattern j holds key position k for query position p when both lie in the same
    w_j-token segment of the document and both equal the head's offset (head mod r_j) modulo r_j."""
    n_window = len(view.window_index)
    reach = max(0, min(spec.window - t, n_window)) if spec.sliding and not spec.read_all else n_window
    p = doc_start + t
    seen = [j for j, b in enumerate(view.window_index) if b >= view.n_bank - reach]
    positions = [view.window_positions[j] for j in seen] + [doc_start + j for j in range(t + 1)]
    keys = torch.cat([view.window_keys[seen, g], local_keys])
    values = torch.cat([view.window_values[seen, g], local_values])

    def count(k: int) -> int:
        return sum(1 for w, r in zip(spec.dilated_segments, spec.dilation_rates, strict=True)
                   if p // w == k // w and p % r == head % r and k % r == head % r)

    counts = torch.tensor([count(k) for k in positions], dtype=F64)
    held = counts > 0
    return keys[held], values[held], counts[held].log()


# Score-based eviction (issue 10), written from the policies' papers and kvpress' definitions: every KV head keeps
# its own explicit list of slots (id = document position, unrotated key, value, running score). Each query of each
# head reads its KV head's list (read_all) plus the segment causally and takes one softmax; its weights are kept.
# After the segment, each layer's KV head scores [its slots ; the segment's tokens] and keeps the best `size`:
# sinks (id < sinks) and recent tokens (id >= end - recent) always, then the highest scores, ties for the newer id.
# - h2o (Zhang et al., 2023): running sum of the attention each slot received from every query of the group's heads.
# - tova (Oren et al., 2024): the last query's attention averaged over all heads of the layer.
# - snapkv (Li et al., 2024): per head, the mean attention of the last `observe` queries, averaged over a window of
#   `pool_kernel` neighbouring candidates (zero beyond the ends, divided by the kernel), averaged over the group.
# - knorm (Devoto et al., 2024): minus the key's L2 norm, compared at 1e-4 (equal norms tie).
# - lru: the id of the latest query whose attention (mean over the group's heads) to the slot is at least
#   1 / (keys that query sees); a slot written counts as used at its own id.
# Budgets per layer and head (issue 10): `pyramid` (PyramidKV, Cai et al. 2024) gives layer l of L the protected
# slots plus floor(lo + (hi - lo)(L - 1 - l)/(L - 1)), lo = B // beta, hi = 2B - lo, B = size - sinks - recent,
# hi capped at the document's unprotected tokens T (lo = 2B - T), uniform when T <= B, the floors' shortfall one
# slot each to the largest fractional parts; `adaptive` (AdaKV, Feng et al. 2024) keeps, per layer,
# heads x budget (head, slot) pairs: every head's protected slots and its best floor(budget x head_floor), then the
# highest scores across heads, ties for the newer id, then the lower head. Heads then hold different numbers of
# slots; in compact positions a head's slots sit just before the input, which starts after the most any head of any
# layer holds.


@dataclass
class EvictionSpec:
    """A score-evicting method as plain values (read_all reading, direct writing, every layer injected)."""

    segment_len: int
    size: int
    policy: str
    position: str = "official"
    """official (memory keys at position 0, input from 0) | compact (slot j of a head at position j, input after) |
    absolute (every token at its document position: kept keys keep theirs, as kvpress)."""
    sinks: int = 0
    recent: int = 0
    observe: int = 32
    pool_kernel: int = 7
    layer_budget: str = "uniform"
    """uniform | pyramid."""
    pyramid_beta: int = 20
    head_budget: str = "uniform"
    """uniform | adaptive."""
    head_floor: float = 0.2
    budget: float = 0.0
    """A fraction of the document (0: `size` slots): size = max(sinks + recent, ceil(budget x its tokens)), and the
    pyramid's top capped at its tokens."""


@dataclass
class HeadSlot:
    id: int
    key: torch.Tensor
    """[head_dim] unrotated."""
    value: torch.Tensor
    score: float = 0.0


def eviction_nll(llama: ReferenceLlama, spec: EvictionSpec, doc: torch.Tensor,
                 trace: list[tuple[int, list[list[int]]]] | None = None) -> tuple[torch.Tensor, list[list[list[int]]]]:
    """Per-token NLL [len(doc) - 1] and, per layer and KV head, the ids finally held; `trace` receives, per
    segment, (its tokens, the slots each layer's KV heads held while it ran)."""
    banks = [[[] for _ in range(llama.kv_heads)] for _ in range(llama.n_layers)]
    tokens = len(doc) if spec.budget else 0
    if spec.budget:
        spec = replace(spec, size=max(1, spec.sinks + spec.recent, math.ceil(spec.budget * tokens)))
    out = []
    for start in range(0, len(doc) - 1, spec.segment_len):
        width = min(spec.segment_len, len(doc) - 1 - start)
        if trace is not None:
            trace.append((width, [[len(head) for head in layer] for layer in banks]))
        logits = _eviction_segment(llama, spec, banks, doc[start:start + width], start, tokens)
        logp = torch.log_softmax(logits, dim=-1)
        out.append(-logp[torch.arange(width), doc[start + 1:start + width + 1]])
    return torch.cat(out), [[[s.id for s in head] for head in layer] for layer in banks]


def _eviction_segment(llama: ReferenceLlama, spec: EvictionSpec, banks: list[list[list[HeadSlot]]],
                      ids: torch.Tensor, doc_start: int, tokens: int) -> torch.Tensor:
    n = len(ids)
    x = llama.w["model.embed_tokens.weight"][ids]
    group = llama.heads // llama.kv_heads
    widest = max(len(head) for layer in banks for head in layer)
    for layer in range(llama.n_layers):
        p = f"model.layers.{layer}."
        held = banks[layer]
        first = {"compact": widest, "official": 0, "absolute": doc_start}[spec.position]
        h = llama.rms_norm(x, p + "input_layernorm.weight")
        q = llama.linear(h, p + "self_attn.q_proj").view(n, llama.heads, -1)
        k = llama.linear(h, p + "self_attn.k_proj").view(n, llama.kv_heads, -1)
        v = llama.linear(h, p + "self_attn.v_proj").view(n, llama.kv_heads, -1)
        q_rot = [llama.rope(q[t], first + t, 1.0) for t in range(n)]
        k_rot = [llama.rope(k[t], first + t, 1.0) for t in range(n)]
        attn = torch.zeros_like(q)
        weights: dict[tuple[int, int], torch.Tensor] = {}  # (head, query) -> [n_held + t + 1]
        for t in range(n):
            for head in range(llama.heads):
                g = head // group
                gap = widest - len(held[g])  # compact: the head's slots end just before the input
                at = {"compact": lambda j, s, gap=gap: gap + j, "official": lambda j, s: 0,
                      "absolute": lambda j, s: s.id}
                mem = [llama.rope(s.key, at[spec.position](j, s), 1.0) for j, s in enumerate(held[g])]
                keys = torch.stack(mem + [k_rot[j][g] for j in range(t + 1)])
                values = torch.stack([s.value for s in held[g]] + [v[j, g] for j in range(t + 1)])
                w = torch.softmax(keys @ q_rot[t][head] / math.sqrt(llama.head_dim), dim=0)
                weights[head, t] = w
                attn[t, head] = w @ values
        x = x + llama.linear(attn.reshape(n, -1), p + "self_attn.o_proj")
        h = llama.rms_norm(x, p + "post_attention_layernorm.weight")
        gate = llama.linear(h, p + "mlp.gate_proj")
        x = x + llama.linear(gate * torch.sigmoid(gate) * llama.linear(h, p + "mlp.up_proj"), p + "mlp.down_proj")
        budget = layer_budget(spec, layer, llama.n_layers, tokens)
        all_cands = []
        for g in range(llama.kv_heads):
            cands = held[g] + [HeadSlot(doc_start + j, k[j, g], v[j, g]) for j in range(n)]
            _score(spec, cands, weights, g, group, llama.heads, len(held[g]), n, doc_start)
            all_cands.append(cands)
        if spec.head_budget == "adaptive":
            banks[layer] = _keep_adaptive(spec, all_cands, doc_start + n, budget)
        else:
            banks[layer] = [_keep(spec, cands, doc_start + n, budget) for cands in all_cands]
    x = llama.rms_norm(x, "model.norm.weight")
    return x @ llama.lm_head.T


def _received(w: torch.Tensor, c: int, n_held: int, t: int) -> float:
    """Weight a query's vector `w` (its held slots, then the segment up to t) gives candidate c (0 if unseen)."""
    if c < n_held:
        return float(w[c])
    j = c - n_held
    return float(w[n_held + j]) if j <= t else 0.0


def _score(spec: EvictionSpec, cands: list[HeadSlot], weights: dict[tuple[int, int], torch.Tensor], g: int,
           group: int, heads: int, n_held: int, n: int, doc_start: int) -> None:
    heads_g = range(g * group, (g + 1) * group)
    if spec.policy == "knorm":
        for s in cands:
            s.score = -round(float(s.key.norm()) * 1e4)
    elif spec.policy == "h2o":
        for c, s in enumerate(cands):
            s.score += sum(_received(weights[hd, t], c, n_held, t) for hd in heads_g for t in range(n))
    elif spec.policy == "lru":
        for c, s in enumerate(cands):
            if c >= n_held:
                s.score = float(s.id)
            for t in range(n):
                share = sum(_received(weights[hd, t], c, n_held, t) for hd in heads_g) / group
                if share >= 1.0 / (n_held + t + 1):
                    s.score = max(s.score, float(doc_start + t))
    elif spec.policy == "tova":
        for c, s in enumerate(cands):
            s.score = sum(_received(weights[hd, n - 1], c, n_held, n - 1) for hd in range(heads)) / heads
    elif spec.policy == "snapkv":
        obs = range(n - min(spec.observe, n), n)
        per_head = [[sum(_received(weights[hd, t], c, n_held, t) for t in obs) / len(obs) for c in range(len(cands))]
                    for hd in heads_g]
        half = spec.pool_kernel // 2
        for c, s in enumerate(cands):
            pooled = [sum(row[j] for j in range(c - half, c + half + 1) if 0 <= j < len(cands)) / spec.pool_kernel
                      for row in per_head]
            s.score = sum(pooled) / group
    else:
        raise ValueError(f"no reference for eviction {spec.policy!r}")


def _keep(spec: EvictionSpec, cands: list[HeadSlot], end: int, size: int | None = None) -> list[HeadSlot]:
    size = spec.size if size is None else size
    if len(cands) <= size:
        return cands
    def rank(s: HeadSlot) -> tuple[bool, float, int]:
        return (s.id < spec.sinks or s.id >= end - spec.recent, s.score, s.id)
    kept = sorted(cands, key=rank, reverse=True)[:size]
    return sorted(kept, key=lambda s: s.id)


def layer_budget(spec: EvictionSpec, layer: int, n_layers: int, tokens: int = 0) -> int:
    """Slots per KV head of `layer` for a document of `tokens` tokens (PyramidKV's pyramid in exact fractions, or
    the uniform size)."""
    if spec.layer_budget == "uniform" or n_layers == 1:
        return spec.size
    protected = spec.sinks + spec.recent
    free = spec.size - protected
    lo = free // spec.pyramid_beta
    hi = 2 * free - lo
    if tokens:  # PyramidKV: the top capped at the input's unprotected tokens, the bottom raised to keep the sum
        if tokens - protected <= free:
            return spec.size
        if hi > tokens - protected:
            hi = tokens - protected
            lo = 2 * free - hi
    exact = [Fraction(lo) + Fraction(hi - lo) * (n_layers - 1 - i) / (n_layers - 1) for i in range(n_layers)]
    floors = [math.floor(x) for x in exact]
    shortfall = n_layers * free - sum(floors)
    # Largest remainders first, the lower layer on a tie.
    raised = sorted(range(n_layers), key=lambda i: (floors[i] - exact[i], i))[:shortfall]
    return protected + floors[layer] + (1 if layer in raised else 0)


def _keep_adaptive(spec: EvictionSpec, heads: list[list[HeadSlot]], end: int, budget: int) -> list[list[HeadSlot]]:
    """AdaKV: the layer keeps len(heads) x budget (head, slot) pairs jointly, after each head's safeguard."""
    if sum(len(c) for c in heads) <= budget * len(heads):
        return heads
    def protected(s: HeadSlot) -> bool:
        return s.id < spec.sinks or s.id >= end - spec.recent
    floor = int(budget * spec.head_floor)
    forced = set()
    for g, cands in enumerate(heads):
        ordered = sorted(cands, key=lambda s: (protected(s), s.score, s.id), reverse=True)
        forced |= {(g, s.id) for s in ordered[:floor]} | {(g, s.id) for s in cands if protected(s)}
    pairs = [(g, s) for g, cands in enumerate(heads) for s in cands]
    pairs.sort(key=lambda gs: ((gs[0], gs[1].id) in forced, gs[1].score, gs[1].id, -gs[0]), reverse=True)
    chosen = {(g, s.id) for g, s in pairs[:budget * len(heads)]}
    return [[s for s in cands if (g, s.id) in chosen] for g, cands in enumerate(heads)]


def best_chunk_slots(spec: Description, view: View, query: torch.Tensor, g: int, n_candidates: int) -> list[int]:
    """Search-list positions of the slots of the best topk / chunk_size chunks for `query` of KV head `g`; the
    candidates are the first `n_candidates` search slots, and only chunks wholly among them count."""
    n = len(view.search_index)
    chunks = [list(range(lo, min(lo + spec.chunk_size, n))) for lo in range(0, n, spec.chunk_size)]
    chunks = [c for c in chunks if c[-1] < n_candidates]
    scores = []
    for members in chunks:
        keys = view.search_keys[members, g]  # [members, head_dim]
        if spec.chunk_key == "mean":
            scores.append(float(keys.mean(0) @ query))
        else:
            low, high = keys.min(0).values, keys.max(0).values
            scores.append(float(torch.maximum(query * low, query * high).sum()))
    order = sorted(range(len(chunks)), key=lambda c: -scores[c])[:spec.topk // spec.chunk_size]
    return [j for c in order for j in chunks[c]]


def scaled_keys(llama: ReferenceLlama, spec: Description, bank: list[Slot], searchable: range,
                doc_start: int) -> torch.Tensor:
    """Unlimiformer's keys: slot b of a direct FIFO memory holds document token doc_start - len(bank) + b, attended
    at that position scaled from [0, doc_start) into [0, trained_context - segment_len)."""
    assert spec.kv == "direct" and spec.overflow == "fifo" and not spec.global_tokens
    room = max(0, spec.trained_context - spec.segment_len)
    scale = min(Fraction(1), Fraction(room, doc_start)) if doc_start else Fraction(1)  # exact: p * scale may be whole
    keys = [llama.rope(bank[b].key, math.floor((doc_start - len(bank) + b) * scale), spec.rope_factor)
            for b in searchable]
    return torch.stack(keys) if keys else torch.zeros(0, llama.kv_heads, llama.head_dim, dtype=F64)
