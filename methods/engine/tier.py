"""The pooled tier's storage (writing.pooled_tier): the slots a write evicts from the direct bank, pooled, appended to
the tier under its overflow policy.

Without autograd the tier lives at the front of a buffer with room after it (`TierHolder.tier_room`): a write that
drops nothing from the tier appends its pooled slots in place (no copy of the held tier), and a joined read lays the
window and the segment after the tier in that room (`joined_keys`), so its [tier ; window ; segment] keys and values
are a view rather than a concatenation that copies the whole tier (LongT5: up to 1,024 slots, every layer and
segment). Under autograd every write makes new tensors, as before: a graph may hold the old ones.
"""

from __future__ import annotations

from typing import Protocol

import torch


class TierPlan(Protocol):
    """What the tier write needs of a `plan.SegmentPlan` (a protocol: memory.py and plan.py import this module)."""

    @property
    def drop_old(self) -> int: ...
    @property
    def drop_new(self) -> int: ...
    @property
    def tier_drop_old(self) -> int: ...
    @property
    def tier_drop_new(self) -> int: ...


class TierHolder(Protocol):
    """What the tier write keeps on a `memory.LayerMemory`."""

    keys: torch.Tensor | None
    values: torch.Tensor | None
    tier_keys: torch.Tensor | None
    tier_values: torch.Tensor | None
    tier_room: tuple[torch.Tensor, torch.Tensor] | None


def pool_tokens(x: torch.Tensor, ratio: int) -> torch.Tensor:
    """Mean over consecutive groups of `ratio` tokens; a shorter last group is averaged on its own.

    x [batch, kv_heads, n, dim] -> [batch, kv_heads, ceil(n / ratio), dim]
    """
    full = x.shape[2] // ratio * ratio
    parts = [x[:, :, :full].unflatten(2, (-1, ratio)).mean(3)]
    if full < x.shape[2]:
        parts.append(x[:, :, full:].mean(2, keepdim=True))
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)


def in_room(mem: TierHolder, tensor: torch.Tensor | None, index: int) -> bool:
    """`tensor` is the front of `mem.tier_room[index]` (a view of it), and that room may be written here (no autograd,
    and an inference tensor only inside inference mode)."""
    room = mem.tier_room
    if room is None or tensor is None or torch.is_grad_enabled():
        return False
    buffer = room[index]  # the front: same first element and strides (inference-mode views keep no `_base`)
    return (tensor.data_ptr() == buffer.data_ptr() and tensor.stride() == buffer.stride()
            and tensor.shape[:2] == buffer.shape[:2] and buffer.is_inference() == torch.is_inference_mode_enabled())


def write(mem: TierHolder, plan: TierPlan, ratio: int, capacity: int, keys: torch.Tensor, values: torch.Tensor) -> None:
    """Pool the slots this write evicts from the direct bank (its oldest held ones, then any of the new slots [batch,
    kv_heads, n_new, dim] dropped at once) into the tier, under the tier's overflow policy. `capacity`: slots of a
    new room (the tier's size plus what a read lays after it)."""
    evicted_k, evicted_v = keys[:, :, :plan.drop_new], values[:, :, :plan.drop_new]
    if mem.keys is not None and mem.values is not None and plan.drop_old:
        held_k, held_v = mem.keys[:, :, :plan.drop_old], mem.values[:, :, :plan.drop_old]
        # Pooling reads the views in place: a concatenation only when this write's own slots are evicted too.
        evicted_k = torch.cat([held_k, evicted_k], dim=2) if plan.drop_new else held_k
        evicted_v = torch.cat([held_v, evicted_v], dim=2) if plan.drop_new else held_v
    if not evicted_k.shape[2]:
        return
    pooled_k = pool_tokens(evicted_k, ratio)[:, :, plan.tier_drop_new:]  # [batch, kv_heads, pooled, dim]
    pooled_v = pool_tokens(evicted_v, ratio)[:, :, plan.tier_drop_new:]
    kept_k = None if mem.tier_keys is None else mem.tier_keys[:, :, plan.tier_drop_old:]
    kept_v = None if mem.tier_values is None else mem.tier_values[:, :, plan.tier_drop_old:]
    n_kept = 0 if kept_k is None else kept_k.shape[2]
    n = n_kept + pooled_k.shape[2]
    if not n:
        mem.tier_keys = mem.tier_values = None
        return
    if torch.is_grad_enabled():
        if kept_k is not None and kept_v is not None:
            pooled_k, pooled_v = torch.cat([kept_k, pooled_k], dim=2), torch.cat([kept_v, pooled_v], dim=2)
        mem.tier_keys, mem.tier_values = pooled_k, pooled_v
        return
    room = mem.tier_room
    appended = (plan.tier_drop_old == 0 and room is not None and room[0].shape[2] >= n
                and in_room(mem, mem.tier_keys, 0) and in_room(mem, mem.tier_values, 1))
    if not appended:  # a new room, the kept slots copied to its front (what the concatenation copied)
        batch, kv_heads, _, dim = pooled_k.shape
        size = max(capacity, n)
        room = (pooled_k.new_empty(batch, kv_heads, size, dim), pooled_v.new_empty(batch, kv_heads, size, dim))
        if kept_k is not None and kept_v is not None and n_kept:
            room[0][:, :, :n_kept].copy_(kept_k)
            room[1][:, :, :n_kept].copy_(kept_v)
        mem.tier_room = room
    assert room is not None
    room[0][:, :, n_kept:n].copy_(pooled_k)
    room[1][:, :, n_kept:n].copy_(pooled_v)
    mem.tier_keys, mem.tier_values = room[0][:, :, :n], room[1][:, :, :n]


def joined_keys(bank: TierHolder, tier_keys: torch.Tensor, tier_values: torch.Tensor, window: tuple[torch.Tensor, ...],
                key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """[tier ; window ; segment] keys and values as views of the tier's room, the window (keys, values) and the
    segment's keys and values copied after the tier (no copy of the tier); None where the tier read is not the
    front of `bank`'s room, or the room is too small."""
    n_tier = tier_keys.shape[2]
    n = n_tier + (window[0].shape[2] if window else 0) + key.shape[2]
    room = bank.tier_room
    if room is None or room[0].shape[2] < n or not (in_room(bank, tier_keys, 0) and in_room(bank, tier_values, 1)):
        return None
    at = n_tier
    for part_k, part_v in ([window] if window else []) + [(key, value)]:
        room[0][:, :, at:at + part_k.shape[2]].copy_(part_k)
        room[1][:, :, at:at + part_v.shape[2]].copy_(part_v)
        at += part_k.shape[2]
    return room[0][:, :, :n], room[1][:, :, :n]
