"""Eviction continues during generation: generated tokens are subject to the same policy as the prompt's."""

from __future__ import annotations

import pytest
from helpers import random_docs, tiny_llama

from unimem_bench.methods import METHODS, MemoryLM, MethodContext


@pytest.mark.parametrize("name", ["h2o", "tova", "snapkv", "knorm"])
def test_generated_segments_are_written_and_evicted_by_the_policy(name: str) -> None:
    """A one-segment prompt fills the 8-slot memory; each 8 generated tokens are committed through the same write,
    which evicts 8 slots by the policy (2 commits in 17 tokens: the 17th ends generation before a commit), and
    later tokens read the compressed memory."""
    model = tiny_llama(layers=2, seed=1)
    config = METHODS.get(name).config(MethodContext(n_layers=2, segment_len=8, trained_context=256))
    assert config.management.size == 8
    prompt = random_docs([8], seed=2)[0]
    with MemoryLM(model, config, segment_len=8) as lm:
        lm.reset_usage()
        new = lm.generate(prompt, max_new_tokens=17, min_new_tokens=17)
        usage = {i: (u.evicted, u.read_compressed > 0) for i, u in lm.usage.items()}
        assert lm.longest_input == len(prompt) + len(new) - 1  # the last token is never fed back
    assert len(new) == 17
    assert usage == {0: (16, True), 1: (16, True)}
