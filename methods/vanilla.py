"""Vanilla: the base model reading each segment on its own, no memory.

The baseline every memory method is measured against: the same tokens scored, the same segment length, nothing
carried between segments.

UniMem dimensions: Management none; Writing none; Reading local segment only; Injection none. Paper (Table 2 row
Vanilla) and official (mode `Vanilla`: memory size 0) agree. Positions restart at 0 every segment (official; without
memory `official` and `compact` are the same computation, and `absolute` runs positions past the trained context).
"""

from __future__ import annotations

from unimem_bench.methods.config import Position, UniMemConfig
from unimem_bench.methods.registry import MethodContext, method


@method("vanilla", paper="Base model, no memory", url="https://arxiv.org/abs/2402.03009",
        fidelity="exact: the base model on each segment alone")
def vanilla(ctx: MethodContext) -> UniMemConfig:
    return UniMemConfig(name="vanilla", position=Position(mode="official"))
