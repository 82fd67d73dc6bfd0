"""What an injected layer's memory did over a run: slots evicted and read, peak slots and footprint per KV head."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class LayerUsage:
    """What one injected layer did over a run (all documents): the proof a compression method really compressed."""

    evicted: int = 0
    """Slots evicted (per KV head; FIFO and clears included), summed over writes and documents."""
    read: int = 0
    """Memory slots read, summed over forward calls and documents."""
    read_compressed: int = 0
    """Of those, slots read from a memory that had already evicted something (a compressed cache)."""
    peak_slots: list[int] = field(default_factory=list)
    """Per KV head, the most slots it held at once (key/value memory plus pinned globals; largest over documents)."""
    footprint: list[int] = field(default_factory=list)
    """Per KV head, slots x tokens: every forward call adds the slots held while it ran times the tokens it
    processed, i.e. each slot's lifetime in tokens, summed over slots and documents."""

    def note_held(self, held: torch.Tensor, tokens: int) -> int:
        """Count slots held [batch, kv_heads] by a forward call of `tokens` tokens per row; returns the slots held
        summed over rows and KV heads. One host read of `held`, the rest in plain integers (it runs once per layer
        and segment; three reductions and three host syncs before)."""
        self._grow(held.shape[1])
        per_head = list(zip(*held.tolist(), strict=True))  # [kv_heads][batch]
        self.peak_slots = [max(a, *rows) for a, rows in zip(self.peak_slots, per_head, strict=True)]
        self.footprint = [a + sum(rows) * tokens for a, rows in zip(self.footprint, per_head, strict=True)]
        return sum(map(sum, per_head))

    def note_uniform(self, slots: int, batch: int, kv_heads: int, tokens: int) -> None:
        """`note_held` for a bank whose every row and KV head holds `slots` slots: plain integers, no tensor work
        (it ran once per layer and segment)."""
        self._grow(kv_heads)
        self.peak_slots = [max(a, slots) for a in self.peak_slots]
        self.footprint = [a + slots * batch * tokens for a in self.footprint]

    def _grow(self, heads: int) -> None:
        if len(self.peak_slots) < heads:
            self.peak_slots += [0] * (heads - len(self.peak_slots))
            self.footprint += [0] * (heads - len(self.footprint))
