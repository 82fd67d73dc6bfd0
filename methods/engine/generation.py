"""Generation through memory.

The prompt streams through the method's segments exactly as scoring does: every full segment is one
`forward_segment` that reads and writes memory. The last, open segment is decoded token by token against the memory
(read only) plus a KV cache of the open segment; when it fills up it is committed with one `forward_segment`, so the
memory a generated token sees is the memory scoring would give it. With no memory (vanilla) and a prompt plus
budget inside one segment this is plain cached decoding, token for token what transformers' `generate` does.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

import torch
from torch import nn
from transformers import DynamicCache, PreTrainedModel

from unimem_bench.methods.config import UniMemConfig
from unimem_bench.methods.engine.kernels import FusedKernel
from unimem_bench.methods.engine.memory import MemoryState
from unimem_bench.methods.engine.output_memory import OutputReader
from unimem_bench.methods.engine.plan import build_plan, segment_context
from unimem_bench.methods.engine.sampling import Sampling


class SegmentModel(Protocol):
    """What generation needs of `MemoryLM` (a protocol, so that this module does not import the engine's)."""

    config: UniMemConfig
    model: PreTrainedModel
    layers: frozenset[int]
    segment_len: int
    memory_room: int
    output: OutputReader | None

    @property
    def decoder(self) -> nn.Module: ...

    @property
    def device(self) -> torch.device: ...

    def new_state(self, batch: int) -> MemoryState: ...

    def forward_segment(self, state: MemoryState, input_ids: torch.Tensor, doc_start: int,
                        write: bool = True) -> torch.Tensor: ...

    def note_input(self, end: int) -> None: ...


class OpenSegment:
    """The segment being decoded: its read-only memory plan and its KV cache."""

    def __init__(self, lm: SegmentModel, state: MemoryState, doc_start: int) -> None:
        config = lm.config
        self.lm, self.state = lm, state
        m = config.writing.memory_tokens
        # dtype/device for the rotary module
        probe = lm.model.get_input_embeddings().get_parameter("weight")[:1].unsqueeze(0)
        n_read = state.rmt.shape[1] if m and state.rmt is not None else 0
        self.plan = build_plan(config, state, n_read=n_read, n_seg=0, n_write=0, doc_start=doc_start,
                               rotary=lm.decoder.get_submodule("rotary_emb"), probe=probe, write=False, grad=False,
                               memory_room=lm.memory_room)
        self.cache = DynamicCache(config=lm.model.config)
        self.kernel = FusedKernel()  # the fused op's GQA support, probed once per open segment
        self.pending_read_slots = state.rmt if m else None
        self.doc_start = doc_start
        self.tokens: list[int] = []
        """The open segment's tokens so far (a SideNet re-reads them: it keeps no KV cache of its own; kNN-LM and
        TRIME pair them with their keys)."""
        self.keys: list[torch.Tensor] = []
        """The open segment's last-layer FFN inputs so far (output-distribution reading: kNN-LM, TRIME)."""

    def feed(self, ids: Sequence[int]) -> torch.Tensor:
        """Append tokens to the open segment; returns the logits [vocab] after the last one."""
        lm = self.lm
        if lm.config.injection.side_layers:  # LongMem: the open segment again, memory read only
            self.tokens += list(ids)
            ids_open = torch.tensor([self.tokens], device=lm.device)
            return lm.forward_segment(self.state, ids_open, self.doc_start, write=False)[0, -1]
        embeds = lm.model.get_input_embeddings()(torch.tensor([list(ids)], device=lm.device))  # [1, t, hidden]
        if self.pending_read_slots is not None:
            embeds = torch.cat([self.pending_read_slots, embeds], dim=1)
            self.pending_read_slots = None
        past = self.cache.get_seq_length()
        if past and embeds.shape[1] > 1:
            raise ValueError("an open segment takes one prefill, then one token per step")
        t = embeds.shape[1]
        lm.note_input(self.doc_start + past + len(ids))
        first = self.plan.first_position + past
        positions = torch.arange(first, first + t, device=lm.device).unsqueeze(0)
        # Memory layers see [prefix ; cached ; new], masked for queries past .. past + t - 1 of the input.
        ctx = segment_context(lm.config, lm.layers, self.state, self.plan, query_start=past, n_query=t,
                              dtype=embeds.dtype, device=embeds.device, kernel=self.kernel)
        hidden = lm.decoder(inputs_embeds=embeds, position_ids=positions, cache=self.cache,
                            use_cache=True, unimem=ctx).last_hidden_state  # [1, t, hidden]
        logits = lm.model.get_output_embeddings()(hidden[:, -1:])  # [1, 1, vocab]
        if lm.output is None:
            return logits[0, 0]
        assert self.state.output is not None  # made by new_state with the reader
        self.tokens.extend(int(i) for i in ids)
        self.keys.append(lm.output.tap.take()[:, -len(ids):])  # [1, len(ids), hidden]
        seg_ids = torch.tensor([self.tokens], device=lm.device)
        return lm.output.read(self.state.output, logits, torch.cat(self.keys, 1), seg_ids, n_new=1, write=False,
                              grad=False)[0, 0]


def next_token(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None) -> int:
    """Greedy argmax, or a seeded draw with temperature and nucleus filtering."""
    if not sampling.do_sample:
        return int(logits.argmax())
    probs = torch.softmax(logits.float() / sampling.temperature, dim=-1).cpu()
    if sampling.top_p < 1:
        sorted_probs, order = probs.sort(descending=True)
        # Keep a token while the mass before it is below top_p: the first token always survives.
        keep = sorted_probs.cumsum(0) - sorted_probs < sampling.top_p
        probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_probs[keep])
    return int(torch.multinomial(probs, 1, generator=generator))


