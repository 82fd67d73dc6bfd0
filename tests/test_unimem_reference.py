"""The engine against an independent float64 reference of UniMem (tests/reference_unimem.py), token by token.

Every registered method's default and a grid of variants (window full/sliding and dilated, sizes, globals, top-k up
to k = all, every overflow policy and position mode, RMT read/write slots, pooling, injection sets, segment lengths
of 1 and not dividing the document) on random tiny LLaMAs (GQA, 3 layers) and on stories260K: per-token NLL within
1e-5. The reference reads only the config's values, never engine code.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from helpers import BOOKS, STORIES, random_docs, slow_only, tiny_llama
from reference_unimem import (
    Description,
    EvictionSpec,
    LongMemSpec,
    ReferenceLlama,
    eviction_nll,
    longmem_nll,
    reference_nll,
)

from unimem_bench.methods import METHODS, PAPER_CONTEXT, MemoryLM, MethodContext, UniMemConfig

ATOL = 1e-5
TINY_CONTEXT = 16
"""The tiny models' trained context: position interpolation reading 4 segments of 8 interpolates by 2."""


@dataclass(frozen=True)
class Case:
    """One grid point: a method, `--set` overrides, the segment length and the document length."""

    name: str
    method: str
    overrides: tuple[str, ...] = ()
    segment: int = 8
    doc: int = 44
    distinct: bool = False
    """A document of distinct tokens: where top-k keys are attended at different positions (Unlimiformer), a
    repeated token's equal layer-0 keys tie in the search, and which one wins is arbitrary (rounding decides)."""
    double: bool = False
    """Run the tiny model in float64: block ranks by representative keys (sums of q . k over a segment) can fall
    within float32 rounding of each other, and then which block wins is arbitrary."""


def case(name: str, method: str, *overrides: str, segment: int = 8, doc: int = 44, distinct: bool = False,
         double: bool = False) -> Case:
    return Case(name, method, overrides, segment, doc, distinct, double)


