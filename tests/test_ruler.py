"""RULER's niah variants: deterministic prompts, needles present exactly as configured, fitted lengths, scoring."""

from __future__ import annotations

import random
import re

import pytest
from transformers import AutoTokenizer

from unimem_bench.methods import METHODS, MemoryLM, MethodContext
from unimem_bench.tasks import TASKS, SampleLog, TaskOptions
from unimem_bench.tasks.arguments import configure
from unimem_bench.tasks.needle.haystack import NOISE, string_match_all
from unimem_bench.tasks.needle.ruler import NEEDLE, VARIANTS, WORDS, PromptBuilder, draw_needles, place

NEEDLE_PREFIX = NEEDLE.split("{")[0]  # "One of the special magic "


@pytest.fixture(scope="module")
def tokenizer(request):
    return AutoTokenizer.from_pretrained(request.getfixturevalue("stories_dir"))


def ruler(variant: str, **args):
    return configure([TASKS.get(f"ruler_niah_{variant}")], [("", k, v) for k, v in args.items()])[0]


def test_every_variant_is_registered_with_a_version():
    for variant in VARIANTS:
        task = TASKS.get(f"ruler_niah_{variant}")
        assert task.variant == variant and task.version and task.headline == "accuracy"


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_prompts_are_deterministic_and_hold_each_needle_exactly_once(tokenizer, books_dir, variant):
    task = ruler(variant, max_new_tokens=16)
    spec = VARIANTS[variant]
    builder = PromptBuilder(task, tokenizer, TaskOptions(data_dir=books_dir), 1000)
    ids, needles, n = builder.build(600, 0.5, 0)
    again = PromptBuilder(task, tokenizer, TaskOptions(data_dir=books_dir), 1000).build(600, 0.5, 0)
    assert again == (ids, needles, n)
    other_seed = PromptBuilder(ruler(variant, max_new_tokens=16, seed=7), tokenizer, TaskOptions(data_dir=books_dir),
                               1000)
    assert other_seed.build(600, 0.5, 0)[1].answers != needles.answers
    text, _ = builder.text(600, 0.5, 0, n)
    assert len(needles.texts) == max(spec.keys, spec.queries) * spec.values
    assert len(needles.answers) == spec.queries * spec.values
    for needle in needles.texts:
        assert text.count(needle) == 1
    for answer in needles.answers:
        assert text.count(answer) == 1
    for key in needles.keys:
        assert text.count(f" for {key} is: ") == spec.values
    if spec.haystack != "needle":
        assert text.count(NEEDLE_PREFIX) == len(needles.texts)
    else:
        assert text.count(NEEDLE_PREFIX) == len(needles.texts) + n
    singular = spec.queries * spec.values == 1
    assert text.startswith("A special magic " if singular else "Some special magic ")
    assert text.endswith(f"for {needles.query} mentioned in the provided text {'is' if singular else 'are'}")
    if spec.key_kind == "words":
        assert all(key in WORDS for key in needles.keys)
    if spec.value_kind == "numbers":
        assert all(re.fullmatch(r"[1-9]\d{6}", a) for a in needles.answers)
    if spec.value_kind == "uuids":
        assert all(re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}", a)
                   for a in needles.answers)


@pytest.mark.parametrize("variant", ["single_1", "single_2", "multikey_3"])
def test_the_haystack_is_the_longest_that_fits(tokenizer, books_dir, variant):
    task = ruler(variant, max_new_tokens=20)
    builder = PromptBuilder(task, tokenizer, TaskOptions(data_dir=books_dir), 1000)
    for length in (450, 900):
        ids, _, n = builder.build(length, 0.25, 1)
        assert len(ids) + 20 <= length < len(builder.ids(length, 0.25, 1, n + 1)[0]) + 20
        assert ids[0] == tokenizer.bos_token_id


@pytest.mark.parametrize("depth", [0.0, 0.4, 1.0])
def test_the_asked_needle_sits_at_the_cells_depth(tokenizer, depth):
    builder = PromptBuilder(ruler("single_1"), tokenizer, TaskOptions(), 600)
    _, needles, n = builder.build(600, depth, 0)
    lines = builder.text(600, depth, 0, n)[0].split("\n")[1:-1]  # between the instruction and the question
    assert len(lines) == n + 1 and lines.count(NOISE) == n
    assert lines.index(needles.texts[0]) == int(n * depth)


def test_place_inserts_at_depths_in_order():
    units = ["a", "b", "c", "d"]
    assert place(units, [(0.5, "X"), (0.0, "Y"), (1.0, "Z"), (0.5, "W")], " ") == "Y a b X W c d Z"


def test_keys_of_a_prompt_are_distinct_and_asked_keys_hold_the_answers():
    for seed in range(50):
        needles = draw_needles(VARIANTS["multiquery"], random.Random(seed))
        asked = needles.query.replace(", and ", ", ").split(", ")
        assert len(set(needles.keys)) == 4 and len(asked) == 4 and set(asked) == set(needles.keys)

        def owner(text: str, keys: list[str] = needles.keys) -> str:
            return next(k for k in keys if f" for {k} is:" in text)

        assert [a for key in asked for a in needles.answers if any(
            t.endswith(f" {a}.") and owner(t) == key for t in needles.texts)] == needles.answers
        assert owner(needles.texts[needles.first_answer]) in asked
        assert not any(owner(t) in asked for t in needles.texts[:needles.first_answer])
    single = draw_needles(VARIANTS["multikey_1"], random.Random(3))
    assert len(single.texts) == 4 and len(single.answers) == 1
    assert single.texts[single.first_answer].endswith(f" {single.answers[0]}.")


class CountingLM:
    """The real model; counts generate calls."""

    def __init__(self, lm) -> None:
        self.lm, self.calls = lm, 0
        self.segment_len, self.trained_context = lm.segment_len, lm.trained_context

    def generate(self, prompt, **kwargs):
        self.calls += 1
        return self.lm.generate(prompt, **kwargs)


def test_run_scores_string_match_all_and_resumes(tokenizer, stories_dir, books_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(stories_dir).eval()
    config = METHODS.get("vanilla").config(MethodContext(n_layers=5, segment_len=256, trained_context=512))
    task = ruler("multivalue", lengths="420,460", depths="0,1", samples=2, max_new_tokens=6)
    options = TaskOptions(data_dir=books_dir)
    log = SampleLog()
    with MemoryLM(model, config, segment_len=256, trained_context=512) as lm:
        result = task.run(lm, tokenizer, options, log)
        assert len(result.samples) == 8 and result.n == 8
        for sample in result.samples:
            assert len(sample["answers"]) == 4
            assert sample["accuracy"] == string_match_all(sample["generated"], sample["answers"])
            assert sample["prompt_tokens"] + 6 <= sample["context_len"]
        assert [(r.subtask, r.context_len, r.n) for r in result.rows] == [
            ("depth=0.0", 420, 2), ("depth=1.0", 420, 2), ("depth=0.0", 460, 2), ("depth=1.0", 460, 2)]
        counting = CountingLM(lm)
        again = task.run(counting, tokenizer, options, log)
    assert counting.calls == 0 and again.samples == result.samples and again.metrics == result.metrics
    params = task.params(options)
    assert params["variant"] == "multivalue" and params["haystack"] == str(books_dir) and params["samples"] == 2
    assert ruler("single_1").params(options)["haystack"] == "noise"
    assert ruler("single_2").params(TaskOptions())["haystack"] == "noise"
