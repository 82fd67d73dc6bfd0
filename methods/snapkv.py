"""SnapKV (Li et al., 2024), https://arxiv.org/abs/2404.14469

The last queries of the prompt (the observation window) already know what they attend to: their attention,
averaged over the window and pooled over neighbouring positions (to keep whole phrases), selects the KV pairs kept
per head; the window itself is always kept.

UniMem dimensions: Management = score eviction `snapkv` at a fixed budget; Writing = direct K/V; Reading = all
memory by position; Injection = all layers. Defaults (paper = Sec. 4, Table 1; official = FasterDecoding/SnapKV,
kvpress `SnapKVPress`):
- Budget one segment (Transformer-XL's memory, for equal KV slots); the paper's budgets (1,024 .. 4,096 of prompts
  up to 32K) are a `--set management.size=` away.
- Observation window 32 queries, pooling kernel 7 (paper and official `window_size=32, kernel_size=7`; kvpress
  uses 64 and 5), scaled down with a segment shorter than 128 tokens (a quarter of it).
- The window is protected (`recent` = the window, as official and kvpress keep it); group heads averaged (kvpress).
"""

from __future__ import annotations

from unimem_bench.methods.config import Injection, Management, Position, Reading, UniMemConfig, Writing
from unimem_bench.methods.registry import MethodContext, method

FIDELITY = ("approximation: "
            "compresses at the end of every segment with that segment's last queries (official: once, after "
            "the prompt); pools over held slots in memory order; positions within the cache (compact)")


@method("snapkv", paper="SnapKV (Li et al., 2024)",
        url="https://arxiv.org/abs/2404.14469", fidelity=FIDELITY)
def snapkv(ctx: MethodContext) -> UniMemConfig:
    # The paper's 32-query window, at most a quarter of the segment so most of it is still scored.
    observe = max(1, min(32, ctx.segment_len // 4))
    return UniMemConfig(
        name="snapkv",
        management=Management(size=ctx.segments(1), eviction="snapkv", observe=observe, pool_kernel=7,
                              recent=observe),
        writing=Writing(kv="direct"),
        reading=Reading(read_all=True),
        injection=Injection("all"),
        # Cache positions 0 .. size-1 then the segment: a long document stays inside the trained context.
        position=Position(mode="compact"),
    )
