"""LongBench v2, compared with THUDM/LongBench at commit 2e00731 (pred.py, result.py, prompts/*.txt) on generated
cases: the filled templates against pred.py's replace chain, answer extraction against pred.py's extract_answer
(copied below as the reference), the head-plus-tail cut, and result.py's buckets."""

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
from unimem_bench.tasks.longbench.v2 import (
    TEMPLATE_0SHOT,
    TEMPLATE_0SHOT_COT,
    TEMPLATE_0SHOT_COT_ANS,
    extract_answer,
    fill,
    summarize,
)


def official_extract_answer(response):  # pred.py
    response = response.replace('*', '')
    match = re.search(r'The correct answer is \(([A-D])\)', response)
    if match:
        return match.group(1)
    match = re.search(r'The correct answer is ([A-D])', response)
    if match:
        return match.group(1)
    return None


def item(i: int, difficulty: str = "easy", length: str = "short") -> dict:
    """A generated LongBench v2 record."""
    return {"_id": f"id{i}", "domain": "Single-Document QA", "sub_domain": "story", "difficulty": difficulty,
            "length": length, "question": f" Which colour is ball {i}? ", "choice_A": " red", "choice_B": "blue ",
            "choice_C": "green", "choice_D": "black", "answer": "A",
            "context": f"  Ball {i} is red. " + "The day was long and the sun was warm. " * 40}


def test_templates_and_extraction_follow_pred_py():
    assert TEMPLATE_0SHOT.startswith("Please read the following text and answer the question below.\n\n<text>\n$DOC$")
    assert TEMPLATE_0SHOT.endswith('Format your response as follows: "The correct answer is (insert answer here)".')
    assert TEMPLATE_0SHOT_COT.endswith("(D) $C_D$\n\nLet’s think step by step:")
    assert "The text is too long and omitted here." in TEMPLATE_0SHOT_COT_ANS and "$COT$" in TEMPLATE_0SHOT_COT_ANS
    record = item(1)
    filled = fill(TEMPLATE_0SHOT, record)
    assert "<text>\nBall 1 is red." in filled and "question: Which colour is ball 1?\nChoices:\n(A) red\n(B) blue\n" \
        in filled
    rng = random.Random(0)
    parts = ["The correct answer is", "(A)", "(B)", "C", "**", "D)", "answer", "(", "E", "The correct answer is (D)"]
    for _ in range(500):
        response = " ".join(rng.choice(parts) for _ in range(rng.randint(0, 5)))
        assert extract_answer(response) == official_extract_answer(response)


def test_buckets_are_result_pys():
    samples = [{"difficulty": d, "length": n, "accuracy": a, "prompt_tokens": 10}
               for d, n, a in [("easy", "short", 1.0), ("hard", "short", 0.0), ("hard", "long", 1.0),
                               ("hard", "medium", 0.0)]]
    result = summarize(samples)
    assert result.metrics == {"accuracy": 50.0}
    assert {r.subtask: r.value for r in result.rows} == {"difficulty:easy": 100.0, "difficulty:hard": pytest.approx(
        100 / 3), "length:short": 50.0, "length:medium": 0.0, "length:long": 100.0}


@pytest.mark.parametrize("cot", [False, True])
def test_run_cuts_prompts_and_resumes(stories_dir, tmp_path, cot, one_thread):
    model = AutoModelForCausalLM.from_pretrained(stories_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(stories_dir)
    (tmp_path / "data.json").write_text(json.dumps([item(0), item(1, "hard", "long")]))
    task = configure([TASKS.get("longbench-v2")], [("", "cot", str(cot)), ("", "max_length", "200")])[0]
    options = TaskOptions(data_dir=tmp_path)
    task.check(options)
    log = SampleLog()
    with memory_lm(model) as lm:
        result = task.run(lm, tokenizer, options, log)
    assert result.n == 2
    for s in result.samples:
        assert s["prompt_tokens"] <= 202 and s["pred"] == extract_answer(s["prediction"])
        assert s["accuracy"] == float(s["pred"] == "A") and ("response_cot" in s) == cot
    assert task.run(NoGeneration(), tokenizer, options, log).samples == result.samples


def test_without_data_one_line_before_model_work(capsys, tmp_path, stories_dir, no_model_work):
    base = ["run", "--model", str(stories_dir), "--tasks", "longbench-v2", "--out", str(tmp_path / "out")]
    out = one_line_error(capsys, base)
    assert "THUDM/LongBench-v2" in out and "--data-dir" in out
    assert "data.json" in one_line_error(capsys, [*base, "--data-dir", str(tmp_path)])
