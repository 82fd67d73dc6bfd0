"""StreamingLLM against an independent token-by-token rolling cache (tests/reference_unimem.rolling_cache_nll):
sinks kept, the oldest recent token evicted every step, keys re-rotated at their index in the cache. At segment
length 1 the engine runs the official evaluation's loop; streamed in longer segments (up to the window) it must give
the same numbers."""

from __future__ import annotations

import pytest
import torch
from helpers import random_docs, tiny_llama
from reference_unimem import rolling_cache_nll
from test_unimem_reference import reference_llama

from unimem_bench.methods import METHODS, ConfigError, MemoryLM, MethodContext

TINY_CONTEXT = 16


def streaming_nll(model: torch.nn.Module, segment: int, recent: int, doc: torch.Tensor, *overrides: str
                  ) -> torch.Tensor:
    ctx = MethodContext(n_layers=model.config.num_hidden_layers, segment_len=segment, trained_context=TINY_CONTEXT)
    config = METHODS.get("streaming_llm").config(
        ctx, [f"management.size={recent}", f"reading.window={recent}", *overrides])
    with MemoryLM(model, config, segment_len=segment, trained_context=TINY_CONTEXT) as lm:
        return lm.score([doc])[0]


@pytest.mark.parametrize(("segment", "sinks", "recent"), [(1, 4, 8), (3, 4, 8), (8, 4, 8), (1, 2, 5), (3, 2, 5),
                                                     (5, 2, 5), (1, 6, 3)])
def test_streaming_llm_equals_a_token_by_token_rolling_cache(segment, sinks, recent, one_thread) -> None:
    """Segment 1 is the official loop; longer segments (up to the window) are its chunked equivalent. Sinks more
    than a segment are gathered from the first segments."""
    model = tiny_llama(layers=3, heads=4, kv_heads=2, context=TINY_CONTEXT, seed=3)
    doc = random_docs([40], seed=5)[0]
    got = streaming_nll(model, segment, recent, doc, f"reading.global_tokens={sinks}")
    expected = rolling_cache_nll(reference_llama(model), doc, sinks=sinks, recent=recent)
    torch.testing.assert_close(got.double(), expected, atol=1e-5, rtol=0)


def test_without_sink_shift_the_sinks_sit_at_fixed_positions_and_differ(one_thread) -> None:
    """The shift matters: plain compact positions (sinks at 0 .. G-1 for every query) is another computation."""
    model = tiny_llama(layers=3, heads=4, kv_heads=2, context=TINY_CONTEXT, seed=3)
    doc = random_docs([40], seed=5)[0]
    expected = rolling_cache_nll(reference_llama(model), doc, sinks=4, recent=8)
    fixed = streaming_nll(model, 8, 8, doc, "position.sink_shift=false")
    assert (fixed.double() - expected).abs().max() > 1e-4  # ten times the exactness tolerance


def test_segment_longer_than_window_is_refused() -> None:
    model = tiny_llama(layers=1, heads=2, kv_heads=1, context=TINY_CONTEXT, seed=3)
    config = METHODS.get("streaming_llm").config(MethodContext(1, 8, TINY_CONTEXT), ["reading.window=4",
                                                                                      "management.size=4"])
    with pytest.raises(ConfigError, match="reading.window >= 8"):
        MemoryLM(model, config, segment_len=8, trained_context=TINY_CONTEXT)


@pytest.mark.parametrize("override", ["position.mode=official", "reading.sliding=false", "reading.stride=2",
                                      "reading.global_source=memory"])
def test_sink_shift_needs_its_setting(override) -> None:
    with pytest.raises(ConfigError, match="sink_shift"):
        METHODS.get("streaming_llm").config(MethodContext(1, 8, TINY_CONTEXT), [override])
