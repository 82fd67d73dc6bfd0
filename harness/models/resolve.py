"""Where models come from: a local Hugging Face folder, a hub id, a llama2.c checkpoint, or the embedded reference.

`resolve_model` and `load_model_config` are cheap (no weights), so every bad `--model` fails in one line before any
model work; `load_model` then loads weights and tokenizer.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from unimem_bench.harness.models.autocompressor import (
    SummaryWeightError,
    checkpoint_summary_tokens,
    summary_embeddings,
    summary_weight_file,
)
from unimem_bench.harness.models.exports import SavedMethod, read_saved_method
from unimem_bench.harness.models.llama2c import find_llama2c_pair, load_llama2c, read_llama2c_config

Kind = Literal["hf", "hub", "llama2c", "reference"]


class ModelSourceError(ValueError):
    """A `--model` that cannot be used; the message is one line with the fix."""


@dataclass(frozen=True)
class ModelSource:
    """A resolved `--model`."""

    kind: Kind
    location: str
    """Folder, hub id, or llama2.c model file."""
    tokenizer: str | None = None
    """The llama2.c tokenizer file."""

    @property
    def name(self) -> str:
        """The id written to run records and the leaderboard."""
        if self.kind == "reference":
            return f"reference:{Path(self.location).name}"
        if self.kind == "hub":
            return self.location
        return f"{self.kind}:{Path(self.location).resolve()}"


def resolve_model(spec: str | None) -> ModelSource:
    """Interpret `--model`: None -> the reference model; an existing path -> HF folder or llama2.c; `org/name` ->
    a hub id."""
    if spec is None:
        from unimem_bench.harness.models.reference import reference_dir

        return ModelSource("reference", str(reference_dir()))
    path = Path(spec).expanduser()
    if (path / "model" / "config.json").is_file() and not (path / "config.json").exists():
        path = path / "model"  # a fine-tuning run folder or checkpoint: the model it exported
    if path.exists():
        pair = find_llama2c_pair(path)
        if pair is not None:
            return ModelSource("llama2c", str(pair[0]), str(pair[1]))
        if path.is_dir() and (path / "config.json").exists():
            return ModelSource("hf", str(path))
        raise ModelSourceError(f"--model {spec}: not a Hugging Face folder (no config.json) nor a llama2.c checkpoint "
                               "(model .bin + tokenizer .bin)")
    looks_like_hub = spec.count("/") == 1 and not spec.startswith((".", "/", "~")) and not spec.endswith(".bin")
    if looks_like_hub:
        return ModelSource("hub", spec)
    raise ModelSourceError(f"--model {spec}: no such file or folder (give a local HF folder, a llama2.c .bin, or a "
                           "hub id like org/name)")


def load_model_config(source: ModelSource) -> PretrainedConfig:
    """The model's config without its weights."""
    if source.kind == "llama2c":
        return read_llama2c_config(Path(source.location))
    if source.kind == "reference":
        from unimem_bench.harness.models.reference import ReferenceRecipe, reference_config

        path = Path(source.location)
        return AutoConfig.from_pretrained(path) if (path / "config.json").exists() else reference_config(
            ReferenceRecipe())
    try:
        config = longllama_config(source.location) or AutoConfig.from_pretrained(source.location)
    except OSError as err:
        where = "the hub is unreachable or the id is wrong" if source.kind == "hub" else "its config.json is unreadable"
        raise ModelSourceError(f"--model {source.location}: cannot load its config ({where}): "
                               f"{str(err).splitlines()[0]}") from None
    if source.kind == "hf" and checkpoint_summary_tokens(config):
        try:  # an AutoCompressor folder without its summary embeddings fails here, before any weights load
            summary_weight_file(source.location, hub=False)
        except SummaryWeightError as err:
            raise ModelSourceError(str(err)) from None
    return config


def saved_method(source: ModelSource) -> SavedMethod | None:
    """The method a fine-tuned export (`unimem-bench finetune`'s `model/` or a checkpoint's) was trained with; None
    for any other model. `run` evaluates such a folder with that method, its config and its learned memory."""
    return read_saved_method(source.location) if source.kind == "hf" else None


def trained_context(config: PretrainedConfig) -> int:
    """The model's trained context length (what position interpolation and default segments scale with)."""
    return int(config.max_position_embeddings)


def load_model(source: ModelSource, *, device: torch.device, dtype: torch.dtype,
               console: Any = None) -> tuple[Any, Any]:
    """Weights and tokenizer, in eval mode on `device`; builds the reference model first if it is missing."""
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    if source.kind == "llama2c":
        model, tokenizer = load_llama2c(Path(source.location), Path(source.tokenizer or ""), dtype=dtype)
    else:
        location = source.location
        if source.kind == "reference":
            from unimem_bench.harness.models.reference import build_reference

            location = str(build_reference(console=console))
        model = AutoModelForCausalLM.from_pretrained(location, config=longllama_config(location), dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(location)
        attach_summary_embeddings(model, location, hub=source.kind == "hub")
    # transformers types its wrapped `to` as the unbound function: the call is right, its annotation is not.
    return model.to(device).eval(), tokenizer  # type: ignore[arg-type]


LONGLLAMA_ONLY = ("mem_layers", "mem_positionals", "mem_dtype", "mem_attention_grouping", "torch_attention",
                  "gradient_checkpoint_every_ith", "last_context_length", "auto_map", "architectures", "model_type")
"""LongLlamaConfig fields (CStanKonrad/long_llama `src/configuration_longllama.py`) a LlamaConfig does not take."""


def longllama_config(location: str) -> LlamaConfig | None:
    """A LongLLaMA (FoT) checkpoint's config as the stock LlamaConfig its weights load into, or None for any other
    model. LongLLaMA is a drop-in LLaMA (same weight names; FoT keeps LLaMA's RoPE in the local context), so the
    `fot` method runs it; its memory layers are kept as `mem_layers` (see `checkpoint_memory_layers`)."""
    data, _ = PretrainedConfig.get_config_dict(location)
    if data.get("model_type") != "longllama":
        return None
    if not data.get("mem_positionals", True):
        raise ModelSourceError(f"--model {location}: a LongLLaMA checkpoint with mem_positionals=false has no RoPE in "
                               "its memory layers, which the engine cannot hook; use a LongLLaMA release "
                               "(mem_positionals=true)")
    fields = {name: value for name, value in data.items() if name not in LONGLLAMA_ONLY}
    config = LlamaConfig(**fields, architectures=["LlamaForCausalLM"])
    config.mem_layers = [int(i) for i in data.get("mem_layers", [])]
    return config


def checkpoint_memory_layers(config: PretrainedConfig) -> tuple[int, ...]:
    """The memory layers a model's config names (a LongLLaMA checkpoint's `mem_layers`); () for a plain model."""
    return tuple(int(i) for i in getattr(config, "mem_layers", None) or ())


def attach_summary_embeddings(model: PreTrainedModel, location: str, *, hub: bool) -> None:
    """An AutoCompressor checkpoint's `embed_summary` as the model's non-persistent buffer `summary_embeddings`
    (the `autocompressor` method starts from it); nothing for any other model."""
    if not checkpoint_summary_tokens(model.config):
        return
    try:
        weight = summary_embeddings(location, hub=hub)
    except SummaryWeightError as err:
        raise ModelSourceError(str(err)) from None
    if weight is not None:
        embed = model.get_input_embeddings().get_parameter("weight")
        model.register_buffer("summary_embeddings", weight.to(device=embed.device, dtype=embed.dtype),
                              persistent=False)
