"""Memory state carried between segments: per-layer key/value banks, pinned global tokens, RMT memory tokens.

Banks hold keys and values at the model's KV-head count (GQA models keep their memory small). All injected layers
write the same tokens, so the bookkeeping (sizes, ids, document positions) lives once in `MemoryState`, and the
per-segment `SegmentPlan` (plan.py) tells every layer exactly what to read and write.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from unimem_bench.methods.config import UniMemConfig
from unimem_bench.methods.engine import budgets, eviction, slot_buffer, tier
from unimem_bench.methods.engine.faiss_bank import FaissBank
from unimem_bench.methods.engine.tier import pool_tokens
from unimem_bench.methods.engine.usage import LayerUsage


class WritePlan(Protocol):
    """What writing a segment needs of its plan (`plan.SegmentPlan`; a protocol, so plan.py alone imports the other)."""

    @property
    def first_id(self) -> int: ...
    @property
    def n_bank(self) -> int: ...
    @property
    def to_global(self) -> int: ...
    @property
    def drop_old(self) -> int: ...
    @property
    def drop_new(self) -> int: ...
    @property
    def n_new(self) -> int: ...
    @property
    def detach_kv(self) -> bool: ...
    @property
    def tier_drop_old(self) -> int: ...
    @property
    def tier_drop_new(self) -> int: ...
    @property
    def n_tier_after(self) -> int: ...


_TENSORS = ("keys", "values", "global_keys", "global_values", "ids", "scores", "tier_keys", "tier_values",
            "centroids", "representative")
"""The tensors of a `LayerMemory`."""


def overflow_drop(n_old: int, n_new: int, size: int, policy: str) -> tuple[int, int]:
    """How many (old, new) entries to drop from the front when `n_new` slots are written to `n_old` held ones.

    An empty memory always takes the write (its oldest part when one write exceeds the size). When the write does
    not fit: fifo evicts the oldest, clear-and-write empties then writes, clear (official) empties and writes nothing.
    """
    drop_new = max(0, n_new - size)
    kept_new = n_new - drop_new
    if policy == "fifo":
        return max(0, n_old + kept_new - size), drop_new
    if n_old + kept_new <= size:
        return 0, drop_new
    return n_old, (n_new if policy == "clear" else drop_new)


@dataclass
class LayerMemory:
    """One injected layer's memory: [batch, kv_heads, slots, head_dim] tensors."""

    keys: torch.Tensor | None = None
    values: torch.Tensor | None = None
    global_keys: torch.Tensor | None = None
    global_values: torch.Tensor | None = None
    faiss: FaissBank | None = None
    ids: torch.Tensor | None = None
    """[batch, kv_heads, slots] document position of each slot (score-based eviction only: heads keep their own)."""
    scores: torch.Tensor | None = None
    """[batch, kv_heads, slots] running scores of the held slots (h2o: attention received; lru: last use)."""
    usage: LayerUsage | None = None
    """Shared run counters (the model's), updated by reads and evictions."""
    generator: torch.Generator | None = None
    """The seeded generator of `random` eviction."""
    has_evicted: bool = False
    """This document's memory has evicted something: what it holds now is compressed."""
    tier_keys: torch.Tensor | None = None
    """[batch, kv_heads, tier slots, head_dim] the pooled tier (writing.pooled_tier): means of evicted slots."""
    tier_values: torch.Tensor | None = None
    tier_room: tuple[torch.Tensor, torch.Tensor] | None = None
    """Without autograd, the buffers whose fronts are tier_keys / tier_values, with room after them (`tier.py`)."""
    centroids: torch.Tensor | None = None
    """[batch, kv_heads, clusters, head_dim] float32 unit k-means centroids (reading.clusters; `buckets.py`)."""
    rotations: torch.Tensor | None = None
    """[kv_heads, rounds, head_dim, buckets / 2] float32 LSH rotations (reading.lsh_buckets), drawn once per run."""
    depth: tuple[int, int, int] | None = None
    """(rank among the injected layers from the lowest, their number, the input's tokens or 0) when score eviction
    budgets differ per layer or KV head (`budgets.layer_size`); None otherwise."""
    representative: torch.Tensor | None = None
    """[batch, kv_heads, slots] InfLLM's representative score of each slot (reading.chunk_key=representative)."""
    padded: bool = True
    """Some slot of `ids` is padding (-1), per-layer or per-head budgets: kept by the write, so a read needs no
    host sync to know (True until a budgeted write says otherwise)."""
    buffers: dict[str, slot_buffer.SlotBuffer | None] = field(default_factory=dict)
    """Per tensor name, the buffer behind a FIFO bank (`slot_buffer`); a bank replaced otherwise gets a new one."""

    def held_slots(self) -> torch.Tensor | None:
        """Slots held per batch row and KV head [batch, kv_heads] (bank plus pinned globals); None when empty."""
        like = self.keys if self.keys is not None else self.global_keys
        if like is None:
            return None
        n_global = 0 if self.global_keys is None else self.global_keys.shape[2]
        if self.keys is None:
            bank = torch.zeros(like.shape[:2], dtype=torch.long, device=like.device)
        elif self.depth is not None and self.ids is not None:
            bank = (self.ids >= 0).sum(-1)  # padding carries id -1
        else:
            bank = torch.full(like.shape[:2], self.keys.shape[2], dtype=torch.long, device=like.device)
        return bank + n_global

    def held_bytes(self) -> int:
        """Bytes of the keys and values held: bank, pinned globals and pooled tier (padding not counted: what a
        compact cache holds)."""
        tier = self.tier_keys
        like = next((t for t in (self.keys, self.global_keys, tier) if t is not None), None)
        if like is None:
            return 0
        held = self.held_slots()
        slots = (0 if held is None else int(held.sum())) + (0 if tier is None else tier[..., 0].numel())
        return slots * 2 * like.shape[3] * like.element_size()

    def note_read(self, slots: int, batch: int = 1, tokens: int = 0) -> None:
        """Count a forward call of `tokens` tokens per row over `batch` rows reading `slots` memory slots per row (a
        budgeted bank reads what it holds)."""
        if self.usage is None:
            return
        like = self.keys if self.keys is not None else self.global_keys
        if like is not None and self.depth is None:  # uniform bank: every row and KV head holds the same slots
            n_global = 0 if self.global_keys is None else self.global_keys.shape[2]
            n_bank = 0 if self.keys is None else self.keys.shape[2]
            self.usage.note_uniform(n_bank + n_global, batch, like.shape[1], tokens)
        held = self.held_slots() if self.depth is not None else None
        if held is not None:  # per-layer/per-head budgets: a budgeted bank reads what it holds
            slots = self.usage.note_held(held, tokens) // held.shape[1] // batch
        self.usage.read += slots * batch
        if self.has_evicted:
            self.usage.read_compressed += slots * batch

    def write(self, plan: WritePlan, config: UniMemConfig, keys: torch.Tensor, values: torch.Tensor,
              fresh: torch.Tensor | None = None, representative: torch.Tensor | None = None) -> None:
        """Write this segment's keys/values [batch, kv_heads, n_seg, head_dim] (already in storage frame); `fresh`:
        the segment's attention evidence for score-based eviction (`eviction.attention_scores`); `representative`:
        the segment's representative scores [batch, kv_heads, n_seg] (InfLLM), kept beside the keys."""
        if plan.detach_kv:
            keys, values = keys.detach(), values.detach()
        if self.depth is not None:
            self._write_budgeted(plan, config, keys, values, fresh)
            return
        dropped = plan.drop_old + plan.drop_new
        if dropped:  # held slots or this write's own (a write larger than the memory)
            self.has_evicted = True
            if self.usage is not None:
                self.usage.evicted += dropped * keys.shape[0]
        if config.management.scored:
            self._write_scored(plan, config, keys, values, fresh)
            return
        if plan.to_global:
            # Copies, not views: a view would pin the whole segment's keys/values for the document's lifetime.
            new_k, new_v = keys[:, :, :plan.to_global].clone(), values[:, :, :plan.to_global].clone()
            if self.global_keys is not None and self.global_values is not None:  # globals spanning first segments
                new_k = torch.cat([self.global_keys, new_k], dim=2)
                new_v = torch.cat([self.global_values, new_v], dim=2)
            self.global_keys, self.global_values = new_k, new_v
            keys, values = keys[:, :, plan.to_global:], values[:, :, plan.to_global:]
            if representative is not None:
                representative = representative[:, :, plan.to_global:]
        if representative is not None:
            representative = self._append("representative", representative[:, :, plan.drop_new:], plan.drop_old, config)
        if config.writing.kv == "pooling":
            keys, values = pool_tokens(keys, config.writing.pool_ratio), pool_tokens(values, config.writing.pool_ratio)
        if config.writing.pooled_tier:
            tier.write(self, plan, config.writing.pool_ratio,
                       config.writing.pooled_tier + config.management.size + keys.shape[2], keys, values)
        new_first_id = plan.first_id + (0 if self.keys is None else self.keys.shape[2]) + plan.drop_new
        new_keys = keys[:, :, plan.drop_new:]
        keys = self._append("keys", new_keys, plan.drop_old, config)
        values = self._append("values", values[:, :, plan.drop_new:], plan.drop_old, config)
        if not keys.shape[2]:  # cleared and nothing written: an empty memory
            self.keys = self.values = self.representative = None
            self.buffers.clear()
            if self.faiss is not None:
                self.faiss.indexes = []
            return
        self.keys, self.values, self.representative = keys, values, representative
        if self.faiss is not None:
            self.faiss.add(new_keys, new_first_id, keys, new_first_id + new_keys.shape[2] - keys.shape[2])

    def _append(self, name: str, new: torch.Tensor, drop_old: int, config: UniMemConfig) -> torch.Tensor:
        """The held tensor `name` [batch, kv_heads, slots, ...] without its first `drop_old` slots, then `new`."""
        self.buffers[name], bank = slot_buffer.append(self.buffers.get(name), getattr(self, name), drop_old, new,
                                                      config.management.size)
        return bank

    def _write_scored(self, plan: WritePlan, config: UniMemConfig, keys: torch.Tensor, values: torch.Tensor,
                      fresh: torch.Tensor | None) -> None:
        """Append the segment, then keep the best `size` candidates per KV head (`eviction`)."""
        m = config.management
        batch, kv_heads, n_new = keys.shape[:3]
        first_new = plan.first_id + plan.n_bank
        new_ids = (first_new + torch.arange(n_new, device=keys.device)).expand(batch, kv_heads, n_new)
        parts = (keys,) if self.keys is None else (self.keys, keys)
        if self.ids is not None and self.keys is not None:
            new_ids = torch.cat([self.ids, new_ids], dim=2)
        scores = eviction.combine(m, self.scores, fresh, parts, new_ids, self.generator)
        del parts
        kept = new_ids.shape[2] - plan.drop_old - plan.drop_new
        # Each new tensor replaces the old at once: the old keys are freed before the values are taken.
        if kept < new_ids.shape[2]:
            keep = eviction.keep_indices(m, scores, new_ids, kept, first_new + n_new)  # [batch, kv_heads, kept]
            # In place without autograd (nothing else holds the bank then: reads keep an empty marker)
            self.keys = eviction.take(self.keys, keys, keep, in_place=not torch.is_grad_enabled())
            self.values = eviction.take(self.values, values, keep, in_place=not torch.is_grad_enabled())
            new_ids, scores = new_ids.gather(2, keep), scores.gather(2, keep)
        else:
            self.keys = keys if self.keys is None else torch.cat([self.keys, keys], dim=2)
            self.values = values if self.values is None else torch.cat([self.values, values], dim=2)
        self.ids = new_ids
        self.scores = scores if m.eviction in eviction.NEEDS_ALL_QUERIES else None

    def _write_budgeted(self, plan: WritePlan, config: UniMemConfig, keys: torch.Tensor, values: torch.Tensor,
                        fresh: torch.Tensor | None) -> None:
        """Score eviction with per-layer or per-head budgets: the candidates are this layer's held slots (its own
        width, padding id -1) and the segment; `budgets.keep_slots` picks, each layer keeping its own width."""
        assert self.depth is not None
        m = config.management
        batch, kv_heads, n_new = keys.shape[:3]
        first_new = plan.first_id + plan.n_bank
        new_ids = (first_new + torch.arange(n_new, device=keys.device)).expand(batch, kv_heads, n_new)
        ids = new_ids if self.ids is None else torch.cat([self.ids, new_ids], dim=2)
        if fresh is not None:  # read padded to a wider bank, its first candidates are padding: this layer's last ones
            fresh = fresh[..., fresh.shape[2] - ids.shape[2]:]
        parts = (keys,) if self.keys is None else (self.keys, keys)
        scores = eviction.combine(m, self.scores, fresh, parts, ids, self.generator)
        del parts
        budget = budgets.layer_size(m, m.size, *self.depth)
        keep = budgets.keep_slots(m, scores, ids, budget, first_new + n_new)  # [batch, kv_heads, width]
        pad = keep < 0
        evicted = int((ids >= 0).sum()) - int((~pad).sum())
        if evicted:
            self.has_evicted = True
            if self.usage is not None:
                self.usage.evicted += evicted // kv_heads
        self.padded = bool(pad.any())
        # In place without autograd (nothing else holds the bank then: reads keep an empty marker)
        self.keys = budgets.take_padded(self.keys, keys, keep, self.padded, in_place=not torch.is_grad_enabled())
        self.values = budgets.take_padded(self.values, values, keep, self.padded, in_place=not torch.is_grad_enabled())
        keep = keep.clamp(min=0)
        self.ids = ids.gather(2, keep).masked_fill(pad, -1)
        self.scores = (scores.gather(2, keep).masked_fill(pad, 0.0) if m.eviction in eviction.NEEDS_ALL_QUERIES
                       else None)

    def snapshot(self) -> LayerMemory:
        """The current tensors: frozen under autograd, else until the next write (FIFO banks move in `slot_buffer`)."""
        return LayerMemory(self.keys, self.values, self.global_keys, self.global_values, self.faiss, self.ids,
                           tier_keys=self.tier_keys, tier_values=self.tier_values,
                           centroids=self.centroids, rotations=self.rotations,
                           depth=self.depth, representative=self.representative, padded=self.padded)

    def select_rows(self, rows: torch.Tensor) -> None:
        self.buffers.clear()
        for name in _TENSORS:
            tensor = getattr(self, name)
            if tensor is not None:
                setattr(self, name, tensor.index_select(0, rows))
        if self.faiss is not None:
            self.faiss.select_rows(rows.tolist())

    def detach(self) -> None:
        for name in _TENSORS:
            tensor = getattr(self, name)
            if tensor is not None:
                setattr(self, name, tensor.detach())


