"""Passkey retrieval, compared with epfml/landmark-attention's run_test.py `generate_prompt` (the prompt the
position-interpolation paper's passkey test uses; copied below as the reference, with its random split and key made
arguments) on generated cases; the length x depth grid, its rows and the heatmap drawn from them."""

from __future__ import annotations

import re

import pytest
from task_helpers import NoGeneration, memory_lm
from transformers import AutoModelForCausalLM, AutoTokenizer

from unimem_bench.tasks import TASKS, SampleLog, TaskOptions
from unimem_bench.tasks.arguments import configure
from unimem_bench.tasks.needle.passkey import passkey_prompt, passkey_score


def landmark_generate_prompt(n_garbage: int, n_garbage_prefix: int, pass_key: int) -> str:
    """landmark-attention's generate_prompt with the random prefix length and key as arguments."""
    n_garbage_suffix = n_garbage - n_garbage_prefix
    task_description = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize "
                        "them. I will quiz you about the important information there.")
    garbage = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
    garbage_inf = " ".join([garbage] * 10000)
    garbage_prefix = garbage_inf[:n_garbage_prefix]
    garbage_suffix = garbage_inf[:n_garbage_suffix]
    information_line = f"The pass key is {pass_key}. Remember it. {pass_key} is the pass key."
    final_question = "What is the pass key? The pass key is"
    lines = [task_description, garbage_prefix, information_line, garbage_suffix, final_question]
    return "\n".join(lines)


@pytest.mark.parametrize(("n", "depth"), [(0, 0.5), (500, 0.0), (1234, 0.37), (5000, 1.0)])
def test_prompt_is_landmarks(n, depth):
    assert passkey_prompt(n, depth, "12345") == landmark_generate_prompt(n, int(n * depth), 12345)


def test_score_is_the_first_integer():
    assert passkey_score(" 12345. Remember", "12345") == 1.0
    assert passkey_score(" 1234 5", "12345") == 0.0 and passkey_score("no digits", "12345") == 0.0
    assert passkey_score("is 123456", "12345") == 0.0  # a longer number is not the key
    assert passkey_score("x12345y", "12345") == 1.0


def test_grid_rows_resume_and_heatmap(stories_dir, tmp_path, one_thread):
    from unimem_bench.harness.cli import app as cli

    tokenizer = AutoTokenizer.from_pretrained(stories_dir)
    model = AutoModelForCausalLM.from_pretrained(stories_dir).eval()
    task = configure([TASKS.get("passkey")], [("", "lengths", "300,700"), ("", "depths", "0,0.5,1"),
                                             ("", "samples", "2"), ("", "max_new_tokens", "6")])[0]
    log = SampleLog()
    with memory_lm(model, "transformer_xl") as lm:
        result = task.run(lm, tokenizer, TaskOptions(), log)
    assert result.n == 12
    for s in result.samples:
        assert re.fullmatch(r"[1-9]\d{4}", s["answers"][0]) and s["prompt_tokens"] + 6 <= s["context_len"]
        assert s["accuracy"] == passkey_score(s["prediction"], s["answers"][0])
    cells = [(r.subtask, r.context_len, r.n) for r in result.rows if r.subtask.startswith("depth=")]
    assert cells == [(f"depth={d}", n, 2) for n in (300, 700) for d in (0.0, 0.5, 1.0)]
    assert [(r.subtask, r.context_len) for r in result.rows if r.subtask == "length"] == [("length", 300),
                                                                                         ("length", 700)]
    assert task.run(NoGeneration(), tokenizer, TaskOptions(), log).samples == result.samples
    argv = ["run", "--model", str(stories_dir), "--methods", "vanilla", "--tasks", "passkey", "--out", str(tmp_path),
            "--task-arg", "lengths=200,400", "--task-arg", "depths=0,1", "--task-arg", "samples=1"]
    assert cli.main(argv) == 0
    assert (tmp_path / "plots" / "passkey_methods.png").is_file()  # the NIAH heatmap code draws passkey's grid


def test_garbage_is_the_longest_that_fits_on_a_tiny_random_model(one_thread):
    """With a character tokenizer a prompt is its characters plus BOS: the garbage must be the longest that fits."""
    from helpers import char_tokenizer, tiny_llama

    tokenizer = char_tokenizer()
    task = configure([TASKS.get("passkey")], [("", "lengths", "300,420"), ("", "depths", "0.25"),
                                             ("", "samples", "1"), ("", "max_new_tokens", "4")])[0]
    with memory_lm(tiny_llama(context=512), "transformer_xl", segment_len=64, trained_context=256) as lm:
        result = task.run(lm, tokenizer, TaskOptions())
    for s in result.samples:
        n, key = s["garbage_chars"], s["answers"][0]
        assert s["prompt_tokens"] == len(passkey_prompt(n, 0.25, key)) + 1
        assert len(passkey_prompt(n, 0.25, key)) + 1 + 4 <= s["context_len"] < len(passkey_prompt(n + 1, 0.25, key)) + 5
        assert s["new_tokens"] <= 4
