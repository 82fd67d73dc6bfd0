"""FIFO appends without copying the whole bank: a bank tensor kept as a view of a buffer with room after it.

`LayerMemory.write`'s plain FIFO path used to build each new bank as `cat([bank[drop_old:], new])`, a copy of every
held slot per layer and segment. Here the bank is `buffer[:, :, start:end]`: a write drops from the front by moving
`start` and copies only the new slots after `end`; when the room runs out, the live slots move to the front once
(or into a larger buffer while the bank still grows). Readers see the same values in the same order; the view is
strided over batch rows and KV heads (each row's slots stay consecutive).

In place, so only without autograd (a view saved for backward must not change) and only while the bank is the very
view this buffer handed out: anything that replaced it (eviction, `select_rows`, `detach`, a loaded state) makes the
next write start a new buffer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

SLACK = 4
"""Free room of a new buffer: 1 / SLACK of its live slots (at least ROOM_WRITES writes). A full FIFO bank moves to
the front once per (live / SLACK) slots written, so each written slot is copied about SLACK + 1 times in all, and
the buffer holds (1 + 1 / SLACK) x the bank: a quarter of the overhead of a buffer twice the bank's size."""
ROOM_WRITES = 4
"""Writes a new buffer has room for at least: a small bank (a few writes) would otherwise move every write."""


@dataclass(frozen=True)
class SlotBuffer:
    """A bank [batch, kv_heads, slots, ...] as the view `buffer[:, :, start:end]` (each write makes a new one)."""

    buffer: torch.Tensor
    """[batch, kv_heads, capacity, ...] the storage."""
    start: int
    """The bank's first slot in the buffer."""
    end: int
    """One past the bank's last slot: the next write goes here."""
    view: torch.Tensor
    """The bank handed out: a write appends in place only while the bank still is this tensor."""

    def __post_init__(self) -> None:
        if not 0 <= self.start <= self.end <= self.buffer.shape[2]:
            raise ValueError(f"slots [{self.start}, {self.end}) do not lie in a buffer of {self.buffer.shape[2]}")

    def fits(self, held: torch.Tensor | None, new: torch.Tensor) -> bool:
        """Whether `new` slots can be appended in place to bank `held`."""
        b = self.buffer
        return (held is self.view and new.dtype == b.dtype and new.device == b.device
                and new.shape[:2] == b.shape[:2] and new.shape[3:] == b.shape[3:]
                and b.is_inference() == torch.is_inference_mode_enabled())


def append(buf: SlotBuffer | None, held: torch.Tensor | None, drop_old: int, new: torch.Tensor,
           limit: int = 0) -> tuple[SlotBuffer | None, torch.Tensor]:
    """The bank `cat([held[:, :, drop_old:], new], dim=2)` and the buffer behind it (None under autograd, where the
    concatenation itself is returned). `held` must be `buf.view` for the buffer to be reused; `limit`: the most
    slots the bank will hold (0: not known), so that a growing bank doubles its buffer up to it."""
    n = new.shape[2]
    if torch.is_grad_enabled() or held is None:
        if held is None:
            return None, new
        return None, torch.cat([held[:, :, drop_old:], new], dim=2)
    if buf is None or not buf.fits(held, new):
        return _fresh(held[:, :, drop_old:], new, limit)
    start, end = buf.start + min(drop_old, held.shape[2]), buf.end
    live = end - start
    data = buf.buffer
    if end + n > data.shape[2]:
        # Moved to the front in at most SLACK + 1 steps when it fits there; a larger buffer while it grows.
        if live + n > data.shape[2] or start == 0 or start < live // SLACK:
            return _fresh(data[:, :, start:end], new, limit)
        _move_front(data, start, live)
        start, end = 0, live
    data[:, :, end:end + n] = new
    view = data[:, :, start:end + n]
    return SlotBuffer(data, start, end + n, view), view


def _fresh(live: torch.Tensor, new: torch.Tensor, limit: int) -> tuple[SlotBuffer, torch.Tensor]:
    """A new buffer holding `[live ; new]` with room for more (`SLACK`, `ROOM_WRITES`); twice its slots while a bank
    below a known `limit` grows (up to the limit's own room: a growing bank copies each slot about twice)."""
    count = live.shape[2] + new.shape[2]
    room = max(ROOM_WRITES * new.shape[2], count // SLACK)
    capacity = count + room
    if count < limit:
        capacity = max(capacity, min(2 * count, limit + max(ROOM_WRITES * new.shape[2], limit // SLACK)))
    data = new.new_empty((*new.shape[:2], capacity, *new.shape[3:]))
    data[:, :, :live.shape[2]] = live
    data[:, :, live.shape[2]:count] = new
    view = data[:, :, :count]
    return SlotBuffer(data, 0, count, view), view


def _move_front(data: torch.Tensor, start: int, live: int) -> None:
    """Move slots [start, start + live) of `data` to [0, live) in place, in steps no longer than the shift (a step
    never overlaps its own source, and only overwrites sources already moved)."""
    for lo in range(0, live, start):
        hi = min(live, lo + start)
        data[:, :, lo:hi] = data[:, :, start + lo:start + hi]


def bank_rows(bank: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """A bank [batch, kv_heads, n, dim] as rows [rows, dim] for one `index_select`, and the row of each batch row's
    and KV head's first slot [batch, kv_heads, 1, 1]. A bank viewed in a wider buffer is read through its strides
    (a reshape would copy it whole); anything else is reshaped (a view when contiguous)."""
    batch, kv_heads, n, dim = bank.shape
    strided = (not bank.is_contiguous() and not bank.requires_grad and bank.stride(3) == 1 and bank.stride(2) == dim
               and bank.stride(1) % dim == 0 and bank.stride(0) % dim == 0)
    s0, s1 = (bank.stride(0) // dim, bank.stride(1) // dim) if strided else (kv_heads * n, n)
    first = (torch.arange(batch, device=device).view(batch, 1, 1, 1) * s0
             + torch.arange(kv_heads, device=device).view(1, kv_heads, 1, 1) * s1)
    if strided:
        return bank.as_strided(((batch - 1) * s0 + (kv_heads - 1) * s1 + n, dim), (dim, 1)), first
    return bank.reshape(batch * kv_heads * n, dim), first
