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

POSITION_BLOCK = 4096
"""Positions per rotary call when a list is longer: the rotary's temporaries (angles, their doubled copy, then cos
and sin) are about four tables' worth, so one call over a 32K-slot prefix was the largest transient of a PyramidKV
run at 64K (reference model, budget 0.25)."""

BLOCKWISE_ROPE = ("default", "linear", "llama3", "yarn")
"""Rope types whose tables do not depend on the call's longest position (dynamic NTK and LongRoPE do: never split)."""


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
        cos_sin = self.tables(probe, positions)
        self.store[key] = (positions.clone(), cos_sin)
        return cos_sin

    def tables(self, probe: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The rotary's (cos, sin) [1, n, head_dim], computed POSITION_BLOCK positions at a time into the two
        tables (each position's row on its own: the same values as one call)."""
        n = positions.shape[-1]
        if n <= POSITION_BLOCK or getattr(self.rotary, "rope_type", "default") not in BLOCKWISE_ROPE:
            return self.rotary(probe, positions)
        cos = sin = None
        for lo in range(0, n, POSITION_BLOCK):
            part_cos, part_sin = self.rotary(probe, positions[..., lo:lo + POSITION_BLOCK])  # [1, rows, head_dim]
            if cos is None or sin is None:
                cos = part_cos.new_empty(*part_cos.shape[:-2], n, part_cos.shape[-1])
                sin = part_sin.new_empty(cos.shape)
            cos[..., lo:lo + POSITION_BLOCK, :] = part_cos
            sin[..., lo:lo + POSITION_BLOCK, :] = part_sin
        assert cos is not None and sin is not None
        return cos, sin
