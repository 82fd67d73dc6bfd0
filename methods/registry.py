"""Registries by decorator (as lm-evaluation-harness has them) and the method registry.

`Registry` is the primitive every registry of the project uses (methods here, tasks in `tasks.base`): duplicates are
rejected and unknown names get close-name suggestions. Each method file registers a function that builds its
UniMemConfig for a model.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

from unimem_bench.methods.config import UniMemConfig, format_layers

T = TypeVar("T")


class UnknownNameError(KeyError):
    """An unknown method or task name; str() is one line with close-name suggestions."""

    def __str__(self) -> str:
        return str(self.args[0])


class Registry(Generic[T]):
    """Maps names to registered objects of one kind ("method", "task")."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator: register the object under `name`; a second registration of a name is an error."""

        def decorate(obj: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} is already registered by {self._items[name]!r}")
            self._items[name] = obj
            return obj

        return decorate

    def names(self) -> list[str]:
        return list(self._items)

    def get(self, name: str) -> T:
        if name not in self._items:
            close = difflib.get_close_matches(name, self._items, n=3, cutoff=0.5)
            hint = f"did you mean {' or '.join(map(repr, close))}? " if close else ""
            raise UnknownNameError(f"unknown {self.kind} {name!r}: {hint}known: {', '.join(self._items)} "
                                   f"(see `unimem-bench list`)")
        return self._items[name]

    def resolve(self, spec: str) -> list[str]:
        """`all` or a comma list -> registered names in order, each checked."""
        if spec.strip() == "all":
            return self.names()
        names = [part.strip() for part in spec.split(",") if part.strip()]
        if not names:
            raise UnknownNameError(f"no {self.kind} given: name one or more ({', '.join(self._items)}) or `all`")
        for name in names:
            self.get(name)
        return list(dict.fromkeys(names))


PAPER_SEGMENT = 2048
"""The paper's local context (TinyLLaMA, Table 2): sizes given in tokens there are multiples of it."""


@dataclass(frozen=True)
class MethodContext:
    """What a method's defaults scale with."""

    n_layers: int
    """Decoder layers of the loaded model."""
    segment_len: int
    """Tokens per streamed segment in this run."""
    trained_context: int
    """The model's trained context length."""
    memory_layers: tuple[int, ...] = ()
    """Memory layers a memory-trained checkpoint names (LongLLaMA's `mem_layers`); empty for a plain model."""
    summary_tokens: int = 0
    """Summary tokens per segment an AutoCompressor checkpoint was trained with (its `summary_length`); 0 otherwise."""

    def segments(self, n: float) -> int:
        """`n` segments in tokens: the paper's sizes are whole 2,048-token segments."""
        return int(n * self.segment_len)

    def paper_tokens(self, n: int) -> int:
        """A per-segment token count from the paper (e.g. 40 memory tokens per 2,048), scaled to this segment."""
        return max(1, round(n * self.segment_len / PAPER_SEGMENT))


PAPER_CONTEXT = MethodContext(n_layers=22, segment_len=PAPER_SEGMENT, trained_context=PAPER_SEGMENT)
"""The paper's TinyLLaMA setting (22 layers, 2,048-token segments), used to print Table 1."""


@dataclass(frozen=True)
class Method:
    """A registered method: its paper and the function that builds its config."""

    name: str
    paper: str
    url: str
    build: Callable[[MethodContext], UniMemConfig]
    fidelity: str
    """How the config relates to the original: `exact`, `decoder variant` or `approximation`, then what differs."""

    def config(self, ctx: MethodContext, overrides: Sequence[str] = ()) -> UniMemConfig:
        """The method's defaults for this model and segment length, with `section.field=value` overrides."""
        return self.build(ctx).with_overrides(list(overrides))


METHODS: Registry[Method] = Registry("method")


FIDELITY_KINDS = ("exact", "decoder variant", "approximation")
"""How a method's config relates to the original computation; a fidelity line starts with one of these."""


def method(name: str, *, paper: str, url: str,
           fidelity: str) -> Callable[[Callable[[MethodContext], UniMemConfig]], Method]:
    """Decorator registering a config-building function as method `name`; `fidelity` starts with one of
    FIDELITY_KINDS and says what differs from the original."""
    if not fidelity.startswith(FIDELITY_KINDS):
        raise ValueError(f"method {name!r}: fidelity {fidelity!r} must start with one of {FIDELITY_KINDS}")

    def decorate(build: Callable[[MethodContext], UniMemConfig]) -> Method:
        return METHODS.register(name)(Method(name=name, paper=paper, url=url, build=build, fidelity=fidelity))

    return decorate


