"""InfLLM: training-free context memory (Xiao et al., 2024), https://arxiv.org/abs/2402.04617

Attention reads the initial tokens (attention sinks), a sliding local window, and a few memory blocks of the
distant context: the evicted tokens are grouped into blocks, each represented by its few representative tokens (the
tokens its own neighbourhood's queries attended most), and each query reads the blocks whose representative keys
match it best.

UniMem Table 1 view: Management Multi-Sgm, no eviction ("/": every block kept, offloaded to CPU); Writing Direct;
Reading Position (initial tokens, local window) + Similarity (top blocks); Injection All-Lyr.

Where each default comes from (paper = InfLLM; official = thunlp/InfLLM `config/mistral-inf-llm.yaml` and
`inf_llm/attention/context_manager.py`), scaled from the official local window of 4,096 tokens = two of UniMem's
2,048-token segments:
- Reading: a sliding window of 2 segments (official `n_local` 4,096); the document's first segment/16 tokens as
  globals (official `n_init` 128 per 2,048); chunk retrieval with `reading.chunk_key=representative` over blocks of
  segment/16 slots (official `block_size` 128) and `reading.representatives=4` (official `repr_topk`), reading 16
  blocks (official `topk` 16), i.e. one segment of tokens.
- Block selection: once per block of segment/4 consecutive queries (`reading.chunk_select=block`,
  `reading.chunk_block`; official `exc_block_size` 512 per 2,048-token chunk), by the sum of the block's queries'
  scores (official: its mean query, the same ranking), so the block's queries read the same blocks; one decoded
  token is a block of one. `reading.chunk_select=query` ranks per query and KV head instead.
- Representative score of a token: its mean q . k over the queries of its own segment at or after it (the paper's
  r_m, the queries after token m, limited to what one segment holds); a block's key is the mean of its top
  representative keys (official `get_block_k`), ranked by q . that key.
- Management: 256 segments FIFO: InfLLM keeps every block (offloaded); the bound only matters past 256 segments.
- Positions: compact (initial tokens, window and segment consecutive, blocks at position 0): every block sits
  further than the window from each query, close to InfLLM's one position for all memory at n_local.
"""

from __future__ import annotations

from unimem_bench.methods.config import Injection, Management, Position, Reading, Training, UniMemConfig, Writing
from unimem_bench.methods.registry import MethodContext, method

FIDELITY = ("approximation: InfLLM's initial tokens, sliding local window and top blocks by representative keys in "
            "one softmax, without its GPU/CPU offload cache (every block stays in memory); blocks ranked once per "
            "block of segment/4 queries (official: per 512-query chunk) by the block's queries summed, per KV "
            "head (official: summed over all heads); "
            "representative scores from q . k of the token's own segment's later queries (official: the local "
            "window's softmax scores); blocks counted from the oldest slot after the initial tokens; blocks at "
            "position 0 and the initial tokens at 0 .. n_init - 1 (official: all memory at one position)")
"""How close this is to the original (the registry's fidelity column)."""

BLOCKS_PER_SEGMENT = 16
"""Official block_size 128 and n_init 128 per 2,048 tokens (half the official 4,096-token local window)."""
TOP_BLOCKS = 16
"""Official `topk`: blocks read per query."""
REPRESENTATIVES = 4
"""Official `repr_topk`: representative tokens per block."""
QUERY_BLOCKS_PER_SEGMENT = 4
"""Official `exc_block_size` 512 per 2,048 tokens: queries ranking the blocks together."""


@method("infllm", paper="InfLLM (Xiao et al., 2024)", url="https://arxiv.org/abs/2402.04617", fidelity=FIDELITY)
def infllm(ctx: MethodContext) -> UniMemConfig:
    block = max(1, ctx.segment_len // BLOCKS_PER_SEGMENT)
    return UniMemConfig(
        name="infllm",
        # Every block is kept (offloaded in the original); FIFO only past 256 segments.
        management=Management(size=ctx.segments(256), overflow="fifo"),
        writing=Writing(kv="direct"),
        # Official n_local 4,096 = two 2,048-token segments, sliding per token.
        reading=Reading(window=ctx.segments(2), sliding=True, global_tokens=block, global_source="document",
                        topk=TOP_BLOCKS * block, chunk_size=block, chunk_key="representative",
                        representatives=REPRESENTATIVES, index="torch", chunk_select="block",
                        chunk_block=max(1, ctx.segment_len // QUERY_BLOCKS_PER_SEGMENT)),
        injection=Injection("all"),
        training=Training(strategy="stop_gradient"),
        # Initial tokens, window and segment at consecutive positions, blocks at 0 (further than the window).
        position=Position(mode="compact"),
    )
