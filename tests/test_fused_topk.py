"""The native top-k kernel (`fused_topk`): the same picks, order and scores as the matmul-and-numpy search and a
float64 reference, on every layout the engine hands it; where it declines; how it is built and cached."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from unimem_bench.methods.engine import fused_topk, native
from unimem_bench.methods.engine.retrieval import topk_exact

pytestmark = pytest.mark.skipif(native.library() is None,
                                reason="no C compiler here: the fused top-k kernel cannot be built")


def numpy_path(monkeypatch, queries, keys, k, limit=None):
    """`topk_exact` with the kernel switched off."""
    with monkeypatch.context() as m:
        m.setenv(fused_topk.SWITCH_ENV, "0")
        return topk_exact(queries, keys, k, limit=limit)


def fused(queries, keys, k, limit=None):
    found = fused_topk.search(queries, keys, k, limit)
    assert found is not None, "the kernel declined a search it should run"
    return found


# (batch, kv_heads, queries, slots, dim, k): FoT's and Memorizing Transformer's shapes scaled down, rows past one
# register block (37, 40, 600), past one item of 256 rows (600), a last key block of fewer than R keys (333, 1,285),
# more keys than one chunk of 1,024 (1,280, 1,285), k = 1, k = n - 1, three batch rows of one KV head
LAYOUTS = [(1, 8, 128, 1024, 64, 32), (1, 2, 256, 1280, 40, 32), (2, 3, 37, 333, 13, 5), (3, 1, 16, 300, 8, 1),
           (1, 2, 40, 50, 16, 49), (1, 1, 600, 1285, 8, 3)]
MANY_PICKS = (1, 2, 40, 3000, 16, 600)
"""k = 600: ranked by the radix sort (from `RADIX_FROM` = 256 pairs). Its float32 order of near-equal scores is the
numpy path's, not always float64's, so it is checked against the numpy path (and for ties, exactly, below)."""


@pytest.mark.parametrize("batch,heads,rows,n,dim,k", LAYOUTS)
def test_kernel_equals_the_numpy_search_and_a_float64_reference(monkeypatch, batch, heads, rows, n, dim, k):
    g = torch.Generator().manual_seed(n + k)
    queries, keys = torch.randn(batch, heads, rows, dim, generator=g), torch.randn(batch, heads, n, dim, generator=g)
    limits = [None, torch.randint(0, n + 5, (rows,), generator=g)]  # some rows read nothing, some fewer than k keys
    for limit in limits:
        scores, idx = fused(queries, keys, k, limit)
        expected_scores, expected_idx = numpy_path(monkeypatch, queries, keys, k, limit)
        assert torch.equal(idx, expected_idx)
        torch.testing.assert_close(scores, expected_scores, rtol=0, atol=1e-5)
        full = queries.double() @ keys.double().transpose(-1, -2)  # [batch, kv_heads, rows, n]
        if limit is not None:
            full = full.masked_fill(torch.arange(n) >= limit[:, None], float("-inf"))
        reference, reference_idx = full.sort(dim=-1, descending=True, stable=True)
        torch.testing.assert_close(scores.double(), reference[..., :k], rtol=1e-5, atol=1e-5)
        found = reference[..., :k] > float("-inf")
        assert torch.equal(idx[found], reference_idx[..., :k][found])
        # rows with fewer than k keys: their masked keys of lowest index, at -inf
        assert torch.equal(idx[~found], reference_idx[..., :k][~found])


def test_many_picks_equal_the_numpy_search(monkeypatch):
    batch, heads, rows, n, dim, k = MANY_PICKS
    g = torch.Generator().manual_seed(k)
    queries, keys = torch.randn(batch, heads, rows, dim, generator=g), torch.randn(batch, heads, n, dim, generator=g)
    limit = torch.randint(0, n + 5, (rows,), generator=g)
    for kept in (None, limit):
        scores, idx = fused(queries, keys, k, kept)
        expected_scores, expected_idx = numpy_path(monkeypatch, queries, keys, k, kept)
        assert torch.equal(idx, expected_idx)
        torch.testing.assert_close(scores, expected_scores, rtol=0, atol=1e-5)


@pytest.mark.parametrize("n,k", [(300, 5), (1280, 32), (200, 150), (64, 63), (1200, 300), (3000, 1000)])
def test_ties_go_to_the_lower_key_index_also_at_the_kth_place(n, k):
    """Small integer scores (exact in float32, many ties): the kernel's picks and order equal a stable descending
    sort of the row, cut at k (from 256 picks ranked by the radix sort), with per-query limits; also the keys of a
    batch of banks read through a narrowed view (the engine's `mem.keys[:, :, lo:hi]`)."""
    g = torch.Generator().manual_seed(n)
    queries = torch.randint(-2, 3, (2, 3, 24, 4), generator=g).float()
    bank = torch.randint(-2, 3, (2, 3, n + 40, 4), generator=g).float()
    keys = bank[:, :, 10:10 + n]  # not contiguous: batch rows 3 (n + 40) x 4 apart
    limit = n - torch.arange(24) * (n // 30)
    scores, idx = fused(queries, keys, k, limit)
    full = (queries @ keys.transpose(-1, -2)).masked_fill(torch.arange(n) >= limit[:, None], float("-inf"))
    expected_scores, expected_idx = full.sort(dim=-1, descending=True, stable=True)
    assert torch.equal(scores, expected_scores[..., :k])
    assert torch.equal(idx, expected_idx[..., :k])


@pytest.mark.parametrize("n,k", [(2000, 16), (12000, 64)], ids=["one strip", "past one strip"])
def test_thread_count_changes_nothing(n, k):
    g = torch.Generator().manual_seed(1)
    queries, keys = torch.randn(1, 3, 70, 32, generator=g), torch.randn(1, 3, n, 32, generator=g)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = fused(queries, keys, k)
        torch.set_num_threads(2)
        two = fused(queries, keys, k)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one[0], two[0]) and torch.equal(one[1], two[1])


def test_kernel_declines_what_the_caller_ranks_itself(monkeypatch):
    """None (the caller's path runs): NaN scores, a key scoring -inf itself, too few rows, k >= n, autograd, the
    switch; `topk_exact` still answers the NaN search as torch.topk does."""
    g = torch.Generator().manual_seed(2)
    queries, keys = torch.randn(1, 2, 16, 8, generator=g), torch.randn(1, 2, 100, 8, generator=g)
    assert fused_topk.search(queries, keys, 4) is not None
    nan_keys = keys.clone()
    nan_keys[0, 1, 17, 0] = float("nan")
    assert fused_topk.search(queries, nan_keys, 4) is None
    expected = (queries @ nan_keys.transpose(-1, -2)).topk(4, dim=-1)
    torch.testing.assert_close(topk_exact(queries, nan_keys, 4)[0], expected.values, equal_nan=True)
    inf_queries = torch.full_like(queries, 1.0)
    inf_keys = torch.ones_like(keys)
    inf_keys[..., 30:, :] = float("-inf")  # keys 30.. score -inf; with a limit of 50 the row holds fewer than k others
    assert fused_topk.search(inf_queries, inf_keys, 40, torch.full((16,), 50)) is None
    assert fused_topk.search(queries[:, :, :fused_topk.MIN_ROWS - 1], keys, 4) is None
    assert fused_topk.search(queries, keys, 100) is None
    assert fused_topk.search(queries.requires_grad_(), keys, 4) is None
    monkeypatch.setenv(fused_topk.SWITCH_ENV, "0")
    assert fused_topk.search(queries.detach(), keys, 4) is None


def test_build_is_cached_per_source_compiler_and_cpu(tmp_path: Path, monkeypatch):
    """One build per (source, compiler command, CPU): a second call reuses the file; another CPU signature builds
    anew beside it; a compiler that fails gives None (the numpy path), not an error."""
    first = native.build(tmp_path, "cc")
    assert first is not None and first.is_file()
    stamp = first.stat().st_mtime_ns
    assert native.build(tmp_path, "cc") == first and first.stat().st_mtime_ns == stamp
    monkeypatch.setattr(native, "cpu_signature", lambda: "flags: another cpu")
    other = native.build(tmp_path, "cc")
    assert other is not None and other != first
    assert native.build(tmp_path, str(tmp_path / "no-such-compiler")) is None
    assert native.build(tmp_path, "cc -fno-such-flag") is None
    (tmp_path / "blocked").write_text("a file where the cache folder would be")
    assert native.build(tmp_path / "blocked", "cc") is None
    assert sorted(p.name for p in tmp_path.glob("native/*/*")) == [native.NAME, native.NAME]


def test_every_instruction_set_build_gives_the_same_picks(monkeypatch, instruction_set_build):
    """The AVX2 and plain-C builds give the numpy path's picks and scores too (without AMX tiles, which need
    AVX-512); `native.library` would not load the plain one (slower than numpy), but it is correct."""
    lib = instruction_set_build
    assert lib.tiles_usable() == 0
    for batch, heads, rows, n, dim, k in [*LAYOUTS[1:], MANY_PICKS]:
        g = torch.Generator().manual_seed(n)
        queries = torch.randn(batch, heads, rows, dim, generator=g)
        keys = torch.randn(batch, heads, n, dim, generator=g)
        limit = torch.randint(0, n + 5, (rows,), generator=g)
        found = fused_topk.run(lib, queries, keys, k, limit, native.group_stride(keys))
        assert found is not None
        expected = numpy_path(monkeypatch, queries, keys, k, limit)
        assert torch.equal(found[1], expected[1])
        torch.testing.assert_close(found[0], expected[0], rtol=0, atol=1e-5)


def tiles_and_registers(monkeypatch, queries, keys, k, limit=None):
    """The kernel's picks and scores scored on AMX tiles, then on SIMD registers (`UNIMEM_BENCH_TILES=0`)."""
    found = {}
    for on in ("1", "0"):
        with monkeypatch.context() as m:
            m.setenv(fused_topk.TILES_ENV, on)
            found[on] = fused_topk.search(queries, keys, k, limit)
    return found["1"], found["0"]


needs_tiles = pytest.mark.skipif(native.library() is None or not native.library().tiles_usable(),
                                 reason="no AMX tiles on this CPU (or the OS does not grant them)")


def routed_to_tiles(n: int, dim: int, k: int) -> bool:
    """Whether the kernel hands a search of n slots, head dim `dim` and k picks to its tile path (its own
    `tiles_take`: one strip for k <= 64 and at least 40 k slots, more slots for k <= 256 and at least 64 k)."""
    lib = native.library()
    return lib is not None and bool(lib.tiles_take(n, dim, k))


# (batch, kv_heads, queries, slots, dim, k), all routed to tiles: the register layouts that are, one tile row of
# dims (8, 13, 16, 24) and two (40, 64), a full strip (8,192 slots), 70 and 33 rows (blocks of 32 left short), k =
# 64; 300 rows of two KV heads (two items a head: the second reuses its head's keys, not the other head's); past
# one strip (strips of 2,048) with the floor's thresholds, k = 256 (Unlimiformer's) and k = 32, a last strip and a
# last floor group left short, and with thresholds from the groups seen so far (k <= 16: LongMem's chunk search's
# k = 8, k = 12 and k = 1), a last strip of 16 keys plus 1
TILE_LAYOUTS = [layout for layout in LAYOUTS if routed_to_tiles(layout[3], layout[4], layout[5])] + [
    (1, 2, 70, 8192, 24, 16), (2, 1, 33, 2600, 64, 64), (1, 3, 40, 2000, 16, 7), (1, 2, 300, 3000, 24, 16),
    (1, 2, 40, 17000, 40, 256), (2, 1, 33, 12345, 16, 32), (1, 2, 70, 20000, 64, 8), (2, 1, 50, 9000, 24, 12),
    (1, 1, 40, 8209, 16, 1)]


@needs_tiles
@pytest.mark.parametrize("batch,heads,rows,n,dim,k", TILE_LAYOUTS)
def test_tiles_give_the_registers_picks_and_scores_bit_for_bit(monkeypatch, batch, heads, rows, n, dim, k):
    assert routed_to_tiles(n, dim, k), "a layout the registers take would compare them with themselves"
    g = torch.Generator().manual_seed(n + dim)
    queries, keys = torch.randn(batch, heads, rows, dim, generator=g), torch.randn(batch, heads, n, dim, generator=g)
    for limit in (None, torch.randint(0, n + 5, (rows,), generator=g)):
        tiles, registers = tiles_and_registers(monkeypatch, queries, keys, k, limit)
        assert torch.equal(tiles[0], registers[0]) and torch.equal(tiles[1], registers[1])


@needs_tiles
@pytest.mark.parametrize("n,k", [(3000, 24), (9000, 100), (9000, 6), (9000, 14)],
                         ids=["one strip", "the floor", "groups so far, k 6", "groups so far, k 14"])
def test_tiles_decide_near_ties_in_float32(monkeypatch, n, k):
    """Keys 1e-6 apart score the same in bfloat16: the float32 scores of the register path decide between them, and
    exact ties go to the lower index; norms of 1e15 and 1e-20 move the bound, a norm past 2^60 makes it inf."""
    assert routed_to_tiles(n, 40, k)
    g = torch.Generator().manual_seed(5)
    queries = torch.randn(1, 2, 48, 40, generator=g)
    base = torch.randn(1, 2, 1, 40, generator=g)
    keys = base + 1e-6 * torch.randn(1, 2, n, 40, generator=g)  # [1, 2, n, 40]: all within bfloat16's step
    keys[:, :, 100:200] = keys[:, :, 0:100]  # exact duplicates of lower-index keys
    for scale in (1.0, 1e15, 1e-20):
        tiles, registers = tiles_and_registers(monkeypatch, queries, keys * scale, k)
        assert torch.equal(tiles[0], registers[0]) and torch.equal(tiles[1], registers[1])
    huge = keys.clone()
    huge[:, :, 7] *= 2.0**61
    tiles, registers = tiles_and_registers(monkeypatch, queries, huge, k, torch.full((48,), n - 1000))
    assert torch.equal(tiles[0], registers[0]) and torch.equal(tiles[1], registers[1])


@needs_tiles
def test_tiles_decline_as_the_registers_do(monkeypatch):
    """A NaN score or a key scoring -inf itself: None on tiles as on registers; a head dim past 64 runs on
    registers."""
    g = torch.Generator().manual_seed(6)
    queries, keys = torch.randn(1, 2, 40, 24, generator=g), torch.randn(1, 2, 500, 24, generator=g)
    nan_keys = keys.clone()
    nan_keys[0, 0, 300, 3] = float("nan")
    assert tiles_and_registers(monkeypatch, queries, nan_keys, 8) == (None, None)
    for n, k in ((400, 8), (9000, 17), (9000, 8)):  # one strip, the floor, the groups seen so far
        ones, minus = torch.ones(1, 1, 20, 4), torch.ones(1, 1, n, 4)
        minus[..., 3:, :] = float("-inf")  # keys 3.. score -inf; with a limit of 50 a row holds fewer than k
        assert routed_to_tiles(n, 4, k)
        assert tiles_and_registers(monkeypatch, ones, minus, k, torch.full((20,), 50)) == (None, None)
    assert not routed_to_tiles(300, 80, 8)
    wide_q, wide_k = torch.randn(1, 1, 20, 80, generator=g), torch.randn(1, 1, 300, 80, generator=g)
    tiles, registers = tiles_and_registers(monkeypatch, wide_q, wide_k, 8)
    assert torch.equal(tiles[0], registers[0]) and torch.equal(tiles[1], registers[1])
