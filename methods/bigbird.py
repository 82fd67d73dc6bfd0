"""BigBird (Zaheer et al., 2020), https://arxiv.org/abs/2007.14062, as a causal streaming memory method.

Longformer's pattern (a sliding window plus global tokens) plus R random keys per query block (UniMem Appendix A.1,
Eq. 16-17: memory = [global; random; previous segment]).

UniMem Table 1: Management multi-segment, Clear All; Writing direct; Reading position (window, globals, random
positions); Injection all layers.

Where each default comes from (paper = BigBird's ITC setting, Table 8 / App. E: block 64, 3 window blocks, 2 global
blocks, 3 random blocks at 4,096 tokens; UniMem = its Table 1 row and Longformer's Table 2 sizes):
- Management, two segments, `clear`: UniMem (BigBird's row equals Longformer's: Clear All over 2 x 2,048).
- Writing, direct K/V.
- Reading: a sliding window of one segment (as UniMem's Longformer; BigBird's own window is 3 blocks); the
  document's first block as global tokens (ITC's globals are the first and last block: a causal model cannot read
  the last); 3 random blocks' worth of slots (3 x block) per query block of 64 tokens at a 2,048-token segment,
  scaled with the segment, drawn among the memory slots the window does not read (`reading.random_slots`, seeded).
- Injection, all layers.
- Training, BPTT over 2 segments, as UniMem's Longformer (Table 1 text: BPTT).
- Positions, official (UniMem's code for Longformer): memory keys at position 0, the segment from 0.
"""

from __future__ import annotations

from unimem_bench.methods.config import Injection, Management, Position, Reading, Training, UniMemConfig, Writing
from unimem_bench.methods.registry import MethodContext, method

RANDOM_BLOCKS = 3
"""BigBird ITC's random blocks per query block (r = 3)."""


@method("bigbird", paper="BigBird (Zaheer et al., 2020)", url="https://arxiv.org/abs/2007.14062",
        fidelity=("decoder variant: causal window + the document's first block as globals + seeded random memory "
                  "slots per query block, one softmax; drops global queries (they would read the future), the last "
                  "global block, random keys drawn as whole blocks, and BigBird's absolute positions (RoPE, memory "
                  "at 0)"))
def bigbird(ctx: MethodContext) -> UniMemConfig:
    block = ctx.paper_tokens(64)  # BigBird's block of 64 at the paper's 2,048-token segment, scaled
    return UniMemConfig(
        name="bigbird",
        # UniMem Table 1/2: as Longformer, two segments cleared when full.
        management=Management(size=ctx.segments(2), overflow="clear"),
        writing=Writing(kv="direct"),
        # Window of one segment (sliding), first block global, 3 blocks' worth of random slots per query block.
        reading=Reading(window=ctx.segments(1), sliding=True, global_tokens=block, global_source="document",
                        random_slots=RANDOM_BLOCKS * block, random_block=block),
        injection=Injection("all"),
        training=Training(strategy="bptt", bptt_segments=2),
        position=Position(mode="official"),
    )
