"""The one reading of a `--device` name (run, sweep, finetune, lm-eval and the trainer all resolve it here)."""

from __future__ import annotations

import logging
import os

import torch

from unimem_bench.methods import ConfigError

log = logging.getLogger(__name__)


def resolve_device(name: str, *, fall_back: bool = False) -> torch.device:
    """`auto` is this process's own GPU under a launcher (LOCAL_RANK), else cuda when available, else cpu.

    A name torch does not know, or a CUDA device this machine lacks, is a one-line `ConfigError` (checked before any
    weights load); with `fall_back` a missing CUDA device falls back to `auto` with a warning instead (lm-eval passes
    cuda:0 unless told otherwise, and its own hf model falls back the same way).
    """
    auto = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if torch.cuda.is_available() else \
        torch.device("cpu")
    if name == "auto":
        return auto
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"--device {name!r} is not a device: use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        if fall_back:
            log.warning("device %s is not available here: using %s", name, auto)
            return auto
        raise ConfigError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s); use "
                          "--device auto or cpu")
    return device


def default_dtype(device: torch.device) -> torch.dtype:
    """bfloat16 on CUDA (half the memory, and the precision LLaMA-family models are trained in), float32 elsewhere
    (CPU bfloat16 matmuls are slow and lose digits that perplexity comparisons need)."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def is_cpu(name: str) -> bool:
    """Whether `--device name` resolves to the CPU."""
    return resolve_device(name).type == "cpu"
