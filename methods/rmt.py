"""Recurrent Memory Transformer (Bulatov et al., 2022), https://arxiv.org/abs/2207.06881

m memory tokens are read in front of each segment and written after it; the last layer's outputs at the write
slots become the next segment's read and write slots. Memory is written by the model's own forward pass.

Where each default comes from (paper = UniMem Table 1/2 and Eq. 6/14; official = thunlp/UniMem,
`run_clm_no_trainer.py` mode `RMT` and `ExternalMemory` in `modeling_llama.py`):
- Management, m memory tokens replaced every segment: paper and official (`rmt_memory_size=1`).
- Writing, model forward with 40 tokens per 2,048-token segment (scaled): paper (Table 2). The official script
  uses 40 per 512-token segment. Write slots `memory`: the previous memory fills both read and write slots (paper
  Eq. 14 text, official `prepare_input_states`, booydar's RMT); `learned` puts the learned embeddings there.
  The first segment reads the learned embeddings (paper Eq. 6, booydar); the official code gives the first
  segment no read slots. The embeddings start as noise at the embedding scale (official: 0.01 x N(0, 1)).
- Reading, all memory tokens (causal among themselves, before the segment): paper and official.
- Injection, all layers (at the input): paper and official.
- Training, BPTT over 2 segments: paper (Table 1 text). The official script detaches every segment
  (`--n_bptt_step 1`), under which memory tokens never learn from a later segment.
- Positions, official: read slots, segment and write slots at 0, 1, ... every segment (official order).
Evaluate after fine-tuning for meaningful numbers: the memory embeddings are learned.
"""

from __future__ import annotations

from unimem_bench.methods.config import Injection, Position, Training, UniMemConfig, Writing
from unimem_bench.methods.registry import MethodContext, method


@method("rmt", paper="Recurrent Memory Transformer (Bulatov et al., 2022)", url="https://arxiv.org/abs/2207.06881",
        fidelity=("exact: memory tokens read before and written after each segment (official UniMem RMT), the "
                  "first segment reading learned embeddings"))
def rmt(ctx: MethodContext) -> UniMemConfig:
    return UniMemConfig(
        name="rmt",
        # Table 2: 40 memory tokens per 2,048-token segment, scaled with the segment length; write slots fed from
        # the previous memory as the official code and booydar's RMT do.
        writing=Writing(kv="none", memory_tokens=ctx.paper_tokens(40), write_slots="memory"),
        injection=Injection("all"),
        # RMT learns its memory through BPTT; two segments is the shortest window that trains a write then a read.
        training=Training(strategy="bptt", bptt_segments=2),
        position=Position(mode="official"),
    )
