"""Exactness of the engine against plain transformers on tiny random LLaMA models (fp32, CPU)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import random_docs, tiny_llama

from unimem_bench.methods import METHODS, MemoryLM, MethodContext, UniMemConfig
from unimem_bench.methods.config import Management, Position, Reading, Writing
from unimem_bench.methods.engine import kernels

ATOL = 1e-5


def full_nll(model: torch.nn.Module, doc: torch.Tensor) -> torch.Tensor:
    """Per-token NLL of the plain HF model reading the whole document at once."""
    with torch.no_grad():
        logits = model(doc.unsqueeze(0)).logits[0]
    return F.cross_entropy(logits[:-1], doc[1:], reduction="none")


def kv_config(**reading: object) -> UniMemConfig:
    size = int(reading.pop("size", 64))
    position = Position(mode=str(reading.pop("mode", "compact")))
    overflow = str(reading.pop("overflow", "fifo"))
    return UniMemConfig(management=Management(size=size, overflow=overflow), writing=Writing(kv="direct"),
                        reading=Reading(**reading), position=position)


@pytest.mark.parametrize("name", METHODS.names())
def test_every_method_without_memory_equals_plain_hf(model, name):
    config = METHODS.get(name).config(MethodContext(n_layers=2, segment_len=16, trained_context=256))
    config = config.without_memory()
    if name == "position_interpolation":  # its change is positional, tested against transformers' linear RoPE below
        config = config.with_overrides(["position.rope_factor=1"])
    ids = random_docs([16])[0].unsqueeze(0)
    with torch.no_grad():
        expected = model(ids).logits
        with MemoryLM(model, config, segment_len=16) as lm:
            got = lm.forward_segment(lm.new_state(1), ids, 0)
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)


def test_close_gives_the_model_back(model):
    ids = random_docs([20])[0].unsqueeze(0)
    with torch.no_grad():
        before = model(ids).logits
        with MemoryLM(model, METHODS.get("position_interpolation").config(MethodContext(2, 128, 64)),
                      segment_len=128):
            assert model.config._attn_implementation == "unimem"
        after = model(ids).logits
    assert model.config._attn_implementation != "unimem"
    torch.testing.assert_close(after, before, atol=0, rtol=0)


@pytest.mark.parametrize("mode", ["compact", "absolute"])
@pytest.mark.parametrize("segment", [1, 7, 16])
def test_transformer_xl_window_covering_document_equals_full_attention(model, segment, mode):
    # Compact and absolute positions keep memory and segment at consecutive positions: a (sliding) window that
    # covers the document is full causal attention.
    doc = random_docs([48])[0]
    config = METHODS.get("transformer_xl").config(MethodContext(2, segment, 256),
                                                  ["management.size=64", "reading.window=64",
                                                   f"position.mode={mode}"])
    with MemoryLM(model, config, segment_len=segment) as lm:
        got = lm.score([doc])[0]
    torch.testing.assert_close(got, full_nll(model, doc), atol=ATOL, rtol=0)


@pytest.mark.parametrize("index", ["torch", "faiss-flat"])
def test_topk_over_all_memory_equals_dense_attention(model, index):
    # Absolute positions: every memory key keeps its document position, so top-k over a memory holding the whole
    # document, at every layer, is exactly full causal attention over [memory; segment].
    doc = random_docs([40])[0]
    config = METHODS.get("memorizing_transformer").config(
        MethodContext(2, 8, 256), ["management.size=64", "reading.topk=64", "injection.layers=all",
                                   "position.mode=absolute", f"reading.index={index}"])
    with MemoryLM(model, config, segment_len=8) as lm:
        got = lm.score([doc])[0]
    torch.testing.assert_close(got, full_nll(model, doc), atol=ATOL, rtol=0)


@pytest.mark.parametrize("fused", [True, False])
def test_topk_merge_equals_window_read_of_the_same_keys(model, monkeypatch, fused):
    # Two code paths, one softmax: top-k over all memory (log-sum-exp merge) against read_all (one SDPA call);
    # the log-sum-exp comes from PyTorch's fused CPU kernel or from the portable manual path.
    if not fused:
        monkeypatch.setattr(kernels, "CPU_FLASH_WITH_LSE", None)
    doc = random_docs([40])[0]
    topk = kv_config(size=64, topk=64, mode="absolute")
    read_all = kv_config(size=64, read_all=True, mode="absolute")
    with MemoryLM(model, topk, segment_len=8) as a:
        got = a.score([doc])[0]
    with MemoryLM(model, read_all, segment_len=8) as b:
        expected = b.score([doc])[0]
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)


def layer0_keys(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """Unrotated layer-0 keys of tokens [n]: [kv_heads, n, head_dim] (layer 0 sees only the embeddings)."""
    layer = model.model.layers[0]
    with torch.no_grad():
        hidden = layer.input_layernorm(model.model.embed_tokens(tokens))
        k = layer.self_attn.k_proj(hidden)
    heads = model.config.num_key_value_heads
    return k.view(len(tokens), heads, -1).transpose(0, 1)


@pytest.mark.parametrize(("overflow", "expected"), [
    # size 10, segments of 4, 26 tokens scored -> 7 segments (the last has 1 input token).
    ("fifo", list(range(15, 25))),  # after writing tokens 0..24, FIFO holds the most recent 10
    # clear-and-write: 0-7, then 8-11 would make 12 > 10: cleared -> 8-15, cleared again -> 16-19, 16-23, 16-24
    ("clear-and-write", list(range(16, 25))),
    # clear (official: reset, write nothing): 0-7, 8-11 dropped with the memory -> empty, 12-15, 12-19, then
    # 20-23 dropped with the memory -> empty, 24
    ("clear", [24]),
])
def test_overflow_keeps_exactly_the_right_tokens(model, overflow, expected):
    doc = random_docs([26])[0]
    config = kv_config(size=10, window=4, overflow=overflow)
    with MemoryLM(model, config, segment_len=4) as lm:
        state = lm.new_state(1)
        with torch.no_grad():
            for start in range(0, 25, 4):
                lm.forward_segment(state, doc[start:min(start + 4, 25)].unsqueeze(0), start)
    assert state.positions.tolist() == expected
    bank = state.layers[0].keys[0]  # [kv_heads, slots, head_dim], stored unrotated in compact mode
    torch.testing.assert_close(bank, layer0_keys(model, doc[expected]), atol=ATOL, rtol=0)


def test_gqa_memory_holds_kv_heads_not_query_heads():
    """4 query heads share 1 KV head: the bank stores that head's keys and values, and reading it scores exactly
    as full attention does."""
    model = tiny_llama(heads=4, kv_heads=1)
    docs = random_docs([8, 8, 8])
    with MemoryLM(model, kv_config(size=16, window=16), segment_len=8) as lm:
        state = lm.new_state(3)
        with torch.no_grad():
            lm.forward_segment(state, torch.stack(docs), 0)
    layer = model.model.layers[0]
    for row, doc in enumerate(docs):
        with torch.no_grad():
            values = layer.self_attn.v_proj(layer.input_layernorm(model.model.embed_tokens(doc)))  # [8, head_dim]
        # [batch, kv_heads, slots, head_dim]; keys stored unrotated in compact mode
        torch.testing.assert_close(state.layers[0].keys[row], layer0_keys(model, doc), atol=ATOL, rtol=0)
        torch.testing.assert_close(state.layers[0].values[row], values.view(8, 1, -1).transpose(0, 1), atol=ATOL,
                                   rtol=0)
    doc = random_docs([40])[0]
    xl = METHODS.get("transformer_xl").config(MethodContext(2, 8, 256), ["management.size=64", "reading.window=64",
                                                                      "position.mode=absolute"])
    with MemoryLM(model, xl, segment_len=8) as lm:
        got = lm.score([doc])[0]
    torch.testing.assert_close(got, full_nll(model, doc), atol=ATOL, rtol=0)


@pytest.mark.parametrize("mode", ["official", "compact", "absolute"])
def test_position_modes_place_globals_and_window_as_named(mode):
    # With one layer, memory keys/values depend only on their own token and position, so the memory read must
    # equal plain HF over the tokens it holds: [globals ; window ; segment] at the positions the mode names.
    model = tiny_llama(layers=1)
    doc = random_docs([40])[0]
    segment, globals_, window = 8, 2, 8
    config = kv_config(size=16, window=window, global_tokens=globals_, mode=mode)
    with MemoryLM(model, config, segment_len=segment) as lm:
        state = lm.new_state(1)
        with torch.no_grad():
            for start in range(0, 32, segment):
                logits = lm.forward_segment(state, doc[start:start + segment].unsqueeze(0), start)
    start = 24  # last segment: globals 0-1, window = the previous 8 tokens (16-23), segment 24-31
    kept = torch.cat([doc[:globals_], doc[start - window:start], doc[start:start + segment]])
    if mode == "official":  # every memory key at 0, the segment from 0
        positions = torch.cat([torch.zeros(globals_ + window, dtype=torch.long), torch.arange(segment)])
    elif mode == "compact":
        positions = torch.arange(len(kept))
    else:
        positions = torch.cat([torch.arange(globals_), torch.arange(start - window, start + segment)])
    with torch.no_grad():
        expected = model(kept.unsqueeze(0), position_ids=positions.unsqueeze(0)).logits[0, -segment:]
    torch.testing.assert_close(logits[0], expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", ["vanilla", "transformer_xl", "memorizing_transformer", "rmt", "longformer",
                                  "unimix", "position_interpolation"])
def test_batch_size_never_changes_a_score(model, name):
    config = METHODS.get(name).config(MethodContext(n_layers=2, segment_len=8, trained_context=16))
    docs = random_docs([45, 17, 33, 9, 2])
    with MemoryLM(model, config, segment_len=8) as lm:
        single = lm.score(docs, batch_size=1)
        batched = lm.score(docs, batch_size=4)
    for a, b, doc in zip(single, batched, docs, strict=True):
        assert len(a) == len(doc) - 1
        torch.testing.assert_close(b, a, atol=ATOL, rtol=0)


def test_position_interpolation_equals_transformers_linear_rope():
    model = tiny_llama(context=16)
    scaled = tiny_llama(context=16, rope_type="linear", factor=4.0)
    scaled.load_state_dict(model.state_dict())
    doc = random_docs([64])[0]
    config = METHODS.get("position_interpolation").config(MethodContext(2, 16, 16))  # reads 4 x 16 = 64 at once
    with MemoryLM(model, config, segment_len=16) as lm:
        assert lm.rope_factor == 4.0
        got = lm.score([doc])[0]
    torch.testing.assert_close(got, full_nll(scaled, doc), atol=ATOL, rtol=0)
    assert (got - full_nll(model, doc)).abs().max() > 20 * ATOL  # and the interpolation did change the result


def test_stop_gradient_detaches_memory_and_bptt_keeps_it(model):
    doc = random_docs([16])[0].unsqueeze(0)
    for strategy, grad in (("stop_gradient", False), ("bptt", True)):
        config = kv_config(size=16, window=8).with_overrides([f"training.strategy={strategy}"])
        with MemoryLM(model, config, segment_len=8) as lm:
            state = lm.new_state(1)
            lm.forward_segment(state, doc[:, :8], 0)
            assert state.layers[0].keys.requires_grad == grad


def test_injection_outside_layers_is_untouched(model):
    """Memory at layer 1 only: on every segment, layer 0 outputs what the stock model (SDPA) gives for the same
    tokens at the same positions, while layer 1, which reads memory, differs once memory holds a segment."""
    outputs: dict[int, torch.Tensor] = {}
    runs: list[tuple[torch.Tensor, dict[int, torch.Tensor]]] = []  # (position ids, layer outputs) per segment

    def keep_output(i: int):
        return lambda module, args, out: outputs.__setitem__(i, (out[0] if isinstance(out, tuple) else out).clone())

    hooks = [model.model.layers[i].register_forward_hook(keep_output(i)) for i in (0, 1)]
    hooks.append(model.model.register_forward_hook(
        lambda module, args, kwargs, out: runs.append((kwargs["position_ids"].clone(), dict(outputs))),
        with_kwargs=True))
    doc = random_docs([24])[0]
    config = kv_config(size=16, window=8).with_overrides(["injection.layers=1"])
    with MemoryLM(model, config, segment_len=8) as lm:
        state = lm.new_state(1)
        with torch.no_grad():
            for start in (0, 8, 16):
                lm.forward_segment(state, doc[start:start + 8].unsqueeze(0), start)
    assert set(state.layers) == {1} and model.config._attn_implementation == "sdpa" and len(runs) == 3
    for start, (positions, ours) in zip((0, 8, 16), list(runs), strict=True):
        with torch.no_grad():
            model(doc[start:start + 8].unsqueeze(0), position_ids=positions)  # stock SDPA, hooks record it
        stock = runs[-1][1]
        torch.testing.assert_close(ours[0], stock[0], atol=ATOL, rtol=0)
        if start:
            assert (ours[1] - stock[1]).abs().max() > 100 * ATOL
    for hook in hooks:
        hook.remove()


@pytest.mark.parametrize("family", ["mistral", "qwen2", "qwen3"])
def test_other_llama_family_decoders_are_hooked_exactly(family):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(family, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, vocab_size=99, head_dim=8,
                                  max_position_embeddings=256)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    doc = random_docs([40])[0]
    xl = METHODS.get("transformer_xl").config(MethodContext(2, 8, 256), ["management.size=64", "reading.window=64",
                                                                         "position.mode=compact"])
    with MemoryLM(model, xl, segment_len=8) as lm:
        got = lm.score([doc])[0]
    torch.testing.assert_close(got, full_nll(model, doc), atol=ATOL, rtol=0)


@pytest.mark.parametrize(("name", "overrides"), [
    ("memorizing_transformer", []),
    ("unimix", []),
    ("unimix", ["reading.sliding=true", "reading.window=6"]),
    ("reformer", ["reading.window=5"]),
    ("routing", []),
])
def test_context_end_bounds_are_the_extremes_of_the_read_ends(model, monkeypatch, name, overrides):
    """`SegmentContext.end_bounds`, derived from the plan without reading a tensor, equals the smallest and largest
    entry of topk_end / bucket_end in every context built while scoring and while decoding (prefill, then one token
    a step: query_start > 0)."""
    from unimem_bench.methods.engine import generation, plan

    checked = []

    def spy(*args, **kwargs):
        ctx = real(*args, **kwargs)
        for ends in (ctx.topk_end, ctx.bucket_end):
            if ends is not None:
                assert ctx.end_bounds == (int(ends.min()), int(ends.max()))
                checked.append(kwargs["query_start"])
        return ctx

    real = plan.segment_context
    monkeypatch.setattr(plan, "segment_context", spy)
    monkeypatch.setattr(generation, "segment_context", spy)
    config = METHODS.get(name).config(MethodContext(2, 8, 256), ["management.size=32", *overrides])
    doc = random_docs([45])[0]
    with MemoryLM(model, config, segment_len=8) as lm:
        lm.score([doc])
        lm.generate(doc[:21], max_new_tokens=5)
    assert checked and max(checked) > 0  # whole segments and decoding steps were both seen
