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
import torch
import yaml
from helpers import one_line_error
from transformers import AutoModelForCausalLM, AutoTokenizer

from unimem_bench.harness.cli import app as cli
from unimem_bench.methods import METHODS, MemoryLM, MethodContext
from unimem_bench.tasks import TASKS, SampleLog, TaskArgError, TaskOptions
from unimem_bench.tasks.arguments import configure
from unimem_bench.tasks.base import ids_digest
from unimem_bench.tasks.longbench.data import DATASETS, E_DATASETS, bucket, truncate_middle
from unimem_bench.tasks.longbench.fixture import write_longbench_dir
from unimem_bench.tasks.longbench.task import summarize

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
    assert metrics["score/dataset_mean"] == pytest.approx((100 + 0 + 40) / 3)  # not the sample mean 68
    assert metrics["score/en"] == pytest.approx((100 + 0 + 40) / 3)  # one dataset per category here
    assert "score/zh" not in metrics  # the code datasets alone make no Chinese score
    by = {r.subtask: r for r in rows}
    assert by["qasper"].value == 100 and by["qasper"].n == 3 and by["trec"].context_len == 20
    assert by["category:single_doc_qa/en"].value == 100 and by["category:code/en"].value == 40
    assert by["length:0-4k"].value == pytest.approx(70) and by["length:0-4k"].n == 4
    assert by["length:8k+"].value == 0 and "length:4-8k" not in by and "qasper/8k+" not in by


def test_language_scores_are_means_of_category_means_as_the_official_tables():
    """THUDM's README: English Avg = mean of its six category averages, code included in both languages."""
    scores = {"narrativeqa": 10, "qasper": 20, "multifieldqa_en": 60, "hotpotqa": 30, "2wikimqa": 50,
              "multifieldqa_zh": 70, "dureader": 5, "lcc": 40, "repobench-p": 80}
    samples = [{"dataset": d, "score": float(v), "prompt_tokens": 1} for d, v in scores.items()]
    metrics, rows = summarize(samples, e=False)
    single_en, multi_en, code = (10 + 20 + 60) / 3, (30 + 50) / 2, (40 + 80) / 2
    assert metrics["score/en"] == pytest.approx((single_en + multi_en + code) / 3)
    assert metrics["score/zh"] == pytest.approx((70 + 5 + code) / 3)
    assert metrics["score/dataset_mean"] == pytest.approx(sum(scores.values()) / len(scores))
    by = {r.subtask: r.value for r in rows}
    assert by["category:single_doc_qa/zh"] == 70 and by["category:code/zh"] == by["category:code/en"] == code


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
    categories = {f"category:{s.category}/{language}" for s in DATASETS.values() for language in ("en", "zh")}
    assert set(rows) == set(DATASETS) | categories
    assert result.metrics["score/dataset_mean"] == pytest.approx(sum(rows[d] for d in DATASETS) / 21)
    assert set(result.metrics) == {"score/en", "score/zh", "score/dataset_mean"}
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


def test_vanilla_reads_each_prompt_at_once_so_predictions_depend_on_it(stories, data_dir):
    """Vanilla (segment 256 of a 512 context) reads each truncated prompt and its answer at once: every prediction
    is transformers' own greedy generation from the same prompt ids, and they differ across datasets."""
    model, tokenizer = stories
    names = ("qasper", "hotpotqa", "musique", "trec", "triviaqa")
    task = dataclasses.replace(TASKS.get("longbench"), datasets=names, max_gen=8)
    assert task.prompt_budget(512, TaskOptions()) == 504  # the default max_length: 512 - 8
    with vanilla_lm(model) as lm:
        samples = task.run(lm, tokenizer, TaskOptions(data_dir=data_dir, max_docs=2)).samples
    assert len({s["prediction"] for s in samples}) > 1
    for s in samples:
        record = next(json.loads(line) for line in (data_dir / f"{s['dataset']}.jsonl").read_text().splitlines()
                      if json.loads(line)["_id"] == s["_id"])
        prompt, _ = truncate_middle(tokenizer, DATASETS[s["dataset"]].prompt.format(**record), 504)
        ids = tokenizer(prompt)["input_ids"]
        assert s["prompt_ids_sha256"] == ids_digest(ids) and s["prompt_tokens"] == len(ids) > 256
        expected = model.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False,
                                  eos_token_id=tokenizer.eos_token_id)[0, len(ids):].tolist()
        assert s["generated_tokens"] == len(expected), s["dataset"]
        assert s["prediction"] == tokenizer.decode(expected, skip_special_tokens=True), s["dataset"]


