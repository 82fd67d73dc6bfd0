"""kvpress as an oracle for score-based eviction: StreamingLLM, SnapKV, TOVA and Knorm presses compress stories260K's
cache once after a prefill; ours, streaming the prompt as one segment, must keep the same prompt positions per layer
and KV head at the same budget (README, KV-cache compression: where and why they may differ).

kvpress 0.5 pins an older transformers, so it lives in its own virtual environment and runs
tests/oracles/kvpress_kept.py there; the two sides exchange JSON files, never imports. The environment is
$UNIMEM_KVPRESS_PYTHON, or kvpress-venv/bin/python beside ../shared's folder; make it with
`python -m venv kvpress-venv && kvpress-venv/bin/pip install torch==2.13.0 "kvpress>=0.5,<0.6"`.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from helpers import SHARED, slow_only
from test_unimem_reference import stories_doc
from transformers import AutoModelForCausalLM, DynamicCache

from unimem_bench.methods import METHODS, MemoryLM, MethodContext

ORACLE = Path(__file__).parent / "oracles" / "kvpress_kept.py"
PROMPT = 256
KEPT = 64
"""kvpress keeps int(256 x (1 - 0.75)) = 64 pairs; ours `management.size=64`: the same budget with no rounding."""
SINKS, WINDOW = 4, 16

PRESSES = {
    # name: (kvpress class and arguments, our method and overrides at the same budget)
    "streaming_llm": (("StreamingLLMPress", {"compression_ratio": 0.75, "n_sink": SINKS}),
                      ("streaming_llm", [f"management.size={KEPT - SINKS}", f"reading.window={KEPT - SINKS}",
                                         f"reading.global_tokens={SINKS}", "position.sink_shift=false"])),
    "snapkv": (("SnapKVPress", {"compression_ratio": 0.75, "window_size": WINDOW, "kernel_size": 5}),
               ("snapkv", [f"management.size={KEPT}", f"management.observe={WINDOW}", "management.pool_kernel=5",
                           f"management.recent={WINDOW}", "management.sinks=0"])),
    "tova": (("TOVAPress", {"compression_ratio": 0.75}),
             ("tova", [f"management.size={KEPT}", "management.recent=0", "management.sinks=0"])),
    "knorm": (("KnormPress", {"compression_ratio": 0.75}),
              ("knorm", [f"management.size={KEPT}", "management.recent=0", "management.sinks=0"])),
}


def kvpress_python() -> Path:
    return Path(os.environ.get("UNIMEM_KVPRESS_PYTHON") or SHARED.resolve().parent / "kvpress-venv/bin/python")


@pytest.fixture(scope="module")
def kvpress_kept(stories_dir, tmp_path_factory) -> tuple[dict, torch.Tensor]:
    """kvpress' kept positions per press, layer and KV head, and the prompt they compressed."""
    python = kvpress_python()
    if not python.exists():
        pytest.skip(f"no kvpress environment at {python}: set UNIMEM_KVPRESS_PYTHON (see this file's docstring)")
    probe = subprocess.run([str(python), "-c", "import kvpress"], capture_output=True)
    if probe.returncode:
        pytest.skip(f"{python} cannot import kvpress: pip install 'kvpress>=0.5,<0.6' there")
    ids = stories_doc(PROMPT)
    assert len(ids) == PROMPT  # the budget of 64 is a quarter of exactly this prompt
    folder = tmp_path_factory.mktemp("kvpress")
    request = {"model": str(Path(stories_dir).resolve()), "ids": ids.tolist(),
               "presses": [{"name": name, "press": press, "args": args}
                           for name, ((press, args), _) in PRESSES.items()]}
    (folder / "request.json").write_text(json.dumps(request))
    subprocess.run([str(python), str(ORACLE), str(folder / "request.json"), str(folder / "answer.json")],
                   check=True, capture_output=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return json.loads((folder / "answer.json").read_text()), ids


def our_kept(model: torch.nn.Module, ids: torch.Tensor, name: str) -> list[list[list[int]]]:
    """Our kept prompt positions [layer][kv head] after streaming the prompt as one segment."""
    _, (method, overrides) = PRESSES[name]
    n_layers, kv_heads = model.config.num_hidden_layers, model.config.num_key_value_heads
    config = METHODS.get(method).config(MethodContext(n_layers, len(ids), model.config.max_position_embeddings),
                                        overrides)
    with MemoryLM(model, config, segment_len=len(ids)) as lm, torch.no_grad():
        state = lm.new_state(1)
        lm.forward_segment(state, ids.unsqueeze(0), 0)
        if config.management.scored:  # per-head slots
            return [[sorted(head) for head in state.layers[i].ids[0].tolist()] for i in range(n_layers)]
        kept = sorted(range(SINKS)) + state.positions.tolist()  # sinks, then the window: the same for every head
        return [[kept] * kv_heads for _ in range(n_layers)]


def prefill_key_norms(model: torch.nn.Module, ids: torch.Tensor) -> list[torch.Tensor]:
    """[kv_heads, prompt] key L2 norms of every layer after a plain prefill."""
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(ids.unsqueeze(0), cache=cache, use_cache=True)
    return [layer.keys[0].norm(dim=-1) for layer in cache.layers]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["streaming_llm", "snapkv", "tova"])
def test_kept_positions_equal_kvpress(name, kvpress_kept, stories_dir, request, one_thread) -> None:
    slow_only(request, "runs kvpress in its own environment")
    answer, ids = kvpress_kept
    model = AutoModelForCausalLM.from_pretrained(stories_dir, dtype=torch.float32).eval()
    assert our_kept(model, ids, name) == answer[name]


@pytest.mark.slow
def test_knorm_keeps_kvpress_positions_up_to_ties(kvpress_kept, stories_dir, request, one_thread) -> None:
    # Where the two keep different positions, the key norms tie at our 1e-4 grid (a repeated token's layer-0 keys:
    # equal before RoPE, whose rotation keeps the norm): ours keeps the newer, kvpress whichever rounding favours.
    slow_only(request, "runs kvpress in its own environment")
    answer, ids = kvpress_kept
    model = AutoModelForCausalLM.from_pretrained(stories_dir, dtype=torch.float32).eval()
    ours, norms = our_kept(model, ids, "knorm"), prefill_key_norms(model, ids)
    differing = 0
    for layer, (our_heads, their_heads) in enumerate(zip(ours, answer["knorm"], strict=True)):
        for head, (mine, theirs) in enumerate(zip(our_heads, their_heads, strict=True)):
            only_ours, only_theirs = sorted(set(mine) - set(theirs)), sorted(set(theirs) - set(mine))
            assert len(only_ours) == len(only_theirs)
            for p, q in zip(only_ours, only_theirs, strict=True):
                differing += 1
                assert abs(float(norms[layer][head, p] - norms[layer][head, q])) < 1e-4 and p > q
    assert differing <= 4  # a handful of ties, not a different policy
