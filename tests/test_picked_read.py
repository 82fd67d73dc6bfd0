"""The native read of picked memory slots (`picked_read`): the PyTorch path's merged output and a float64
reference's, for given logits, for slots scored against the bank and for keys rotated to their slots' positions
first (Unlimiformer's scaled positions), over strided banks, missing slots, -inf and NaN logits; the engine's top-k
and chunk reads the same with the kernel and without; what it declines."""

from __future__ import annotations

import pytest
import torch
from helpers import random_docs, tiny_llama

from unimem_bench.methods import METHODS, MemoryLM, MethodContext
from unimem_bench.methods.engine import native, picked_read
from unimem_bench.methods.engine.attention import merge_picked
from unimem_bench.methods.engine.buckets import bucket_ids_numpy, shared_bucket
from unimem_bench.methods.engine.kernels import rotate

pytestmark = pytest.mark.skipif(native.library() is None,
                                reason="no C compiler here: the native kernels cannot be built")


def turned(key, cos, sin):
    """A key [..., dim] rotated by RoPE tables [..., dim] (transformers' half rotation), written out here."""
    half = key.shape[-1] // 2
    return key * cos + torch.cat([-key[..., half:], key[..., :half]], dim=-1) * sin


def reference(queries, keys, values, slots, offset, logits, out, lse, scale, place=None, lse_too=False):
    """float64, one query row at a time: softmax over [the local log-sum-exp; the found slots' scaled logits]
    (keys rotated first by `place`'s table rows where[slot], when given); with `lse_too` also the log-sum-exp of
    that softmax [batch, heads, rows]."""
    batch, heads, rows, dim = queries.shape
    merged = torch.empty(batch, heads, rows, dim, dtype=torch.float64)
    merged_lse = torch.empty(batch, heads, rows, dtype=torch.float64)
    for b in range(batch):
        for h in range(heads):
            for i in range(rows):
                parts = [] if lse is None else [(lse[b, h, i].double(), out[b, h, i].double())]
                for j, slot in enumerate(slots[b, h, i].tolist()):
                    if slot < 0:
                        continue
                    key = keys[b, h, slot + offset].double()
                    if place is not None:
                        at = int(place[2][slot + offset])
                        key = turned(key, place[0][at].double(), place[1][at].double())
                    raw = logits[b, h, i, j].double() if logits is not None else queries[b, h, i].double() @ key
                    if bool(torch.isnan(raw)) or raw == float("-inf"):
                        continue
                    parts.append((raw * scale, values[b, h, slot + offset].double()))
                weights = torch.softmax(torch.stack([p[0] for p in parts]), dim=0)
                merged[b, h, i] = sum(w * v for w, (_, v) in zip(weights, parts, strict=True))
                merged_lse[b, h, i] = torch.stack([p[0] for p in parts]).logsumexp(0)
    return (merged, merged_lse) if lse_too else merged


def torch_path(queries, keys, values, slots, offset, logits, out, lse, scale, place=None):
    """`attention.merge_topk`'s PyTorch path for the same inputs (gathers, `kernels.rotate` of the picked keys with
    `place`, product, `merge_picked`), in float32."""
    found = slots >= 0
    idx = slots.clamp(min=0) + offset
    picked_v = torch.stack([values[b, h][idx[b, h]] for b in range(idx.shape[0]) for h in range(idx.shape[1])])
    picked_v = picked_v.view(*idx.shape, -1)  # [batch, kv_heads, q, k, dim]
    if logits is None:
        picked_k = torch.stack([keys[b, h][idx[b, h]] for b in range(idx.shape[0]) for h in range(idx.shape[1])])
        picked_k = picked_k.view(*idx.shape, -1)  # [batch, kv_heads, q, k, dim]
        if place is not None:
            picked_k = rotate(picked_k, place[0][place[2][idx]], place[1][place[2][idx]])
        logits = torch.einsum("bhqd,bhqkd->bhqk", queries, picked_k)
    found = found & (logits > float("-inf"))
    return merge_picked(out, lse, (logits * scale).masked_fill(~found, float("-inf")), picked_v)


