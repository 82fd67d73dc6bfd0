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
- AutoCompressor (Chevalier et al. 2023, princeton-nlp/AutoCompressors `AutoCompressorModel.forward`): the first
  segment reads nothing; each segment is [all earlier summary vectors ; segment ; kappa learned summary tokens],
  causal at positions 0, 1, ... (its LLaMA code passes no position ids); the final-norm outputs at the summary
  tokens are appended to the earlier ones (the most recent `memory_cap` kept).
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
- Two-tier memory (`pooled_tier`, Poolingformer / LongT5 TGlobal): the memory slides FIFO; the slots leaving it
  are pooled, the means of consecutive groups of `pool_ratio` of the slots one write pushes out, into a second list
  of at most `pooled_tier` slots (its overflow under `overflow`), which every query reads whole, between the globals
  and the window (compact positions in that order).
- StreamingLLM (`sink_shift`): compact positions with each query's globals moved up by the window slots its sliding
  reach skips; `rolling_cache_nll` is its official token-by-token evaluation, written on its own.
- Reformer (`lsh_buckets`, Kitaev et al. 2020): angular LSH, a vector's bucket in round r is the argmax of
  [x R_r ; -x R_r] for a seeded Gaussian R_r; a query reads the searchable slots (as top-k's candidates) sharing a
  bucket with it in any round. Routing Transformer (`clusters`, Roy et al. 2021): unit centroids per layer and KV
  head; each cluster's members are its most similar searchable unit keys (balanced), a query reads its nearest
  cluster's members; after each segment every centroid moves by an EMA towards the mean of the unit queries and
  keys nearest it. Both select in `read_memory`; the centroids live in `Memory.centroids`.
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
    pooled_tier: int = 0
    """Two-tier memory: slots of the pooled list that the slots pushed out of the memory are averaged into."""
    output: str = "none"
    """Reading at the output distribution: knn (kNN-LM) | trime (TRIME) | none; see `output_log_probs`."""
    output_topk: int = 0
    """kNN-LM's neighbours; TRIME's entries read from the previous segments."""
    output_lambda: float = 0.25
    """kNN-LM's weight of p_kNN."""
    output_temperature: float = 1.0
    """Divides kNN-LM's negative squared distances and TRIME's scaled dot products."""
    memory_mode: str = "replace"
    """replace (RMT: the write slots' outputs are the next read slots) | accumulate (AutoCompressor: they are
    appended to all earlier segments' outputs, the first segment reading none; write slots always learned)."""
    memory_cap: int = 0
    """accumulate: the most recent summary vectors kept (0 = all)."""
    lsh_buckets: int = 0
    """Reformer: LSH buckets per round (1: one bucket; 0: no LSH reading)."""
    lsh_rounds: int = 1
    """Reformer: hash rounds; a query reads the slots sharing any of its buckets."""
    lsh_seed: int = 0
    """Reformer: the rotations of round r, KV head g in layer l are torch.randn(kv_heads, rounds, head_dim, buckets
    // 2) from a generator seeded lsh_seed * 1_000_003 + l, at [g, r]."""
    clusters: int = 0
    """Routing Transformer: centroids per layer and KV head (0: no routing)."""
    cluster_size: int = 0
    """Members per cluster (0: ceil(searchable slots / clusters))."""
    cluster_decay: float = 0.5
    """EMA decay of a centroid per segment."""
    cluster_seed: int = 0
    """Initial centroids of layer l: torch.randn(kv_heads, clusters, head_dim) seeded cluster_seed * 1_000_003 + l,
    each scaled to unit length."""
    representatives: int = 4
    """chunk_key representative (InfLLM): a chunk's score is q . the mean of the keys of its `representatives`
    slots of highest representative score (all of them in a smaller chunk); a slot's representative score is the
    mean, over its KV head's query heads and the queries of its own segment at or after it, of q . k (both rotated
    as they were attended in that segment)."""
    dense_layers: frozenset[int] = frozenset()
    """Layers that read every memory slot by position (the window is all of it, no top-k) instead (Quest)."""
    chunk_select: str = "query"
    """query (each query and head ranks the chunks) | block (InfLLM: each block of `chunk_block` consecutive input
    queries ranks them once per KV head by the sum of its queries' and the KV head's query heads' chunk scores,
    among the chunks wholly before its first query's window reach; every query of the block reads those)."""
    chunk_block: int = 0
    """Queries per block of chunk_select block (0: the whole input)."""


def layer_spec(spec: Description, layer: int) -> Description:
    """What `layer` reads: a dense layer reads every memory slot by position."""
    if layer not in spec.dense_layers:
        return spec
    return replace(spec, read_all=True, window=0, sliding=False, stride=1, topk=0, chunk_size=0, random_slots=0)


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
    rep: torch.Tensor | None = None
    """[kv_heads] representative score (InfLLM; chunk_key representative)."""


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
    tiers: dict[int, list[Slot]] = field(default_factory=dict)
    """Per injected layer, the pooled tier (pooled_tier), oldest first."""
    learned: torch.Tensor | None = field(default=None, repr=False)
    """[m, hidden] the learned memory embeddings: the first read and write slots, and every write slot of
    write_slots learned."""
    entries: list[tuple[torch.Tensor, int]] = field(default_factory=list)
    """Output reading: the document's (last-layer FFN input, next token) pairs whose next token is known."""
    pending: torch.Tensor | None = None
    """Output reading: the previous segment's last FFN input, waiting for its next token."""
    ffn_input: torch.Tensor | None = None
    """[n, hidden] the last layer's FFN input at the segment's tokens, from the latest `forward_segment`."""
    centroids: dict[int, torch.Tensor] = field(default_factory=dict)
    """Per injected layer, the Routing Transformer's unit centroids [kv_heads, clusters, head_dim]."""


def reference_nll(llama: ReferenceLlama, spec: Description, doc: torch.Tensor,
                  memory_embeddings: torch.Tensor | None = None) -> torch.Tensor:
    """Per-token NLL [len(doc) - 1] of `doc` streamed in segments; every token after the first is scored once, a
    segment's first token by the previous segment's last position."""
    memory = Memory(banks={i: [] for i in spec.layers}, globals_={i: [] for i in spec.layers},
                    tiers={i: [] for i in spec.layers})
    if spec.memory_tokens:
        learned = memory_embeddings.detach().to(F64)
        memory.read, memory.write, memory.learned = learned, learned, learned
        if spec.memory_mode == "accumulate":
            memory.read = learned[:0]  # AutoCompressor: the first segment reads no summary vectors
    out = []
    for start in range(0, len(doc) - 1, spec.segment_len):
        width = min(spec.segment_len, len(doc) - 1 - start)
        logits = forward_segment(llama, spec, memory, doc[start:start + width], start)
        logp = torch.log_softmax(logits, dim=-1)
        if spec.output != "none":
            logp = output_log_probs(spec, memory, logits, doc[start:start + width])
        targets = doc[start + 1:start + width + 1]
        out.append(-logp[torch.arange(width), targets])
    return torch.cat(out)


def forward_segment(llama: ReferenceLlama, spec: Description, memory: Memory, ids: torch.Tensor,
                    doc_start: int) -> torch.Tensor:
    """Logits [n, vocab] of one segment; updates `memory`."""
    m, n = spec.memory_tokens, len(ids)
    r = len(memory.read) if m else 0  # read slots: m (replace), every summary so far (accumulate)
    x = llama.w["model.embed_tokens.weight"][ids]
    if m:
        x = torch.cat([memory.read, x, memory.write])
    views = {i: segment_view(llama, layer_spec(spec, i), memory, i, doc_start) for i in spec.layers}
    n_prefix = next(iter(views.values())).n_prefix if views else 0
    positions = input_positions(spec, n_prefix, doc_start, m, n, r)
    written = {}
    seg_queries = {}
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
                    mem_keys, mem_values = read_memory(layer_spec(spec, layer), views[layer], q_rot[t, head], g, t,
                                                       llama, block_queries(spec, llama, q_rot, g, t))
                    keys, values = torch.cat([mem_keys, keys]), torch.cat([mem_values, values])
                    log_count = torch.zeros(len(keys), dtype=F64)
                logits = keys @ q_rot[t, head] / math.sqrt(llama.head_dim) + log_count
                weights = torch.softmax(logits, dim=0)
                attn[t, head] = weights @ values
        x = x + llama.linear(attn.reshape(len(x), -1), p + "self_attn.o_proj")
        h = llama.rms_norm(x, p + "post_attention_layernorm.weight")
        gate = llama.linear(h, p + "mlp.gate_proj")
        x = x + llama.linear(gate * torch.sigmoid(gate) * llama.linear(h, p + "mlp.up_proj"), p + "mlp.down_proj")
        if layer == llama.n_layers - 1:
            memory.ffn_input = h[m:m + n]
        if layer in spec.layers:
            doc_keys = torch.stack([llama.rope(k[r + j], doc_start + j, spec.rope_factor) for j in range(n)])
            reps = (representative_scores(llama, q_rot, k_rot, r, n)
                    if spec.chunk_size and spec.chunk_key == "representative" else None)
            written[layer] = (k[r:r + n], doc_keys, v[r:r + n], reps)
            seg_queries[layer] = q_rot[r:r + n]
    x = llama.rms_norm(x, "model.norm.weight")
    for layer, (keys, doc_keys, values, reps) in written.items():
        if spec.clusters:  # the keys as the memory scores them: document frame for absolute positions
            move_centroids(llama, spec, memory, layer, seg_queries[layer],
                           doc_keys if spec.position == "absolute" else keys)
        write_memory(spec, memory, layer, keys, doc_keys, values, doc_start, reps)
    if m:
        summaries = x[r + n:]
        if spec.memory_mode == "accumulate":
            joined = torch.cat([memory.read, summaries])
            memory.read = joined[-spec.memory_cap:] if spec.memory_cap else joined
        else:
            memory.read = summaries
        memory.write = summaries if spec.write_slots == "memory" else memory.learned
    memory.segments += 1
    return x[r:r + n] @ llama.lm_head.T


def input_positions(spec: Description, n_prefix: int, doc_start: int, m: int, n: int,
                    n_read: int | None = None) -> list[int]:
    """Positions of [read slots ; segment ; write slots] (n_read read slots, m when not given)."""
    r = m if n_read is None else n_read
    if spec.scaled_memory:
        first = min(doc_start, max(0, spec.trained_context - spec.segment_len))
        return list(range(first, first + n))
    if spec.position == "absolute":
        return list(range(doc_start - r, doc_start + n + m))
    first = n_prefix if spec.position == "compact" else 0
    return list(range(first, first + r + n + m))


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
    tier = memory.tiers.get(layer, [])
    window = range(window_start, len(bank))
    searchable = (range(first, len(bank)) if spec.topk or spec.random_slots or spec.lsh_buckets or spec.clusters
                  else range(0))
    return View(
        global_keys=stack([at(s, j) for j, s in enumerate(global_slots)], empty),
        global_values=stack([s.value for s in global_slots], empty),
        window_index=list(window),
        window_keys=stack([at(bank[b], len(global_slots) + len(tier) + b - window_start) for b in window], empty),
        window_values=stack([bank[b].value for b in window], empty),
        search_index=list(searchable),
        search_keys=stack([at(bank[b], None) for b in searchable], empty),
        search_values=stack([bank[b].value for b in searchable], empty),
        search_reps=[bank[b].rep for b in searchable],
        n_bank=len(bank), n_prefix=len(global_slots) + len(tier) + n_window, segment=memory.segments,
        window_positions=[bank[b].position for b in window],
        attend_keys=scaled_keys(llama, spec, bank, searchable, doc_start) if spec.scaled_memory else None,
        tier_keys=stack([at(s, len(global_slots) + j) for j, s in enumerate(tier)], empty),
        tier_values=stack([s.value for s in tier], empty),
        layer=layer, centroids=memory.centroids.get(layer),
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
    tier_keys: torch.Tensor | None = None
    """The pooled tier, read by every query (pooled_tier)."""
    tier_values: torch.Tensor | None = None
    layer: int = 0
    """The layer this view belongs to (seeds the LSH rotations and initial centroids)."""
    centroids: torch.Tensor | None = None
    """Routing: the layer's centroids [kv_heads, clusters, head_dim] before this segment (None: never moved)."""
    search_reps: list[torch.Tensor | None] = field(default_factory=list)
    """Representative score [kv_heads] of each search slot (InfLLM)."""


def block_queries(spec: Description, llama: ReferenceLlama, q_rot: torch.Tensor, g: int,
                  t: int) -> tuple[int, torch.Tensor] | None:
    """chunk_select block: (first input index, queries [block * group, head_dim]) of the block holding query `t`,
    the query heads of KV head `g` (q_rot [inputs, heads, head_dim]); None when each query ranks its own chunks."""
    if spec.chunk_select != "block" or not spec.chunk_size:
        return None
    size = spec.chunk_block or len(q_rot)
    first = t // size * size
    group = llama.heads // llama.kv_heads
    return first, q_rot[first:first + size, g * group:(g + 1) * group].reshape(-1, q_rot.shape[-1])


def read_memory(spec: Description, view: View, query: torch.Tensor, g: int, t: int,
                llama: ReferenceLlama, block: tuple[int, torch.Tensor] | None = None) -> tuple[torch.Tensor,
                                                                                                torch.Tensor]:
    """Keys and values [n, head_dim] of the memory slots that query `t` (0-based input index, RMT read slots
    first) of KV head `g` reads: the globals, its window slots, then its top-k among the slots before its reach
    (with `block` (`block_queries`), the chunks its block ranked)."""
    n_window = len(view.window_index)
    reach = max(0, min(spec.window - t, n_window)) if spec.sliding and not spec.read_all else n_window
    seen = [j for j, b in enumerate(view.window_index)
            if b >= view.n_bank - reach and b % spec.stride == t % spec.stride]
    global_keys = view.global_keys[:, g]
    if spec.sink_shift:  # the globals move up to just before the first window slot this query sees
        global_keys = llama.rope(global_keys, n_window - reach, spec.rope_factor)
    keys = [global_keys, view.window_keys[seen, g]]
    values = [view.global_values[:, g], view.window_values[seen, g]]
    if view.tier_keys is not None:
        keys.insert(1, view.tier_keys[:, g])
        values.insert(1, view.tier_values[:, g])
    if spec.random_slots:
        keys_r, values_r = random_read(spec, view, g, t)
        keys.append(keys_r)
        values.append(values_r)
    candidates = [j for j, b in enumerate(view.search_index) if b < view.n_bank - reach]
    if block is not None and spec.topk:  # the chunks wholly before the block's first query's reach
        first = max(0, min(spec.window - block[0], n_window)) if spec.sliding and not spec.read_all else n_window
        n_first = sum(1 for b in view.search_index if b < view.n_bank - first)
        picked = best_chunk_slots(spec, view, block[1], g, n_first) if n_first else []
        keys.append(view.search_keys[picked, g])
        values.append(view.search_values[picked, g])
    elif candidates and spec.topk and spec.chunk_size:
        picked = best_chunk_slots(spec, view, query, g, len(candidates))
        keys.append((view.search_keys if view.attend_keys is None else view.attend_keys)[picked, g])
        values.append(view.search_values[picked, g])
    elif candidates and (spec.lsh_buckets or spec.clusters):
        picked = [candidates[j] for j in content_selected(spec, view, query, g, candidates)]
        keys.append(view.search_keys[picked, g])
        values.append(view.search_values[picked, g])
    elif candidates and spec.topk:
        scores = view.search_keys[candidates, g] @ query
        picked = [candidates[j] for j in scores.topk(min(spec.topk, len(candidates))).indices.tolist()]
        keys.append((view.search_keys if view.attend_keys is None else view.attend_keys)[picked, g])
        values.append(view.search_values[picked, g])
    return torch.cat(keys), torch.cat(values)


def write_memory(spec: Description, memory: Memory, layer: int, keys: torch.Tensor, doc_keys: torch.Tensor,
                 values: torch.Tensor, doc_start: int = 0, reps: torch.Tensor | None = None) -> None:
    """Write a segment's keys/values [n, kv_heads, dim] to one layer's memory under the overflow policy."""
    if spec.kv == "none" or not spec.size:
        return
    pinned = memory.globals_[layer]
    if spec.global_source == "document" and len(pinned) < spec.global_tokens:  # the document's first G tokens
        g = min(spec.global_tokens - len(pinned), len(keys))
        pinned.extend(Slot(keys[j], doc_keys[j], values[j], doc_start + j) for j in range(g))
        keys, doc_keys, values = keys[g:], doc_keys[g:], values[g:]
        reps = reps[g:] if reps is not None else None
        doc_start += g
    step = spec.pool_ratio if spec.kv == "pooling" else 1
    new = [Slot(keys[j:j + step].mean(0), doc_keys[j:j + step].mean(0), values[j:j + step].mean(0), doc_start + j,
                rep=reps[j] if reps is not None and step == 1 else None)
           for j in range(0, len(keys), step)]
    bank = memory.banks[layer]
    if spec.pooled_tier:
        write_two_tier(spec, memory, layer, new)
        return
    if bank and len(bank) + len(new) > spec.size and spec.overflow != "fifo":
        bank.clear()
        if spec.overflow == "clear":
            return
    bank.extend(new)
    del bank[:max(0, len(bank) - spec.size)]


def write_two_tier(spec: Description, memory: Memory, layer: int, new: list[Slot]) -> None:
    """The memory slides by `new`; what leaves it is averaged in consecutive groups of pool_ratio (the last group
    possibly shorter) into the pooled tier, which empties (clear: and takes none of them) or drops its oldest."""
    bank, tier = memory.banks[layer], memory.tiers[layer]
    bank.extend(new)
    out = bank[:max(0, len(bank) - spec.size)]
    del bank[:len(out)]
    r = spec.pool_ratio
    pooled = [Slot(torch.stack([s.key for s in out[j:j + r]]).mean(0),
                   torch.stack([s.key_doc for s in out[j:j + r]]).mean(0),
                   torch.stack([s.value for s in out[j:j + r]]).mean(0), out[j].position)
              for j in range(0, len(out), r)]
    if tier and len(tier) + len(pooled) > spec.pooled_tier and spec.overflow != "fifo":
        tier.clear()
        if spec.overflow == "clear":
            return
    tier.extend(pooled)
    del tier[:max(0, len(tier) - spec.pooled_tier)]


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
    question: tuple[int, ...] = ()
    """Query-aware compression: these tokens follow every segment (positions after it); their queries attend like
    the segment's and score with them (as its last queries), their keys are never kept, their outputs never read."""
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
    if spec.question:  # query-aware: the question follows the segment; its queries score, its keys are not kept
        ids = torch.cat([ids, torch.tensor(spec.question, dtype=ids.dtype)])
    total = len(ids)
    x = llama.w["model.embed_tokens.weight"][ids]
    group = llama.heads // llama.kv_heads
    widest = max(len(head) for layer in banks for head in layer)
    for layer in range(llama.n_layers):
        p = f"model.layers.{layer}."
        held = banks[layer]
        first = {"compact": widest, "official": 0, "absolute": doc_start}[spec.position]
        h = llama.rms_norm(x, p + "input_layernorm.weight")
        q = llama.linear(h, p + "self_attn.q_proj").view(total, llama.heads, -1)
        k = llama.linear(h, p + "self_attn.k_proj").view(total, llama.kv_heads, -1)
        v = llama.linear(h, p + "self_attn.v_proj").view(total, llama.kv_heads, -1)
        q_rot = [llama.rope(q[t], first + t, 1.0) for t in range(total)]
        k_rot = [llama.rope(k[t], first + t, 1.0) for t in range(total)]
        attn = torch.zeros_like(q)
        weights: dict[tuple[int, int], torch.Tensor] = {}  # (head, query) -> [n_held + t + 1]
        for t in range(total):
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
        x = x + llama.linear(attn.reshape(total, -1), p + "self_attn.o_proj")
        h = llama.rms_norm(x, p + "post_attention_layernorm.weight")
        gate = llama.linear(h, p + "mlp.gate_proj")
        x = x + llama.linear(gate * torch.sigmoid(gate) * llama.linear(h, p + "mlp.up_proj"), p + "mlp.down_proj")
        budget = layer_budget(spec, layer, llama.n_layers, tokens)
        all_cands = []
        for g in range(llama.kv_heads):
            cands = held[g] + [HeadSlot(doc_start + j, k[j, g], v[j, g]) for j in range(n)]
            _score(spec, cands, weights, g, group, llama.heads, len(held[g]), total, doc_start)
            all_cands.append(cands)
        if spec.head_budget == "adaptive":
            banks[layer] = _keep_adaptive(spec, all_cands, doc_start + n, budget)
        else:
            banks[layer] = [_keep(spec, cands, doc_start + n, budget) for cands in all_cands]
    x = llama.rms_norm(x, "model.norm.weight")
    return x[:n] @ llama.lm_head.T


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
    candidates are the first `n_candidates` search slots, and only chunks wholly among them count. `query` [queries,
    head_dim] (a block): a chunk's score is the sum of the queries' scores."""
    if query.dim() == 2:
        totals = [0.0] * -(-len(view.search_index) // spec.chunk_size)
        for row in query:
            for c, score in enumerate(chunk_scores(spec, view, row, g)):
                totals[c] += score
        return top_chunks(spec, totals, len(view.search_index), n_candidates)
    n = len(view.search_index)
    return top_chunks(spec, chunk_scores(spec, view, query, g), n, n_candidates)


def chunk_scores(spec: Description, view: View, query: torch.Tensor, g: int) -> list[float]:
    """Each chunk's score for one query [head_dim] of KV head `g`."""
    n = len(view.search_index)
    scores = []
    for lo in range(0, n, spec.chunk_size):
        members = list(range(lo, min(lo + spec.chunk_size, n)))
        keys = view.search_keys[members, g]  # [members, head_dim]
        if spec.chunk_key == "mean":
            scores.append(float(keys.mean(0) @ query))
        elif spec.chunk_key == "representative":
            rank = sorted(range(len(members)), key=lambda j: -float(view.search_reps[members[j]][g]))
            scores.append(float(keys[rank[:spec.representatives]].mean(0) @ query))
        else:
            low, high = keys.min(0).values, keys.max(0).values
            scores.append(float(torch.maximum(query * low, query * high).sum()))
    return scores


def top_chunks(spec: Description, scores: list[float], n: int, n_candidates: int) -> list[int]:
    """The search-list positions of the best topk / chunk_size chunks by `scores` (one per chunk of the n search
    slots) among those wholly in the first `n_candidates` slots; equal scores: the earlier chunk."""
    chunks = [list(range(lo, min(lo + spec.chunk_size, n))) for lo in range(0, n, spec.chunk_size)]
    eligible = [c for c in range(len(chunks)) if chunks[c][-1] < n_candidates]
    order = sorted(eligible, key=lambda c: -scores[c])[:spec.topk // spec.chunk_size]
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


# LongMem (Wang et al., 2023, arXiv 2306.07174), written from the paper and Victorwz/LongMem (`TransformerDecoder
# SideNetBase.extract_features_scriptable`, `TransformerDecoderSideNetLayer.forward`, `JointMultiheadAttention
# WeightedSum`, `External_Memory`): the frozen backbone reads the segment alone; side layer i maps x to
# layer_i(x) + H[hi] - H[lo] (its span's backbone hidden-state difference, H[0] the embeddings, x_0 = H[0]); the
# fusion layer's heads mix local attention (RoPE, causal) and memory attention (unrotated query and keys, the slots of
# the best topk / chunk chunks by mean key, own softmax) as sigmoid(g) A_mem + (1 - sigmoid(g)) A_local, local alone
# while the bank is empty; after the segment the backbone's memory layer appends its unrotated keys and values (the
# oldest dropped beyond `size`).


@dataclass(frozen=True)
class LongMemSpec:
    """LongMem as plain values."""

    segment_len: int
    source: int
    """Backbone layer whose keys/values the bank caches."""
    spans: tuple[tuple[int, int], ...]
    """Backbone layers [lo, hi) of each side layer."""
    fusion: int
    """The memory-augmented side layer."""
    size: int
    """Bank slots."""
    topk: int
    """Memory tokens read per query and head."""
    chunk_size: int
    """Slots per retrieval chunk (1: token-level)."""


def longmem_nll(llama: ReferenceLlama, side: dict[str, torch.Tensor], spec: LongMemSpec,
                doc: torch.Tensor) -> torch.Tensor:
    """Per-token NLL [len(doc) - 1]; `side` holds the SideNet's weights as `side.layers.<i>.<...>`, `side.norm.weight`
    and `side.gate` [heads]."""
    w = {name: t.detach().to(F64) for name, t in side.items()}
    bank: list[tuple[torch.Tensor, torch.Tensor]] = []  # (key, value) [kv_heads, head_dim] each, oldest first
    out = []
    for start in range(0, len(doc) - 1, spec.segment_len):
        width = min(spec.segment_len, len(doc) - 1 - start)
        logits = _longmem_segment(llama, w, spec, bank, doc[start:start + width])
        targets = doc[start + 1:start + width + 1]
        out.append(-torch.log_softmax(logits, dim=-1)[torch.arange(width), targets])
    return torch.cat(out)


def _longmem_segment(llama: ReferenceLlama, w: dict[str, torch.Tensor], spec: LongMemSpec,
                     bank: list[tuple[torch.Tensor, torch.Tensor]], ids: torch.Tensor) -> torch.Tensor:
    hidden = [llama.w["model.embed_tokens.weight"][ids]]
    for layer in range(llama.n_layers):
        hidden.append(_longmem_block(llama, llama.w, f"model.layers.{layer}.", hidden[-1], [], None, spec))
    x = hidden[0]
    for i, (lo, hi) in enumerate(spec.spans):
        memory = bank if i == spec.fusion else []
        x = _longmem_block(llama, w, f"side.layers.{i}.", x, memory, w["side.gate"], spec) + hidden[hi] - hidden[lo]
    logits = _rms(llama, x, w["side.norm.weight"]) @ llama.lm_head.T
    p = f"model.layers.{spec.source}."
    h = _rms(llama, hidden[spec.source], llama.w[p + "input_layernorm.weight"])
    keys = (h @ llama.w[p + "self_attn.k_proj.weight"].T).view(len(ids), llama.kv_heads, -1)
    values = (h @ llama.w[p + "self_attn.v_proj.weight"].T).view(len(ids), llama.kv_heads, -1)
    bank.extend((keys[t], values[t]) for t in range(len(ids)))
    del bank[:max(0, len(bank) - spec.size)]
    return logits


def _rms(llama: ReferenceLlama, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + llama.eps) * weight


def _longmem_block(llama: ReferenceLlama, w: dict[str, torch.Tensor], p: str, x: torch.Tensor,
                   bank: list[tuple[torch.Tensor, torch.Tensor]], gate: torch.Tensor | None,
                   spec: LongMemSpec) -> torch.Tensor:
    """One LLaMA decoder layer (weights `w` under prefix `p`) whose heads also read `bank` when it is not empty."""
    n, scale = len(x), 1 / math.sqrt(llama.head_dim)
    h = _rms(llama, x, w[p + "input_layernorm.weight"])
    q = (h @ w[p + "self_attn.q_proj.weight"].T).view(n, llama.heads, -1)
    k = (h @ w[p + "self_attn.k_proj.weight"].T).view(n, llama.kv_heads, -1)
    v = (h @ w[p + "self_attn.v_proj.weight"].T).view(n, llama.kv_heads, -1)
    q_rot = torch.stack([llama.rope(q[t], t, 1.0) for t in range(n)])
    k_rot = torch.stack([llama.rope(k[t], t, 1.0) for t in range(n)])
    attn = torch.zeros_like(q)
    for t in range(n):
        for head in range(llama.heads):
            g = head // (llama.heads // llama.kv_heads)
            local = torch.softmax(k_rot[:t + 1, g] @ q_rot[t, head] * scale, dim=0) @ v[:t + 1, g]
            if not bank:
                attn[t, head] = local
                continue
            chunks = [range(lo, min(lo + spec.chunk_size, len(bank))) for lo in range(0, len(bank), spec.chunk_size)]
            means = [float(torch.stack([bank[s][0][g] for s in c]).mean(0) @ q[t, head]) for c in chunks]
            best = sorted(range(len(chunks)), key=lambda c: -means[c])[:spec.topk // spec.chunk_size]
            slots = [s for c in best for s in chunks[c]]
            mem_k = torch.stack([bank[s][0][g] for s in slots])
            mem_v = torch.stack([bank[s][1][g] for s in slots])
            memory = torch.softmax(mem_k @ q[t, head] * scale, dim=0) @ mem_v
            mix = torch.sigmoid(gate[head])
            attn[t, head] = mix * memory + (1 - mix) * local
    x = x + attn.reshape(n, -1) @ w[p + "self_attn.o_proj.weight"].T
    h = _rms(llama, x, w[p + "post_attention_layernorm.weight"])
    up = h @ w[p + "mlp.gate_proj.weight"].T
    return x + (up * torch.sigmoid(up) * (h @ w[p + "mlp.up_proj.weight"].T)) @ w[p + "mlp.down_proj.weight"].T
def output_log_probs(spec: Description, memory: Memory, logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Log-probabilities [n, vocab] of a segment read at the output distribution, from its logits [n, vocab], the
    last layer's FFN inputs (`memory.ffn_input`) and its ids; then the segment's entries join the datastore.

    kNN-LM (Khandelwal et al., 2020): the `output_topk` entries nearest by squared L2 distance d vote with weights
    softmax(-d / T); p = lambda p_kNN + (1 - lambda) p_LM (p_LM alone while the datastore is empty). TRIME (Zhong et
    al., 2022): p(w) proportional to exp(logit_w) + sum over memory entries of token w of exp(q . k / sqrt(dim) / T),
    the memory being every earlier token of the segment (local) and the `output_topk` datastore entries of largest
    q . k (long). An entry is (FFN input at token j, token j + 1); a segment's last token enters with the next
    segment's first token.
    """
    keys = memory.ffn_input
    assert keys is not None
    if memory.pending is not None:
        memory.entries.append((memory.pending, int(ids[0])))
        memory.pending = None
    n, dim = keys.shape
    rows = []
    for i in range(n):
        q = keys[i]
        if spec.output == "knn":
            near = sorted((float(((q - k) ** 2).sum()), v) for k, v in memory.entries)[:spec.output_topk]
            p = torch.softmax(logits[i], dim=0)
            if near:
                weights = torch.softmax(torch.tensor([-d / spec.output_temperature for d, _ in near], dtype=F64), 0)
                p_knn = torch.zeros_like(p)
                for (_, v), w in zip(near, weights, strict=True):
                    p_knn[v] += w
                p = spec.output_lambda * p_knn + (1 - spec.output_lambda) * p
            rows.append(torch.log(p))
            continue
        scale = 1 / (math.sqrt(dim) * spec.output_temperature)
        local = [(float(q @ keys[j]) * scale, int(ids[j + 1])) for j in range(i)]
        long = sorted(((float(q @ k) * scale, v) for k, v in memory.entries), reverse=True)[:spec.output_topk]
        shift = max([float(logits[i].max())] + [s for s, _ in local + long])
        mass = torch.exp(logits[i] - shift)
        for score, v in local + long:
            mass[v] += math.exp(score - shift)
        rows.append(torch.log(mass / mass.sum()))
    memory.entries.extend((keys[j], int(ids[j + 1])) for j in range(n - 1))
    memory.pending = keys[n - 1]
    return torch.stack(rows)


def lsh_rotations(spec: Description, layer: int, kv_heads: int, dim: int) -> torch.Tensor:
    """[kv_heads, rounds, dim, buckets / 2] in float64: the seeded draw `Description.lsh_seed` names."""
    generator = torch.Generator().manual_seed(spec.lsh_seed * 1_000_003 + layer)
    return torch.randn(kv_heads, spec.lsh_rounds, dim, spec.lsh_buckets // 2, generator=generator).to(F64)


def lsh_bucket(spec: Description, rotations: torch.Tensor, x: torch.Tensor, g: int, r: int) -> int:
    """Reformer's angular LSH: the bucket of vector x [head_dim] of KV head g in round r."""
    if spec.lsh_buckets == 1:
        return 0
    projected = x @ rotations[g, r]  # [buckets / 2]
    return int(torch.cat([projected, -projected]).argmax())


def unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True)


def initial_centroids(spec: Description, layer: int, kv_heads: int, dim: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(spec.cluster_seed * 1_000_003 + layer)
    return unit(torch.randn(kv_heads, spec.clusters, dim, generator=generator).to(F64))


def content_selected(spec: Description, view: View, query: torch.Tensor, g: int, candidates: list[int]) -> list[int]:
    """Entries of `candidates` (search-list positions) that `query` (rotated, of KV head g) reads: the slots sharing
    an LSH bucket with it in some round, or the members of its nearest cluster."""
    kv_heads, dim = view.search_keys.shape[1], view.search_keys.shape[2]
    if spec.lsh_buckets:
        rotations = lsh_rotations(spec, view.layer, kv_heads, dim)
        mine = [lsh_bucket(spec, rotations, query, g, r) for r in range(spec.lsh_rounds)]
        return [j for j in candidates
                if any(lsh_bucket(spec, rotations, view.search_keys[j, g], g, r) == mine[r]
                       for r in range(spec.lsh_rounds))]
    centroids = view.centroids if view.centroids is not None else initial_centroids(spec, view.layer, kv_heads, dim)
    n = len(view.search_index)
    size = min(n, spec.cluster_size or -(-n // spec.clusters))
    nearest = max(range(spec.clusters), key=lambda c: float(unit(query) @ centroids[g, c]))
    similarity = [float(unit(view.search_keys[j, g]) @ centroids[g, nearest]) for j in range(n)]
    members = set(sorted(range(n), key=lambda j: -similarity[j])[:size])  # stable: the older of equals first
    return [j for j in candidates if j in members]


def move_centroids(llama: ReferenceLlama, spec: Description, memory: Memory, layer: int, queries: torch.Tensor,
                   keys: torch.Tensor) -> None:
    """One online k-means step after a segment: queries [n, heads, dim] (rotated), keys [n, kv_heads, dim]."""
    group = llama.heads // llama.kv_heads
    centroids = memory.centroids.get(layer)
    if centroids is None:
        centroids = initial_centroids(spec, layer, llama.kv_heads, llama.head_dim)
    moved = centroids.clone()
    for g in range(llama.kv_heads):
        points = [unit(queries[t, head]) for head in range(g * group, (g + 1) * group) for t in range(len(queries))]
        points += [unit(keys[t, g]) for t in range(len(keys))]
        nearest = [max(range(spec.clusters), key=lambda c: float(p @ centroids[g, c])) for p in points]
        for c in range(spec.clusters):
            mine = [p for p, a in zip(points, nearest, strict=True) if a == c]
            if mine:
                mean = torch.stack(mine).mean(0)
                moved[g, c] = unit(spec.cluster_decay * centroids[g, c] + (1 - spec.cluster_decay) * mean)
    memory.centroids[layer] = moved


def representative_scores(llama: ReferenceLlama, q_rot: torch.Tensor, k_rot: torch.Tensor, m: int,
                          n: int) -> torch.Tensor:
    """[n, kv_heads]: segment token j's mean q . k over the queries t >= j of the segment (input rows m + t) and the
    query heads of each KV head, with the rotations they were attended at."""
    group = llama.heads // llama.kv_heads
    out = torch.zeros(n, llama.kv_heads, dtype=F64)
    for j in range(n):
        for g in range(llama.kv_heads):
            dots = [float(q_rot[m + t, head] @ k_rot[m + j, g]) for t in range(j, n)
                    for head in range(g * group, (g + 1) * group)]
            out[j, g] = sum(dots) / len(dots)
    return out
