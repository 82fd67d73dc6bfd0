"""The position-interpolation length comparison: memoryless methods read each length at once."""

from __future__ import annotations

import pytest
import torch
from helpers import random_docs, tiny_llama
from test_engine import full_nll

from unimem_bench.harness.runtime.distributed import Processes, ShardedLM
from unimem_bench.methods import METHODS, MemoryLM, MethodContext
from unimem_bench.tasks import TASKS, SampleLog, TaskOptions
from unimem_bench.tasks.arguments import configure
from unimem_bench.tasks.base import generate_at_once


def test_vanilla_read_at_once_is_full_attention(model):
    doc = random_docs([120])[0]
    config = METHODS.get("vanilla").config(MethodContext(n_layers=2, segment_len=16, trained_context=256))
    with MemoryLM(model, config, segment_len=16) as lm:
        streamed = lm.score([doc])[0]
        with lm.reading_at_once(120) as view:
            at_once = view.score([doc])[0]
        assert lm.segment_len == 16 and torch.equal(lm.score([doc])[0], streamed)
    torch.testing.assert_close(at_once, full_nll(model, doc), atol=1e-5, rtol=0)
    assert not torch.allclose(streamed, at_once, atol=1e-3)


def test_position_interpolation_read_at_once_equals_transformers_linear_rope():
    """Factor = length / trained context, applied by transformers' own `linear` rope type."""
    model = tiny_llama(context=32)
    doc = random_docs([96])[0]
    config = METHODS.get("position_interpolation").config(MethodContext(n_layers=2, segment_len=16,
                                                                        trained_context=32))
    reference = tiny_llama(context=32, rope_type="linear", factor=3.0)
    with MemoryLM(model, config, segment_len=16, trained_context=32) as lm:
        rotary = lm.decoder.rotary_emb
        with lm.reading_at_once(96) as view:
            assert view.rope_factor == 3.0
            at_once = view.score([doc])[0]
        assert lm.decoder.rotary_emb is rotary  # the method's own reading is restored
    torch.testing.assert_close(at_once, full_nll(reference, doc), atol=1e-5, rtol=0)


def test_memory_methods_read_unchanged_they_stream(model):
    doc = random_docs([64])[0]
    config = METHODS.get("transformer_xl").config(MethodContext(n_layers=2, segment_len=16, trained_context=256))
    with MemoryLM(model, config, segment_len=16) as lm:
        streamed = lm.score([doc])[0]
        with lm.reading_at_once(64) as view:
            assert view is lm and view.segment_len == 16
            assert torch.equal(view.score([doc])[0], streamed)


def test_generate_at_once_reads_prompt_and_answer_at_once_also_sharded(model):
    """Vanilla with 16-token segments generates from a 40-token prompt exactly as full attention does (transformers'
    generate), also through the sharded wrapper the runner uses; a memory method generates as it streams."""
    prompt = random_docs([40])[0]
    expected = model.generate(prompt.unsqueeze(0), max_new_tokens=6, do_sample=False)[0, 40:].tolist()
    vanilla = METHODS.get("vanilla").config(MethodContext(n_layers=2, segment_len=16, trained_context=256))
    with MemoryLM(model, vanilla, segment_len=16) as lm:
        assert lm.generate(prompt, max_new_tokens=6) != expected  # streamed, vanilla forgets the earlier segments
        sharded = ShardedLM(lm, Processes())
        assert generate_at_once(sharded, prompt.tolist(), max_new_tokens=6) == expected
        with sharded.reading_at_once(46) as view:
            assert view is sharded and lm.segment_len == 46
        assert lm.segment_len == 16
    xl = METHODS.get("transformer_xl").config(MethodContext(n_layers=2, segment_len=16, trained_context=256))
    with MemoryLM(model, xl, segment_len=16) as lm:
        assert generate_at_once(lm, prompt.tolist(), max_new_tokens=6) == lm.generate(prompt, max_new_tokens=6)


@pytest.fixture(scope="module")
def stories(stories_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(stories_dir).eval(), AutoTokenizer.from_pretrained(stories_dir)


def run_length_task(stories, books_dir, method, log=None):
    model, tokenizer = stories
    task = configure([TASKS.get("pi-length")], [("", "lengths", "256,512")])[0]
    # A trained context of 256 (the model's is 512) keeps the test small: 2x is then 512 tokens.
    config = METHODS.get(method).config(MethodContext(n_layers=5, segment_len=128, trained_context=256))
    with MemoryLM(model, config, segment_len=128, trained_context=256) as lm:
        return task.run(lm, tokenizer, TaskOptions(data_dir=books_dir, max_docs=2), log)


def test_length_rows_and_interpolation_at_one_and_two_times(stories, books_dir, tmp_path):
    vanilla = run_length_task(stories, books_dir, "vanilla")
    interpolated = run_length_task(stories, books_dir, "position_interpolation")
    for result in (vanilla, interpolated):
        assert result.context_len == 512 and set(result.metrics) == {"token_ppl", "tail_token_ppl"}
        assert [(r.context_len, r.metric) for r in result.rows] == [(256, "token_ppl"), (256, "tail_token_ppl")]
        assert all(s["read_at_once"] == s["length"] for s in result.samples)
    # 1x the trained context: interpolation factor 1, the same numbers; 2x: factor 2 changes them.
    assert interpolated.rows[0].value == pytest.approx(vanilla.rows[0].value, rel=1e-6)
    assert interpolated.metrics["token_ppl"] != pytest.approx(vanilla.metrics["token_ppl"], rel=1e-3)
    log = SampleLog(tmp_path / "log.jsonl")
    for key, sample in vanilla_samples(vanilla):
        if sample["length"] == 256:
            log.add(key, sample)
    resumed = run_length_task(stories, books_dir, "vanilla", SampleLog(tmp_path / "log.jsonl"))
    assert resumed.metrics == pytest.approx(vanilla.metrics) and resumed.rows == vanilla.rows


def vanilla_samples(result):
    return [(f"{s['doc_id']}@{s['length']}", s) for s in result.samples]


def test_xl_streams_the_longer_length(stories, books_dir):
    result = run_length_task(stories, books_dir, "transformer_xl")
    assert {s["read_at_once"] for s in result.samples} == {128}
