"""Content selectors merged into the one softmax: Reformer's LSH buckets and the Routing Transformer's k-means routing.

Both pick, per query and KV head, a subset of the searchable memory slots (the non-global bank slots before the
query's window reach, as top-k searches) and add them to the softmax of the window and local keys through
log-sum-exp (the rules are `Reading.lsh_buckets` and `Reading.clusters`). On CPU in float32 without autograd the
native picked-slot read (`picked_read`) scores and reads only the selected slots, straight from the bank: routing's
as lists of its clusters' members, Reformer's listed by the kernel itself from the bucket ids it takes of the
queries' and keys' projections. Elsewhere (autograd, other devices and dtypes) the selection is an additive mask
over the searchable slots, read by PyTorch's fused attention kernel: no sorting by bucket and no per-query gathers,
so the cost is that of dense attention over the (bounded, Clear All) memory.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from unimem_bench.methods.config import Reading
from unimem_bench.methods.engine import fused_topk, native, picked_read
from unimem_bench.methods.engine.kernels import FusedKernel, attention_with_lse, merge_lse
from unimem_bench.methods.engine.memory import LayerMemory
from unimem_bench.methods.engine.retrieval import top_best_first


def lsh_rotations(reading: Reading, layer: int, kv_heads: int, dim: int, device: torch.device) -> torch.Tensor:
    """The layer's seeded random rotations [kv_heads, rounds, dim, buckets // 2] (float32), laid out direction by
    direction ([kv_heads, rounds, buckets // 2, dim] in memory: `lsh_projections` multiplies by them as they lie)."""
    generator = torch.Generator().manual_seed(reading.lsh_seed * 1_000_003 + layer)
    rotations = torch.randn(kv_heads, reading.lsh_rounds, dim, reading.lsh_buckets // 2, generator=generator)
    return rotations.transpose(2, 3).contiguous().transpose(2, 3).to(device)


def lsh_projections(x: torch.Tensor, rotations: torch.Tensor) -> torch.Tensor:
    """x [batch, kv_heads, n, dim] rotated: [batch, kv_heads, n, rounds * half] (round-major), laid out vector
    fastest (a transposed view: the native read's layout, at the matmul's cost). x is not normalized: a bucket id
    does not change with a vector's scale (argmax and the sign of max + min)."""
    kv_heads, rounds, dim, half = rotations.shape
    # [kv_heads, rounds * half, dim]: a view of `lsh_rotations`' layout (a copy of any other)
    directions = rotations.transpose(2, 3).reshape(kv_heads, rounds * half, dim)
    # Bucket ids are piecewise constant in x: no gradient (the arithmetic path passes none either).
    return (directions @ x.detach().float().mT).mT


def lsh_hash(x: torch.Tensor, rotations: torch.Tensor) -> torch.Tensor:
    """Angular LSH: x [batch, kv_heads, n, dim] -> float bucket ids [batch, kv_heads, rounds, n], the argmax of
    [xR ; -xR] (exact whenever a vector's projections differ, i.e. but for a zero vector)."""
    rounds, half = rotations.shape[1], rotations.shape[3]
    if not half:  # one bucket
        return x.new_zeros(*x.shape[:2], rounds, x.shape[2], dtype=torch.float32)
    return bucket_ids(lsh_projections(x, rotations), half)


def bucket_ids(projected: torch.Tensor, half: int) -> torch.Tensor:
    """`lsh_hash`'s ids [batch, kv_heads, rounds, n] from projections [batch, kv_heads, n, rounds * half]."""
    if projected.device.type == "cpu":
        return bucket_ids_numpy(projected, half)
    return bucket_ids_arithmetic(projected, half)


def bucket_ids_numpy(projected: torch.Tensor, half: int) -> torch.Tensor:
    """`lsh_hash`'s ids from projections [batch, kv_heads, n, rounds * half] on CPU: numpy's SIMD argmax and argmin
    over rows of `half` values, one pass each (torch's CPU argmax over a short last dimension is 10x slower)."""
    batch, kv_heads, n, width = projected.shape
    rows = projected.numpy().reshape(-1, half)  # [batch * kv_heads * n * rounds, half], a view
    first_max, first_min = rows.argmax(1), rows.argmin(1)
    at = np.arange(len(rows))
    # The largest of [xR ; -xR] is -min(xR) where that exceeds max(xR); a tie stays in the first half.
    ids = np.where(rows[at, first_max] + rows[at, first_min] < 0, first_min + half, first_max)
    # Contiguous: a transposed view would make `shared_bucket`'s broadcast difference lay its [rounds, q, n]
    # output out transposed too, and its reduction over rounds twice as slow.
    return torch.from_numpy(ids.astype(np.float32)).view(batch, kv_heads, n, width // half).transpose(2, 3).contiguous()


def bucket_ids_arithmetic(projected: torch.Tensor, half: int) -> torch.Tensor:
    """`lsh_hash`'s ids from projections [batch, kv_heads, n, rounds * half] by arithmetic and reductions (other
    devices): the same ids as `bucket_ids_numpy`."""
    # On CPU, argmax over a short last dimension and boolean tensors are 10-100x slower than amax and float
    # arithmetic. Each round's projections are scaled by a power of two (exact) to a largest magnitude in
    # [0.5, 1): a gap between two different projections, one of them that largest (the target below), is then
    # >= 2^-25, and times SEPARATE far above the `half` that the argmax index adds.
    split = projected.unflatten(-1, (-1, half)).transpose(2, 3)  # [batch, kv_heads, rounds, n, half]
    split = torch.ldexp(split, -torch.frexp(split.abs().amax(-1, keepdim=True))[1])
    high, low = split.amax(-1), split.amin(-1)  # [batch, kv_heads, rounds, n]
    negative = ((high + low) < 0).float()  # the largest of [xR ; -xR] is -min(xR): a bucket in the second half
    target = torch.where(negative > 0, low, high).unsqueeze(-1)
    return first_zero((split - target).abs()) + negative * half


UNREAD = 1e30
"""The bias of a slot not read: below every logit read, so its weight is exactly 0, and finite (a query reading
no slot keeps a finite log-sum-exp; -inf would make its softmax NaN)."""

SEPARATE = 1e12
"""Scales a nonzero gap between two O(1) float32 values (>= ~1e-7) past any index (< 2^15)."""


def first_zero(gap: torch.Tensor) -> torch.Tensor:
    """The index (float) of the first zero along the last dimension of `gap` >= 0, whose other entries are O(1)
    apart from 0: argmax by amax and arithmetic, which on CPU are 10-100x faster than argmax and boolean masks."""
    order = torch.arange(gap.shape[-1], device=gap.device, dtype=gap.dtype)
    return -(-order - gap * SEPARATE).amax(-1)


def nearest_centroid(points: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Unit points [batch, kv_heads, n, dim], unit centroids [batch, kv_heads, clusters, dim] -> [batch, kv_heads, n]
    long: the first most similar centroid."""
    similarity = points @ centroids.transpose(-1, -2)  # [batch, kv_heads, n, clusters], cosines in [-1, 1]
    return similarity.argmax(-1)  # the first of equal maxima


def shared_bucket(query_buckets: torch.Tensor, key_buckets: torch.Tensor) -> torch.Tensor:
    """[batch, kv_heads, rounds, q] and [batch, kv_heads, rounds, n] float ids -> [batch, kv_heads, q, n] 1.0 where
    the query and the key share a bucket in at least one round, else 0.0."""
    apart = (query_buckets.unsqueeze(-1) - key_buckets.unsqueeze(-2)).abs_().amin(2)  # [batch, kv_heads, q, n]
    return 1 - apart.clamp(max=1)  # ids are whole numbers: a difference is 0 or >= 1


def initial_centroids(reading: Reading, layer: int, batch: int, kv_heads: int, dim: int,
                      device: torch.device) -> torch.Tensor:
    """Seeded unit centroids [batch, kv_heads, clusters, dim] (float32), the same for every document."""
    generator = torch.Generator().manual_seed(reading.cluster_seed * 1_000_003 + layer)
    centroids = F.normalize(torch.randn(kv_heads, reading.clusters, dim, generator=generator), dim=-1)
    return centroids.to(device).expand(batch, -1, -1, -1)


def update_centroids(reading: Reading, centroids: torch.Tensor, queries: torch.Tensor,
                     keys: torch.Tensor) -> torch.Tensor:
    """One online k-means step: centroids [batch, kv_heads, clusters, dim], the segment's queries [batch, heads, n,
    dim] and keys [batch, kv_heads, n, dim] (as the memory scores them); returns the new centroids."""
    batch, kv_heads, _, dim = keys.shape
    # The centroids take no gradient: under autograd (fine-tuning) too the native step runs.
    if (moved := kmeans_step_native(reading, centroids, queries.detach(), keys.detach())) is not None:
        return moved
    points = torch.cat([queries.detach().reshape(batch, kv_heads, -1, dim), keys.detach()], dim=2)
    points = F.normalize(points.float(), dim=-1)  # [batch, kv_heads, points, dim]
    nearest = nearest_centroid(points, centroids)  # [batch, kv_heads, points]
    onehot = F.one_hot(nearest, centroids.shape[2]).to(points.dtype)  # [batch, kv_heads, points, clusters]
    counts = onehot.sum(2)  # [batch, kv_heads, clusters]
    means = (onehot.transpose(-1, -2) @ points) / counts.clamp(min=1).unsqueeze(-1)
    moved = F.normalize(reading.cluster_decay * centroids + (1 - reading.cluster_decay) * means, dim=-1)
    return torch.where(counts.unsqueeze(-1) > 0, moved, centroids)


def kmeans_step_native(reading: Reading, centroids: torch.Tensor, queries: torch.Tensor,
                       keys: torch.Tensor) -> torch.Tensor | None:
    """`update_centroids` in one native pass (`kmeans_step.c`: no [points x clusters] one-hot, 13 torch ops fewer)
    on CPU in float32 without autograd; None elsewhere, or without the native kernels."""
    batch, kv_heads, n, dim = keys.shape
    lib = native.library()
    if lib is None or not all(t.device.type == "cpu" and t.dtype == torch.float32 and not t.requires_grad
                              for t in (centroids, queries, keys)):
        return None
    q = queries.reshape(batch, kv_heads, -1, dim).contiguous()  # [batch, kv_heads, group * n, dim]
    k, c = keys.contiguous(), centroids.contiguous()  # centroids may be a batch-expanded view
    moved = torch.empty(c.shape)
    failed = lib.kmeans_step(q.data_ptr(), q.stride(1), q.stride(2), q.shape[2], k.data_ptr(), k.stride(1),
                             k.stride(2), n, c.data_ptr(), moved.data_ptr(), batch * kv_heads, c.shape[2], dim,
                             reading.cluster_decay, 1 - reading.cluster_decay, torch.get_num_threads())
    return None if failed else moved


def routed_slots(reading: Reading, centroids: torch.Tensor, queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Balanced routing: queries [batch, kv_heads, q, dim] and searchable keys [batch, kv_heads, n, dim] -> [batch,
    kv_heads, q, size] long: the members of the query's nearest cluster (the `size` keys most similar to its
    centroid)."""
    n = keys.shape[2]
    size = min(n, reading.cluster_size or math.ceil(n / reading.clusters))
    nearest = nearest_centroid(F.normalize(queries.float(), dim=-1), centroids)  # [batch, kv_heads, q]
    if size == n:  # every slot a member
        return torch.arange(n, device=keys.device).expand(*nearest.shape, n)
    units = F.normalize(keys.detach().float(), dim=-1)  # membership is piecewise constant in the keys: no gradient
    # Among equal similarities (a repeated token's equal keys) the older slot is a member first, as a stable sort
    # would pick: on CPU one native pass (`fused_topk`), else the exact row top-k, 3-7x faster than that sort at
    # 128-256 slots.
    found = fused_topk.search(centroids.contiguous(), units, size)
    members = found[1] if found is not None else top_best_first(centroids @ units.transpose(-1, -2), size)[1]
    return members.gather(2, nearest.unsqueeze(-1).expand(-1, -1, -1, size))


def slot_mask(slots: torch.Tensor, n: int) -> torch.Tensor:
    """Slots [..., m] (< 0: none) of a bank of n -> [..., n] float, 1.0 where a slot is listed, else 0.0."""
    listed = torch.zeros(*slots.shape[:-1], n + 1, device=slots.device)
    return listed.scatter_(-1, slots + 1, 1.0)[..., 1:]  # a slot of -1 lands in column 0, dropped


def lsh_selection(q_ids: torch.Tensor, key_ids: torch.Tensor, limit: torch.Tensor | None) -> torch.Tensor:
    """Bucket ids [batch, kv_heads, rounds, q] and [batch, kv_heads, rounds, n] -> [batch, kv_heads, q, n] 1.0 where
    query row q shares a bucket with key slot j in some round and j < limit[q] (limit None: every slot), else 0.0."""
    selected = shared_bucket(q_ids, key_ids)
    if limit is not None:
        selected = selected * (limit[:, None] - torch.arange(key_ids.shape[-1], device=key_ids.device)).clamp(0, 1)
    return selected


def merge_buckets(reading: Reading, bank: LayerMemory, mem: LayerMemory, layer: int, start: int, end: torch.Tensor,
                  lowest: int, query: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, scale: float,
                  kernel: FusedKernel) -> tuple[torch.Tensor, torch.Tensor]:
    """Add each query's selected slots of mem's bank [start, end[query]) (those sharing an LSH bucket with it, or
    the members of its cluster) to the softmax of `out`/`lse`: one softmax over the union. On CPU in float32
    without autograd the native kernels score and read only the selected slots (`picked_read`); elsewhere the fused
    kernel reads all n slots under an additive mask. `lowest`: end's smallest entry (known from the plan); `bank`
    (the live layer memory) holds the LSH rotations. Returns the merged (out, lse)."""
    assert mem.keys is not None and mem.values is not None
    batch, heads, seq, dim = query.shape
    kv_heads = mem.keys.shape[1]
    group = heads // kv_heads
    rows = (batch, kv_heads, group * seq)  # q's rows are (group, seq) flattened per KV head
    q, out_rows, lse_rows = query.reshape(*rows, dim), out.reshape(*rows, dim), lse.reshape(rows)
    keys = mem.keys[:, :, start:]  # [batch, kv_heads, n, dim]
    n = keys.shape[2]
    # some query's window reaches into the searchable slots: those it must not read
    limit = end.repeat(group) - start if lowest - start < n else None  # [group * seq]
    if reading.lsh_buckets:
        if bank.rotations is None:
            bank.rotations = lsh_rotations(reading, layer, kv_heads, dim, query.device)
        half = bank.rotations.shape[3]
        if half:  # projected once: the native read takes its ids from them, else the mask path
            q_proj, k_proj = lsh_projections(q, bank.rotations), lsh_projections(keys, bank.rotations)
            merged = picked_read.merge_buckets(q, mem.keys, mem.values, q_proj, k_proj, half, limit, start, out_rows,
                                               lse_rows, scale)
            if merged is not None:
                return merged[0].view(batch, heads, seq, dim), merged[1].view(batch, heads, seq)
            q_ids, key_ids = bucket_ids(q_proj, half), bucket_ids(k_proj, half)
        else:  # one bucket
            q_ids, key_ids = lsh_hash(q, bank.rotations), lsh_hash(keys, bank.rotations)
        selected = lsh_selection(q_ids, key_ids, limit)  # [batch, kv_heads, group * seq, n]
    else:
        centroids = mem.centroids if mem.centroids is not None else initial_centroids(
            reading, layer, batch, kv_heads, dim, query.device)  # a memory written before any segment was routed
        slots = routed_slots(reading, centroids, q, keys)  # [batch, kv_heads, group * seq, size]
        if limit is not None:
            slots = slots.masked_fill(slots >= limit[:, None], -1)
        read = picked_read.merge_with_lse(q, mem.keys, mem.values, slots, start, None, out_rows, lse_rows, scale)
        if read is not None and read[1] is not None:
            return read[0].view(batch, heads, seq, dim), read[1].view(batch, heads, seq)
        selected = slot_mask(slots, n)
    # Finite, so that a query reading no slot keeps a finite log-sum-exp; within the query dtype's range.
    hide = min(UNREAD, torch.finfo(query.dtype).max / 4)
    bias = selected.sub_(1).mul_(hide).to(query.dtype).view(batch, heads, seq, n)  # selected: a fresh tensor
    # A query reading no slot gets a log-sum-exp near -UNREAD: the merge gives its (finite) output weight 0.
    out_s, lse_s = attention_with_lse(query, keys.to(query.dtype), mem.values[:, :, start:].to(query.dtype), bias,
                                      scale, kernel)
    return merge_lse(out, lse.to(lse_s.dtype), out_s, lse_s)


def write_centroids(reading: Reading, bank: LayerMemory, layer: int, queries: torch.Tensor,
                    keys: torch.Tensor) -> None:
    """After a written segment, move the layer's centroids (made on first use) towards its queries and keys."""
    if bank.centroids is None:
        bank.centroids = initial_centroids(reading, layer, keys.shape[0], keys.shape[1], keys.shape[3], keys.device)
    bank.centroids = update_centroids(reading, bank.centroids, queries, keys)
