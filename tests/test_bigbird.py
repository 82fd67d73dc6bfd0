"""BigBird's seeded random slots beyond the reference grid: they are read, the seed decides them, and settings
that cannot run are refused."""

from __future__ import annotations

import pytest
import torch
from helpers import random_docs, tiny_llama

from unimem_bench.methods import METHODS, ConfigError, MemoryLM, MethodContext

CONTEXT = MethodContext(n_layers=2, segment_len=8, trained_context=16)


def nll(*overrides: str) -> torch.Tensor:
    model = tiny_llama(layers=2, heads=4, kv_heads=2, context=16, seed=3)
    config = METHODS.get("bigbird").config(CONTEXT, ["management.size=24", "management.overflow=fifo", *overrides])
    with MemoryLM(model, config, segment_len=8, trained_context=16) as lm:
        return lm.score(random_docs([40], seed=5))[0]


def test_random_slots_are_read_and_the_seed_decides_them(one_thread) -> None:
    base = nll("reading.random_slots=3", "reading.random_block=2")
    assert torch.equal(base, nll("reading.random_slots=3", "reading.random_block=2"))
    assert (base - nll("reading.random_slots=3", "reading.random_block=2", "reading.random_seed=1")).abs().max() > 1e-4
    assert (base - nll("reading.random_slots=0")).abs().max() > 1e-4


@pytest.mark.parametrize(("override", "problem"), [
    ("reading.topk=2", "reading.topk=0"), ("reading.random_block=0", "random_block"),
    ("reading.random_slots=-1", "random_slots")])
def test_bad_random_settings_are_refused(override, problem) -> None:
    with pytest.raises(ConfigError, match=problem):
        METHODS.get("bigbird").config(CONTEXT, [override])
