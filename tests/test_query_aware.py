"""Query-aware compression (kvpress' query_aware): every score-based eviction also scores with the question's queries.

The engine against the float64 reference (the question after every segment: its queries score, its keys are never
kept), the question changing what a score-based method keeps but nothing of methods without one, and the
`query_mode` task argument of NIAH, every RULER task and LongBench passing the prompt's question, recording the mode
and changing what a compressing memory keeps of the task's own prompts.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import pytest
import torch
from helpers import random_docs, tiny_llama
from reference_unimem import EvictionSpec, eviction_nll
from task_helpers import memory_lm
from test_eviction import config_for, peaked_llama, reference_llama
from test_ruler_complete import squad_fixture

from unimem_bench.methods import METHODS, MemoryLM, MethodContext
from unimem_bench.tasks import TASKS, TaskOptions
from unimem_bench.tasks.arguments import configure
from unimem_bench.tasks.longbench.fixture import write_longbench_dir

ATOL = 1e-5
QUESTION = (7, 41, 3)


def held(lm: MemoryLM, doc: torch.Tensor, question: tuple[int, ...] | None) -> tuple[list, list]:
    """Per layer and KV head, the ids held after streaming `doc` (observing `question`, if any), and their running
    scores (H2O, LRU; None otherwise)."""
    state = lm.new_state(1)
    with torch.inference_mode(), lm.observing(question):
        for start in range(0, len(doc) - 1, lm.segment_len):
            width = min(lm.segment_len, len(doc) - 1 - start)
            lm.forward_segment(state, doc[start:start + width].unsqueeze(0), start)
    layers = [state.layers[i] for i in sorted(state.layers)]
    return [m.ids[0].tolist() for m in layers], [None if m.scores is None else m.scores[0] for m in layers]


CASES = [
    EvictionSpec(segment_len=5, size=7, policy="h2o", recent=2, question=QUESTION),
    EvictionSpec(segment_len=5, size=7, policy="tova", position="compact", question=QUESTION),
    EvictionSpec(segment_len=6, size=6, policy="snapkv", observe=4, pool_kernel=3, sinks=1, question=QUESTION),
    EvictionSpec(segment_len=4, size=6, policy="lru", position="absolute", recent=2, question=QUESTION),
]


@pytest.mark.parametrize("spec", CASES, ids=lambda s: f"{s.policy}-{s.position}")
def test_query_aware_eviction_matches_reference(spec: EvictionSpec) -> None:
    model = peaked_llama(layers=2, heads=4, kv_heads=2, seed=4)
    doc = torch.randperm(99, generator=torch.Generator().manual_seed(3))[:23]
    expected_nll, expected_ids = eviction_nll(reference_llama(model), spec, doc)
    with MemoryLM(model, config_for(spec), segment_len=spec.segment_len) as lm:
        with lm.observing(spec.question):
            nll = lm.score([doc])[0]
        ids, scores = held(lm, doc, spec.question)
        agnostic, agnostic_scores = held(lm, doc, None)
    torch.testing.assert_close(nll.double(), expected_nll, atol=ATOL, rtol=0)
    assert ids == expected_ids
    if spec.policy == "h2o":  # accumulated attention keeps the oldest tokens either way; the question adds to it
        assert all(not torch.allclose(a, b) for a, b in zip(scores, agnostic_scores, strict=True))
    else:
        assert ids != agnostic  # the question changed what was kept


@pytest.mark.parametrize(("name", "changes"), [("vanilla", False), ("transformer_xl", False), ("knorm", False),
                                             ("quest", False), ("tova", True), ("snapkv", True)])
def test_the_question_changes_generation_only_for_attention_scored_eviction(name: str, changes: bool) -> None:
    """Last-query scorers (TOVA, SnapKV) keep other slots, so they generate differently; methods whose memory does not
    depend on attention scores generate exactly as without the question."""
    model = tiny_llama(layers=2, seed=2)
    config = METHODS.get(name).config(MethodContext(n_layers=2, segment_len=8, trained_context=256))
    prompt = random_docs([29], seed=4)[0]
    with MemoryLM(model, config, segment_len=8) as lm:
        agnostic = lm.generate(prompt, max_new_tokens=10)
        aware = lm.generate(prompt, max_new_tokens=10, question=list(QUESTION))
    assert (aware != agnostic) == changes


class QuestionRecorder:
    """The real model, keeping the `question` each prompt was generated with (None: none given)."""

    def __init__(self, lm: MemoryLM) -> None:
        self.lm, self.prompts, self.questions = lm, [], []
        self.segment_len, self.trained_context = lm.segment_len, lm.trained_context

    @contextlib.contextmanager
    def reading_at_once(self, length: int):
        with self.lm.reading_at_once(length):
            yield self

    def generate(self, prompt, **kwargs):
        self.prompts.append(prompt.tolist())
        self.questions.append(kwargs.get("question"))
        return self.lm.generate(prompt, **kwargs)


def write_qa_dir(folder: Path) -> Path:
    """RULER's squad.json and hotpotqa.json, generated: a few questions with their documents."""
    folder.mkdir(parents=True)
    (folder / "squad.json").write_text(json.dumps(squad_fixture()))
    hotpot = [{"question": f"Where did the cat number {i} sleep?", "answer": f"box {i}",
               "context": [[f"Cat {i}", [f"The cat number {i} slept in box {i}. ", "It was warm."]],
                           [f"Dog {i}", [f"The dog number {i} ran in the park {i}."]]]} for i in range(3)]
    (folder / "hotpotqa.json").write_text(json.dumps(hotpot))
    return folder


