"""StreamingLLM (Xiao et al., 2023), https://arxiv.org/abs/2309.17453

A rolling key/value cache that always keeps the first few tokens (attention sinks) plus the most recent ones, with
cached keys re-rotated at their positions inside the cache, not in the document (official mit-han-lab/streaming-llm,
`StartRecentKVCache` and `pos_shift/modify_llama.py`: keys at 0 .. cache-1, the query at the cache's end).

UniMem Table 1: Management multi-segment FIFO; Writing direct; Reading position (sinks + recent window); Injection
all layers. Training: none (inference only; stop-gradient if fine-tuned).

Where each default comes from (paper = arXiv 2309.17453; official = mit-han-lab/streaming-llm):
- Management, FIFO over one segment of recent tokens: the official cache evicts the oldest non-sink token. The
  official perplexity run keeps 4 + 2,000 tokens on a 4K-context Llama-2, about half its context; we keep one run
  segment so that StreamingLLM is Transformer-XL's memory plus sinks and cache positions (equal memory, comparable).
- Writing, direct K/V: paper and official.
- Reading, 4 sink tokens (the document's first 4: paper Sec. 3.2 "4 initial tokens", official `start_size=4`, a
  count, not scaled) + a sliding window of the recent tokens: each query reads the W tokens before it and itself,
  as the token-by-token cache does.
- Injection, all layers: paper and official.
- Positions, compact with `sink_shift`: sinks at 0 .. 3 and the recent tokens after them, per query, as the
  official `pos_shift` re-rotation; streamed in segments no longer than the window this is the same computation
  as the token-by-token cache (tests/test_streaming_llm.py against a token loop with an explicit cache list).
"""

from __future__ import annotations

from unimem_bench.methods.config import Injection, Management, Position, Reading, Training, UniMemConfig, Writing
from unimem_bench.methods.registry import MethodContext, method

SINK_TOKENS = 4
"""The paper's and official code's number of attention sinks (start_size=4), a count that does not scale."""


@method("streaming_llm", paper="StreamingLLM (Xiao et al., 2023)", url="https://arxiv.org/abs/2309.17453",
        fidelity=("exact: the official token-by-token cache (4 sinks + recent tokens, keys re-rotated inside the "
                  "cache) at segment length 1, and the same numbers streamed in segments up to the window"))
def streaming_llm(ctx: MethodContext) -> UniMemConfig:
    return UniMemConfig(
        name="streaming_llm",
        # The recent part of the cache: one segment, evicted oldest first (sinks are pinned outside it).
        management=Management(size=ctx.segments(1), overflow="fifo"),
        writing=Writing(kv="direct"),
        # Sinks = the document's first tokens; the window slides so each query reads the W tokens before it.
        reading=Reading(window=ctx.segments(1), sliding=True, global_tokens=SINK_TOKENS, global_source="document"),
        injection=Injection("all"),
        # Inference-only in the paper; a fine-tune treats the cache as a constant.
        training=Training(strategy="stop_gradient"),
        position=Position(mode="compact", sink_shift=True),
    )
