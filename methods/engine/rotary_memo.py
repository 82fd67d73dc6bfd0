"""The model's rotary embedding with its (cos, sin) kept per position list: every segment's plan asks for the same
positions (the compact prefix 0 .. P - 1, the input from its first position), so each list is computed once."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

MAX_ENTRIES = 2
"""Position lists kept at most, the least recently used dropped first, before the new tables are computed. Two: a
streamed segment's plan asks for the compact prefix and the input, the same two lists every segment once the memory
is full. A memory still filling asks for a longer prefix each segment; 64 lists emptied when full kept those stale
tables (reference model, budget 0.25, 16K: h2o peak RSS 39.7 -> 17.3 MiB), and computing before dropping kept the
previous prefix beside the new one (pyramidkv 64K: 75.3 -> 64.9 MiB, as before the memo)."""


@dataclass
class RotaryMemo:
    """Called like the rotary module, `(probe, positions [1, n]) -> (cos, sin) [1, n, head_dim]`, for one module."""

    rotary: nn.Module
    """The model's rotary embedding (a swapped one needs a new memo)."""
    store: dict[tuple, tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]] = field(default_factory=dict)
    """By (dtype, device, inference mode, shape, first position): the positions and their (cos, sin)."""

    @property
    def attention_scaling(self) -> float:
        return float(getattr(self.rotary, "attention_scaling", 1.0))

    def __call__(self, probe: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        first = int(positions.flatten()[0]) if positions.numel() else -1
        # Inference tensors cannot enter autograd: what inference mode made is not reused outside it.
        key = (probe.dtype, probe.device, torch.is_inference_mode_enabled(), tuple(positions.shape), first)
        hit = self.store.get(key)
        if hit is not None and torch.equal(hit[0], positions):
            self.store[key] = self.store.pop(key)  # most recently used last
            return hit[1]
        # Dropped before the new tables are computed: a filling memory's previous prefix is not kept beside them.
        self.store.pop(key, None)
        while len(self.store) >= MAX_ENTRIES:
            del self.store[next(iter(self.store))]  # the least recently used
        cos_sin = self.rotary(probe, positions)
        self.store[key] = (positions.clone(), cos_sin)
        return cos_sin
