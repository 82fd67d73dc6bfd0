"""Knorm, L2-norm KV compression (Devoto et al., 2024), https://arxiv.org/abs/2406.11430

Keys with a low L2 norm draw high attention, so keeping the lowest-norm keys approximates keeping the most
attended ones without computing attention at all.

UniMem dimensions: Management = score eviction `knorm` at a fixed budget; Writing = direct K/V; Reading = all
memory by position; Injection = all layers. Defaults (paper = Sec. 4; official = kvpress `KnormPress`, score
`-keys.norm(dim=-1)`):
- Budget one segment (Transformer-XL's memory, for equal KV slots); the paper's compression ratios are a
  `--set management.size=` away.
- No protected tokens (kvpress' press has none; the paper skips the first two layers, which `injection.layers`
  can express).
- Norms of the stored keys: they are stored unrotated and RoPE is a rotation, so the norm is the rotated key's.
"""

from __future__ import annotations

from unimem_bench.methods.config import Injection, Management, Position, Reading, UniMemConfig, Writing
from unimem_bench.methods.registry import MethodContext, method

FIDELITY = ("approximation: "
            "compresses at the end of every segment (kvpress: once, after the prefill); positions within the cache "
            "(compact)")


@method("knorm", paper="Knorm: L2 norm KV compression (Devoto et al., 2024)",
        url="https://arxiv.org/abs/2406.11430", fidelity=FIDELITY)
def knorm(ctx: MethodContext) -> UniMemConfig:
    return UniMemConfig(
        name="knorm",
        management=Management(size=ctx.segments(1), eviction="knorm"),
        writing=Writing(kv="direct"),
        reading=Reading(read_all=True),
        injection=Injection("all"),
        # Cache positions 0 .. size-1 then the segment: a long document stays inside the trained context.
        position=Position(mode="compact"),
    )