@torch.inference_mode()
def generate(lm: SegmentModel, prompt: torch.Tensor, *, max_new_tokens: int,
             eos_token_id: int | Sequence[int] | None = None, stop: Callable[[list[int]], bool] | None = None,
             sampling: Sampling | None = None, min_new_tokens: int = 0) -> list[int]:
    """Continue `prompt` (1-D token ids, at least one) by at most `max_new_tokens` tokens.

    Stops after an end-of-sequence token (kept, as transformers does) or once `stop(generated)` is true. The
    end-of-sequence ids are suppressed until `min_new_tokens` tokens are generated (transformers' min_new_tokens).
    """
    if len(prompt) < 1:
        raise ValueError("generation needs a prompt of at least one token")
    sampling = sampling or Sampling()
    generator = torch.Generator().manual_seed(sampling.seed) if sampling.do_sample else None
    eos = {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id or ())
    tokens = [int(t) for t in prompt]
    length = lm.segment_len
    state = lm.new_state(1)
    start = 0
    logits = None
    while len(tokens) - start >= length:
        logits = lm.forward_segment(state, torch.tensor([tokens[start:start + length]], device=lm.device), start)[0, -1]
        start += length
    segment = OpenSegment(lm, state, start)
    if len(tokens) > start:
        logits = segment.feed(tokens[start:])
    assert logits is not None  # the prompt has at least one token, so one of the two branches above ran
    generated: list[int] = []
    while len(generated) < max_new_tokens:
        if len(generated) < min_new_tokens and eos:
            logits = logits.index_fill(0, torch.tensor(sorted(eos), device=logits.device), float("-inf"))
        token = next_token(logits, sampling, generator)
        generated.append(token)
        tokens.append(token)
        if token in eos or (stop is not None and stop(generated)) or len(generated) == max_new_tokens:
            break
        if len(tokens) - start == length:
            ids = torch.tensor([tokens[start:]], device=lm.device)
            # A frozen memory takes no segment made only of generated tokens.
            write = start < len(prompt) or not lm.config.management.freeze_after_prompt
            logits = lm.forward_segment(state, ids, start, write=write)[0, -1]
            start += length
            segment = OpenSegment(lm, state, start)
        else:
            logits = segment.feed([token])
    return generated