GRID = [
    # Window: full or sliding, dilated, smaller than the memory, longer than a segment.
    case("xl-full", "transformer_xl", "reading.sliding=false"),
    case("xl-sliding", "transformer_xl", "reading.sliding=true"),
    case("xl-window5-of-16", "transformer_xl", "management.size=16", "reading.window=5"),
    case("xl-sliding-window12-of-16", "transformer_xl", "management.size=16", "reading.window=12",
         "reading.sliding=true"),
    case("xl-stride2-sliding", "transformer_xl", "reading.stride=2", "reading.sliding=true"),
    case("xl-stride3-full", "transformer_xl", "reading.stride=3", "reading.sliding=false"),
    case("xl-layers-0-2", "transformer_xl", "injection.layers=0,2"),
    case("xl-segment1", "transformer_xl", "management.size=4", "reading.window=4", segment=1, doc=12),
    case("xl-segment5-uneven", "transformer_xl", segment=5, doc=23),
    case("xl-segment7-uneven", "transformer_xl", "reading.sliding=true", segment=7, doc=30),
    *[case(f"xl-{mode}", "transformer_xl", f"position.mode={mode}") for mode in ("official", "compact", "absolute")],
    # Top-k: a real selection, k >= memory (all of it), every position mode, one-token segments.
    case("mt-top3", "memorizing_transformer", "reading.topk=3", "injection.layers=all"),
    case("mt-top-all", "memorizing_transformer", "reading.topk=64", "injection.layers=all"),
    *[case(f"mt-top3-{mode}", "memorizing_transformer", "reading.topk=3", f"position.mode={mode}")
      for mode in ("official", "compact", "absolute")],
    case("mt-top3-faiss-flat", "memorizing_transformer", "reading.topk=3", "reading.index=faiss-flat"),
    case("mt-segment1", "memorizing_transformer", "management.size=5", "reading.topk=2", segment=1, doc=10),
    # Overflow, with a window and top-k over a memory of 12 written 8 at a time.
    *[case(f"overflow-{policy}", "memorizing_transformer", "management.size=12", f"management.overflow={policy}",
           "reading.topk=3", "reading.window=4", "injection.layers=all")
      for policy in ("fifo", "clear", "clear-and-write")],
    # Longformer: dilation, global sources, window modes, overflow, positions.
    case("lf-stride1", "longformer", "reading.stride=1"),
    case("lf-stride3", "longformer", "reading.stride=3"),
    case("lf-segment7-uneven", "longformer", segment=7, doc=30),  # odd memory sizes: stride counts memory indices
    *[case(f"lf-globals-{src}", "longformer", f"reading.global_source={src}") for src in ("document", "memory")],
    case("lf-full-window", "longformer", "reading.sliding=false"),
    case("lf-fifo", "longformer", "management.overflow=fifo"),
    case("lf-clear-and-write", "longformer", "management.overflow=clear-and-write"),
    case("lf-memory-globals-clear", "longformer", "reading.global_source=memory", "management.overflow=clear",
         "reading.sliding=true", "reading.stride=2"),
    *[case(f"lf-{mode}", "longformer", f"position.mode={mode}") for mode in ("official", "compact", "absolute")],
    # RMT: read/write slots, more memory tokens, every position mode, with a KV window.
    *[case(f"rmt-write-{slots}", "rmt", "writing.memory_tokens=3", f"writing.write_slots={slots}")
      for slots in ("memory", "learned")],
    *[case(f"rmt-{mode}", "rmt", "writing.memory_tokens=3", f"position.mode={mode}")
      for mode in ("official", "compact", "absolute")],
    case("rmt-with-xl-window", "transformer_xl", "writing.memory_tokens=2"),
    case("rmt-segment1", "rmt", "writing.memory_tokens=2", segment=1, doc=10),
    # UniMix: window + globals + top-k + memory tokens in one softmax.
    case("unimix-top2", "unimix", "reading.topk=2"),
    case("unimix-full-window", "unimix", "reading.sliding=false"),
    case("unimix-sliding", "unimix", "reading.sliding=true"),
    case("unimix-sliding-stride2", "unimix", "reading.sliding=true", "reading.stride=2"),
    case("unimix-write-learned", "unimix", "writing.memory_tokens=2", "writing.write_slots=learned"),
    *[case(f"unimix-globals-{src}", "unimix", f"reading.global_source={src}") for src in ("document", "memory")],
    *[case(f"unimix-{mode}", "unimix", f"position.mode={mode}") for mode in ("official", "compact", "absolute")],
    # Pooling writes, read by window and by top-k.
    case("pool2-window", "transformer_xl", "writing.kv=pooling", "writing.pool_ratio=2", "management.size=8"),
    case("pool2-window-compact", "transformer_xl", "writing.kv=pooling", "writing.pool_ratio=2", "management.size=8",
         "position.mode=compact"),
    case("pool3-topk", "memorizing_transformer", "writing.kv=pooling", "writing.pool_ratio=3", "reading.topk=2",
         "injection.layers=all"),
    # Memory globals alone; the whole memory by position; position interpolation with a fixed factor.
    case("memory-globals-only", "vanilla", "writing.kv=direct", "management.size=12", "reading.global_tokens=3",
         "reading.global_source=memory"),
    case("read-all", "vanilla", "writing.kv=direct", "management.size=16", "reading.read_all=true"),
    case("pi-factor3", "position_interpolation", "position.rope_factor=3"),
    # StreamingLLM: sinks at per-query cache positions; more sinks than a segment; a window longer than a segment;
    # sinks at fixed compact positions; one-token segments.
    case("sllm-sinks3", "streaming_llm", "reading.global_tokens=3"),
    case("sllm-sinks11-segment5", "streaming_llm", "reading.global_tokens=11", segment=5, doc=30),
    case("sllm-window12-of-12", "streaming_llm", "management.size=12", "reading.window=12"),
    case("sllm-no-shift", "streaming_llm", "position.sink_shift=false"),
    case("sllm-segment1", "streaming_llm", "management.size=4", "reading.window=4", segment=1, doc=12),
    # BigBird: random slots per query block (one block per query, blocks of 3 and 8, more slots than candidates, a
    # second seed), with every position mode, full and fifo memory, and without window or globals.
    case("bb-random2-block3", "bigbird", "reading.random_slots=2", "reading.random_block=3"),
    case("bb-random5-block8-seed7", "bigbird", "reading.random_slots=5", "reading.random_block=8",
         "reading.random_seed=7"),
    case("bb-random-all", "bigbird", "reading.random_slots=40"),
    case("bb-full-window", "bigbird", "reading.sliding=false", "management.size=20", "management.overflow=fifo"),
    *[case(f"bb-{mode}", "bigbird", f"position.mode={mode}") for mode in ("official", "compact", "absolute")],
    case("bb-random-only", "vanilla", "writing.kv=direct", "management.size=12", "reading.random_slots=3",
         "reading.random_block=2"),
    case("bb-segment5-uneven", "bigbird", segment=5, doc=30),
    # LongNet: dilated patterns with per-head offsets over memory and input, every position mode, a sliding window,
    # a rate-3 pattern (offsets 0-2 on 4 heads), patterns not aligned with the run's segments.
    case("ln-default-compact", "longnet", "position.mode=compact"),
    case("ln-official", "longnet", "position.mode=official"),
    case("ln-rates-1-3", "longnet", "reading.dilated_segments=[6,12]", "reading.dilation_rates=[1,3]"),
    case("ln-uneven", "longnet", "reading.dilated_segments=[5,11,20]", segment=7, doc=40),
    case("ln-sliding-window", "longnet", "reading.read_all=false", "reading.window=8", "reading.sliding=true"),
    case("ln-segment1", "longnet", "reading.dilated_segments=[2,4]", "reading.dilation_rates=[1,2]",
         "management.size=4", segment=1, doc=12),
    case("globals-over-segments", "longformer", "reading.global_source=document", "reading.global_tokens=11",
         segment=5, doc=30),
    # Chunk-level retrieval: chunks of 2 and 3 (a short last chunk), mean and bounds keys, per-query limits under a
    # sliding window, every position mode, chunks covering all memory.
    *[case(f"chunk{c}-{key}", "memorizing_transformer", f"reading.chunk_size={c}", f"reading.topk={2 * c}",
           f"reading.chunk_key={key}", "injection.layers=all") for c in (2, 3) for key in ("mean", "bounds")],
    *[case(f"chunk2-{key}-sliding-window", "memorizing_transformer", "reading.chunk_size=2", "reading.topk=4",
           f"reading.chunk_key={key}", "reading.window=6", "reading.sliding=true", "management.size=20")
      for key in ("mean", "bounds")],
    *[case(f"chunk3-{mode}", "memorizing_transformer", "reading.chunk_size=3", "reading.topk=6",
           "reading.chunk_key=bounds", f"position.mode={mode}") for mode in ("official", "compact", "absolute")],
    case("chunk4-all", "memorizing_transformer", "reading.chunk_size=4", "reading.topk=64"),
    # FoT / LongLLaMA: dense memory attention (a LongLLaMA checkpoint) and kNN top-k, memory keys at position 0.
    case("fot-dense", "fot", "reading.topk=0", "reading.read_all=true", "injection.layers=1"),
    case("fot-top3-chunks", "fot", "reading.topk=3", "reading.chunk_size=3"),
    # Unlimiformer: top-k slots at positions scaled into the trained context (16 here, 8 left to memory).
    case("unlimiformer-top8", "unlimiformer", "reading.topk=8", distinct=True),
    case("unlimiformer-top3", "unlimiformer", "reading.topk=3", distinct=True),
    case("unlimiformer-top-all", "unlimiformer", "reading.topk=64", distinct=True),  # the doubled stories doc selects
    case("unlimiformer-segment5", "unlimiformer", "reading.topk=4", segment=5, doc=31, distinct=True),
    case("unlimiformer-chunks", "unlimiformer", "reading.topk=4", "reading.chunk_size=2", distinct=True),
    case("unlimiformer-fifo12", "unlimiformer", "reading.topk=3", "management.size=12", distinct=True),
    # LongMem: token-level and chunked retrieval (a short last chunk), a bank smaller than the document (FIFO), the
    # identity SideNet, a closed gate, every side layer fused, one-token segments.
    case("longmem-tokens", "longmem", "reading.chunk_size=0", "reading.topk=3"),
    case("longmem-chunk3-fifo10", "longmem", "reading.chunk_size=3", "reading.topk=6", "management.size=10"),
    case("longmem-identity", "longmem", "injection.side_init=identity"),
    case("longmem-closed", "longmem", "injection.side_gate=-.inf"),
    case("longmem-fuse1", "longmem", "injection.side_fusion=1", "reading.topk=8"),
    case("longmem-segment1", "longmem", "reading.topk=2", "reading.chunk_size=2", segment=1, doc=12),
    case("chunk3-segment1", "memorizing_transformer", "management.size=7", "reading.chunk_size=3", "reading.topk=3",
         segment=1, doc=12),
    # Reading at the output distribution: kNN-LM's mixture and TRIME's joint softmax (few neighbours, so the
    # search matters; segment 1 puts every entry through the pending last token; temperatures rescale).
    *[case(f"knn-top3-{index}", "knn_lm", "reading.output_topk=3", f"reading.index={index}")
      for index in ("torch", "faiss-flat", "faiss-ivf")],
    case("knn-lambda-half-t5", "knn_lm", "reading.output_lambda=0.5", "reading.output_temperature=5"),
    case("knn-segment1", "knn_lm", "reading.output_topk=2", segment=1, doc=12),
    case("knn-with-xl", "transformer_xl", "reading.output=knn", "reading.output_topk=4"),
    case("trime-top2", "trime", "reading.output_topk=2"),
    case("trime-t2-faiss", "trime", "reading.output_topk=5", "reading.output_temperature=2",
         "reading.index=faiss-flat"),
    case("trime-segment5", "trime", "reading.output_topk=3", segment=5, doc=31),
    # AutoCompressor: summary vectors accumulated (the first segment reading none), capped mid-segment and at one
    # segment's worth, every position mode, beside a key/value window, one-token segments.
    case("ac-k2-uncapped", "autocompressor", "writing.memory_tokens=2", "writing.memory_cap=0"),
    case("ac-k2-cap5", "autocompressor", "writing.memory_tokens=2", "writing.memory_cap=5"),
    case("ac-k3-cap3", "autocompressor", "writing.memory_tokens=3", "writing.memory_cap=3"),
    *[case(f"ac-{mode}", "autocompressor", "writing.memory_tokens=2", f"position.mode={mode}")
      for mode in ("official", "compact", "absolute")],
    case("ac-with-xl-window", "transformer_xl", "writing.memory_tokens=2", "writing.memory_mode=accumulate",
         "writing.write_slots=learned", "writing.memory_cap=6"),
    case("ac-segment1", "autocompressor", "writing.memory_tokens=1", "writing.memory_cap=4", segment=1, doc=10),
    # Reformer: LSH buckets (2 and 4 of them, one round and several, another seed, one bucket = all), every position
    # mode, a sliding window in front (LSH among the slots before each query's reach), fifo memory, segments of 5.
    case("lsh-4x1", "reformer", "reading.lsh_buckets=4", "reading.lsh_rounds=1"),
    case("lsh-4x3-seed5", "reformer", "reading.lsh_buckets=4", "reading.lsh_rounds=3", "reading.lsh_seed=5"),
    case("lsh-2x2-fifo", "reformer", "reading.lsh_buckets=2", "reading.lsh_rounds=2", "management.overflow=fifo"),
    case("lsh-one-bucket", "reformer", "reading.lsh_buckets=1"),
    *[case(f"lsh-4x2-{mode}", "reformer", "reading.lsh_buckets=4", "reading.lsh_rounds=2", f"position.mode={mode}")
      for mode in ("official", "compact", "absolute")],
    case("lsh-sliding-window", "reformer", "reading.lsh_buckets=4", "reading.lsh_rounds=2", "reading.window=6",
         "reading.sliding=true", "management.size=20", "management.overflow=fifo"),
    case("lsh-segment5", "reformer", "reading.lsh_buckets=4", "reading.lsh_rounds=2", segment=5, doc=31),
    # Routing Transformer: 1-4 clusters, explicit sizes, decays, seeds, every position mode, a sliding window,
    # segments of 5 and 1 (the centroids move after every segment). Distinct tokens: no tied keys at the top-w cut.
    case("route-2", "routing", "reading.clusters=2", distinct=True),
    case("route-3-size4-decay0", "routing", "reading.clusters=3", "reading.cluster_size=4", "reading.cluster_decay=0",
         "reading.cluster_seed=2", "management.overflow=fifo", distinct=True),
    case("route-one-cluster", "routing", "reading.clusters=1"),
    *[case(f"route-3-{mode}", "routing", "reading.clusters=3", f"position.mode={mode}", distinct=True)
      for mode in ("official", "compact", "absolute")],
    case("route-sliding-window", "routing", "reading.clusters=2", "reading.window=6", "reading.sliding=true",
         "management.size=20", "management.overflow=fifo", distinct=True),
    case("route-segment5", "routing", "reading.clusters=3", "reading.cluster_decay=0.9", segment=5, doc=31,
         distinct=True),
    case("route-segment1", "routing", "reading.clusters=2", "management.size=6", segment=1, doc=12, distinct=True),
    # Quest: pages by min/max bound with the first layers dense (official and absolute positions, a dense layer beside
    # a sliding window). InfLLM: blocks ranked by their representative keys (r below and at the block size, a short
    # last block, uneven segments, every position mode).
    case("quest-pages4", "quest", "reading.chunk_size=4", "reading.topk=8"),
    case("quest-pages3-absolute", "quest", "reading.chunk_size=3", "reading.topk=6", "position.mode=absolute"),
    case("quest-dense-1-only", "quest", "reading.chunk_size=2", "reading.topk=4", "reading.dense_layers=1"),
    case("dense-layer-beside-window", "transformer_xl", "management.size=16", "reading.window=5",
         "reading.sliding=true", "reading.dense_layers=2", "position.mode=official"),
    case("infllm-blocks3-r2", "infllm", "reading.chunk_size=3", "reading.topk=6", "reading.representatives=2",
         "reading.window=6", "reading.global_tokens=2", double=True),
    case("infllm-blocks4-r4", "infllm", "reading.chunk_size=4", "reading.topk=8", "reading.representatives=4",
         "reading.window=4", double=True),
    case("infllm-blocks4-r1-segment5", "infllm", "reading.chunk_size=4", "reading.topk=4",
         "reading.representatives=1", "reading.window=6", segment=5, doc=31, double=True, distinct=True),
    *[case(f"infllm-{mode}", "infllm", "reading.chunk_size=3", "reading.topk=6", "reading.representatives=2",
           "reading.window=6", f"position.mode={mode}", double=True) for mode in ("official", "absolute")],
    # Pages ranked once per query block (summed over its queries and the KV head's query heads): blocks dividing the
    # segment or not, the whole segment as one block, a block of one query, every chunk key, a sliding window.
    case("infllm-per-block3", "infllm", "reading.chunk_size=3", "reading.topk=6", "reading.representatives=2",
         "reading.window=6", "reading.chunk_select=block", "reading.chunk_block=3", double=True),
    case("infllm-per-block4-segment5", "infllm", "reading.chunk_size=4", "reading.topk=4",
         "reading.representatives=1", "reading.window=6", "reading.chunk_select=block", "reading.chunk_block=4",
         segment=5, doc=31, double=True, distinct=True),
    case("quest-per-segment", "quest", "reading.chunk_size=4", "reading.topk=8", "reading.chunk_select=block",
         double=True),
    case("quest-per-block1", "quest", "reading.chunk_size=2", "reading.topk=4", "reading.chunk_select=block",
         "reading.chunk_block=1", double=True),
    # A FIFO memory that overflows: chunk keys cached by memory id, reused when the drop keeps chunks aligned (8 of 4)
    # and recomputed when it does not (8 of 3).
    *[case(f"infllm-fifo-chunks{c}-{select}", "infllm", f"reading.chunk_size={c}", f"reading.topk={2 * c}",
           "reading.representatives=2", "reading.window=4", "management.size=16", f"reading.chunk_select={select}",
           "reading.chunk_block=4", double=True) for c in (3, 4) for select in ("query", "block")],
    case("mean-chunks-per-block-sliding", "memorizing_transformer", "reading.chunk_size=2", "reading.topk=4",
         "reading.chunk_key=mean", "reading.window=6", "reading.sliding=true", "management.size=20",
         "reading.chunk_select=block", "reading.chunk_block=5", double=True),
]


