"""Content selectors merged into the one softmax: Reformer's LSH buckets and the Routing Transformer's k-means routing.

Both pick, per query and KV head, a subset of the searchable memory slots (the non-global bank slots before the
query's window reach, as top-k searches) and add them to the softmax of the window and local keys through
log-sum-exp (the rules are `Reading.lsh_buckets` and `Reading.clusters`). The selection is a boolean mask over the
searchable slots scored in one batched product: no sorting by bucket and no per-query gathers, so the cost is that of
dense attention over the (bounded, Clear All) memory.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from unimem_bench.methods.config import Reading
from unimem_bench.methods.engine.memory import LayerMemory


def lsh_rotations(reading: Reading, layer: int, kv_heads: int, dim: int, device: torch.device) -> torch.Tensor:
    """The layer's seeded random rotations [kv_heads, rounds, dim, buckets // 2] (float32)."""
    generator = torch.Generator().manual_seed(reading.lsh_seed * 1_000_003 + layer)
    rotations = torch.randn(kv_heads, reading.lsh_rounds, dim, reading.lsh_buckets // 2, generator=generator)
    return rotations.to(device)


def lsh_hash(x: torch.Tensor, rotations: torch.Tensor) -> torch.Tensor:
    """Angular LSH: x [batch, kv_heads, n, dim] -> bucket ids [batch, kv_heads, n, rounds], argmax of [xR ; -xR]."""
    if not rotations.shape[-1]:  # one bucket
        return torch.zeros(*x.shape[:3], rotations.shape[1], dtype=torch.long, device=x.device)
    projected = torch.einsum("bhnd,hrdc->bhnrc", x.float(), rotations)  # [batch, kv_heads, n, rounds, buckets / 2]
    return torch.cat([projected, -projected], dim=-1).argmax(-1)


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
    points = torch.cat([queries.detach().reshape(batch, kv_heads, -1, dim), keys.detach()], dim=2)
    points = F.normalize(points.float(), dim=-1)  # [batch, kv_heads, points, dim]
    nearest = (points @ centroids.transpose(-1, -2)).argmax(-1)  # [batch, kv_heads, points]
    onehot = F.one_hot(nearest, centroids.shape[2]).to(points.dtype)  # [batch, kv_heads, points, clusters]
    counts = onehot.sum(2)  # [batch, kv_heads, clusters]
    means = (onehot.transpose(-1, -2) @ points) / counts.clamp(min=1).unsqueeze(-1)
    moved = F.normalize(reading.cluster_decay * centroids + (1 - reading.cluster_decay) * means, dim=-1)
    return torch.where(counts.unsqueeze(-1) > 0, moved, centroids)


def routed(reading: Reading, centroids: torch.Tensor, queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Balanced routing: queries [batch, kv_heads, q, dim] and searchable keys [batch, kv_heads, n, dim] -> [batch,
    kv_heads, q, n] True where the key is a member of the query's nearest cluster."""
    n = keys.shape[2]
    size = min(n, reading.cluster_size or math.ceil(n / reading.clusters))
    similarity = centroids @ F.normalize(keys.float(), dim=-1).transpose(-1, -2)  # [batch, kv_heads, clusters, n]
    # Stable: among equal similarities (a repeated token's equal keys) the older slot is a member first.
    members = similarity.sort(dim=-1, descending=True, stable=True).indices[..., :size]
    member = torch.zeros_like(similarity, dtype=torch.bool).scatter_(-1, members, True)
    nearest = (F.normalize(queries.float(), dim=-1) @ centroids.transpose(-1, -2)).argmax(-1)  # [batch, kv_heads, q]
    return member.gather(2, nearest.unsqueeze(-1).expand(-1, -1, -1, n))


def merge_buckets(reading: Reading, bank: LayerMemory, mem: LayerMemory, layer: int, start: int, end: torch.Tensor,
                  query: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                  scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Add each query's selected slots of mem's bank [start, end[query]) to the softmax of `out`/`lse` (one softmax
    over the union); `bank` (the live layer memory) holds the LSH rotations. Returns the merged (out, lse)."""
    assert mem.keys is not None and mem.values is not None
    batch, heads, seq, dim = query.shape
    kv_heads = mem.keys.shape[1]
    group = heads // kv_heads
    q = query.reshape(batch, kv_heads, group * seq, dim)  # [batch, kv_heads, group * seq, dim]
    keys, values = mem.keys[:, :, start:], mem.values[:, :, start:]  # [batch, kv_heads, n, dim]
    if reading.lsh_buckets:
        if bank.rotations is None:
            bank.rotations = lsh_rotations(reading, layer, kv_heads, dim, query.device)
        rotations = bank.rotations
        selected = (lsh_hash(q, rotations).unsqueeze(3) == lsh_hash(keys, rotations).unsqueeze(2)).any(-1)
    else:
        centroids = mem.centroids if mem.centroids is not None else initial_centroids(
            reading, layer, batch, kv_heads, dim, query.device)  # a memory written before any segment was routed
        selected = routed(reading, centroids, q, keys)  # [batch, kv_heads, group * seq, n]
    limit = end.repeat(group) - start  # [group * seq]: q's rows are (group, seq) flattened
    selected &= torch.arange(keys.shape[2], device=query.device) < limit[:, None]
    logits = torch.einsum("bhqd,bhnd->bhqn", q, keys.to(q.dtype)) * scale
    logits = logits.masked_fill(~selected, float("-inf"))
    lse_s = logits.logsumexp(-1)  # [batch, kv_heads, group * seq]
    probs = torch.exp(logits - lse_s.unsqueeze(-1)).nan_to_num(0.0)  # a query selecting nothing: all zero
    out_s = (probs @ values.to(q.dtype)).reshape(batch, heads, seq, dim)
    lse_s = lse_s.reshape(batch, heads, seq)
    total = torch.logaddexp(lse.to(lse_s.dtype), lse_s)
    merged = out * torch.exp(lse - total).unsqueeze(-1) + out_s * torch.exp(lse_s - total).unsqueeze(-1)
    return merged, total


def write_centroids(reading: Reading, bank: LayerMemory, layer: int, queries: torch.Tensor,
                    keys: torch.Tensor) -> None:
    """After a written segment, move the layer's centroids (made on first use) towards its queries and keys."""
    if bank.centroids is None:
        bank.centroids = initial_centroids(reading, layer, keys.shape[0], keys.shape[1], keys.shape[3], keys.device)
    bank.centroids = update_centroids(reading, bank.centroids, queries, keys)
