"""InfiniteBench, compared with OpenBMB/InfiniteBench at commit 88b3daa on generated cases: the synthetic generators
against data/construct_synthetic_dataset.py's rules (re-implemented below from it with the random draws as
arguments), prompts against src/prompt.py's yarn-mistral templates and src/eval_utils.py's create_prompt, and the
scorers against src/compute_scores.py's (copied below as references)."""

from __future__ import annotations

import json
import random
import re
import string

import pytest
from helpers import one_line_error
from task_helpers import NoGeneration, memory_lm
from transformers import AutoModelForCausalLM, AutoTokenizer

from unimem_bench.tasks import TASKS, SampleLog, TaskOptions
from unimem_bench.tasks.arguments import configure
from unimem_bench.tasks.infinitebench import metrics
from unimem_bench.tasks.infinitebench.prompts import MAX_NEW_TOKENS, create_prompt, get_answer
from unimem_bench.tasks.infinitebench.synthetic import kv_example, noise_example, number_string_key


def official_first_int_match(prediction):  # compute_scores.py
    pred_list = re.split("[^0-9]", prediction)
    pred_value = ""
    for item in pred_list:
        if item != "":
            pred_value = item
            break
    return pred_value


def official_kv(pred, label):  # compute_scores.get_score_one_kv_retrieval
    for c in ['\n', ':', '"', "'", '.', ',', '?', '!', '{', '}']:
        pred = pred.replace(c, ' ')
    return label in pred.split()


def official_choice(pred, label):  # compute_scores.get_score_one_longbook_choice_eng
    pred = pred.strip()
    if pred == "":
        return False
    if pred[0] in "ABCD":
        return pred[0] in label
    if pred in label:
        return True
    for c in ["\n", '"', "'", ".", ",", "?", "!", "{", "}"]:
        pred = pred.replace(c, " ")
    while "  " in pred:
        pred = pred.replace("  ", " ")
    for prefix in ["answer is:", "answer:", "answer is", "option is"]:
        idx = pred.find(prefix)
        if idx == -1:
            continue
        if len(pred) < idx + len(prefix) + 1:
            return False
        after_prefix = pred[idx + len(prefix) + 1:]
        return any(after_prefix.startswith(s) for s in label)
    for word in pred.split():
        if word in "ABCD":
            return word in label
    return False


def official_math_calc(pred, label):  # compute_scores.get_score_one_math_calc (not gpt4)
    pred_nums = [int(item) for item in re.split("[^0-9]", pred) if item != ""]
    cnt = 0
    for i in range(len(label)):
        if i >= len(pred_nums):
            break
        if label[i] == pred_nums[i]:
            cnt += 1
        else:
            break
    return cnt / len(label)


def test_scorers_agree_with_compute_scores_on_generated_cases():
    rng = random.Random(0)
    pieces = ["The", "answer", "is:", "A", "B.", "C", "option", "12", "345", '"k1"', "v-1", "{", "}", ":", "\n", "D"]
    for _ in range(500):
        pred = " ".join(rng.choice(pieces) for _ in range(rng.randint(0, 8)))
        assert metrics.first_int_match(pred) == official_first_int_match(pred)
        assert metrics.kv_retrieval(pred, "v-1") == official_kv(pred, "v-1")
        label = ["some option", rng.choice("ABCD")]
        assert metrics.longbook_choice_eng(pred, label) == official_choice(pred, label)
        nums = [rng.randint(0, 400) for _ in range(4)]
        assert metrics.math_calc(pred, nums) == official_math_calc(pred, nums)
    assert metrics.qa_f1("The red car.", ["red car"]) == 1.0
    assert metrics.qa_f1("a car", ["red car"]) == pytest.approx(2 / 3)
    assert metrics.code_debug("B. func_b", ["func_b", "B"]) and metrics.code_debug("answer is: func_b", ["func_b", "B"])
    assert metrics.math_find("The largest is 97.", [97]) and not metrics.math_find("3.5", [3])
    assert metrics.rouge_lsum("the cat sat", "the cat sat") == pytest.approx(1.0)


def test_generators_follow_construct_synthetic_dataset():
    def official_number_string(random):  # build_number_string's key, drawing from `random`
        keys = []
        for _k in range(5):
            keys.append(str(random.randint(0, 9)))
        for k in range(5):
            pos = random.randint(0, 5 + k - 1)
            keys.insert(pos, keys[pos])
        return "".join(keys)

    for seed in range(50):
        key = number_string_key(random.Random(seed))
        assert key == official_number_string(random.Random(seed)) and len(key) == 10 and key.isdigit()
    eg = noise_example("passkey", 10, 0.3, "04512")
    noise = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.\n"
    answer = "The pass key is 04512. Remember it. 04512 is the pass key.\n"
    assert eg["context"] == noise * 3 + answer + noise * 7 and eg["input"] == "What is the pass key?"
    kv = kv_example(random.Random(1), 20, 0.5)
    data = json.loads(kv["context"].removeprefix("JSON data:\n"))
    key = re.search(r'Key: "([^"]+)"', kv["input"]).group(1)
    assert len(data) == 20 and data[key] == kv["answer"] and list(data).index(key) == 10
    assert all(re.fullmatch(r"[0-9a-f-]{36}", k) for k in data)
    assert kv["input"].endswith('"\nThe value associated with the specified key is: ')


