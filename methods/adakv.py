"""Ada-KV (Feng et al., 2024), https://arxiv.org/abs/2407.11550

Adaptive budget allocation across heads: a layer's budget (heads x per-head budget) goes to the top (head, token)
scores of all its heads together, so heads with concentrated attention keep few tokens and dispersed heads many;
a safeguard keeps a minimum per head. Scores are SnapKV's (the paper's main setting, Ada-SnapKV).

UniMem dimensions: Management = score eviction `snapkv` with `head_budget=adaptive` (Table 1 style: Multi-Sgm, score
eviction in place of FIFO, budgets per KV head); Writing = direct K/V; Reading = all memory by position; Injection =
all layers. Defaults (paper = Sec. 3-4; official = FFY0/AdaKV, kvpress `AdaKVPress`):
- Budget one segment per KV head on average (Transformer-XL's memory, for equal KV slots); the paper's 128 .. 2,048
  per head are a `--set management.size=` or `management.budget=` away.
- Safeguard: every head keeps its best floor(0.2 x per-head budget) slots (kvpress `alpha_safeguard=0.2`); the
  observation window (protected) counts towards each head's slots.
- Observation window 32 and pooling kernel 7, as our snapkv (the SnapKV setting the paper builds on), a quarter of
  a segment shorter than 128. GQA: scores averaged over a KV head's query heads (the paper's GQA variant).
"""

from __future__ import annotations

from unimem_bench.methods.config import Injection, Management, Position, Reading, UniMemConfig, Writing
from unimem_bench.methods.registry import MethodContext, method

FIDELITY = ("approximation: "
            "compresses at the end of every segment with that segment's last queries (official: once, after the "
            "prompt); heads' slots stored padded to the widest head (masked), positions within the cache (compact)")


@method("adakv", paper="Ada-KV: Optimizing KV Cache Eviction by Adaptive Budget Allocation (Feng et al., 2024)",
        url="https://arxiv.org/abs/2407.11550", fidelity=FIDELITY)
def adakv(ctx: MethodContext) -> UniMemConfig:
    # SnapKV's 32-query window, at most a quarter of the segment so most of it is still scored.
    observe = max(1, min(32, ctx.segment_len // 4))
    return UniMemConfig(
        name="adakv",
        # head_floor 0.2: kvpress' alpha_safeguard.
        management=Management(size=ctx.segments(1), eviction="snapkv", observe=observe, pool_kernel=7,
                              recent=observe, head_budget="adaptive", head_floor=0.2),
        writing=Writing(kv="direct"),
        reading=Reading(read_all=True),
        injection=Injection("all"),
        # Each head's slots just before the segment: a long document stays inside the trained context.
        position=Position(mode="compact"),
    )
