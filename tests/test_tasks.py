"""Perplexity tasks: document encoding, token-weighted aggregation, data selection."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoTokenizer

from unimem_bench.tasks import TASKS, TaskOptions
from unimem_bench.tasks.perplexity import aggregate, encode_document, position_sums


class ConstantLM:
    """Scores every token with the same NLL: perplexity must come out as exp(that)."""

    def __init__(self, nll: float) -> None:
        self.nll = nll

    def score(self, docs, *, batch_size=1, progress=None):
        return [torch.full((len(d) - 1,), self.nll) for d in docs]


class PositionLM:
    """Scores the token at position p (BOS = 0) with NLL 1 + p / 1000: perplexity rises along the document."""

    def score(self, docs, *, batch_size=1, progress=None):
        return [1.0 + torch.arange(1, len(d), dtype=torch.float32) / 1000 for d in docs]


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


def test_position_sums_bucket_every_scored_token_by_its_position():
    nll = torch.rand(1500, generator=torch.Generator().manual_seed(0))
    sums = position_sums(nll, 256)
    assert list(sums) == ["0-256", "256-512", "512-1024", "1024-2048"]
    # nll[i] scores position i + 1: positions 1..255 (255 tokens), 256..511, 512..1023, 1024..1500.
    assert [count for _, count in sums.values()] == [255, 256, 512, 477]
    for label, (total, _) in sums.items():
        lo, hi = map(int, label.split("-"))
        assert total == pytest.approx(float(nll.double()[max(lo - 1, 0):hi - 1].sum()))


def test_books_task_adds_position_bucket_rows_that_recombine_to_the_headline(tokenizer, books_dir):
    options = TaskOptions(data_dir=books_dir, max_docs=2, max_tokens=1300)
    result = TASKS.get("pg19").run(PositionLM(), tokenizer, options)
    assert [r.subtask for r in result.rows] == ["pos:0-512", "pos:512-1024", "pos:1024-2048"]
    assert [r.context_len for r in result.rows] == [512, 1024, 2048]
    assert [r.n for r in result.rows] == [2 * 511, 2 * 512, 2 * 276]
    # Each bucket's perplexity is exp of the mean NLL 1 + p / 1000 over its positions p.
    for row, (lo, hi) in zip(result.rows, [(1, 512), (512, 1024), (1024, 1300)], strict=True):
        assert row.metric == "token_ppl"
        assert row.value == pytest.approx(math.exp(1 + (lo + hi - 1) / 2 / 1000), rel=1e-5)
    assert [r.value for r in result.rows] == sorted(r.value for r in result.rows)
    pooled = sum(math.log(r.value) * r.n for r in result.rows) / sum(r.n for r in result.rows)
    assert math.exp(pooled) == pytest.approx(result.metrics["token_ppl"], rel=1e-9)
