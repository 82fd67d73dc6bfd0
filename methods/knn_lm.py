"""kNN-LM (Khandelwal et al., 2020), https://arxiv.org/abs/1911.00172

A datastore of (context key, next token) pairs is searched with the current context's key; the k nearest entries
vote for their next tokens with weights softmax(-squared distance / T), and the vote p_kNN is interpolated with the
model's own distribution: p = lambda p_kNN + (1 - lambda) p_LM. Nothing is trained; memory is read at the output
distribution, not in attention (`reading.output=knn`, `methods/engine/output_memory.py`).

UniMem Table 1: Management Multi-Sgm, "/" (no eviction: the datastore keeps everything); Writing Direct (the key is
written as computed); Reading Similarity (nearest neighbours); Injection Certain (the last layer's FFN input, read
into the vocabulary). The paper marks it as focused on inference: `finetune` rejects it.

Where each default comes from (paper = kNN-LM on WikiText-103, official = urvashik/knnlm):
- Key: the last layer's FFN input after its norm (the paper's best key type, `last_ffn_input`).
- Datastore: the document read so far, segment by segment, every token whose next token is known (the paper's
  datastore is the training set: give a corpus with `reading.output_datastore`, saved and reloaded by content hash).
- k = 1,024 per 3,072-token context (the paper's k and its model's context), scaled to the segment.
- lambda = 0.25 and temperature 1 (the paper's WikiText-103 settings; distances squared L2 as faiss returns them).
- Index: faiss IVF, 1,024 cells, 8 probed (the paper's approximate faiss search: IVF-PQ, 4,096 cells for 103M
  entries), an exact search while the datastore is below 39 entries per cell (40K entries);
  `reading.index=faiss-flat` or `torch` for exact search.
"""

from __future__ import annotations

from unimem_bench.methods.config import Position, Reading, UniMemConfig
from unimem_bench.methods.registry import MethodContext, method

FIDELITY = ("decoder variant: kNN-LM's interpolation on a LLaMA-family decoder (key: the last layer's FFN input, "
            "squared L2, temperature, lambda). Changed: the datastore is the document read so far, segment by "
            "segment (a corpus datastore through reading.output_datastore), searched with faiss IVF-Flat, not "
            "IVF-PQ, and faiss' distances are used as returned (no full-precision recomputation)")
"""How close this is to the original (the registry's fidelity column)."""

KNN_K = 1024
"""The paper's neighbours per query."""
KNN_CONTEXT = 3072
"""The context of the paper's WikiText-103 model, the scale k = 1,024 was set at."""


@method("knn_lm", paper="kNN-LM (Khandelwal et al., 2020)", url="https://arxiv.org/abs/1911.00172",
        fidelity=FIDELITY)
def knn_lm(ctx: MethodContext) -> UniMemConfig:
    topk = max(1, round(KNN_K * ctx.segment_len / KNN_CONTEXT))
    return UniMemConfig(
        name="knn_lm",
        # IVF cells: faiss' guideline of about 4 sqrt(N) for the 64K-entry datastores this targets (the paper: 4,096
        # cells, 32 probed, for 103M entries); 8 probed keeps the search a small part of a segment's time.
        reading=Reading(output="knn", output_topk=topk, output_lambda=0.25, output_temperature=1.0,
                        index="faiss-ivf", ivf_lists=1024, ivf_probe=8),
        position=Position(mode="official"),
    )
