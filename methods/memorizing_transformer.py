"""Memorizing Transformer (Wu et al., 2022), https://arxiv.org/abs/2203.08913

A kNN memory of past keys/values; chosen layers retrieve the top-k most similar memories per query and merge them
with local attention (the paper's learned gate is exactly a softmax over the union, Eq. 12-13 of UniMem).

Where each default comes from (paper = UniMem Table 1/2 and Eq. 5/11-13; official = thunlp/UniMem,
`run_clm_no_trainer.py` mode `MemTrans` and `modeling_llama.py`):
- Management, 10 segments, FIFO: paper (Table 2: 20,480 = 10 x 2,048 tokens). The official script keeps 20 blocks
  of its 512-token segments (10,240 tokens); we keep the paper's ratio to the segment.
- Writing, direct K/V: paper and official.
- Reading, exact top-32 by dot product: paper and official (`_generate_topk_index_out_of_windows`, an exact
  torch.topk). faiss indexes are alternatives (`reading.index`).
- Injection, the middle and the last layer (11 and 21 of 22): paper and official (`memory_layer=[11, 21]`).
- Training, stop-gradient: paper and official.
- Positions, official: retrieved keys at position 0, segment positions from 0 (official `pos0`, as LongLLaMA).
"""

from __future__ import annotations

from unimem_bench.methods.config import Injection, Management, Position, Reading, Training, UniMemConfig, Writing
from unimem_bench.methods.registry import MethodContext, method


@method("memorizing_transformer", paper="Memorizing Transformer (Wu et al., 2022)",
        url="https://arxiv.org/abs/2203.08913",
        fidelity=("approximation: exact top-k kNN merged into one softmax (the paper's learned gate is that "
                  "split); memory keys at position 0 as the official UniMem code, no learned gate"))
def memorizing_transformer(ctx: MethodContext) -> UniMemConfig:
    return UniMemConfig(
        name="memorizing_transformer",
        # Table 2: 20,480 tokens = 10 segments of 2,048, oldest evicted first.
        management=Management(size=ctx.segments(10), overflow="fifo"),
        writing=Writing(kv="direct"),
        # Table 2: top-k 32; exact torch search so results do not depend on an index (faiss via reading.index).
        reading=Reading(topk=32, index="torch"),
        # Table 2: layers 11 and 21 of 22, i.e. the middle layer and the last one.
        injection=Injection((ctx.n_layers // 2, ctx.n_layers - 1)),
        training=Training(strategy="stop_gradient"),
        # Retrieved keys at position 0 (official pos0): far memories have no usable distance.
        position=Position(mode="official"),
    )
