"""Longformer (Beltagy et al., 2020), https://arxiv.org/abs/2004.05150, as a streaming memory method.

Local window attention plus a few global tokens that every position sees; streamed, the window reaches back into
the previous segment's keys/values and the global tokens are the document's first tokens, pinned.

UniMem dimensions (paper Table 2): Management 4,096 tokens = 2 segments, clear-all on overflow; Writing direct;
Reading window 2,048 by position + 4 global tokens; Injection all layers. Trained with BPTT.
"""

from __future__ import annotations

from unimem_bench.methods.config import Injection, Management, Position, Reading, Training, UniMemConfig, Writing
from unimem_bench.methods.registry import MethodContext, method


@method("longformer", paper="Longformer (Beltagy et al., 2020)", url="https://arxiv.org/abs/2004.05150")
def longformer(ctx: MethodContext) -> UniMemConfig:
    return UniMemConfig(
        name="longformer",
        # Table 2: memory 4,096 = two segments; Longformer's row in Table 1 clears the memory when it is full.
        management=Management(size=ctx.segments(2), overflow="clear"),
        writing=Writing(kv="direct"),
        # Table 2: window 2,048 = one segment, and 4 global tokens (not scaled: they are a count, not a span).
        reading=Reading(window=ctx.segments(1), global_tokens=4),
        injection=Injection("all"),
        # Table 1 trains Longformer through its memory; two segments is the shortest BPTT window.
        training=Training(strategy="bptt", bptt_segments=2),
        # Globals, window and segment at consecutive positions (StreamingLLM-style), inside the trained range.
        position=Position(mode="compact"),
    )