def describe(config: UniMemConfig) -> dict[str, str]:
    """The four dimensions in words, as the paper's Table 1 lists them."""
    m, w, r = config.management, config.writing, config.reading
    management = f"{m.size:,} tok, {m.eviction if m.scored else m.overflow}" if m.size else "-"
    if m.size and m.budget:
        management = f"{m.budget:g} of the input, {m.eviction if m.scored else m.overflow}"
    if m.size and m.scored and (m.sinks or m.recent):
        management += f" (sinks {m.sinks}, recent {m.recent})"
    if not m.size and w.memory_tokens and w.memory_mode == "accumulate":
        management = f"{w.memory_cap:,} summary tok, oldest dropped" if w.memory_cap else "unbounded"
    if m.size and m.layer_budget == "pyramid":
        management += f", pyramid over layers (beta {m.pyramid_beta})"
    if m.size and m.head_budget == "adaptive":
        management += f", adaptive over heads (floor {m.head_floor:g})"
    if m.size and w.memory_tokens:
        management += f" + {w.memory_tokens} memory tok"
    if m.size and w.pooled_tier:
        management = f"{m.size:,} tok sliding, FIFO into a {w.pooled_tier:,}-slot pooled tier ({m.overflow})"
    if m.size and m.freeze_after_prompt:
        management += ", frozen after the prompt"
    writes = []
    if w.kv == "direct":
        writes.append("direct")
    elif w.kv == "pooling":
        writes.append(f"pooling /{w.pool_ratio}")
    if w.pooled_tier:
        writes.append(f"pooling /{w.pool_ratio} of evicted slots")
    if w.memory_tokens and w.memory_mode == "accumulate":
        writes.append(f"model forward ({w.memory_tokens} tok per segment, accumulated)")
    elif w.memory_tokens:
        writes.append(f"model forward ({w.memory_tokens} tok, {w.write_slots} write slots)")
    reads = []
    if r.read_all:
        reads.append("all")
    if r.window:
        reads.append(f"window {r.window:,}" + (" sliding" if r.sliding else "")
                     + (f" stride {r.stride}" if r.stride > 1 else ""))
    if r.global_tokens:
        reads.append(f"global {r.global_tokens} ({r.global_source})")
    if r.topk:
        reads.append(f"top-{r.topk} ({r.index})" if not r.chunk_size
                     else f"top-{r.topk} in chunks of {r.chunk_size} ({r.chunk_key})")
    if r.chunk_size and r.chunk_key == "representative":
        reads.append(f"{r.representatives} representatives per chunk")
    if r.dense_layers:
        reads.append(f"all in layers {format_layers(r.dense_layers)}")
    if r.random_slots:
        reads.append(f"random {r.random_slots} per {r.random_block} queries")
    if r.dilation_rates:
        reads.append("dilated " + " ".join(f"{w:,}/{k}" for w, k in zip(r.dilated_segments, r.dilation_rates,
                                                                       strict=True)))
    if w.pooled_tier:
        reads.append("pooled tier")
    if r.lsh_buckets:
        reads.append(f"LSH {r.lsh_buckets} buckets x {r.lsh_rounds} rounds")
    if r.clusters:
        reads.append(f"k-means {r.clusters} clusters" + (f" of {r.cluster_size}" if r.cluster_size else " (balanced)"))
    if w.memory_tokens:
        reads.append("memory tokens")
    if r.output != "none":
        reads.append(describe_output(config))
    extra = []
    if config.position.sink_shift:
        extra.append("sinks at cache positions")
    if config.position.rope_factor != 1:
        extra.append("PI x" + ("auto" if config.position.rope_factor == 0 else f"{config.position.rope_factor:g}"))
    if config.position.segment_factor != 1:
        extra.append(f"local context x{config.position.segment_factor}")
    if config.position.scaled_memory:
        extra.append("top-k scaled into the trained context")
    injection = format_layers(config.injection.layers) if (m.size or w.memory_tokens) else "-"
    if config.injection.side_layers:
        injection = (f"backbone layer {injection} writes; SideNet of {config.injection.side_layers} layers reads "
                     f"in side layer {config.injection.side_fusion} (gated)")
    training = "-" if not (m.size or w.memory_tokens) else config.training.strategy + (
        f" k={config.training.bptt_segments}" if config.training.strategy not in ("stop_gradient", "trime") else "")
    if r.output != "none":
        management = (management + " + " if m.size else "") + "datastore of the document" + (
            " + external corpus" if r.output_datastore else "") + ", no eviction"
        writes.append("direct (last FFN input -> next token)")
        injection = ("output of the last layer" if injection == "-" else injection + " + output")
        training = "inference only" if r.output == "knn" else config.training.strategy
    elif config.training.strategy == "trime":
        training = "trime (joint softmax with the segment's tokens)"
    return {
        "management": management,
        "writing": ", ".join(writes) or "-",
        "reading": ", ".join(reads) or "-",
        "injection": injection,
        "training": training,
        "position": config.position.mode + (f"; {', '.join(extra)}" if extra else ""),
    }


def describe_output(config: UniMemConfig) -> str:
    """Reading at the output distribution (kNN-LM, TRIME) in words."""
    r = config.reading
    if r.output == "knn":
        return (f"kNN-LM output: {r.output_topk:,} nearest (L2, {r.index}), T {r.output_temperature:g}, "
                f"lambda {r.output_lambda:g}")
    return f"TRIME joint softmax: local + top-{r.output_topk:,} ({r.index}), T {r.output_temperature:g}"
