"""Fine-tuning checkpoints on disk.

An *export* is a Hugging Face model folder (weights, config, tokenizer) plus the method it was trained with:
`unimem_method.yaml` (method name, resolved config, segment length) and `unimem_method.safetensors` (the method's own
learned parameters, e.g. RMT's memory tokens). `unimem-bench run --model <export>` evaluates it with that method.

A *training checkpoint* `checkpoints/step-NNNNNN/` holds an export (`model/`), accelerate's state (`trainer/`: model,
optimizer, scheduler, RNG of every process) and, per process, its document streams and the memory of every row
(`streams-rank<R>.pt`), so a resumed run continues exactly. It is written into a temporary folder by all processes
and renamed into place by the main one, so a checkpoint folder is either complete or absent.
"""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import load_file, save_file

from unimem_bench.methods import MemoryLM, UniMemConfig

METHOD_FILE = "unimem_method.yaml"
METHOD_TENSORS = "unimem_method.safetensors"
_STEP_DIR = re.compile(r"^step-(\d+)$")


@dataclass(frozen=True)
class SavedMethod:
    """The method a fine-tuned export was trained with."""

    method: str
    """Registry name of the method."""
    config: UniMemConfig
    """The resolved config it was trained with (sizes already scaled to its segment length)."""
    segment_len: int
    """The segment length it was trained with (the default for evaluating it)."""
    folder: Path
    """The export folder."""

    def load_into(self, lm: MemoryLM) -> None:
        """Give `lm` the learned method parameters (memory tokens) saved with the export."""
        path = self.folder / METHOD_TENSORS
        lm.load_method_state(load_file(path, device=str(lm.device)) if path.exists() else {})


def read_saved_method(folder: str | Path) -> SavedMethod | None:
    """The method saved with an export folder, or None for a plain model folder."""
    path = Path(folder) / METHOD_FILE
    if not path.is_file():
        return None
    data = yaml.safe_load(path.read_text())
    return SavedMethod(method=data["method"], config=UniMemConfig.from_dict(data["config"]),
                       segment_len=int(data["segment_len"]), folder=Path(folder))


def write_export(folder: Path, *, lm: MemoryLM, state_dict: dict[str, torch.Tensor], tokenizer: Any,
                 method: str, segment_len: int, info: dict[str, Any]) -> None:
    """Write an export of `lm` into `folder` (created). `state_dict` is the trainer module's full state dict (keys
    `lm.model.*` for the HF model, `lm.<name>` for the method's own parameters), gathered from every process."""
    folder.mkdir(parents=True, exist_ok=True)
    weights = {k.removeprefix("lm.model."): v for k, v in state_dict.items() if k.startswith("lm.model.")}
    own = {name: state_dict[f"lm.{name}"].contiguous() for name in lm.method_state()}
    model = lm.model
    model.save_pretrained(folder, state_dict=weights)
    tokenizer.save_pretrained(folder)
    if own:
        save_file(own, folder / METHOD_TENSORS)
    record = {"method": method, "segment_len": segment_len, **info, "config": lm.config.to_dict()}
    (folder / METHOD_FILE).write_text(yaml.safe_dump(record, sort_keys=False))


def step_dir(out: Path, step: int) -> Path:
    return out / "checkpoints" / f"step-{step:06d}"


def staging_dir(out: Path, step: int) -> Path:
    """Where every process writes a checkpoint before the main one renames it to `step_dir`."""
    return out / "checkpoints" / f".step-{step:06d}.tmp"


def complete_checkpoints(out: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every complete checkpoint, oldest first."""
    root = out / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return sorted(found)


def publish(out: Path, step: int, keep: int) -> Path:
    """Rename a fully written staging folder into place and drop all but the newest `keep` checkpoints."""
    final = step_dir(out, step)
    if final.exists():
        shutil.rmtree(final)
    os.replace(staging_dir(out, step), final)
    for _, old in complete_checkpoints(out)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def save_streams(folder: Path, rank: int, data: dict[str, Any]) -> None:
    torch.save(data, folder / f"streams-rank{rank}.pt")


def load_streams(folder: Path, rank: int) -> dict[str, Any]:
    path = folder / f"streams-rank{rank}.pt"
    if not path.is_file():
        raise FileNotFoundError(f"{folder} has no state for process {rank}: resume with the number of processes the "
                                "checkpoint was written with")
    return torch.load(path, weights_only=False)
