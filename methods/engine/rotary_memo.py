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
    store: dict[tuple, tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor, bool]]] = field(default_factory=dict)
    """By (dtype, device, inference mode, shape, first position, halves asked): the positions and their (cos, sin,
    halved)."""

    @property
    def attention_scaling(self) -> float:
        return float(getattr(self.rotary, "attention_scaling", 1.0))

    def __call__(self, probe: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.lookup(probe, positions, half=False)[:2]

    def halves(self, probe: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """(cos, sin, True) with only the first half of each table, [1, n, head_dim / 2], when the rotary's two
        halves are equal (transformers' rotaries take the cos and sin of cat(freqs, freqs)): half the bytes of the
        compact prefix's tables, which `kernels.rotate` reads as they are; else (cos, sin, False) whole."""
        return self.lookup(probe, positions, half=True)

    def lookup(self, probe: torch.Tensor, positions: torch.Tensor,
               half: bool) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """The memoised (cos, sin, halved) of `__call__` (half False) and `halves` (half True)."""
        first = int(positions.flatten()[0]) if positions.numel() else -1
        # Inference tensors cannot enter autograd: what inference mode made is not reused outside it.
        key = (probe.dtype, probe.device, torch.is_inference_mode_enabled(), tuple(positions.shape), first, half)
        hit = self.store.get(key)
        if hit is not None and torch.equal(hit[0], positions):
            self.store[key] = self.store.pop(key)  # most recently used last
            return hit[1]
        # Dropped before the new tables are computed: a filling memory's previous prefix is not kept beside them.
        self.store.pop(key, None)
        while len(self.store) >= MAX_ENTRIES:
            del self.store[next(iter(self.store))]  # the least recently used
        halved = self.half_tables(probe, positions) if half else None
        tables = (*self.tables(probe, positions), False) if halved is None else (*halved, True)
        self.store[key] = (positions.clone(), tables)
        return tables

    def tables(self, probe: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The rotary's (cos, sin) [1, n, head_dim], computed POSITION_BLOCK positions at a time into the two
        tables (each position's row on its own: the same values as one call)."""
        n = positions.shape[-1]
        if n <= POSITION_BLOCK or getattr(self.rotary, "rope_type", "default") not in BLOCKWISE_ROPE:
            return self.rotary(probe, positions)
        tables = self._blockwise(probe, positions, half=False)
        assert tables is not None  # only halves can be refused
        return tables

    def half_tables(self, probe: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The first halves [1, n, head_dim / 2] of `tables`, or None where the two halves differ (computed
        blockwise like `tables`, so no whole table is built)."""
        if getattr(self.rotary, "rope_type", "default") not in BLOCKWISE_ROPE:
            cos, sin = self.rotary(probe, positions)
            return _halves(cos, sin)
        return self._blockwise(probe, positions, half=True)

    def _blockwise(self, probe: torch.Tensor, positions: torch.Tensor,
                   half: bool) -> tuple[torch.Tensor, torch.Tensor] | None:
        n = positions.shape[-1]
        cos = sin = None
        for lo in range(0, max(n, 1), POSITION_BLOCK):
            part = self.rotary(probe, positions[..., lo:lo + POSITION_BLOCK])  # [1, rows, head_dim] each
            if half:
                halved = _halves(*part)
                if halved is None:
                    return None
                part = halved
            if cos is None or sin is None:
                cos = part[0].new_empty(*part[0].shape[:-2], n, part[0].shape[-1])
                sin = part[1].new_empty(cos.shape)
            cos[..., lo:lo + POSITION_BLOCK, :] = part[0]
            sin[..., lo:lo + POSITION_BLOCK, :] = part[1]
        assert cos is not None and sin is not None
        return cos, sin


def _halves(cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Copies of the first halves of (cos, sin) [..., head_dim] when each table's two halves are equal, else None."""
    width = cos.shape[-1] // 2
    if 2 * width != cos.shape[-1] or not (torch.equal(cos[..., :width], cos[..., width:])
                                          and torch.equal(sin[..., :width], sin[..., width:])):
        return None
    return cos[..., :width].clone(), sin[..., :width].clone()
