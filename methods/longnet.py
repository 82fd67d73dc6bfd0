"""LongNet (Ding et al., 2023), https://arxiv.org/abs/2307.02486, as a causal streaming memory method.

Dilated attention: the sequence is split into segments of w tokens, and within a segment every r-th token (head h
starting at offset h mod r) attends to the same sparse set; several (w, r) patterns, longer segments with larger
rates, are mixed by their softmax denominators (LongNet Sec. 2.2-2.3; official microsoft/torchscale
`DilatedAttention`).

UniMem Table 1: Management multi-segment, Clear All; Writing direct; Reading position (dilated); Injection all layers.

Where each default comes from (paper = LongNet Sec. 2.2 and 4: w = 2,048, 4,096, 8,192, ... with r = 1, 2, 4, ...
growing geometrically; torchscale's head offset h mod r):
- Patterns (w, r) = (1, 1), (2, 2), (4, 4) segments of the run: LongNet's first three at the paper's 2,048-token
  segment, scaled with the segment.
- Management, the longest pattern (4 segments), FIFO: a query only reads keys of its own w-segment, so what is
  read is what a memory cleared at every LongNet segment boundary (Table 1: Clear All) holds.
- Writing, direct K/V; Reading, all memory by position under the dilated mask; Injection, all layers.
- Training, stop-gradient (the paper trains from scratch with full gradients inside one sequence; a streamed fine-tune
  detaches memory).
- Positions, absolute (document positions): LongNet's patterns are defined on document positions, and RoPE is then
  the relative position of every key read (LongNet uses xPos, relative too).
"""

from __future__ import annotations

from unimem_bench.methods.config import Injection, Management, Position, Reading, Training, UniMemConfig, Writing
from unimem_bench.methods.registry import MethodContext, method

PATTERNS = ((1, 1), (2, 2), (4, 4))
"""(segment length in run segments, dilation rate): LongNet's first three patterns at 2,048-token segments."""


@method("longnet", paper="LongNet (Ding et al., 2023)", url="https://arxiv.org/abs/2307.02486",
        fidelity=("decoder variant: causal dilated attention over document positions with per-head offsets (h mod "
                  "r), patterns mixed by their softmax denominators, streamed over memory; keys past the query are "
                  "dropped (causal), RoPE instead of xPos, no distributed segment split"))
def longnet(ctx: MethodContext) -> UniMemConfig:
    return UniMemConfig(
        name="longnet",
        # The longest pattern's segment: everything any query can read.
        management=Management(size=ctx.segments(PATTERNS[-1][0]), overflow="fifo"),
        writing=Writing(kv="direct"),
        reading=Reading(read_all=True, dilated_segments=tuple(ctx.segments(w) for w, _ in PATTERNS),
                        dilation_rates=tuple(r for _, r in PATTERNS)),
        injection=Injection("all"),
        training=Training(strategy="stop_gradient"),
        position=Position(mode="absolute"),
    )
