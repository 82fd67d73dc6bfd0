"""RULER's needle-in-a-haystack variants (Hsieh et al., 2024, arXiv 2404.06654; github.com/NVIDIA/RULER).

One task per variant of RULER's `synthetic.yaml` (`ruler_niah_single_1` ... `ruler_niah_multiquery`): needles
"One of the special magic {values} for {key} is: {value}." with keys and values drawn as words, 7-digit numbers or
UUIDs; the haystack is RULER's noise paragraph, the books of --data-dir where RULER uses essays (the noise when no
folder is given), or other needles. RULER's prompt and answer prefix; score = string_match_all, the fraction of
the expected values found in the generation (RULER reports it x 100).

Differences from RULER, each for a reason: the needle grid is lengths x depths (the depth places the first needle
whose value is asked for; the other needles sit at depths drawn from RULER's 40, as RULER places them all) so
results draw as heatmaps; words are adjective-noun pairs from a fixed 64 x 64 list (RULER draws from wonderwords'
lists, which this package does not ship); sentences are split after '.', '!' or '?' (RULER uses nltk's punkt,
which needs a download); keys of one prompt are distinct and distractor needles never reuse a real key (RULER
allows both; either makes the answer ambiguous). The haystack is the longest that keeps prompt + max_new_tokens
within the length.
"""

from __future__ import annotations

import random
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from unimem_bench.tasks.arguments import TaskArgError, arg, task_args
from unimem_bench.tasks.base import (
    TASKS,
    AccuracyHeadline,
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
    NOISE,
    cell_key,
    check_grid,
    haystack_source,
    haystack_text,
    resolve_lengths,
    string_match_all,
)
from unimem_bench.tasks.needle.niah import grid_result

Kind = Literal["words", "numbers", "uuids"]

NEEDLE = "One of the special magic {type_needle_v} for {key} is: {value}."
TEMPLATE = ("Some special magic {type_needle_v} are hidden within the following text. Make sure to memorize it. "
            "I will quiz you about the {type_needle_v} afterwards.\n{context}\nWhat are all the special magic "
            "{type_needle_v} for {query} mentioned in the provided text?")
ANSWER_PREFIX = " The special magic {type_needle_v} for {query} mentioned in the provided text are"
RULER_DEPTHS = sorted({round(i * 100 / 39) for i in range(40)})
"""RULER's needle depths in percent: np.round(np.linspace(0, 100, 40))."""

ADJECTIVES = (
    "able", "angry", "bitter", "black", "bold", "brave", "bright", "broad", "calm", "cheap", "clean", "clever",
    "cold", "cool", "curly", "damp", "dark", "deep", "dry", "dull", "eager", "early", "empty", "fair", "fancy",
    "fast", "fierce", "flat", "fresh", "gentle", "giant", "glad", "golden", "green", "happy", "heavy", "hollow",
    "huge", "jolly", "kind", "late", "lazy", "light", "little", "loud", "lucky", "mighty", "narrow", "noisy",
    "old", "plain", "proud", "quick", "quiet", "rapid", "rough", "round", "sharp", "shiny", "silent", "silly",
    "smooth", "soft", "sweet",
)
NOUNS = (
    "apple", "arrow", "badge", "basket", "beach", "bell", "bird", "blanket", "boat", "bottle", "bridge", "brush",
    "button", "candle", "castle", "chair", "cloud", "coat", "coin", "cookie", "crown", "desk", "door", "dragon",
    "drum", "engine", "feather", "field", "flower", "forest", "garden", "glove", "hammer", "harbor", "island",
    "jacket", "kettle", "ladder", "lamp", "lemon", "lion", "mirror", "monkey", "needle", "ocean", "orange",
    "pencil", "pillow", "planet", "pocket", "rabbit", "ribbon", "river", "rocket", "saddle", "shadow", "shell",
    "spoon", "tiger", "tower", "tunnel", "violin", "wagon", "window",
)
WORDS = tuple(sorted(f"{adj}-{noun}" for adj in ADJECTIVES for noun in NOUNS))
"""Needle words, RULER-style adjective-noun pairs (4,096)."""

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


