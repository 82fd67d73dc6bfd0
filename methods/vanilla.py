"""Vanilla: the base model reading each segment on its own, no memory.

The baseline every memory method is measured against: the same tokens scored, the same segment length, nothing
carried between segments.

UniMem dimensions: Management none; Writing none; Reading local segment only; Injection none.
"""

from __future__ import annotations

from unimem_bench.methods.config import UniMemConfig
from unimem_bench.methods.registry import MethodContext, method


@method("vanilla", paper="Base model, no memory", url="https://arxiv.org/abs/2402.03009")
def vanilla(ctx: MethodContext) -> UniMemConfig:
    return UniMemConfig(name="vanilla")
