"""Poolingformer (Zhang et al., 2021), https://arxiv.org/abs/2105.04371, as a causal streaming memory method.

Two-level attention: the first level is a sliding window over the nearest tokens; the second level attends to the
keys/values of a larger window, compressed by pooling. Streamed, the first level is a direct window of recent memory
slots and the second a pooled tier: the slots that leave the window are pooled (means of `pool_ratio` consecutive
tokens) into a tier every query reads with its window, in the one softmax (`writing.pooled_tier`).

UniMem Table 1: Management multi-segment, Clear All; Writing pooling + direct; Reading position; Injection all layers.

Where each default comes from (paper = arXiv 2105.04371, its NQ setting: first-level window w1 = 128, second-level
window w2 = 512, pooling stride 4; UniMem = its Table 1 row and Longformer's Table 2 sizes):
- Management: a direct window of one segment (UniMem's Longformer window, Table 2: 2,048 = one segment) that slides
  into the pooled tier, which holds the second level's reach beyond the first: w2 = 4 x w1, so 3 windows of tokens,
  pooled by 4 (3/4 of a segment in slots). The tier's overflow is `clear` (Table 1: Clear All; UniMem's Longformer and
  BigBird clear a full memory too); `fifo` slides the tier as Poolingformer's second-level window slides.
- Writing: direct K/V into the window, pooled into the tier by the mean of 4 consecutive tokens (the paper's stride
  4, with kernel = stride: non-overlapping means; its best pooling is a learned lightweight dynamic convolution,
  whose weights a pretrained LLaMA does not have; mean pooling is one of the paper's variants).
- Reading: every query reads the whole window (not sliding: a sliding reach would leave the tokens between the tier
  and the query's reach unread; this way the two levels are contiguous) and the whole tier.
- Injection, all layers; Training, BPTT over 2 segments (as UniMem's Longformer).
- Positions, official (UniMem's code for its position-read methods): memory keys at position 0, the segment from 0.
"""

from __future__ import annotations

from unimem_bench.methods.config import Injection, Management, Position, Reading, Training, UniMemConfig, Writing
from unimem_bench.methods.registry import MethodContext, method

POOL_STRIDE = 4
"""Poolingformer's pooling stride (tokens per pooled slot), a count that does not scale."""
SECOND_LEVEL = 4
"""The second-level window as a multiple of the first (the paper's w2 / w1 = 512 / 128)."""


@method("poolingformer", paper="Poolingformer (Zhang et al., 2021)", url="https://arxiv.org/abs/2105.04371",
        fidelity=("decoder variant: causal first-level window + mean-pooled second level over the 3 windows before "
                  "it, one softmax; the original's two levels are bidirectional windows centred on the query, the "
                  "second covering the first too, mixed by adding their outputs, with learned (dynamic-convolution) "
                  "pooling"))
def poolingformer(ctx: MethodContext) -> UniMemConfig:
    window = ctx.segments(1)
    return UniMemConfig(
        name="poolingformer",
        # The window slides into the tier; Table 1's Clear All empties a full tier.
        management=Management(size=window, overflow="clear"),
        # The second level reaches 4 windows back: the 3 beyond the window, pooled by 4.
        writing=Writing(kv="direct", pool_ratio=POOL_STRIDE,
                        pooled_tier=(SECOND_LEVEL - 1) * window // POOL_STRIDE),
        reading=Reading(window=window, sliding=False),
        injection=Injection("all"),
        training=Training(strategy="bptt", bptt_segments=2),
        position=Position(mode="official"),
    )
