"""UniMix (Fang et al., 2024), https://arxiv.org/abs/2402.03009: the paper's combination of the best choice on
each dimension.

Where each default comes from (paper = UniMem Table 2; official = thunlp/UniMem, `run_clm_no_trainer.py` mode
`mix` and `modeling_llama.py`):
- Management, 10 segments of key/value memory, FIFO, plus the 40 compressed tokens: paper (Table 2: 20,520 =
  20,480 K/V + 40 compressed). The K/V bank holds segment tokens only (official `update_memory_l`: "Don't put rmt
  tokens in each layer's memory"), so it is 10 segments, not 10 segments + 40. The official script keeps 20 blocks of
  512 tokens (10,240); we keep the paper's ratio to the segment.
- Writing, direct K/V plus model forward (40 per 2,048, scaled; write slots fed from the previous memory): paper and
  official (`rmt_memory_size=1`, as RMT).
- Reading, top-4 + a sliding window of one segment + 4 global tokens: paper (Table 2) for the sizes; official for
  sliding (counting the read slots as queries, `_generate_window_mask_for_chunk`), stride 1, memory-relative globals
  and top-k over the slots outside each query's window reach (`_generate_topk_index_out_of_windows`).
- Injection, layers 12-22 of 22 (1-based; 11-21 0-based): paper and official (`memory_layer=range(11, 22)`).
- Training, `bptt_tokens` over 2 segments: neither. The paper names no strategy for UniMix and the official script
  detaches every segment; with stop-gradient the memory tokens never get a gradient from a later segment, so they
  could not learn what to carry. Here they backpropagate through 2 segments while the K/V memory is detached.
- Positions, official: every memory key at 0, read slots then segment from 0 (official `pos0`).
"""

from __future__ import annotations

from unimem_bench.methods.config import Injection, Management, Position, Reading, Training, UniMemConfig, Writing
from unimem_bench.methods.registry import MethodContext, method


@method("unimix", paper="UniMix (Fang et al., 2024)", url="https://arxiv.org/abs/2402.03009",
        fidelity="exact: the UniMem paper's own combination (Table 2), as its official code")
def unimix(ctx: MethodContext) -> UniMemConfig:
    return UniMemConfig(
        name="unimix",
        # Table 2: 20,480 K/V tokens = 10 segments of 2,048; FIFO. The 40 compressed tokens are not K/V slots.
        management=Management(size=ctx.segments(10), overflow="fifo"),
        # Table 2: direct K/V writes feed window and top-k; 40 compressed tokens per segment are RMT-style.
        writing=Writing(kv="direct", memory_tokens=ctx.paper_tokens(40), write_slots="memory"),
        # Table 2: window 2,048 (one segment, sliding), 4 global tokens (memory-relative), top-4 from the rest.
        reading=Reading(window=ctx.segments(1), sliding=True, global_tokens=4, global_source="memory", topk=4,
                        index="torch"),
        # Table 2: layers 12-22 of 22 (1-based), the upper half of the model.
        injection=Injection(tuple(range(ctx.n_layers // 2, ctx.n_layers))),
        # Memory tokens learn through later segments; K/V memory is a constant to the gradient.
        training=Training(strategy="bptt_tokens", bptt_segments=2),
        position=Position(mode="official"),
    )
