"""Top-k search over a memory bank: the exact search (`topk_exact`: the native kernel of `fused_topk`, or score
blocks selected in numpy) and chunk-level retrieval; faiss indexes are in `faiss_bank`.

Both return the raw inner products of the k best keys, which are exactly the attention logits before scaling, so
the reading step never recomputes them.
"""

from __future__ import annotations

import numpy as np
import torch

from unimem_bench.methods.engine import fused_topk, selection

# Keys scored per step of the exact search: bounds the [queries x chunk] score block (64 MiB in fp32 for 2K queries).
SEARCH_CHUNK = 8192

SCORE_BLOCK = 1 << 21
"""Scores per block of the exact search (8 MiB of float32): past it, KV heads, then batch rows, are searched apart
in groups as large as fit in a block, then, where one head's scores still do not fit, its query rows in equal
blocks. A larger block is mapped afresh by glibc and page-faulted (past its 32 MiB mmap threshold), and has left
the cache before the selection reads it: FoT's [8 KV heads x 128 queries x 8,192 slots, dim 64] (62M model) x0.73
in 4 row blocks; a 32 MiB score matmul alone 27.1 ms fresh, 13.8 ms into a reused buffer. Heads before rows: a row
block of every head reads all heads' keys, a head its own, once (FoT, 62M model, 16K tokens, one process, 4
alternating repeats: 3.6% less time). Heads in groups, not one by one: fewer selection calls (20.5 against 22.5 ms
at FoT's 62M shape; 28.5 against 33.8 at 32 KV heads x 128 queries x 1,280 slots, dim 128: a 7B's shape)."""


