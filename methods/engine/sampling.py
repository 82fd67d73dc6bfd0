"""How generation picks the next token: greedy or seeded sampling."""

from __future__ import annotations

from dataclasses import dataclass

from unimem_bench.methods.config import ConfigError


@dataclass(frozen=True)
class Sampling:
    """How the next token is chosen: greedy by default, or seeded sampling."""

    do_sample: bool = False
    """Sample from the distribution instead of taking the argmax."""
    temperature: float = 1.0
    """Logits are divided by this before sampling."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens whose probability reaches top_p (1 keeps all)."""
    seed: int = 0
    """Seed of the sampler's own generator: the same seed gives the same text, whatever else ran before."""

    def __post_init__(self) -> None:
        if self.temperature <= 0:
            raise ConfigError(f"temperature {self.temperature} must be > 0 (use do_sample=False for greedy)")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p {self.top_p} must be in (0, 1]")
