"""The UniMem configuration: a method is data over four dimensions (arXiv 2402.03009, Table 1).

Memory Management, Writing, Reading and Injection, plus the training strategy and the positions given to memory
keys. Every dataclass is frozen and validates itself; `UniMemConfig.bind` checks the parts that depend on the loaded
model and segment length. YAML in and out; `with_overrides` applies `reading.topk=8`-style strings.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A configuration that cannot run; the message is one line naming the problem and the fix."""


Overflow = Literal["fifo", "clear", "clear-and-write"]
KVWrite = Literal["direct", "pooling", "none"]
Index = Literal["torch", "faiss-flat", "faiss-ivf", "faiss-hnsw"]
PositionMode = Literal["official", "compact", "absolute"]
Strategy = Literal["stop_gradient", "bptt", "bptt_tokens"]
GlobalSource = Literal["document", "memory"]
WriteSlots = Literal["memory", "learned"]
ChunkKey = Literal["mean", "bounds"]


def _check_choice(name: str, value: object, kind: object) -> None:
    choices = typing.get_args(kind)
    if value not in choices:
        raise ConfigError(f"{name}={value!r} is not one of {', '.join(map(repr, choices))}")


def _check_nonneg(**values: int) -> None:
    for name, value in values.items():
        if value < 0:
            raise ConfigError(f"{name}={value} must be >= 0")


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

    def __post_init__(self) -> None:
        _check_nonneg(**{"management.size": self.size})
        _check_choice("management.overflow", self.overflow, Overflow)

    freeze_after_prompt: bool = False
    """Generation writes no segment made only of generated tokens (Unlimiformer indexes the prompt only)."""


@dataclass(frozen=True)
class Writing:
    """Memory Writing: what a processed segment leaves behind."""

    kv: KVWrite = "none"
    """`direct` caches the segment's keys/values; `pooling` caches their means over `pool_ratio` tokens."""
    pool_ratio: int = 4
    """Tokens averaged into one memory slot when kv=pooling."""
    memory_tokens: int = 0
    """Model-forward writing (RMT): m memory tokens read before each segment and written after it; the last-layer
    states of the write slots become the next segment's read slots (the first segment reads learned embeddings)."""
    write_slots: WriteSlots = "learned"
    """What fills RMT's write slots. `memory` (official code, `ExternalMemory.prepare_input_states`, and booydar's
    RMT): the same states as the read slots, i.e. the previous segment's memory. `learned`: the learned memory
    embeddings every segment."""

    def __post_init__(self) -> None:
        _check_choice("writing.kv", self.kv, KVWrite)
        _check_choice("writing.write_slots", self.write_slots, WriteSlots)
        _check_nonneg(**{"writing.memory_tokens": self.memory_tokens})
        if self.pool_ratio < 2:
            raise ConfigError(f"writing.pool_ratio={self.pool_ratio} must be >= 2 (1 would be direct writing)")


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
    """G global tokens read by every query, besides the window (Longformer's global attention)."""
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
    chunk_size: int = 0
    """Chunk-level retrieval (LongMem's token-to-chunk) when > 0: the searchable memory in consecutive chunks of this
    many slots (the last possibly shorter); a query ranks the chunks wholly before its window reach and reads every
    token of its best topk / chunk_size chunks (`topk` still counts tokens read). 0 = token-level top-k."""
    chunk_key: ChunkKey = "mean"
    """Chunk ranking: `mean` (LongMem: q . the mean key) or `bounds` (Quest: sum_d max(q_d min_d, q_d max_d))."""

    def __post_init__(self) -> None:
        _check_nonneg(
            **{"reading.window": self.window, "reading.global_tokens": self.global_tokens, "reading.topk": self.topk}
        )
        _check_choice("reading.index", self.index, Index)
        _check_choice("reading.global_source", self.global_source, GlobalSource)
        if self.stride < 1:
            raise ConfigError(f"reading.stride={self.stride} must be >= 1 (1 = no dilation)")
        if self.read_all and (self.window or self.topk):
            raise ConfigError("reading.read_all=true already reads every memory token: set reading.window=0 and "
                              "reading.topk=0")
        if min(self.ivf_lists, self.ivf_probe, self.hnsw_neighbors) < 1:
            raise ConfigError("reading.ivf_lists, reading.ivf_probe and reading.hnsw_neighbors must be >= 1")
        _check_choice("reading.chunk_key", self.chunk_key, ChunkKey)
        _check_nonneg(**{"reading.chunk_size": self.chunk_size})
        c = self.chunk_size
        if c and (not self.topk or self.topk % c or self.index != "torch"):
            raise ConfigError(f"reading.chunk_size={c} reads whole chunks by an exact torch search: set reading.topk "
                              f"to a multiple of it (tokens read, e.g. {4 * c}) and reading.index=torch")


