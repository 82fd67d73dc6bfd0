"""Reformer's LSH buckets and the Routing Transformer's k-means routing beyond the reference grid: the degenerate
selectors equal dense reading of memory, the selectors really select, the seed decides, the centroids move as
online k-means, batching changes nothing, and settings that cannot run are refused."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import random_docs, tiny_llama

from unimem_bench.methods import METHODS, ConfigError, MemoryLM, MethodContext
from unimem_bench.methods.config import Reading
from unimem_bench.methods.engine import native, picked_read
from unimem_bench.methods.engine.buckets import (
    bucket_ids_arithmetic,
    bucket_ids_numpy,
    kmeans_step_native,
    lsh_hash,
    lsh_rotations,
    routed_slots,
    shared_bucket,
    slot_mask,
    update_centroids,
)

CONTEXT = MethodContext(n_layers=2, segment_len=8, trained_context=16)


def nll(method: str, *overrides: str, docs: list[torch.Tensor] | None = None,
        batch_size: int = 1) -> list[torch.Tensor]:
    model = tiny_llama(layers=2, heads=4, kv_heads=2, context=16, seed=3)
    config = METHODS.get(method).config(CONTEXT, ["management.overflow=fifo", "management.size=24", *overrides])
    with MemoryLM(model, config, segment_len=8, trained_context=16) as lm:
        return lm.score(docs or random_docs([40], seed=5), batch_size=batch_size)


def dense(*overrides: str) -> torch.Tensor:
    """The same memory read whole by position (no selector)."""
    return nll("reformer", "reading.lsh_buckets=0", "reading.read_all=true", *overrides)[0]


@pytest.mark.parametrize(("method", "one"), [("reformer", "reading.lsh_buckets=1"),
                                             ("routing", "reading.clusters=1")])
def test_one_bucket_or_cluster_reads_all_memory(method: str, one: str, one_thread) -> None:
    torch.testing.assert_close(nll(method, one)[0], dense(), atol=1e-5, rtol=0)


@pytest.mark.parametrize(("method", "a", "b"), [
    ("reformer", "reading.lsh_seed=0", "reading.lsh_seed=1"),
    ("routing", "reading.cluster_seed=0", "reading.cluster_seed=1")])
def test_selectors_select_and_the_seed_decides(method: str, a: str, b: str, one_thread) -> None:
    base = nll(method, a)[0]
    assert torch.equal(base, nll(method, a)[0])
    assert (base - nll(method, b)[0]).abs().max() > 1e-4
    assert (base - dense()).abs().max() > 1e-4  # a real subset of memory, not all of it


def test_more_rounds_read_a_superset() -> None:
    """A query's slots over rounds 0..r are the union of each round's: the first round's rotations are the same."""
    reading = Reading(lsh_buckets=8, lsh_rounds=4)
    rotations = lsh_rotations(reading, layer=1, kv_heads=2, dim=16, device=torch.device("cpu"))
    generator = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 2, 5, 16, generator=generator), torch.randn(1, 2, 30, 16, generator=generator)
    q_buckets, k_buckets = lsh_hash(q, rotations), lsh_hash(k, rotations)  # [1, 2, rounds, 5 or 30]
    union = shared_bucket(q_buckets, k_buckets)  # [1, 2, 5, 30]
    first = shared_bucket(q_buckets[:, :, :1], k_buckets[:, :, :1])
    assert torch.equal(union, torch.maximum(first, shared_bucket(q_buckets[:, :, 1:], k_buckets[:, :, 1:])))
    assert first.sum() < union.sum() < union.numel()
    assert torch.equal(lsh_hash(3.0 * q, rotations), lsh_hash(q, rotations))  # angular: the scale does not matter
    projected = torch.einsum("bhnd,hrdc->bhrnc", q, rotations)
    assert torch.equal(lsh_hash(q, rotations), torch.cat([projected, -projected], -1).argmax(-1).float())



def test_bucket_ids_by_numpy_equal_the_arithmetic_path() -> None:
    """The CPU path (numpy argmax/argmin) gives the arithmetic path's ids (the one other devices take), on random
    projections, a zero vector (every projection tied), max(xR) = -min(xR) ties and repeated values, at any scale."""
    generator = torch.Generator().manual_seed(4)
    projected = torch.randn(2, 3, 40, 4 * 8, generator=generator)  # [batch, kv_heads, n, rounds * half], half 8
    projected[0, 0, 3] = 0.0
    projected[0, 1, 5, :8] = torch.tensor([0.5, -0.5, 0.1, 0.2, -0.1, 0.0, 0.3, -0.2])  # max = -min: first half
    projected[1, 2, 7] = projected[1, 2, 7].round()  # ties among equal values: the first of them
    ids = bucket_ids_numpy(projected, 8)
    assert ids.shape == (2, 3, 4, 40) and ids.dtype == torch.float32
    assert torch.equal(ids, bucket_ids_arithmetic(projected, 8))
    assert ids[0, 0, :, 3].eq(0).all() and ids[0, 1, 0, 5] == 0
    for scale in (1e-30, 3.7e-9, 1e30):  # projections of vectors far from the unit sphere (none are normalized)
        scaled = projected * scale
        assert torch.equal(bucket_ids_arithmetic(scaled, 8), bucket_ids_numpy(scaled, 8))


def test_routing_is_balanced() -> None:
    reading = Reading(clusters=4)
    generator = torch.Generator().manual_seed(1)
    centroids = F.normalize(torch.randn(1, 2, 4, 8, generator=generator), dim=-1)
    q, k = torch.randn(1, 2, 6, 8, generator=generator), torch.randn(1, 2, 10, 8, generator=generator)
    selected = slot_mask(routed_slots(reading, centroids, q, k), 10)  # [1, 2, 6, 10]
    assert (selected.sum(-1) == 3).all()  # ceil(10 / 4) distinct members in every query's cluster
    sized = slot_mask(routed_slots(Reading(clusters=4, cluster_size=7), centroids, q, k), 10)
    assert (sized.sum(-1) == 7).all() and (sized >= selected).all()


