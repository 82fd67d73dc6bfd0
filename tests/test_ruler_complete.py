"""RULER's vt, cwe, fwe, qa_1/qa_2 and the `ruler` group, compared with NVIDIA/RULER at commit c3f5e3b
(scripts/data/synthetic/{variable_tracking,common_words_extraction,freq_words_extraction,qa,constants}.py,
scripts/eval/synthetic/constants.py) on generated cases: the templates and generation lengths as constants.py has them,
the metrics against RULER's own string_match_all / string_match_part (copied below as the reference), and each
generator's answer recomputed from the prompt text it wrote."""

from __future__ import annotations

import json
import random
import re
from collections import Counter
from math import pi

import pytest
from helpers import one_line_error
from task_helpers import NoGeneration, memory_lm
from transformers import AutoTokenizer

from unimem_bench.tasks import TASKS, SampleLog, TaskOptions
from unimem_bench.tasks.arguments import configure
from unimem_bench.tasks.needle.haystack import string_match_all
from unimem_bench.tasks.needle.lengths import Fitter, string_match_part
from unimem_bench.tasks.needle.ruler_group import summarize
from unimem_bench.tasks.needle.ruler_qa import load_qa, qa_text, read_hotpotqa, read_squad
from unimem_bench.tasks.needle.ruler_synthetic import TEMPLATES, TOKENS_TO_GENERATE, fwe_text, fwe_vocabulary, zeta


def ruler_string_match_part(preds, refs):  # RULER's scripts/eval/synthetic/constants.py, verbatim
    score = sum([max([1.0 if r.lower() in pred.lower() else 0.0 for r in ref])
                 for pred, ref in zip(preds, refs, strict=True)]) / len(preds) * 100
    return round(score, 2)


def ruler_string_match_all(preds, refs):  # RULER's scripts/eval/synthetic/constants.py, verbatim
    score = sum([sum([1.0 if r.lower() in pred.lower() else 0.0 for r in ref]) / len(ref)
                 for pred, ref in zip(preds, refs, strict=True)]) / len(preds) * 100
    return round(score, 2)


@pytest.fixture(scope="module")
def tokenizer(request):
    return AutoTokenizer.from_pretrained(request.getfixturevalue("stories_dir"))


def task(name: str, **args):
    return configure([TASKS.get(name)], [("", k, str(v)) for k, v in args.items()])[0]


def test_templates_and_generation_lengths_are_rulers():
    assert TEMPLATES["vt"][0].startswith("Memorize and track the chain(s) of variable assignment hidden in the "
                                         "following text.\n\n{context}\nQuestion: Find all variables that are "
                                         "assigned the value {query} in the text above.")
    assert TEMPLATES["vt"][1].endswith("{num_v} variables are assigned the value {query}, they are: ")
    assert TEMPLATES["cwe"][1] == " Answer: The top 10 words that appear most often in the list are:"
    assert TEMPLATES["fwe"][1] == (" Answer: According to the coded text above, the three most frequently appeared "
                                   "words are:")
    assert TOKENS_TO_GENERATE == {"vt": 30, "cwe": 120, "fwe": 50}
    assert TASKS.get("ruler_qa_1").max_new_tokens == 32


def test_metrics_agree_with_rulers_on_generated_cases():
    rng = random.Random(0)
    words = ["alpha", "Beta", "GAMMA", "delta", "12345", "x-y"]
    for _ in range(300):
        refs = rng.sample(words, rng.randint(1, 4))
        pred = " ".join(rng.choice(words + ["noise", "beta"]) for _ in range(rng.randint(0, 6)))
        assert 100 * string_match_all(pred, refs) == pytest.approx(ruler_string_match_all([pred], [refs]), abs=0.01)
        assert 100 * string_match_part(pred, refs) == ruler_string_match_part([pred], [refs])


def chains_of(text: str) -> dict[str, str]:
    return dict(re.findall(r"VAR (\w+) = (VAR \w+|\d+)", text))


def resolve(assignments: dict[str, str], name: str) -> str:
    value = assignments[name]
    return resolve(assignments, value[4:]) if value.startswith("VAR ") else value


