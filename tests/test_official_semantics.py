"""The official UniMem semantics as config values: sliding windows, dilation, memory-relative globals, the three
position modes, clear-all that writes nothing, RMT write slots, bptt_tokens, and the bugs fixed with them.

One-layer models make exact expectations easy: a layer-0 key or value depends only on its own token and position,
so what a query reads is plain transformers over the tokens it sees, at the positions the mode names."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from helpers import random_docs, tiny_llama

from unimem_bench.methods import METHODS, MemoryLM, MethodContext, UniMemConfig
from unimem_bench.methods.config import Management, Position, Reading, Training, Writing
from unimem_bench.methods.engine.plan import build_plan

ATOL = 1e-5


def last_logits(model: torch.nn.Module, tokens: list[int], positions: list[int]) -> torch.Tensor:
    """Plain HF logits [vocab] of the last of `tokens` placed at `positions` (one layer: exact for any order)."""
    with torch.no_grad():
        out = model(torch.tensor([tokens]), position_ids=torch.tensor([positions])).logits
    return out[0, -1]


def stream_last_segment(lm: MemoryLM, doc: torch.Tensor, segment: int) -> torch.Tensor:
    """Stream `doc` in segments; logits [segment, vocab] of the last (full) one."""
    state = lm.new_state(1)
    with torch.no_grad():
        for start in range(0, len(doc), segment):
            logits = lm.forward_segment(state, doc[start:start + segment].unsqueeze(0), start)
    return logits[0]


@pytest.mark.parametrize("mode", ["official", "compact", "absolute"])
def test_sliding_dilated_window_with_memory_globals_reads_what_the_official_mask_names(mode):
    # Memory 16, window 8, stride 2, 2 globals from memory, segments of 8: the last segment (32-39) reads a bank of
    # doc[16:32]; globals = bank slots 0-1 (doc 16, 17); window = bank slots 8-15 (doc 24-31). Query i sees window
    # slot w iff w >= i (sliding: the last 8 - i slots) and its bank index 8 + w = i mod 2 (dilation).
    model = tiny_llama(layers=1)
    doc = random_docs([40], seed=3)[0]
    config = UniMemConfig(management=Management(size=16), writing=Writing(kv="direct"),
                          reading=Reading(window=8, sliding=True, stride=2, global_tokens=2, global_source="memory"),
                          position=Position(mode=mode))
    with MemoryLM(model, config, segment_len=8) as lm:
        got = stream_last_segment(lm, doc, 8)
    for i in range(8):
        memory = [16, 17] + [24 + w for w in range(i, 8) if (8 + w) % 2 == i % 2]
        local = list(range(32, 33 + i))
        if mode == "official":  # every memory key at 0, the segment from 0
            positions = [0] * len(memory) + list(range(i + 1))
        elif mode == "compact":  # globals 0-1, window 2-9, segment from 10
            positions = [0, 1] + [2 + (d - 24) for d in memory[2:]] + [10 + j for j in range(i + 1)]
        else:
            positions = memory + local
        expected = last_logits(model, [int(doc[d]) for d in memory + local], positions)
        torch.testing.assert_close(got[i], expected, atol=ATOL, rtol=0, msg=f"query {i}")


@pytest.mark.parametrize("index", ["torch", "faiss-flat"])
def test_sliding_window_plus_topk_over_the_rest_reads_each_slot_once(model, index):
    # With a sliding window, query i's top-k searches the slots outside its own reach; k = everything then reads
    # the whole bank once, which is read_all. Candidates that include the window would count slots twice.
    doc = random_docs([40])[0]
    topk, read_all = (UniMemConfig(management=Management(size=64), writing=Writing(kv="direct"), reading=reading,
                                   position=Position(mode="absolute"))
                      for reading in (Reading(window=8, sliding=True, topk=64, index=index), Reading(read_all=True)))
    with MemoryLM(model, topk, segment_len=8) as a:
        got = a.score([doc])[0]
    with MemoryLM(model, read_all, segment_len=8) as b:
        expected = b.score([doc])[0]
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)


def test_longformer_overflow_values_give_three_different_scores(model):
    ctx = MethodContext(n_layers=2, segment_len=8, trained_context=256)
    doc = random_docs([64])[0]
    totals = {}
    for overflow in ("fifo", "clear", "clear-and-write"):
        config = METHODS.get("longformer").config(ctx, [f"management.overflow={overflow}"])
        with MemoryLM(model, config, segment_len=8) as lm:
            totals[overflow] = float(lm.score([doc])[0].sum())
    assert len({round(v, 4) for v in totals.values()}) == 3, totals


def test_clear_writes_nothing_so_the_next_segment_reads_no_memory(model):
    # Longformer (memory 2 segments, clear): segments 1-2 fill the memory, segment 3 finds it full and resets it
    # without writing, so segment 4 reads nothing: it scores as vanilla does.
    ctx = MethodContext(n_layers=2, segment_len=8, trained_context=256)
    doc = random_docs([40])[0]
    with MemoryLM(model, METHODS.get("longformer").config(ctx), segment_len=8) as lm:
        got = lm.score([doc])[0]
    with MemoryLM(model, METHODS.get("vanilla").config(ctx), segment_len=8) as lm:
        alone = lm.score([doc])[0]
    torch.testing.assert_close(got[24:32], alone[24:32], atol=ATOL, rtol=0)
    assert (got[8:16] - alone[8:16]).abs().max() > 100 * ATOL  # segment 2 did read segment 1


@pytest.mark.parametrize("write_slots", ["memory", "learned"])
@pytest.mark.parametrize("mode", ["official", "absolute"])
def test_rmt_input_is_read_slots_segment_write_slots_at_the_named_positions(model, write_slots, mode):
    # Segment 2 of RMT is plain HF over [memory ; segment ; write slots]: write slots = the previous memory
    # (official, booydar) or the learned embeddings; positions from 0 (official) or the segment at its document
    # positions with the slots around it (absolute: a bug once moved the segment m positions on).
    ctx = MethodContext(n_layers=2, segment_len=8, trained_context=256)
    config = METHODS.get("rmt").config(ctx, [f"writing.write_slots={write_slots}", f"position.mode={mode}"])
    doc = random_docs([17])[0]
    with MemoryLM(model, config, segment_len=8) as lm, torch.no_grad():
        m = config.writing.memory_tokens
        state = lm.new_state(1)
        lm.forward_segment(state, doc[:8].unsqueeze(0), 0)
        memory = state.rmt
        got = lm.forward_segment(state, doc[8:16].unsqueeze(0), 8)
        write = memory if write_slots == "memory" else lm.memory_embeddings.unsqueeze(0)
        embeds = torch.cat([memory, model.get_input_embeddings()(doc[8:16]).unsqueeze(0), write], dim=1)
        first = 0 if mode == "official" else 8 - m
        positions = torch.arange(first, first + 2 * m + 8).unsqueeze(0)
        hidden = model.model(inputs_embeds=embeds, position_ids=positions).last_hidden_state
    torch.testing.assert_close(got, model.lm_head(hidden[:, m:m + 8]), atol=ATOL, rtol=0)
    torch.testing.assert_close(state.rmt, hidden[:, -m:], atol=ATOL, rtol=0)


def test_absolute_positions_keep_segment_tokens_at_their_document_positions_with_memory_tokens():
    # K/V memory at document positions plus 2 memory tokens: segment token i must sit at doc_start + i (a bug once
    # put it at doc_start + m + i), with the read slots on the 2 positions before it and the write slots after it.
    # The rotary module sees the positions; one layer makes the read exact against plain HF.
    model = tiny_llama(layers=1)
    config = UniMemConfig(management=Management(size=8), writing=Writing(kv="direct", memory_tokens=2),
                          reading=Reading(window=8), position=Position(mode="absolute"))
    doc = random_docs([17])[0]
    seen: list[list[int]] = []
    with MemoryLM(model, config, segment_len=8) as lm, torch.no_grad():
        def record(module, args, kwargs, out):
            seen.append((args[1] if len(args) > 1 else kwargs["position_ids"])[0].tolist())

        hook = lm.decoder.rotary_emb.register_forward_hook(record, with_kwargs=True)
        state = lm.new_state(1)
        lm.forward_segment(state, doc[:8].unsqueeze(0), 0)
        read = state.rmt
        got = lm.forward_segment(state, doc[8:16].unsqueeze(0), 8)[0]
        hook.remove()
        assert seen[-1] == [6, 7, *range(8, 16), 16, 17]  # the decoder's call for segment 2
        embed = model.get_input_embeddings()
        for i in range(8):
            embeds = torch.cat([embed(doc[:8]).unsqueeze(0), read, embed(doc[8:9 + i]).unsqueeze(0)], dim=1)
            positions = torch.tensor([[*range(8), 6, 7, *range(8, 9 + i)]])
            expected = model(inputs_embeds=embeds, position_ids=positions).logits[0, -1]
            torch.testing.assert_close(got[i], expected, atol=ATOL, rtol=0, msg=f"query {i}")


@pytest.mark.parametrize(("strategy", "reaches"), [("bptt_tokens", True), ("stop_gradient", False)])
def test_bptt_tokens_trains_memory_tokens_through_later_segments_with_kv_memory_detached(strategy, reaches):
    model = tiny_llama(layers=2)
    ctx = MethodContext(n_layers=2, segment_len=8, trained_context=256)
    config = METHODS.get("unimix").config(ctx, [f"training.strategy={strategy}"])
    doc = random_docs([17])[0]
    with MemoryLM(model, config, segment_len=8) as lm:
        state = lm.new_state(1)
        lm.forward_segment(state, doc[:8].unsqueeze(0), 0)
        assert not any(layer.keys.requires_grad for layer in state.layers.values())  # K/V memory detached
        logits = lm.forward_segment(state, doc[8:16].unsqueeze(0), 8)
        F.cross_entropy(logits[0], doc[9:17]).backward()  # the second segment's loss only
        grad = lm.memory_embeddings.grad
    assert (grad is not None and float(grad.abs().sum()) > 0) == reaches


def test_unimix_kv_bank_does_not_count_memory_tokens_again():
    ctx = MethodContext(n_layers=22, segment_len=2048, trained_context=2048)
    config = METHODS.get("unimix").config(ctx)
    assert (config.management.size, config.writing.memory_tokens) == (20_480, 40)  # Table 2: 20,480 + 40


def test_bfloat16_topk_on_cpu_keeps_the_model_dtype(model):
    # The fused CPU kernel returns a float32 log-sum-exp; the merged output must stay bfloat16 for o_proj.
    ctx = MethodContext(n_layers=2, segment_len=8, trained_context=256)
    config = METHODS.get("memorizing_transformer").config(ctx, ["reading.topk=4"])
    doc = random_docs([40])[0]
    with MemoryLM(model, config, segment_len=8) as lm:
        wide = lm.score([doc])[0]
    half = tiny_llama().to(torch.bfloat16)
    with MemoryLM(half, config, segment_len=8) as lm:
        got = lm.score([doc])[0]
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, wide, atol=0.1, rtol=0.05)


def test_segment_plan_is_built_once_and_frozen(model):
    config = METHODS.get("transformer_xl").config(MethodContext(n_layers=2, segment_len=8, trained_context=256))
    with MemoryLM(model, config, segment_len=8) as lm:
        probe = model.get_input_embeddings().weight[:1].unsqueeze(0)
        plan = build_plan(config, lm.new_state(1), n_read=0, n_seg=8, n_write=0, doc_start=0,
                          rotary=lm.decoder.rotary_emb, probe=probe, write=True, grad=False)
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.write = False  # type: ignore[misc]


def test_training_strategy_sets_the_window_of_segments():
    assert Training(strategy="stop_gradient", bptt_segments=3).window_segments == 1
    assert Training(strategy="bptt_tokens", bptt_segments=3).window_segments == 3