@dataclass(frozen=True)
class Variant:
    """One of RULER's niah configurations."""

    haystack: Literal["noise", "essay", "needle"]
    """What surrounds the needles: the noise paragraph, prose (--data-dir's books), or distractor needles."""
    key_kind: Kind
    value_kind: Kind
    keys: int
    """Distinct keys, each with its own needles."""
    values: int
    """Needles (values) per key."""
    queries: int
    """Keys asked for; every value of each is expected."""


VARIANTS = {
    "single_1": Variant("noise", "words", "numbers", 1, 1, 1),
    "single_2": Variant("essay", "words", "numbers", 1, 1, 1),
    "single_3": Variant("essay", "words", "uuids", 1, 1, 1),
    "multikey_1": Variant("essay", "words", "numbers", 4, 1, 1),
    "multikey_2": Variant("needle", "words", "numbers", 1, 1, 1),
    "multikey_3": Variant("needle", "uuids", "uuids", 1, 1, 1),
    "multivalue": Variant("essay", "words", "numbers", 1, 4, 1),
    "multiquery": Variant("essay", "words", "numbers", 4, 1, 4),
}


def random_value(rng: random.Random, kind: Kind) -> str:
    """A key or value as RULER draws it: a word pair, a 7-digit number or a version-4 UUID."""
    if kind == "numbers":
        return str(rng.randint(10**6, 10**7 - 1))
    if kind == "words":
        return rng.choice(WORDS)
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


@dataclass(frozen=True)
class Needles:
    """The needles of one sample, in haystack order before placement, and what the prompt asks."""

    texts: list[str]
    keys: list[str]
    """Every key of the sample (distractor needles must avoid them)."""
    answers: list[str]
    query: str
    first_answer: int
    """Index in `texts` of the needle placed at the cell's depth."""


def draw_needles(variant: Variant, rng: random.Random) -> Needles:
    """RULER's generate_input_output, needle part: keys, values, shuffled needles, the queried keys."""
    n_keys = max(variant.keys, variant.queries)
    keys: list[str] = []
    while len(keys) < n_keys:
        key = random_value(rng, variant.key_kind)
        if key not in keys:
            keys.append(key)
    values = [[random_value(rng, variant.value_kind) for _ in range(variant.values)] for _ in keys]
    needles = [(k, NEEDLE.format(type_needle_v=variant.value_kind, key=key, value=value))
               for k, key in enumerate(keys) for value in values[k]]
    rng.shuffle(needles)
    asked = rng.sample(range(n_keys), variant.queries)
    query = ", ".join(keys[i] for i in asked[:-1]) + ", and " + keys[asked[-1]] if len(asked) > 1 else keys[asked[0]]
    first = next(i for i, (k, _) in enumerate(needles) if k in asked)
    return Needles(texts=[t for _, t in needles], keys=keys, answers=[v for i in asked for v in values[i]],
                   query=query, first_answer=first)


def distractors(variant: Variant, needles: Needles, rng: random.Random, n: int) -> list[str]:
    """The `needle` haystack: n needles with fresh keys and values (never a real key); the first n of a longer
    haystack are the same, so haystack lengths can be searched."""
    out: list[str] = []
    while len(out) < n:
        key = random_value(rng, variant.key_kind)
        value = random_value(rng, variant.value_kind)
        if key not in needles.keys:
            out.append(NEEDLE.format(type_needle_v=variant.value_kind, key=key, value=value))
    return out


def place(units: list[str], needles: list[tuple[float, str]], sep: str) -> str:
    """Insert each (depth, needle) before unit int(len(units) * depth) (depth 1 = after the last); ties keep order."""
    slots = sorted((int(len(units) * depth), i, text) for i, (depth, text) in enumerate(needles))
    out: list[str] = []
    last = 0
    for at, _, text in slots:
        out += units[last:at]
        out.append(text)
        last = at
    return sep.join(out + units[last:])


def prompt_text(variant: Variant, context: str, query: str) -> str:
    """RULER's template and answer prefix, made singular when one value is asked for (as RULER does)."""
    template, kind = TEMPLATE + ANSWER_PREFIX, str(variant.value_kind)
    if variant.queries * variant.values == 1:
        template = (template.replace("Some", "A").replace("are all", "is").replace("are", "is")
                    .replace("answers", "answer"))
        kind = kind[:-1]
    return template.format(type_needle_v=kind, context=context, query=query)