@dataclass
class MemoryState:
    """The memory of a batch of documents streamed in lockstep."""

    layers: dict[int, LayerMemory]
    n_global: int = 0
    """Pinned global tokens held."""
    n_bank: int = 0
    """Slots held in every layer's bank."""
    next_id: int = 0
    """Id of the next slot written."""
    positions: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))
    """[n_bank] document position of each bank slot (the first token of a pooled slot)."""
    rmt: torch.Tensor | None = None
    """[batch, memory_tokens, hidden] RMT read embeddings for the next segment."""
    segments: int = 0
    """Segments processed so far."""
    n_tier: int = 0
    """Slots held in every layer's pooled tier (writing.pooled_tier)."""
    output: Any = None
    """The output-distribution memory (`output_memory.OutputState`: kNN-LM / TRIME datastores), or None."""
    page_keys: dict[int, Any] = field(default_factory=dict)
    """Per layer, the chunk search keys of whole chunks computed so far (`pages.cached_chunk_keys`), by memory id."""

    @property
    def first_id(self) -> int:
        return self.next_id - self.n_bank

    def commit(self, plan: WritePlan, config: UniMemConfig, doc_start: int) -> None:
        """Update the shared bookkeeping after every layer wrote the segment."""
        self.segments += 1
        self.n_global += plan.to_global
        self.n_tier = plan.n_tier_after
        n_new = plan.n_new
        if not n_new:
            return
        step = config.writing.pool_ratio if config.writing.kv == "pooling" else 1
        new_pos = doc_start + plan.to_global + torch.arange(n_new) * step
        kept = new_pos[plan.drop_new:]
        self.positions = torch.cat([self.positions[plan.drop_old:], kept])
        self.n_bank = self.n_bank - plan.drop_old + len(kept)
        self.next_id += n_new
        widths = [layer.keys.shape[2] for layer in self.layers.values() if layer.depth is not None
                  and layer.keys is not None]
        if widths:  # per-layer or per-head budgets: the widest bank, which every layer is padded to when read
            self.n_bank = max(widths)

    def select_rows(self, rows: torch.Tensor) -> None:
        """Keep only these batch rows (documents that still have tokens to score)."""
        for layer in self.layers.values():
            layer.select_rows(rows)
        if self.rmt is not None:
            self.rmt = self.rmt.index_select(0, rows)
        if self.output is not None:
            self.output.select_rows(rows)

    def detach(self) -> None:
        """Cut gradient history (the end of a BPTT window)."""
        for layer in self.layers.values():
            layer.detach()
        if self.rmt is not None:
            self.rmt = self.rmt.detach()

    def state_dict(self) -> dict[str, Any]:
        """Counters and detached tensors (on CPU): what a training checkpoint needs to continue this memory exactly.
        A faiss index is not saved; `load_state_dict` rebuilds it from the keys."""
        # Copies: evaluation compacts banks in place (`eviction.take`), which must not reach a saved state.
        tensors = {f"{i}.{name}": t.detach().to("cpu", copy=True) for i, layer in self.layers.items()
                   for name in _TENSORS if (t := getattr(layer, name)) is not None}
        if self.rmt is not None:
            tensors["rmt"] = self.rmt.detach().cpu()
        return {"n_global": self.n_global, "n_bank": self.n_bank, "next_id": self.next_id,
                "segments": self.segments, "positions": self.positions.clone(), "tensors": tensors,
                "n_tier": self.n_tier,
                "output": None if self.output is None else self.output.state_dict()}

    def load_state_dict(self, data: dict[str, Any], device: torch.device) -> None:
        """Restore what `state_dict` saved into this (fresh) state of the same method."""
        self.n_global, self.n_bank, self.next_id = data["n_global"], data["n_bank"], data["next_id"]
        self.segments, self.positions = data["segments"], data["positions"].clone()
        self.n_tier = data.get("n_tier", 0)
        tensors = data["tensors"]
        for i, layer in self.layers.items():
            for name in _TENSORS:
                setattr(layer, name, tensors[f"{i}.{name}"].to(device, copy=True) if f"{i}.{name}" in tensors else None)
            layer.padded = True  # not known until the next write
            if layer.faiss is not None and layer.keys is not None:
                layer.faiss.rebuild(layer.keys, self.first_id)
        self.rmt = tensors["rmt"].to(device) if "rmt" in tensors else None
        if self.output is not None and data.get("output") is not None:
            self.output.load_state_dict(data["output"], device)

