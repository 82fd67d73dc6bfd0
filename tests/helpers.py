"""Helpers shared by the tests: tiny random LLaMA models (fp32, CPU) and the ../shared asset paths."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
STORIES = SHARED / "models" / "stories260K"
BOOKS = SHARED / "data" / "books"


def tiny_llama(*, layers: int = 2, heads: int = 4, kv_heads: int = 2, seed: int = 0, context: int = 256,
               **rope: object) -> LlamaForCausalLM:
    """hidden 32, vocab 99: small enough that every exactness test runs in well under a second."""
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=heads,
                         num_key_value_heads=kv_heads, vocab_size=99, max_position_embeddings=context,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0, **rope})
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


def random_docs(lengths: list[int], seed: int = 1) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 99, (n,), generator=generator) for n in lengths]


def sweep_argv(model_dir: Path, out: Path, *args: str) -> list[str]:
    """`unimem-bench sweep` of unimix on the tiny model: 2 short standard-library files, 16-token segments."""
    return ["sweep", "--method", "unimix", "--model", str(model_dir), "--tasks", "github", "--max-docs", "2",
            "--max-tokens", "128", "--segment-len", "16", "--out", str(out), *args]
