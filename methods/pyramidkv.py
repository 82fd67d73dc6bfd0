"""PyramidKV (Cai et al., 2024), https://arxiv.org/abs/2406.02069

Pyramidal information funneling: lower layers attend broadly, higher layers to a few tokens, so lower layers get a
larger KV budget and higher layers a smaller one (an arithmetic schedule with the same total as a uniform budget);
within a layer, SnapKV's selection (the observation window's pooled attention) picks the slots.

UniMem dimensions: Management = score eviction `snapkv` with `layer_budget=pyramid` (Table 1 style: Multi-Sgm, score
eviction in place of FIFO, budgets per layer); Writing = direct K/V; Reading = all memory by position; Injection =
all layers. Defaults (paper = Sec. 3, official = Zefan-Cai/PyramidKV (KVCache-Factory) `PyramidKVCluster`, kvpress
`PyramidKVPress`):
- Budget one segment per layer on average (Transformer-XL's memory, for equal KV slots); the paper's 64 .. 2,048 of
  prompts up to 18K are a `--set management.size=` or `management.budget=` away.
- Pyramid: the unprotected budget B runs from 2B - B/beta in the lowest layer to B/beta in the highest, beta = 20
  (official default); we keep the total exactly (official floors its step, which can overshoot slightly).
- Observation window 32 queries and pooling kernel 7, as our snapkv (SnapKV's setting; PyramidKV's code defaults
  to a window of 64 and kernel 5), a quarter of a segment shorter than 128; the window is protected in every layer.
"""

from __future__ import annotations

from unimem_bench.methods.config import Injection, Management, Position, Reading, UniMemConfig, Writing
from unimem_bench.methods.registry import MethodContext, method

FIDELITY = ("approximation: "
            "compresses at the end of every segment with that segment's last queries (official: once, after the "
            "prompt); the pyramid's total is kept exactly (official floors its step); positions within the cache "
            "(compact)")


@method("pyramidkv", paper="PyramidKV: Dynamic KV Cache Compression based on Pyramidal Information Funneling "
        "(Cai et al., 2024)", url="https://arxiv.org/abs/2406.02069", fidelity=FIDELITY)
def pyramidkv(ctx: MethodContext) -> UniMemConfig:
    # SnapKV's 32-query window, at most a quarter of the segment so most of it is still scored.
    observe = max(1, min(32, ctx.segment_len // 4))
    return UniMemConfig(
        name="pyramidkv",
        # beta = 20: the official PyramidKVCluster default.
        management=Management(size=ctx.segments(1), eviction="snapkv", observe=observe, pool_kernel=7,
                              recent=observe, layer_budget="pyramid", pyramid_beta=20),
        writing=Writing(kv="direct"),
        reading=Reading(read_all=True),
        injection=Injection("all"),
        # Cache positions just before the segment: a long document stays inside the trained context.
        position=Position(mode="compact"),
    )