def test_default_max_length_is_the_context_less_the_longest_answer():
    """THUDM's model2maxlen convention: 3,584 prompt tokens for a 4K model on all 21 datasets (gov_report: 512)."""
    task = TASKS.get("longbench")
    assert task.prompt_budget(4096, TaskOptions()) == 4096 - 512
    assert dataclasses.replace(task, datasets=("qasper", "trec")).prompt_budget(512, TaskOptions()) == 512 - 128
    assert dataclasses.replace(task, max_gen=16).prompt_budget(512, TaskOptions()) == 496
    assert dataclasses.replace(task, max_length=100).prompt_budget(512, TaskOptions()) == 100
    assert dataclasses.replace(task, max_gen=16).prompt_budget(512, TaskOptions(max_tokens=300)) == 300
    assert dataclasses.replace(task, context="stream").prompt_budget(512, TaskOptions()) == 32_768
    with pytest.raises(TaskArgError, match="512 tokens leaves no prompt .gov_report generates 512"):
        task.prompt_budget(512, TaskOptions())
    assert task.params(TaskOptions(trained_context=4096))["prompt_budget"] == 3584


def test_no_room_for_a_prompt_fails_in_planning(capsys, stories_dir, data_dir, tmp_path, no_model_work):
    out = one_line_error(capsys, ["run", "--model", str(stories_dir), "--tasks", "longbench", "--data-dir",
                                  str(data_dir), "--out", str(tmp_path)])
    assert "leaves no prompt" in out and "longbench.max_gen" in out


def test_min_new_tokens_forbids_an_end_as_the_first_token(model):
    """samsum's rule (pred.py's min_length = prompt + 1): the first token is the best one that is not an end."""
    prompt = torch.arange(3, 19)
    config = METHODS.get("vanilla").config(MethodContext(n_layers=2, segment_len=64, trained_context=64))
    with MemoryLM(model, config, segment_len=64) as lm:
        first = lm.generate(prompt, max_new_tokens=1)[0]
        assert lm.generate(prompt, max_new_tokens=4, eos_token_id=[first, 1]) == [first]
        forced = lm.generate(prompt, max_new_tokens=4, eos_token_id=[first, 1], min_new_tokens=1)
    logits = model(prompt.unsqueeze(0)).logits[0, -1]
    logits[[first, 1]] = float("-inf")
    assert forced[0] == int(logits.argmax()) != first and len(forced) > 1


def test_samples_hash_their_prompt_and_save_it_on_request(stories, data_dir):
    model, tokenizer = stories
    task = dataclasses.replace(TASKS.get("longbench"), datasets=("samsum", "lcc"), max_gen=4, save_prompts=True)
    with vanilla_lm(model, "transformer_xl") as lm:
        samples = task.run(lm, tokenizer, TaskOptions(data_dir=data_dir, max_docs=1)).samples
    newline = tokenizer.encode("\n", add_special_tokens=False)[-1]
    for s in samples:
        ids = tokenizer(s["prompt"])["input_ids"]
        assert s["prompt_ids_sha256"] == ids_digest(ids) and s["prompt_tokens"] == len(ids)
    assert samples[0]["generated_tokens"] >= 1 and not samples[0]["prediction"].startswith("\n")
    assert newline not in tokenizer(samples[0]["prediction"], add_special_tokens=False)["input_ids"][:1]


def test_cli_writes_predictions_scores_and_leaderboard_rows(stories_dir, data_dir, tmp_path):
    argv = ["run", "--model", str(stories_dir), "--methods", "vanilla,rmt", "--tasks", "longbench,longbench-e",
            "--data-dir", str(data_dir), "--limit", "1", "--task-arg", "datasets=qasper,trec,lcc", "--task-arg",
            "max_gen=2", "--task-arg", "max_length=128", "--out", str(tmp_path)]
    assert cli.main(argv) == 0
    board = pd.read_csv(tmp_path / "leaderboard.csv", keep_default_na=False)
    assert set(board["method"]) == {"vanilla", "rmt"} and set(board["task"]) == {"longbench", "longbench-e"}
    subtasks = set(board[board["task"] == "longbench-e"]["subtask"])
    assert {"", "qasper", "qasper/0-4k", "category:few_shot/en", "length:0-4k"} <= subtasks
    for run_id in set(board["run_id"]):
        samples = [json.loads(line) for line in (tmp_path / "runs" / run_id / "samples.jsonl").read_text().splitlines()]
        assert [s["dataset"] for s in samples] == ["qasper", "trec", "lcc"]
        headline = board[(board["run_id"] == run_id) & (board["subtask"] == "")].set_index("metric")["value"]
        assert headline["score/dataset_mean"] == pytest.approx(sum(s["score"] for s in samples) / 3)
        assert all(s["prompt_ids_sha256"] and s["prompt_tokens"] <= 128 + 2 for s in samples)
        assert list(board[(board["run_id"] == run_id) & board["headline"]]["metric"]) == ["score/en"]