def defaults(segment: int = 8, doc: int = 44) -> list[Case]:
    return [case(f"{name}-default", name, segment=segment, doc=doc,
                 distinct=METHODS.get(name).config(PAPER_CONTEXT).position.scaled_memory) for name in METHODS.names()]


def describe(config: UniMemConfig, *, n_layers: int, segment_len: int, trained_context: int) -> Description:
    """The config's values as the reference's plain description."""
    m, w, r, p = config.management, config.writing, config.reading, config.position
    local = segment_len * p.segment_factor
    layers = range(n_layers) if config.injection.layers == "all" else config.injection.layers
    return Description(
        segment_len=local, layers=frozenset(layers) if w.kv != "none" else frozenset(), size=m.size,
        overflow=m.overflow, kv=w.kv, pool_ratio=w.pool_ratio, memory_tokens=w.memory_tokens,
        write_slots=w.write_slots, window=r.window, sliding=r.sliding, stride=r.stride, global_tokens=r.global_tokens,
        global_source=r.global_source, topk=r.topk, read_all=r.read_all,
        position=p.mode, rope_factor=p.rope_factor or max(1.0, local / trained_context), sink_shift=p.sink_shift,
        random_slots=r.random_slots, random_block=r.random_block, random_seed=r.random_seed,
        dilated_segments=r.dilated_segments, dilation_rates=r.dilation_rates,
        chunk_size=r.chunk_size, chunk_key=r.chunk_key, scaled_memory=p.scaled_memory, trained_context=trained_context,
        pooled_tier=w.pooled_tier,
        output=r.output, output_topk=r.output_topk, output_lambda=r.output_lambda,
        output_temperature=r.output_temperature,
        memory_mode=w.memory_mode, memory_cap=w.memory_cap,
        lsh_buckets=r.lsh_buckets, lsh_rounds=r.lsh_rounds, lsh_seed=r.lsh_seed, clusters=r.clusters,
        cluster_size=r.cluster_size, cluster_decay=r.cluster_decay, cluster_seed=r.cluster_seed,
        representatives=r.representatives, dense_layers=frozenset(r.dense_layers),
        chunk_select=r.chunk_select, chunk_block=r.chunk_block,
    )


