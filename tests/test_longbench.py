"""LongBench tasks: the dataset table against lm-eval's configs, truncation, buckets, aggregation, end to end on
stories260K from a generated LongBench-format directory, resume, and one-line data errors through the CLI."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import re
from pathlib import Path

import pandas as pd
import pytest
import yaml
from helpers import one_line_error
from transformers import AutoModelForCausalLM, AutoTokenizer

from unimem_bench.harness.cli import app as cli
from unimem_bench.methods import METHODS, MemoryLM, MethodContext
from unimem_bench.tasks import TASKS, SampleLog, TaskArgError, TaskOptions
from unimem_bench.tasks.arguments import configure
from unimem_bench.tasks.longbench.data import DATASETS, E_DATASETS, bucket, truncate_middle
from unimem_bench.tasks.longbench.fixture import write_longbench_dir
from unimem_bench.tasks.longbench.task import stop_at_newline, summarize

# Datasets whose official template (THUDM config) and lm-eval's yaml differ, in whitespace only.
WHITESPACE_DIFFERENCES = {"triviaqa", "samsum", "passage_count", "passage_retrieval_en", "lcc", "repobench-p"}
LM_EVAL_GROUPS = {"single": "single_doc_qa", "multi": "multi_doc_qa", "summarization": "summarization",
                  "fewshot": "few_shot", "synthetic": "synthetic", "code": "code"}


class _YamlLoader(yaml.SafeLoader):
    """lm-eval's yaml with its `!function` tags read as plain strings."""


_YamlLoader.add_constructor("!function", lambda loader, node: loader.construct_scalar(node))


@pytest.fixture(scope="module")
def lm_eval_configs() -> Path:
    spec = importlib.util.find_spec("lm_eval")
    if spec is None or spec.origin is None:
        pytest.skip("lm-eval is not installed (pip install -e '.[dev]')")
    return Path(spec.origin).parent / "tasks" / "longbench"


def read_yaml(path: Path) -> dict:
    return yaml.load(path.read_text(), Loader=_YamlLoader)


def test_dataset_table_matches_lm_eval_configs(lm_eval_configs):
    e_files = {p.stem[:-2] for p in lm_eval_configs.glob("*_e.yaml") if not p.name.startswith("_")}
    assert set(E_DATASETS) == e_files and len(DATASETS) == 21
    categories = {}
    for group, category in LM_EVAL_GROUPS.items():
        for task in read_yaml(lm_eval_configs / f"_longbench_{group}.yaml")["task"]:
            categories[task.removeprefix("longbench_")] = category
    for name, spec in DATASETS.items():
        config = read_yaml(lm_eval_configs / f"{name}.yaml")
        template = config["doc_to_text"].replace("{{context}}", "{context}").replace("{{question}}", "{input}")
        assert spec.prompt.split() == template.split(), name
        assert (spec.prompt == template) == (name not in WHITESPACE_DIFFERENCES), name
        assert spec.max_gen == config["generation_kwargs"]["max_gen_toks"], name
        assert spec.metric == re.search(r"get_(\w+?)_with_score", config["process_results"]).group(1), name
        assert spec.category == categories[name], name
        if name in E_DATASETS:
            assert read_yaml(lm_eval_configs / f"{name}_e.yaml")["doc_to_text"] == config["doc_to_text"]


@pytest.fixture(scope="module")
def stories(request):
    stories_dir = request.getfixturevalue("stories_dir")
    return AutoModelForCausalLM.from_pretrained(stories_dir).eval(), AutoTokenizer.from_pretrained(stories_dir)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return write_longbench_dir(tmp_path_factory.mktemp("longbench"), n=2, words=300)


