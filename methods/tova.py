"""TOVA, Token Omission Via Attention (Oren et al., 2024), https://arxiv.org/abs/2401.06104

Transformers as multi-state RNNs: a fixed number of states; when full, the token with the lowest attention from the
current (last) query, averaged over all heads of the layer, is dropped (one decision per layer, shared by heads).

UniMem dimensions: Management = score eviction `tova` at a fixed budget; Writing = direct K/V; Reading = all memory
by position; Injection = all layers. Defaults (paper = Sec. 3-4; official = schwartz-lab-NLP/TOVA `tova_cache.py`,
kvpress `TOVAPress`):
- Budget one segment (Transformer-XL's memory, for equal KV slots); the paper's multi-state sizes (64 .. 4,096)
  are a `--set management.size=` away.
- No protected tokens: the paper's policy has none (kvpress keeps only the last token, which the segment's own
  write keeps anyway since the last query attends to itself most).
- Scores: the last query's attention averaged over all heads (paper and official), fresh at every eviction.
"""

from __future__ import annotations

from unimem_bench.methods.config import Injection, Management, Position, Reading, UniMemConfig, Writing
from unimem_bench.methods.registry import MethodContext, method

FIDELITY = ("approximation: "
            "eviction at the end of every segment with its last query (official: one token per generated token); "
            "positions within the cache (compact)")


@method("tova", paper="TOVA: Transformers are Multi-State RNNs (Oren et al., 2024)",
        url="https://arxiv.org/abs/2401.06104", fidelity=FIDELITY)
def tova(ctx: MethodContext) -> UniMemConfig:
    return UniMemConfig(
        name="tova",
        management=Management(size=ctx.segments(1), eviction="tova"),
        writing=Writing(kv="direct"),
        reading=Reading(read_all=True),
        injection=Injection("all"),
        # Cache positions 0 .. size-1 then the segment: a long document stays inside the trained context.
        position=Position(mode="compact"),
    )
