"""The four dimensions of UniMem's design space (arXiv 2402.03009, Table 1), plus training and positions.

Memory Management, Writing and Injection, the training strategy and the positions given to memory keys (Reading,
the largest, is in `reading.py`): one frozen dataclass each, validating itself. `config.UniMemConfig` combines
them into a method.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from unimem_bench.methods.checks import ConfigError, check_choice, check_nonneg, format_layers, parse_layers

Overflow = Literal["fifo", "clear", "clear-and-write"]
KVWrite = Literal["direct", "pooling", "none"]
PositionMode = Literal["official", "compact", "absolute"]
Strategy = Literal["stop_gradient", "bptt", "bptt_tokens", "trime"]
WriteSlots = Literal["memory", "learned"]
Eviction = Literal["fifo", "h2o", "tova", "snapkv", "knorm", "random", "lru"]
SideInit = Literal["copy", "identity"]
MemoryMode = Literal["replace", "accumulate"]
MemoryInit = Literal["noise", "eos"]
LayerBudget = Literal["uniform", "pyramid"]
HeadBudget = Literal["uniform", "adaptive"]


@dataclass(frozen=True)
class Management:
    """Memory Management: how much is kept and what happens when it overflows."""

    size: int = 0
    """Tokens of key/value memory per injected layer (pinned global tokens not counted). 0 = no KV memory."""
    overflow: Overflow = "fifo"
    """What a write that would not fit does. `fifo` drops the oldest tokens. `clear` (the official code's reset,
    thunlp/UniMem `MemoryLayer.update_memory_l`): empties the memory and writes nothing of this segment, so the next
    segment reads an empty memory. `clear-and-write`: empties the memory, then writes this segment. A write into
    an empty memory always happens (its oldest tokens dropped if one segment exceeds the size)."""

    eviction: Eviction = "fifo"
    """Which slots a full memory gives up (per layer and KV head, when [memory ; segment] exceeds the size).
    `fifo`: the oldest. Score-based (the lowest score goes): `h2o` attention each slot received, accumulated over
    every query so far; `tova` the last query's attention averaged over all heads; `snapkv` the last `observe`
    queries' attention, averaged and pooled over `pool_kernel` neighbours; `knorm` the key's L2 norm (the largest
    norms go); `random` seeded uniform; `lru` the latest query that attended to the slot above uniform."""
    sinks: int = 0
    """The document's first tokens that score-based eviction never evicts (attention sinks)."""
    recent: int = 0
    """The most recent tokens that score-based eviction never evicts (H2O's recent part, SnapKV's window)."""
    observe: int = 32
    """SnapKV's observation window: the last queries whose attention scores the slots (paper default 32)."""
    pool_kernel: int = 7
    """SnapKV's pooling kernel over neighbouring slots (paper default 7; kvpress uses 5)."""
    seed: int = 0
    """Seed of `random` eviction (mixed with the layer index, so layers evict differently)."""
    budget: float = 0.0
    """The fraction of the input kept (0 < budget <= 1; compression 4x = 0.25): replaces `size` by ceil(budget x the
    input's tokens) for each input (in a batch, its longest), for score eviction and FIFO memories alike (a window
    that covered the memory then covers the new size), so one value means the same slots for every method of a
    sweep. 0: `size` slots."""

    def __post_init__(self) -> None:
        check_nonneg(**{"management.size": self.size, "management.sinks": self.sinks,
                         "management.recent": self.recent})
        check_choice("management.overflow", self.overflow, Overflow)
        check_choice("management.eviction", self.eviction, Eviction)
        if self.observe < 1 or self.pool_kernel < 1 or self.pool_kernel % 2 == 0:
            raise ConfigError(f"management.observe={self.observe} must be >= 1 and management.pool_kernel="
                              f"{self.pool_kernel} odd and >= 1 (pooling keeps each slot at its kernel's centre)")
        if self.eviction == "fifo" and (self.sinks or self.recent):
            raise ConfigError("management.sinks/recent protect tokens from score-based eviction: set "
                              "management.eviction (h2o, tova, snapkv, knorm, random, lru), or for StreamingLLM's "
                              "sinks under FIFO use reading.global_tokens")
        if self.eviction != "fifo" and self.overflow != "fifo":
            raise ConfigError(f"management.eviction={self.eviction} replaces the overflow policy: set "
                              "management.overflow=fifo")
        if not 0 <= self.budget <= 1:
            raise ConfigError(f"management.budget={self.budget} must be a fraction of the input in (0, 1], e.g. 0.25 "
                              "for 4x compression (0 = use management.size)")
        if self.budget and not (self.scored or self.size):
            raise ConfigError("management.budget sizes a key/value memory per input: give the method a memory "
                              "(management.size > 0) or score eviction (management.eviction)")
        self.check_budgets()
        if self.size and self.sinks + self.recent > self.size:
            raise ConfigError(f"management.sinks + management.recent = {self.sinks + self.recent} exceeds "
                              f"management.size={self.size}: protect fewer tokens or raise the size")

    @property
    def scored(self) -> bool:
        """Whether a full memory evicts by score (not first in, first out)."""
        return self.eviction != "fifo"

    freeze_after_prompt: bool = False
    """Generation writes no segment made only of generated tokens (Unlimiformer indexes the prompt only)."""

    layer_budget: LayerBudget = "uniform"
    """Score eviction's budget per injected layer. `uniform`: `size` slots per KV head in every layer. `pyramid`
    (PyramidKV, Cai et al. 2024): the unprotected part of the budget (size - sinks - recent) falls linearly from
    2B - B/beta in the lowest injected layer to B/beta in the highest (B = that part, beta = `pyramid_beta`), floored,
    the remainder one slot each to the largest fractional parts, so all layers together hold what `uniform` holds;
    sinks and recent tokens come on top in every layer. With `budget` (the input's length known), as PyramidKV, the
    top is capped at the input's unprotected tokens (the bottom raised to keep the total)."""
    pyramid_beta: int = 20
    """PyramidKV's beta: the highest layer keeps B / beta unprotected slots (its code's default, 20)."""
    head_budget: HeadBudget = "uniform"
    """Score eviction's split of a layer's budget over its KV heads. `uniform`: every head keeps the layer's budget.
    `adaptive` (AdaKV, Feng et al. 2024): the layer keeps its heads' budgets together, as the top (head, slot)
    scores across all its heads, after each head's protected slots and its best floor(budget x `head_floor`) slots
    (the safeguard); ties go to the newer slot, then the lower head."""
    head_floor: float = 0.2
    """AdaKV's safeguard: the fraction of the per-head budget every head keeps (kvpress' alpha_safeguard, 0.2)."""

    @property
    def budgeted(self) -> bool:
        """Whether score eviction keeps different numbers of slots per layer or per KV head."""
        return self.layer_budget != "uniform" or self.head_budget != "uniform"

    def check_budgets(self) -> None:
        """Validate the per-layer and per-head budget fields (called by `__post_init__`)."""
        check_choice("management.layer_budget", self.layer_budget, LayerBudget)
        check_choice("management.head_budget", self.head_budget, HeadBudget)
        if self.pyramid_beta < 1 or not 0 <= self.head_floor <= 1:
            raise ConfigError(f"management.pyramid_beta={self.pyramid_beta} must be >= 1 and management.head_floor="
                              f"{self.head_floor} a fraction in [0, 1]")
        if self.budgeted and not self.scored:
            raise ConfigError("management.layer_budget/head_budget split a score-evicting budget: set "
                              "management.eviction (h2o, tova, snapkv, knorm, random, lru)")
        if self.head_budget == "adaptive" and self.eviction == "tova":
            raise ConfigError("management.head_budget=adaptive compares scores across KV heads but tova scores a "
                              "slot once for all heads: use snapkv, h2o, knorm, random or lru")


