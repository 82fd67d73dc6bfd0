"""The per-segment plan: what every injected layer reads and writes, and at which positions, built once.

`build_plan` is the only place a `SegmentPlan` is made; nothing changes it afterwards. A forward call gets a
`SegmentContext`: the plan plus what depends on which queries this call holds (the reading mask, the top-k limits)
and the gradient-checkpointing read cache, so a full segment forward and one decoding step share the plan.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from unimem_bench.methods.config import UniMemConfig, dense_reading
from unimem_bench.methods.engine.kernels import FusedKernel
from unimem_bench.methods.engine.memory import LayerMemory, MemoryState, overflow_drop
from unimem_bench.methods.engine.patterns import DilatedKeys, dilated_keys, dilated_mask, random_mask, random_reads
from unimem_bench.methods.engine.rotary_memo import RotaryMemo

# Compact prefixes up to this many slots are placed with whole (cos, sin) tables: at most 2 x 2,048 x head_dim floats
# (1.3 MiB at head dim 40), and `kernels.rotate_` on whole tables is 7 elementwise ops against 11 broadcasting half
# rows (StreamingLLM's 132-slot prefix: 63 -> ~40 us a layer); longer ones (budgets of long inputs) keep the halves.
WHOLE_TABLES = 2048

Rotary = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
"""The model's rotary embedding, or anything called like it: (probe, positions [1, n]) -> (cos, sin) [1, n, dim]."""


@dataclass(frozen=True)
class SegmentPlan:
    """What the injected layers read and write for one segment (or one open, decoding segment)."""

    n_read: int
    """RMT read slots at the front of the input."""
    n_seg: int
    """Segment tokens in the input (padding included: rows that end early are dropped afterwards)."""
    n_global: int
    """Global keys read by every query: pinned document tokens, or the bank's first slots (`globals_in_bank`)."""
    globals_in_bank: bool
    """The globals are bank slots [0, n_global) (reading.global_source=memory)."""
    n_window: int
    """Window slots: the bank's last n_window slots (after the globals)."""
    n_bank: int
    """Bank slots held before this segment's write."""
    first_id: int
    """Memory id of bank slot 0 (ids grow by one per written slot; faiss searches id ranges)."""
    to_global: int
    """Segment tokens that become pinned global tokens (document globals, first segment only)."""
    drop_old: int
    """Bank slots evicted from the front by this segment's write."""
    drop_new: int
    """Newly written slots dropped at once (one write larger than the memory, or a clear that writes nothing)."""
    n_new: int
    """Bank slots this segment's write produces before drops (0 when nothing is written)."""
    first_position: int
    """RoPE position of input index 0; the input runs on consecutively from it."""
    place: tuple[torch.Tensor, torch.Tensor] | None
    """(cos, sin) [n_global + n_window, head_dim] placing stored (unrotated) globals and window (compact mode); only
    the first halves [.., head_dim / 2] when `place_half` (`kernels.rotate` reads either)."""
    store: tuple[torch.Tensor, torch.Tensor] | None
    """(cos, sin) [input, head_dim] at the input's positions, undone on the keys written (memory at position 0)."""
    rope_scale: float
    """RoPE's attention scaling (1 for default and linear RoPE), undone when keys are stored unrotated."""
    detach_kv: bool
    """Store key/value memory without gradient history (stop-gradient, bptt_tokens, and always at evaluation)."""
    detach_tokens: bool
    """Keep RMT memory-token states without gradient history (stop-gradient, and always at evaluation)."""
    write: bool
    """Write this segment to memory; False for an open segment decoded through a KV cache."""
    doc_start: int = 0
    """Document position of the segment's first token (LongNet's dilation reads document positions)."""
    topk_place: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
    """(cos, sin, where): (cos, sin) [positions, head_dim] at positions 0, 1, .. and where [n_bank] each bank slot's
    scaled position, its row in them (position.scaled_memory): top-k slots are attended there, after a search on
    their stored (unrotated) keys. The slots share at most the trained context's positions, so the tables are a few
    KiB however long the memory."""
    n_tier: int = 0
    """Pooled-tier slots read by every query, between the globals and the window (writing.pooled_tier)."""
    tier_drop_old: int = 0
    """Pooled-tier slots dropped from the front by this write (the tier's overflow policy)."""
    tier_drop_new: int = 0
    """Slots this write pools into the tier that are dropped at once (a clear, or more than the tier holds)."""
    n_tier_after: int = 0
    """Pooled-tier slots held after this segment's write."""
    n_observe: int = 0
    """Question tokens after the segment that score-based eviction observes (query-aware compression): their
    queries score the candidates, their keys are never written, their outputs never read."""
    place_half: bool = False
    """`place` holds the first half of each table, the two halves being equal (`RotaryMemo.halves`): the compact
    prefix's tables are the largest the plan holds (PyramidKV's lowest layer: 32K slots at 64K tokens)."""

    @property
    def n_prefix(self) -> int:
        """Memory keys in front of the local keys: globals, the pooled tier, then the window."""
        return self.n_global + self.n_tier + self.n_window


