"""`babilong-synthetic`: BABILong-style samples generated here, so the benchmark's recipe runs offline on any books.

BABILong hides bAbI task facts in PG-19 text. This task generates bAbI-style facts for qa1-qa5 (single, two and
three supporting facts; two- and three-argument relations) with bAbI's vocabulary (BABILong's TASK_LABELS: six
rooms, Mary/John/Daniel/Sandra and Bill/Fred/Jeff/Mary, apple/football/milk) and scatters them, in order, between
sentences of the --data-dir books (BABILong's NoiseInjectionDataset: background sentences from a random place in the
text until the context holds `length` tokens with the facts, facts at sorted random sentence gaps). Prompts, 20 new
tokens and the answer check are BABILong's own (tasks/babilong/prompts.py). These are not BABILong's samples: the
facts come from this generator, not from bAbI's data, so scores compare methods here, not with published numbers.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from unimem_bench.tasks.arguments import arg, task_args
from unimem_bench.tasks.babilong.prompts import TASKS as QA_TASKS
from unimem_bench.tasks.babilong.task import predict, summarize
from unimem_bench.tasks.base import TASKS, AccuracyHeadline, SampleLog, ScoringLM, TaskOptions, TaskResult, map_samples
from unimem_bench.tasks.data.hub import DataNotFoundError
from unimem_bench.tasks.needle.haystack import haystack_text
from unimem_bench.tasks.needle.lengths import sample_rng

PEOPLE = ("Mary", "John", "Daniel", "Sandra")
GIVERS = ("Bill", "Fred", "Jeff", "Mary")
ROOMS = ("bathroom", "bedroom", "garden", "hallway", "kitchen", "office")
OBJECTS = ("apple", "football", "milk")
MOVES = ("went to", "journeyed to", "travelled to", "moved to", "went back to")
GRABS = ("got", "grabbed", "picked up", "took")
DROPS = ("dropped", "discarded", "put down", "left")
OPPOSITE = {"north": "south", "south": "north", "east": "west", "west": "east"}
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def move(rng: random.Random, who: str, room: str) -> str:
    return f"{who} {rng.choice(MOVES)} the {room}."


def distract(rng: random.Random, facts: list[str], others: tuple[str, ...], n: int) -> list[str]:
    """The facts with n moves of other people inserted at random places (order of the facts kept)."""
    out = list(facts)
    for _ in range(n):
        out.insert(rng.randint(0, len(out)), move(rng, rng.choice(others), rng.choice(ROOMS)))
    return out


def rooms(rng: random.Random, n: int) -> list[str]:
    """n rooms, each different from the one before."""
    out = [rng.choice(ROOMS)]
    while len(out) < n:
        out.append(rng.choice([r for r in ROOMS if r != out[-1]]))
    return out


def make_facts(task: str, rng: random.Random) -> tuple[list[str], str, str]:
    """(facts, question, answer) of one bAbI-style sample."""
    person = rng.choice(PEOPLE)
    others = tuple(p for p in PEOPLE if p != person)
    thing = rng.choice(OBJECTS)
    if task == "qa1":  # the latest of a person's moves
        path = rooms(rng, rng.randint(1, 3))
        facts = distract(rng, [move(rng, person, r) for r in path], others, rng.randint(1, 4))
        return facts, f"Where is {person}?", path[-1]
    if task == "qa2":  # where the object is: with its carrier, or where it was dropped
        a, b, c = rooms(rng, 3)
        dropped = rng.random() < 0.5
        chain = [move(rng, person, a), f"{person} {rng.choice(GRABS)} the {thing} there.", move(rng, person, b)]
        if dropped:
            chain += [f"{person} {rng.choice(DROPS)} the {thing}.", move(rng, person, c)]
        return distract(rng, chain, others, rng.randint(1, 4)), f"Where is the {thing}?", b
    if task == "qa3":  # where the object was before its last room
        a, b, c = rooms(rng, 3)
        chain = [move(rng, person, a), f"{person} {rng.choice(GRABS)} the {thing} there.", move(rng, person, b),
                 move(rng, person, c)]
        return distract(rng, chain, others, rng.randint(1, 4)), f"Where was the {thing} before the {c}?", b
    if task == "qa4":  # two-argument relations between rooms
        centre, first, second = rng.sample(ROOMS, 3)
        way = rng.choice(tuple(OPPOSITE))
        facts = [f"The {first} is {way} of the {centre}.", f"The {second} is {OPPOSITE[way]} of the {centre}."]
        rng.shuffle(facts)
        if rng.random() < 0.5:
            return facts, f"What is {way} of the {centre}?", first
        return facts, f"What is the {centre} {way} of?", second
    giver, taker = rng.sample(GIVERS, 2)  # qa5: three-argument relations (who gave what to whom)
    bystander = rng.choice([p for p in GIVERS if p not in (giver, taker)])
    facts = [f"{giver} picked up the {thing} there.", f"{giver} gave the {thing} to {taker}.",
             move(rng, bystander, rng.choice(ROOMS))]
    kind = rng.randrange(4)
    if kind == 0:
        return facts, f"Who did {giver} give the {thing} to?", taker
    if kind == 1:
        return facts, f"Who gave the {thing}?", giver
    if kind == 2:
        return facts, f"Who received the {thing}?", taker
    return facts, f"What did {giver} give to {taker}?", thing


def noisy_context(facts: list[str], sentences: list[str], tokenizer: Any, length: int, rng: random.Random) -> str:
    """NoiseInjectionDataset's sample: background sentences from a random start until `length` tokens with the
    facts, the facts at sorted random gaps between them."""
    if length <= 0:
        return " ".join(facts)
    budget = length - sum(len(tokenizer(" " + f, add_special_tokens=False)["input_ids"]) for f in facts)
    background: list[str] = []
    at = rng.randrange(len(sentences))
    while budget > 0:
        sentence = sentences[at % len(sentences)]
        ids = tokenizer(" " + sentence, add_special_tokens=False)["input_ids"]
        if len(ids) > budget:  # the last sentence is cut to the budget, as the official sampler cuts its tokens
            sentence = tokenizer.decode(ids[:budget]).strip()
        background.append(sentence)
        budget -= len(ids)
        at += 1
    gaps = sorted(rng.choice(range(len(background) + 1)) for _ in facts)
    slots: list[list[str]] = [[] for _ in range(len(background) + 1)]
    for fact, gap in zip(facts, gaps, strict=True):
        slots[gap].append(fact)
    out: list[str] = []
    for i, slot in enumerate(slots):
        out += slot
        if i < len(background):
            out.append(background[i])
    return " ".join(out)


@dataclass(frozen=True)
class BabilongSynthetic(AccuracyHeadline):
    """Generated bAbI-style qa1-qa5 facts in the --data-dir books, at context lengths in tokens."""

    name: str
    version: str
    tasks: tuple[str, ...] = arg(QA_TASKS)
    """Which of qa1 ... qa5 to generate."""
    lengths: tuple[int, ...] = arg(())
    """Context lengths in tokens of book text with the facts, before the prompt (0 = the facts alone; empty: 0 and
    1/2, 1, 2, 4 x the model's trained context)."""
    samples: int = arg(10)
    """Samples per task and length."""
    seed: int = arg(42)
    """Seed of the facts, the background's start and the fact positions."""

    def __post_init__(self) -> None:
        if not self.tasks or any(t not in QA_TASKS for t in self.tasks):
            raise ValueError(f"{self.name}.tasks: choose from {', '.join(QA_TASKS)}")
        if any(n < 0 for n in self.lengths) or self.samples < 1:
            raise ValueError(f"{self.name}: lengths must be >= 0 and samples >= 1")

    def check(self, options: TaskOptions) -> None:
        if options.data_dir is None:
            raise DataNotFoundError(f"task {self.name!r} hides its facts in books: pass --data-dir DIR with .txt "
                                    f"books (e.g. ../shared/data/books)")
        haystack_text(options.data_dir)

    def params(self, options: TaskOptions) -> dict[str, Any]:
        return {"haystack": str(options.data_dir), **task_args(self)}

    def run(self, lm: ScoringLM, tokenizer: Any, options: TaskOptions, log: SampleLog | None = None,
            progress: Callable[[int, int | None], None] | None = None) -> TaskResult:
        log = log if log is not None else SampleLog()
        lengths = self.lengths or (0, *(int(f * lm.trained_context) for f in (0.5, 1, 2, 4)))
        assert options.data_dir is not None, "check() requires --data-dir"
        sentences = [s for s in _SENTENCE_END.split(haystack_text(options.data_dir)) if len(s.split()) >= 3]
        keys = [(t, n, i, f"{t}/L={n}/sample={i}") for t in self.tasks for n in lengths for i in range(self.samples)]
        if progress is not None:
            progress(0, len(keys))
            progress(sum(log.get(k[-1]) is not None for k in keys), None)

        def run_prompt(item: tuple[str, int, int, str]) -> dict[str, Any]:
            task, length, i, key = item
            rng = sample_rng(self.seed, self.name, task, length, i)
            facts, question, answer = make_facts(task, rng)
            context = noisy_context(facts, sentences, tokenizer, length, rng)
            return {"key": key, "task": task, "context_len": length, "sample": i, "facts": facts,
                    **predict(lm, tokenizer, task, context, question, answer)}

        todo = [item for item in keys if log.get(item[-1]) is None]
        for _, sample in map_samples(lm, run_prompt, todo):  # launched processes split the prompts
            log.add(sample["key"], sample)
            if progress is not None:
                progress(1, None)
        return summarize([log.done[k[-1]] for k in keys])


TASKS.register("babilong-synthetic")(BabilongSynthetic(name="babilong-synthetic", version="1.0"))