def test_vt_answers_are_every_variable_holding_the_queried_value(tokenizer):
    t = task("ruler_vt", fewshot_tokens=1000)  # this tokenizer's smallest example is 545 tokens (RULER caps 500)
    fitter = t.fitter(tokenizer)
    ids, built = fitter.build(9000, 0)
    assert len(ids) + 30 <= 9000 < len(fitter.ids(9000, 0, built.n + 1)[0]) + 30
    example, question = built.text.split("\nMemorize and track", 1)  # the in-context example comes first
    assert example.startswith("Memorize and track") and len(example.split()[-1]) == 3
    value = re.search(r"assigned the value (\d+) in the text above", question).group(1)
    assignments = chains_of(question)
    assert sorted(n for n in assignments if resolve(assignments, n) == value) == sorted(built.answers)
    assert len(built.answers) == 5 and all(re.fullmatch(r"[A-Z]{5}", a) for a in built.answers)
    assert "12345" not in built.text  # the example's value is randomised, as randomize_icl does
    small = t.fitter(tokenizer).build(1100, 0)[1]
    assert small.text.startswith("Memorize and track the chain(s)") and small.text.count("Memorize") == 1


def numbered(text: str) -> list[str]:
    return re.findall(r"\d+\. ([\w-]+)", text)


@pytest.mark.parametrize("length", [2000, 5000])
def test_cwe_answers_are_the_ten_most_common_words_of_the_list(tokenizer, length):
    ids, built = task("ruler_cwe").fitter(tokenizer).build(length, 1)
    *shots, question = built.text.split("Below is a numbered list")
    assert len(shots) == 2  # one few-shot example (and the empty text before it)
    listed = numbered(question.split("\nQuestion:")[0])
    counts = Counter(listed)
    top = [w for w, _ in counts.most_common(10)]
    assert sorted(top) == sorted(built.answers)
    assert min(counts[w] for w in top) == (6 if length < 4096 else 30)  # RULER's short and standard settings
    assert max(c for w, c in counts.items() if w not in top) == (1 if length < 4096 else 3)


def test_fwe_answers_are_the_three_most_frequent_coded_words():
    assert zeta(2.0) == pytest.approx(pi ** 2 / 6, abs=1e-12)
    vocab = fwe_vocabulary(random.Random(1), 42, 40, 6)
    text, answers = fwe_text(vocab, 42, 500, 2.0)
    words = text.split("frequently appeared coded words. ")[1].split("\nQuestion:")[0].split()
    counts = Counter(w for w in words if w != "...")
    assert [w for w, _ in counts.most_common(3)] == answers
    assert Counter(words).most_common(1)[0][0] == "..."  # rank 1 is noise
    assert counts[answers[0]] == int(500 * 2 ** -2 / zeta(2.0))


def squad_fixture() -> dict:
    """A generated SQuAD 2.0-format file: two articles, one unanswerable question."""
    def para(i: int, impossible: bool = False) -> dict:
        return {"context": f"Paragraph {i} says the river number {i} is long.",
                "qas": [{"question": f"Which river is {i}?", "is_impossible": impossible,
                         "answers": [] if impossible else [{"text": f"river number {i}"}]}]}
    return {"data": [{"paragraphs": [para(1), para(2), para(3, True)]}, {"paragraphs": [para(4), para(5)]}]}


def test_qa_readers_and_prompts_follow_rulers_qa_py(tmp_path, tokenizer):
    qa = read_squad(squad_fixture())
    assert len(qa.docs) == 5 and len(qa.questions) == 4  # the unanswerable question is dropped
    first = qa.questions[0]
    assert qa.docs[first["context"][0]].startswith("Paragraph 1") and len(first["more_context"]) == 2
    text, answers = qa_text(qa, 0, 3, random.Random(0), 42)
    assert answers == ["river number 1"] and text.count("Document ") == 3 and "Paragraph 1 says" in text
    assert {f"Paragraph {i}" for i in (1, 2, 3)} <= set(re.findall(r"Paragraph \d", text))  # same article first
    assert text.endswith("Question: Which river is 1? Answer:")
    hotpot = read_hotpotqa([{"question": "Q?", "answer": "A", "context": [["T1", ["s1. ", "s2."]], ["T2", ["s3."]]]}])
    assert hotpot.docs == ["T1\ns1. s2.", "T2\ns3."] and hotpot.questions[0]["context"] == [0, 1]
    (tmp_path / "squad.json").write_text(json.dumps(squad_fixture()))
    assert load_qa("squad", tmp_path).questions == qa.questions
    fitter = Fitter("qa", tokenizer, 32, lambda n, s, k: qa_text(qa, s, k, random.Random(s), 42), start=1)
    ids, built = fitter.build(400, 1)
    assert len(ids) + 32 <= 400 and built.answers == ["river number 2"]