def inputs(batch: int, heads: int, rows: int, n: int, dim: int, k: int, seed: int):
    """Random inputs: banks as views into a wider buffer (slots from 3 on), a quarter of the slots missing, some
    logits -inf or NaN."""
    g = torch.Generator().manual_seed(seed)
    buffer = torch.randn(batch, heads, n + 5, dim, generator=g)
    keys = buffer[:, :, 3:3 + n]  # [batch, kv_heads, n, dim], strided
    values = torch.randn(batch, heads, n + 5, dim, generator=g)[:, :, 3:3 + n]
    queries = torch.randn(batch, heads, rows, dim, generator=g)
    offset = 2
    slots = torch.randint(0, n - offset, (batch, heads, rows, k), generator=g)
    slots[torch.rand(slots.shape, generator=g) < 0.25] = -1
    logits = torch.randn(batch, heads, rows, k, generator=g) * 3
    logits[torch.rand(logits.shape, generator=g) < 0.1] = float("-inf")
    logits[torch.rand(logits.shape, generator=g) < 0.05] = float("nan")
    out = torch.randn(batch, heads, rows, dim, generator=g)
    lse = torch.randn(batch, heads, rows, generator=g) * 2
    return queries, keys, values, slots, offset, logits, out, lse


def tables(n: int, dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`SegmentPlan.topk_place` for n slots: RoPE (cos, sin) [20, dim] at 20 scattered positions up to 5,000, and
    each slot's row in them (slots share rows, as scaled positions do)."""
    g = torch.Generator().manual_seed(n)
    positions = torch.randperm(5000, generator=g)[:20].double()
    angles = positions[:, None] / 10000 ** (torch.arange(0, dim, 2).double() / dim)  # [20, dim / 2]
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().float(), angles.sin().float(), torch.randint(0, 20, (n,), generator=g)


# (batch, kv_heads, query rows, slots, dim, k): Memorizing Transformer's reference-model shape scaled down, LongMem's
# chunk read (k = 8 slots of 2 chunks), one KV head over three batch rows, a row of one slot, dim past the vector
# read's 128 (the scalar loops), dim 64 with a last block of 5 picks, dim 128 (eight whole vectors)
LAYOUTS = [(1, 2, 24, 300, 40, 32), (2, 3, 7, 50, 16, 8), (3, 1, 5, 40, 8, 1), (1, 1, 3, 20, 130, 4),
           (1, 2, 9, 60, 64, 21), (1, 1, 4, 25, 128, 3)]


@pytest.mark.parametrize("way", ["logits given", "scored here", "rotated and scored here"])
@pytest.mark.parametrize("batch,heads,rows,n,dim,k", LAYOUTS)
def test_read_equals_the_torch_path_and_a_float64_reference(way, batch, heads, rows, n, dim, k):
    queries, keys, values, slots, offset, logits, out, lse = inputs(batch, heads, rows, n, dim, k, n + k)
    slots[..., 0] = torch.arange(slots.shape[2]) % (n - offset)  # every row finds a slot: an own softmax is defined
    scored = way != "logits given"
    given = None if scored else logits
    if given is not None:
        given[..., 0] = 1.0
    place = tables(n, dim) if way == "rotated and scored here" else None
    args = (queries, keys if scored else None, values, slots, offset, given)
    got = picked_read.merge(*args, out, lse, 0.3, place=place)
    assert got is not None, "the kernel declined a read it should run"
    expected, expected_lse = reference(queries, keys, values, slots, offset, given, out, lse, 0.3, place, True)
    torch.testing.assert_close(got.double(), expected, atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(got, torch_path(queries, keys, values, slots, offset, given, out, lse, 0.3, place),
                               atol=2e-6, rtol=1e-5)
    both = picked_read.merge_with_lse(*args, out, lse, 0.3, place=place)
    assert both is not None and torch.equal(both[0], got)
    torch.testing.assert_close(both[1].double(), expected_lse, atol=2e-6, rtol=1e-6)
    own = picked_read.merge(*args, None, None, 0.3, place=place)
    assert own is not None, "the kernel declined its own softmax"
    expected = reference(queries, keys, values, slots, offset, given, None, None, 0.3, place)
    torch.testing.assert_close(own.double(), expected, atol=2e-6, rtol=1e-5)


def test_rows_without_a_found_slot_keep_the_local_read():
    queries, keys, values, slots, offset, logits, out, lse = inputs(1, 2, 6, 30, 8, 4, 1)
    slots[:, :, :3] = -1
    logits[:, :, 3:] = float("-inf")
    got = picked_read.merge(queries, None, values, slots, offset, logits, out, lse, 0.5)
    assert got is not None and torch.equal(got, out)


def test_read_is_stable_for_logits_far_above_the_local_log_sum_exp():
    """Logits of about 500 beside a local log-sum-exp of about 0: exp overflows float32 unless shifted by the
    maximum, as a softmax must be."""
    queries, keys, values, slots, offset, logits, out, lse = inputs(1, 2, 6, 30, 8, 4, 3)
    logits = logits.nan_to_num(nan=0.0, neginf=0.0) + 500
    got = picked_read.merge(queries, None, values, slots, offset, logits, out, lse, 1.0)
    assert got is not None and bool(got.isfinite().all())
    expected = reference(queries, keys, values, slots, offset, logits, out, lse, 1.0)
    torch.testing.assert_close(got.double(), expected, atol=2e-6, rtol=1e-5)


def test_read_declines_what_the_caller_reads_itself(monkeypatch):
    queries, keys, values, slots, offset, logits, out, lse = inputs(1, 2, 6, 30, 8, 4, 2)
    args = (queries, None, values, slots, offset, logits, out, lse)
    assert picked_read.merge(*args, 0.5) is not None
    assert picked_read.merge(*args, 0.0) is None  # scale <= 0: -inf logits would not stay -inf
    assert picked_read.merge(queries.double(), None, values.double(), slots, offset, logits.double(), out.double(),
                             lse.double(), 0.5) is None
    assert picked_read.merge(queries, None, values, slots, offset, logits.requires_grad_(), out, lse, 0.5) is None
    too_far = slots.clone()
    too_far[0, 0, 0, 0] = values.shape[2] - offset  # one past the bank: the kernel does not check bounds
    assert picked_read.merge(queries, None, values, too_far, offset, logits.detach(), out, lse, 0.5) is None
    place = tables(30, 8)
    assert picked_read.merge(queries, keys, values, slots, offset, None, out, lse, 0.5, place=place) is not None
    # rotation tables: only for keys scored here, a row for every slot (int64, within the tables), rows a head dim
    # wide, an even head dim
    assert picked_read.merge(queries, keys, values, slots, offset, logits.detach(), out, lse, 0.5,
                             place=place) is None
    cos, sin, where = place
    for bad in [(cos, sin, where[:-3]), (cos[:, :4], sin[:, :4], where), (cos, sin, where.clone().fill_(20)),
                (cos, sin, where.int())]:
        assert picked_read.merge(queries, keys, values, slots, offset, None, out, lse, 0.5, place=bad) is None
    odd = (queries[..., :7], keys[..., :7], values[..., :7], slots, offset, None, out[..., :7], lse)
    assert picked_read.merge(*odd, 0.5) is not None
    assert picked_read.merge(*odd, 0.5, place=(cos[:, :7].contiguous(), sin[:, :7].contiguous(), where)) is None
    monkeypatch.setenv(picked_read.SWITCH_ENV, "0")
    assert picked_read.merge(queries, None, values, slots, offset, logits.detach(), out, lse, 0.5) is None


def bucket_inputs(half: int, seed: int, rows: int = 30, n: int = 40):
    """A bucket read's inputs (`inputs`' banks and local read; 2 KV heads, `rows` rows, n slots from `offset`, dim
    8) and projections of 3 rounds, with ties: a slot and a row of zero projections (every entry tied), a round whose
    largest equals minus its smallest (the first half wins), repeated values (the first of them), and a limit under
    which some rows read nothing."""
    queries, keys, values, _, offset, _, out, lse = inputs(1, 2, rows, n + 2, 8, 1, seed)
    g = torch.Generator().manual_seed(seed)
    q_proj = torch.randn(1, 2, rows, 3 * half, generator=g).round(decimals=1)  # repeated values within a round
    k_proj = torch.randn(1, 2, n, 3 * half, generator=g).round(decimals=1)
    k_proj[0, 0, 5] = 0.0
    q_proj[0, 1, 2] = 0.0
    q_proj[0, 0, 4, :half] = 0.0
    q_proj[0, 0, 4, 1], q_proj[0, 0, 4, 3] = 0.7, -0.7  # max = -min
    limit = torch.randint(-3, n + 5, (rows,), generator=g)
    return queries, keys, values, q_proj, k_proj, limit, offset, out, lse


def bucket_reference(queries, keys, values, q_proj, k_proj, half, limit, offset, out, lse, scale):
    """The slots sharing a bucket, from `buckets.bucket_ids_numpy` and `shared_bucket`, read by `reference`."""
    shared = shared_bucket(bucket_ids_numpy(q_proj, half), bucket_ids_numpy(k_proj, half))  # [1, 2, 30, 40]
    n = k_proj.shape[2]
    shared = shared * (torch.arange(n) < limit[:, None])
    slots = torch.where(shared > 0, torch.arange(n), -1)
    return reference(queries, keys, values, slots, offset, None, out, lse, scale, lse_too=True)


@pytest.mark.parametrize(("half", "rows", "n"), [(16, 30, 40), (32, 30, 40), (5, 30, 40), (16, 70, 150)],
                         ids=["whole vectors", "two vectors", "portable", "past one block of 64"])
def test_bucket_read_equals_the_shared_buckets_read(half, rows, n):
    """The kernel's own bucket ids and slot lists read what the numpy ids and the shared-bucket mask select."""
    queries, keys, values, q_proj, k_proj, limit, offset, out, lse = bucket_inputs(half, half, rows, n)
    got = picked_read.merge_buckets(queries, keys, values, q_proj, k_proj, half, limit, offset, out, lse, 0.4)
    assert got is not None, "the kernel declined a bucket read it should run"
    expected, expected_lse = bucket_reference(queries, keys, values, q_proj, k_proj, half, limit, offset, out, lse,
                                              0.4)
    torch.testing.assert_close(got[0].double(), expected, atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(got[1].double(), expected_lse, atol=2e-6, rtol=1e-6)
    everything = picked_read.merge_buckets(queries, keys, values, q_proj, k_proj, half, None, offset, out, lse, 0.4)
    assert everything is not None
    expected = bucket_reference(queries, keys, values, q_proj, k_proj, half, torch.full((rows,), n), offset, out,
                                lse, 0.4)[0]
    torch.testing.assert_close(everything[0].double(), expected, atol=2e-6, rtol=1e-5)
    # projections laid out vector fastest, as `buckets.lsh_projections` gives them (the kernel's own layout)
    q_laid, k_laid = (p.transpose(2, 3).contiguous().transpose(2, 3) for p in (q_proj, k_proj))
    laid = picked_read.merge_buckets(queries, keys, values, q_laid, k_laid, half, limit, offset, out, lse, 0.4)
    assert laid is not None and torch.equal(laid[0], got[0]) and torch.equal(laid[1], got[1])
    wide = torch.randn(1, 2, rows, 3 * half + 1)
    assert picked_read.merge_buckets(queries, keys, values, wide, k_proj, half, None, offset, out, lse, 0.4) is None
    assert picked_read.merge_buckets(queries, keys, values, q_proj, k_proj, half, limit.int(), offset, out, lse,
                                     0.4) is None  # int32 limits


def test_every_instruction_set_build_reads_the_same(instruction_set_build):
    lib = instruction_set_build
    for half in (16, 5):
        queries, keys, values, q_proj, k_proj, limit, offset, out, lse = bucket_inputs(half, 7)
        got = picked_read.run_buckets(lib, queries, keys, values, q_proj, k_proj, half, limit, offset, out, lse, 0.4)
        expected = bucket_reference(queries, keys, values, q_proj, k_proj, half, limit, offset, out, lse, 0.4)[0]
        assert got is not None
        torch.testing.assert_close(got[0].double(), expected, atol=2e-6, rtol=1e-5)
    for batch, heads, rows, n, dim, k in LAYOUTS:
        queries, keys, values, slots, offset, logits, out, lse = inputs(batch, heads, rows, n, dim, k, n)
        for place in (None, tables(n, dim)):
            got = picked_read.run(lib, queries, keys, values, slots, offset, None, out, lse, 0.3, place)[0]
            expected = reference(queries, keys, values, slots, offset, None, out, lse, 0.3, place)
            torch.testing.assert_close(got.double(), expected, atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize(("name", "overrides"), [
    ("longmem", []),
    ("memorizing_transformer", []),
    ("memorizing_transformer", ["reading.index=faiss-flat"]),
    ("unimix", []),
    ("memorizing_transformer", ["reading.chunk_size=4"]),
    ("memorizing_transformer", ["reading.chunk_size=4", "reading.chunk_key=bounds"]),
    ("unlimiformer", []),
])
def test_engine_reads_are_the_same_with_the_kernel_and_without(monkeypatch, one_thread, name, overrides):
    """Every merge_topk read (top-k by torch and faiss, chunks by mean and bounds keys, top-k at Unlimiformer's
    scaled positions) and LongMem's memory attention through the kernel against the PyTorch path, scored end to
    end; the kernel must have run."""
    model = tiny_llama()
    docs = random_docs([70, 53])
    config = METHODS.get(name).config(MethodContext(2, 8, 256), ["management.size=40", *overrides])
    merge, reads = picked_read.merge, []
    monkeypatch.setattr(picked_read, "merge", lambda *args, **kw: reads.append(merge(*args, **kw)) or reads[-1])
    scores = {}
    for on in ("1", "0"):
        monkeypatch.setenv(picked_read.SWITCH_ENV, on)
        with MemoryLM(model, config, segment_len=8) as lm:
            scores[on] = torch.cat(lm.score(docs))
        if on == "1":
            assert reads and all(r is not None for r in reads), "the kernel did not read"
    torch.testing.assert_close(scores["1"], scores["0"], atol=1e-5, rtol=1e-5)
