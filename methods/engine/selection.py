"""Exact top-k of score rows, best first, in one numpy pass per stage (the single-block case of
`retrieval.topk_exact`: Memorizing Transformer's 1,280 slots, UniMix's window-less rest of the bank).

Order as `retrieval.best_first(*retrieval.top_in_key_order(...))`: scores descending, among equal scores the lower
position first, also at the k-th place. Rows that would need the tie rule inside a selection stage are not handled
here (None: the caller takes the general path), nor NaN.
"""

from __future__ import annotations

import numpy as np
import torch


def block_split(n: int, k: int) -> int:
    """Block size b of `best_k`'s first stage (n // b strided blocks, then the k best blocks' k * b entries): about
    sqrt(n / k), which balances the two partitions; a divisor of n within 1.5x of it when there is one, so that no
    columns are left past the last whole block."""
    best = (n / k) ** 0.5
    divisors = [d for d in range(max(2, int(best / 1.5)), int(best * 1.5) + 1) if n % d == 0 and n // d > k]
    return min(divisors, key=lambda d: abs(d - best)) if divisors else max(1, round(best))


def best_k(rows: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """rows [r, n] float32 on CPU -> (values, positions) [r, k], best first; None where a row holds NaN or a tie at
    the k-th value of a stage (the general path ranks those).

    Stage 1: the maxima of the blocks {j, j + n/b, ...} (a strided view: no copy), and each row's k blocks of
    largest maximum (numpy's introselect on values). The k best entries lie in those blocks when their k-th
    maximum is not tied. Stage 2: the k best of the k * b gathered entries (and the columns past the last whole
    block) by a second introselect, then the k sorted by numpy's SIMD argsort (rows with equal values among them
    sorted again stably, keeping position order).
    """
    data = rows.numpy()
    r, n = data.shape
    b = block_split(n, k)
    blocks = n // b
    full = b * blocks
    if b < 2 or blocks <= k:
        return None
    view = rows.as_strided((r, b, blocks), (rows.stride(0), blocks * rows.stride(1), rows.stride(1)))  # no copy
    maxima = view.amax(1).numpy()  # [r, blocks]; torch's reduction over the middle axis is faster than numpy's
    if np.isnan(maxima.max()) or (full < n and np.isnan(data[:, full:].max())):
        return None
    flat = np.flatnonzero(maxima >= kth_largest(maxima, k))  # [r * k] when no row is tied: row-major, ascending
    if flat.size != r * k:
        return None
    starts = np.arange(r) * blocks
    chosen = flat.reshape(r, k)
    if not ((chosen[:, 0] >= starts).all() and (chosen[:, -1] < starts + blocks).all()):
        return None  # some row took more than k blocks, another fewer
    chosen -= starts[:, None]  # [r, k] block ids, ascending
    # [r, b * k]: entry (t, j) is column chosen[j] + t * blocks, so the row is in column order
    cand = torch.gather(view, 2, torch.from_numpy(chosen).unsqueeze(1).expand(r, b, k)).view(r, b * k)
    if full < n:
        cand = torch.cat([cand, rows[:, full:]], dim=1)
    values = cand.numpy()
    width = values.shape[1]
    winners = np.flatnonzero(values >= kth_largest(values, k))
    if winners.size != r * k:
        return None
    picked = winners.reshape(r, k)
    offset = picked - (np.arange(r) * width)[:, None]  # [r, k] places in each row's candidates, ascending
    if not ((offset[:, 0] >= 0).all() and (offset[:, -1] < width).all()):
        return None
    inner = offset if full == n else np.minimum(offset, b * k - 1)
    t, j = np.divmod(inner, k)
    cols = np.take(chosen, j + (np.arange(r) * k)[:, None]) + blocks * t  # [r, k] columns in key order
    if full < n:
        cols = np.where(offset < b * k, cols, offset - b * k + full)
    cost = -np.take(values, picked)  # ascending = best first
    order = np.argsort(cost, axis=1) + (np.arange(r) * k)[:, None]
    ranked = np.take(cost, order)
    tied = np.flatnonzero((ranked[:, 1:] == ranked[:, :-1]).any(1))
    if tied.size:  # the SIMD sort leaves equal values in any order: those rows again, stably
        order[tied] = np.argsort(cost[tied], axis=1, kind="stable") + (tied * k)[:, None]
        ranked = np.take(cost, order)
    return torch.from_numpy(-ranked), torch.from_numpy(np.take(cols, order))


SORT_MAX = 512
"""Up to this row length `kth_largest` sorts the rows whole: numpy's SIMD sort of short float rows (AVX-512 sorting
networks) takes half the time of its introselect (512 rows of 64-512 values: x0.49-0.64); from 1,024 values on the
introselect is faster (x1.06-1.97)."""


def kth_largest(rows: np.ndarray, k: int) -> np.ndarray:
    """rows [r, n] -> [r, 1] the k-th largest value of each row (values only, no index pairs): a whole-row sort up
    to `SORT_MAX` values, numpy's introselect beyond; both place NaN last, so the result is the same."""
    n = rows.shape[1]
    ordered = np.sort(rows, axis=1) if n <= SORT_MAX else np.partition(rows, n - k, axis=1)
    return ordered[:, n - k:n - k + 1]