def test_group_averages_tasks_per_length_and_names_what_it_averaged():
    samples = [{"task": t, "context_len": n, "score": s} for t, n, s in
               [("vt", 1000, 1.0), ("vt", 2000, 0.0), ("cwe", 1000, 0.5), ("cwe", 2000, 0.5)]]
    samples += [{"task": "niah_single_1", "context_len": n, "accuracy": a} for n, a in [(1000, 1.0), (2000, 1.0)]]
    result = summarize(samples, with_qa=False)
    assert result.metrics == {"avg11-synthetic": pytest.approx((250 / 3 + 150 / 3) / 2)}
    per_length = {r.context_len: r.value for r in result.rows if r.subtask == "avg11-synthetic"}
    assert per_length == {1000: pytest.approx(250 / 3), 2000: pytest.approx(50)}
    assert set(summarize(samples, with_qa=True).metrics) == {"avg13"}
    group = TASKS.get("ruler")
    assert group.headline == "avg13" and task("ruler", qa="off").headline == "avg11-synthetic"
    assert len(group.tasks(512, with_qa=True)) == 13 and len(group.tasks(512, with_qa=False)) == 11


def test_group_without_qa_data_warns_in_one_line_and_runs_the_eleven(capsys, books_dir):
    group = task("ruler", samples=3)
    group.check(TaskOptions(data_dir=books_dir))
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "avg11-synthetic" in err and "squad.json" in err and "qa=off" in err
    assert group.headline == "avg11-synthetic" and len(group.params(TaskOptions(data_dir=books_dir))["tasks"]) == 11
    assert task("ruler", samples=3).headline == "avg13"  # a fresh copy has not looked for the data yet
    task("ruler", qa="off").check(TaskOptions(data_dir=books_dir))
    assert capsys.readouterr().err == ""


def test_qa_without_data_fails_in_one_line_before_model_work(capsys, tmp_path, stories_dir, books_dir, no_model_work):
    base = ["run", "--model", str(stories_dir), "--out", str(tmp_path / "out")]
    out = one_line_error(capsys, [*base, "--tasks", "ruler_qa_1"])
    assert "rajpurkar/squad_v2" in out and "squad.json" in out
    out = one_line_error(capsys, [*base, "--tasks", "ruler_qa_2", "--data-dir", str(books_dir)])
    assert "hotpotqa.json" in out
    out = one_line_error(capsys, [*base, "--tasks", "ruler", "--data-dir", str(books_dir), "--task-arg", "qa=on"])
    assert "squad.json" in out


def test_fwe_runs_scores_and_resumes(tokenizer, stories_dir, one_thread):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(stories_dir).eval()
    t = task("ruler_fwe", lengths="600,900", samples=2, max_new_tokens=4)
    log = SampleLog()
    with memory_lm(model, "transformer_xl") as lm:
        result = t.run(lm, tokenizer, TaskOptions(), log)
    assert result.n == 4 and [(r.subtask, r.context_len, r.n) for r in result.rows] == [("length", 600, 2),
                                                                                         ("length", 900, 2)]
    for s in result.samples:
        assert s["score"] == string_match_all(s["prediction"], s["answers"]) and s["prompt_tokens"] + 4 <= 900
        assert re.fullmatch(r"[0-9a-f]{16}", s["prompt_hash"]) and s["new_tokens"] <= 4
    again = t.run(NoGeneration(), tokenizer, TaskOptions(), log)  # every sample from the log: the model is never asked
    assert again.samples == result.samples


@pytest.mark.slow  # about 30 s on 2 cores: 11 tasks' prompts fitted and generated at 2,600 characters
def test_group_end_to_end_on_a_tiny_random_model(tmp_path, capsys, books_dir, one_thread):
    """The CLI runs the 11 synthetic tasks on a tiny random LLaMA (character tokenizer) and records the honest
    headline, a row per task and the per-length average."""
    import pandas as pd
    from helpers import save_tiny_model

    from unimem_bench.harness.cli import app as cli

    model = save_tiny_model(tmp_path / "tiny", context=4096)
    argv = ["run", "--model", str(model), "--methods", "vanilla", "--tasks", "ruler", "--data-dir", str(books_dir),
            "--out", str(tmp_path / "out"), "--task-arg", "lengths=2600", "--task-arg", "samples=1",
            "--task-arg", "depths=0.5", "--task-arg", "fewshot_tokens=0"]
    assert cli.main(argv) == 0
    assert "avg11-synthetic" in capsys.readouterr().err
    board = pd.read_csv(tmp_path / "out" / "leaderboard.csv", keep_default_na=False)
    head = board[board["headline"].astype(str) == "True"]
    assert list(head["metric"]) == ["avg11-synthetic"] and list(head["task"]) == ["ruler"]
    rows = board[(board["subtask"] != "") & (board["metric"] == "score")]
    assert len(rows) == 12 and set(rows["context_len"]) == {2600}
    assert float(head["value"].iloc[0]) == pytest.approx(rows[rows["subtask"] != "avg11-synthetic"]["value"].mean())
