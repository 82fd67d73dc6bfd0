"""Quest: query-aware sparsity for long-context inference (Tang et al., 2024), https://arxiv.org/abs/2406.10774

The KV cache is cut into pages of 16 tokens; each page keeps the elementwise minimum and maximum of its keys. A
query scores every page by the upper bound sum_d max(q_d min_d, q_d max_d) of q . k over the page, and attends only
to the tokens of its best pages (a token budget), per head; the first two layers stay dense.

UniMem Table 1 view: Management Multi-Sgm, no eviction ("/": the whole cache is kept); Writing Direct; Reading
Similarity (page-level, query-aware) and, in the first two layers, every slot; Injection All-Lyr.

Where each default comes from (paper = Quest; official = mit-han-lab/Quest):
- Reading: chunk retrieval with `reading.chunk_key=bounds` (Quest's bound) over pages of `reading.chunk_size=16`
  (the paper's page size); the token budget `reading.topk` is one segment (2,048 at UniMem's 2,048-token segments,
  the middle of the 1,024-4,096 budgets the paper reports), rounded down to whole pages.
- Selection: per query and head (`reading.chunk_select=query`): each scored token is one of Quest's decoding steps,
  which pick pages per step; Quest's prefill is dense full attention (official), so it has no rule for a chunk of
  queries. `reading.chunk_select=block` (one ranking per block of `reading.chunk_block` queries, summed bounds)
  reads a chunk of queries faster, as an approximation.
- Dense layers: `reading.dense_layers` = the first two layers read all memory (paper: "we do not apply Quest to
  the first two layers", whose attention is not sparse enough); a model of two layers or fewer keeps its last
  layer sparse.
- Management: 256 segments FIFO: Quest keeps the whole cache; the bound only matters past 256 segments.
- Positions: official (memory keys at position 0, the segment from 0), as the paper's other similarity readers here,
  so a document longer than the trained context stays inside it; `position.mode=absolute` is Quest's own cache
  (every key at its position) for a model whose context covers the document.
- Training: none (training-free); stop-gradient if fine-tuned.
"""

from __future__ import annotations

from unimem_bench.methods.config import Injection, Management, Position, Reading, Training, UniMemConfig, Writing
from unimem_bench.methods.registry import MethodContext, method

FIDELITY = ("decoder variant: Quest's page selection (min/max bound, pages of 16, per query head, the first two "
            "layers dense) applied to every streamed segment's queries, each reading its own segment causally "
            "beside its top pages (Quest: dense prefill, pages only while decoding, the current tokens among the "
            "pages); pages counted from the oldest slot held; memory keys at position 0 unless "
            "position.mode=absolute (Quest's cache positions)")
"""How close this is to the original (the registry's fidelity column)."""

PAGE = 16
"""Quest's page size in tokens (paper default)."""
DENSE_LAYERS = 2
"""Quest leaves its first two layers dense."""


@method("quest", paper="Quest: Query-Aware Sparsity (Tang et al., 2024)", url="https://arxiv.org/abs/2406.10774",
        fidelity=FIDELITY)
def quest(ctx: MethodContext) -> UniMemConfig:
    # A token budget of one segment, in whole pages (2,048 at the paper's segment).
    budget = max(PAGE, ctx.segment_len // PAGE * PAGE)
    return UniMemConfig(
        name="quest",
        # Quest keeps the whole cache; FIFO only past 256 segments.
        management=Management(size=ctx.segments(256), overflow="fifo"),
        writing=Writing(kv="direct"),
        reading=Reading(topk=budget, chunk_size=PAGE, chunk_key="bounds", index="torch",
                        dense_layers=tuple(range(min(DENSE_LAYERS, ctx.n_layers - 1)))),
        injection=Injection("all"),
        training=Training(strategy="stop_gradient"),
        # Memory keys at position 0: a document past the trained context stays inside it.
        position=Position(mode="official"),
    )