def build_plan(config: UniMemConfig, state: MemoryState, *, n_read: int, n_seg: int, n_write: int, doc_start: int,
               rotary: Rotary, probe: torch.Tensor, write: bool, grad: bool, memory_room: int = 0,
               n_observe: int = 0) -> SegmentPlan:
    """The plan for the next input of `state`: [n_read read slots ; n_seg tokens ; n_write write slots].

    `probe` gives dtype and device for the rotary module; `grad` says whether gradients are being recorded;
    `memory_room` is the trained context minus the local context (the positions position.scaled_memory fills).
    """
    r, m, mode = config.reading, config.management, config.position.mode
    in_bank = r.global_source == "memory"
    n_global = min(r.global_tokens, state.n_bank) if in_bank else state.n_global
    free = state.n_bank - (n_global if in_bank else 0)
    n_window = free if r.read_all else min(r.window, free)
    # Document globals: the document's first G tokens, from as many first segments as they span.
    to_global = min(r.global_tokens - state.n_global, n_seg) if (write and not in_bank) else 0
    n_new = drop_old = drop_new = 0
    tier = config.writing.pooled_tier
    tier_drop_old = tier_drop_new = tier_new = 0
    if write and config.uses_kv_memory and m.size:
        n_rest = n_seg - to_global
        n_new = math.ceil(n_rest / config.writing.pool_ratio) if config.writing.kv == "pooling" else n_rest
        # With a pooled tier the direct bank slides (FIFO into the tier); the overflow policy is the tier's.
        drop_old, drop_new = overflow_drop(state.n_bank, n_new, m.size, "fifo" if tier else m.overflow)
        if tier:
            tier_new = math.ceil((drop_old + drop_new) / config.writing.pool_ratio)
            tier_drop_old, tier_drop_new = overflow_drop(state.n_tier, tier_new, tier, m.overflow)
    n_prefix = n_global + state.n_tier + n_window
    first = {"compact": n_prefix, "official": 0, "absolute": doc_start - n_read}[mode]
    topk_place = None
    if config.position.scaled_memory:
        first, topk_place = scaled_positions(state, doc_start, memory_room, rotary, probe)
    n_input = n_read + n_seg + n_write + n_observe
    place = store = None
    scale = float(getattr(rotary, "attention_scaling", 1.0))
    place_half = False
    if mode == "compact" and n_prefix > WHOLE_TABLES and isinstance(rotary, RotaryMemo):
        cos, sin, place_half = rotary.halves(probe, torch.arange(n_prefix, device=probe.device).unsqueeze(0))
        place = cos[0], sin[0]
    elif mode == "compact" and n_prefix:
        place = _cos_sin(rotary, probe, torch.arange(n_prefix))
    if mode != "absolute" and (n_new or to_global):
        store = _cos_sin(rotary, probe, torch.arange(first, first + n_input))
    strategy = config.training.strategy
    return SegmentPlan(
        n_read=n_read, n_seg=n_seg, n_global=n_global, globals_in_bank=in_bank, n_window=n_window,
        n_bank=state.n_bank, first_id=state.first_id, to_global=to_global, drop_old=drop_old, drop_new=drop_new,
        n_new=n_new, first_position=first, place=place, store=store, rope_scale=scale,
        detach_kv=not grad or strategy != "bptt", detach_tokens=not grad or strategy in ("stop_gradient", "trime"),
        write=write, doc_start=doc_start,
        topk_place=topk_place, n_observe=n_observe, place_half=place_half,
        n_tier=state.n_tier, tier_drop_old=tier_drop_old, tier_drop_new=tier_drop_new,
        n_tier_after=state.n_tier - tier_drop_old + tier_new - tier_drop_new,
    )


