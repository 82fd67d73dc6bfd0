"""Passkey retrieval (Mohtashami & Jaggi, 2023, arXiv 2305.16300), the test of the position-interpolation paper
(Chen et al., 2023, arXiv 2306.15595, section 3.3).

The prompt is the landmark-attention repository's `generate_prompt` (epfml/landmark-attention, run_test.py): the task
description, a prefix of the garbage text ("The grass is green. ... There and back again." repeated, joined by
spaces, cut to a number of characters), the information line "The pass key is K. Remember it. K is the pass key.",
the garbage again (its first characters) and "What is the pass key? The pass key is", joined by newlines. Here the
garbage is as long as fits the cell's length (prompt plus max_new_tokens) and the prefix holds `depth` of it
(landmark draws the split at random; a grid of depths draws as a heatmap like NIAH). The passkey has `digits`
digits (5: the brief's and most reproductions' choice; landmark draws 1-50,000). A prompt scores 1 when the first
integer of the generation is the passkey (landmark's `re.search(r'\\d+', response)`).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from statistics import fmean
from typing import Any

from unimem_bench.tasks.arguments import arg, task_args
from unimem_bench.tasks.base import (
    TASKS,
    AccuracyHeadline,
    MetricRow,
    SampleLog,
    ScoringLM,
    TaskOptions,
    TaskResult,
    generate_at_once,
    map_samples,
)
from unimem_bench.tasks.needle.haystack import DEFAULT_DEPTHS, cell_key, check_grid, resolve_lengths
from unimem_bench.tasks.needle.lengths import Fitter, sample_rng
from unimem_bench.tasks.needle.niah import grid_result
from unimem_bench.tasks.samples import prompt_fields

TASK_DESCRIPTION = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
                    "I will quiz you about the important information there.")
GARBAGE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
INFORMATION = "The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "What is the pass key? The pass key is"


def garbage(n_chars: int) -> str:
    """The first n_chars characters of the garbage sentence repeated and joined by spaces (landmark's garbage_inf)."""
    copies = n_chars // (len(GARBAGE) + 1) + 1
    return " ".join([GARBAGE] * copies)[:n_chars]


def passkey_prompt(n_garbage: int, depth: float, key: str) -> str:
    """Landmark's prompt with n_garbage characters of garbage, int(n_garbage * depth) of them before the key."""
    prefix = int(n_garbage * depth)
    return "\n".join([TASK_DESCRIPTION, garbage(prefix), INFORMATION.format(key=key), garbage(n_garbage - prefix),
                      QUESTION])


def first_integer(text: str) -> str | None:
    match = re.search(r"\d+", text)
    return match.group() if match else None


def integer_ended(tokenizer: Any, generated: list[int]) -> bool:
    """The generation holds an integer followed by something else: later tokens cannot change the score."""
    text = tokenizer.decode(generated)
    return first_integer(text) is not None and not text.rstrip().endswith(tuple("0123456789"))


def passkey_score(prediction: str, key: str) -> float:
    """1 when the first integer in the prediction is the passkey."""
    return float(first_integer(prediction) == key)


@dataclass(frozen=True)
class PasskeyTask(AccuracyHeadline):
    """Passkey retrieval over a length x depth grid, `samples` passkeys per cell."""

    name: str
    version: str
    lengths: tuple[int, ...] = arg(())
    """Context lengths in tokens, prompt plus max_new_tokens (empty: 1/4, 1/2, 1, 2, 4 and 8 x the model's trained
    context)."""
    depths: tuple[float, ...] = arg(DEFAULT_DEPTHS)
    """Where the passkey sits: the fraction of the garbage before it."""
    samples: int = arg(5)
    """Passkeys per cell."""
    digits: int = arg(5)
    """Digits of the passkey (no leading zero)."""
    max_new_tokens: int = arg(10)
    """Tokens generated per prompt (landmark's test generates 10)."""
    seed: int = arg(42)
    """Seed of the passkeys."""

    def __post_init__(self) -> None:
        check_grid(self.name, self.lengths, self.depths, self.max_new_tokens)
        if self.samples < 1 or not 1 <= self.digits <= 30:
            raise ValueError(f"{self.name}: samples must be >= 1 and digits between 1 and 30")

    def check(self, options: TaskOptions) -> None:
        """Generated offline: nothing to check."""

    def params(self, options: TaskOptions) -> dict[str, Any]:
        return task_args(self)

    def key(self, length: int, depth: float, sample: int) -> str:
        return str(sample_rng(self.seed, self.name, length, depth, sample).randint(10 ** (self.digits - 1),
                                                                                  10 ** self.digits - 1))

    def run(self, lm: ScoringLM, tokenizer: Any, options: TaskOptions, log: SampleLog | None = None,
            progress: Callable[[int, int | None], None] | None = None) -> TaskResult:
        log = log if log is not None else SampleLog()
        def builder(depth: float) -> Callable[[int, int, int], tuple[str, list[str]]]:
            def build(length: int, sample: int, n: int) -> tuple[str, list[str]]:
                key = self.key(length, depth, sample)
                return passkey_prompt(n, depth, key), [key]
            return build

        fitters = {depth: Fitter(self.name, tokenizer, self.max_new_tokens, builder(depth), start=0)
                   for depth in map(float, self.depths)}
        lengths = resolve_lengths(self.lengths, lm.trained_context)
        if not self.lengths:  # default lengths too short for the prompt are left out
            lengths = [n for n in lengths if fitters[float(self.depths[0])].fits(n, 0, 0)] or lengths
        for fitter in fitters.values():  # checked before the first prompt runs
            for length in lengths:
                fitter.require(length)
        cells = [(length, float(depth)) for length in lengths for depth in self.depths]
        keys = [(length, depth, i, f"{cell_key(length, depth)}/sample={i}")
                for length, depth in cells for i in range(self.samples)]
        if progress is not None:
            progress(0, len(keys))
            progress(sum(log.get(key) is not None for *_, key in keys), None)

        def run_prompt(item: tuple[int, float, int, str]) -> dict[str, Any]:
            length, depth, i, key = item
            ids, built = fitters[depth].build(length, i)
            passkey = built.answers[0]
            new = generate_at_once(lm, ids, max_new_tokens=self.max_new_tokens,
                              eos_token_id=tokenizer.eos_token_id, stop=lambda gen: integer_ended(tokenizer, gen))
            prediction = tokenizer.decode(new, skip_special_tokens=True)
            return {"key": key, "context_len": length, "depth": depth, "sample": i, **prompt_fields(ids),
                    "garbage_chars": built.n, "prediction": prediction, "answers": [passkey], "new_tokens": len(new),
                    "accuracy": passkey_score(prediction, passkey)}

        todo = [item for item in keys if log.get(item[3]) is None]
        for _, sample in map_samples(lm, run_prompt, todo):  # launched processes split the prompts
            log.add(sample["key"], sample)
            if progress is not None:
                progress(1, None)
        result = grid_result([(length, depth, [log.done[key] for ln, d, _, key in keys if (ln, d) == (length, depth)])
                              for length, depth in cells])
        for length in lengths:  # the heatmap reads the depth=<d> cells; a row per length beside them
            group = [s for s in result.samples if s["context_len"] == length]
            result.rows.append(MetricRow("length", "accuracy", fmean(s["accuracy"] for s in group), len(group), length))
        return result


TASKS.register("passkey")(PasskeyTask(name="passkey", version="1.0"))
