"""Memorizing Transformer (Wu et al., 2022), https://arxiv.org/abs/2203.08913

A kNN memory of past keys/values; chosen layers retrieve the top-k most similar memories per query and merge them
with local attention (the paper's learned gate is exactly a softmax over the union, Eq. 12-13 of UniMem).

UniMem dimensions (paper Table 2): Management 20,480 tokens = 10 segments, FIFO; Writing direct; Reading top-32
by similarity; Injection layers 11 and 21 of 22 (middle and last). Trained with stop-gradient.
"""

from __future__ import annotations

from unimem_bench.methods.config import Injection, Management, Position, Reading, Training, UniMemConfig, Writing
from unimem_bench.methods.registry import MethodContext, method


@method("memorizing_transformer", paper="Memorizing Transformer (Wu et al., 2022)",
        url="https://arxiv.org/abs/2203.08913")
def memorizing_transformer(ctx: MethodContext) -> UniMemConfig:
    return UniMemConfig(
        name="memorizing_transformer",
        # Table 2: 20,480 tokens = 10 segments of 2,048, oldest evicted first.
        management=Management(size=ctx.segments(10), overflow="fifo"),
        writing=Writing(kv="direct"),
        # Table 2: top-k 32; exact torch search so results do not depend on an index (faiss via reading.index).
        reading=Reading(topk=32, index="torch"),
        # Table 2: layers 11 and 21 of 22, i.e. the middle layer and the last one.
        injection=Injection((ctx.n_layers // 2, ctx.n_layers - 1)),
        training=Training(strategy="stop_gradient"),
        # Retrieved keys sit at position 0 (the paper's code, as LongLLaMA): far memories have no usable distance.
        position=Position(mode="compact"),
    )
