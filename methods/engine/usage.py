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

    def note_held(self, held: torch.Tensor, tokens: int) -> None:
        """Count slots held [batch, kv_heads] by a forward call of `tokens` tokens per row."""
        self._grow(held.shape[1])
        peak, total = held.amax(0).tolist(), (held.sum(0) * tokens).tolist()
        self.peak_slots = [max(a, int(b)) for a, b in zip(self.peak_slots, peak, strict=True)]
        self.footprint = [a + int(b) for a, b in zip(self.footprint, total, strict=True)]

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