def reference_llama(model: torch.nn.Module) -> ReferenceLlama:
    """The reference decoder on the model's weights (its state dict and architecture numbers only)."""
    c = model.config
    return ReferenceLlama(model.state_dict(), heads=c.num_attention_heads, kv_heads=c.num_key_value_heads,
                          eps=c.rms_norm_eps, rope_theta=c.rope_parameters["rope_theta"])


def check_against_reference(model: torch.nn.Module, spec: Case, doc: torch.Tensor, trained_context: int) -> None:
    n_layers = model.config.num_hidden_layers
    ctx = MethodContext(n_layers=n_layers, segment_len=spec.segment, trained_context=trained_context)
    config = METHODS.get(spec.method).config(ctx, spec.overrides)
    description = describe(config, n_layers=n_layers, segment_len=spec.segment, trained_context=trained_context)
    embeddings = None
    with MemoryLM(model, config, segment_len=spec.segment, trained_context=trained_context) as lm:
        if config.writing.memory_tokens:
            # Our own memory tokens (not the engine's initialisation), loaded like a fine-tuned checkpoint's.
            generator = torch.Generator().manual_seed(7)
            embeddings = torch.randn(config.writing.memory_tokens, model.config.hidden_size, generator=generator)
            lm.load_method_state({"memory_embeddings": embeddings})
        side = lm.method_state() if config.injection.side_layers else {}
        if side and math.isfinite(config.injection.side_gate):
            # Gates of our own, one per head (not the initial even mix), loaded like a side-tuned checkpoint's.
            side["side.gate"] = torch.randn(side["side.gate"].shape, generator=torch.Generator().manual_seed(7))
            lm.load_method_state(side)
        got = lm.score([doc])[0]
    if side:
        inj = config.injection
        longmem = LongMemSpec(segment_len=spec.segment, source=inj.resolve(n_layers)[0], spans=inj.side_spans(n_layers),
                              fusion=inj.side_fusion, size=config.management.size, topk=config.reading.topk,
                              chunk_size=config.reading.chunk_size or 1)
        expected = longmem_nll(reference_llama(model), side, longmem, doc)
    elif config.management.scored:  # score-based eviction: the reference's per-head slot lists
        m = config.management
        evicting = EvictionSpec(segment_len=spec.segment, size=m.size, policy=m.eviction, position=config.position.mode,
                                sinks=m.sinks, recent=m.recent, observe=m.observe, pool_kernel=m.pool_kernel,
                                layer_budget=m.layer_budget, pyramid_beta=m.pyramid_beta, head_budget=m.head_budget,
                                head_floor=m.head_floor, budget=m.budget)
        expected = eviction_nll(reference_llama(model), evicting, doc)[0]
    else:
        expected = reference_nll(reference_llama(model), description, doc, embeddings)
    assert got.shape == expected.shape == (len(doc) - 1,)
    torch.testing.assert_close(got.double(), expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("spec", defaults() + GRID, ids=lambda c: c.name)
def test_engine_equals_reference_on_a_tiny_llama(spec: Case, one_thread) -> None:
    model = tiny_llama(layers=3, heads=4, kv_heads=2, context=TINY_CONTEXT, seed=3)
    model = model.double() if spec.double else model
    doc = torch.randperm(99, generator=torch.Generator().manual_seed(5))[:spec.doc] if spec.distinct else (
        random_docs([spec.doc], seed=5)[0])
    check_against_reference(model, spec, doc, TINY_CONTEXT)


def test_documents_batched_in_lockstep_equal_the_reference(one_thread) -> None:
    """Rows leave the batch (and its memory) as their documents end; each still matches its own reference run."""
    model = tiny_llama(layers=3, heads=4, kv_heads=2, context=TINY_CONTEXT, seed=3)
    config = METHODS.get("unimix").config(MethodContext(n_layers=3, segment_len=8, trained_context=TINY_CONTEXT))
    docs = random_docs([44, 19, 30], seed=6)
    embeddings = torch.randn(config.writing.memory_tokens, model.config.hidden_size,
                             generator=torch.Generator().manual_seed(7))
    with MemoryLM(model, config, segment_len=8, trained_context=TINY_CONTEXT) as lm:
        lm.load_method_state({"memory_embeddings": embeddings})
        got = lm.score(docs, batch_size=3)
    llama = reference_llama(model)
    description = describe(config, n_layers=3, segment_len=8, trained_context=TINY_CONTEXT)
    for doc, nll in zip(docs, got, strict=True):
        expected = reference_nll(llama, description, doc, embeddings)
        torch.testing.assert_close(nll.double(), expected, atol=ATOL, rtol=0)


def stories_doc(n: int, distinct: bool = False) -> torch.Tensor:
    """n tokens of a book; `distinct` (`Case.distinct`): the book's tokens in order with each id kept once."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(STORIES)
    book = next(iter(sorted(BOOKS.glob("*.txt")))).read_text() if BOOKS.is_dir() else None
    text = book[20_000:20_800] if book else (
        "Once upon a time there was a little girl who loved to read books about the sea. " * 12)
    ids = tokenizer(text)["input_ids"]
    if distinct:
        ids = list(dict.fromkeys(ids + (tokenizer(book[20_000:40_000])["input_ids"] if book else [])))  # first ones
        seen = set(ids)
        ids += [i for i in range(tokenizer.vocab_size) if i not in seen]  # without a book: the rest, in id order
    return torch.tensor(ids[:n])


def stories_model(folder: Path) -> torch.nn.Module:
    """stories260K in float64: in float32 its engine and reference NLLs (~4 nats) differ by up to 2e-5 from rounding;
    in float64 (transformers still takes RMSNorm and the RoPE tables through float32) by at most 5e-6."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float64).eval()


@pytest.mark.parametrize("spec", defaults(segment=32, doc=110), ids=lambda c: c.name)
def test_engine_equals_reference_on_stories260k(spec: Case, stories_dir, one_thread) -> None:
    model = stories_model(stories_dir)
    check_against_reference(model, spec, stories_doc(spec.doc), model.config.max_position_embeddings)


@pytest.mark.slow
@pytest.mark.parametrize("spec", [dataclasses.replace(c, doc=c.doc * 2) for c in GRID], ids=lambda c: c.name)
def test_engine_equals_reference_grid_on_stories260k(spec: Case, stories_dir, one_thread, request) -> None:
    slow_only(request, "the variant grid on stories260K takes minutes")
    model = stories_model(stories_dir)
    check_against_reference(model, spec, stories_doc(spec.doc, spec.distinct), model.config.max_position_embeddings)
