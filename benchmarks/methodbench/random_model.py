"""Random LLaMAs of real widths for timing: `--random-model hidden=512,layers=8,heads=8,kv_heads=8` or `62m`.

Per-token time depends on the shapes, not on trained weights, so a seeded random model of a real model's widths
times what a real one would (head dim 64 and more, where attention and memory reading weigh as in practice),
without a download. Perplexity of such a model means nothing."""


from transformers import LlamaConfig

from unimem_bench.methods.config import ConfigError

PREFIX = "random:"
"""A `--model` spec starting with this names a random model (the rest is the `--random-model` text)."""

PRESETS = {"62m": "hidden=512,layers=8,heads=8,kv_heads=8,intermediate=1536,vocab=32000"}
"""62M parameters (untied 32K embeddings, 8 layers of width 512, head dim 64): the benchmark's real-width model."""

FIELDS = {"hidden": 512, "layers": 8, "heads": 8, "kv_heads": 0, "intermediate": 0, "vocab": 32000,
          "context": 2048}
"""Defaults: kv_heads 0 = heads (no GQA); intermediate 0 = 3 x hidden; a 2K trained context (LLaMA-1's)."""


def parse(text: str) -> dict[str, int]:
    """`62m` or `key=value,...` over FIELDS -> the full field dict; ConfigError names a bad part."""
    text = PRESETS.get(text.strip().lower(), text)
    values = dict(FIELDS)
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, _, value = part.partition("=")
        if key not in FIELDS or not value.isdigit() or int(value) < 1:
            raise ConfigError(f"--random-model part {part!r} is not KEY=POSITIVE_INT with KEY one of "
                              f"{', '.join(FIELDS)} (or a preset: {', '.join(PRESETS)})")
        values[key] = int(value)
    values["kv_heads"] = values["kv_heads"] or values["heads"]
    values["intermediate"] = values["intermediate"] or 3 * values["hidden"]
    if values["hidden"] % values["heads"] or values["heads"] % values["kv_heads"]:
        raise ConfigError(f"--random-model needs hidden divisible by heads and heads by kv_heads, got {values}")
    return values


def random_config(text: str) -> LlamaConfig:
    """The LlamaConfig of a `--random-model` text (the part after PREFIX)."""
    v = parse(text)
    return LlamaConfig(hidden_size=v["hidden"], intermediate_size=v["intermediate"], num_hidden_layers=v["layers"],
                       num_attention_heads=v["heads"], num_key_value_heads=v["kv_heads"], vocab_size=v["vocab"],
                       max_position_embeddings=v["context"], tie_word_embeddings=False,
                       rope_parameters={"rope_type": "default", "rope_theta": 10000.0})


def describe(text: str) -> str:
    """`random LLaMA 62.3M (hidden 512, 8 layers, 8/8 heads, head dim 64)`."""
    v = parse(text)
    h, d = v["hidden"], v["hidden"] // v["heads"]
    per_layer = 2 * h * h + 2 * h * v["kv_heads"] * d + 3 * h * v["intermediate"]
    params = v["layers"] * per_layer + 2 * v["vocab"] * h
    return (f"random LLaMA {params / 1e6:.1f}M (hidden {h}, {v['layers']} layers, {v['heads']}/{v['kv_heads']} "
            f"heads, head dim {d})")
