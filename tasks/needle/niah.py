"""Needle in a Haystack, Greg Kamradt's protocol (github.com/gkamradt/LLMTest_NeedleInAHaystack).

A grid of context lengths x needle depths. Each cell's prompt is exactly `length - max_new_tokens` tokens: the
haystack (books from --data-dir, or RULER's noise) trimmed so that the template, needle and question fit, the needle
inserted `depth` of the way into the haystack tokens and moved back to the previous sentence end, the question
after it. The model generates greedily: a method without memory reads the whole cell at once (vanilla: full
attention, also past its trained context), a memory method streams the prompt through its segments and memory;
a cell scores 1 when the needle's answer appears in the generated text (case-insensitive, whitespace normalised;
no LLM judge). Generation stops once the answer has appeared: later tokens cannot change the score.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from unimem_bench.tasks.arguments import TaskArgError, arg, task_args
from unimem_bench.tasks.base import (
    TASKS,
    AccuracyHeadline,
    MetricRow,
    QueryMode,
    SampleLog,
    ScoringLM,
    TaskOptions,
    TaskResult,
    generate_at_once,
    map_samples,
    question_kwargs,
)
from unimem_bench.tasks.needle.haystack import (
    DEFAULT_DEPTHS,
    SentenceEnds,
    cell_key,
    check_grid,
    depth_label,
    haystack_ids,
    haystack_source,
    haystack_text,
    insert_needle,
    normalize,
    resolve_lengths,
    substring_match,
)


@dataclass(frozen=True)
class Needle:
    """A needle, the question that asks for it, the answer that scores, and the prompt around the haystack."""

    needle: str
    """The sentence hidden in the haystack."""
    question: str
    """What the prompt asks after the haystack."""
    answer: str
    """The text whose presence in the generation scores the cell."""
    template: str
    """The prompt: `{context}` (haystack with the needle) and `{question}` are filled in."""


PRESETS = {
    # Kamradt's needle and question; the prompt is his base-model (Anthropic completion) one, which ends with an
    # answer cue so that a model without a chat template continues with the sentence it found.
    "sandwich": Needle(
        needle="\nThe best thing to do in San Francisco is eat a sandwich and sit in Dolores Park on a sunny day.\n",
        question="What is the best thing to do in San Francisco?",
        answer="eat a sandwich and sit in Dolores Park on a sunny day",
        template="You are a helpful AI bot that answers questions for a user. Keep your response short and direct.\n\n"
                 "{context}\n\n{question} Don't give information outside the document or repeat your findings.\n\n"
                 "Here is the most relevant sentence in the context:"),
    # For story models (TinyStories) that cannot follow instructions: a cloze the model completes by copying from
    # the needle. The name is one stories260K copies from a needle but never writes without it (control=true: 0 of
    # 24 cells, books and noise, 64-512 tokens), so a hit means the model read the needle.
    "story": Needle(
        needle=" The dog's name was Sparky.",
        question="The dog's name was",
        answer="Sparky",
        template="{context}\n\n{question}"),
}


@dataclass(frozen=True)
class NeedleTask(AccuracyHeadline):
    """Single-needle retrieval over a length x depth grid."""

    name: str
    version: str
    lengths: tuple[int, ...] = arg(())
    """Context lengths in tokens, prompt plus max_new_tokens (empty: 1/4, 1/2, 1, 2, 4 and 8 x the model's trained
    context, less those too short for the prompt)."""
    depths: tuple[float, ...] = arg(DEFAULT_DEPTHS)
    """Needle depths, 0 = start of the haystack, 1 = its end."""
    max_new_tokens: int = arg(48)
    """Tokens generated per cell (the sandwich answer is 30 tokens with a 512-token vocabulary)."""
    preset: Literal["sandwich", "story"] = arg("sandwich")
    """The needle, question, answer and template: Kamradt's San Francisco needle, or a cloze for story models."""
    needle: str = arg("")
    """The needle sentence ("" = the preset's)."""
    question: str = arg("")
    """The question asking for it ("" = the preset's)."""
    answer: str = arg("")
    """The text whose presence in the generation scores the cell ("" = the preset's)."""
    template: str = arg("")
    """The prompt with {context} and {question} ("" = the preset's)."""
    skip_chars: int = arg(0)
    """Characters dropped from the start of the haystack text (a book's title page and table of contents, which
    have no sentence end to place the needle after)."""
    control: bool = arg(False)
    """Leave the needle out: how often the answer comes without it (a guessable answer scores here)."""
    query_mode: QueryMode = arg("query_agnostic")
    """`query_agnostic`: a compressing memory compresses the context before it sees the question; `query_aware`
    (kvpress' query_aware): every eviction also scores with the question's queries (the prompt after the context)."""

    def __post_init__(self) -> None:
        check_grid(self.name, self.lengths, self.depths, self.max_new_tokens)
        if self.skip_chars < 0:
            raise ValueError(f"{self.name}.skip_chars {self.skip_chars} must be >= 0")
        spec = self.spec
        for field in ("{context}", "{question}"):
            if spec.template.count(field) != 1:
                raise ValueError(f"{self.name}.template must contain {field} exactly once")
        if not normalize(spec.answer):
            raise ValueError(f"{self.name}.answer is empty")
        if normalize(spec.answer) not in normalize(spec.needle):
            raise ValueError(f"{self.name}: the answer {spec.answer!r} is not in the needle {spec.needle!r}")
        # A model that echoes the prompt must not score: only the needle may hold the answer.
        for field in ("question", "template"):
            if normalize(spec.answer) in normalize(getattr(spec, field)):
                raise ValueError(f"{self.name}: the answer {spec.answer!r} appears in the {field}; only the needle "
                                 f"may hold it")

    @property
    def spec(self) -> Needle:
        """The preset with the needle, question, answer or template given as arguments put in."""
        base = PRESETS[self.preset]
        return Needle(needle=self.needle or base.needle, question=self.question or base.question,
                      answer=self.answer or base.answer, template=self.template or base.template)

    def check(self, options: TaskOptions) -> None:
        text = haystack_text(options.data_dir)
        if self.skip_chars and not text[self.skip_chars:].strip():
            raise TaskArgError(f"{self.name}.skip_chars {self.skip_chars} skips the whole haystack "
                               f"({len(text)} characters)")

    def params(self, options: TaskOptions) -> dict[str, Any]:
        return {"haystack": haystack_source(options.data_dir), **task_args(self)}

    def run(self, lm: ScoringLM, tokenizer: Any, options: TaskOptions, log: SampleLog | None = None,
            progress: Callable[[int, int | None], None] | None = None) -> TaskResult:
        log = log if log is not None else SampleLog()
        spec = self.spec
        prompt = PromptParts(tokenizer, spec, needle=not self.control)
        shortest = prompt.fixed + self.max_new_tokens
        lengths = resolve_lengths(self.lengths, lm.trained_context)
        too_short = [length for length in lengths if length < shortest]
        if too_short and (self.lengths or len(too_short) == len(lengths)):
            raise TaskArgError(f"{self.name}.lengths {','.join(map(str, too_short))}: the prompt without haystack is "
                               f"{prompt.fixed} tokens plus {self.max_new_tokens} new ones; use lengths of at "
                               f"least {shortest}")
        lengths = [length for length in lengths if length >= shortest]  # default lengths too short are left out
        hay_budget = {length: length - shortest for length in lengths}
        cells = [(length, float(depth)) for length in lengths for depth in self.depths]
        if progress is not None:
            progress(0, len(cells))
            progress(sum(log.get(cell_key(*cell)) is not None for cell in cells), None)
        haystack = haystack_ids(tokenizer, haystack_text(options.data_dir)[self.skip_chars:],
                                max(hay_budget.values()))
        ends = SentenceEnds(tokenizer)

        def run_cell(cell: tuple[int, float]) -> dict[str, Any]:
            length, depth = cell
            context, at = insert_needle(haystack[:hay_budget[length]], prompt.needle, depth, ends)
            ids = prompt.build(context)
            new = generate_at_once(lm, ids, max_new_tokens=self.max_new_tokens, eos_token_id=tokenizer.eos_token_id,
                                   stop=lambda gen: substring_match(spec.answer, tokenizer.decode(gen)),
                                   **question_kwargs(self.query_mode, prompt.after))
            generated = tokenizer.decode(new, skip_special_tokens=True)
            return {"key": cell_key(length, depth), "context_len": length, "depth": depth, "prompt_tokens": len(ids),
                    "haystack_tokens": hay_budget[length], "needle_at": prompt.offset + at,
                    "needle_depth": at / hay_budget[length] if hay_budget[length] else 0.0,
                    "new_tokens": len(new), "generated": generated, "query_mode": self.query_mode,
                    "accuracy": float(substring_match(spec.answer, generated))}

        todo = [cell for cell in cells if log.get(cell_key(*cell)) is None]
        for _, sample in map_samples(lm, run_cell, todo):  # launched processes split the cells
            log.add(sample["key"], sample)
            if progress is not None:
                progress(1, None)
        return grid_result([(length, depth, [log.sample(cell_key(length, depth))]) for length, depth in cells])