@dataclass(frozen=True)
class Injection:
    """Memory Injection: which decoder layers read and write memory."""

    layers: tuple[int, ...] | Literal["all"] = "all"
    """0-based layer indices, or `all`. From strings: `all`, `3`, `2,5`, `12-21` (inclusive), `0,4-6`."""

    def __post_init__(self) -> None:
        if self.layers != "all":
            layers = parse_layers(self.layers)
            object.__setattr__(self, "layers", layers)

    def resolve(self, n_layers: int) -> tuple[int, ...]:
        """The explicit layer indices for a model with `n_layers` decoder layers."""
        if self.layers == "all":
            return tuple(range(n_layers))
        bad = [i for i in self.layers if i >= n_layers]
        if bad:
            raise ConfigError(f"injection.layers={format_layers(self.layers)} names layer {bad[0]} but the model has "
                              f"{n_layers} layers (0-{n_layers - 1}): choose indices below {n_layers}")
        return self.layers


@dataclass(frozen=True)
class Training:
    """How gradients flow through memory when a method is fine-tuned."""

    strategy: Strategy = "stop_gradient"
    """`stop_gradient` detaches memory every segment (Transformer-XL, Memorizing Transformer); `bptt` backpropagates
    through all memory; `bptt_tokens` backpropagates through the model-forward memory (RMT memory tokens) while the
    key/value memory is detached every segment (UniMix: its memory tokens learn from later segments)."""
    bptt_segments: int = 1
    """With bptt or bptt_tokens, memory is detached every k segments, so gradients reach k-1 segments back."""

    @property
    def window_segments(self) -> int:
        """Segments per forward/backward window: k unless everything is detached every segment."""
        return 1 if self.strategy == "stop_gradient" else self.bptt_segments

    def __post_init__(self) -> None:
        _check_choice("training.strategy", self.strategy, Strategy)
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

    def __post_init__(self) -> None:
        _check_choice("position.mode", self.mode, PositionMode)
        if self.rope_factor != 0 and self.rope_factor < 1:
            raise ConfigError(f"position.rope_factor={self.rope_factor} must be >= 1 (or 0 for automatic)")
        if self.segment_factor < 1:
            raise ConfigError(f"position.segment_factor={self.segment_factor} must be >= 1")

    scaled_memory: bool = False
    """Unlimiformer's LLaMA mode: with L tokens before the segment and R = trained - local context, a top-k slot at
    document position p, searched unrotated, is attended at floor(p * min(1, R / L)); the input runs from min(L, R).
    Needs position.mode=official and reading by top-k alone."""


