"""Query-aware compression (kvpress' query_aware): every score-based eviction also scores with the question's queries.

The engine against the float64 reference (the question after every segment: its queries score, its keys are never
kept), the question changing what a score-based method keeps but nothing of methods without one, and the
`query_mode` task argument of NIAH, RULER and LongBench passing the prompt's question and recording the mode.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
import torch
from helpers import random_docs, tiny_llama
from reference_unimem import EvictionSpec, eviction_nll
from task_helpers import memory_lm
from test_eviction import config_for, peaked_llama, reference_llama

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


def task_under_test(kind: str, mode: str, books: Path, longbench: Path) -> tuple[object, TaskOptions]:
    args = {"niah": {"lengths": "300", "depths": "0,1", "max_new_tokens": 4, "preset": "story"},
            "ruler_niah_single_1": {"lengths": "300", "depths": "0,1", "max_new_tokens": 4},
            "longbench": {"datasets": "qasper,multifieldqa_en", "max_gen": 3, "context": "stream"}}[kind]
    task = configure([TASKS.get(kind)], [("", k, v) for k, v in {**args, "query_mode": mode}.items()])[0]
    options = TaskOptions(data_dir=longbench, max_docs=1) if kind == "longbench" else TaskOptions(data_dir=books)
    return task, options


@pytest.mark.parametrize("kind", ["niah", "ruler_niah_single_1", "longbench"])
def test_query_mode_passes_the_question_records_the_mode_and_leaves_vanilla_alone(kind, stories_dir, books_dir,
                                                                                  tmp_path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(stories_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(stories_dir)
    longbench = write_longbench_dir(tmp_path / "longbench", n=1, words=120)
    samples = {}
    for method in ("vanilla", "tova"):
        for mode in ("query_agnostic", "query_aware"):
            task, options = task_under_test(kind, mode, books_dir, longbench)
            with memory_lm(model, method, segment_len=64) as lm:
                recorder = QuestionRecorder(lm)
                samples[method, mode] = task.run(recorder, tokenizer, options).samples
            assert task.params(options)["query_mode"] == mode
            assert all(s["query_mode"] == mode for s in samples[method, mode])
            for prompt, question in zip(recorder.prompts, recorder.questions, strict=True):
                if mode == "query_agnostic":
                    assert question is None
                else:  # the question is the end of the prompt (tokenised on its own: compare the text)
                    assert question and tokenizer.decode(prompt).rstrip().endswith(tokenizer.decode(question).strip())

    def without_mode(rows: list[dict]) -> list[dict]:
        return [{k: v for k, v in s.items() if k != "query_mode"} for s in rows]

    assert without_mode(samples["vanilla", "query_aware"]) == without_mode(samples["vanilla", "query_agnostic"])
