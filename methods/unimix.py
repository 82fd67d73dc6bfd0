"""UniMix (Fang et al., 2024), https://arxiv.org/abs/2402.03009: the paper's combination of the best choice on
each dimension.

UniMem dimensions (paper Table 2): Management 20,520 tokens (10 segments + the 40 compressed tokens), FIFO;
Writing direct K/V plus model forward (40 compressed tokens per 2,048); Reading top-4 by similarity, a 2,048-token
window by position and 4 global tokens; Injection layers 12-22 of 22 (the upper half).
"""

from __future__ import annotations

from unimem_bench.methods.config import Injection, Management, Position, Reading, Training, UniMemConfig, Writing
from unimem_bench.methods.registry import MethodContext, method


@method("unimix", paper="UniMix (Fang et al., 2024)", url="https://arxiv.org/abs/2402.03009")
def unimix(ctx: MethodContext) -> UniMemConfig:
    memory_tokens = ctx.paper_tokens(40)
    return UniMemConfig(
        name="unimix",
        # Table 2: 20,520 = 10 segments of 2,048 plus the 40 compressed tokens; FIFO.
        management=Management(size=ctx.segments(10) + memory_tokens, overflow="fifo"),
        # Table 2: direct K/V writes feed window and top-k; 40 compressed tokens per segment are RMT-style.
        writing=Writing(kv="direct", memory_tokens=memory_tokens),
        # Table 2: window 2,048 (one segment), 4 global tokens, top-4 from the rest of memory.
        reading=Reading(window=ctx.segments(1), global_tokens=4, topk=4, index="torch"),
        # Table 2: layers 12-22 of 22 (1-based), the upper half of the model.
        injection=Injection(tuple(range(ctx.n_layers // 2, ctx.n_layers))),
        training=Training(strategy="stop_gradient"),
        position=Position(mode="compact"),
    )
