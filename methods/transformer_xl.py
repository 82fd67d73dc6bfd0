"""Transformer-XL (Dai et al., 2019), https://arxiv.org/abs/1901.02860

Each segment attends to the cached keys/values of the previous segment, then caches its own.

Where each default comes from (paper = UniMem Table 1/2 and Eq. 3/10; official = thunlp/UniMem,
`run_clm_no_trainer.py` mode `Trans-XL` and `modeling_llama.py`):
- Management, one segment, FIFO: paper and official (`memory_size=1`, `reset=False`).
- Writing, direct K/V: paper and official (`MemoryLayer.update_memory_l`).
- Reading, a sliding window of one segment: paper (Eq. 3: query i reaches L - i memory slots) and official
  (`_generate_window_mask_for_chunk`: 0-based query i sees the last W - i slots; we follow the official count, one
  slot more than the paper's formula). `reading.sliding=false` gives every query the whole window.
- Injection, all layers: paper and official.
- Training, stop-gradient: paper; the official script (`--n_bptt_step 1`) also detaches memory every segment.
- Positions, official: memory keys at position 0 and segment positions restarting at 0 (official `pos_type='pos0'`;
  the paper does not say). Measured on stories260K (README, Fidelity): at segment = trained context it gives XL's
  best perplexity (compact with a whole window falls behind vanilla there); at shorter segments `compact` is
  better, since memory at position 0 discards distance.
"""

from __future__ import annotations

from unimem_bench.methods.config import Injection, Management, Position, Reading, Training, UniMemConfig, Writing
from unimem_bench.methods.registry import MethodContext, method


@method("transformer_xl", paper="Transformer-XL (Dai et al., 2019)", url="https://arxiv.org/abs/1901.02860",
        fidelity=("approximation: XL's cache read by a stock RoPE LLaMA (official UniMem positions: memory at 0), "
                  "not XL's relative positional encoding"))
def transformer_xl(ctx: MethodContext) -> UniMemConfig:
    return UniMemConfig(
        name="transformer_xl",
        # Table 2: memory 2,048 = one segment; FIFO replaces it with the segment just read.
        management=Management(size=ctx.segments(1), overflow="fifo"),
        writing=Writing(kv="direct"),
        # Table 2: window 2,048 = the whole memory, read by position, sliding per query (Eq. 3, official mask).
        reading=Reading(window=ctx.segments(1), sliding=True),
        injection=Injection("all"),
        # XL's cache is a constant to the gradient ("SG" in the paper).
        training=Training(strategy="stop_gradient"),
        # The official code's positions: memory at 0, the segment from 0.
        position=Position(mode="official"),
    )