def test_truncation_keeps_the_first_and_last_half_of_the_tokens(stories):
    tokenizer = stories[1]
    prompt = ("Read this story. " + "The cat sat on the mat. " * 40 + "MIDDLE MARK. " + "A dog ran in the park. " * 40
              + "Question: who ran?\nAnswer:")
    for max_length in (100, 101, 64):
        out, truncated = truncate_middle(tokenizer, prompt, max_length)
        assert truncated and "MIDDLE" not in out
        assert out.startswith("Read this story. The cat sat") and out.endswith("A dog ran in the park. Question: who "
                                                                               "ran?\nAnswer:")
        # BOS counts in the official budget and is dropped by the decode: re-encoded, the prompt is about max_length
        assert abs(len(tokenizer(out)["input_ids"]) - 2 * (max_length // 2)) <= 2
    n = len(tokenizer(prompt)["input_ids"])
    assert truncate_middle(tokenizer, prompt, n) == (prompt, False)
    assert truncate_middle(tokenizer, prompt, n - 1)[1]


def test_length_buckets_follow_eval_py():
    assert [bucket(n) for n in (0, 3999, 4000, 7999, 8000, 50_000)] == ["0-4k", "0-4k", "4-8k", "4-8k", "8k+", "8k+"]


def test_scores_average_datasets_not_samples():
    samples = ([{"dataset": "qasper", "score": 100.0, "prompt_tokens": 10, "bucket": "0-4k"}] * 3
               + [{"dataset": "trec", "score": 0.0, "prompt_tokens": 20, "bucket": "8k+"}]
               + [{"dataset": "lcc", "score": 40.0, "prompt_tokens": 30, "bucket": "0-4k"}])
    metrics, rows = summarize(samples, e=True)
    assert metrics["score"] == pytest.approx((100 + 0 + 40) / 3)  # not the sample mean 68
    by = {r.subtask: r for r in rows}
    assert by["qasper"].value == 100 and by["qasper"].n == 3 and by["trec"].context_len == 20
    assert by["category:single_doc_qa"].value == 100 and by["category:code"].value == 40
    assert by["length:0-4k"].value == pytest.approx(70) and by["length:0-4k"].n == 4
    assert by["length:8k+"].value == 0 and "length:4-8k" not in by and "qasper/8k+" not in by


def test_samsum_stops_at_a_newline_after_some_text():
    stop = stop_at_newline(13)
    assert not stop([13]) and not stop([5]) and stop([13, 5, 13]) and stop([5, 13])


def test_task_arguments_are_validated():
    task = TASKS.get("longbench-e")
    with pytest.raises(TaskArgError, match="'narrativeqa' is not a longbench-e dataset"):
        configure([task], [("", "datasets", "qasper,narrativeqa")])
    (configured,) = configure([task], [("", "datasets", "lcc,qasper")])
    assert configured.selected == ("qasper", "lcc")  # the official order
    with pytest.raises(TaskArgError, match="context='window'"):
        configure([task], [("", "context", "window")])


def vanilla_lm(model, method: str = "vanilla") -> MemoryLM:
    config = METHODS.get(method).config(MethodContext(n_layers=5, segment_len=256, trained_context=512))
    return MemoryLM(model, config, segment_len=256, trained_context=512)


class NoGeneration:
    """An LM that must not be asked to generate: every sample has to come from the resume log."""

    trained_context = 512

    def generate(self, *args, **kwargs):
        raise AssertionError("a logged sample was generated again")


def test_every_dataset_end_to_end_then_resumes_from_the_log(stories, data_dir):
    model, tokenizer = stories
    task = dataclasses.replace(TASKS.get("longbench"), max_gen=3, max_length=128)  # short prompts: a fast test
    options = TaskOptions(data_dir=data_dir, max_docs=1)
    log = SampleLog()
    with vanilla_lm(model) as lm:
        result = task.run(lm, tokenizer, options, log)
    assert result.n == 21 and [s["dataset"] for s in result.samples] == list(DATASETS)
    for s in result.samples:
        record = json.loads((data_dir / f"{s['dataset']}.jsonl").read_text().splitlines()[0])
        assert s["_id"] == record["_id"] and s["answers"] == record["answers"]
        assert 0 <= s["score"] <= 100 and s["max_gen"] == 3 and s["generated_tokens"] <= 3
        assert s["truncated"] and s["context"] == "truncate" and s["max_length"] == 128
    english = [s["prompt_tokens"] for s in result.samples if DATASETS[s["dataset"]].language == "en"]
    assert max(english) <= 130  # head and tail of 64 tokens each, BOS again in front; re-encoding may split a pair
    rows = {r.subtask: r.value for r in result.rows}
    assert set(rows) == set(DATASETS) | {f"category:{s.category}" for s in DATASETS.values()}
    assert result.metrics["score"] == pytest.approx(sum(rows[d] for d in DATASETS) / 21)
    again = task.run(NoGeneration(), tokenizer, options, log)
    assert again.samples == result.samples and again.metrics == result.metrics


def test_stream_mode_reads_the_whole_prompt(stories, data_dir):
    model, tokenizer = stories
    task = dataclasses.replace(TASKS.get("longbench"), datasets=("qasper",), max_gen=2, context="stream")
    with vanilla_lm(model, "transformer_xl") as lm:
        (sample,) = task.run(lm, tokenizer, TaskOptions(data_dir=data_dir, max_docs=1)).samples
    record = json.loads((data_dir / "qasper.jsonl").read_text().splitlines()[0])
    prompt = DATASETS["qasper"].prompt.format(context=record["context"], input=record["input"])
    assert not sample["truncated"] and sample["context"] == "stream" and sample["max_length"] == 32_768
    assert sample["prompt_tokens"] == len(tokenizer(prompt)["input_ids"]) > 512


def test_without_data_one_line_names_the_hub_id_and_data_dir(capsys, tmp_path, no_model_work, monkeypatch):
    import huggingface_hub.constants

    # A closed local port stands in for "no network", whatever network the test machine has.
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")
    out = one_line_error(capsys, ["run", "--methods", "all", "--tasks", "longbench", "--out", str(tmp_path)])
    assert "Xnhyacinth/LongBench" in out and "--data-dir" in out


def test_missing_dataset_files_are_named_before_model_work(capsys, tmp_path, no_model_work):
    (tmp_path / "qasper.jsonl").write_text("{}\n")
    argv = ["run", "--tasks", "longbench", "--data-dir", str(tmp_path), "--out", str(tmp_path / "out")]
    out = one_line_error(capsys, argv)
    assert "narrativeqa.jsonl, multifieldqa_en.jsonl, multifieldqa_zh.jsonl and 17 more" in out
    out = one_line_error(capsys, [*argv[:2], "longbench-e", *argv[3:]])
    assert "qasper_e.jsonl" in out and "and 10 more" in out


def test_cli_writes_predictions_scores_and_leaderboard_rows(stories_dir, data_dir, tmp_path):
    argv = ["run", "--model", str(stories_dir), "--methods", "vanilla,rmt", "--tasks", "longbench,longbench-e",
            "--data-dir", str(data_dir), "--limit", "1", "--task-arg", "datasets=qasper,trec,lcc", "--task-arg",
            "max_gen=2", "--task-arg", "max_length=128", "--out", str(tmp_path)]
    assert cli.main(argv) == 0
    board = pd.read_csv(tmp_path / "leaderboard.csv", keep_default_na=False)
    assert set(board["method"]) == {"vanilla", "rmt"} and set(board["task"]) == {"longbench", "longbench-e"}
    subtasks = set(board[board["task"] == "longbench-e"]["subtask"])
    assert {"", "qasper", "qasper/0-4k", "category:few_shot", "length:0-4k"} <= subtasks
    for run_id in set(board["run_id"]):
        samples = [json.loads(line) for line in (tmp_path / "runs" / run_id / "samples.jsonl").read_text().splitlines()]
        assert [s["dataset"] for s in samples] == ["qasper", "trec", "lcc"]
        (headline,) = board[(board["run_id"] == run_id) & board["headline"]]["value"]
        assert headline == pytest.approx(sum(s["score"] for s in samples) / 3)
    assert (tmp_path / "plots" / "score.png").stat().st_size > 10_000
