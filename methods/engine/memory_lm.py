"""MemoryLM: any Hugging Face LLaMA-family causal LM streamed segment by segment with UniMem memory.

Nothing of the modeling code is copied: the model keeps its weights, rotary embedding and decoder; the engine
registers one attention function (`attention.unimem_attention`), switches the model to it, and feeds each segment
through the stock decoder with the memory state as a keyword argument. `close()` (or leaving the `with` block)
gives the model back as it was.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface, PretrainedConfig, PreTrainedModel

from unimem_bench.methods.config import ConfigError, UniMemConfig
from unimem_bench.methods.engine.attention import ATTENTION_NAME, unimem_attention
from unimem_bench.methods.engine.faiss_bank import FaissBank
from unimem_bench.methods.engine.generation import generate
from unimem_bench.methods.engine.hookable import check_hookable
from unimem_bench.methods.engine.memory import LayerMemory, MemoryState
from unimem_bench.methods.engine.memory_tokens import accumulate, initial_memory_embeddings
from unimem_bench.methods.engine.output_memory import OutputReader
from unimem_bench.methods.engine.plan import ContextCache, FusedKernel, build_plan, cached_context
from unimem_bench.methods.engine.rotary_memo import RotaryMemo
from unimem_bench.methods.engine.sampling import Sampling
from unimem_bench.methods.engine.side_network import SideNetwork
from unimem_bench.methods.engine.usage import LayerUsage


@dataclass(frozen=True)
class TokenScores:
    """One document's scores: every token after the first."""

    nll: torch.Tensor
    """[tokens] negative log-likelihood in nats."""
    greedy: torch.Tensor
    """[tokens] bool: the token was the argmax of its prediction (lm-eval's is_greedy)."""


