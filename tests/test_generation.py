"""Generation through memory: equal to transformers' generate without memory, consistent with scoring with it."""

from __future__ import annotations

import pytest
import torch
from helpers import random_docs, tiny_llama

from unimem_bench.methods import METHODS, ConfigError, MemoryLM, MethodContext, Sampling


def hf_greedy(model: torch.nn.Module, prompt: torch.Tensor, n: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(prompt.unsqueeze(0), max_new_tokens=n, do_sample=False, min_new_tokens=n,
                             pad_token_id=0)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("prompt_len", [1, 7, 30])
def test_vanilla_greedy_equals_transformers_generate(model, prompt_len):
    prompt = random_docs([prompt_len], seed=prompt_len)[0]
    config = METHODS.get("vanilla").config(MethodContext(n_layers=2, segment_len=64, trained_context=256))
    with MemoryLM(model, config, segment_len=64) as lm:
        ours = lm.generate(prompt, max_new_tokens=20)
    assert ours == hf_greedy(model, prompt, 20)


@pytest.mark.parametrize("name", METHODS.names())
def test_greedy_tokens_are_the_argmax_of_streamed_scoring(name):
    """Across segment boundaries (prompt 13, segment 8, 20 new tokens), every generated token is the argmax that
    scoring the finished text through the same memory gives: the cached decode path reads exactly scoring's memory."""
    model = tiny_llama(layers=3, seed=3)
    ctx = MethodContext(n_layers=3, segment_len=8, trained_context=256)
    reading = METHODS.get(name).config(ctx).reading
    # Top-k of 2 (chunk readers: one chunk of 2) picks a real subset of the tiny memory.
    overrides = (["reading.topk=2"] + (["reading.chunk_size=2"] if reading.chunk_size else [])) if reading.topk else []
    if METHODS.get(name).config(ctx).management.freeze_after_prompt:  # scoring writes every segment
        overrides.append("management.freeze_after_prompt=false")
    if reading.chunk_select == "block":  # a decoded token ranks chunks alone (InfLLM's decoding), scoring per block
        overrides.append("reading.chunk_select=query")
    config = METHODS.get(name).config(ctx, overrides)
    prompt = random_docs([13], seed=5)[0]
    with MemoryLM(model, config, segment_len=8) as lm:
        new = lm.generate(prompt, max_new_tokens=20)
        scores = lm.score_tokens([torch.cat([prompt, torch.tensor(new)])])[0]
    assert len(new) == 20
    assert scores.greedy[len(prompt) - 1:].all()


def test_memory_changes_generation_only_past_the_first_segment(model):
    """Inside one segment XL has nothing in memory, so it decodes like vanilla; the same prompt streamed over four
    segments makes XL read memory that vanilla drops."""
    ctx = MethodContext(n_layers=2, segment_len=8, trained_context=256)
    prompt = random_docs([40], seed=9)[0]
    outputs = {}
    for name in ("vanilla", "transformer_xl"):
        with MemoryLM(model, METHODS.get(name).config(ctx), segment_len=8) as lm:
            outputs[name] = (lm.generate(prompt[:5], max_new_tokens=3), lm.score_tokens([prompt])[0].nll)
    assert outputs["vanilla"][0] == outputs["transformer_xl"][0]
    assert not torch.allclose(outputs["vanilla"][1][8:], outputs["transformer_xl"][1][8:])


def test_stop_and_eos_end_generation(model):
    config = METHODS.get("vanilla").config(MethodContext(n_layers=2, segment_len=64, trained_context=256))
    prompt = random_docs([6], seed=2)[0]
    with MemoryLM(model, config, segment_len=64) as lm:
        free = lm.generate(prompt, max_new_tokens=12)
        assert lm.generate(prompt, max_new_tokens=12, eos_token_id=free[3]) == free[:free.index(free[3]) + 1]
        assert lm.generate(prompt, max_new_tokens=12, stop=lambda ids: len(ids) >= 5) == free[:5]


def test_sampling_is_seeded_and_not_greedy(model):
    config = METHODS.get("transformer_xl").config(MethodContext(n_layers=2, segment_len=8, trained_context=256))
    prompt = random_docs([10], seed=4)[0]
    with MemoryLM(model, config, segment_len=8) as lm:
        a = lm.generate(prompt, max_new_tokens=30, sampling=Sampling(do_sample=True, seed=1))
        torch.manual_seed(123)  # the global RNG must not matter
        b = lm.generate(prompt, max_new_tokens=30, sampling=Sampling(do_sample=True, seed=1))
        c = lm.generate(prompt, max_new_tokens=30, sampling=Sampling(do_sample=True, seed=2))
        greedy = lm.generate(prompt, max_new_tokens=30)
        nucleus = lm.generate(prompt, max_new_tokens=30, sampling=Sampling(do_sample=True, top_p=1e-6, seed=3))
    assert a == b
    assert a != c and a != greedy
    assert nucleus == greedy  # top_p -> 0 keeps only the most likely token


def test_sampling_rejects_impossible_settings():
    with pytest.raises(ConfigError, match="temperature"):
        Sampling(do_sample=True, temperature=0)
    with pytest.raises(ConfigError, match="top_p"):
        Sampling(top_p=0)
