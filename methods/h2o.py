"""H2O, Heavy-Hitter Oracle (Zhang et al., 2023), https://arxiv.org/abs/2306.14048

A fixed KV budget split between "heavy hitters" (the tokens that have received the most attention so far,
accumulated over every query) and the most recent tokens; the lowest accumulated score is evicted.

UniMem dimensions: Management = score eviction `h2o` at a fixed budget; Writing = direct K/V; Reading = all memory
by position; Injection = all layers. Defaults (paper = Sec. 5, Table 1/Fig. 4; official = FMInference/H2O
`h2o_hf/utils_lm_eval/modify_llama.py`):
- Budget one segment (the memory Transformer-XL holds, so the two compare at equal KV slots); the paper evaluates
  20% of the sequence (`heavy_ratio=0.1`, `recent_ratio=0.1`), a ratio `--set management.size=` sets per run.
- Heavy and recent halves: paper and official (equal heavy and recent ratios); no sinks (H2O has none).
- Scores accumulate the attention every query gives each slot (official `hh_score`, summed over queries); query
  heads of one KV head add up (GQA; the paper's models are MHA).
"""

from __future__ import annotations

from unimem_bench.methods.config import Injection, Management, Position, Reading, UniMemConfig, Writing
from unimem_bench.methods.registry import MethodContext, method

FIDELITY = ("approximation: "
            "eviction at the end of every segment (official: after every token), so a segment's own queries see "
            "all of it; positions within the cache (compact), not the tokens' original positions")


@method("h2o", paper="H2O: Heavy-Hitter Oracle (Zhang et al., 2023)",
        url="https://arxiv.org/abs/2306.14048", fidelity=FIDELITY)
def h2o(ctx: MethodContext) -> UniMemConfig:
    size = ctx.segments(1)
    return UniMemConfig(
        name="h2o",
        # Half heavy hitters, half recent tokens (official heavy_ratio = recent_ratio).
        management=Management(size=size, eviction="h2o", recent=size // 2),
        writing=Writing(kv="direct"),
        reading=Reading(read_all=True),
        injection=Injection("all"),
        # Cache positions 0 .. size-1 then the segment: a long document stays inside the trained context.
        position=Position(mode="compact"),
    )
