"""Top-k search: exact torch search against brute force, faiss indexes against exact search."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from unimem_bench.methods.config import Reading
from unimem_bench.methods.engine.faiss_bank import FaissBank
from unimem_bench.methods.engine.retrieval import chunk_keys, chunk_queries, topk_chunk_slots, topk_exact
from unimem_bench.methods.engine.selection import SORT_MAX, kth_largest


@pytest.fixture(params=["fused", "numpy"])
def search_path(request, monkeypatch) -> str:
    """Runs a test of `topk_exact` on both of its CPU paths: the native kernel (`fused_topk`, used from MIN_ROWS
    query rows a group; these tests have 24) and the matmul-and-numpy search (the kernel switched off)."""
    from unimem_bench.methods.engine import fused_topk, native

    if request.param == "fused" and native.library() is None:
        pytest.skip("no C compiler here: the fused top-k kernel cannot be built")
    monkeypatch.setenv(fused_topk.SWITCH_ENV, "1" if request.param == "fused" else "0")
    return request.param


def data(n: int, q: int = 24, dim: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    # [batch 2, kv_heads 3, ...]
    return torch.randn(2, 3, q, dim, generator=generator), torch.randn(2, 3, n, dim, generator=generator)


@pytest.mark.parametrize("chunk", [7, 64, 10_000])
def test_chunked_exact_search_equals_brute_force(chunk, search_path):
    queries, keys = data(300)
    scores, idx = topk_exact(queries, keys, 5, chunk=chunk)
    expected_scores, expected_idx = (queries @ keys.transpose(-1, -2)).topk(5, dim=-1)
    torch.testing.assert_close(scores, expected_scores)
    assert torch.equal(idx, expected_idx)


def test_faiss_flat_gives_the_exact_neighbours_over_an_id_range():
    queries, keys = data(500)
    bank = FaissBank(Reading(topk=8, index="faiss-flat"), capacity=1000)
    bank.rebuild(keys, first_id=100)
    # search bank slots [50, 450): memory ids 150..549
    scores, idx = bank.search(queries, 8, first_id=150, start=0, stop=400)
    expected_scores, expected_idx = topk_exact(queries, keys[:, :, 50:450], 8)
    assert torch.equal(idx, expected_idx)
    torch.testing.assert_close(scores, expected_scores, atol=1e-5, rtol=1e-5)
    # a range not starting at bank slot 0 (the bank's own global slots come first): indices stay bank indices
    _, idx = bank.search(queries, 8, first_id=150, start=20, stop=400)
    assert torch.equal(idx, topk_exact(queries, keys[:, :, 70:450], 8)[1] + 20)


def test_exact_search_with_per_query_limits(search_path):
    queries, keys = data(300)
    limit = torch.arange(queries.shape[2]) % 7 + 3  # query i searches keys [0, limit[i])
    scores, idx = topk_exact(queries, keys, 5, chunk=64, limit=limit)
    full = (queries @ keys.transpose(-1, -2)).masked_fill(torch.arange(300) >= limit[:, None], float("-inf"))
    expected_scores, expected_idx = full.topk(5, dim=-1)
    torch.testing.assert_close(scores, expected_scores)  # -inf where a query has fewer than 5 keys
    found = expected_scores > float("-inf")
    assert torch.equal(idx[found], expected_idx[found])


@pytest.mark.parametrize("n,k,chunk", [(300, 5, 10_000), (300, 5, 64), (1280, 32, 8192), (1000, 32, 333),
                                       (40, 32, 8192), (200, 200, 8192), (700, 4, 8192), (300, 100, 64)])
def test_exact_search_ranks_ties_by_key_index(n, k, chunk, search_path):
    """The documented order: scores descending, equal scores by lower key index, also at the k-th place (a stable
    descending sort of the whole row), with many ties (small integer scores) and per-query limits."""
    generator = torch.Generator().manual_seed(n + k)
    queries = torch.randint(-2, 3, (2, 3, 24, 4), generator=generator).float()
    keys = torch.randint(-2, 3, (2, 3, n, 4), generator=generator).float()
    limit = n - torch.arange(24) * (n // 30)  # some queries with fewer than k keys
    scores, idx = topk_exact(queries, keys, k, chunk=chunk, limit=limit)
    full = (queries @ keys.transpose(-1, -2)).masked_fill(torch.arange(n) >= limit[:, None], float("-inf"))
    expected_scores, expected_idx = full.sort(dim=-1, descending=True, stable=True)
    assert torch.equal(scores, expected_scores[..., :k])
    assert torch.equal(idx, expected_idx[..., :k])


@pytest.mark.parametrize("k", [5, 300])  # 300: every key (no search)
def test_exact_search_ranks_nan_like_torch_topk(search_path, k):
    queries, keys = data(300)
    keys[0, 1, 17, 0] = float("nan")
    scores, idx = topk_exact(queries, keys, k)
    expected_scores, expected_idx = (queries @ keys.transpose(-1, -2)).topk(k, dim=-1)
    torch.testing.assert_close(scores, expected_scores, equal_nan=True)
    assert torch.equal(idx, expected_idx)


@pytest.mark.parametrize("index", ["faiss-ivf", "faiss-hnsw"])
def test_approximate_indexes_find_most_true_neighbours(index):
    queries, keys = data(4000, q=64)
    bank = FaissBank(Reading(topk=10, index=index, ivf_lists=32, ivf_probe=8), capacity=4000)
    bank.rebuild(keys, first_id=0)
    _, idx = bank.search(queries, 10, first_id=0, start=0, stop=4000)
    _, exact = topk_exact(queries, keys, 10)
    recall = (idx.unsqueeze(-1) == exact.unsqueeze(-2)).any(-1).float().mean().item()
    assert recall > 0.8


def test_faiss_bank_follows_fifo_writes_and_rebuilds_when_stale():
    reading = Reading(topk=4, index="faiss-flat")
    bank = FaissBank(reading, capacity=8)
    _, keys = data(40)
    held = keys[:, :, :8]
    bank.add(held, 0, held, 0)
    for start in range(8, 40, 4):  # FIFO: 4 new keys evict the 4 oldest
        held = keys[:, :, start - 4:start + 4]
        bank.add(keys[:, :, start:start + 4], start, held, start - 4)
        queries, _ = data(1, seed=start)
        _, idx = bank.search(queries, 4, first_id=start - 4, start=0, stop=8)
        assert torch.equal(idx, topk_exact(queries, held, 4)[1])
    assert bank.count <= 2 * 8 + 4


@pytest.mark.parametrize("kind", ["mean", "bounds"])
def test_chunk_search_reads_the_best_chunks_by_brute_force(kind):
    queries, keys = data(50, q=12)  # chunks of 4: twelve full, one of 2
    limit = torch.arange(12) * 4 + 5  # query i ranks the chunks wholly before limit[i]
    slots, found = topk_chunk_slots(queries, keys, 12, 4, kind, limit=limit)
    for b, h, i in [(0, 0, 0), (1, 2, 5), (0, 1, 11)]:
        q, scores = queries[b, h, i], []
        for lo in range(0, 50, 4):
            block = keys[b, h, lo:lo + 4]
            inside = lo + len(block) <= limit[i]
            bound = torch.maximum(q * block.amin(0), q * block.amax(0)).sum() if kind == "bounds" else block.mean(0) @ q
            scores.append((float(bound) if inside else float("-inf"), lo))
        best = [lo for s, lo in sorted(scores, reverse=True)[:3] if s > float("-inf")]
        expected = sorted(j for lo in best for j in range(lo, min(lo + 4, 50)))
        assert sorted(slots[b, h, i][found[b, h, i]].tolist()) == expected


def test_bounds_are_upper_bounds_of_every_key_in_the_chunk():
    queries, keys = data(64)
    bound = chunk_queries(queries, "bounds") @ chunk_keys(keys, 8, "bounds").transpose(-1, -2)  # [2, 3, 24, 8]
    exact = (queries @ keys.transpose(-1, -2)).unflatten(-1, (8, 8)).amax(-1)
    assert (bound >= exact - 1e-5).all()


def test_chunks_covering_all_memory_read_every_slot():
    queries, keys = data(30)
    slots, found = topk_chunk_slots(queries, keys, 32, 4, "mean")
    assert torch.equal(slots.masked_fill(~found, -1).sort(-1).values[..., 2:],
                       torch.arange(30).expand(2, 3, 24, 30))


def test_best_first_selection_equals_a_stable_sort_of_the_row():
    """`top_best_first` (numpy selection of `selection.best_k`, argmax passes for k <= 4, the general path for ties
    and NaN) equals a stable descending sort of each row cut at k, on rows with ties, -inf and columns past the last
    whole block; `best_k` itself answers every row without ties."""
    from unimem_bench.methods.engine.retrieval import top_best_first
    from unimem_bench.methods.engine.selection import best_k, block_split

    g = torch.Generator().manual_seed(3)
    answered = 0
    for trial in range(150):
        rows, n = int(torch.randint(1, 70, (1,), generator=g)), int(torch.randint(40, 1500, (1,), generator=g))
        k = int(torch.randint(1, min(n - 1, 48), (1,), generator=g))
        scores = torch.randn(2, rows, n, generator=g)
        if trial % 3 == 1:
            scores = (scores * 3).round()  # many ties
        if trial % 4 == 2:
            scores[..., n // 3:] = float("-inf")
        values, pos = top_best_first(scores, k)
        expected_values, expected_pos = scores.sort(dim=-1, descending=True, stable=True)
        assert torch.equal(values, expected_values[..., :k]) and torch.equal(pos, expected_pos[..., :k])
        if trial % 3 == 0 and trial % 4 != 2 and block_split(n, k) > 1 and n // block_split(n, k) > k:
            picked = best_k(scores.reshape(-1, n), k)
            assert picked is not None
            assert torch.equal(picked[1].view_as(pos), pos)
            answered += 1
    assert answered > 10


@pytest.mark.parametrize("n", [SORT_MAX - 1, SORT_MAX, SORT_MAX + 1, 3 * SORT_MAX])
def test_kth_largest_equals_the_kth_of_a_sorted_row_on_both_paths(n: int) -> None:
    """`selection.kth_largest` (a whole-row sort up to SORT_MAX values, introselect beyond) gives each row's k-th
    largest value, with ties, infinities and NaN (counted as the largest, as numpy orders them)."""
    g = np.random.default_rng(n)
    rows = g.standard_normal((40, n)).astype(np.float32)
    rows[::3] = np.round(rows[::3] * 2)  # ties
    rows[1::5, :7] = np.inf
    rows[2::7, 3:9] = np.nan
    for k in (1, 2, 32, n - 1, n):
        expected = np.array([sorted(r.tolist(), key=lambda v: (np.isnan(v), 0.0 if np.isnan(v) else v),
                                    reverse=True)[k - 1]
                             for r in rows], dtype=np.float32)
        got = kth_largest(rows, k)
        assert got.shape == (40, 1)
        np.testing.assert_array_equal(got[:, 0], expected)


@pytest.mark.parametrize("chunk", [64, 10_000])
@pytest.mark.parametrize("rows_a_block", [4, 26, 52])
@pytest.mark.parametrize("heads", [3, 6])
def test_exact_search_in_query_row_blocks_equals_one_block(monkeypatch, chunk: int, rows_a_block: int,
                                                           heads: int) -> None:
    """Searches split by KV heads (in groups: two heads a block at 52 rows and 6 heads) and batch rows, and within
    those into query-row blocks of at most SCORE_BLOCK scores (here 3 to 4 rows a block, the last shorter; or one
    head's 26 rows), give the one block's picks and (to float32 rounding) scores, with per-query limits too."""
    from unimem_bench.methods.engine import fused_topk, retrieval

    monkeypatch.setenv(fused_topk.SWITCH_ENV, "0")  # the splits are the numpy path's
    queries, keys = data(300, q=26)  # [2 batch rows, 3 KV heads, ...]; or [1, 6, ...]
    queries, keys = (t.reshape(6 // heads, heads, *t.shape[2:]) for t in (queries, keys))
    limit = torch.randint(0, 301, (26,), generator=torch.Generator().manual_seed(5))
    whole = [topk_exact(queries, keys, 6, chunk=chunk, limit=lim) for lim in (None, limit)]
    monkeypatch.setattr(retrieval, "SCORE_BLOCK", rows_a_block * min(300, chunk))
    for lim, (scores, idx) in zip((None, limit), whole, strict=True):
        blocked_scores, blocked_idx = topk_exact(queries, keys, 6, chunk=chunk, limit=lim)
        assert torch.equal(blocked_idx, idx)
        # BLAS may sum a matmul of fewer rows in another order (MKL on AMD Zen: last bits differ at 3-4 rows a block)
        torch.testing.assert_close(blocked_scores, scores, rtol=0, atol=1e-5)
