"""FIFO appends into a slot buffer (`engine/slot_buffer.py`) against the concatenation they replace."""

from __future__ import annotations

import torch

from unimem_bench.methods.engine import slot_buffer
from unimem_bench.methods.engine.attention import gather_slots


def _stream(limit: int, size: int, writes: list[int], grad: bool = False) -> None:
    """Write `writes` slots a time into a FIFO bank of `size` slots, both ways, comparing every step."""
    gen = torch.Generator().manual_seed(size + len(writes))
    buf: slot_buffer.SlotBuffer | None = None
    bank: torch.Tensor | None = None
    expected: torch.Tensor | None = None
    moves = 0
    for step, n in enumerate(writes):
        new = torch.randn(2, 3, n, 5, generator=gen)
        held = 0 if expected is None else expected.shape[2]
        drop = max(0, held + n - size)
        expected = new if expected is None else torch.cat([expected[:, :, drop:], new], dim=2)
        with torch.set_grad_enabled(grad):
            prev = buf
            buf, bank = slot_buffer.append(buf, bank, drop, new, limit)
        moves += buf is not None and prev is not None and buf.buffer is prev.buffer and buf.start < prev.start
        assert torch.equal(bank, expected)
        idx = torch.randint(0, bank.shape[2], (2, 3, 4, 2), generator=gen)
        assert torch.equal(gather_slots(bank, idx), gather_slots(expected.contiguous(), idx))
        assert (buf is None) == (grad or step == 0)  # the first write is the bank itself, as before
    if not grad:
        room = slot_buffer.ROOM_WRITES * max(writes)
        assert buf is not None and buf.buffer.shape[2] <= 2 * max(size, max(writes)) + room  # bounded, not growing
        assert moves > 0  # the bank moved to the front of its buffer at least once


def test_fifo_appends_equal_concatenation() -> None:
    for limit in (0, 64):
        _stream(limit, 64, [16] * 40)
        _stream(limit, 64, [7, 16, 3, 16, 16, 9, 1, 16] * 8)
        _stream(limit, 20, [16, 16, 40, 16, 2] * 6)  # writes larger than the bank


def test_under_autograd_concatenates() -> None:
    _stream(0, 32, [8] * 10, grad=True)


def test_replaced_bank_starts_a_new_buffer() -> None:
    with torch.no_grad():
        buf, bank = slot_buffer.append(None, torch.zeros(1, 1, 4, 2), 0, torch.ones(1, 1, 4, 2))
        assert buf is not None
        other = bank.clone()  # the bank replaced (eviction, select_rows): the old buffer is not written
        buf2, bank2 = slot_buffer.append(buf, other, 2, torch.full((1, 1, 1, 2), 2.0))
        assert buf2 is not None and buf2.buffer is not buf.buffer
        assert torch.equal(bank2, torch.cat([other[:, :, 2:], torch.full((1, 1, 1, 2), 2.0)], dim=2))
        assert torch.equal(bank, torch.cat([torch.zeros(1, 1, 4, 2), torch.ones(1, 1, 4, 2)], dim=2))
