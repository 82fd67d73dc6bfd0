"""Unlimiformer (Bertsch et al., 2023), https://arxiv.org/abs/2305.01625

Every layer's attention reads, per query and head, the top-k keys of the whole input so far (a kNN index over all
of it) instead of a truncated context. Its LLaMA mode (abertsch72/unlimiformer `UnlimiformerLLaMa`) retrieves k =
the model window of the prompt's keys, searched with the rotated query against unrotated keys, and rotates the
retrieved keys to their prompt index scaled into the window (`post_process_retrieved`: index / prompt length x
window size) "such that the model will not see positional embeddings that did not appear at training time".

UniMem Table 1: Management Multi-Sgm, no eviction ("/"); Writing Direct; Reading Similarity; Injection All.

Where each default comes from (paper = Unlimiformer; official = abertsch72/unlimiformer `src/unlimiformer.py`):
- Reading: exact top-k with k = the trained context (official: k = min(prompt, window) in
  `attention_forward_hook`; the memory holds fewer early on, and then all of it is read).
- Positions: `position.scaled_memory` (official LLaMA mode, above); the segment takes the window's last positions.
- Management: 256 segments FIFO: the paper keeps the whole input (no eviction, Table 1 "/"); the bound only matters
  past 256 segments. `management.freeze_after_prompt`: generation indexes the prompt only (official: the datastore
  is built from the prompt in `reset_memory`, generated tokens stay in the local cache).
- Injection: all layers (Table 1; the encoder-decoder original retrieves in every decoder layer's cross-attention;
  the LLaMA README starts at `--layer_begin`, e.g. 16 of 40: `--set injection.layers=16-39`).
- Training: stop-gradient; Unlimiformer's retrieval and random-encoding training regimes are not reproduced.
"""

from __future__ import annotations

from unimem_bench.methods.config import Injection, Management, Position, Reading, Training, UniMemConfig, Writing
from unimem_bench.methods.registry import MethodContext, method

FIDELITY = ("decoder variant: Unlimiformer's LLaMA mode as segment streaming. Kept: top-k over everything read so "
            "far in every layer, rotated-query search over unrotated keys, retrieved keys at positions scaled into "
            "the trained window, memory frozen after the prompt in generation. Changed: the segment keeps its own "
            "causal keys beside the retrieved ones (the original replaces its window cache with them) and takes "
            "the window's last positions; the datastore's k_proj reformulation is an exact inner product here")
"""How close this is to the original (the registry's fidelity column)."""


@method("unlimiformer", paper="Unlimiformer (Bertsch et al., 2023)", url="https://arxiv.org/abs/2305.01625",
        fidelity=FIDELITY)
def unlimiformer(ctx: MethodContext) -> UniMemConfig:
    # Official: k = the model window (min(prompt, window), and the memory is never larger than needed).
    topk = ctx.trained_context
    return UniMemConfig(
        name="unlimiformer",
        # The whole input is kept (Table 1: no eviction); FIFO only past 256 segments.
        management=Management(size=ctx.segments(256), overflow="fifo", freeze_after_prompt=True),
        writing=Writing(kv="direct"),
        reading=Reading(topk=topk, index="torch"),
        injection=Injection("all"),
        training=Training(strategy="stop_gradient"),
        position=Position(mode="official", scaled_memory=True),
    )
