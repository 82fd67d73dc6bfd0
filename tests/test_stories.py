"""Integration on a real pretrained LLaMA (stories260K, trained context 512) over public-domain books."""

from __future__ import annotations

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from unimem_bench.harness.models.resolve import load_model, resolve_model
from unimem_bench.methods import METHODS, MemoryLM, MethodContext
from unimem_bench.tasks import TASKS, TaskOptions


@pytest.fixture(scope="module")
def stories(request):
    stories_dir = request.getfixturevalue("stories_dir")
    return AutoModelForCausalLM.from_pretrained(stories_dir).eval(), AutoTokenizer.from_pretrained(stories_dir)


def book_ppl(stories, books_dir, method: str, segment: int = 256) -> float:
    model, tokenizer = stories
    config = METHODS.get(method).config(MethodContext(n_layers=5, segment_len=segment, trained_context=512))
    options = TaskOptions(data_dir=books_dir, max_docs=3, max_tokens=2048, batch_size=3)
    with MemoryLM(model, config, segment_len=segment) as lm:
        return TASKS.get("pg19").run(lm, tokenizer, options).metrics["token_ppl"]


def test_memory_that_carries_context_helps_a_real_model(stories, books_dir):
    vanilla = book_ppl(stories, books_dir, "vanilla")
    xl = book_ppl(stories, books_dir, "transformer_xl")
    assert xl < 0.97 * vanilla, (xl, vanilla)


def test_llama2c_checkpoint_scores_like_its_hf_copy(stories, stories_dir, books_dir):
    source = resolve_model(str(stories_dir / "llama2c"))
    assert source.kind == "llama2c"
    import torch

    model, tokenizer = load_model(source, device=torch.device("cpu"), dtype=torch.float32)
    assert book_ppl((model, tokenizer), books_dir, "vanilla", 128) == pytest.approx(
        book_ppl(stories, books_dir, "vanilla", 128), rel=1e-5)
