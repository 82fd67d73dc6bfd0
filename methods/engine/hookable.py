"""Which Hugging Face models the engine can hook: a check on the model config alone, before any weights load."""

from __future__ import annotations

from transformers import PretrainedConfig

# Decoders whose attention goes through transformers' AttentionInterface with RoPE applied before it.
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


class HookError(ValueError):
    """A model the engine cannot hook; the message is one line naming the model type and what is supported."""


def check_hookable(config: PretrainedConfig) -> None:
    """Raise HookError unless this model config is a RoPE decoder the engine can hook (no weights needed)."""
    model_type = getattr(config, "model_type", "?")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise HookError(f"model type {model_type!r} cannot be hooked: unimem-bench needs a LLaMA-family RoPE decoder "
                        f"({', '.join(SUPPORTED_MODEL_TYPES)}); pick such a checkpoint with --model")
    rope = getattr(config, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") not in ("default", "linear", "llama3", "dynamic"):
        raise HookError(f"rope_type {rope['rope_type']!r} cannot be hooked: memory keys are re-positioned with plain "
                        "RoPE rotations (default, linear, llama3, dynamic)")
