"""LongT5 (Guo et al., 2021), https://arxiv.org/abs/2112.07916, Transient Global (TGlobal) attention, causal.

TGlobal: each token attends to a local window (radius r = 127) and to one global token per block of k = 16 input
tokens, the block's summary computed on the fly in every layer (no side inputs). Streamed causally: a direct window
of recent memory slots, and every block that has left it pooled into one slot of a pooled tier that every query
reads with its window, in the one softmax (`writing.pooled_tier`, the pooling ratio being the block size).

UniMem Table 1: Management multi-segment, Clear All; Writing pooling + direct; Reading position; Injection all layers.

Where each default comes from (paper = arXiv 2112.07916: r = 127, k = 16, inputs up to 16,384 tokens; UniMem = its
Table 1 row and Longformer's Table 2 sizes):
- Management: a direct window of one segment (UniMem's Longformer window, Table 2: 2,048 = one segment) sliding into
  a tier that holds what LongT5 summarises: its whole input, up to 16,384 tokens = 128 local radii, i.e. 128
  segments in blocks of 16. The tier's overflow is `clear` (Table 1: Clear All), which only a document longer than
  128 segments reaches.
- Writing: direct K/V into the window; a block's 16 keys and values averaged into one tier slot. Blocks are
  document-aligned when the segment is a multiple of 16 (the window then slides by whole blocks); otherwise a
  write's evicted slots are grouped from their own start, the last group shorter. LongT5 sums the block's token
  inputs and layer-norms the sum before the layer's K/V projections; the norm makes a sum and a mean the same, and
  we average the projected keys and values instead (a mean of projections, not the projection of a normed mean: no
  new weights).
- Reading: every query reads the whole window (not sliding, so window and tier are contiguous) and every pooled
  block. Block size 16 is a count and does not scale.
- Injection, all layers; Training, BPTT over 2 segments (as UniMem's Longformer).
- Positions, official (UniMem's code for its position-read methods): memory keys at position 0 (LongT5's relative
  biases between a token and a global block are not reproduced).
"""

from __future__ import annotations

from unimem_bench.methods.config import Injection, Management, Position, Reading, Training, UniMemConfig, Writing
from unimem_bench.methods.registry import MethodContext, method

BLOCK = 16
"""LongT5's global block size k (tokens summarised per global token), a count that does not scale."""
INPUT_RADII = 128
"""LongT5's longest input (16,384 tokens) in local radii (127 + the token itself = 128)."""


@method("longt5", paper="LongT5 (Guo et al., 2021)", url="https://arxiv.org/abs/2112.07916",
        fidelity=("decoder variant: local window + pooled globals of completed blocks: a causal window plus the mean "
                  "keys/values of every 16-token block that has left it; LongT5's encoder TGlobal reads the summaries "
                  "of every block of the whole input (inside its radius, its own and later blocks included) as "
                  "layer-normed sums of token inputs projected per layer, with relative biases; ours reads only "
                  "completed blocks outside the window, as means of projected keys/values, at position 0"))
def longt5(ctx: MethodContext) -> UniMemConfig:
    window = ctx.segments(1)
    return UniMemConfig(
        name="longt5",
        management=Management(size=window, overflow="clear"),
        # Every block of a 16,384-token input (128 radii = 128 segments here), one slot per 16 tokens.
        writing=Writing(kv="direct", pool_ratio=BLOCK, pooled_tier=max(1, ctx.segments(INPUT_RADII) // BLOCK)),
        reading=Reading(window=window, sliding=False),
        injection=Injection("all"),
        training=Training(strategy="bptt", bptt_segments=2),
        position=Position(mode="official"),
    )
