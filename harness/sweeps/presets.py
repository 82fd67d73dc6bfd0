"""Sweep axes and the paper's studies as named presets (light: imported by the CLI parser)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from unimem_bench.methods import METHODS, ConfigError, MethodContext
from unimem_bench.methods.config import format_layers


@dataclass(frozen=True)
class Axis:
    """One swept config field and its values, in order."""

    field: str
    """`section.field`, as `--set` takes it."""
    values: tuple[str, ...]
    """Values as `--set` strings (YAML scalars or lists)."""

    def __post_init__(self) -> None:
        section, dot, name = self.field.partition(".")
        if not (dot and section and name):
            raise ConfigError(f"--vary {self.field!r}: the field must look like section.field, e.g. reading.topk")
        if not self.values or any(not v.strip() for v in self.values):
            raise ConfigError(f"--vary {self.field}: give one or more non-empty values, e.g. {self.field}=0,4,8")
        if len(set(self.values)) != len(self.values):
            raise ConfigError(f"--vary {self.field}: a value is repeated in {','.join(self.values)}")


def split_values(text: str) -> list[str]:
    """Split at commas outside brackets, so `[0,2],[1,3],all` is three values."""
    values, depth, current = [], 0, ""
    for char in text:
        depth += {"[": 1, "]": -1}.get(char, 0)
        if char == "," and depth == 0:
            values.append(current.strip())
            current = ""
        else:
            current += char
    values.append(current.strip())
    return values


def parse_vary(spec: str) -> Axis:
    """`reading.topk=0,4,8` -> Axis("reading.topk", ("0", "4", "8"))."""
    field, sep, raw = spec.partition("=")
    if not sep:
        raise ConfigError(f"--vary {spec!r} must look like section.field=v1,v2,..., e.g. reading.topk=0,4,8")
    return Axis(field.strip(), tuple(split_values(raw)))


def layer_thirds(n_layers: int) -> list[str]:
    """The layer range split into 3 contiguous groups whose sizes differ by at most one (larger groups first)."""
    if n_layers < 3:
        return []
    size, extra = divmod(n_layers, 3)
    groups, start = [], 0
    for i in range(3):
        stop = start + size + (1 if i < extra else 0)
        groups.append(format_layers(tuple(range(start, stop))))
        start = stop
    return groups


def paper_window(ctx: MethodContext) -> list[str]:
    # The paper sweeps window lengths 0-2,048 with 2,048-token segments: 0 to one segment, doubling.
    return [str(ctx.segments(f)) for f in (0, 1 / 8, 1 / 4, 1 / 2, 1)]


def paper_compressed(ctx: MethodContext) -> list[str]:
    # Compressed tokens per 2,048-token segment around UniMix's 40, scaled to this run's segment (0 stays 0).
    return list(dict.fromkeys(str(ctx.paper_tokens(n) if n else 0) for n in (0, 10, 20, 40, 80)))


@dataclass(frozen=True)
class Preset:
    """A named study of the paper: its axes, given the model depth and segment length."""

    description: str
    axes: Callable[[MethodContext], list[Axis]]


PRESETS: dict[str, Preset] = {
    "layer-placement": Preset(
        "a single memory layer at each index, the three thirds of the layers, and all layers",
        lambda ctx: [Axis("injection.layers", tuple(dict.fromkeys(
            [str(i) for i in range(ctx.n_layers)] + layer_thirds(ctx.n_layers) + ["all"])))]),
    "topk": Preset("top-k memories read by similarity: 0, 4, 8, 16, 32, 64 (the paper's range)",
                   lambda ctx: [Axis("reading.topk", ("0", "4", "8", "16", "32", "64"))]),
    "window": Preset("window length by position: 0 to one segment, doubling (the paper's 0-2,048)",
                     lambda ctx: [Axis("reading.window", tuple(dict.fromkeys(paper_window(ctx))))]),
    "overflow": Preset("memory overflow handling: FIFO, clear-all as the official code (reset, write nothing) and "
                       "clear-all that writes the segment after the reset",
                       lambda ctx: [Axis("management.overflow", ("fifo", "clear", "clear-and-write"))]),
    "position": Preset("positions of memory keys and segment: official (memory at 0), compact, absolute",
                       lambda ctx: [Axis("position.mode", ("official", "compact", "absolute"))]),
    "compressed-tokens": Preset("model-forward compressed tokens per segment: 0-80 per 2,048, scaled",
                                lambda ctx: [Axis("writing.memory_tokens", tuple(paper_compressed(ctx)))]),
    "sinks": Preset("attention sinks kept by StreamingLLM: 1, 2, 4, 8 initial tokens (its paper's ablation)",
                    lambda ctx: [Axis("reading.global_tokens", ("1", "2", "4", "8"))]),
    "random-slots": Preset("BigBird's random slots per query block: 0-4 blocks of 64 per 2,048, scaled (its r = 3)",
                           lambda ctx: [Axis("reading.random_slots", tuple(dict.fromkeys(
                               str(ctx.paper_tokens(64) * n) for n in range(5))))]),
    "dilation": Preset("LongNet's dilation rates of its 3 patterns: none (1,1,1), the paper's geometric (1,2,4), "
                       "steeper (1,4,16)",
                       lambda ctx: [Axis("reading.dilation_rates", ("[1,1,1]", "[1,2,4]", "[1,4,16]"))]),
    # kvpress' and the eviction papers' compression ratios; 1x keeps every token (full attention, streamed).
    "budget": Preset("KV-cache compression 1x, 2x, 4x, 8x of each input (management.budget: the same slots per "
                     "injected layer for score-evicting and FIFO memories)",
                     lambda ctx: [Axis("management.budget", ("1", "0.5", "0.25", "0.125"))]),
    "chunk-size": Preset("chunk-level retrieval (LongMem): 32 tokens read as tokens (0) or as chunks of 2, 4, 8, 16, "
                         "by mean keys",
                         lambda ctx: [Axis("reading.topk", ("32",)), Axis("reading.chunk_size", ("0", "2", "4", "8",
                                                                                                 "16"))]),
    # Two-tier memory (Poolingformer, LongT5): tokens per pooled slot at the same tier size in slots (1 = unpooled,
    # 4 Poolingformer's stride, 16 LongT5's block), and the tier's size from none to two segments of slots.
    "pool-ratio": Preset("tokens averaged into one pooled-tier slot: 1, 2, 4, 8, 16 (the tier keeps its slots, so it "
                         "reaches further back as the ratio grows)",
                         lambda ctx: [Axis("writing.pool_ratio", ("1", "2", "4", "8", "16"))]),
    "pooled-tier": Preset("pooled-tier slots: none, 1/8, 1/4, 1/2, 1 and 2 segments' worth",
                          lambda ctx: [Axis("writing.pooled_tier", tuple(dict.fromkeys(
                              str(ctx.segments(f)) for f in (0, 1 / 8, 1 / 4, 1 / 2, 1, 2))))]),
    "summary-cap": Preset("AutoCompressor's accumulated summary vectors kept: 1, 2, 4, 8 segments' worth, and all",
                          lambda ctx: [Axis("writing.memory_cap", tuple(dict.fromkeys(
                              [str(summary_tokens(ctx) * n) for n in (1, 2, 4, 8)] + ["0"])))]),
    # Reformer's n_hashes ablation (its Fig. 4: 1, 2, 4, 8 rounds; 8 nearly matches full attention).
    "lsh-rounds": Preset("Reformer's LSH hash rounds: 1, 2, 4, 8 (reading.lsh_rounds; its paper's ablation)",
                         lambda ctx: [Axis("reading.lsh_rounds", ("1", "2", "4", "8"))]),
    "clusters": Preset("Routing Transformer's k-means clusters: 1 (all memory), 4, 16, 64 (reading.clusters, balanced)",
                       lambda ctx: [Axis("reading.clusters", ("1", "4", "16", "64"))]),
}


def summary_tokens(ctx: MethodContext) -> int:
    """AutoCompressor's default summary tokens per segment for this run (what its cap counts in)."""
    return METHODS.get("autocompressor").config(ctx).writing.memory_tokens
