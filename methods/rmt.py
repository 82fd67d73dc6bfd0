"""Recurrent Memory Transformer (Bulatov et al., 2022), https://arxiv.org/abs/2207.06881

m memory tokens are read in front of each segment and written after it; the last layer's outputs at the write
slots become the next segment's read embeddings. Memory is written by the model's own forward pass.

UniMem dimensions (paper Table 2): Management m compressed tokens (replaced every segment); Writing model forward
(40 tokens per 2,048-token segment); Reading all memory tokens; Injection all layers (at the input). Trained with
back-propagation through time. Its memory embeddings are learned: evaluate after fine-tuning for meaningful numbers.
"""

from __future__ import annotations

from unimem_bench.methods.config import Injection, Position, Training, UniMemConfig, Writing
from unimem_bench.methods.registry import MethodContext, method


@method("rmt", paper="Recurrent Memory Transformer (Bulatov et al., 2022)", url="https://arxiv.org/abs/2207.06881")
def rmt(ctx: MethodContext) -> UniMemConfig:
    return UniMemConfig(
        name="rmt",
        # Table 2: 40 memory tokens per 2,048-token segment, scaled with the segment length.
        writing=Writing(kv="none", memory_tokens=ctx.paper_tokens(40)),
        injection=Injection("all"),
        # RMT learns its memory through BPTT; two segments is the shortest window that trains a write then a read.
        training=Training(strategy="bptt", bptt_segments=2),
        position=Position(mode="compact"),
    )
