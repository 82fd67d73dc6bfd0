"""AutoCompressor (Chevalier et al., 2023), https://arxiv.org/abs/2305.14788

Each segment is fed as [summary vectors of all earlier segments ; segment tokens ; kappa summary tokens]; the last
layer's outputs at the summary tokens become this segment's summary vectors, appended to the earlier ones and read
by every later segment as a soft prompt. The first segment reads none. Memory is written by the model's own forward
pass, as in RMT, but accumulated instead of replaced.

UniMem Table 1: Management Multi-Sgm, overflow "/" (never overflows); Writing Model forward; Reading All; Injection
All. Engine: writing.memory_tokens=kappa with writing.memory_mode=accumulate (the RMT path with the read slots
growing), a cap on the accumulated vectors, and BPTT through the summary vectors.

Where each default comes from (paper = the AutoCompressor paper; official = princeton-nlp/AutoCompressors,
`auto_compressor_llama.py` / `auto_compressor.py` `AutoCompressorModel` and `run/train_llama.sh`):
- Writing, kappa = 50 summary tokens per segment (official `summary_length=50` of AutoCompressor-Llama-2-7b-6k),
  scaled with the segment length from its mean training segment of 1,536 tokens (6,144-token sequences compressed
  in 4 steps). Write slots: the learned `embed_summary` every segment, initialised to the end-of-sequence
  embedding (official `__init__`). A released checkpoint's `summary_length` and `embed_summary` come through
  `--model` (`MethodContext.summary_tokens`; the loader attaches the embeddings).
- Management, accumulation (official `accumulate_summary=True`) with a cap that keeps the soft prompt, segment and
  summary tokens inside the trained context (but at least the 3 segments' summaries its last training segment
  read): the original never drops a summary vector (Table 1's "/"), and within the trained context neither does
  this (32 segments of 128 tokens on stories260K make 128 summary vectors, the cap is 380).
- Reading, all summary vectors, causal among themselves, before the segment: official (one causal attention over
  the concatenation).
- Positions, official: soft prompt, segment and summary tokens at 0, 1, ... every segment (the LLaMA code passes
  no position ids, so RoPE starts at 0 for the concatenation).
- Training, BPTT over 2 segments: official `segments_per_substep=2` (gradients flow through the summary vectors
  within a substep of 2 segments, which are detached between substeps).
Evaluate after fine-tuning for meaningful numbers: the summary embeddings are learned.
"""

from __future__ import annotations

from unimem_bench.methods.config import Injection, Position, Training, UniMemConfig, Writing
from unimem_bench.methods.registry import MethodContext, method

FIDELITY = ("exact: accumulated summary vectors as a soft prompt before each segment, kappa summary tokens after "
            "it, positions from 0 (official LLaMA AutoCompressor); training keeps BPTT over 2 segments without the "
            "official randomised segment lengths")
"""How close this is to the original (the registry's fidelity column)."""

SUMMARY_TOKENS = 50
"""kappa of AutoCompressor-Llama-2-7b-6k (official `summary_length`)."""
TRAINING_SEGMENT = 1536
"""Its mean training segment: 6,144-token sequences compressed in 4 steps."""
TRAINED_SUMMARIES = 3
"""Earlier segments whose summaries the last training segment read (4 segments per training sequence)."""


@method("autocompressor", paper="AutoCompressor (Chevalier et al., 2023)", url="https://arxiv.org/abs/2305.14788",
        fidelity=FIDELITY)
def autocompressor(ctx: MethodContext) -> UniMemConfig:
    # A released checkpoint's own summary_length; otherwise 50 per 1,536-token segment, scaled to this segment.
    kappa = ctx.summary_tokens or max(1, round(SUMMARY_TOKENS * ctx.segment_len / TRAINING_SEGMENT))
    # Soft prompt + segment + summary tokens within the trained context, in whole segments' summaries, and never
    # fewer than the 3 segments' worth the last of its 4 training segments read.
    room = ctx.trained_context - ctx.segment_len - kappa
    cap = max(TRAINED_SUMMARIES * kappa, room // kappa * kappa)
    return UniMemConfig(
        name="autocompressor",
        writing=Writing(kv="none", memory_tokens=kappa, write_slots="learned", memory_mode="accumulate",
                        memory_cap=cap, memory_init="eos"),
        injection=Injection("all"),
        training=Training(strategy="bptt", bptt_segments=2),
        position=Position(mode="official"),
    )