@dataclass(frozen=True)
class UniMemConfig:
    """A long-context method as a point in UniMem's design space."""

    name: str = "custom"
    """The method this config came from (a registry name), kept in every run record."""
    management: Management = field(default_factory=Management)
    """Memory Management."""
    writing: Writing = field(default_factory=Writing)
    """Memory Writing."""
    reading: Reading = field(default_factory=Reading)
    """Memory Reading."""
    injection: Injection = field(default_factory=Injection)
    """Memory Injection."""
    training: Training = field(default_factory=Training)
    """Training strategy."""
    position: Position = field(default_factory=Position)
    """Position handling."""

    def __post_init__(self) -> None:
        m, w, r = self.management, self.writing, self.reading
        reads_kv = r.window or r.topk or r.read_all or r.global_tokens
        if r.topk and not m.size:
            raise ConfigError(f"reading.topk={r.topk} needs memory to search: set management.size > 0")
        if (r.window or r.read_all) and not m.size:
            raise ConfigError("reading.window/read_all read from memory: set management.size > 0")
        if r.window > m.size and m.size:
            raise ConfigError(f"reading.window={r.window} is larger than management.size={m.size}: the window is "
                              f"read from memory, so raise management.size to at least {r.window}")
        if r.global_tokens and r.global_source == "memory" and not m.size:
            raise ConfigError(f"reading.global_tokens={r.global_tokens} with reading.global_source=memory reads the "
                              "first slots of memory: set management.size > 0 (or reading.global_source=document)")
        if reads_kv and w.kv == "none":
            raise ConfigError("reading memory keys/values needs them written: set writing.kv=direct (or pooling)")
        if m.size and w.kv == "none":
            raise ConfigError(f"management.size={m.size} but nothing writes keys/values: set writing.kv=direct or "
                              "management.size=0")
        if m.size and not (r.window or r.topk or r.read_all or (r.global_tokens and r.global_source == "memory")):
            raise ConfigError(f"management.size={m.size} but nothing reads it: set reading.window, reading.topk or "
                              "reading.read_all")
        check_scaled_memory(self)

    @property
    def uses_kv_memory(self) -> bool:
        """Whether injected layers keep a key/value memory bank."""
        return self.writing.kv != "none"

    @property
    def has_memory(self) -> bool:
        """Whether anything is carried between segments (a key/value bank or RMT memory tokens)."""
        return self.uses_kv_memory or self.writing.memory_tokens > 0

    def without_memory(self) -> UniMemConfig:
        """The same method with every memory switched off (what the exactness tests compare to plain HF)."""
        return dataclasses.replace(self, management=Management(), writing=Writing(), reading=Reading(),
                                   position=dataclasses.replace(self.position, scaled_memory=False))

    def bind(self, *, n_layers: int, segment_len: int) -> tuple[int, ...]:
        """Check the model-dependent parts; return the injected layer indices."""
        layers = self.injection.resolve(n_layers)
        if self.reading.global_source == "document" and self.reading.global_tokens > segment_len:
            raise ConfigError(f"reading.global_tokens={self.reading.global_tokens} exceeds the segment length "
                              f"{segment_len}: global tokens must come from the first segment")
        return layers

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        layers = self.injection.layers
        data["injection"]["layers"] = layers if layers == "all" else list(layers)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> UniMemConfig:
        unknown = set(data) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ConfigError(f"unknown config section {sorted(unknown)[0]!r}; sections: {_section_names()}")
        parts: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            if f.name not in data:
                continue
            value = data[f.name]
            section = _section_type(f.name)
            if section is None:
                parts[f.name] = value
                continue
            if not isinstance(value, dict):
                raise ConfigError(f"config section {f.name!r} must be a mapping, got {value!r}")
            names = {g.name for g in dataclasses.fields(section)}
            if set(value) - names:
                bad = sorted(set(value) - names)[0]
                raise ConfigError(f"unknown field {f.name}.{bad}; {f.name} has: {', '.join(sorted(names))}")
            kwargs = dict(value)
            if section is Injection and isinstance(kwargs.get("layers"), list):
                kwargs["layers"] = tuple(kwargs["layers"])
            parts[f.name] = section(**kwargs)
        return cls(**parts)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_yaml(cls, text_or_path: str | Path) -> UniMemConfig:
        text = Path(text_or_path).read_text() if isinstance(text_or_path, Path) else text_or_path
        return cls.from_dict(yaml.safe_load(text) or {})

    def with_overrides(self, overrides: list[str] | tuple[str, ...]) -> UniMemConfig:
        """Apply `section.field=value` strings (values parsed as YAML scalars)."""
        data = self.to_dict()
        for item in overrides:
            key, sep, raw = item.partition("=")
            section, dot, name = key.strip().partition(".")
            if not sep or not dot:
                raise ConfigError(f"--set {item!r} must look like section.field=value, e.g. reading.topk=8")
            if section not in data or not isinstance(data[section], dict):
                raise ConfigError(f"--set {item!r}: unknown section {section!r}; sections: {_section_names()}")
            if name not in data[section]:
                raise ConfigError(f"--set {item!r}: {section} has no field {name!r}; it has: "
                                  f"{', '.join(data[section])}")
            data[section][name] = yaml.safe_load(raw) if raw.strip() else ""
        return self.from_dict(data)


def _section_type(name: str) -> type | None:
    hints = typing.get_type_hints(UniMemConfig)
    kind = hints[name]
    return kind if dataclasses.is_dataclass(kind) else None


def _section_names() -> str:
    return ", ".join(f.name for f in dataclasses.fields(UniMemConfig) if _section_type(f.name) is not None)


def parse_layers(spec: object) -> tuple[int, ...]:
    """`2,5` / `12-21` / `0,4-6` / a sequence of ints -> a sorted tuple of distinct 0-based indices."""
    if isinstance(spec, int):
        items: list[object] = [spec]
    elif isinstance(spec, str):
        items = [part.strip() for part in spec.split(",") if part.strip()]
    else:
        items = list(spec)  # type: ignore[call-overload]
    out: set[int] = set()
    for item in items:
        text = str(item)
        lo, dash, hi = text.partition("-")
        try:
            span = range(int(lo), int(hi) + 1) if dash else range(int(lo), int(lo) + 1)
        except ValueError:
            raise ConfigError(f"injection.layers: {text!r} is not a layer index or range like 12-21") from None
        if not span or span.start < 0:
            raise ConfigError(f"injection.layers: {text!r} is not a non-empty range of indices >= 0")
        out.update(span)
    if not out:
        raise ConfigError("injection.layers is empty: give `all`, indices like 2,5 or a range like 12-21")
    return tuple(sorted(out))


def format_layers(layers: tuple[int, ...] | str) -> str:
    """The inverse of `parse_layers`, compressing runs: (0, 4, 5, 6) -> `0,4-6`."""
    if isinstance(layers, str):
        return layers
    runs: list[list[int]] = []
    for i in layers:
        if runs and i == runs[-1][1] + 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def check_scaled_memory(config: UniMemConfig) -> None:
    """position.scaled_memory places top-k slots and the input itself: nothing else may place memory keys."""
    r = config.reading
    if config.position.scaled_memory and (config.position.mode != "official" or not r.topk or r.window
                                          or r.read_all or r.global_tokens or config.writing.memory_tokens):
        raise ConfigError("position.scaled_memory=true places top-k slots and the input: set position.mode=official, "
                          "reading.topk > 0, and no window, globals, read_all or memory tokens")
