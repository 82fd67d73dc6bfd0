"""The machinery every method shares: the hooked model, Eq. 9 attention, memory banks, retrieval and generation."""

from unimem_bench.methods.engine.hookable import HookError, check_hookable
from unimem_bench.methods.engine.memory_lm import MemoryLM, TokenScores
from unimem_bench.methods.engine.sampling import Sampling

__all__ = ["HookError", "MemoryLM", "Sampling", "TokenScores", "check_hookable"]
