"""Tasks scored per context length with several generated prompts per length (RULER's non-needle tasks, QA).

A task builds a prompt from a size `n` (haystack units: noise lines, words, documents) for (length, sample); the
largest `n` whose prompt plus `max_new_tokens` fits the length is found by doubling and bisection once per length
(sample 0, as RULER searches) and lowered per sample until it fits. The model generates greedily through its memory
and stops once the score can no longer change (every reference found for string_match_all, one for _part).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from statistics import fmean
from typing import Any, Literal

from unimem_bench.tasks.arguments import TaskArgError
from unimem_bench.tasks.base import (
    MetricRow,
    QueryMode,
    ScoringLM,
    TaskResult,
    generate_at_once,
    map_samples,
    question_kwargs,
)
from unimem_bench.tasks.needle.haystack import resolve_lengths, string_match_all
from unimem_bench.tasks.samples import encode, prompt_fields

Metric = Literal["string_match_all", "string_match_part"]


def string_match_part(prediction: str, references: Sequence[str]) -> float:
    """RULER's QA metric: 1 when any reference is in the prediction (case-insensitive), after RULER's
    postprocessing."""
    if not references:
        raise ValueError("string_match_part needs at least one reference")
    return float(any(string_match_all(prediction, [ref]) == 1 for ref in references))


METRICS: dict[str, Callable[[str, Sequence[str]], float]] = {
    "string_match_all": string_match_all, "string_match_part": string_match_part}


def after_context(template: str) -> str:
    """The fixed text a prompt template puts right after its `{context}` (up to its next field): where the
    question starts."""
    return template.split("{context}", 1)[1].split("{", 1)[0]


@dataclass(frozen=True)
class Built:
    """One prompt: its text, the references that score it and the haystack size used."""

    text: str
    answers: list[str]
    n: int
    question: str = ""
    """The prompt's question: its text from the last occurrence of the fitter's `question_start` on ("" without)."""


def sample_rng(seed: int, name: str, *parts: object) -> random.Random:
    """A generator seeded by the task's seed, name and `parts` (string seeds hash the same on every machine)."""
    return random.Random("/".join(map(str, (seed, name, *parts))))


class Fitter:
    """Finds the largest haystack size whose prompt fits a length; `make(length, sample, n)` builds the text.
    `question_start`: the text that starts each prompt's question (its last occurrence: few-shot examples come first),
    e.g. `after_context(template)`."""

    def __init__(self, name: str, tokenizer: Any, max_new_tokens: int,
                 make: Callable[[int, int, int], tuple[str, list[str]]], start: int = 1,
                 question_start: str = "") -> None:
        self.name, self.tokenizer, self.max_new_tokens, self.make = name, tokenizer, max_new_tokens, make
        self.start, self.question_start = start, question_start
        self.fitted: dict[int, int] = {}

    def ids(self, length: int, sample: int, n: int) -> tuple[list[int], list[str], str]:
        text, answers = self.make(length, sample, n)
        return encode(self.tokenizer, text), answers, text

    def fits(self, length: int, sample: int, n: int) -> bool:
        return len(self.ids(length, sample, n)[0]) + self.max_new_tokens <= length

    def require(self, length: int, sample: int = 0) -> None:
        """Raise a one-line TaskArgError when even the smallest prompt does not fit `length`."""
        if not self.fits(length, sample, self.start):
            smallest = len(self.ids(length, sample, self.start)[0])
            raise TaskArgError(f"{self.name}.lengths {length}: the smallest prompt ({smallest} tokens) and "
                               f"{self.max_new_tokens} new tokens do not fit; use lengths of at least "
                               f"{smallest + self.max_new_tokens}")

    def build(self, length: int, sample: int) -> tuple[list[int], Built]:
        self.require(length, sample)
        n = self.fitted.get(length)
        if n is None:
            # fits(low); double high until it does not fit, then bisect
            low, high = self.start, max(2 * self.start, self.start + 1)
            while self.fits(length, 0, high):
                low, high = high, high * 2
            while high - low > 1:
                mid = (low + high) // 2
                low, high = (mid, high) if self.fits(length, 0, mid) else (low, mid)
            n = self.fitted[length] = low
        while n > self.start and not self.fits(length, sample, n):
            n -= 1
        ids, answers, text = self.ids(length, sample, n)
        question = text[text.rindex(self.question_start):] if self.question_start else ""
        return ids, Built(text, answers, n, question)


