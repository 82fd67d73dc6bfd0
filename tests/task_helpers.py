"""Helpers of the generation-task tests: a model stand-in that must never generate, and vanilla / memory LMs."""

from __future__ import annotations

from unimem_bench.methods import METHODS, MemoryLM, MethodContext


class NoGeneration:
    """An LM that must not be asked to generate: every sample has to come from the resume log."""

    segment_len = 256
    trained_context = 512

    def generate(self, *args, **kwargs):
        raise AssertionError("a logged sample was generated again")


def memory_lm(model, method: str = "vanilla", *, segment_len: int = 256, trained_context: int = 512) -> MemoryLM:
    """`method` on `model` with the given segment and trained context."""
    layers = model.config.num_hidden_layers
    config = METHODS.get(method).config(MethodContext(n_layers=layers, segment_len=segment_len,
                                                      trained_context=trained_context))
    return MemoryLM(model, config, segment_len=segment_len, trained_context=trained_context)