def test_centroids_move_by_online_kmeans() -> None:
    centroids = F.normalize(torch.tensor([[[[1.0, 0.0], [0.0, 1.0], [-1.0, -1.0]]]]), dim=-1)  # [1, 1, 3, 2]
    queries = torch.tensor([[[[2.0, 0.2]], [[3.0, -0.2]]]])  # [1, heads 2, 1, 2]: both nearest centroid 0
    keys = torch.tensor([[[[0.1, 5.0]]]])  # [1, 1, 1, 2]: nearest centroid 1
    for decay in (0.0, 0.5):
        moved = update_centroids(Reading(clusters=3, cluster_decay=decay), centroids, queries, keys)
        units = F.normalize(torch.tensor([[2.0, 0.2], [3.0, -0.2]]), dim=-1)
        want0 = F.normalize(decay * centroids[0, 0, 0] + (1 - decay) * units.mean(0), dim=0)
        want1 = F.normalize(decay * centroids[0, 0, 1] + (1 - decay) * F.normalize(keys[0, 0, 0], dim=0), dim=0)
        torch.testing.assert_close(moved[0, 0, 0], want0)
        torch.testing.assert_close(moved[0, 0, 1], want1)
        assert torch.equal(moved[0, 0, 2], centroids[0, 0, 2])  # no members: unchanged


@pytest.mark.skipif(native.library() is None, reason="no C compiler here: the native kernels cannot be built")
def test_native_kmeans_step_equals_the_torch_step(monkeypatch) -> None:
    """`kmeans_step.c` moves the centroids as the PyTorch ops do: batch-expanded centroids, a zero point
    (F.normalize's eps), a centroid repeated (every point nearest it joins the first of the two, so the second has
    no member and is kept), grouped queries (two query heads a KV head)."""
    generator = torch.Generator().manual_seed(9)
    centroids = F.normalize(torch.randn(1, 2, 5, 8, generator=generator), dim=-1)
    centroids[:, :, 4] = centroids[:, :, 3]
    centroids = centroids.expand(3, -1, -1, -1)
    queries, keys = torch.randn(3, 4, 7, 8, generator=generator), torch.randn(3, 2, 7, 8, generator=generator)
    keys[0, 1, 2] = 0.0
    for decay in (0.0, 0.5, 0.999):
        reading = Reading(clusters=5, cluster_decay=decay)
        moved = kmeans_step_native(reading, centroids, queries, keys)
        assert moved is not None
        with monkeypatch.context() as m:
            m.setattr("unimem_bench.methods.engine.buckets.kmeans_step_native", lambda *a: None)
            expected = update_centroids(reading, centroids, queries, keys)
        torch.testing.assert_close(moved, expected, atol=1e-6, rtol=0)
        assert torch.equal(moved[:, :, 4], centroids[:, :, 4])  # no members: unchanged
    assert kmeans_step_native(Reading(clusters=5), centroids.double(), queries.double(), keys.double()) is None


@pytest.mark.parametrize("method", ["reformer", "routing"])
def test_documents_batched_equal_documents_alone(method: str, one_thread) -> None:
    """Centroids are per document: a batch of three reads what each document reads alone."""
    docs = random_docs([40, 17, 29], seed=8)
    together = nll(method, docs=docs, batch_size=3)
    for doc, got in zip(docs, together, strict=True):
        torch.testing.assert_close(got, nll(method, docs=[doc])[0], atol=1e-5, rtol=0)


@pytest.mark.skipif(native.library() is None, reason="no C compiler here: the native kernels cannot be built")
@pytest.mark.parametrize("method", ["reformer", "routing"])
@pytest.mark.parametrize("window", [[], ["reading.window=6", "reading.sliding=true"]], ids=["segment", "sliding"])
def test_native_read_of_the_selected_slots_equals_the_masked_dense_read(method: str, window: list[str], monkeypatch,
                                                                         one_thread) -> None:
    """On CPU the selected slots are scored and read by the native kernel: the same NLLs as the fused kernel over
    all memory slots under the additive mask (the path of autograd and other devices), with a window reaching into
    the searchable slots too."""
    ran = []
    for name in ("merge_with_lse", "merge_buckets"):  # routing's slots, and Reformer's shared buckets
        real = getattr(picked_read, name)
        monkeypatch.setattr(picked_read, name, lambda *a, real=real, **kw: ran.append(r := real(*a, **kw)) or r)
    kernel = nll(method, *window)[0]
    assert ran and all(r is not None for r in ran), "the native read did not run"
    monkeypatch.setenv(picked_read.SWITCH_ENV, "0")
    torch.testing.assert_close(kernel, nll(method, *window)[0], atol=2e-6, rtol=0)


@pytest.mark.parametrize(("method", "override", "problem"), [
    ("reformer", "reading.lsh_buckets=3", "even"), ("reformer", "reading.lsh_rounds=0", "lsh_rounds"),
    ("reformer", "reading.topk=2", "reading.topk=0"), ("reformer", "reading.clusters=2", "set one to 0"),
    ("routing", "reading.cluster_decay=1", "cluster_decay"), ("routing", "reading.read_all=true", "read_all"),
    ("routing", "management.size=0", "management.size")])
def test_bad_selector_settings_are_refused(method: str, override: str, problem: str) -> None:
    with pytest.raises(ConfigError, match=problem):
        METHODS.get(method).config(CONTEXT, [override])