@dataclass(frozen=True)
class Writing:
    """Memory Writing: what a processed segment leaves behind."""

    kv: KVWrite = "none"
    """`direct` caches the segment's keys/values; `pooling` caches their means over `pool_ratio` tokens."""
    pool_ratio: int = 4
    """Tokens averaged into one memory slot when kv=pooling, or into one slot of the pooled tier (`pooled_tier`)."""
    memory_tokens: int = 0
    """Model-forward writing (RMT): m memory tokens read before each segment and written after it; the last-layer
    states of the write slots become the next segment's read slots (the first segment reads learned embeddings)."""
    write_slots: WriteSlots = "learned"
    """What fills RMT's write slots. `memory` (official code, `ExternalMemory.prepare_input_states`, and booydar's
    RMT): the same states as the read slots, i.e. the previous segment's memory. `learned`: the learned memory
    embeddings every segment."""

    pooled_tier: int = 0
    """Two-tier memory (Poolingformer, LongT5's TGlobal): slots of a pooled tier behind the direct bank. The slots
    one write evicts from the direct bank (always oldest first) are pooled, the means of consecutive groups of
    `pool_ratio` of them (a shorter last group on its own), into this tier of at most `pooled_tier` slots, whose
    own overflow follows `management.overflow`. Every query reads the whole tier with its window, in the one
    softmax (positions: official at 0; compact between the globals and the window; absolute: the mean of the
    tokens' keys at their document positions). 0 = evicted slots are dropped."""

    memory_mode: MemoryMode = "replace"
    """What a segment's memory-token outputs do to the read slots. `replace` (RMT): they become the next segment's
    m read slots. `accumulate` (AutoCompressor): they are appended to the summary vectors of all earlier segments
    (oldest dropped beyond `memory_cap`), which later segments read as a soft prompt; the first segment reads none,
    and the write slots are the learned embeddings every segment (AutoCompressor's `embed_summary`)."""
    memory_cap: int = 0
    """With memory_mode=accumulate, the most summary vectors kept (the oldest go first); 0 = no cap. A cap of
    memory_tokens is RMT's replacement with learned write slots, except that the first segment reads nothing."""
    memory_init: MemoryInit = "noise"
    """Initial memory embeddings: `noise` at the embedding scale (RMT), or `eos`: every slot the end-of-sequence
    token's embedding (AutoCompressor's `embed_summary` initialisation)."""

    def __post_init__(self) -> None:
        check_choice("writing.kv", self.kv, KVWrite)
        check_choice("writing.write_slots", self.write_slots, WriteSlots)
        check_nonneg(**{"writing.memory_tokens": self.memory_tokens, "writing.pooled_tier": self.pooled_tier})
        if self.pool_ratio < 1 or (self.pool_ratio < 2 and not self.pooled_tier):
            raise ConfigError(f"writing.pool_ratio={self.pool_ratio} must be >= 2 (1 would be direct writing; a "
                              "pooled tier also takes 1: its slots are then the evicted tokens themselves)")
        if self.pooled_tier and self.kv != "direct":
            raise ConfigError(f"writing.pooled_tier={self.pooled_tier} pools the slots a direct bank evicts: set "
                              "writing.kv=direct")
        check_memory_tokens(self)


