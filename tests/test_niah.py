"""Needle in a Haystack: placement, exact token budgets, scoring, argument checks, and a resumed run end to end."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch
from transformers import AutoTokenizer

from unimem_bench.harness.cli import app as cli
from unimem_bench.harness.evaluation import runner
from unimem_bench.methods import METHODS, MemoryLM, MethodContext
from unimem_bench.tasks import TASKS, TaskArgError, TaskOptions
from unimem_bench.tasks.arguments import configure
from unimem_bench.tasks.needle.haystack import (
    NOISE,
    SentenceEnds,
    haystack_ids,
    haystack_text,
    insert_needle,
    resolve_lengths,
    string_match_all,
    substring_match,
)
from unimem_bench.tasks.needle.niah import PromptParts


@pytest.fixture(scope="module")
def tokenizer(request):
    return AutoTokenizer.from_pretrained(request.getfixturevalue("stories_dir"))


@pytest.fixture(scope="module")
def stories_lm(request):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(request.getfixturevalue("stories_dir")).eval()
    config = METHODS.get("vanilla").config(MethodContext(n_layers=5, segment_len=256, trained_context=512))
    with MemoryLM(model, config, segment_len=256, trained_context=512) as lm:
        yield lm


class RecordingLM:
    """The real model, with every prompt it is asked to continue kept (and optionally an interrupt after k)."""

    def __init__(self, lm, interrupt_after: int | None = None) -> None:
        self.lm, self.prompts, self.interrupt_after = lm, [], interrupt_after
        self.segment_len, self.trained_context = lm.segment_len, lm.trained_context

    def generate(self, prompt, **kwargs):
        if self.interrupt_after is not None and len(self.prompts) == self.interrupt_after:
            raise KeyboardInterrupt
        self.prompts.append(prompt.tolist())
        return self.lm.generate(prompt, **kwargs)


def niah(**args):
    return configure([TASKS.get("niah")], [("", k, v) for k, v in args.items()])[0]


@pytest.fixture(scope="module")
def book_ids(tokenizer, request):
    return haystack_ids(tokenizer, haystack_text(request.getfixturevalue("books_dir"))[5000:], 600)


@pytest.mark.parametrize("depth", [0.0, 0.3, 0.5, 0.77, 1.0])
def test_needle_goes_back_to_the_previous_sentence_end(tokenizer, book_ids, depth):
    hay = book_ids
    needle = tokenizer(" The dog's name was Sparky.", add_special_tokens=False)["input_ids"]
    ends = SentenceEnds(tokenizer)
    ids, at = insert_needle(hay, needle, depth, ends)
    assert ids == hay[:at] + needle + hay[at:]
    if depth == 1:
        assert at == len(hay)
        return
    target = int(len(hay) * depth)
    assert at <= target
    assert at == 0 or ends(hay[at - 1])  # right after a sentence end ...
    assert not any(ends(t) for t in hay[at:target])  # ... the last one before the depth's point
    assert any(ends(t) for t in hay[:target]) == (at > 0)
    assert tokenizer.decode(hay[at - 1:at]).strip().endswith(".") or at == 0


def test_needle_at_a_point_after_a_period_stays_there_and_without_periods_goes_to_the_start():
    def is_end(t):
        return t == 0

    hay = [5, 5, 0, 5, 5, 5, 0, 5]
    assert insert_needle(hay, [9], 0.5, is_end) == ([5, 5, 0, 9, 5, 5, 5, 0, 5], 3)
    assert insert_needle(hay, [9], 7 / 8, is_end)[1] == 7
    assert insert_needle([5] * 8, [9], 0.9, is_end)[1] == 0


def test_haystack_repeats_a_short_text_to_the_requested_tokens(tokenizer):
    ids = haystack_ids(tokenizer, NOISE, 500)
    assert len(ids) == 500
    assert tokenizer.decode(ids).count("The grass is green") >= 500 // len(tokenizer(NOISE)["input_ids"]) - 1


def test_every_prompt_is_exactly_its_length_minus_the_budget(tokenizer, books_dir, stories_lm):
    task = niah(lengths="96,160,300", depths="0,0.5,1", max_new_tokens=5, preset="story", skip_chars=5000)
    lm = RecordingLM(stories_lm)
    result = task.run(lm, tokenizer, TaskOptions(data_dir=books_dir))
    assert [len(p) for p in lm.prompts] == [length - 5 for length in (96, 160, 300) for _ in range(3)]
    parts = PromptParts(tokenizer, task.spec)
    for prompt, sample in zip(lm.prompts, result.samples, strict=True):
        at = sample["needle_at"]
        assert prompt[:parts.offset] == parts.before and prompt[len(prompt) - len(parts.after):] == parts.after
        assert prompt[at:at + len(parts.needle)] == parts.needle
        assert sample["prompt_tokens"] == len(prompt) and sample["new_tokens"] <= 5
        assert sample["accuracy"] == float(substring_match("Sparky", sample["generated"]))
    assert [s["needle_at"] for s in result.samples if s["depth"] == 0.0] == [parts.offset] * 3
    assert all(s["needle_at"] + len(parts.needle) + len(parts.after) == s["prompt_tokens"]
               for s in result.samples if s["depth"] == 1.0)
    assert [(r.subtask, r.context_len, r.n) for r in result.rows] == [
        (f"depth={d}", length, 1) for length in (96, 160, 300) for d in (0.0, 0.5, 1.0)]
    assert result.metrics["accuracy"] == pytest.approx(sum(r.value for r in result.rows) / 9)
    control = niah(lengths="96", depths="1", max_new_tokens=5, preset="story", control=True)
    lm = RecordingLM(stories_lm)
    control.run(lm, tokenizer, TaskOptions())
    assert len(lm.prompts[0]) == 91 and not _contains(lm.prompts[0], parts.needle)


def _contains(seq: list[int], sub: list[int]) -> bool:
    return any(seq[i:i + len(sub)] == sub for i in range(len(seq) - len(sub) + 1))


def test_default_lengths_span_a_quarter_to_eight_times_the_trained_context():
    assert resolve_lengths((), 512) == [128, 256, 512, 1024, 2048, 4096]
    assert resolve_lengths((300, 100), 512) == [300, 100]
    assert resolve_lengths((), 32) == [16, 32, 64, 128, 256]  # 1/4 and 1/2 of 32 both become the 16-token floor


def test_scoring_substring_and_string_match_all():
    answer = "eat a sandwich and sit in Dolores Park on a sunny day"
    assert substring_match(answer, "The best thing is to EAT a sandwich and sit in\nDolores  Park on a sunny day.")
    assert not substring_match(answer, "eat a sandwich and sit in Dolores Park")
    assert string_match_all("The numbers are 1234567 and 7654321.", ["1234567", "7654321"]) == 1.0
    assert string_match_all("only 1234567 here", ["1234567", "7654321", "1111111"]) == pytest.approx(1 / 3)
    assert string_match_all("Magic-WORD\x07", ["magic-word"]) == 1.0
    assert string_match_all("", ["x"]) == 0.0
    with pytest.raises(ValueError):
        string_match_all("x", [])


@pytest.mark.parametrize(("args", "message"), [
    ({"depths": "0,1.5"}, "between 0 and 1"),
    ({"lengths": "40", "max_new_tokens": "48"}, "cannot hold a prompt"),
    ({"answer": "a burrito"}, "is not in the needle"),
    ({"question": "Is it to eat a sandwich and sit in Dolores Park on a sunny day?"}, "appears in the question"),
    ({"template": "{context}"}, "{question} exactly once"),
    ({"preset": "poem"}, "choose one of"),
])
def test_bad_arguments_fail_in_one_line(args, message):
    with pytest.raises(TaskArgError, match=message.replace("{", r"\{").replace("}", r"\}")):
        niah(**args)


def test_a_length_too_short_for_the_prompt_names_the_argument(tokenizer, stories_lm):
    with pytest.raises(TaskArgError, match=r"niah.lengths 60: the prompt without haystack is \d+ tokens"):
        niah(lengths="60,512", depths="1", max_new_tokens=8).run(stories_lm, tokenizer, TaskOptions())


def test_bad_task_argument_fails_before_model_work(capsys, stories_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(runner, "load_model", lambda *a, **k: pytest.fail("weights loaded before validation"))
    argv = ["run", "--model", str(stories_dir), "--tasks", "niah", "--task-arg", "niah.depths=0,2", "--out",
            str(tmp_path)]
    assert cli.main(argv) == 2
    out = capsys.readouterr().out.strip()
    assert out.startswith("error:") and "niah.depths" in out and "\n" not in out


def test_interrupted_run_resumes_without_recomputing_cells(stories_dir, books_dir, tmp_path, monkeypatch, capsys):
    """Interrupt after 4 of 6 cells: the rerun generates only the 2 missing cells, says so, and ends with the
    leaderboard, samples and heatmaps of an uninterrupted run."""
    calls: list[int] = []
    interrupt_at = [4]

    class CountingLM(MemoryLM):
        def generate(self, prompt, **kwargs):
            if len(calls) == interrupt_at[0]:
                raise KeyboardInterrupt
            calls.append(len(prompt))
            return super().generate(prompt, **kwargs)

    monkeypatch.setattr(runner, "MemoryLM", CountingLM)

    def argv(out):
        return ["run", "--model", str(stories_dir), "--methods", "vanilla", "--tasks", "niah", "--data-dir",
                str(books_dir), "--out", str(out), "--task-arg", "lengths=64,96", "--task-arg", "depths=0,0.5,1",
                "--task-arg", "preset=story", "--task-arg", "max_new_tokens=4", "--task-arg", "skip_chars=5000"]

    assert cli.main(argv(tmp_path / "a")) == 130
    partial = list((tmp_path / "a" / "runs").glob(".*.partial.jsonl"))
    assert len(partial) == 1 and len(partial[0].read_text().splitlines()) == 4
    interrupt_at[0] = -1
    calls.clear()
    capsys.readouterr()
    assert cli.main(argv(tmp_path / "a")) == 0
    assert calls == [96 - 4] * 2  # only the two cells of length 96 the interrupt left
    out = capsys.readouterr().out
    assert "4 samples finished before the interruption are reused" in out
    calls.clear()
    assert cli.main(argv(tmp_path / "b")) == 0
    assert len(calls) == 6
    boards = [pd.read_csv(tmp_path / d / "leaderboard.csv").drop(columns=["run_id", "finished"]) for d in ("a", "b")]
    pd.testing.assert_frame_equal(boards[0], boards[1])
    assert set(boards[0]["subtask"].dropna()) == {"depth=0.0", "depth=0.5", "depth=1.0"}
    run = next(p for p in (tmp_path / "a" / "runs").iterdir() if p.is_dir())
    samples = [json.loads(line) for line in (run / "samples.jsonl").read_text().splitlines()]
    assert [(s["context_len"], s["depth"]) for s in samples] == [(n, d) for n in (64, 96) for d in (0.0, 0.5, 1.0)]
    assert json.loads((run / "run.json").read_text())["reused_samples"] == 4
    for name in ("niah_vanilla.png", "niah_methods.png"):
        assert (tmp_path / "a" / "plots" / name).stat().st_size > 5_000


@pytest.mark.slow
def test_story_preset_is_honest_on_stories260k(request, tokenizer, stories_lm):
    """The story needle's answer is copied from the needle, never guessed: with the needle left out (control) no
    cell finds it; with it, some do."""
    if "slow" not in request.config.getoption("markexpr"):
        pytest.skip("48 generations on stories260K; run with -m slow")
    options = [TaskOptions(data_dir=request.getfixturevalue("books_dir")), TaskOptions()]
    hits = {}
    for control in (False, True):
        task = niah(lengths="64,128,256,512", depths="0.5,0.9,1", max_new_tokens=12, preset="story",
                    control=control)
        hits[control] = sum(task.run(stories_lm, tokenizer, o).metrics["accuracy"] for o in options)
    assert hits[True] == 0 and hits[False] > 0


def test_generation_sees_the_prompt_as_built(tokenizer, stories_lm):
    """The generated text is the model's greedy continuation of exactly the recorded prompt."""
    task = niah(lengths="100", depths="1", max_new_tokens=6, preset="story")
    lm = RecordingLM(stories_lm)
    sample = task.run(lm, tokenizer, TaskOptions()).samples[0]
    again = stories_lm.generate(torch.tensor(lm.prompts[0]), max_new_tokens=6, eos_token_id=tokenizer.eos_token_id)
    text = tokenizer.decode(again, skip_special_tokens=True)
    assert text.startswith(sample["generated"])
