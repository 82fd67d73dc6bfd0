"""The log-sum-exp attention kernels agree across their paths: PyTorch's fused CPU op reading fewer KV heads itself,
the same op on KV heads folded into batch rows (where an older op refuses GQA), and the portable manual path."""

from __future__ import annotations

import pytest
import torch

from unimem_bench.methods.engine import kernels


def refusing_gqa(op):
    """The fused op as an older PyTorch has it: query and key heads must match."""
    def call(query, keys, *args, **kwargs):
        if query.shape[1] != keys.shape[1]:
            raise RuntimeError("number of heads in key/value must equal the query's")
        return op(query, keys, *args, **kwargs)
    return call


def inputs(mask_kind: str) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(0)
    query = torch.randn(2, 4, 6, 8, generator=gen)  # [batch, heads, seq, dim]
    keys, values = (torch.randn(2, 2, 10, 8, generator=gen) for _ in range(2))  # [batch, kv_heads, n, dim]
    hidden = torch.rand(6, 10, generator=gen) < 0.3
    hidden[:, -1] = False  # every query sees a key
    mask = torch.zeros(6, 10).masked_fill(hidden, float("-inf"))
    if mask_kind == "per-head":
        mask = mask.expand(4, -1, -1).clone()  # [heads, queries, keys]
        mask[1, :, 0] = float("-inf")
    return query, keys, values, (None if mask_kind == "causal" else mask)


@pytest.mark.parametrize("mask_kind", ["causal", "shared", "per-head"])
def test_attention_with_lse_paths_agree(monkeypatch, mask_kind):
    query, keys, values, mask = inputs(mask_kind)
    if mask is None:
        keys, values = keys[:, :, :6], values[:, :, :6]
    native = kernels.attention_with_lse(query, keys, values, mask, 0.3)
    monkeypatch.setattr(kernels, "CPU_FLASH_WITH_LSE", refusing_gqa(kernels.CPU_FLASH_WITH_LSE))
    folded = kernels.attention_with_lse(query, keys, values, mask, 0.3)
    monkeypatch.setattr(kernels, "CPU_FLASH_WITH_LSE", None)
    manual = kernels.attention_with_lse(query, keys, values, mask, 0.3)
    for got in (folded, manual):
        torch.testing.assert_close(got[0], native[0], atol=1e-5, rtol=0)
        torch.testing.assert_close(got[1], native[1], atol=1e-5, rtol=0)


def test_block_attention_bias_paths_agree(monkeypatch):
    query, keys, values, _ = inputs("causal")
    bias = torch.zeros(2, 2, 1, 10)
    bias[0, 1, :, :4] = float("-inf")
    bias[1, 0] = float("-inf")  # a KV head that sees nothing: out 0, log-sum-exp -inf
    native = kernels.block_attention(query, keys, values, bias, 0.3)
    monkeypatch.setattr(kernels, "CPU_FLASH_WITH_LSE", refusing_gqa(kernels.CPU_FLASH_WITH_LSE))
    folded = kernels.block_attention(query, keys, values, bias, 0.3)
    assert bool((native[1][1, :2] == float("-inf")).all()) and bool((native[0][1, :2] == 0).all())
    torch.testing.assert_close(folded[0], native[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(folded[1], native[1], atol=1e-6, rtol=0)
