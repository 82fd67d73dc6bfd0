"""The UniMem configuration: a method is data over the four dimensions of `dimensions.py` (arXiv 2402.03009).

`UniMemConfig` combines Management, Writing, Reading and Injection with the training strategy and the positions
given to memory keys, and checks that they fit together; `UniMemConfig.bind` checks the parts that depend on the
loaded model and segment length. YAML in and out; `with_overrides` applies `reading.topk=8`-style strings.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from unimem_bench.methods.checks import ConfigError, format_layers, parse_layers
from unimem_bench.methods.dimensions import Injection, Management, Position, Training, Writing
from unimem_bench.methods.reading import Reading

__all__ = ["ConfigError", "Injection", "Management", "Position", "Reading", "Training", "UniMemConfig", "Writing",
           "format_layers", "parse_layers"]


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
        reads_kv = r.window or r.topk or r.read_all or r.global_tokens or r.random_slots or r.lsh_buckets or r.clusters
        if r.topk and not m.size:
            raise ConfigError(f"reading.topk={r.topk} needs memory to search: set management.size > 0")
        if (r.lsh_buckets or r.clusters) and not m.size:
            raise ConfigError("reading.lsh_buckets/clusters select memory slots: set management.size > 0")
        if r.random_slots and not m.size:
            raise ConfigError(f"reading.random_slots={r.random_slots} draws from memory: set management.size > 0")
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
        if r.dilation_rates and w.memory_tokens:
            raise ConfigError("reading.dilated_segments counts document positions: set writing.memory_tokens=0")
        if m.size and w.kv == "none":
            raise ConfigError(f"management.size={m.size} but nothing writes keys/values: set writing.kv=direct or "
                              "management.size=0")
        if m.scored and (w.kv != "direct" or r.topk or r.global_tokens or r.random_slots or r.lsh_buckets or r.clusters
                         or not (r.read_all or r.window == m.size)):
            raise ConfigError(f"management.eviction={m.eviction} scores whole slots read by every query: use "
                              "writing.kv=direct, reading.read_all=true (or reading.window=management.size), "
                              "reading.topk=0, reading.random_slots=0 and reading.global_tokens=0 (management.sinks "
                              "keeps the first tokens)")
        if m.size and not (r.window or r.topk or r.read_all or r.random_slots or r.lsh_buckets or r.clusters
                           or (r.global_tokens and r.global_source == "memory")):
            raise ConfigError(f"management.size={m.size} but nothing reads it: set reading.window, reading.topk or "
                              "reading.read_all")
        if self.position.sink_shift and not (r.global_tokens and r.global_source == "document" and r.window
                                             and r.sliding and r.stride == 1):
            raise ConfigError("position.sink_shift=true shifts document globals in front of a sliding window: set "
                              "reading.global_tokens > 0, reading.global_source=document, reading.window > 0, "
                              "reading.sliding=true and reading.stride=1")
        check_scaled_memory(self)
        check_side_network(self)
        check_pooled_tier(self)
        if self.reading.output == "knn" and self.training.strategy == "trime":
            raise ConfigError("training.strategy=trime trains TRIME's joint softmax, not kNN-LM's mixture: set "
                              "reading.output=trime (or none) or another training.strategy")
        check_pages(self)

    @property
    def uses_kv_memory(self) -> bool:
        """Whether injected layers keep a key/value memory bank."""
        return self.writing.kv != "none"

    @property
    def has_memory(self) -> bool:
        """Whether anything is carried between segments (a key/value bank, RMT memory tokens, or a datastore read at
        the output distribution)."""
        return self.uses_kv_memory or self.writing.memory_tokens > 0 or self.reading.output != "none"

    def without_memory(self) -> UniMemConfig:
        """The same method with every memory switched off (what the exactness tests compare to plain HF)."""
        return dataclasses.replace(self, management=Management(), writing=Writing(), reading=Reading(),
                                   injection=dataclasses.replace(self.injection, side_layers=0, side_fusion=0),
                                   position=dataclasses.replace(self.position, sink_shift=False,
                                                                       scaled_memory=False))

    def check_query_aware(self) -> None:
        """Raise ConfigError when a query-aware question cannot follow the segment: it would come after RMT's write
        slots, which score-based eviction does not expect."""
        if self.management.scored and self.writing.memory_tokens:
            raise ConfigError("a query-aware question after the segment would follow RMT's write slots: use "
                              "query_mode=query_agnostic with writing.memory_tokens > 0")

    def bind(self, *, n_layers: int, segment_len: int) -> tuple[int, ...]:
        """Check the model-dependent parts; return the injected layer indices."""
        layers = self.injection.resolve(n_layers)
        if self.injection.side_layers:
            self.injection.side_spans(n_layers)
        if set(self.reading.dense_layers) - set(layers):
            raise ConfigError(f"reading.dense_layers={format_layers(self.reading.dense_layers)} names layers outside "
                              f"injection.layers={format_layers(layers)}: dense layers read memory, so inject them")
        local = segment_len * self.position.segment_factor
        if self.position.sink_shift and local > self.reading.window:
            raise ConfigError(f"position.sink_shift=true with a {local}-token segment needs reading.window >= {local} "
                              "(a query further than the window into its segment would see too many local keys): "
                              "raise reading.window or shorten the segment")
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
    return kind if isinstance(kind, type) and dataclasses.is_dataclass(kind) else None


def _section_names() -> str:
    return ", ".join(f.name for f in dataclasses.fields(UniMemConfig) if _section_type(f.name) is not None)


def check_scaled_memory(config: UniMemConfig) -> None:
    """position.scaled_memory places top-k slots and the input itself: nothing else may place memory keys."""
    r = config.reading
    if config.position.scaled_memory and (config.position.mode != "official" or not r.topk or r.window
                                          or r.read_all or r.global_tokens or config.writing.memory_tokens):
        raise ConfigError("position.scaled_memory=true places top-k slots and the input: set position.mode=official, "
                          "reading.topk > 0, and no window, globals, read_all or memory tokens")


def check_side_network(config: UniMemConfig) -> None:
    """LongMem's SideNet reads a cached bank of one backbone layer's keys/values by top-k (chunk) retrieval only."""
    m, w, r = config.management, config.writing, config.reading
    if config.injection.side_layers and (w.kv != "direct" or not m.size or not r.topk or m.scored
                                         or m.overflow != "fifo" or r.window or r.read_all or r.global_tokens
                                         or r.random_slots or r.dilation_rates or w.memory_tokens):
        raise ConfigError("injection.side_layers (LongMem) reads a FIFO bank of direct keys/values by retrieval: set "
                          "writing.kv=direct, management.size > 0, management.overflow=fifo, reading.topk > 0, and "
                          "no window, read_all, globals, random slots, dilation, eviction or memory tokens")


def check_pooled_tier(config: UniMemConfig) -> None:
    """writing.pooled_tier sits between the globals and a FIFO-evicting direct window: nothing else may place or
    evict memory keys."""
    m, r, p = config.management, config.reading, config.position
    if not config.writing.pooled_tier:
        return
    if not m.size:
        raise ConfigError(f"writing.pooled_tier={config.writing.pooled_tier} pools what the direct bank evicts: set "
                          "management.size > 0 (the direct window)")
    if m.scored or r.dilation_rates or p.sink_shift or p.scaled_memory:
        raise ConfigError("writing.pooled_tier needs FIFO eviction and plain positions: set management.eviction=fifo "
                          "and no reading.dilated_segments, position.sink_shift or position.scaled_memory")


def check_pages(config: UniMemConfig) -> None:
    """Page reading (Quest's dense layers, InfLLM's representative tokens) needs memory it can read per slot."""
    r = config.reading
    if r.dense_layers and (config.position.mode == "compact" or config.position.scaled_memory
                           or not config.management.size):
        raise ConfigError("reading.dense_layers read a different memory prefix than the other layers, which compact "
                          "positions would place differently: set position.mode=official or absolute (and "
                          "management.size > 0, position.scaled_memory=false)")
    if r.chunk_size and r.chunk_select == "block" and config.position.scaled_memory:
        raise ConfigError("reading.chunk_select=block reads each block's chunks at their stored positions: set "
                          "position.scaled_memory=false (or reading.chunk_select=query)")
    if r.chunk_size and r.chunk_key == "representative" and config.writing.kv != "direct":
        raise ConfigError("reading.chunk_key=representative ranks each chunk by its tokens' own scores: set "
                          "writing.kv=direct")


def dense_reading(reading: Reading) -> Reading:
    """The reading of `reading.dense_layers`: every memory slot by position, globals kept."""
    return dataclasses.replace(reading, read_all=True, window=0, sliding=False, stride=1, topk=0, chunk_size=0,
                               random_slots=0, dense_layers=())