@dataclass(frozen=True)
class RulerNeedleTask(AccuracyHeadline):
    """One RULER niah variant over a length x depth grid, `samples` prompts per cell."""

    name: str
    version: str
    variant: str
    lengths: tuple[int, ...] = arg(())
    """Context lengths in tokens, prompt plus max_new_tokens (empty: 1/4, 1/2, 1, 2, 4 and 8 x the model's trained
    context, less those too short for the prompt)."""
    depths: tuple[float, ...] = arg(DEFAULT_DEPTHS)
    """Depth of the first needle asked for, 0 = start of the haystack, 1 = its end."""
    samples: int = arg(1)
    """Prompts per cell, each with its own keys and values."""
    max_new_tokens: int = arg(128)
    """Tokens generated per prompt (RULER's tokens_to_generate for niah)."""
    seed: int = arg(42)
    """Seed of the keys, values and placements (RULER's random_seed)."""
    query_mode: QueryMode = arg("query_agnostic")
    """`query_agnostic`: a compressing memory compresses the context before it sees the question; `query_aware`
    (kvpress' query_aware): every eviction also scores with the question's queries (the prompt after the context)."""

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise ValueError(f"unknown RULER niah variant {self.variant!r}: one of {', '.join(VARIANTS)}")
        check_grid(self.name, self.lengths, self.depths, self.max_new_tokens)
        if self.samples < 1:
            raise ValueError(f"{self.name}.samples {self.samples} must be >= 1")

    @property
    def spec(self) -> Variant:
        return VARIANTS[self.variant]

    def haystack(self, options: TaskOptions) -> str:
        """What surrounds the needles in this run."""
        if self.spec.haystack == "essay":
            return haystack_source(options.data_dir)
        return self.spec.haystack

    def check(self, options: TaskOptions) -> None:
        if self.spec.haystack == "essay":
            haystack_text(options.data_dir)

    def params(self, options: TaskOptions) -> dict[str, Any]:
        return {"variant": self.variant, "haystack": self.haystack(options), **task_args(self)}

    def run(self, lm: ScoringLM, tokenizer: Any, options: TaskOptions, log: SampleLog | None = None,
            progress: Callable[[int, int | None], None] | None = None) -> TaskResult:
        log = log if log is not None else SampleLog()
        lengths = resolve_lengths(self.lengths, lm.trained_context)
        builder = PromptBuilder(self, tokenizer, options, max(lengths))
        if not self.lengths:  # default lengths too short for the prompt are left out
            lengths = [n for n in lengths if all(builder.fits(n, 0.0, i, 0) for i in range(self.samples))] or lengths
        cells = [(length, float(depth)) for length in lengths for depth in self.depths]
        keys = [(length, depth, i, f"{cell_key(length, depth)}/sample={i}")
                for length, depth in cells for i in range(self.samples)]
        if progress is not None:
            progress(0, len(keys))
            progress(sum(log.get(key) is not None for *_, key in keys), None)

        def run_prompt(item: tuple[int, float, int, str]) -> dict[str, Any]:
            length, depth, i, key = item
            ids, needles, units = builder.build(length, depth, i)

            def found_all(gen: list[int], refs: list[str] = needles.answers) -> bool:
                return string_match_all(tokenizer.decode(gen), refs) == 1

            # The question: the template after the context (with the answer prefix), tokenised on its own.
            question = tokenizer(prompt_text(self.spec, "\0", needles.query).split("\0", 1)[1],
                                 add_special_tokens=False)["input_ids"]
            new = generate_at_once(lm, ids, max_new_tokens=self.max_new_tokens, eos_token_id=tokenizer.eos_token_id,
                                   stop=found_all, **question_kwargs(self.query_mode, question))
            text = tokenizer.decode(new, skip_special_tokens=True)
            return {"key": key, "context_len": length, "depth": depth, "sample": i, "prompt_tokens": len(ids),
                    "haystack_units": units, "query": needles.query, "answers": needles.answers,
                    "new_tokens": len(new), "generated": text, "accuracy": string_match_all(text, needles.answers),
                    "query_mode": self.query_mode}

        todo = [item for item in keys if log.get(item[3]) is None]
        for _, sample in map_samples(lm, run_prompt, todo):  # launched processes split the prompts
            log.add(sample["key"], sample)
            if progress is not None:
                progress(1, None)
        return grid_result([(length, depth, [log.sample(key) for ln, d, _, key in keys if (ln, d) == (length, depth)])
                            for length, depth in cells])


