"""RotaryMemo: the rotary's own (cos, sin) per position list, at most MAX_ENTRIES lists kept (least recently used
dropped first, before the new tables are computed)."""

import torch
from helpers import tiny_llama
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from unimem_bench.methods.engine import rotary_memo
from unimem_bench.methods.engine.rotary_memo import RotaryMemo


def positions(first: int, n: int) -> torch.Tensor:
    return torch.arange(first, first + n).unsqueeze(0)  # [1, n]


def test_memo_returns_the_rotary_tables_and_keeps_the_two_latest_lists():
    rotary = LlamaRotaryEmbedding(tiny_llama().config)
    memo = RotaryMemo(rotary)
    probe = torch.zeros(1, 1, 8)
    for n in (4, 8, 12):  # a filling memory: a longer prefix and a new input start each segment
        for pos in (positions(0, n), positions(n, 3)):
            cos, sin = memo(probe, pos)
            want_cos, want_sin = rotary(probe, pos)
            assert torch.equal(cos, want_cos) and torch.equal(sin, want_sin)
    assert len(memo.store) == rotary_memo.MAX_ENTRIES == 2
    assert sorted(key[3][1] for key in memo.store) == [3, 12]  # the stale prefixes of 4 and 8 are gone
    prefix = memo(probe, positions(0, 12))
    assert memo(probe, positions(0, 12))[0] is prefix[0]  # a full memory's prefix is computed once
    memo(probe, positions(20, 3))  # drops the least recently used (the input at 12), not the prefix just read
    assert memo(probe, positions(0, 12))[0] is prefix[0]


def test_long_lists_are_computed_blockwise_with_the_same_values(monkeypatch):
    config = tiny_llama().config
    for rope in ({"rope_type": "default", "rope_theta": 10000.0},
                 {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0}):
        config.rope_parameters = rope
        rotary = LlamaRotaryEmbedding(config)
        probe = torch.zeros(1, 1, 8)
        for block, n in ((4096, 31919), (7, 100), (64, 64)):
            monkeypatch.setattr(rotary_memo, "POSITION_BLOCK", block)
            for pos in (positions(0, n), positions(123, n)):
                cos, sin = RotaryMemo(rotary).tables(probe, pos)
                want_cos, want_sin = rotary(probe, pos)
                assert cos.shape == want_cos.shape
                assert torch.equal(cos, want_cos) and torch.equal(sin, want_sin)
        calls: list[torch.Tensor] = []
        monkeypatch.setattr(rotary_memo, "POSITION_BLOCK", 7)
        monkeypatch.setattr(rotary, "forward", lambda x, pos, forward=rotary.forward, calls=calls:
                            calls.append(pos) or forward(x, pos))
        RotaryMemo(rotary).tables(probe, positions(0, 100))
        assert [p.shape[1] for p in calls] == [7] * 14 + [2]  # blockwise indeed


def test_halves_keep_the_first_half_and_rotate_as_the_whole_tables(monkeypatch):
    from unimem_bench.methods.engine.kernels import rotate, rotate_, rotated

    rotary = LlamaRotaryEmbedding(tiny_llama().config)
    probe = torch.zeros(1, 1, 8)
    monkeypatch.setattr(rotary_memo, "POSITION_BLOCK", 7)
    pos = positions(0, 50)
    cos, sin, halved = RotaryMemo(rotary).halves(probe, pos)
    want_cos, want_sin = rotary(probe, pos)
    width = want_cos.shape[-1] // 2
    assert halved and torch.equal(cos, want_cos[..., :width]) and torch.equal(sin, want_sin[..., :width])
    x = torch.randn(2, 3, 50, 2 * width)
    want = rotate(x, want_cos[0], want_sin[0])
    assert torch.equal(rotate(x, cos[0], sin[0]), want)
    assert torch.equal(rotated(x, cos[0], sin[0]), want)
    assert torch.equal(rotate_(x.clone(), cos[0], sin[0]), want)
    odd = LlamaRotaryEmbedding(tiny_llama().config)  # halves that differ: the whole tables come back
    monkeypatch.setattr(odd, "forward", lambda x, pos: tuple(t + torch.arange(t.shape[-1]) for t in rotary(x, pos)))
    cos, sin, halved = RotaryMemo(odd).halves(probe, pos)
    assert not halved and cos.shape == want_cos.shape
