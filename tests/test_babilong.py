"""BABILong, compared with booydar/babilong at commit 7a6efee on generated cases: the prompt assembly and the answer
check against babilong/prompts.py's get_formatted_input and babilong/metrics.py's compare_answers (copied below as
references), and the synthetic generator's answers against an independent bAbI solver of the facts it wrote."""

from __future__ import annotations

import json
import random
import re

import pytest
from helpers import one_line_error
from task_helpers import NoGeneration, memory_lm
from transformers import AutoModelForCausalLM, AutoTokenizer

from unimem_bench.tasks import TASKS, SampleLog, TaskOptions
from unimem_bench.tasks.arguments import configure
from unimem_bench.tasks.babilong.prompts import DEFAULT_PROMPTS, TASK_LABELS, compare_answers, task_prompt
from unimem_bench.tasks.babilong.synthetic import OPPOSITE, make_facts, noisy_context
from unimem_bench.tasks.babilong.task import default_splits


def official_formatted_input(context, question, examples, instruction, post_prompt):  # babilong/prompts.py
    template = ("{instruction}\n\n{examples}\n\n{post_prompt}" + "\n\n"
                + "<context>\n{context}\n</context>\n\nQuestion: {question}")
    return template.format(instruction=instruction, examples=examples, post_prompt=post_prompt,
                           context=context.strip(), question=question).strip()


def official_compare_answers(target, output, question, task_labels):  # babilong/metrics.py
    output = output.lower()
    output = output.split('.')[0]
    output = output.split('<context>')[0]
    output = output.split('<example>')[0]
    output = output.split('Question')[0]
    target = target.lower()
    task_labels = {label.lower() for label in task_labels}
    labels_in_question = {label for label in task_labels if label in question.lower()}
    labels_in_output = {label for label in task_labels if label in output}
    labels_in_output = labels_in_output - labels_in_question
    if ',' in target and len(target) > 3:
        subtargets = target.split(',')
        num_subtargets = len(subtargets)
        if all([t in labels_in_output for t in subtargets]) and len(labels_in_output) == num_subtargets:
            return True
    else:
        if target in labels_in_output and len(labels_in_output) == 1:
            return True
    return False


def test_prompts_and_check_agree_with_babilong_on_generated_cases():
    assert DEFAULT_PROMPTS["qa1"]["instruction"].startswith("I will give you context with the facts about positions "
                                                            "of different persons hidden in some random text")
    assert TASK_LABELS["qa5"] == ["Bill", "Fred", "Jeff", "Mary", "apple", "football", "milk"]
    rng = random.Random(0)
    for task in DEFAULT_PROMPTS:
        spec = DEFAULT_PROMPTS[task]
        assert task_prompt(task, " ctx. ", "Q?") == official_formatted_input(" ctx. ", "Q?", spec["examples"],
                                                                             spec["instruction"], spec["post_prompt"])
        words = [*TASK_LABELS[task], "the", "is", "in", ".", "Question", "<example>", "Answer:"]
        for _ in range(200):
            output = " ".join(rng.choice(words) for _ in range(rng.randint(0, 7)))
            target = rng.choice(TASK_LABELS[task])
            question = f"Where is {rng.choice(TASK_LABELS[task])}?"
            assert compare_answers(target, output, question, TASK_LABELS[task]) == official_compare_answers(
                target, output, question, TASK_LABELS[task])


def solve(task: str, facts: list[str], question: str) -> str:
    """An independent reading of bAbI facts: simulate the people and objects, then answer."""
    where: dict[str, str] = {}
    holder: dict[str, str | None] = {}
    history: dict[str, list[str]] = {}
    place: dict[str, str] = {}
    relations = []
    gave = []
    for fact in facts:
        if m := re.fullmatch(r"(\w+) (?:went to|journeyed to|travelled to|moved to|went back to) the (\w+)\.", fact):
            where[m[1]] = m[2]
            for thing, who in holder.items():
                if who == m[1]:
                    place[thing] = m[2]
                    history[thing].append(m[2])
        elif m := re.fullmatch(r"(\w+) (?:got|grabbed|picked up|took) the (\w+) there\.", fact):
            holder[m[2]] = m[1]
            place[m[2]] = where.get(m[1], "")
            history[m[2]] = [where.get(m[1], "")]
        elif m := re.fullmatch(r"(\w+) (?:dropped|discarded|put down|left) the (\w+)\.", fact):
            holder[m[2]] = None
        elif m := re.fullmatch(r"The (\w+) is (\w+) of the (\w+)\.", fact):
            relations.append((m[1], m[2], m[3]))
        elif m := re.fullmatch(r"(\w+) gave the (\w+) to (\w+)\.", fact):
            gave.append((m[1], m[2], m[3]))
    if task == "qa1":
        return where[re.fullmatch(r"Where is (\w+)\?", question)[1]]
    if task == "qa2":
        return place[re.fullmatch(r"Where is the (\w+)\?", question)[1]]
    if task == "qa3":
        thing, last = re.fullmatch(r"Where was the (\w+) before the (\w+)\?", question).groups()
        trail = history[thing]
        return trail[len(trail) - 1 - trail[::-1].index(last) - 1]
    if task == "qa4":
        if m := re.fullmatch(r"What is (\w+) of the (\w+)\?", question):
            return next(a for a, d, b in relations if d == m[1] and b == m[2])
        m = re.fullmatch(r"What is the (\w+) (\w+) of\?", question)
        return next(b for a, d, b in relations if a == m[1] and d == m[2]) if any(
            a == m[1] and d == m[2] for a, d, b in relations) else next(
            a for a, d, b in relations if b == m[1] and d == OPPOSITE[m[2]])
    giver, thing, taker = gave[0]
    return {f"Who did {giver} give the {thing} to?": taker, f"Who gave the {thing}?": giver,
            f"Who received the {thing}?": taker, f"What did {giver} give to {taker}?": thing}[question]


