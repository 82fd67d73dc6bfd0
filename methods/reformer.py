"""Reformer (Kitaev et al., 2020), https://arxiv.org/abs/2001.04451, as a causal streaming memory method.

LSH attention: queries and keys are hashed by random rotations (angular LSH, h(x) = argmax([xR ; -xR])) into
buckets, in n_hashes rounds; a query attends to the keys of its own buckets (Reformer Sec. 2-3).

UniMem Table 1: Management multi-segment, Clear All; Writing direct; Reading similarity (LSH buckets); Injection all
layers.

Where each default comes from (paper = Reformer Sec. 2 and 5: chunks of m = 64 tokens with n_buckets = 2 l / m
buckets over a length-l sequence, 8 hash rounds at evaluation, where LSH attention nearly matches full attention,
Fig. 4 / Table 2; UniMem = its Table 1 row, sized as Longformer's and BigBird's):
- Management, two segments, `clear`: UniMem's Clear All over 2 x 2,048 (as Longformer and BigBird).
- Writing, direct K/V.
- Reading, `reading.lsh_buckets` = 2 x memory / chunk with Reformer's chunk of 64 per 2,048-token segment scaled to
  the run (128 buckets for a memory of two segments at any segment length), `reading.lsh_rounds` = 8, seeded.
- Injection, all layers.
- Training, BPTT over 2 segments (Reformer trains with full gradients over its sequence; as UniMem's Longformer).
- Positions, official (UniMem's code): memory keys at position 0, the segment from 0; keys are hashed as attended.
"""

from __future__ import annotations

from unimem_bench.methods.config import Injection, Management, Position, Reading, Training, UniMemConfig, Writing
from unimem_bench.methods.registry import MethodContext, method

ROUNDS = 8
"""Reformer's hash rounds at evaluation (n_hashes = 8: close to full attention, its Fig. 4)."""
CHUNK = 64
"""Reformer's chunk of m = 64 tokens per 2,048-token segment; n_buckets = 2 l / m."""


@method("reformer", paper="Reformer (Kitaev et al., 2020)", url="https://arxiv.org/abs/2001.04451",
        fidelity=("approximation: LSH-bucketed reading of memory; queries and keys hashed by the same seeded random "
                  "rotations (a LLaMA has separate Q/K projections, so Reformer's shared-QK hashing is impossible), "
                  "a query reads every memory key sharing a bucket in any round, each once (Reformer's duplicate "
                  "count correction is not needed); no sorting into chunks and no attention to the adjacent chunk; "
                  "the local segment is read densely and causally; rotations fixed for the run, not redrawn per "
                  "forward"))
def reformer(ctx: MethodContext) -> UniMemConfig:
    size = ctx.segments(2)
    # n_buckets = 2 l / m over the memory, kept even (argmax over [xR ; -xR]).
    buckets = max(2, 2 * size // ctx.paper_tokens(CHUNK) // 2 * 2)
    return UniMemConfig(
        name="reformer",
        # UniMem Table 1: Clear All; two segments as its Longformer and BigBird.
        management=Management(size=size, overflow="clear"),
        writing=Writing(kv="direct"),
        reading=Reading(lsh_buckets=buckets, lsh_rounds=ROUNDS),
        injection=Injection("all"),
        training=Training(strategy="bptt", bptt_segments=2),
        position=Position(mode="official"),
    )
