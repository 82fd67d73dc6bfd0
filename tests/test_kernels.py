"""The log-sum-exp attention kernels agree across their paths: PyTorch's fused CPU op reading fewer KV heads itself,
the same op on KV heads folded into batch rows (where an older op refuses GQA), and the portable manual path."""

from __future__ import annotations

import pytest
import torch
from helpers import random_docs, tiny_llama

from unimem_bench.methods import METHODS, MemoryLM, MethodContext
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


def counting(op):
    """The op, counting the calls whose query heads outnumber the KV heads (GQA calls)."""
    def call(query, keys, *args, **kwargs):
        call.gqa += query.shape[1] != keys.shape[1]
        return op(query, keys, *args, **kwargs)
    call.gqa = 0
    return call


@pytest.mark.parametrize("native", [True, False])
def test_fused_kernel_probes_gqa_once(monkeypatch, native):
    """The first GQA call decides whether the op reads fewer KV heads itself and the kernel object keeps the
    answer: a refusing op is tried once, never again, and either branch gives the manual path's values."""
    query, keys, values, mask = inputs("shared")
    op = counting(kernels.CPU_FLASH_WITH_LSE if native else refusing_gqa(kernels.CPU_FLASH_WITH_LSE))
    monkeypatch.setattr(kernels, "CPU_FLASH_WITH_LSE", op)
    kernel = kernels.FusedKernel()
    first = kernels.attention_with_lse(query, keys, values, mask, 0.3, kernel)
    assert kernel.native_gqa is native and op.gqa == 1
    again = kernels.block_attention(query, keys, values, None, 0.3, kernel)
    assert op.gqa == (2 if native else 1)  # a refusing op is not tried again
    monkeypatch.setattr(kernels, "CPU_FLASH_WITH_LSE", None)
    manual = kernels.attention_with_lse(query, keys, values, mask, 0.3)
    unmasked = kernels.attention_with_lse(query, keys, values, torch.zeros(6, 10), 0.3)
    for got, want in ((first, manual), (again, unmasked)):
        torch.testing.assert_close(got[0], want[0], atol=1e-5, rtol=0)
        torch.testing.assert_close(got[1], want[1], atol=1e-5, rtol=0)


def test_model_probes_once_per_run(monkeypatch):
    """A MemoryLM keeps one kernel object for all its contexts: a model whose fused op refuses GQA tries it once
    in a whole scored document (every layer, every segment), and scores as the native op does."""
    model = tiny_llama(kv_heads=2)
    # Top-k merges through the log-sum-exp attention in every injected layer once memory holds a segment.
    config = METHODS.get("memorizing_transformer").config(MethodContext(2, 8, 256), ())
    doc = random_docs([40])[0]
    with MemoryLM(model, config, segment_len=8) as lm:
        want = lm.score([doc])[0]
        assert lm.kernel.native_gqa is True
    op = counting(refusing_gqa(kernels.CPU_FLASH_WITH_LSE))
    monkeypatch.setattr(kernels, "CPU_FLASH_WITH_LSE", op)
    with MemoryLM(model, config, segment_len=8) as lm:
        got = lm.score([doc])[0]
        assert lm.kernel.native_gqa is False
    assert op.gqa == 1
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