class PromptParts:
    """The template's token ids around the haystack: BOS + before + haystack-with-needle + after."""

    def __init__(self, tokenizer: Any, spec: Needle, *, needle: bool = True) -> None:
        before, after = spec.template.replace("{question}", spec.question).split("{context}")

        def encode(text: str) -> list[int]:
            return tokenizer(text, add_special_tokens=False)["input_ids"] if text else []

        bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
        self.before, self.after = bos + encode(before), encode(after)
        self.needle = encode(spec.needle) if needle else []
        self.offset = len(self.before)
        self.fixed = len(self.before) + len(self.needle) + len(self.after)
        """Prompt tokens besides the haystack."""

    def build(self, context: list[int]) -> list[int]:
        return [*self.before, *context, *self.after]


def grid_result(cells: list[tuple[int, float, list[dict[str, Any]]]], metric: str = "accuracy") -> TaskResult:
    """From (length, depth, samples) per cell: one leaderboard row per cell (its samples' mean `metric`) and the
    mean over all samples as the headline."""
    samples = [s for _, _, group in cells for s in group]
    rows = [MetricRow(subtask=depth_label(depth), metric=metric, value=sum(s[metric] for s in group) / len(group),
                      n=len(group), context_len=length) for length, depth, group in cells]
    return TaskResult(metrics={metric: sum(s[metric] for s in samples) / len(samples)}, samples=samples,
                      n=len(samples), context_len=max(length for length, _, _ in cells), rows=rows)


# Kamradt's protocol with his needle by default; `preset=story` for TinyStories-class models.
TASKS.register("niah")(NeedleTask(name="niah", version="1.1"))