TASK_ARGS = {
    "niah": {"lengths": "300", "depths": "0,1", "max_new_tokens": 4, "preset": "story"},
    "ruler_niah_single_1": {"lengths": "300", "depths": "0,1", "max_new_tokens": 4},
    "longbench": {"datasets": "qasper,multifieldqa_en", "max_gen": 3, "context": "stream"},
    "ruler_qa_1": {"lengths": "400", "samples": 2, "max_new_tokens": 4},
    "ruler_qa_2": {"lengths": "400", "samples": 1, "max_new_tokens": 4},
    "ruler_vt": {"lengths": "700", "samples": 1, "max_new_tokens": 4},
    "ruler_cwe": {"lengths": "1200", "samples": 1, "max_new_tokens": 4},
    "ruler_fwe": {"lengths": "400", "samples": 2, "max_new_tokens": 4},
}
"""Small grids on stories260K: each task's smallest prompts (cwe's has its few-shot example, whose question comes
first and must not be taken for the prompt's)."""


def task_under_test(kind: str, mode: str, books: Path, data: Path) -> tuple[object, TaskOptions]:
    task = configure([TASKS.get(kind)], [("", k, v) for k, v in {**TASK_ARGS[kind], "query_mode": mode}.items()])[0]
    if kind == "longbench":
        return task, TaskOptions(data_dir=data / "longbench", max_docs=1)
    return task, TaskOptions(data_dir=data / "qa" if kind.startswith("ruler_qa") else books)


