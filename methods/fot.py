"""Focused Transformer / LongLLaMA (Tworkowski et al., 2023), https://arxiv.org/abs/2307.03170

A few memory layers attend to the local context and to a memory of (key, value) pairs of the document's earlier
context windows; memory keys are encoded "as if they had position 0 in the local context window" while local
queries and keys keep LLaMA's RoPE from 0 (LongLLaMA, CStanKonrad/long_llama `rotate_as_if_first` and the relative
`position_ids` of `LongLlamaAttention.forward`): the engine's `official` position mode. The other layers see the
local window only. Retrieved pairs join the one softmax with the local context ("treated the same way as the local
context", FoT Section 4), which is the engine's merge.

UniMem Table 1: Management Multi-Sgm, FIFO; Writing Direct; Reading Similarity; Injection Certain layers.

Where each default comes from (FoT = the FoT paper; official = CStanKonrad/long_llama, `src/modeling_longllama.py`):
- Injection: a plain model gets layers at a quarter, half and three quarters of its depth: FoT's LongLLaMA-7B uses
  8, 16, 24 of 32 (the 3B 6, 12, 18 of 26). A LongLLaMA checkpoint's own `mem_layers` come through `--model`
  (`MethodContext.memory_layers`), and then reading is dense as the checkpoint was trained.
- Reading: exact kNN top-k with k = a quarter of the segment: FoT tunes k = 128 for its 512-token local context
  (Section 5.1); exact like its FAISS flat search. With a LongLLaMA checkpoint: dense attention over the whole memory
  (FoT Appendix: "we use dense attention instead of the kNN retrieval"; official `mem_cache` concatenation).
- Management: 64 segments, FIFO. The official memory cache grows without bound; FoT evaluates up to 64K tokens with
  a 1K local context in its fine-tuning experiments, i.e. 64 local windows. FIFO is Table 1's choice.
- Training: bptt over 2 segments, FoT's cross-batch previous context C_prev is differentiable; the d - 1 negative
  contexts from other documents are not reproduced.
"""

from __future__ import annotations

from unimem_bench.methods.config import Injection, Management, Position, Reading, Training, UniMemConfig, Writing
from unimem_bench.methods.registry import MethodContext, method

FIDELITY = ("exact at inference (LongLLaMA: memory keys at position 0, local RoPE from 0, dense memory attention "
            "for a LongLLaMA checkpoint, exact kNN top-k otherwise); approximation in training: cross-batch "
            "negatives from other documents are not reproduced, gradients reach the previous segment only")
"""How close this is to the original (the registry's fidelity column)."""

FOT_LOCAL_CONTEXT = 512
"""FoT's local context in its language-modelling experiments, where k = 128 was tuned."""
FOT_TOPK = 128


@method("fot", paper="Focused Transformer / LongLLaMA (Tworkowski et al., 2023)",
        url="https://arxiv.org/abs/2307.03170", fidelity=FIDELITY)
def fot(ctx: MethodContext) -> UniMemConfig:
    n = ctx.n_layers
    checkpoint = bool(ctx.memory_layers)
    layers = ctx.memory_layers or tuple(sorted({n // 4, n // 2, 3 * n // 4}))
    # k = 128 per 512 local tokens (FoT Section 5.1), scaled to the segment.
    topk = max(1, round(FOT_TOPK * ctx.segment_len / FOT_LOCAL_CONTEXT))
    return UniMemConfig(
        name="fot",
        management=Management(size=ctx.segments(64), overflow="fifo"),
        writing=Writing(kv="direct"),
        # A LongLLaMA checkpoint was trained with dense memory attention; FoT's own method is exact kNN.
        reading=Reading(read_all=True) if checkpoint else Reading(topk=topk, index="torch"),
        injection=Injection(layers),
        training=Training(strategy="bptt", bptt_segments=2),
        position=Position(mode="official"),
    )
