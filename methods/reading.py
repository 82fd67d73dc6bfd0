"""UniMem's Reading dimension: which memory tokens each query sees, and reading at the output distribution."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from unimem_bench.methods.checks import ConfigError, check_choice, check_nonneg, parse_layers

Index = Literal["torch", "faiss-flat", "faiss-ivf", "faiss-hnsw"]
GlobalSource = Literal["document", "memory"]
ChunkKey = Literal["mean", "bounds", "representative"]
ChunkSelect = Literal["query", "block"]
OutputRead = Literal["none", "knn", "trime"]


@dataclass(frozen=True)
class Reading:
    """Memory Reading: which memory tokens each query sees, all merged into one softmax with the local segment."""

    window: int = 0
    """W: the most recent memory tokens read by position (the window part of memory)."""
    sliding: bool = False
    """True (paper Eq. 3, 8; official `MemoryLayer._generate_window_mask_for_chunk`): 0-based query i of the input
    (RMT read slots counted first, as the official code counts them) sees only the last min(W - i, window) window
    slots, i.e. the W tokens before it plus itself. False: every query sees the whole window."""
    stride: int = 1
    """Dilation of the window (official Longformer preset: 2): query i keeps the window slots whose index in the
    memory bank (0 = oldest slot held) is congruent to i mod stride. 1 = no dilation."""
    global_tokens: int = 0
    """G global tokens read by every query, besides the window (Longformer's global attention). Document globals
    are the document's first G tokens, taken from as many first segments as they span."""
    global_source: GlobalSource = "document"
    """`document`: the document's first G tokens, pinned forever. `memory` (official `MemoryLayer.retrieve`): the
    first G slots of the current memory bank, which move as the memory moves (and vanish when it is cleared)."""
    topk: int = 0
    """Per query and head, the k most similar memory tokens that its window does not read (Memorizing Transformer's
    kNN): with a sliding window, the slots before the query's own reach (official
    `_generate_topk_index_out_of_windows`), global slots excluded. Slots a dilated window skips are not candidates
    (the official code lets top-k pick them; its presets never combine top-k with a stride)."""
    read_all: bool = False
    """Read the whole memory by position (RMT-style full read); excludes window and topk."""
    index: Index = "torch"
    """Top-k search: `torch` is exact and chunked; faiss `flat` is exact, `ivf` and `hnsw` approximate."""
    ivf_lists: int = 256
    """IVF cells at full memory; fewer while the memory is small (at least 39 keys per cell, faiss' minimum)."""
    ivf_probe: int = 16
    """IVF cells searched per query: 16 of 256 keeps recall high at a sixteenth of the work."""
    hnsw_neighbors: int = 32
    """HNSW graph degree M; 32 is faiss' recommended default for recall above 0.95."""
    random_slots: int = 0
    """BigBird's random attention: R memory slots per query block, drawn at random (seeded) among the slots its
    window does not read: the non-global bank slots before the window reach of the block's first query. Query block
    b (input index // random_block) of the document's s-th segment (0-based) takes the first R entries of
    `torch.randperm(n, generator=torch.Generator().manual_seed((random_seed * 1_000_003 + s) * 1_000_003 + b))` over
    its n candidates in bank order (all of them when n <= R); every head and layer reads the same slots, at the
    positions top-k keys get. 0 = none."""
    random_block: int = 64
    """Queries per block sharing their random slots (BigBird's block size, 64)."""
    random_seed: int = 0
    """Seed of the random slots: the same seed reads the same slots."""
    dilated_segments: tuple[int, ...] = ()
    """LongNet's dilated attention: segment lengths w_j in tokens, one per pattern (with `dilation_rates`). Pattern j
    splits the document into w_j-token segments; head h of a query at document position p reads the keys k <= p of
    p's segment with k = p = h (mod r_j) (head offset h mod r_j; a query off its offset reads nothing in that
    pattern). The window and local keys are restricted to the union of the patterns, each key weighted by the number
    of patterns that hold it (LongNet sums the patterns' outputs weighted by their softmax denominators, which is this
    one softmax). Empty = no dilation."""
    dilation_rates: tuple[int, ...] = ()
    """LongNet's dilation rate r_j of each pattern; one pattern must have rate 1 so every query reads something."""
    chunk_size: int = 0
    """Chunk-level retrieval (LongMem's token-to-chunk) when > 0: the searchable memory in consecutive chunks of this
    many slots (the last possibly shorter); a query ranks the chunks wholly before its window reach and reads every
    token of its best topk / chunk_size chunks (`topk` still counts tokens read). 0 = token-level top-k."""
    chunk_key: ChunkKey = "mean"
    """Chunk ranking: `mean` (LongMem: q . the mean key), `bounds` (Quest: sum_d max(q_d min_d, q_d max_d)) or
    `representative` (InfLLM: q . the mean key of the chunk's `representatives` slots of highest representative
    score, each token's mean q_i . k_m over the queries i >= m of its own segment, itself included)."""
    representatives: int = 4
    """InfLLM's representative tokens per chunk (`chunk_key=representative`; official `repr_topk` = 4)."""
    chunk_select: ChunkSelect = "query"
    """Who ranks the chunks (`chunk_size` > 0): `query` (each query and head ranks its own, Quest's per-step
    decoding) or `block` (official InfLLM: each block of `chunk_block` consecutive queries of the input ranks once per
    KV head, by the sum of its queries' and the KV head's query heads' scores, over the chunks wholly before the
    window reach of its first query; all of its queries read the same chunks)."""
    chunk_block: int = 0
    """Queries per block of `chunk_select=block` (official InfLLM `exc_block_size` 512 per 2,048-token chunk); 0 =
    all of the input's queries (one decoded token is a block of one)."""
    dense_layers: tuple[int, ...] = ()
    """Injected layers (0-based) that read every memory slot by position instead of the reading above (Quest keeps
    its first two layers dense). From strings like injection.layers: `0,1`, `0-1`. Empty = none."""
    output: OutputRead = "none"
    """Reading at the output distribution (kNN-LM, TRIME): memory of (key, next token) pairs, the key being the
    last decoder layer's FFN input, read into the vocabulary. `knn` (kNN-LM): p = lambda p_kNN + (1 - lambda) p_LM,
    p_kNN a softmax of -squared L2 distance / temperature over the `output_topk` nearest entries, summed per token.
    `trime` (TRIME): one softmax over the vocabulary logits and every memory entry, an entry for token w adding
    exp(q . k / sqrt(d) / temperature) to w: local memory (the segment's earlier tokens, dense), long memory (the
    document's previous segments) and external memory (`output_datastore`), both by top-`output_topk`. `none`:
    the model's own distribution. The document's datastore holds every token whose next token is known."""
    output_topk: int = 1024
    """Neighbours read per query from each datastore (kNN-LM's k = 1024)."""
    output_lambda: float = 0.25
    """kNN-LM's interpolation weight of p_kNN (the paper's 0.25 on WikiText-103)."""
    output_temperature: float = 1.0
    """Divides the memory scores: kNN-LM's negative squared distances, TRIME's scaled dot products."""
    output_datastore: str = ""
    """External datastore: a .txt file or a folder of .txt files read by the model once (keys with their next
    tokens), a faiss index saved under `output_cache` by the content hash of model, tokens and settings and
    reloaded from there. Empty: the document's own datastore only."""
    output_cache: str = ""
    """Folder of saved external datastores; empty = the user cache directory (UNIMEM_BENCH_CACHE overrides)."""
    lsh_buckets: int = 0
    """Reformer's LSH reading when > 0: each query reads the searchable memory slots (those top-k would search: the
    non-global slots before its window reach) that share its bucket in at least one round. Angular LSH with the same
    random rotations for queries and keys: bucket(x) = argmax([x R ; -x R]), R [head_dim, lsh_buckets / 2] of round
    r and KV head g being `torch.randn(kv_heads, lsh_rounds, head_dim, lsh_buckets // 2, generator=torch.Generator()
    .manual_seed(lsh_seed * 1_000_003 + layer))[g, r]`; keys are hashed as top-k scores them. Even, or 1 (one bucket:
    every searchable slot). 0 = none."""
    lsh_rounds: int = 1
    """Reformer's n_hashes: hash rounds; a query reads the union of its buckets' slots, each slot once."""
    lsh_seed: int = 0
    """Seed of the LSH rotations (mixed with the layer index; fixed for the whole run)."""
    clusters: int = 0
    """Routing Transformer's online k-means reading when > 0: per layer, KV head and document, `clusters` unit
    centroids (initially `F.normalize(torch.randn(kv_heads, clusters, head_dim, generator=torch.Generator()
    .manual_seed(cluster_seed * 1_000_003 + layer)), dim=-1)`). Balanced routing: each cluster takes the
    `cluster_size` searchable slots whose unit keys are most similar to its centroid (ties: the older slot); a query
    reads the members before its window reach of the cluster nearest its unit query. After each written segment,
    the segment's unit queries (all heads of the KV head) and unit keys (as top-k scores them) are assigned to their
    nearest centroid, and each centroid with members moves to normalize(decay * c + (1 - decay) * their mean).
    0 = none."""
    cluster_size: int = 0
    """Members per cluster; 0 = ceil(searchable slots / clusters), the balanced share."""
    cluster_decay: float = 0.5
    """EMA decay of the centroids per written segment (the paper's 0.999 is per training step)."""
    cluster_seed: int = 0
    """Seed of the initial centroids (mixed with the layer index)."""

    def __post_init__(self) -> None:
        check_nonneg(
            **{"reading.window": self.window, "reading.global_tokens": self.global_tokens, "reading.topk": self.topk}
        )
        check_choice("reading.index", self.index, Index)
        check_choice("reading.global_source", self.global_source, GlobalSource)
        if self.stride < 1:
            raise ConfigError(f"reading.stride={self.stride} must be >= 1 (1 = no dilation)")
        if self.read_all and (self.window or self.topk):
            raise ConfigError("reading.read_all=true already reads every memory token: set reading.window=0 and "
                              "reading.topk=0")
        if min(self.ivf_lists, self.ivf_probe, self.hnsw_neighbors) < 1:
            raise ConfigError("reading.ivf_lists, reading.ivf_probe and reading.hnsw_neighbors must be >= 1")
        check_nonneg(**{"reading.random_slots": self.random_slots, "reading.random_seed": self.random_seed})
        object.__setattr__(self, "dilated_segments", tuple(int(w) for w in self.dilated_segments))
        object.__setattr__(self, "dilation_rates", tuple(int(r) for r in self.dilation_rates))
        if len(self.dilated_segments) != len(self.dilation_rates):
            raise ConfigError(f"reading.dilated_segments has {len(self.dilated_segments)} lengths but "
                              f"reading.dilation_rates {len(self.dilation_rates)}: give one rate per segment length")
        if any(v < 1 for v in self.dilated_segments + self.dilation_rates):
            raise ConfigError("reading.dilated_segments and reading.dilation_rates must be >= 1")
        if self.dilation_rates and 1 not in self.dilation_rates:
            raise ConfigError("reading.dilation_rates needs one pattern of rate 1 (LongNet's first), or queries off "
                              "every head offset would read nothing: add 1")
        if self.dilation_rates and (self.topk or self.random_slots or self.global_tokens or self.stride > 1):
            raise ConfigError("reading.dilated_segments restricts window and local keys by position: set "
                              "reading.topk, reading.random_slots and reading.global_tokens to 0 and reading.stride=1")
        if self.random_block < 1:
            raise ConfigError(f"reading.random_block={self.random_block} must be >= 1 (queries per block)")
        if self.random_slots and (self.topk or self.read_all):
            raise ConfigError("reading.random_slots draws from the slots top-k or read_all would read: set "
                              "reading.topk=0 and reading.read_all=false (or reading.random_slots=0)")
        check_choice("reading.chunk_key", self.chunk_key, ChunkKey)
        check_nonneg(**{"reading.chunk_size": self.chunk_size})
        c = self.chunk_size
        if c and (not self.topk or self.topk % c or self.index != "torch"):
            raise ConfigError(f"reading.chunk_size={c} reads whole chunks by an exact torch search: set reading.topk "
                              f"to a multiple of it (tokens read, e.g. {4 * c}) and reading.index=torch")
        check_output_reading(self)
        self._check_selectors()

    def _check_selectors(self) -> None:
        """LSH buckets and k-means clusters: valid sizes, and alone among the content selectors."""
        check_nonneg(**{"reading.lsh_buckets": self.lsh_buckets, "reading.lsh_seed": self.lsh_seed,
                         "reading.clusters": self.clusters, "reading.cluster_size": self.cluster_size,
                         "reading.cluster_seed": self.cluster_seed})
        if self.lsh_buckets > 1 and self.lsh_buckets % 2:
            raise ConfigError(f"reading.lsh_buckets={self.lsh_buckets} must be even (angular LSH hashes to argmax of "
                              f"[xR ; -xR]) or 1: use {self.lsh_buckets + 1}")
        if self.lsh_rounds < 1:
            raise ConfigError(f"reading.lsh_rounds={self.lsh_rounds} must be >= 1 (hash rounds)")
        if not 0 <= self.cluster_decay < 1:
            raise ConfigError(f"reading.cluster_decay={self.cluster_decay} must be in [0, 1) (EMA decay per segment)")
        if self.lsh_buckets and self.clusters:
            raise ConfigError("reading.lsh_buckets and reading.clusters both select memory by content: set one to 0")
        if (self.lsh_buckets or self.clusters) and (self.topk or self.random_slots or self.read_all
                                                    or self.dilation_rates):
            raise ConfigError("reading.lsh_buckets/clusters select among the slots top-k would search: set "
                              "reading.topk=0, reading.random_slots=0, reading.read_all=false and no dilation")
        check_choice("reading.chunk_select", self.chunk_select, ChunkSelect)
        check_nonneg(**{"reading.chunk_block": self.chunk_block})
        if self.representatives < 1:
            raise ConfigError(f"reading.representatives={self.representatives} must be >= 1 (tokens per chunk key)")
        empty = isinstance(self.dense_layers, tuple | list | str) and not self.dense_layers  # `0` is layer 0
        object.__setattr__(self, "dense_layers", () if empty else parse_layers(self.dense_layers))


def check_output_reading(reading: Reading) -> None:
    """The output-distribution fields (`reading.output*`) of kNN-LM and TRIME."""
    check_choice("reading.output", reading.output, OutputRead)
    if reading.output_topk < 1:
        raise ConfigError(f"reading.output_topk={reading.output_topk} must be >= 1 (neighbours per query)")
    if not 0 <= reading.output_lambda <= 1:
        raise ConfigError(f"reading.output_lambda={reading.output_lambda} must be in [0, 1] (kNN-LM's weight)")
    if reading.output_temperature <= 0:
        raise ConfigError(f"reading.output_temperature={reading.output_temperature} must be > 0")
    if reading.output == "none" and reading.output_datastore:
        raise ConfigError("reading.output_datastore is read at the output distribution: set reading.output=knn or "
                          "trime (or leave reading.output_datastore empty)")