@pytest.mark.parametrize("kind", list(TASK_ARGS))
def test_query_mode_passes_the_question_records_the_mode_and_leaves_vanilla_alone(kind, stories_dir, books_dir,
                                                                                  tmp_path, one_thread) -> None:
    """Each prompt's question (the end of the prompt) reaches generation only under query_aware, where it changes
    the slots TOVA keeps of that prompt; vanilla's samples are the same in both modes."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(stories_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(stories_dir)
    write_longbench_dir(tmp_path / "longbench", n=1, words=120)
    write_qa_dir(tmp_path / "qa")
    samples = {}
    for method in ("vanilla", "tova"):
        for mode in ("query_agnostic", "query_aware"):
            task, options = task_under_test(kind, mode, books_dir, tmp_path)
            with memory_lm(model, method, segment_len=64) as lm:
                recorder = QuestionRecorder(lm)
                samples[method, mode] = task.run(recorder, tokenizer, options).samples
                if method == "tova" and mode == "query_aware":  # what the task's question does to the memory
                    prompt, question = torch.tensor(recorder.prompts[0]), recorder.questions[0]
                    assert held(lm, prompt, question)[0] != held(lm, prompt, None)[0]
            assert task.params(options)["query_mode"] == mode
            assert all(s["query_mode"] == mode for s in samples[method, mode])
            for prompt, question in zip(recorder.prompts, recorder.questions, strict=True):
                if mode == "query_agnostic":
                    assert question is None
                else:  # the question is the end of the prompt (tokenised on its own: compare the text)
                    assert question and tokenizer.decode(prompt).rstrip().endswith(tokenizer.decode(question).strip())
                    assert len(question) < len(prompt) // 2  # the question only, not a context or example with it

    def without_mode(rows: list[dict]) -> list[dict]:
        return [{k: v for k, v in s.items() if k != "query_mode"} for s in rows]

    assert without_mode(samples["vanilla", "query_aware"]) == without_mode(samples["vanilla", "query_agnostic"])


@pytest.mark.parametrize(("kind", "length", "examples"), [("ruler_vt", 4500, 1), ("ruler_cwe", 1200, 1)])
def test_the_question_is_the_last_one_after_the_in_context_examples(kind, length, examples, stories_dir) -> None:
    """vt's in-context example and cwe's few-shot example repeat the template: the question is the prompt's last."""
    from transformers import AutoTokenizer

    from unimem_bench.tasks.needle.ruler_synthetic import TEMPLATES

    tokenizer = AutoTokenizer.from_pretrained(stories_dir)
    args = {"max_new_tokens": 4, **({"fewshot_tokens": 600} if kind == "ruler_vt" else {})}  # vt's example: 544 tokens
    task = configure([TASKS.get(kind)], [("", k, v) for k, v in args.items()])[0]
    _, built = task.fitter(tokenizer).build(length, 0)
    start = TEMPLATES[kind[len("ruler_"):]][0].split("{context}")[1].split("{")[0]
    assert built.text.count(start) == 1 + examples  # the examples' questions, then the prompt's
    assert built.question.startswith(start) and built.text.endswith(built.question)
    assert built.question.count(start) == 1 and len(built.question) < 300


def test_the_ruler_group_hands_query_mode_to_every_member() -> None:
    group = configure([TASKS.get("ruler")], [("", "query_mode", "query_aware")])[0]
    members = group.tasks(512, with_qa=True)
    assert len(members) == 13 and {t.query_mode for t in members} == {"query_aware"}
    assert {t.query_mode for t in TASKS.get("ruler").tasks(512, with_qa=True)} == {"query_agnostic"}


def test_run_and_sweep_pass_query_mode_to_ruler_tasks_and_record_it(stories_dir, tmp_path, one_thread) -> None:
    """`--task-arg [task.]query_mode=...` through `run` (with a `--set` budget) and `sweep`: in each run's
    task_params and every sample."""
    from unimem_bench.harness.cli import app as cli

    common = ["--model", str(stories_dir), "--segment-len", "64", "--task-arg", "samples=1",
              "--task-arg", "max_new_tokens=4", "--task-arg", "ruler_fwe.lengths=400"]
    assert cli.main(["run", *common, "--methods", "snapkv", "--set", "management.size=32", "--tasks",
                     "ruler_fwe,ruler_vt", "--task-arg", "ruler_vt.lengths=700", "--task-arg",
                     "query_mode=query_aware", "--out", str(tmp_path / "run")]) == 0
    assert cli.main(["sweep", *common, "--method", "snapkv", "--vary", "management.size=32,48", "--tasks",
                     "ruler_fwe", "--task-arg", "ruler_fwe.query_mode=query_aware",
                     "--out", str(tmp_path / "sweep")]) == 0
    for out in ("run", "sweep"):
        folders = sorted((tmp_path / out / "runs").glob("*/run.json"))
        assert len(folders) == 2
        for path in folders:
            record = json.loads(path.read_text())
            assert record["task_params"]["query_mode"] == "query_aware"
            assert sum(layer["evicted"] for layer in record["memory_usage"]["layers"].values()) > 0
            samples = [json.loads(line) for line in (path.parent / "samples.jsonl").read_text().splitlines()]
            assert samples and all(s["query_mode"] == "query_aware" for s in samples)
