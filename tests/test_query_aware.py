"""Query-aware compression (kvpress' query_aware): every score-based eviction also scores with the question's queries.

The engine against the float64 reference (the question after every segment: its queries score, its keys are never
kept), the question changing what a score-based method keeps but nothing of methods without one, and the
`query_mode` task argument of NIAH, RULER and LongBench passing the prompt's question and recording the mode.
"""

from __future__ import annotations

import pytest
import torch
from helpers import random_docs, tiny_llama
from reference_unimem import EvictionSpec, eviction_nll
from test_eviction import config_for, peaked_llama, reference_llama

from unimem_bench.methods import METHODS, MemoryLM, MethodContext

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


@pytest.mark.parametrize("name", ["vanilla", "transformer_xl", "knorm", "quest"])
def test_the_question_changes_nothing_without_attention_scored_eviction(name: str) -> None:
    model = tiny_llama(layers=2, seed=2)
    config = METHODS.get(name).config(MethodContext(n_layers=2, segment_len=8, trained_context=256))
    prompt = random_docs([29], seed=4)[0]
    with MemoryLM(model, config, segment_len=8) as lm:
        agnostic = lm.generate(prompt, max_new_tokens=10)
        aware = lm.generate(prompt, max_new_tokens=10, question=list(QUESTION))
    assert aware == agnostic