def test_prompts_are_the_yarn_mistral_templates():
    eg = {"context": "CTX", "input": "What is the pass key?", "answer": "1"}
    assert create_prompt(eg, "passkey") == ("There is an important info hidden inside a lot of irrelevant text. Find "
                                            "it and memorize it. I will quiz you about the important information.\n\n"
                                            "CTX\n\nWhat is the pass key?\n\nThe pass key is")
    choice = {"context": "BOOK", "input": "Who?", "options": ["w", "x", "y", "z"], "answer": ["y"]}
    assert create_prompt(choice, "longbook_choice_eng").endswith("Question: Who?\nA. w\nB. x\nC. y\nD. z\n\nThe "
                                                                  "letter of the correct answer is")
    assert get_answer(choice, "longbook_choice_eng") == ["y", "C"]
    find = {"context": "[1, 2]", "input": "You should answer with only one number, no other words. The largest "
                                          "number of the list is: ", "answer": 2}
    assert create_prompt(find, "math_find").startswith("What is the largest number in the following list?\n\n[1, 2]")
    run = {"context": "def func_1(x):\n    return x", "input": "Please give me the exact number of the return value "
                                                              "of func_1(-3). Your response should end with ..."}
    assert create_prompt(run, "code_run").endswith("exact value of func_1(-3). The value of func_1(-3) is")
    assert MAX_NEW_TOKENS["passkey"] == 6 and MAX_NEW_TOKENS["kv_retrieval"] == 50


@pytest.fixture(scope="module")
def stories(stories_dir):
    return AutoModelForCausalLM.from_pretrained(stories_dir).eval(), AutoTokenizer.from_pretrained(stories_dir)


def test_synthetic_run_rows_and_resume(stories, one_thread):
    model, tokenizer = stories
    task = configure([TASKS.get("infinitebench-synthetic")], [("", "lengths", "400"), ("", "depths", "0,1"),
                                                             ("", "samples", "1")])[0]
    log = SampleLog()
    with memory_lm(model) as lm:
        result = task.run(lm, tokenizer, TaskOptions(), log)
    assert result.n == 6 and {s["task"] for s in result.samples} == {"passkey", "number_string", "kv_retrieval"}
    for s in result.samples:
        assert s["prompt_tokens"] + MAX_NEW_TOKENS[s["task"]] <= 400 and len(s["prompt_hash"]) == 16
        assert s["score"] == metrics.score_one(s["task"], s["prediction"], s["answers"][0])
    rows = {(r.subtask, r.context_len) for r in result.rows}
    assert ("Retrieve.KV", 400) in rows and ("Retrieve.PassKey/depth=1.0", 400) in rows
    assert task.run(NoGeneration(), tokenizer, TaskOptions(), log).samples == result.samples


def write_fixture(folder):
    """A generated InfiniteBench-format folder: a few records of three tasks."""
    folder.mkdir(exist_ok=True)
    rng = random.Random(0)
    rows = {"passkey": [noise_example("passkey", 5, 0.5, "".join(rng.choices(string.digits, k=5))) for _ in range(2)],
            "longbook_choice_eng": [{"id": 0, "context": "Tom had a red ball. " * 30, "input": "What colour?",
                                     "options": ["red", "blue", "green", "black"], "answer": ["red"]}],
            "math_find": [{"id": 0, "context": str([3, 9, 4]), "answer": 9,
                           "input": "You should answer with only one number, no other words. The largest number of "
                                    "the list is: "}]}
    for task, records in rows.items():
        (folder / f"{task}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return folder


def test_released_tasks_from_files(stories, tmp_path, one_thread):
    model, tokenizer = stories
    data = write_fixture(tmp_path / "ib")
    task = configure([TASKS.get("infinitebench")], [("", "tasks", "passkey,longbook_choice_eng,math_find"),
                                                   ("", "max_length", "120")])[0]
    task.check(TaskOptions(data_dir=data))
    log = SampleLog()
    with memory_lm(model) as lm:
        result = task.run(lm, tokenizer, TaskOptions(data_dir=data), log)
    assert [s["task"] for s in result.samples] == ["passkey", "passkey", "longbook_choice_eng", "math_find"]
    choice = result.samples[2]
    assert choice["truncated"] and choice["prompt_tokens"] <= 122 and choice["answers"] == ["red", "A"]
    assert {r.subtask for r in result.rows} == {"Retrieve.PassKey", "En.MC", "Math.Find"}
    assert task.run(NoGeneration(), tokenizer, TaskOptions(data_dir=data), log).samples == result.samples


def test_without_data_one_line_before_model_work(capsys, tmp_path, stories_dir, no_model_work):
    base = ["run", "--model", str(stories_dir), "--tasks", "infinitebench", "--out", str(tmp_path / "out")]
    out = one_line_error(capsys, base)
    assert "xinrongzhang2022/InfiniteBench" in out and "--data-dir" in out
    out = one_line_error(capsys, [*base, "--data-dir", str(tmp_path)])
    assert "passkey.jsonl" in out