def task_lengths(name: str, lengths: Sequence[int], trained_context: int, fitter: Fitter) -> list[int]:
    """The given lengths, or the default multiples of the trained context that can hold the smallest prompt."""
    resolved = resolve_lengths(lengths, trained_context)
    if lengths:  # every given length is checked before the first prompt runs
        for length in resolved:
            fitter.require(length)
        return resolved
    kept = [n for n in resolved if fitter.fits(n, 0, fitter.start)]
    if not kept:
        raise TaskArgError(f"{name}: no default length holds the prompt; give --task-arg {name}.lengths=...")
    return kept


def run_lengths(name: str, lm: ScoringLM, tokenizer: Any, fitter: Fitter, lengths: Sequence[int], samples: int,
                metric: Metric, log: Any, progress: Callable[[int, int | None], None] | None,
                query_mode: QueryMode = "query_agnostic") -> list[dict[str, Any]]:
    """Generate and score `samples` prompts per length, reusing those already in `log`; returns every record.
    `query_mode=query_aware` passes each prompt's question (`Fitter.question_start` on) to generation."""
    if query_mode == "query_aware" and not fitter.question_start:
        raise ValueError(f"{name}: query_aware needs the fitter's question_start")
    keys = [(length, i, f"L={length}/sample={i}") for length in lengths for i in range(samples)]
    if progress is not None:
        progress(0, len(keys))
        progress(sum(log.get(key) is not None for *_, key in keys), None)
    score = METRICS[metric]

    def run_prompt(item: tuple[int, int, str]) -> dict[str, Any]:
        length, i, key = item
        ids, built = fitter.build(length, i)

        def done(gen: list[int], refs: list[str] = built.answers) -> bool:
            return score(tokenizer.decode(gen), refs) == 1  # found text stays found: the score cannot change

        # The question tokenised on its own, as the other tasks' query_aware questions are.
        question = tokenizer(built.question, add_special_tokens=False)["input_ids"]
        new = generate_at_once(lm, ids, max_new_tokens=fitter.max_new_tokens, eos_token_id=tokenizer.eos_token_id,
                               stop=done, **question_kwargs(query_mode, question))
        prediction = tokenizer.decode(new, skip_special_tokens=True)
        return {"key": key, "context_len": length, "sample": i, **prompt_fields(ids), "haystack_units": built.n,
                "prediction": prediction, "answers": built.answers, "new_tokens": len(new), "metric": metric,
                "score": score(prediction, built.answers), "query_mode": query_mode}

    todo = [item for item in keys if log.get(item[2]) is None]
    for _, record in map_samples(lm, run_prompt, todo):  # launched processes split the prompts
        log.add(record["key"], record)
        if progress is not None:
            progress(1, None)
    return [log.get(key) for *_, key in keys]


def length_result(records: list[dict[str, Any]], metric_name: str = "accuracy") -> TaskResult:
    """Headline: the mean score over all prompts; a `length` row per context length."""
    lengths = sorted({r["context_len"] for r in records})
    rows = [MetricRow("length", metric_name, fmean(r["score"] for r in records if r["context_len"] == n),
                      sum(r["context_len"] == n for r in records), n) for n in lengths]
    return TaskResult(metrics={metric_name: fmean(r["score"] for r in records)}, samples=records, n=len(records),
                      context_len=max(lengths), rows=rows)
