"""LongMem: Augmenting Language Models with Long-Term Memory (Wang et al., 2023), https://arxiv.org/abs/2306.07174

A frozen backbone reads each segment alone and caches the keys/values of one of its layers in a long memory bank; a
residual SideNet, the only trained part, follows the backbone's hidden states and, in one memory-augmented layer,
retrieves chunks of that bank and fuses memory attention with local attention through a learned per-head gate
(`methods/engine/side_network.py`). Official code: Victorwz/LongMem (`transformer_decoder_sidenet.py`,
`sidenet_layer_palm_sidenet_retrieval.py`, `joint_multihead_attention_sum.py`, `dynamic_memory_with_chunk.py`,
`train_scripts/train_longmem.sh`).

UniMem Table 1 does not list LongMem; classified here on its four dimensions:
- Management: Multi-Sgm, FIFO. The bank holds 65K tokens, 64 of the backbone's 1K-token contexts, and drops its
  oldest entries when full (official `External_Memory.add_index` removes the oldest chunks).
- Writing: Direct. The backbone's own keys/values of one layer are cached as they are (non-differentiable, written
  by frozen weights: no "memory staleness"), not pooled or produced by an extra forward.
- Reading: Similarity. Token-to-chunk retrieval: each query head ranks chunks of 4 slots by the inner product of its
  query with the chunk's mean key and reads the tokens of its best K / 4 chunks; no position is involved.
- Injection: Certain layers. One backbone layer writes the memory and one SideNet layer reads it; the SideNet itself
  is what sets LongMem apart (the memory path is decoupled from the frozen model), recorded as `injection.side_*`.

Defaults (paper = the LongMem paper; official = `train_longmem.sh`), scaled to the run:
- Management: 64 segments FIFO (65,536 tokens = 64 of its 1,024-token contexts; `--memory-size 65536`).
- Reading: top-K tokens with K = 64 per 1,024-token segment (`--k 64`), in chunks of 4 (`--chunk-size 4`) ranked
  by their mean key; K is at least one chunk.
- Injection: memory written by backbone layer round(n x 18 / 24) - 1 (`--retrieval-layer-index 17` of 24: the
  18th), read by side layer (that index) // 2 (official `retrieval_layer_index / layer_reduction_factor`); a SideNet
  of ceil(n / 2) layers (`--layer-reduction-factor 2`), each initialised from the second backbone layer of its pair
  (`--reload-ptm-layer`: layer 2i + 1), gate logits at 0 (`memory_bias` zeros).
- Training: stop-gradient (the bank is a cached, non-differentiable memory); `finetune` trains the SideNet only.
- Positions: the segment at positions from 0 (the backbone's local context), memory attention unrotated.
"""

from __future__ import annotations

from unimem_bench.methods.config import Injection, Management, Position, Reading, Training, UniMemConfig, Writing
from unimem_bench.methods.registry import MethodContext, method

FIDELITY = ("decoder variant (LLaMA-family backbone for its GPT-2/BLOOM with ALiBi): frozen backbone, 65K-token "
            "FIFO bank of one layer's keys/values, chunk-of-4 retrieval by mean key, SideNet of every other layer "
            "with cross-network residuals and a per-head gated joint attention as the official code; memory "
            "attention uses unrotated queries and keys (ALiBi keys carry no position), the bank evicts slot by slot "
            "(official: two segments of chunks at once), and the SideNet's layers are LLaMA's sequential "
            "attention-then-MLP blocks (official: GPT-J-style parallel blocks)")
"""How close this is to the original (the registry's fidelity column)."""

LONGMEM_CONTEXT = 1024
"""LongMem's local context (`--tokens-per-sample 1024`): its memory and top-K are given per this many tokens."""
LONGMEM_TOPK = 64
LONGMEM_CHUNK = 4
LONGMEM_MEMORY_SEGMENTS = 64
"""65,536 memory tokens / 1,024-token contexts."""


@method("longmem", paper="LongMem: Augmenting Language Models with Long-Term Memory (Wang et al., 2023)",
        url="https://arxiv.org/abs/2306.07174", fidelity=FIDELITY)
def longmem(ctx: MethodContext) -> UniMemConfig:
    n = ctx.n_layers
    source = max(0, round(n * 18 / 24) - 1)  # the 18th of 24 layers
    # K = 64 per 1,024 local tokens, scaled to the segment, in whole chunks of 4.
    chunks = max(1, round(LONGMEM_TOPK * ctx.segment_len / LONGMEM_CONTEXT / LONGMEM_CHUNK))
    return UniMemConfig(
        name="longmem",
        management=Management(size=ctx.segments(LONGMEM_MEMORY_SEGMENTS), overflow="fifo"),
        writing=Writing(kv="direct"),
        reading=Reading(topk=chunks * LONGMEM_CHUNK, chunk_size=LONGMEM_CHUNK, chunk_key="mean"),
        injection=Injection(layers=(source,), side_layers=-(-n // 2), side_fusion=source // 2),
        training=Training(strategy="stop_gradient"),
        position=Position(mode="official"),
    )
