"""Per-layer and per-head budgets of score eviction (PyramidKV's pyramid, AdaKV's adaptive head split).

With `management.layer_budget=pyramid` or `management.head_budget=adaptive`, layers and KV heads hold different
numbers of slots. A layer's bank keeps the tensors [batch, kv_heads, width, head_dim] of its widest head, the others
padded on the left (id -1, zero keys and values). Every layer is placed as if padded to the widest bank
(`plan.n_bank`), so compact positions put each head's slots consecutively just before the segment: the split read
(`split_read.py`) reads each layer at its own width with its padding masked per KV head, and only the joined read
(decoding, LRU) pads a copy to the widest bank with `left_pad` and `padding_bias`. Methods with uniform budgets
never reach this module.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from unimem_bench.methods.config import Management
from unimem_bench.methods.engine import eviction


def layer_size(m: Management, size: int, rank: int, n_layers: int, tokens: int = 0) -> int:
    """Slots per KV head of the injected layer `rank` (0 = lowest) of `n_layers`, for a uniform budget `size` and
    an input of `tokens` tokens (0: unknown, as for a fixed `management.size`).

    Pyramid: the unprotected part B = size - sinks - recent runs linearly from 2B - B // beta down to B // beta
    (PyramidKV's endpoints), each floored; the floors' remainder goes one slot each to the lowest layers, so the
    layers sum to n_layers x B; the protected slots are added to every layer. As PyramidKV, the top is capped at the
    input's unprotected tokens T (and the bottom raised to 2B - T), so no layer is given slots it cannot fill while
    a higher one evicts; an input within the budget is uniform (nothing is evicted)."""
    if m.layer_budget == "uniform" or n_layers == 1:
        return size
    protected = m.sinks + m.recent
    free = size - protected
    if tokens and tokens - protected <= free:
        return size
    low = free // m.pyramid_beta
    high = 2 * free - low
    if tokens and high > tokens - protected:
        high = tokens - protected
        low = 2 * free - high
    # Exact rational steps (PyramidKV floors the step instead, which can overshoot the total by up to n/2 slots);
    # the floors' shortfall goes to the largest fractional parts (ties: the lower layer), which keeps the schedule
    # non-increasing and every layer within the ceiling of its exact value.
    steps = [(high - low) * (n_layers - 1 - i) for i in range(n_layers)]  # layer i: low + steps[i] / (n - 1)
    sizes = [low + s // (n_layers - 1) for s in steps]
    extra = n_layers * free - sum(sizes)  # 0 <= extra < n_layers
    by_fraction = sorted(range(n_layers), key=lambda i: (-(steps[i] % (n_layers - 1)), i))
    return protected + sizes[rank] + (1 if rank in by_fraction[:extra] else 0)


def keep_slots(m: Management, scores: torch.Tensor, ids: torch.Tensor, budget: int, end_id: int) -> torch.Tensor:
    """Candidate indices [batch, kv_heads, width] kept per KV head, in document order, -1 on the left of a head that
    keeps fewer than the widest; ids -1 mark padding (never kept).

    scores, ids [batch, kv_heads, candidates]; `budget` slots per head (uniform), or kv_heads x budget per layer
    shared by the heads (adaptive: protected slots and each head's best floor(budget x head_floor) first, then the
    highest scores across heads; ties for the newer slot, then the lower head). Sinks (ids < m.sinks) and recent
    tokens (ids >= end_id - m.recent) are protected."""
    batch, kv_heads, n = scores.shape
    valid = ids >= 0
    if m.head_budget == "uniform" and bool(valid.all()):
        # Every head keeps min(n, budget) of unpadded candidates (PyramidKV's layers once full): the uniform
        # selection, without the padding's bookkeeping (half the tensor operations).
        return eviction.keep_indices(m, scores, ids, min(n, budget), end_id)
    protect = valid & ((ids < m.sinks) | (ids >= end_id - m.recent))
    rank = scores.to(torch.float64).masked_fill(protect, float("inf")).masked_fill(~valid, float("-inf"))
    # Within a head: by rank, then newer first (flipped, so a stable sort prefers the later candidate).
    order = n - 1 - torch.sort(rank.flip(-1), dim=-1, descending=True, stable=True).indices  # [batch, kv, n]
    place = torch.empty_like(order).scatter_(-1, order, torch.arange(n, device=order.device).expand_as(order))
    n_valid = valid.sum(-1, keepdim=True)  # [batch, kv_heads, 1]
    if m.head_budget == "uniform":
        keep = place < n_valid.clamp(max=budget)
    else:
        floor = int(budget * m.head_floor)
        rank = rank.masked_fill(valid & (place < floor), float("inf"))  # the safeguard
        total = n_valid.sum(1).clamp(max=kv_heads * budget)  # [batch, 1]
        head = torch.arange(kv_heads, device=ids.device)[:, None].expand(kv_heads, n)
        tie = (ids * kv_heads + (kv_heads - 1 - head)).flatten(1)  # [batch, kv * n]: newer id, then lower head
        by_tie = torch.sort(tie, dim=-1, descending=True, stable=True).indices
        flat = rank.flatten(1).gather(1, by_tie)
        joint = by_tie.gather(1, torch.sort(flat, dim=-1, descending=True, stable=True).indices)
        chosen = torch.arange(kv_heads * n, device=ids.device)[None, :] < total  # [batch, kv * n]
        keep = torch.zeros(batch, kv_heads * n, dtype=torch.bool, device=ids.device)
        keep = keep.scatter(1, joint, chosen).view(batch, kv_heads, n)
    width = int(keep.sum(-1).max()) if keep.numel() else 0
    index = torch.where(keep, torch.arange(n, device=ids.device), -1)
    return index.sort(dim=-1).values[..., n - width:]


def left_pad(x: torch.Tensor | None, width: int, fill: float, like: torch.Tensor) -> torch.Tensor:
    """x [batch, kv_heads, w, ...] padded on the left of dim 2 to `width` with `fill` (None: all padding, shaped
    after `like` [batch, kv_heads, ...])."""
    if x is None:
        shape = (*like.shape[:2], width, *like.shape[3:])
        return torch.full(shape, fill, dtype=like.dtype, device=like.device)
    missing = width - x.shape[2]
    if not missing:
        return x
    pad = [0, 0] * (x.dim() - 3) + [missing, 0]
    return F.pad(x, pad, value=fill)


def padding_bias(ids: torch.Tensor, heads: int, dtype: torch.dtype) -> torch.Tensor | None:
    """Additive bias [batch, heads, 1, slots] hiding padded slots (ids -1) of a bank [batch, kv_heads, slots] from
    each query head; None when nothing is padded."""
    pad = ids < 0
    if not bool(pad.any()):
        return None
    bias = torch.zeros(pad.shape, dtype=dtype, device=ids.device).masked_fill(pad, float("-inf"))
    return bias.repeat_interleave(heads // ids.shape[1], dim=1).unsqueeze(2)


def take_padded(held: torch.Tensor | None, new: torch.Tensor, keep: torch.Tensor, padded: bool,
                in_place: bool) -> torch.Tensor:
    """`keep_slots`' candidates [batch, kv_heads, width] (-1: padding, zeros) of [held ; new] ([batch, kv_heads,
    n, dim] each), like `eviction.take` with the padding filled with zeros; `padded`: keep has some -1.

    `in_place` (nothing else reads `held`): a bank that does not grow is compacted inside `held`, one KV head at a
    time, without a second copy of the layer (AdaKV's heads keep different numbers of slots, so a head can move
    its slots right as well as left): the slots that move left go first, from the left, then those that move right,
    from the right, eviction.TAKE_BLOCK slots at a time, so no slot is overwritten before it is read."""
    if not padded:
        return eviction.take(held, new, keep, in_place)
    pad = keep < 0
    if held is None or not in_place or keep.shape[2] > held.shape[2]:
        return eviction.take(held, new, keep.clamp(min=0)).masked_fill_(pad.unsqueeze(-1), 0.0)
    n_held, width = held.shape[2], keep.shape[2]
    out = held[:, :, :width]
    first = pad.sum(-1).tolist()  # [batch][kv_heads] first kept index per head
    from_held = (keep < n_held).sum(-1).tolist()  # padding counts here too: first + held sources
    for b, heads in enumerate(first):
        for h, lo in enumerate(heads):
            hi = from_held[b][h]  # [lo, hi): kept held slots; keep - index is non-decreasing along them
            source = keep[b, h, lo:hi]
            index = torch.arange(lo, hi, device=keep.device)
            split = lo + int((source < index).sum())  # [lo, split) move right, [split, hi) stay or move left
            row = held[b, h]  # [n_held, dim]
            for start in range(split, hi, eviction.TAKE_BLOCK):
                stop = min(hi, start + eviction.TAKE_BLOCK)
                row[start:stop] = row.index_select(0, keep[b, h, start:stop])
            for stop in range(split, lo, -eviction.TAKE_BLOCK):
                start = max(lo, stop - eviction.TAKE_BLOCK)
                row[start:stop] = row.index_select(0, keep[b, h, start:stop])
            if hi < width:  # this write's kept slots, the newest, at the right end
                row[hi:width] = new[b, h].index_select(0, keep[b, h, hi:width] - n_held).to(row.dtype)
            row[:lo] = 0.0
    return out
