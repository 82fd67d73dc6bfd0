"""Longformer (Beltagy et al., 2020), https://arxiv.org/abs/2004.05150, as a streaming memory method.

Local sliding-window attention plus a few global tokens that every position sees; streamed, the window reaches back
into the previous segment's keys/values.

Where each default comes from (paper = UniMem Table 1/2 and Eq. 8/15; official = thunlp/UniMem,
`run_clm_no_trainer.py` mode `Longformer` and `modeling_llama.py`):
- Management, two segments, `clear`: paper (Table 1: Clear All; Table 2: 4,096 = 2 x 2,048) and official
  (`memory_size=2`, `reset=True`: `MemoryLayer.update_memory_l` resets a full memory and writes nothing of the
  segment, so every third segment reads no memory). `clear-and-write` and `fifo` are the named alternatives.
- Writing, direct K/V: paper and official.
- Reading, a sliding window of one segment with stride 2 and 4 global tokens: the window and globals are the
  paper's (Table 2); sliding, the stride (`stride=2`) and memory-relative globals (the first 4 slots of the current
  memory, `MemoryLayer.retrieve`, `global_pos='beginning'`) are the official code's. The official code reads the
  globals twice (window and top-k path) when the window covers them; we read each key once.
- Injection, all layers: paper and official.
- Training, BPTT over 2 segments: the paper (Table 1 text: BPTT); the official script detaches every segment
  (`--n_bptt_step 1`). Two segments is the shortest window that trains a write then a read.
- Positions, official: memory keys at 0, segment positions from 0 (official `pos0`; the paper does not say).
"""

from __future__ import annotations

from unimem_bench.methods.config import Injection, Management, Position, Reading, Training, UniMemConfig, Writing
from unimem_bench.methods.registry import MethodContext, method


@method("longformer", paper="Longformer (Beltagy et al., 2020)", url="https://arxiv.org/abs/2004.05150",
        fidelity=("decoder variant: causal sliding window + dilation + globals streamed over segments (official "
                  "UniMem preset); Longformer's bidirectional local attention and task-chosen globals are dropped"))
def longformer(ctx: MethodContext) -> UniMemConfig:
    return UniMemConfig(
        name="longformer",
        # Table 2: memory 4,096 = two segments; Table 1 and the official code clear a full memory (writing nothing).
        management=Management(size=ctx.segments(2), overflow="clear"),
        writing=Writing(kv="direct"),
        # Table 2: window 2,048 = one segment, and 4 global tokens (a count, not scaled); official preset: sliding,
        # dilation 2, globals = the first slots of the current memory.
        reading=Reading(window=ctx.segments(1), sliding=True, stride=2, global_tokens=4, global_source="memory"),
        injection=Injection("all"),
        # Table 1 trains Longformer through its memory; two segments is the shortest BPTT window.
        training=Training(strategy="bptt", bptt_segments=2),
        position=Position(mode="official"),
    )
