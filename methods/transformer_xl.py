"""Transformer-XL (Dai et al., 2019), https://arxiv.org/abs/1901.02860

Each segment attends to the cached keys/values of the previous segment, then caches its own.

UniMem dimensions (paper Table 1/2): Management one segment (2,048 tokens), FIFO; Writing direct (cache K/V);
Reading all of the cache by position (window = memory); Injection all layers. Trained with stop-gradient.
"""

from __future__ import annotations

from unimem_bench.methods.config import Injection, Management, Position, Reading, Training, UniMemConfig, Writing
from unimem_bench.methods.registry import MethodContext, method


@method("transformer_xl", paper="Transformer-XL (Dai et al., 2019)", url="https://arxiv.org/abs/1901.02860")
def transformer_xl(ctx: MethodContext) -> UniMemConfig:
    return UniMemConfig(
        name="transformer_xl",
        # Table 2: memory 2,048 = one segment; FIFO replaces it with the segment just read.
        management=Management(size=ctx.segments(1), overflow="fifo"),
        writing=Writing(kv="direct"),
        # Table 2: window 2,048 = the whole memory, read by position.
        reading=Reading(window=ctx.segments(1)),
        injection=Injection("all"),
        # XL's cache is a constant to the gradient ("SG" in the paper).
        training=Training(strategy="stop_gradient"),
        # Memory then segment at consecutive positions: XL's relative distances, within the trained range.
        position=Position(mode="compact"),
    )
