"""Routing Transformer (Roy et al., 2021), https://arxiv.org/abs/2003.05997, as a causal streaming memory method.

Routing attention: queries and keys, normalized to the unit sphere, are assigned to k centroids learned by online
k-means (exponential moving average of the vectors assigned to each); a query attends to the keys of its cluster.
Balanced routing: each cluster takes its top-w members by similarity to the centroid, so clusters are equal in size
(Roy et al. Sec. 4; official google-research/routing_transformer).

UniMem Table 1: Management multi-segment, Clear All; Writing direct; Reading similarity (k-means routing); Injection
all layers.

Where each default comes from (paper = Routing Transformer Sec. 4: k = sqrt(n) clusters for O(n^1.5) attention,
w = n / k members per cluster, EMA decay 0.999 per training step; UniMem = its Table 1 row, sized as Longformer's):
- Management, two segments, `clear`: UniMem's Clear All over 2 x 2,048 (as Longformer and BigBird).
- Writing, direct K/V.
- Reading, `reading.clusters` = round(sqrt(memory)), `reading.cluster_size` = 0 (the balanced share n / k),
  `reading.cluster_decay` = 1 - segment / memory: the paper's 0.999 averages over a thousand training steps and its
  centroids are then frozen; a pretrained LLaMA has none, so they are learned online while one document streams and
  must follow what memory holds (one segment in, the memory's segments averaged).
- Injection, all layers.
- Training, BPTT over 2 segments (the paper trains with full gradients over its sequence; as UniMem's Longformer).
- Positions, official (UniMem's code): memory keys at position 0, the segment from 0; keys are routed as attended.
"""

from __future__ import annotations

import math

from unimem_bench.methods.config import Injection, Management, Position, Reading, Training, UniMemConfig, Writing
from unimem_bench.methods.registry import MethodContext, method

MEMORY_SEGMENTS = 2
"""UniMem's Clear All memory (as Longformer): two segments."""


@method("routing", paper="Routing Transformer (Roy et al., 2021)", url="https://arxiv.org/abs/2003.05997",
        fidelity=("approximation: k-means-routed reading of memory; unit queries and keys routed to per-KV-head "
                  "centroids updated online by EMA after every segment (from seeded random unit centroids, not "
                  "trained ones), balanced clusters of the top-w memory keys by similarity; each query reads the "
                  "cluster nearest it (the paper routes the top-w queries per cluster too, which would leave some "
                  "queries nothing); the local segment is read densely and causally in place of the paper's local "
                  "attention heads"))
def routing(ctx: MethodContext) -> UniMemConfig:
    size = ctx.segments(MEMORY_SEGMENTS)
    return UniMemConfig(
        name="routing",
        management=Management(size=size, overflow="clear"),
        writing=Writing(kv="direct"),
        reading=Reading(clusters=max(1, round(math.sqrt(size))), cluster_decay=1 - 1 / MEMORY_SEGMENTS),
        injection=Injection("all"),
        training=Training(strategy="bptt", bptt_segments=2),
        position=Position(mode="official"),
    )