class MemoryLM(nn.Module):
    """A causal LM with memory-augmented attention (UniMem Eq. 9) that scores documents streamed in segments."""

    def __init__(self, model: PreTrainedModel, config: UniMemConfig, *, segment_len: int,
                 trained_context: int | None = None) -> None:
        super().__init__()
        check_hookable(model.config)
        self.model = model
        self.config = config
        n_layers = model.config.num_hidden_layers
        self.layers = frozenset(config.bind(n_layers=n_layers, segment_len=segment_len))
        self.segment_len = segment_len * config.position.segment_factor
        self.trained_context = trained_context or model.config.max_position_embeddings
        # Positions of the trained context the local context leaves to memory (position.scaled_memory).
        self.memory_room = max(0, self.trained_context - self.segment_len)
        self._restore = (model.config._attn_implementation, self.decoder.get_submodule("rotary_emb"))
        self.rope_factor = self._resolve_rope_factor()
        if self.rope_factor != 1.0:
            self.decoder.rotary_emb = linear_rope(self._restore[1], model.config, self.rope_factor)
        if ATTENTION_NAME not in AttentionInterface._global_mapping:
            AttentionInterface.register(ATTENTION_NAME, unimem_attention)
        model.set_attn_implementation(ATTENTION_NAME)
        # Reading at the output distribution (kNN-LM, TRIME), or TRIME's training loss.
        reads_output = config.reading.output != "none" or config.training.strategy == "trime"
        self.output = OutputReader(config, self.decoder) if reads_output else None
        self.memory_embeddings: nn.Parameter | None = None
        self.usage: dict[int, LayerUsage] = {}
        self.contexts: ContextCache = {}
        """Segment contexts by shape, reused by later segments (`plan.cached_context`); emptied with the rotary."""
        self.kernel = FusedKernel()  # the fused log-sum-exp op's GQA support, probed once (`kernels.FusedKernel`)
        self._rotary_memo: RotaryMemo | None = None
        self.input_tokens = 0
        """With `management.budget`, the tokens of the input being scored or continued (`budget_for`), which also cap
        PyramidKV's top layer; 0 otherwise (a fixed size knows no input length)."""
        self.question: torch.Tensor | None = None
        """[question tokens] ids every write's score-based eviction observes (`observing`), or None."""
        self.longest_input = 0
        self.reset_usage()
        # LongMem: the backbone is frozen and only the SideNet trains (`close` gives the flags back).
        self.side: SideNetwork | None = None
        self._frozen: list[tuple[nn.Parameter, bool]] = []
        if config.injection.side_layers:
            self._frozen = [(p, p.requires_grad) for p in model.parameters()]
            model.requires_grad_(False)
            self.side = SideNetwork(self.decoder, config)
        m = config.writing.memory_tokens
        if m:
            init = initial_memory_embeddings(model, config)
            embed = model.get_input_embeddings().get_parameter("weight")
            self.memory_embeddings = nn.Parameter(init.to(device=embed.device, dtype=embed.dtype))

    def method_state(self) -> dict[str, torch.Tensor]:
        """The method's own learned parameters (RMT's `memory_embeddings`), by name: what a fine-tuned checkpoint
        saves besides the model's weights."""
        return {name: p.detach() for name, p in self.named_parameters() if not name.startswith("model.")}

    def load_method_state(self, tensors: dict[str, torch.Tensor]) -> None:
        """Load what `method_state` saved (a fine-tuned checkpoint's learned memory tokens) in place of the init."""
        own = dict(self.named_parameters())
        expected = {name for name in own if not name.startswith("model.")}
        if set(tensors) != expected:
            raise ConfigError(f"saved method state has {sorted(tensors) or 'nothing'} but method {self.config.name!r} "
                              f"learns {sorted(expected) or 'nothing'}: evaluate the checkpoint with its own method")
        for name, tensor in tensors.items():
            if tensor.shape != own[name].shape:
                raise ConfigError(f"saved {name} has shape {tuple(tensor.shape)} but this configuration needs "
                                  f"{tuple(own[name].shape)}: keep the checkpoint's writing.memory_tokens")
            with torch.no_grad():
                own[name].copy_(tensor)

    def _resolve_rope_factor(self) -> float:
        factor = self.config.position.rope_factor
        if factor == 0:
            return max(1.0, self.segment_len / self.trained_context)
        return float(factor)

    @contextlib.contextmanager
    def reading_at_once(self, length: int) -> Iterator[MemoryLM]:
        """This model reading inputs of up to `length` tokens (the task contract's `reading_at_once`): a method
        without memory reads them at once (vanilla is then full attention, position interpolation rescales RoPE for
        that length: its automatic factor); a method with memory is unchanged: it streams them in its segments."""
        if self.config.has_memory:
            yield self
            return
        saved = (self.segment_len, self.rope_factor, self.decoder.get_submodule("rotary_emb"))
        base = self._restore[1]
        self.contexts.clear()  # their sink rotations came from the rotary being replaced
        self.segment_len = length
        self.rope_factor = self._resolve_rope_factor()
        self.decoder.rotary_emb = (linear_rope(base, self.model.config, self.rope_factor) if self.rope_factor != 1.0
                                   else base)
        try:
            yield self
        finally:
            self.segment_len, self.rope_factor, self.decoder.rotary_emb = saved
            self.contexts.clear()

    def close(self) -> None:
        """Give the wrapped model back with its own attention implementation and rotary embedding."""
        attn, rotary = self._restore
        if self.output is not None:
            self.output.close()
        self.decoder.rotary_emb = rotary
        self.model.set_attn_implementation(attn)
        for p, flag in self._frozen:
            p.requires_grad_(flag)

    def __enter__(self) -> MemoryLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def decoder(self) -> nn.Module:
        """The model's decoder stack (looked up, not registered: the model's weights appear once in state_dict)."""
        return self.model.get_decoder()

    def rotary_memo(self) -> RotaryMemo:
        """The decoder's rotary embedding, its (cos, sin) kept per position list across segments (`build_plan`)."""
        rotary = self.decoder.get_submodule("rotary_emb")
        if self._rotary_memo is None or self._rotary_memo.rotary is not rotary:
            self._rotary_memo = RotaryMemo(rotary)
        return self._rotary_memo

    @property
    def device(self) -> torch.device:
        return self.model.get_input_embeddings().get_parameter("weight").device

    def reset_usage(self) -> None:
        """Start counting memory usage afresh (the runner does, once per task)."""
        self.usage = {i: LayerUsage() for i in sorted(self.layers)}
        self.longest_input = 0
        self.peak_kv_bytes = 0

    def note_input(self, end: int) -> None:
        """Count an input reaching document position `end` (exclusive)."""
        self.longest_input = max(self.longest_input, end)

    def usage_record(self) -> dict[str, object]:
        """Small run record of what memory did: the longest input, the peak bytes of keys and values held (all
        layers and rows at once), the KV footprint (slots x tokens, all layers and heads), and per injected layer
        the slots evicted, read, read from a memory that had evicted, and per KV head its peak slots and footprint
        (each summed over documents)."""
        return {"longest_input": self.longest_input, "peak_kv_bytes": self.peak_kv_bytes,
                "kv_footprint": sum(sum(u.footprint) for u in self.usage.values()),
                "layers": {str(i): dataclasses.asdict(u) for i, u in self.usage.items()}}

    def note_held_bytes(self, state: MemoryState) -> None:
        """Track the peak bytes of keys and values the memory holds (after a segment's write)."""
        self.peak_kv_bytes = max(self.peak_kv_bytes, sum(layer.held_bytes() for layer in state.layers.values()))

    @contextlib.contextmanager
    def budget_for(self, tokens: int) -> Iterator[None]:
        """With `management.budget`, the memory size for an input of `tokens` tokens while the block runs."""
        m = self.config.management
        if not m.budget:
            yield
            return
        saved, saved_tokens, self.input_tokens = self.config, self.input_tokens, tokens
        size = max(1, m.sinks + m.recent, math.ceil(m.budget * tokens))
        r = saved.reading
        # A window that covered the memory (Transformer-XL) covers the new size; a shorter one stays inside it.
        window = size if r.window == m.size else min(r.window, size)
        self.config = dataclasses.replace(saved, management=dataclasses.replace(m, size=size),
                                          reading=dataclasses.replace(r, window=window))
        try:
            yield
        finally:
            self.config, self.input_tokens = saved, saved_tokens

    def check_compressed(self) -> None:
        """Raise ConfigError when a score-based compression method never read a compressed memory although its
        budget is below the longest input: its scores would be full-cache scores (KVCache-Factory's failure)."""
        m = self.config.management
        size = math.ceil(m.budget * self.longest_input) if m.budget else m.size
        if not (m.scored and size and self.longest_input > size):
            return
        if any(u.read_compressed for u in self.usage.values()):
            return
        raise ConfigError(f"method {self.config.name!r} compressed nothing: its budget of {size} slots is "
                          f"below the longest input ({self.longest_input} tokens) but no query read an evicted "
                          f"memory (segment length {self.segment_len}: eviction only follows a segment), so its "
                          "scores would be full-cache scores; stream the input in shorter segments so one starts "
                          f"after the first {size} tokens (e.g. --segment-len {max(1, size // 2)})")

    def new_state(self, batch: int) -> MemoryState:
        """An empty memory for `batch` documents."""
        reading, size = self.config.reading, self.config.management.size
        use_faiss = self.config.uses_kv_memory and reading.topk and reading.index != "torch"
        seed = self.config.management.seed
        budgeted = self.config.management.scored and self.config.management.budgeted
        layers = {i: LayerMemory(faiss=FaissBank(reading, size) if use_faiss else None, usage=self.usage[i],
                                 generator=torch.Generator().manual_seed(seed * 1_000_003 + i)
                                 if self.config.management.eviction == "random" else None,
                                 depth=(rank, len(self.layers), self.input_tokens) if budgeted else None)
                  for rank, i in enumerate(sorted(self.layers))}
        state = MemoryState(layers=layers)
        if self.output is not None:
            state.output = self.output.new_state(batch, self.model.config.hidden_size)
        if self.memory_embeddings is not None:
            state.rmt = self.memory_embeddings.unsqueeze(0).expand(batch, -1, -1)
            if self.config.writing.memory_mode == "accumulate":
                state.rmt = state.rmt[:, :0]  # [batch, 0, hidden]: the first segment reads no summary vectors
        return state

    def forward_segment(self, state: MemoryState, input_ids: torch.Tensor, doc_start: int,
                        write: bool = True) -> torch.Tensor:
        """Run one segment [batch, n] starting at document position `doc_start`; returns logits [batch, n, vocab]
        and updates `state` (its key/value memory only when `write`)."""
        config = self.config
        m = config.writing.memory_tokens
        n = input_ids.shape[1]
        self.note_input(doc_start + n)
        embeds = self.model.get_input_embeddings()(input_ids)  # [batch, n, hidden]
        n_read = state.rmt.shape[1] if m and state.rmt is not None else 0
        observe = self.question if write else None
        plan = build_plan(config, state, n_read=n_read, n_seg=n, n_write=m, doc_start=doc_start,
                          rotary=self.rotary_memo(), probe=embeds, write=write,
                          grad=torch.is_grad_enabled(), memory_room=self.memory_room,
                          n_observe=0 if observe is None else len(observe))
        if m:
            assert self.memory_embeddings is not None and state.rmt is not None  # m > 0: made in __init__, new_state
            write_slots = (state.rmt if config.writing.write_slots == "memory"
                           else self.memory_embeddings.unsqueeze(0).expand(embeds.shape[0], -1, -1))
            embeds = torch.cat([state.rmt, embeds, write_slots], dim=1)  # [batch, r + n + m, hidden], r read slots
        if observe is not None:  # the question after the segment: its queries score this write's eviction
            question = self.model.get_input_embeddings()(observe)  # [q, hidden]
            embeds = torch.cat([embeds, question.unsqueeze(0).expand(embeds.shape[0], -1, -1)], dim=1)
        first = plan.first_position
        positions = torch.arange(first, first + embeds.shape[1], device=embeds.device).unsqueeze(0)
        if self.side is not None:
            (layer,) = self.layers
            logits = self.side(self.model, state.layers[layer], plan, embeds, positions)
            state.commit(plan, config, doc_start)
            return logits
        ctx = cached_context(self.contexts, config, self.layers, state, plan, n_query=embeds.shape[1],
                             dtype=embeds.dtype, device=embeds.device, kernel=self.kernel)
        hidden = self.decoder(inputs_embeds=embeds, position_ids=positions, unimem=ctx,
                              use_cache=False).last_hidden_state  # [batch, r + n + m, hidden]
        if m:
            # A copy, not a view: a view would keep the whole [batch, r + n + m, hidden] output alive.
            written = hidden[:, -m:].detach().clone() if plan.detach_tokens else hidden[:, -m:].clone()
            held = state.rmt
            if config.writing.memory_mode == "accumulate" and held is not None:
                written = accumulate(held, written, config.writing.memory_cap)
            state.rmt = written
        state.commit(plan, config, doc_start)
        self.note_held_bytes(state)
        logits = self.model.get_output_embeddings()(hidden[:, n_read:n_read + n])  # [batch, n, vocab]
        if self.output is None:
            return logits
        assert state.output is not None  # made by new_state with the reader
        keys = self.output.tap.take()[:, n_read:n_read + n]  # [batch, n, hidden]
        return self.output.read(state.output, logits, keys, input_ids, n_new=n, write=write,
                                grad=torch.is_grad_enabled())

    def generate(self, prompt: torch.Tensor, *, max_new_tokens: int, eos_token_id: int | Sequence[int] | None = None,
                 stop: Callable[[list[int]], bool] | None = None, sampling: Sampling | None = None,
                 min_new_tokens: int = 0, question: Sequence[int] | None = None) -> list[int]:
        """Continue `prompt` through memory (see `generation.generate`); returns the new token ids. `question`: the
        prompt's question tokens, which score-based eviction observes at every write (`observing`)."""
        with self.budget_for(len(prompt)), self.observing(question):
            return generate(self, prompt, max_new_tokens=max_new_tokens, eos_token_id=eos_token_id, stop=stop,
                            sampling=sampling, min_new_tokens=min_new_tokens)

    @contextlib.contextmanager
    def observing(self, question: Sequence[int] | None) -> Iterator[None]:
        """While the block runs, every segment write's score-based eviction also scores with the queries of
        `question` placed after the segment (kvpress' query_aware: the compression sees the question). Methods
        without score-based eviction are unchanged (the question could change nothing of theirs)."""
        if question is None or not len(question) or not self.config.management.scored:
            yield
            return
        self.config.check_query_aware()
        self.question = torch.as_tensor(list(question), dtype=torch.long, device=self.device)
        try:
            yield
        finally:
            self.question = None

    def score(self, docs: Sequence[torch.Tensor], *, batch_size: int = 1,
              progress: Callable[[int], None] | None = None) -> list[torch.Tensor]:
        """Per-token negative log-likelihoods (nats) of each document (see `score_tokens`)."""
        return [s.nll for s in self.score_tokens(docs, batch_size=batch_size, progress=progress)]

    @torch.inference_mode()
    def score_tokens(self, docs: Sequence[torch.Tensor], *, batch_size: int = 1,
                     progress: Callable[[int], None] | None = None) -> list[TokenScores]:
        """Per-token negative log-likelihoods (nats) of each document, streamed through memory, and whether each
        token was the model's argmax.

        Every token after the first is scored exactly once, the first token of a segment by the last position of
        the previous one, so all methods score the same tokens. Documents are batched longest first and run in
        lockstep; a finished document leaves the batch (and the memory), so padding is never scored and batching
        never changes a result.
        """
        results: list[TokenScores | None] = [None] * len(docs)
        order = sorted(range(len(docs)), key=lambda i: -len(docs[i]))
        for lo in range(0, len(order), batch_size):
            rows = order[lo:lo + batch_size]
            with self.budget_for(max(len(docs[i]) for i in rows)):
                scored = self._score_batch([docs[i] for i in rows], progress)
            for i, nll in zip(rows, scored, strict=True):
                results[i] = nll
        return results  # type: ignore[return-value]

    def _score_batch(self, docs: list[torch.Tensor], progress: Callable[[int], None] | None) -> list[TokenScores]:
        device = self.device
        lengths = [len(d) for d in docs]
        pieces: list[list[torch.Tensor]] = [[] for _ in docs]
        greedy: list[list[torch.Tensor]] = [[] for _ in docs]
        state = self.new_state(len(docs))
        active = list(range(len(docs)))
        for start in range(0, max(lengths) - 1, self.segment_len):
            still = [i for i in active if lengths[i] - 1 > start]
            if len(still) < len(active):
                state.select_rows(torch.tensor([active.index(i) for i in still], device=device))
                active = still
            width = min(self.segment_len, max(lengths[i] for i in active) - 1 - start)
            ids = torch.zeros(len(active), width, dtype=torch.long)
            targets = torch.full((len(active), width), -100, dtype=torch.long)
            for row, i in enumerate(active):
                piece = docs[i][start:start + width]
                ids[row, :len(piece)] = piece
                target = docs[i][start + 1:start + width + 1]
                targets[row, :len(target)] = target
            logits = self.forward_segment(state, ids.to(device), start)
            # At least float32 for the log-softmax (bf16 logits lose digits); float64 models keep float64.
            wide = logits.to(torch.promote_types(logits.dtype, torch.float32))
            nll = F.cross_entropy(wide.flatten(0, 1), targets.to(device).flatten(), ignore_index=-100,
                                  reduction="none").view(len(active), width).cpu()
            hits = (logits.argmax(-1).cpu() == targets)  # [rows, width]
            for row, i in enumerate(active):
                n = max(0, min(width, lengths[i] - 1 - start))
                pieces[i].append(nll[row, :n])
                greedy[i].append(hits[row, :n])
            if progress is not None:
                progress(int((targets >= 0).sum()))
        empty = torch.zeros(0, dtype=torch.bool)
        return [TokenScores(torch.cat(p) if p else empty.float(), torch.cat(g) if g else empty)
                for p, g in zip(pieces, greedy, strict=True)]


def linear_rope(rotary: nn.Module, config: PretrainedConfig, factor: float) -> nn.Module:
    """The model's own rotary class rebuilt with transformers' `linear` rope parameters (position interpolation)."""
    scaled = copy.deepcopy(config)
    params = dict(scaled.rope_parameters or {})
    params.update(rope_type="linear", factor=factor)
    scaled.rope_parameters = params
    device = rotary.get_buffer("inv_freq").device
    return type(rotary)(config=scaled).to(device)
