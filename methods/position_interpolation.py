"""Position Interpolation (Chen et al., 2023), https://arxiv.org/abs/2306.15595

No memory: the model reads a longer local context at once, with RoPE positions scaled down linearly so they stay
inside the trained range (transformers' own `linear` rope type, so `inv_freq` is rebuilt as transformers does).

UniMem dimensions: Management none; Writing none; Reading the (longer) local context; Injection none. The paper's
comparison point for memory methods (its 64K length experiment, Table 4); the official code has no such mode, so
the local context (4 segments) is ours: the span Longformer's memory plus segment covers. Positions from 0 each
local context (`official` and `compact` are the same computation without memory).
"""

from __future__ import annotations

from unimem_bench.methods.config import Position, UniMemConfig
from unimem_bench.methods.registry import MethodContext, method


@method("position_interpolation", paper="Position Interpolation (Chen et al., 2023)",
        url="https://arxiv.org/abs/2306.15595",
        fidelity="exact: linear RoPE interpolation (transformers' `linear` rope type) over 4 segments")
def position_interpolation(ctx: MethodContext) -> UniMemConfig:
    return UniMemConfig(
        name="position_interpolation",
        # 4 segments at once: the same span as Longformer's memory + segment, read with full attention.
        # rope_factor 0 = automatic: local context / trained context (1 when it already fits).
        position=Position(mode="official", rope_factor=0.0, segment_factor=4),
    )
