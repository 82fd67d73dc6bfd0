"""A released AutoCompressor checkpoint (princeton-nlp/AutoCompressor-Llama-2-7b-6k) through `--model`.

The checkpoint is a stock LLaMA (same weight names, `model_type` llama) plus `summary_length` and
`accumulate_summary` in its config and one extra weight, `embed_summary.weight` [summary_length, hidden] (official
`AutoCompressorModel.__init__`). transformers loads the LLaMA and skips that weight; `summary_embeddings` reads it
from the checkpoint's files (a local folder or, with a network, the hub's cached files), and the loader attaches it
to the model as the non-persistent buffer `summary_embeddings`, which the `autocompressor` method's MemoryLM starts
its summary tokens from.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import PretrainedConfig

from unimem_bench.harness.models.exports import METHOD_FILE

SUMMARY_WEIGHT = "embed_summary.weight"
"""The summary token embeddings' name in an AutoCompressor checkpoint."""
INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
SINGLE_FILES = ("model.safetensors", "pytorch_model.bin")


class SummaryWeightError(ValueError):
    """An AutoCompressor checkpoint without its summary embeddings; the message is one line with the fix."""


def checkpoint_summary_tokens(config: PretrainedConfig) -> int:
    """Summary tokens per segment an AutoCompressor checkpoint's config names (`summary_length`); 0 otherwise."""
    return int(getattr(config, "summary_length", 0) or 0)


def summary_embeddings(location: str, *, hub: bool) -> torch.Tensor | None:
    """[summary_length, hidden] `embed_summary.weight` of the checkpoint at `location` (a folder, or a hub id when
    `hub`), found through its shard index or its single weights file. None for a fine-tuned export of one (its
    learned summary tokens are in the export's method state); SummaryWeightError when the weight is missing."""
    path = summary_weight_file(location, hub=hub)
    return None if path is None else _read_tensor(path, SUMMARY_WEIGHT)


def summary_weight_file(location: str, *, hub: bool) -> Path | None:
    """The checkpoint file holding `embed_summary.weight` (no tensor is read from a safetensors file or a shard the
    index names); None for a fine-tuned export; SummaryWeightError when no file holds it."""
    for index_name in INDEXES:
        index = _checkpoint_file(location, index_name, hub)
        if index is None:
            continue
        shard = json.loads(index.read_text())["weight_map"].get(SUMMARY_WEIGHT)
        path = None if shard is None else _checkpoint_file(location, shard, hub)
        if path is not None:
            return path
    for name in SINGLE_FILES:
        path = _checkpoint_file(location, name, hub)
        if path is not None and _holds(path, SUMMARY_WEIGHT):
            return path
    if not hub and (Path(location) / METHOD_FILE).is_file():
        return None
    raise SummaryWeightError(f"--model {location}: its config has summary_length (an AutoCompressor) but no "
                             f"{SUMMARY_WEIGHT} in its weights: use the released checkpoint's files, or drop "
                             "summary_length from its config.json to load it as a plain LLaMA")


def _checkpoint_file(location: str, name: str, hub: bool) -> Path | None:
    if not hub:
        path = Path(location) / name
        return path if path.is_file() else None
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    try:
        return Path(hf_hub_download(location, name))
    except EntryNotFoundError:
        return None


def _holds(path: Path, name: str) -> bool:
    if path.suffix == ".safetensors":
        with safe_open(str(path), framework="pt") as f:
            return name in f.keys()  # noqa: SIM118 (safe_open is not a dict)
    return name in _load_bin(path)


def _load_bin(path: Path) -> dict[str, torch.Tensor]:
    # mmap: a multi-GB shard is not read into memory for one small tensor.
    return torch.load(path, map_location="cpu", mmap=True, weights_only=True)


def _read_tensor(path: Path, name: str) -> torch.Tensor:
    if path.suffix == ".safetensors":
        with safe_open(str(path), framework="pt") as f:
            if name in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                return f.get_tensor(name)
    else:
        weights = _load_bin(path)
        if name in weights:
            return weights[name].clone()
    raise SummaryWeightError(f"{path} does not hold {name} although the checkpoint's index says it does")
