"""LongNet's dilated reading beyond the reference grid: the patterns change what is read, per head, and settings
that cannot run are refused."""

from __future__ import annotations

import pytest
import torch
from helpers import random_docs, tiny_llama

from unimem_bench.methods import METHODS, ConfigError, MemoryLM, MethodContext

CONTEXT = MethodContext(n_layers=2, segment_len=8, trained_context=64)


def nll(*overrides: str) -> torch.Tensor:
    model = tiny_llama(layers=2, heads=4, kv_heads=2, context=64, seed=3)
    with MemoryLM(model, METHODS.get("longnet").config(CONTEXT, list(overrides)), segment_len=8,
                  trained_context=64) as lm:
        return lm.score(random_docs([48], seed=5))[0]


def test_dilation_changes_what_is_read(one_thread) -> None:
    dilated = nll()
    dense = nll("reading.dilated_segments=[]", "reading.dilation_rates=[]")
    # Rate-2 and rate-4 patterns drop keys off a head's offset and weight the keys they hold twice or thrice.
    assert (dilated - dense).abs().max() > 1e-4
    one_pattern = nll("reading.dilated_segments=[32]", "reading.dilation_rates=[1]")
    # One rate-1 pattern of 32 tokens: dense inside each 32-token segment, so equal to dense up to position 31.
    torch.testing.assert_close(one_pattern[:31], dense[:31], atol=1e-5, rtol=0)
    assert (one_pattern[32:] - dense[32:]).abs().max() > 1e-4


@pytest.mark.parametrize(("override", "problem"), [
    ("reading.dilation_rates=[2,4,8]", "rate 1"), ("reading.dilation_rates=[1,2]", "one rate per segment"),
    ("reading.dilated_segments=[0,16,32]", ">= 1")])
def test_bad_dilation_is_refused(override, problem) -> None:
    with pytest.raises(ConfigError, match=problem):
        METHODS.get("longnet").config(CONTEXT, [override])
