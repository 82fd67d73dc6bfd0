"""Streaming perplexity: whole documents scored token by token through the method's memory.

`github` is code (default data: the held-out split of the Python standard library, present on every machine; or
any directory of source files); `pg19` is books (a directory of .txt books, Project Gutenberg header and footer
stripped as PG-19 does). Reported, aggregated over tokens (never a mean of segment or document means):
token perplexity, bits per byte, and word-level perplexity (PG-19's convention: whitespace-separated words); and
token perplexity per bucket of position within the document (`pos:0-512`, `pos:512-1024`, `pos:1024-2048` ...
breakdown rows), which shows whether a method helps more the farther a token is from the document's start.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from unimem_bench.tasks.arguments import arg, task_args
from unimem_bench.tasks.base import TASKS, MetricRow, SampleLog, ScoringLM, TaskOptions, TaskResult
from unimem_bench.tasks.data.corpora import read_stdlib_documents, read_text_dir, strip_gutenberg
from unimem_bench.tasks.data.hub import check_hub_dataset, hub_records

CODE_SUFFIXES = (".py", ".c", ".h", ".cc", ".cpp", ".java", ".js", ".ts", ".go", ".rs", ".rb", ".sh", ".txt")

# Batches scored between two writes of the sample log.
CHUNK_BATCHES = 8

# Characters tokenised per requested token when a document is truncated: code and prose average 3-5 characters
# per token, so 12 leaves a wide margin while sparing the tokenizer a whole book.
CHARS_PER_TOKEN_BOUND = 12


def encode_document(tokenizer: Any, text: str, max_tokens: int | None) -> tuple[torch.Tensor, str]:
    """Token ids (BOS first when the tokenizer has one) and the text those ids cover, at most `max_tokens` ids."""
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    source = text
    if max_tokens is not None and len(text) > max_tokens * CHARS_PER_TOKEN_BOUND:
        source = text[:max_tokens * CHARS_PER_TOKEN_BOUND]
    # verbose=False: a long document is meant to exceed the model maximum; transformers would warn about it.
    enc = tokenizer(source, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    if max_tokens is not None and len(bos) + len(ids) > max_tokens:
        keep = max_tokens - len(bos)
        ids, offsets = ids[:keep], offsets[:keep]
    elif source is not text:
        return encode_document(tokenizer, text, None)
    covered = text[:offsets[-1][1]] if offsets else ""
    return torch.tensor(bos + ids, dtype=torch.long), covered


@dataclass(frozen=True)
class PerplexityTask:
    """Token-level streaming perplexity over a corpus of long documents."""

    name: str
    version: str
    corpus: Literal["code", "books"]
    min_chars: int = arg(1_000)
    """Documents shorter than this many characters are skipped: memory only matters on long documents."""
    dataset: str = arg("")
    """Hub dataset id read through `datasets` when no --data-dir is given ("" = the task's offline default)."""
    subset: str = arg("")
    """The hub dataset's configuration name, if it has several."""
    split: str = arg("test")
    """The hub split (PG-19's test split is its 100 evaluation books)."""
    data_files: str = arg("")
    """Files of the hub repository to read (a glob), for repositories that mix sources."""
    text_field: str = arg("text")
    """The column holding a document's text."""
    first_bucket: int = arg(512)
    """End of the first position bucket in tokens; each later bucket doubles ([512, 1024), [1024, 2048) ...)."""
    headline: str = "token_ppl"

    @property
    def higher_is_better(self) -> dict[str, bool]:
        return dict.fromkeys(("token_ppl", "bits_per_byte", "word_ppl", "nll_per_token"), False)

    def __post_init__(self) -> None:
        if self.min_chars < 0:
            raise ValueError(f"{self.name}.min_chars {self.min_chars} must be >= 0")
        if self.first_bucket < 1:
            raise ValueError(f"{self.name}.first_bucket {self.first_bucket} must be >= 1")

    def documents(self, options: TaskOptions) -> list[tuple[str, str]]:
        """(doc_id, text) in the task's fixed order, filtered and limited by the options."""
        limit = options.max_docs
        if options.data_dir is not None:
            suffixes = (".txt",) if self.corpus == "books" else CODE_SUFFIXES
            docs = read_text_dir(Path(options.data_dir), suffixes=suffixes, strip_pg_header=self.corpus == "books")
            docs = [(i, t) for i, t in docs if len(t) >= self.min_chars]
        elif self.dataset:
            docs = []
            rows = hub_records(self.dataset, name=self.subset or None, split=self.split,
                               data_files=self.data_files or None)
            for i, row in enumerate(rows):
                text = row[self.text_field]
                if self.corpus == "books":
                    text = strip_gutenberg(text)
                if len(text) >= self.min_chars:
                    docs.append((str(row.get("short_book_title") or row.get("path") or row.get("id") or i), text))
                if limit and len(docs) >= limit:
                    break
        else:
            docs = read_stdlib_documents("heldout", min_chars=self.min_chars)
        if not docs:
            raise FileNotFoundError(f"task {self.name!r} found no document of at least {self.min_chars} characters "
                                    f"in {options.data_dir or self.dataset or 'the standard library'}")
        return docs[:limit] if limit else docs

    def check(self, options: TaskOptions) -> None:
        if options.data_dir is None and self.dataset:
            local = ".txt books" if self.corpus == "books" else "source files"
            check_hub_dataset(self.dataset, task=self.name, local=local, data_files=self.data_files or None)
            return
        self.documents(options)

    def params(self, options: TaskOptions) -> dict[str, Any]:
        data = str(options.data_dir) if options.data_dir else self.dataset or "stdlib-heldout"
        return {"data": data, "max_docs": options.max_docs, "max_tokens": options.max_tokens, **task_args(self)}

    def run(self, lm: ScoringLM, tokenizer: Any, options: TaskOptions, log: SampleLog | None = None,
            progress: Callable[[int, int | None], None] | None = None) -> TaskResult:
        log = log if log is not None else SampleLog()
        encoded = [(doc_id, *encode_document(tokenizer, text, options.max_tokens))
                   for doc_id, text in self.documents(options)]
        if progress is not None:
            progress(0, sum(len(ids) - 1 for _, ids, _ in encoded))
            progress(sum(len(ids) - 1 for doc_id, ids, _ in encoded if log.get(doc_id)), None)
        todo = [e for e in encoded if log.get(e[0]) is None]
        # Chunks of CHUNK_BATCHES batches: an interrupt loses at most one chunk, and sharded evaluation deals each
        # chunk's documents across processes.
        step = max(1, options.batch_size) * CHUNK_BATCHES
        for lo in range(0, len(todo), step):
            chunk = todo[lo:lo + step]
            nlls = lm.score([ids for _, ids, _ in chunk], batch_size=options.batch_size,
                            progress=(lambda n: progress(n, None)) if progress is not None else None)
            for (doc_id, _, text), nll in zip(chunk, nlls, strict=True):
                nll_sum = float(nll.double().sum())
                log.add(doc_id, {"doc_id": doc_id, "tokens": len(nll), "bytes": len(text.encode("utf-8")),
                                 "words": len(text.split()), "nll": nll_sum,
                                 "token_ppl": math.exp(nll_sum / max(len(nll), 1)),
                                 "positions": position_sums(nll, self.first_bucket)})
        samples = [log.done[doc_id] for doc_id, _, _ in encoded]
        return TaskResult(metrics=aggregate(samples), samples=samples, n=sum(s["tokens"] for s in samples),
                          context_len=max(len(ids) for _, ids, _ in encoded), rows=position_rows(samples))


def aggregate(samples: list[dict[str, Any]]) -> dict[str, float]:
    """Corpus metrics from per-document sums: every token weighs the same."""
    nll = sum(s["nll"] for s in samples)
    tokens = sum(s["tokens"] for s in samples)
    return {
        "token_ppl": math.exp(nll / tokens),
        "bits_per_byte": nll / math.log(2) / sum(s["bytes"] for s in samples),
        "word_ppl": math.exp(nll / sum(s["words"] for s in samples)),
        "nll_per_token": nll / tokens,
    }


def position_sums(nll: torch.Tensor, first_bucket: int) -> dict[str, list[float]]:
    """`start-end` -> [NLL sum, tokens] of one document's scored tokens by position (nll[i] scores the token at
    position i + 1; BOS is position 0), in buckets [0, first), [first, 2 first), [2 first, 4 first) ..."""
    positions = torch.arange(1, len(nll) + 1)
    edges = [first_bucket]
    while edges[-1] <= len(nll):
        edges.append(2 * edges[-1])
    index = torch.bucketize(positions, torch.tensor(edges), right=True)  # edges[i-1] <= position < edges[i]
    sums = torch.zeros(len(edges), dtype=torch.float64).index_add_(0, index, nll.double())
    counts = torch.bincount(index, minlength=len(edges))
    starts = [0, *edges[:-1]]
    return {f"{lo}-{hi}": [float(sums[i]), int(counts[i])]
            for i, (lo, hi) in enumerate(zip(starts, edges, strict=True)) if counts[i]}


def position_rows(samples: list[dict[str, Any]]) -> list[MetricRow]:
    """Token perplexity per position bucket over all documents (`subtask` `pos:<start>-<end>`, `context_len` the
    bucket's end), every token weighing the same."""
    totals: dict[tuple[int, int], list[float]] = {}
    for sample in samples:
        for label, (nll, tokens) in sample["positions"].items():
            lo, hi = map(int, label.split("-"))
            total = totals.setdefault((lo, hi), [0.0, 0])
            total[0] += nll
            total[1] += tokens
    return [MetricRow(subtask=f"pos:{lo}-{hi}", metric="token_ppl", value=math.exp(nll / tokens), n=int(tokens),
                      context_len=hi) for (lo, hi), (nll, tokens) in sorted(totals.items())]


# 10,000 characters is ~3K tokens of code: long for the reference model's 256-token context.
# Offline default: the held-out standard library; with --task-arg dataset=... a hub corpus without a loading script,
# e.g. CodeParrot's GitHub Python files (parquet): dataset=codeparrot/codeparrot-clean-valid split=train
# text_field=content.
TASKS.register("github")(PerplexityTask(name="github", version="1.2", corpus="code", min_chars=10_000))
# Books are long anyway; the filter only drops stray short files. PG-19's test split, its 100 evaluation books, from
# a parquet copy with deepmind/pg19's fields: deepmind/pg19 itself is script-based, which datasets >= 4 cannot load.
TASKS.register("pg19")(PerplexityTask(name="pg19", version="1.3", corpus="books", dataset="emozilla/pg19"))