def topk_exact(queries: torch.Tensor, keys: torch.Tensor, k: int, chunk: int = SEARCH_CHUNK,
               limit: torch.Tensor | None = None, lowest: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k inner products, chunked over keys and, past SCORE_BLOCK scores, over KV heads, batch rows, then
    query rows; with `limit` [q], query i searches keys [0, limit[i]) only; `lowest`: a key index no greater than
    any limit (0 will do), when the caller knows one (else limit's smallest entry is read off the tensor: a host
    sync on a GPU).

    queries [batch, kv_heads, q, dim], keys [batch, kv_heads, n, dim] -> (scores, indices), each
    [batch, kv_heads, q, min(k, n)], best first; score -inf where a query has fewer than k keys. Order and ties:
    scores descending, and among equal scores the lower key index first, also at the k-th place (which of several
    tied keys is kept); a query with fewer than k keys gets its masked keys of lowest index, at -inf. Rows holding
    NaN, and searches off the CPU, are ranked by `torch.topk` (NaN above every number; its own tie order). On CPU
    without autograd, from `fused_topk.MIN_ROWS` query rows, the search is one native pass (`fused_topk`).
    """
    k = min(k, keys.shape[2])
    if (fused := fused_topk.search(queries, keys, k, limit)) is not None:  # scored and selected in one native pass
        return fused
    return _topk_blocks(queries, keys, k, chunk, limit, lowest)


def _topk_blocks(queries: torch.Tensor, keys: torch.Tensor, k: int, chunk: int, limit: torch.Tensor | None,
                 lowest: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """`topk_exact` by score blocks (matmul, then numpy or torch selection), split as SCORE_BLOCK says."""
    n_rows = queries.shape[2]
    # Columns before the smallest limit are searched by every query: only those from it on need masking.
    if lowest is None:
        lowest = keys.shape[2] if limit is None else int(limit.min())
    blocks = -(-queries.shape[0] * queries.shape[1] * n_rows * min(keys.shape[2], chunk) // SCORE_BLOCK)
    for axis in (1, 0):  # KV heads, then batch rows: independent searches, each reading only its own keys
        size = queries.shape[axis]
        if blocks > 1 and size > 1:
            step = max(1, size // blocks)  # as many as fit in one block: fewer selection calls
            parts = [_topk_blocks(queries.narrow(axis, i, min(step, size - i)),
                                  keys.narrow(axis, i, min(step, size - i)), k, chunk, limit, lowest)
                     for i in range(0, size, step)]
            return torch.cat([p[0] for p in parts], dim=axis), torch.cat([p[1] for p in parts], dim=axis)
    if blocks > 1 and n_rows > 1:  # query rows are independent: the same picks, block by block
        rows = -(-n_rows // min(blocks, n_rows))
        parts = [_topk_blocks(queries[:, :, lo:lo + rows], keys, k, chunk,
                              None if limit is None else limit[lo:lo + rows], lowest) for lo in range(0, n_rows, rows)]
        return torch.cat([p[0] for p in parts], dim=2), torch.cat([p[1] for p in parts], dim=2)
    if keys.shape[2] <= chunk:  # one block: selected best first directly
        block = queries @ keys.transpose(-1, -2)  # [batch, kv_heads, q, n]
        if limit is not None and lowest < block.shape[-1]:
            cols = torch.arange(lowest, block.shape[-1], device=block.device)
            block[..., lowest:].masked_fill_(cols[None, :] >= limit[:, None], float("-inf"))
        return top_best_first(block, k)
    best_scores: torch.Tensor | None = None  # [batch, kv_heads, q, k] winners so far, in key order
    best_idx: torch.Tensor | None = None
    for lo in range(0, keys.shape[2], chunk):
        block = queries @ keys[:, :, lo:lo + chunk].transpose(-1, -2)  # [batch, kv_heads, q, chunk]
        if limit is not None and lowest < lo + block.shape[-1]:
            first = max(lowest, lo)
            cols = torch.arange(first, lo + block.shape[-1], device=block.device)
            block[..., first - lo:].masked_fill_(cols[None, :] >= limit[:, None], float("-inf"))
        scores, idx = top_in_key_order(block, min(k, block.shape[-1]))
        idx = idx + lo
        if best_scores is not None and best_idx is not None:
            # [earlier winners ; these]: still in key order, so the tie rule carries over the chunks.
            scores, pick = top_in_key_order(torch.cat([best_scores, scores], dim=-1), k)
            idx = torch.cat([best_idx, idx], dim=-1).gather(-1, pick)
        best_scores, best_idx = scores, idx
    assert best_scores is not None and best_idx is not None
    return best_first(best_scores, best_idx)


def best_first(scores: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """scores [..., k] and their indices, in index order -> both sorted by score, descending; a stable sort keeps
    index order among equal scores."""
    if scores.device.type != "cpu" or not scores.numel() or np.isnan(_as_numpy(scores).max()):
        order = scores.sort(dim=-1, descending=True, stable=True).indices
        return scores.gather(-1, order), idx.gather(-1, order)
    # numpy's default (SIMD quick) argsort is 3-4x faster than a stable sort; only rows where it met equal scores,
    # whose order it leaves open, are sorted again stably.
    cost = -_as_numpy(scores).reshape(-1, scores.shape[-1])  # [rows, k] ascending = best first
    ranking = np.argsort(cost, axis=-1)
    ranked = np.take_along_axis(cost, ranking, -1)
    tied = np.flatnonzero((ranked[:, 1:] == ranked[:, :-1]).any(-1))
    if tied.size:
        ranking[tied] = np.argsort(cost[tied], axis=-1, kind="stable")
    pick = torch.from_numpy(ranking).view(scores.shape)
    return scores.gather(-1, pick), idx.gather(-1, pick)


def top_best_first(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`best_first(*top_in_key_order(scores, k))`: the k largest of each row of scores [..., n], best first, equal
    values by lower position; without autograd on CPU float32 selected and sorted in numpy in one go."""
    shape, n = scores.shape[:-1], scores.shape[-1]
    rows = scores.reshape(-1, n)  # [rows, n]
    if (scores.device.type == "cpu" and scores.dtype == torch.float32 and not scores.requires_grad and k < n
            and rows.shape[0]):
        found = _first_maxima(rows, k) if k <= FIRST_MAXIMA_K else selection.best_k(rows, k)
        if found is not None:
            return found[0].view(*shape, k), found[1].view(*shape, k)
    return best_first(*top_in_key_order(scores, k))


def top_in_key_order(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest of each row of scores [..., n] -> (values, positions) [..., k] in position order; among equal
    values the lower position wins.

    `torch.topk` pays about 30 µs per row at n = 1,280, k = 32 on CPU (it sorts (value, index) pairs per row). This
    is two exact, row-vectorised stages: the best k of the blocks {j, j + n/b, j + 2n/b, ...} by block maximum (the k
    best entries lie in them when the k-th block maximum is not tied; tied rows are ranked whole), then the best k
    of those blocks' k * b entries and the columns past the last whole block; each stage is a k-th value (numpy's
    introselect, values only) and a comparison.
    """
    shape, n = scores.shape[:-1], scores.shape[-1]
    rows = scores.reshape(-1, n)  # [rows, n]
    if k == n:  # all of them, as they are: no search (a bank no larger than k; torch.topk sorted each row whole)
        return scores.clone(), torch.arange(n, device=scores.device).expand(*shape, n).contiguous()
    # Block size balancing the two stages: n / b block maxima, then k * b entries.
    b = max(1, round((n / k) ** 0.5))
    blocks = n // b  # block j: columns j + t * blocks, t < b; the last n - b * blocks columns are always candidates
    if scores.device.type != "cpu" or rows.shape[0] == 0:
        return _topk_in_key_order(rows, k, shape)
    if k <= FIRST_MAXIMA_K and (first := _first_maxima(rows, k)) is not None:
        pos = first[1].sort(dim=1).values
        return rows.gather(1, pos).view(*shape, k), pos.view(*shape, k)
    if b < 2 or blocks <= k:
        if bool(rows.isnan().any()):
            return _topk_in_key_order(rows, k, shape)
        pos = _best_positions(rows, k)
        return rows.gather(1, pos).view(*shape, k), pos.view(*shape, k)
    maxima = rows[:, :b * blocks].reshape(-1, b, blocks).amax(1)  # [rows, blocks]
    block_max = _as_numpy(maxima)
    # A NaN reaches its block's maximum, and the maximum of all (numpy: no tensor allocations).
    if np.isnan(block_max.max()) or (b * blocks < n and np.isnan(_as_numpy(rows[:, b * blocks:]).max())):
        return _topk_in_key_order(rows, k, shape)
    take = block_max >= selection.kth_largest(block_max, k)  # [rows, blocks]
    counts = np.count_nonzero(take, axis=1)
    tied = np.flatnonzero(counts != k)
    if tied.size == rows.shape[0]:
        pos = _best_positions(rows, k)
        return rows.gather(1, pos).view(*shape, k), pos.view(*shape, k)
    clear_rows = rows
    if tied.size:
        clear = np.flatnonzero(counts == k)
        take, clear_rows = take[clear], rows[torch.from_numpy(clear)]
    best = torch.from_numpy(np.flatnonzero(take).reshape(-1, k) % blocks)  # [clear rows, k] block ids, ascending
    cols = (best.unsqueeze(1) + blocks * torch.arange(b).view(1, b, 1)).flatten(1)  # [clear rows, b * k] ascending
    if b * blocks < n:
        cols = torch.cat([cols, torch.arange(b * blocks, n).expand(cols.shape[0], -1)], dim=1)
    picked = cols.gather(1, _best_positions(clear_rows.gather(1, cols), k))  # [clear rows, k]
    if tied.size:
        pos = torch.empty(rows.shape[0], k, dtype=torch.long)
        pos[torch.from_numpy(clear)] = picked
        pos[torch.from_numpy(tied)] = _best_positions(rows[torch.from_numpy(tied)], k)
    else:
        pos = picked
    return rows.gather(1, pos).view(*shape, k), pos.view(*shape, k)


FIRST_MAXIMA_K = 4
"""Up to this k, `top_in_key_order` picks by k passes of numpy's SIMD argmax (each costs about one `amax`; the
two-stage selection makes about eight passes): LongMem reads 2 chunks a query at segment 128."""


def _first_maxima(rows: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """rows [r, n] -> (values, positions) [r, k] of each row's k largest values, best first, the lower position
    first among equal values (as `best_first`), by k argmax passes; None where a pick is NaN or -inf (the general
    path ranks those rows). Each pick is set to -inf for the next pass and restored before returning."""
    data = np.ascontiguousarray(_as_numpy(rows))  # writes below must reach `data` through its flat view
    flat = data.reshape(-1)
    starts = np.arange(data.shape[0]) * data.shape[1]
    picks = np.empty((data.shape[0], k), dtype=np.int64)
    values = np.empty((data.shape[0], k), dtype=data.dtype)
    for t in range(k):
        picks[:, t] = data.argmax(axis=1)  # the first maximum; a NaN is the maximum
        at = picks[:, t] + starts
        values[:, t] = flat[at]
        flat[at] = -np.inf
    for t in reversed(range(k)):  # in reverse: a position picked twice (at -inf) gets its first value back
        flat[picks[:, t] + starts] = values[:, t]
    if not (values > -np.inf).all():  # NaN or -inf: fewer than k numbers above -inf in some row
        return None
    return torch.from_numpy(values), torch.from_numpy(picks)


def _topk_in_key_order(rows: torch.Tensor, k: int, shape: torch.Size) -> tuple[torch.Tensor, torch.Tensor]:
    """`torch.topk` of rows [r, n], reordered by position (off CPU, and for rows holding NaN)."""
    values, pos = rows.topk(k, dim=-1)
    pos, order = pos.sort(dim=-1)
    return values.gather(-1, order).view(*shape, k), pos.view(*shape, k)


def _as_numpy(rows: torch.Tensor) -> np.ndarray:
    """rows as a numpy array of the same order (float16 / bfloat16 widened exactly to float32)."""
    data = rows.detach()
    return (data if data.dtype in (torch.float32, torch.float64) else data.float()).numpy()


def _best_positions(rows: torch.Tensor, k: int) -> torch.Tensor:
    """rows [r, n] without NaN -> [r, k] positions of each row's k largest values, ascending; among equal values
    the lower position wins."""
    data = _as_numpy(rows)
    kth = selection.kth_largest(data, k)
    take = data >= kth  # [r, n]
    over = np.flatnonzero(np.count_nonzero(take, axis=1) > k)
    if over.size:  # ties at the k-th value: all above it, then the lowest positions holding it
        part, at = data[over], kth[over]
        above = part > at
        level = part == at
        take[over] = above | (level & (np.cumsum(level, axis=1) <= k - np.count_nonzero(above, axis=1)[:, None]))
    return torch.from_numpy(np.flatnonzero(take).reshape(-1, k) % rows.shape[1])


def chunk_keys(keys: torch.Tensor, chunk: int, kind: str, scores: torch.Tensor | None = None,
               representatives: int = 0) -> torch.Tensor:
    """One search key per chunk of `chunk` consecutive slots (the last chunk possibly shorter).

    keys [batch, kv_heads, n, dim] -> [batch, kv_heads, ceil(n / chunk), dim] for `mean`, or [..., 2 * dim] for
    `bounds`: [max ; min] per dimension, which `chunk_queries` pairs with [relu(q) ; -relu(-q)] so that one inner
    product is Quest's bound sum_d max(q_d min_d, q_d max_d). `representative` (InfLLM): the mean of each chunk's
    `representatives` keys of highest `scores` [batch, kv_heads, n].
    """
    n = keys.shape[2]
    full = n // chunk * chunk
    heads = [keys[:, :, :full].unflatten(2, (-1, chunk))]  # [batch, kv_heads, chunks, chunk, dim]
    tail = [keys[:, :, full:].unsqueeze(2)] if full < n else []  # [batch, kv_heads, 1, rest, dim]
    if kind == "representative":
        assert scores is not None  # [batch, kv_heads, n] the slots' representative scores
        parts = [scores[:, :, :full].unflatten(2, (-1, chunk))] + ([scores[:, :, full:].unsqueeze(2)] if tail else [])
        return torch.cat([representative_keys(part, s, representatives)
                          for part, s in zip(heads + tail, parts, strict=True)], dim=2)
    if kind == "mean":
        means = [part.mean(3) for part in heads + tail]
        return means[0] if len(means) == 1 else torch.cat(means, dim=2)
    return torch.cat([torch.cat([part.amax(3), part.amin(3)], dim=-1) for part in heads + tail], dim=2)


def chunk_queries(queries: torch.Tensor, kind: str) -> torch.Tensor:
    """Queries [batch, kv_heads, q, dim] in the frame of `chunk_keys` (unchanged for `mean`, `representative`)."""
    if kind != "bounds":
        return queries
    return torch.cat([queries.clamp(min=0), queries.clamp(max=0)], dim=-1)  # -relu(-q) = min(q, 0)


def topk_chunk_slots(queries: torch.Tensor, keys: torch.Tensor, k: int, chunk: int, kind: str,
                     limit: torch.Tensor | None = None, scores: torch.Tensor | None = None,
                     representatives: int = 0, keyed: torch.Tensor | None = None,
                     block: int = SEARCH_CHUNK) -> tuple[torch.Tensor, torch.Tensor]:
    """The slots of each query's best k // chunk chunks (LongMem's token-to-chunk retrieval).

    queries [batch, kv_heads, q, dim], keys [batch, kv_heads, n, dim]; with `limit` [q], query i ranks only the
    chunks lying wholly in [0, limit[i]); `keyed`: the chunks' `chunk_keys`, when the caller has them;
    `block`: chunk keys scored per step (`topk_exact`'s chunk). Returns
    (slot indices, found), each [batch, kv_heads, q, k']: k' = the chunks read times `chunk`; found is False for
    slots past the end of a short last chunk or of a chunk not found.
    """
    n = keys.shape[2]
    n_chunks = -(-n // chunk)
    chunk_limit = None
    if limit is not None:  # chunk j ends at min((j + 1) * chunk, n): wholly before the limit
        chunk_limit = torch.where(limit >= n, n_chunks, limit // chunk)
    if keyed is None:
        keyed = chunk_keys(keys, chunk, kind, scores, representatives)
    # [batch, kv_heads, q, chunks read]
    scores, best = topk_exact(chunk_queries(queries, kind), keyed, k // chunk, chunk=block, limit=chunk_limit)
    slots = (best.unsqueeze(-1) * chunk + torch.arange(chunk, device=best.device)).flatten(-2)
    found = (slots < n) & (scores > float("-inf")).repeat_interleave(chunk, dim=-1)
    return slots.clamp(max=n - 1), found


def representative_keys(keys: torch.Tensor, scores: torch.Tensor, r: int) -> torch.Tensor:
    """keys [batch, kv_heads, chunks, c, dim], scores [batch, kv_heads, chunks, c] -> [batch, kv_heads, chunks, dim]:
    the mean of each chunk's r keys of highest score (all c when c <= r; official InfLLM `get_block_k`)."""
    top = scores.topk(min(r, scores.shape[-1]), dim=-1).indices  # [batch, kv_heads, chunks, r]
    return keys.gather(3, top.unsqueeze(-1).expand(*top.shape, keys.shape[-1])).mean(3)


def representative_scores(queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """InfLLM's representative score of each token of a segment: queries [batch, heads, n, dim] and keys
    [batch, kv_heads, n, dim] as attended -> [batch, kv_heads, n], token m's mean q_i . k_m over the segment's
    queries i >= m (itself included) and the KV head's query heads."""
    batch, heads, n, dim = queries.shape
    kv_heads = keys.shape[1]
    wide = torch.promote_types(queries.dtype, torch.float32)
    q = queries.to(wide).reshape(batch, kv_heads, heads // kv_heads, n, dim)
    dots = torch.einsum("bkgid,bkmd->bkim", q, keys.to(wide))  # [batch, kv_heads, queries, keys], group summed
    later = torch.ones(n, n, dtype=torch.bool, device=queries.device).tril()  # query i sees key m <= i
    count = (n - torch.arange(n, device=queries.device)) * (heads // kv_heads)  # [keys] queries i >= m, all heads
    return dots.masked_fill(~later, 0.0).sum(2) / count