@pytest.mark.parametrize("task", list(DEFAULT_PROMPTS))
def test_generated_facts_imply_their_answers(task):
    for seed in range(200):
        facts, question, answer = make_facts(task, random.Random(f"{task}/{seed}"))
        assert solve(task, facts, question) == answer
        assert answer in TASK_LABELS[task] and answer.lower() not in question.lower()


@pytest.fixture(scope="module")
def stories(stories_dir):
    return AutoModelForCausalLM.from_pretrained(stories_dir).eval(), AutoTokenizer.from_pretrained(stories_dir)


def test_facts_are_scattered_in_order_through_the_books(stories, books_dir):
    from unimem_bench.tasks.babilong.synthetic import _SENTENCE_END
    from unimem_bench.tasks.needle.haystack import haystack_text

    _, tokenizer = stories
    sentences = [s for s in _SENTENCE_END.split(haystack_text(books_dir)[:200_000]) if len(s.split()) >= 3]
    facts, _, _ = make_facts("qa2", random.Random(1))
    context = noisy_context(facts, sentences, tokenizer, 600, random.Random(2))
    positions = [context.index(f) for f in facts]
    assert positions == sorted(positions)
    assert 600 <= len(tokenizer(context, add_special_tokens=False)["input_ids"]) <= 660
    assert noisy_context(facts, sentences, tokenizer, 0, random.Random(2)) == " ".join(facts)


def test_synthetic_run_resume_and_official_files(stories, books_dir, tmp_path, one_thread):
    model, tokenizer = stories
    task = configure([TASKS.get("babilong-synthetic")], [("", "lengths", "0,300"), ("", "samples", "2"),
                                                        ("", "tasks", "qa1,qa4")])[0]
    options = TaskOptions(data_dir=books_dir)
    log = SampleLog()
    with memory_lm(model, "transformer_xl") as lm:
        result = task.run(lm, tokenizer, options, log)
    assert result.n == 8
    for s in result.samples:
        assert s["accuracy"] == compare_answers(s["answers"][0], s["prediction"], s["question"],
                                                TASK_LABELS[s["task"]])
    assert {(r.subtask, r.context_len) for r in result.rows} == {(t, n) for t in ("qa1", "qa4", "length")
                                                                 for n in (0, 300)}
    assert task.run(NoGeneration(), tokenizer, options, log).samples == result.samples
    # The official task reads files in create_tasks.py's layout; written here from generated samples.
    for t in ("qa1", "qa4"):
        (tmp_path / t).mkdir()
        rows = [{"input": " ".join(f), "question": q, "target": a}
                for f, q, a in (make_facts(t, random.Random(i)) for i in range(2))]
        (tmp_path / t / "0k.json").write_text(json.dumps(rows))
    official = configure([TASKS.get("babilong")], [("", "lengths", "0k"), ("", "tasks", "qa1,qa4")])[0]
    official.check(TaskOptions(data_dir=tmp_path))
    with memory_lm(model) as lm:
        got = official.run(lm, tokenizer, TaskOptions(data_dir=tmp_path))
    assert got.n == 4 and {s["split"] for s in got.samples} == {"0k"}
    assert default_splits(512) == ("0k", "1k", "2k", "4k")


def test_without_data_one_line_before_model_work(capsys, tmp_path, stories_dir, no_model_work):
    base = ["run", "--model", str(stories_dir), "--out", str(tmp_path / "out")]
    out = one_line_error(capsys, [*base, "--tasks", "babilong"])
    assert "RMT-team/babilong" in out and "--data-dir" in out
    out = one_line_error(capsys, [*base, "--tasks", "babilong", "--data-dir", str(tmp_path)])
    assert "qa1/0k.json" in out
    out = one_line_error(capsys, [*base, "--tasks", "babilong-synthetic"])
    assert "--data-dir" in out
