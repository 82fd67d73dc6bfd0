"""Perplexity tasks: document encoding, token-weighted aggregation, data selection."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoTokenizer

from unimem_bench.tasks import TASKS, TaskOptions
from unimem_bench.tasks.perplexity import aggregate, encode_document


class ConstantLM:
    """Scores every token with the same NLL: perplexity must come out as exp(that)."""

    def __init__(self, nll: float) -> None:
        self.nll = nll

    def score(self, docs, *, batch_size=1, progress=None):
        return [torch.full((len(d) - 1,), self.nll) for d in docs]


@pytest.fixture(scope="module")
def tokenizer(request):
    return AutoTokenizer.from_pretrained(request.getfixturevalue("stories_dir"))


def test_encoding_starts_with_bos_and_truncation_covers_the_text(tokenizer):
    text = "Once upon a time, there was a little girl named Lily. " * 40
    ids, covered = encode_document(tokenizer, text, 50)
    assert len(ids) == 50 and ids[0] == tokenizer.bos_token_id
    assert text.startswith(covered) and covered
    assert tokenizer(covered, add_special_tokens=False)["input_ids"] == ids[1:].tolist()
    full, all_text = encode_document(tokenizer, text, None)
    assert all_text == text.rstrip(" ") or all_text == text
    assert len(full) > 50


def test_perplexity_weighs_every_token_equally():
    samples = [{"nll": 10.0, "tokens": 10, "bytes": 40, "words": 8}, {"nll": 300.0, "tokens": 100, "bytes": 400,
                                                                     "words": 80}]
    metrics = aggregate(samples)
    assert metrics["token_ppl"] == pytest.approx(math.exp(310 / 110))
    assert metrics["token_ppl"] != pytest.approx((math.exp(1.0) + math.exp(3.0)) / 2)  # not a mean of means
    assert metrics["bits_per_byte"] == pytest.approx(310 / math.log(2) / 440)
    assert metrics["word_ppl"] == pytest.approx(math.exp(310 / 88))


def test_books_task_strips_gutenberg_and_reports_exact_constant_perplexity(tokenizer, books_dir):
    options = TaskOptions(data_dir=books_dir, max_docs=2, max_tokens=200)
    result = TASKS.get("pg19").run(ConstantLM(2.0), tokenizer, options)
    assert result.metrics["token_ppl"] == pytest.approx(math.exp(2.0))
    assert result.n == 2 * 199
    assert len(result.samples) == 2 and all("*** START OF" not in s["doc_id"] for s in result.samples)


def test_github_default_data_is_the_heldout_stdlib_split():
    task = TASKS.get("github")
    docs = task.documents(TaskOptions(max_docs=5))
    assert len(docs) == 5 and all(len(text) >= task.min_chars for _, text in docs)
    assert docs == task.documents(TaskOptions(max_docs=5))