def check_memory_tokens(w: Writing) -> None:
    """The memory-token fields of Writing agree with each other."""
    check_choice("writing.memory_mode", w.memory_mode, MemoryMode)
    check_choice("writing.memory_init", w.memory_init, MemoryInit)
    check_nonneg(**{"writing.memory_cap": w.memory_cap})
    if w.memory_mode == "accumulate" and w.memory_tokens and w.write_slots != "learned":
        raise ConfigError("writing.memory_mode=accumulate reads the earlier summaries before the segment and writes "
                          "through the learned embeddings: set writing.write_slots=learned")
    if w.memory_cap and (w.memory_mode != "accumulate" or w.memory_cap < w.memory_tokens):
        raise ConfigError(f"writing.memory_cap={w.memory_cap} bounds accumulated summary vectors: set "
                          f"writing.memory_mode=accumulate and a cap of at least writing.memory_tokens="
                          f"{w.memory_tokens} (0 = no cap)")


@dataclass(frozen=True)
class Injection:
    """Memory Injection: which decoder layers read and write memory."""

    layers: tuple[int, ...] | Literal["all"] = "all"
    """0-based layer indices, or `all`. From strings: `all`, `3`, `2,5`, `12-21` (inclusive), `0,4-6`."""

    side_layers: int = 0
    """LongMem's residual SideNet when > 0: this many side layers read the memory that `layers` (one backbone layer)
    writes, while the backbone stays frozen. Side layer i spans backbone layers [2i, 2i + 2), the last one up to
    the backbone's end (LongMem's layer reduction factor 2), starts as a copy of the last layer of its span, and
    adds the backbone's hidden-state difference over its span (the cross-network residual). 0 = no side network."""
    side_fusion: int = 0
    """The memory-augmented side layer (0-based): its joint attention fuses local attention and memory attention
    through a learned per-head gate (LongMem: backbone memory layer // 2, the 9th of 12 side layers)."""
    side_init: SideInit = "copy"
    """`copy` (LongMem): side layers start as copies of backbone layers. `identity`: the copies' output projections
    (attention o_proj, MLP down_proj) start at zero, so the side network starts as exactly the backbone."""
    side_gate: float = 0.0
    """Initial per-head gate logit g of the joint attention: out = sigmoid(g) A_mem + (1 - sigmoid(g)) A_local
    (LongMem's `memory_bias`, initialised to 0: an even mix). -.inf closes the gate: local attention exactly."""

    def __post_init__(self) -> None:
        if self.layers != "all":
            layers = parse_layers(self.layers)
            object.__setattr__(self, "layers", layers)
        check_choice("injection.side_init", self.side_init, SideInit)
        check_nonneg(**{"injection.side_layers": self.side_layers, "injection.side_fusion": self.side_fusion})
        if self.side_layers and self.side_fusion >= self.side_layers:
            raise ConfigError(f"injection.side_fusion={self.side_fusion} names a side layer but the SideNet has "
                              f"{self.side_layers} (0-{self.side_layers - 1}): choose one below {self.side_layers}")
        if self.side_layers and (self.layers == "all" or len(self.layers) != 1):
            raise ConfigError("injection.side_layers needs the one backbone layer whose keys/values fill the memory: "
                              "set injection.layers to a single index, e.g. injection.layers=3")
        if math.isnan(self.side_gate) or self.side_gate == math.inf:
            raise ConfigError(f"injection.side_gate={self.side_gate} must be a number or -.inf (closed gate)")

    def resolve(self, n_layers: int) -> tuple[int, ...]:
        """The explicit layer indices for a model with `n_layers` decoder layers."""
        if self.layers == "all":
            return tuple(range(n_layers))
        bad = [i for i in self.layers if i >= n_layers]
        if bad:
            raise ConfigError(f"injection.layers={format_layers(self.layers)} names layer {bad[0]} but the model has "
                              f"{n_layers} layers (0-{n_layers - 1}): choose indices below {n_layers}")
        return self.layers

    def side_spans(self, n_layers: int) -> tuple[tuple[int, int], ...]:
        """The backbone layers [lo, hi) each side layer spans (reduction factor 2; the last takes the rest)."""
        if self.side_layers > -(-n_layers // 2):
            raise ConfigError(f"injection.side_layers={self.side_layers} cannot span a {n_layers}-layer backbone two "
                              f"layers each: set it to at most {-(-n_layers // 2)}")
        bounds = [min(2 * i, n_layers) for i in range(self.side_layers)] + [n_layers]
        return tuple(zip(bounds[:-1], bounds[1:], strict=True))


@dataclass(frozen=True)
class Training:
    """How gradients flow through memory when a method is fine-tuned."""

    strategy: Strategy = "stop_gradient"
    """`stop_gradient` detaches memory every segment (Transformer-XL, Memorizing Transformer); `bptt` backpropagates
    through all memory; `bptt_tokens` backpropagates through the model-forward memory (RMT memory tokens) while the
    key/value memory is detached every segment (UniMix: its memory tokens learn from later segments); `trime`
    (TRIME's in-batch objective) trains with the loss of one softmax over the vocabulary and the segment's earlier
    tokens as memory (keys on the graph, so both the query and the memory representations learn), memory detached
    every segment as under stop_gradient."""
    bptt_segments: int = 1
    """With bptt or bptt_tokens, memory is detached every k segments, so gradients reach k-1 segments back."""

    @property
    def window_segments(self) -> int:
        """Segments per forward/backward window: k unless everything is detached every segment."""
        return 1 if self.strategy in ("stop_gradient", "trime") else self.bptt_segments

    def __post_init__(self) -> None:
        check_choice("training.strategy", self.strategy, Strategy)
        if self.bptt_segments < 1:
            raise ConfigError(f"training.bptt_segments={self.bptt_segments} must be >= 1")


@dataclass(frozen=True)
class Position:
    """Positions under RoPE for the segment and its memory keys."""

    mode: PositionMode = "compact"
    """`official` (thunlp/UniMem `pos_type='pos0'`): every memory key (globals, window, top-k, pooled) at position
    0, and the input's positions restart at 0 every segment (RMT read slots first). `compact`: globals, window and
    input at consecutive positions from 0 (StreamingLLM-style) and top-k keys at 0; query i of the segment is then
    G + W + i from the first global and, with a full window, W + i from the oldest window slot, which runs past the
    trained context when the segment is the trained context (a sliding window keeps it at W). `absolute`: every
    token at its document position (RMT read slots on the m positions before the segment, write slots after it)."""
    rope_factor: float = 1.0
    """Linear position interpolation factor (transformers' `linear` rope type); 0 = local context / trained context."""
    segment_factor: int = 1
    """The method's local context in run segments: position interpolation reads several segments at once."""
    sink_shift: bool = False
    """StreamingLLM's rolling cache re-rotated at positions inside the cache (official `pos_shift`): each query sees
    the global (sink) keys at the positions just before the oldest window slot it reads, not at 0 .. G-1, so a
    sliding window streamed in segments gives every query the keys and relative positions a token-by-token cache
    of G sinks + W recent tokens gives it. Needs compact positions, document globals, a sliding window, stride 1,
    and segments no longer than the window."""

    def __post_init__(self) -> None:
        check_choice("position.mode", self.mode, PositionMode)
        if self.rope_factor != 0 and self.rope_factor < 1:
            raise ConfigError(f"position.rope_factor={self.rope_factor} must be >= 1 (or 0 for automatic)")
        if self.segment_factor < 1:
            raise ConfigError(f"position.segment_factor={self.segment_factor} must be >= 1")
        if self.sink_shift and self.mode != "compact":
            raise ConfigError(f"position.sink_shift=true moves global keys within compact positions: set "
                              f"position.mode=compact (not {self.mode})")

    scaled_memory: bool = False
    """Unlimiformer's LLaMA mode: with L tokens before the segment and R = trained - local context, a top-k slot at
    document position p, searched unrotated, is attended at floor(p * min(1, R / L)); the input runs from min(L, R).
    Needs position.mode=official and reading by top-k alone."""