def _cos_sin(rotary: Rotary, probe: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    cos, sin = rotary(probe, positions.to(probe.device).unsqueeze(0))  # [1, n, head_dim] each
    return cos[0], sin[0]


@dataclass
class SegmentContext:
    """Handed to the model's forward as `unimem=`: the plan, and what this call's queries read."""

    config: UniMemConfig
    layers: frozenset[int]
    state: MemoryState
    plan: SegmentPlan
    mask: torch.Tensor | None
    """[queries, prefix + local keys] additive mask (0 / -inf); None: no prefix, or `open_prefix`, causal from the
    input's start."""
    topk_end: torch.Tensor | None
    """[queries] per query, the bank index before which top-k searches (None: no top-k this call)."""
    topk_start: int = 0
    """First bank slot top-k may pick (the bank globals come before it)."""
    random_slots: torch.Tensor | None = None
    """[queries, reading.random_slots] bank indices of each query's random slots, -1 where fewer were drawn (None:
    no random slots this call)."""
    random_blocks: torch.Tensor | None = None
    """[query blocks, reading.random_slots] `random_slots` once per query block, when the queries are whole
    blocks (every query of a block reads the same slots: one gather and one matmul per block); else None."""
    random_index: torch.Tensor | None = None
    """[query blocks * reading.random_slots] `random_blocks` flattened, -1 read as slot 0 (hidden by the merge):
    the gather index every layer uses, built once per segment."""
    random_padded: bool = True
    """`random_blocks` has -1 entries (blocks with fewer candidates than reading.random_slots) to hide."""
    sink_shift: torch.Tensor | None = None
    """[queries] position.sink_shift: how far each query's global keys move up from 0 .. G-1 (the window slots its
    sliding reach skips); the globals are then masked out of `mask` and read apart (None: no shift)."""
    sink_rotation: torch.Tensor | None = None
    """[queries, 2 * head_dim] (cos ; sin) at each query's sink_shift: a query q reads the global keys k moved up by
    its shift, R(shift) k = k cos + rotate_half(k) sin, as [q cos ; q sin] . [k ; rotate_half(k)], one matmul for
    all queries (built once per segment; None with no shift)."""
    sink_keys: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    """By (id of a layer's global keys, dtype, scale): those keys and their [k ; rotate_half(k)] x scale at positions
    0 .. G-1, [batch, kv_heads, G, 2 * head_dim] (`sinks.placed_sinks`); shared by the segments reusing this context
    (the globals are fixed)."""
    bucket_end: torch.Tensor | None = None
    """[queries] like topk_end, for the content selectors reading.lsh_buckets / reading.clusters (None: none this
    call); they select among the bank slots [topk_start, bucket_end[query])."""
    end_bounds: tuple[int, int] = (0, 0)
    """(lowest, highest) entry of topk_end and bucket_end, from the plan: reading them off the tensor would be a
    host sync per layer on a GPU."""
    reads: dict[int, LayerMemory] = field(default_factory=dict)
    """Per layer, the memory its first call read. Gradient checkpointing calls a layer again during backward; that
    call must read the same memory (not what later writes left) and write nothing."""
    dense: SegmentContext | None = None
    """The context of `reading.dense_layers`: every memory slot read by position (None: no dense layers)."""
    dilated: DilatedKeys | None = None
    """LongNet's mask narrowed per head offset to the keys its patterns reach (None: no dilation)."""
    open_prefix: bool = False
    """Every query reads every prefix key and the input causally: `mask` is None even with a prefix (`open_mask`
    builds it for a read that needs it; `split_read` needs none)."""
    random_mask: torch.Tensor | None = None
    """[queries, globals + bank slots past the bank globals + local keys] `mask` over the whole bank with each
    query's random slots opened (`patterns.random_mask`): the joined read then takes the whole bank and needs no
    merge; None where the random slots are merged apart (no random slots, compact positions, a pooled tier)."""
    open_masks: dict[tuple, torch.Tensor] = field(default_factory=dict)
    """By (prefix, local keys, dtype, device): `open_mask`, built by the first layer that reads joined and shared by
    the others (and by the segments that reuse this context)."""
    sink_buffers: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    """By (shape, dtype, zero keys or mask): the folded sinks' zero keys, and their [batch, heads, queries, keys] mask
    with the mask it was copied from (`sinks.sink_buffer`); shared by the layers and the segments reusing this
    context, each layer writing its sink logits into the mask's sink columns before its read."""
    kernel: FusedKernel = field(default_factory=FusedKernel)
    """What is known of the fused log-sum-exp op (`kernels.FusedKernel`): the model's own, so it is probed once."""


def segment_context(config: UniMemConfig, layers: frozenset[int], state: MemoryState, plan: SegmentPlan, *,
                    query_start: int, n_query: int, dtype: torch.dtype, device: torch.device,
                    kernel: FusedKernel | None = None) -> SegmentContext:
    """The context of one forward call whose queries are input indices query_start .. query_start + n_query - 1
    (the local keys are the input's first query_start + n_query tokens); `kernel`: the model's (a fresh one when
    None)."""
    kernel = kernel or FusedKernel()
    r = config.reading
    i = torch.arange(query_start, query_start + n_query, device=device)  # [queries] input indices
    reach, (most, least) = window_reach(config, plan, i, query_start, query_start + n_query - 1)  # [queries]
    shift = None
    if config.position.sink_shift and plan.n_global and not plan.globals_in_bank:
        shift = plan.n_window - reach  # [queries] window slots the query skips
    mask = None
    dilated = None
    # Every query of a whole input reads every prefix key, the input causally, and nothing is merged in by content:
    # no mask (`split_read`). Top-k, random slots, buckets and LRU keep the joined read and its mask.
    open_prefix = (not r.dilation_rates and query_start == 0 and shift is None and r.stride <= 1
                   and not (r.topk or r.random_slots or r.lsh_buckets or r.clusters)
                   and config.management.eviction != "lru" and least == plan.n_window)
    if r.dilation_rates:
        mask = dilated_mask(config, state, plan, i, reach, dtype)
        dilated = dilated_keys(mask)
    elif (plan.n_prefix or query_start) and not open_prefix:
        n_local = query_start + n_query
        visible = torch.ones(n_query, plan.n_prefix + n_local, dtype=torch.bool, device=device)
        if plan.n_window:
            w = torch.arange(plan.n_window, device=device)  # [window]
            seen = w[None, :] >= plan.n_window - reach[:, None]  # [queries, window]
            if r.stride > 1:
                slot = plan.n_bank - plan.n_window + w  # index in the bank (0 = oldest slot held)
                seen &= (slot[None, :] % r.stride) == (i[:, None] % r.stride)
            visible[:, plan.n_prefix - plan.n_window:plan.n_prefix] = seen
        j = torch.arange(n_local, device=device)
        visible[:, plan.n_prefix:] = j[None, :] <= i[:, None]  # the input, causally
        if shift is not None:
            visible[:, :plan.n_global] = False  # read apart, at per-query positions
        # Additive rather than boolean because SDPA converts a boolean mask to this in every call (once per layer).
        mask = torch.zeros(visible.shape, dtype=dtype, device=device).masked_fill(~visible, float("-inf"))
    start = plan.n_global if plan.globals_in_bank else 0
    reach_end = plan.n_bank - reach  # [queries]: top-k reads the slots before the query's window reach
    low, high = plan.n_bank - most, plan.n_bank - least  # reach_end's extremes, known without reading it
    topk_end = reach_end if r.topk and high > start else None
    random, random_blocks, random_index, random_padded = random_reads(config, plan, state.segments, i, start)
    bucket_end = reach_end if (r.lsh_buckets or r.clusters) and high > start else None
    dense = None
    if r.dense_layers:  # Quest's dense layers: the same write, every slot read (positions do not depend on it)
        dense_plan = dataclasses.replace(plan, n_window=plan.n_bank - (plan.n_global if plan.globals_in_bank else 0))
        dense = segment_context(dataclasses.replace(config, reading=dense_reading(r)), layers, state, dense_plan,
                                query_start=query_start, n_query=n_query, dtype=dtype, device=device, kernel=kernel)
    rotation = None
    if shift is not None and plan.place is not None:
        cos, sin = (t[shift] for t in plan.place)  # [queries, head_dim]; shifts lie in 0 .. n_window
        halves = 2 if plan.place_half else 1
        rotation = torch.cat([cos] * halves + [sin] * halves, dim=-1)  # [queries, 2 * head_dim]
    return SegmentContext(config=config, layers=layers, state=state, plan=plan, mask=mask, open_prefix=open_prefix,
                          topk_end=topk_end, random_mask=folded_random(plan, mask, random, start, shift),
                          topk_start=start, sink_shift=shift, sink_rotation=rotation, random_slots=random,
                          random_blocks=random_blocks, random_index=random_index, random_padded=random_padded,
                          bucket_end=bucket_end, end_bounds=(low, high), dense=dense, dilated=dilated, kernel=kernel)


def window_reach(config: UniMemConfig, plan: SegmentPlan, i: torch.Tensor, first: int,
                 last: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """Window slots each query (input indices i [queries], from `first` to `last`) reaches, counted from the bank's
    end: all of them, or W - i when sliding; and (most, least) of them, from `first` and `last` (a sliding reach
    falls as i grows), so no caller reads them off the tensor (a host sync on a GPU)."""
    r = config.reading
    if not r.sliding or r.read_all:
        return torch.full_like(i, plan.n_window), (plan.n_window, plan.n_window)

    def reach(at: torch.Tensor) -> torch.Tensor:
        return torch.clamp(r.window - at, 0, plan.n_window)

    most, least = reach(torch.tensor([first, last])).tolist()  # on the CPU: no device sync
    return reach(i), (most, least)


def folded_random(plan: SegmentPlan, mask: torch.Tensor | None, random: torch.Tensor | None, start: int,
                  shift: torch.Tensor | None) -> torch.Tensor | None:
    """`SegmentContext.random_mask`, where the random slots can be folded: stored keys read where they lie (no
    compact placement to re-lay), a window (the joined read takes the bank with it), no pooled tier and no
    shifted sinks."""
    if (random is None or mask is None or mask.dim() != 2 or plan.place is not None or plan.n_tier
            or shift is not None or not 0 < plan.n_window <= plan.n_bank - start):
        return None
    return random_mask(mask, random, plan.n_global, plan.n_bank, plan.n_window, start)


ContextCache = dict[tuple, tuple[UniMemConfig, torch.Tensor | None, SegmentContext] | None]
"""`cached_context`'s store: by shape key, the config it was built for, the window's positions relative to the
segment (dilation only) and the context; None for a shape seen once (its tensors are not kept)."""


def cached_context(cache: ContextCache, config: UniMemConfig, layers: frozenset[int],
                   state: MemoryState, plan: SegmentPlan, *, n_query: int, dtype: torch.dtype,
                   device: torch.device, kernel: FusedKernel | None = None) -> SegmentContext:
    """`segment_context` of a whole-input forward call (query_start 0), its tensors reused from `cache` when an
    earlier segment had the same shape: the mask, reach and sink rotations depend only on the plan's sizes (and, with
    dilation, on the document positions modulo the patterns' period), so a streamed document rebuilds them once
    per shape. BigBird's random slots, drawn per segment, are drawn afresh; dense layers are never cached."""
    r = config.reading
    if r.dense_layers:
        return segment_context(config, layers, state, plan, query_start=0, n_query=n_query, dtype=dtype,
                               device=device, kernel=kernel)
    window_pos = None
    period = 0
    if r.dilation_rates:  # the patterns compare positions // length and positions % rate: periodic in their lcm
        period = math.lcm(*r.dilated_segments, *r.dilation_rates)
        window_pos = state.positions[plan.n_bank - plan.n_window:] - plan.doc_start
    # Inference tensors cannot enter autograd: what inference mode built is not reused outside it.
    key = (id(config), layers, n_query, dtype, device, torch.is_inference_mode_enabled(), plan.n_window,
           plan.n_prefix, plan.n_global, plan.n_bank, plan.globals_in_bank, plan.place is None,
           plan.doc_start % period if period else 0)
    hit = cache.get(key)
    if hit is not None and hit[0] is config and (window_pos is None or hit[1] is not None
                                                 and torch.equal(hit[1], window_pos)):
        ctx = dataclasses.replace(hit[2], state=state, plan=plan, reads={})
        if r.random_slots:
            ctx.random_slots, ctx.random_blocks, ctx.random_index, ctx.random_padded = random_reads(
                config, plan, state.segments, torch.arange(n_query, device=device), ctx.topk_start)
            ctx.random_mask = folded_random(plan, ctx.mask, ctx.random_slots, ctx.topk_start, ctx.sink_shift)
        return ctx
    ctx = segment_context(config, layers, state, plan, query_start=0, n_query=n_query, dtype=dtype, device=device,
                          kernel=kernel)
    if len(cache) >= 64:  # shapes of a growing memory (each seen once) do not pile up
        cache.clear()
    # Kept from a shape's second use on: a memory that grows (a pooled tier, a budget filling) meets each shape once,
    # and keeping those contexts held one mask per segment.
    # The cached copy drops the plan's tables (a reuse brings its own plan): a bank whose width varies (AdaKV) met
    # many shapes twice, and each cached plan held its prefix's (cos, sin) (adakv 16K, budget 0.25: 24.6 -> 19.9 MiB).
    bare = dataclasses.replace(plan, place=None, store=None, topk_place=None)
    cache[key] = (config, window_pos, dataclasses.replace(ctx, plan=bare)) if key in cache else None
    return ctx


def scaled_positions(state: MemoryState, doc_start: int, room: int, rotary: Rotary, probe: torch.Tensor
                     ) -> tuple[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None]:
    """Unlimiformer's LLaMA mode: the input's first position, and `SegmentPlan.topk_place` for every bank slot's
    position scaled from [0, doc_start) into [0, room) (unscaled while the document so far fits)."""
    first = min(doc_start, room)
    if not state.n_bank:
        return first, None
    positions = state.positions if doc_start <= room else state.positions * room // doc_start
    cos, sin = _cos_sin(rotary, probe, torch.arange(int(positions.max()) + 1))
    return first, (cos, sin, positions.to(probe.device))
