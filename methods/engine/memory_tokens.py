"""Model-forward memory tokens (RMT, AutoCompressor): their initial embeddings and AutoCompressor's accumulation."""

from __future__ import annotations

import torch
from transformers import PreTrainedModel

from unimem_bench.methods.config import ConfigError, UniMemConfig


def accumulate(summaries: torch.Tensor, new: torch.Tensor, cap: int) -> torch.Tensor:
    """AutoCompressor's summary accumulation: [batch, s, hidden] earlier summary vectors and [batch, m, hidden] new
    ones -> the last `cap` (all when cap is 0) of their concatenation, oldest first."""
    joined = torch.cat([summaries, new], dim=1)  # [batch, s + m, hidden]
    return joined[:, -cap:] if cap and joined.shape[1] > cap else joined


def initial_memory_embeddings(model: PreTrainedModel, config: UniMemConfig) -> torch.Tensor:
    """[m, hidden] float32 initial memory embeddings: a memory-trained checkpoint's own (an AutoCompressor's
    `embed_summary`, attached by the model loader as the `summary_embeddings` buffer) in accumulate mode, else as
    writing.memory_init says."""
    m = config.writing.memory_tokens
    embed = model.get_input_embeddings().get_parameter("weight")
    saved = getattr(model, "summary_embeddings", None)
    if isinstance(saved, torch.Tensor) and config.writing.memory_mode == "accumulate":
        if tuple(saved.shape) != (m, embed.shape[1]):
            raise ConfigError(f"the checkpoint's summary embeddings are {tuple(saved.shape)} but writing.memory_tokens"
                              f"={m}: set writing.memory_tokens={saved.shape[0]} (the checkpoint's summary_length)")
        return torch.zeros(saved.shape) if saved.is_meta else saved.detach().float().cpu()  # meta: shapes only
    if config.writing.memory_init == "eos":
        eos = model.config.eos_token_id
        eos = eos[0] if isinstance(eos, list) and eos else eos
        if not isinstance(eos, int):
            raise ConfigError("writing.memory_init=eos needs the model's eos_token_id, which its config lacks: set "
                              "writing.memory_init=noise")
        row = torch.zeros(embed.shape[1]) if embed.is_meta else embed.detach()[eos].float().cpu()
        return row.expand(m, -1).clone()
    # RMT initialises memory tokens randomly; embedding-scale noise keeps them in the input distribution.
    generator = torch.Generator().manual_seed(0)
    scale = 1.0 if embed.is_meta else float(embed.detach().float().std())  # meta: shapes only (dry runs)
    return torch.randn(m, embed.shape[1], generator=generator) * scale
