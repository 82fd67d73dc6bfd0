"""Run kvpress presses once after a prefill and write, per press, the prompt positions each layer's KV heads keep.

Runs in its own virtual environment (kvpress 0.5 pins an older transformers), never imported by the test suite:
    <kvpress venv>/bin/python kvpress_kept.py request.json answer.json
request: {"model": folder, "ids": [prompt token ids], "presses": [{"name": ..., "press": class name, "args": {...}}]}
answer: {name: [[kept positions, ascending] per KV head] per layer}. A kept key is matched to its position by exact
equality with the uncompressed prefill's keys (presses gather keys, they never change them).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import kvpress
import torch
from transformers import AutoModelForCausalLM, DynamicCache


def prefill_keys(model, ids: torch.Tensor, press=None) -> list[torch.Tensor]:
    """[kv_heads, kept, head_dim] cached keys of every layer after one prefill (compressed when `press`)."""
    cache = DynamicCache()
    with torch.no_grad():
        if press is None:
            model(ids, past_key_values=cache, use_cache=True)
        else:
            with press(model):
                model(ids, past_key_values=cache, use_cache=True)
    return [layer.keys[0] for layer in cache.layers]


def kept_positions(full: torch.Tensor, kept: torch.Tensor) -> list[list[int]]:
    """Per KV head, the positions of `kept` keys [heads, k, dim] among `full` [heads, n, dim], ascending."""
    out = []
    for head in range(full.shape[0]):
        same = (kept[head][:, None, :] == full[head][None, :, :]).all(-1)  # [k, n]
        if not bool(same.any(1).all()):
            raise SystemExit("a kept key matches no prompt key exactly")
        out.append(sorted(int(i) for i in same.float().argmax(1)))
    return out


def main(request_path: str, answer_path: str) -> None:
    request = json.loads(Path(request_path).read_text())
    model = AutoModelForCausalLM.from_pretrained(request["model"], dtype=torch.float32).eval()
    ids = torch.tensor([request["ids"]])
    full = prefill_keys(model, ids)
    answer = {}
    for spec in request["presses"]:
        press = getattr(kvpress, spec["press"])(**spec["args"])
        kept = prefill_keys(model, ids, press)
        answer[spec["name"]] = [kept_positions(f, k) for f, k in zip(full, kept, strict=True)]
    Path(answer_path).write_text(json.dumps(answer))


if __name__ == "__main__":
    main(*sys.argv[1:3])
