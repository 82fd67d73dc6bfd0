"""TRIME (Zhong et al., 2022), https://arxiv.org/abs/2205.12674

Training Language Models with Memory Augmentation: the next-token distribution is one softmax over the vocabulary
and a memory of (key, next token) entries, p(w) proportional to exp(E_w . h) + sum over entries j of token w of
exp(sim(g(c), g(c_j))), with sim the dot product scaled by 1/sqrt(d) (official `compute_in_bacth_logits`) and g
the last layer's FFN input (`reading.output=trime`, `methods/engine/output_memory.py`). Training takes in-batch
examples as memory (`training.strategy=trime`): the loss is the same joint softmax over the segment's earlier
tokens, on the graph, so the representation learns to be retrieved.

UniMem Table 1: Management Multi-Sgm, "/" (the memory keeps everything); Writing Direct; Reading Similarity;
Injection Certain (the last layer's FFN input, read into the vocabulary). UniMem notes it as focused on inference.

Where each default comes from (paper = TRIME, official = princeton-nlp/TRIME):
- Memory at test time (TrimeLM_long / TrimeLM_ext): local memory = the segment's earlier tokens (dense), long
  memory = the document's previous segments, external = a corpus (`reading.output_datastore`); long and external
  memory are read by top-k by the same similarity (official: kNN search for external memory).
- k = the segment length for long memory (one previous segment's worth of entries).
- Temperature 1 (the paper tunes a softmax temperature per model, e.g. 1.17; 1 keeps the training objective's
  scale).
- Training: `trime` (the TrimeLM loss, official `trime_loss.py`: local memory with a causal mask), memory detached
  across segments.
"""

from __future__ import annotations

from unimem_bench.methods.config import Position, Reading, Training, UniMemConfig
from unimem_bench.methods.registry import MethodContext, method

FIDELITY = ("approximation: TRIME's joint softmax over vocabulary logits and memory (dot product / sqrt(d) of the "
            "last layer's FFN inputs) with local (dense), long and external memory, the last two by exact top-k; "
            "training uses the TrimeLM loss (local memory of the segment) without the BM25-batched external "
            "memory or cross-segment packing of TrimeLM_long/_ext, and no adaptive softmax")
"""How close this is to the original (the registry's fidelity column)."""


@method("trime", paper="TRIME (Zhong et al., 2022)", url="https://arxiv.org/abs/2205.12674", fidelity=FIDELITY)
def trime(ctx: MethodContext) -> UniMemConfig:
    return UniMemConfig(
        name="trime",
        reading=Reading(output="trime", output_topk=ctx.segment_len, output_temperature=1.0, index="torch"),
        training=Training(strategy="trime"),
        position=Position(mode="official"),
    )
