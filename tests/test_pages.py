"""Page reading (Quest, InfLLM) against the float64 reference's naive page ranking, slot for slot.

Quest: pages of 16 ranked by their min/max bound, per query head; InfLLM: blocks ranked by the mean of their r
keys of highest representative score. The engine's `topk_chunk_slots` and the reference's `best_chunk_slots` (loops
over pages, no engine code) must pick the same slots for every query, head and limit, a short last page included.
"""

from __future__ import annotations

import pytest
import torch
from helpers import random_docs, tiny_llama
from reference_unimem import Description, View, best_chunk_slots

from unimem_bench.methods import METHODS, ConfigError, MemoryLM, MethodContext
from unimem_bench.methods.engine.retrieval import representative_scores, topk_chunk_slots

F64 = torch.float64


def reference_view(keys: torch.Tensor, reps: torch.Tensor | None) -> View:
    """keys [kv_heads, n, dim] (reps [kv_heads, n]) as the reference's searchable memory of one layer."""
    n = keys.shape[1]
    empty = keys.new_zeros(0, keys.shape[0], keys.shape[2])
    return View(global_keys=empty, global_values=empty, window_index=[], window_keys=empty, window_values=empty,
                search_index=list(range(n)), search_keys=keys.transpose(0, 1), search_values=keys.transpose(0, 1),
                n_bank=n, n_prefix=0, search_reps=[None if reps is None else reps[:, j] for j in range(n)])


@pytest.mark.parametrize(("kind", "page", "pages", "representatives"), [
    ("bounds", 16, 3, 0), ("bounds", 16, 1, 0), ("representative", 16, 2, 4), ("representative", 5, 3, 2),
    ("representative", 8, 2, 8)])
def test_page_selection_equals_the_naive_reference(kind: str, page: int, pages: int, representatives: int) -> None:
    generator = torch.Generator().manual_seed(11)
    n, dim, kv_heads, queries = 150, 8, 2, 9  # 150 slots: a short last page for every page size here
    keys = torch.randn(1, kv_heads, n, dim, generator=generator, dtype=F64)
    q = torch.randn(1, kv_heads, queries, dim, generator=generator, dtype=F64)
    reps = torch.randn(1, kv_heads, n, generator=generator, dtype=F64) if kind == "representative" else None
    limit = torch.tensor([150, 149, 144, 97, 64, 33, 17, 16, 3])  # query i ranks the pages wholly before limit[i]
    slots, found = topk_chunk_slots(q, keys, pages * page, page, kind, limit=limit, scores=reps,
                                    representatives=representatives)
    spec = Description(segment_len=8, topk=pages * page, chunk_size=page, chunk_key=kind,
                       representatives=representatives)
    view = reference_view(keys[0], None if reps is None else reps[0])
    for g in range(kv_heads):
        for i in range(queries):
            expected = sorted(best_chunk_slots(spec, view, q[0, g, i], g, int(limit[i])))
            assert sorted(slots[0, g, i][found[0, g, i]].tolist()) == expected, (g, i)


def test_representative_scores_are_the_mean_dot_product_with_later_queries() -> None:
    generator = torch.Generator().manual_seed(3)
    queries = torch.randn(1, 4, 6, 5, generator=generator, dtype=F64)  # 4 query heads on 2 KV heads
    keys = torch.randn(1, 2, 6, 5, generator=generator, dtype=F64)
    got = representative_scores(queries, keys)
    for g in range(2):
        for m in range(6):
            dots = [float(queries[0, h, i] @ keys[0, g, m]) for h in (2 * g, 2 * g + 1) for i in range(m, 6)]
            assert float(got[0, g, m]) == pytest.approx(sum(dots) / len(dots), abs=1e-12)


@pytest.mark.parametrize(("method", "overrides", "message"), [
    ("quest", ["position.mode=compact"], "position.mode=official or absolute"),
    ("quest", ["reading.representatives=0"], "reading.representatives=0"),
    ("infllm", ["writing.kv=pooling"], "writing.kv=direct"),
    ("quest", ["reading.dense_layers=1-x"], "injection.layers: '1-x'"),
    ("infllm", ["reading.chunk_select=chunk"], "reading.chunk_select='chunk'"),
    ("infllm", ["reading.chunk_block=-1"], "reading.chunk_block=-1"),
    ("unlimiformer", ["reading.chunk_size=4", "reading.chunk_select=block"], "position.scaled_memory=false"),
])
def test_page_reading_values_are_validated(method: str, overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        METHODS.get(method).config(MethodContext(n_layers=4, segment_len=64, trained_context=512), overrides)


def test_dense_layers_must_be_injected() -> None:
    config = METHODS.get("quest").config(MethodContext(n_layers=4, segment_len=64, trained_context=512),
                                         ["injection.layers=2,3", "reading.dense_layers=0,1"])
    with pytest.raises(ConfigError, match="outside injection.layers=2-3"):
        config.bind(n_layers=4, segment_len=64)


def test_blocks_of_one_query_decode_as_they_score() -> None:
    """A decoded token is a block of one: with `reading.chunk_block=1` generation reads what scoring reads (every
    greedy token is the argmax of scoring the finished text), across segment boundaries with blocks in memory."""
    model = tiny_llama(layers=3, seed=3)
    ctx = MethodContext(n_layers=3, segment_len=8, trained_context=256)
    config = METHODS.get("infllm").config(ctx, ["reading.topk=2", "reading.chunk_size=2", "reading.chunk_block=1"])
    assert config.reading.chunk_select == "block"
    prompt = random_docs([13], seed=5)[0]
    with MemoryLM(model, config, segment_len=8) as lm:
        new = lm.generate(prompt, max_new_tokens=20)
        scores = lm.score_tokens([torch.cat([prompt, torch.tensor(new)])])[0]
    assert scores.greedy[len(prompt) - 1:].all()