def first_words(text: str, n: int) -> list[str]:
    """The first n whitespace-separated words of `text` (all of them when it has fewer), splitting only as much
    of it as that takes."""
    chars = 16 * n  # English words average well under 16 characters with their spaces
    while True:
        words = text[:chars].split()
        if len(words) > n or chars >= len(text):  # more than n: the word cut at `chars` is not among the first n
            return words[:n]
        chars *= 2


class PromptBuilder:
    """Builds a cell's prompt ids: the largest haystack (in words, sentences or needles) that fits the length."""

    def __init__(self, task: RulerNeedleTask, tokenizer: Any, options: TaskOptions, max_length: int) -> None:
        self.task, self.variant, self.tokenizer = task, task.spec, tokenizer
        self.bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
        # Every word costs at least one token, so a prompt of max_length tokens holds fewer words than that.
        self.words = (first_words(haystack_text(options.data_dir), max_length)
                      if self.variant.haystack == "essay" and options.data_dir is not None else None)
        self.fitted: dict[tuple[int, int], int] = {}

    def rng(self, *parts: object) -> random.Random:
        """A generator seeded by the task's seed, its name and `parts` (string seeds hash the same everywhere)."""
        return random.Random("/".join(map(str, (self.task.seed, self.task.name, *parts))))

    def units(self, needles: Needles, sample: int, n: int) -> tuple[list[str], str]:
        """The first n haystack units and how they are joined."""
        if self.words is not None:
            words = [self.words[i % len(self.words)] for i in range(n)]  # the books again when they run out
            return [s for s in _SENTENCE_END.split(" ".join(words)) if s], " "
        if self.variant.haystack == "needle":
            return distractors(self.variant, needles, self.rng(sample, "haystack"), n), "\n"
        return [NOISE] * n, "\n"

    def text(self, length: int, depth: float, sample: int, n: int) -> tuple[str, Needles]:
        """The prompt with n haystack units, and its needles."""
        needles = draw_needles(self.variant, self.rng(sample))
        units, sep = self.units(needles, sample, n)
        others = self.rng(sample, length, depth).sample(RULER_DEPTHS, len(needles.texts) - 1)
        depths = [d / 100 for d in others]
        depths.insert(needles.first_answer, depth)
        context = place(units, list(zip(depths, needles.texts, strict=True)), sep)
        return prompt_text(self.variant, context, needles.query), needles

    def ids(self, length: int, depth: float, sample: int, n: int) -> tuple[list[int], Needles]:
        text, needles = self.text(length, depth, sample, n)
        return self.bos + self.tokenizer(text, add_special_tokens=False)["input_ids"], needles

    def fits(self, length: int, depth: float, sample: int, n: int) -> bool:
        return len(self.ids(length, depth, sample, n)[0]) + self.task.max_new_tokens <= length

    def build(self, length: int, depth: float, sample: int) -> tuple[list[int], Needles, int]:
        """(prompt ids, needles, haystack units) for one prompt of the cell."""
        if not self.fits(length, depth, sample, 0):
            raise TaskArgError(f"{self.task.name}.lengths {length}: the prompt without haystack and "
                               f"{self.task.max_new_tokens} new tokens do not fit; use longer lengths or a smaller "
                               f"max_new_tokens")
        n = self.fitted.get((length, sample))
        if n is None:
            # Fitted at the grid's first depth whichever prompt comes first, so that a prompt never depends on
            # which others this process built before it (sharded or resumed runs build the same prompts).
            first = float(self.task.depths[0])
            low, high = 0, 1  # fits(low), then doubling until high does not fit, then bisection
            while self.fits(length, first, sample, high):
                low, high = high, high * 2
            while high - low > 1:
                mid = (low + high) // 2
                low, high = (mid, high) if self.fits(length, first, sample, mid) else (low, mid)
            n = self.fitted[(length, sample)] = low
        while n > 0 and not self.fits(length, depth, sample, n):  # another depth may tokenise a token longer
            n -= 1
        ids, needles = self.ids(length, depth, sample, n)
        return ids, needles, n


def register_variants() -> None:
    """One task per variant, named as in RULER's synthetic.yaml with a `ruler_` prefix."""
    for variant in VARIANTS:
        name = f"ruler_niah_{variant}"
        TASKS.register(name)(RulerNeedleTask(name=name, version="1.1", variant=variant))


register_variants()
