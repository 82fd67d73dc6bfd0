"""Task arguments, the per-sample resume log, and the hub-data check."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import one_line_error

from unimem_bench.tasks import TASKS, DataNotFoundError, SampleLog, TaskArgError, TaskOptions
from unimem_bench.tasks.arguments import configure, parse_task_arg, read_task_args_yaml, task_args
from unimem_bench.tasks.data.hub import check_hub_dataset


def test_task_arg_parses_by_type_and_targets_tasks():
    github, pi = TASKS.get("github"), TASKS.get("pi-length")
    both = configure([github, pi], [parse_task_arg("min_chars=500"), parse_task_arg("pi-length.multiples=1,4")])
    assert [t.min_chars for t in both] == [500, 500]
    assert both[1].multiples == (1, 4) and both[0].dataset == ""
    assert task_args(both[1])["multiples"] == (1, 4)
    assert TASKS.get("github").min_chars == 10_000  # the registered task is untouched


@pytest.mark.parametrize(("entry", "message"), [
    ("min_char=3", "did you mean min_chars"),
    ("pi-length.multiples=1,x", "not a valid int"),
    ("niah9.x=1", "task 'niah9' is not selected"),
    ("pi-length.multiples=0", "must be positive"),
    ("novalue", "expected key=value"),
])
def test_bad_task_args_name_the_problem(entry, message):
    with pytest.raises(TaskArgError, match=message):
        configure([TASKS.get("github"), TASKS.get("pi-length")], [parse_task_arg(entry)])


def test_task_args_yaml_file(tmp_path):
    path = tmp_path / "args.yaml"
    path.write_text("min_chars: 700\npi-length:\n  lengths: [128, 256]\n")
    github, pi = configure([TASKS.get("github"), TASKS.get("pi-length")], read_task_args_yaml(path))
    assert github.min_chars == 700 and pi.min_chars == 700 and pi.lengths == (128, 256)


def test_cli_rejects_unknown_task_arg_in_one_line(capsys, tmp_path, stories_dir):
    argv = ["run", "--model", str(stories_dir), "--tasks", "github", "--task-arg", "max_char=3", "--out",
            str(tmp_path)]
    assert "max_char" in one_line_error(capsys, argv)


def test_sample_log_survives_a_cut_line_and_reloads(tmp_path):
    path = tmp_path / "log.jsonl"
    log = SampleLog(path)
    log.add("a", {"x": 1})
    log.add("b", {"x": 2})
    with path.open("a") as f:
        f.write('{"key": "c", "sam')  # a crash mid-write
    again = SampleLog(path)
    assert again.get("a") == {"x": 1} and again.get("b") == {"x": 2} and again.get("c") is None


class CountingLM:
    """Scores every token 1.0 nat and counts the documents it was asked to score."""

    segment_len = 64
    trained_context = 64

    def __init__(self) -> None:
        self.scored = 0

    def score(self, docs, *, batch_size=1, progress=None):
        self.scored += len(docs)
        return [torch.ones(len(d) - 1) for d in docs]


def test_perplexity_resumes_from_the_sample_log(tmp_path, books_dir, stories_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(stories_dir)
    options = TaskOptions(data_dir=books_dir, max_docs=3, max_tokens=100)
    log = SampleLog(tmp_path / "log.jsonl")
    task = TASKS.get("pg19")
    first = CountingLM()
    full = task.run(first, tokenizer, options, log)
    assert first.scored == 3
    partial = SampleLog(tmp_path / "partial.jsonl")
    for key in list(log.done)[:2]:
        partial.add(key, log.done[key])
    second = CountingLM()
    resumed = task.run(second, tokenizer, options, SampleLog(tmp_path / "partial.jsonl"))
    assert second.scored == 1
    assert resumed.metrics == full.metrics and resumed.metrics["token_ppl"] == pytest.approx(math.e)


def test_unreachable_hub_dataset_is_one_line_naming_id_and_data_dir(monkeypatch):
    """conftest points the hub at a closed port."""
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with pytest.raises(DataNotFoundError) as err:
        check_hub_dataset("deepmind/pg19", task="pg19", local=".txt books")
    message = str(err.value)
    assert "deepmind/pg19" in message and "--data-dir" in message and "\n" not in message
