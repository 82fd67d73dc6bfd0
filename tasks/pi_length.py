"""Perplexity against evaluation length: the paper's position-interpolation comparison (its 64K experiment).

The same documents are cut to each length (1x, 2x, 4x ... up to 32x the model's trained context by default) and
scored whole. How a method reads a length-L document is the comparison:

* methods without memory read all L tokens at once: `vanilla` is full attention at the model's own positions (its
  perplexity rises past the trained context), `position_interpolation` is full attention with linear position
  interpolation at factor L / trained length (transformers' `linear` RoPE);
* memory methods stream the document in their segments, carrying memory, as in every other task.

Per length (context_len = L) two leaderboard rows: token_ppl over the whole document, and tail_token_ppl over its
second half, positions [L/2, L): the tokens that only this length reaches, where reading past the trained context
shows undiluted by the document's start. The headline rows are the longest length.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from unimem_bench.tasks.arguments import arg, task_args
from unimem_bench.tasks.base import TASKS, MetricRow, SampleLog, ScoringLM, TaskOptions, TaskResult
from unimem_bench.tasks.data.corpora import read_stdlib_documents, read_text_dir
from unimem_bench.tasks.perplexity import CODE_SUFFIXES, encode_document


@contextmanager
def reading_length(lm: ScoringLM, length: int) -> Iterator[ScoringLM]:
    """`lm` as it reads a `length`-token document: memoryless methods widen their local context to the length."""
    widen = getattr(lm, "reading_at_once", None)
    if widen is None:
        raise TypeError("the pi-length task needs the engine's MemoryLM (it widens memoryless methods' context)")
    if lm.config.has_memory:
        yield lm
        return
    with widen(length):  # changes `lm` in place, so a wrapper (sharded evaluation) keeps wrapping it
        yield lm


@dataclass(frozen=True)
class LengthTask:
    """Token perplexity of the same documents cut to increasing lengths."""

    name: str
    version: str
    multiples: tuple[int, ...] = arg((1, 2, 4, 8, 16, 32))
    """Evaluation lengths as multiples of the model's trained context (32x of 2K is the paper's 64K)."""
    lengths: tuple[int, ...] = arg(())
    """Explicit evaluation lengths in tokens; overrides `multiples` when given."""
    min_chars: int = arg(10_000)
    """Documents shorter than this many characters are skipped before tokenising."""
    headline: str = "token_ppl"

    @property
    def higher_is_better(self) -> dict[str, bool]:
        return {"token_ppl": False, "tail_token_ppl": False}

    def __post_init__(self) -> None:
        chosen = self.lengths or self.multiples
        if not chosen or min(chosen) < 1:
            raise ValueError(f"{self.name}: lengths / multiples must be positive (got {chosen})")

    def resolve_lengths(self, trained_context: int) -> list[int]:
        return sorted(set(self.lengths or [m * trained_context for m in self.multiples]))

    def documents(self, options: TaskOptions) -> list[tuple[str, str]]:
        if options.data_dir is not None:
            docs = read_text_dir(Path(options.data_dir), suffixes=(".txt", *CODE_SUFFIXES), strip_pg_header=True)
        else:
            docs = read_stdlib_documents("heldout", min_chars=self.min_chars)
        docs = [(i, t) for i, t in docs if len(t) >= self.min_chars]
        if not docs:
            raise FileNotFoundError(f"task {self.name!r} found no document of at least {self.min_chars} characters "
                                    f"in {options.data_dir or 'the standard library'}")
        return docs

    def check(self, options: TaskOptions) -> None:
        self.documents(options)

    def params(self, options: TaskOptions) -> dict[str, Any]:
        return {"data": str(options.data_dir) if options.data_dir else "stdlib-heldout", "max_docs": options.max_docs,
                **task_args(self)}

    def run(self, lm: ScoringLM, tokenizer: Any, options: TaskOptions, log: SampleLog | None = None,
            progress: Callable[[int, int | None], None] | None = None) -> TaskResult:
        log = log if log is not None else SampleLog()
        lengths = self.resolve_lengths(lm.trained_context)
        longest = lengths[-1]
        # Only documents that reach the longest length: every length scores the same documents.
        encoded = []
        for doc_id, text in self.documents(options):
            ids, _ = encode_document(tokenizer, text, longest)
            if len(ids) == longest:
                encoded.append((doc_id, ids))
            if options.max_docs and len(encoded) == options.max_docs:
                break
        if not encoded:
            raise FileNotFoundError(f"task {self.name!r}: no document reaches {longest} tokens; lower the lengths "
                                    "(--task-arg lengths=...) or give longer documents with --data-dir")
        if progress is not None:
            progress(0, len(encoded) * sum(lengths))
        samples, rows = [], []
        for length in lengths:
            keys = [f"{doc_id}@{length}" for doc_id, _ in encoded]
            todo = [(key, ids[:length]) for key, (_, ids) in zip(keys, encoded, strict=True) if log.get(key) is None]
            if progress is not None:
                progress((len(encoded) - len(todo)) * length, None)
            if todo:
                with reading_length(lm, length) as view:
                    for key, ids in todo:
                        nll = view.score([ids])[0].double()  # nll[i] scores token i + 1
                        tail = nll[length // 2 - 1:]
                        log.add(key, {"doc_id": key.rpartition("@")[0], "length": length, "tokens": len(nll),
                                      "nll": float(nll.sum()), "tail_tokens": len(tail), "tail_nll": float(tail.sum()),
                                      "read_at_once": view.segment_len})
                        if progress is not None:
                            progress(length, None)
            done = [log.get(key) for key in keys]
            samples.extend(done)
            for metric, nll_key, count_key in (("token_ppl", "nll", "tokens"), ("tail_token_ppl", "tail_nll",
                                                                                 "tail_tokens")):
                count = sum(s[count_key] for s in done)
                rows.append(MetricRow(subtask="", metric=metric, n=count, context_len=length,
                                      value=math.exp(sum(s[nll_key] for s in done) / count)))
        headline = {r.metric: r for r in rows if r.context_len == longest}
        return TaskResult(metrics={m: r.value for m, r in headline.items()}, samples=samples,
                          n=headline["token_ppl"].n, context_len=longest,
                          rows=[r for r in rows if r.context_len != longest])


TASKS.register("pi-length")(LengthTask(name="pi-length", version="1.0"))
