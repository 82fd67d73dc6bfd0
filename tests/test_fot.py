"""FoT / LongLLaMA: a LongLLaMA checkpoint's config maps to the `fot` method through `--model`; its memory layers
read densely with memory keys at position 0, exactly as the float64 reference computes it."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from helpers import one_line_error, random_docs, save_tiny_model, write_text_docs
from reference_unimem import reference_nll
from test_unimem_reference import ATOL, describe, reference_llama
from transformers import AutoModelForCausalLM

from unimem_bench.harness.models.resolve import (
    checkpoint_memory_layers,
    load_model,
    load_model_config,
    resolve_model,
    trained_context,
)
from unimem_bench.methods import METHODS, MemoryLM, MethodContext

LONGLLAMA_3B = {
    # The fields of LongLLaMA-3B's config.json (LongLlamaConfig, CStanKonrad/long_llama src/configuration_longllama.py;
    # memory layers 6, 12, 18 of 26 as its README's table lists them).
    "architectures": ["LongLlamaForCausalLM"], "model_type": "longllama",
    "auto_map": {"AutoConfig": "configuration_longllama.LongLlamaConfig",
                 "AutoModelForCausalLM": "modeling_longllama.LongLlamaForCausalLM"},
    "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "hidden_act": "silu", "hidden_size": 3200,
    "intermediate_size": 8640, "num_attention_heads": 32, "num_hidden_layers": 26, "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-6, "initializer_range": 0.02, "tie_word_embeddings": False, "use_cache": True,
    "vocab_size": 32000, "last_context_length": 1024, "mem_layers": [6, 12, 18], "mem_positionals": True,
    "mem_dtype": "bfloat16", "mem_attention_grouping": None, "torch_attention": True,
}


def as_longllama(folder: Path, mem_layers: list[int], **fields: object) -> Path:
    """Rewrite a saved LLaMA's config.json the way a LongLLaMA release has it (same weights, model_type longllama)."""
    config = json.loads((folder / "config.json").read_text())
    rope = config.pop("rope_parameters", None) or {}
    config.update({"model_type": "longllama", "architectures": ["LongLlamaForCausalLM"], "mem_layers": mem_layers,
                   "mem_positionals": True, "mem_dtype": "bfloat16", "last_context_length": 8,
                   "torch_attention": False, "rope_theta": rope.get("rope_theta", 10000.0), **fields})
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_longllama_3b_config_maps_to_fot_on_the_meta_device(tmp_path) -> None:
    (tmp_path / "config.json").write_text(json.dumps(LONGLLAMA_3B))
    config = load_model_config(resolve_model(str(tmp_path)))
    layers = checkpoint_memory_layers(config)
    assert config.model_type == "llama" and layers == (6, 12, 18)
    method = METHODS.get("fot").config(MethodContext(config.num_hidden_layers, 2048, trained_context(config), layers))
    assert method.injection.layers == (6, 12, 18) and method.reading.read_all and method.position.mode == "official"
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    assert sum(p.numel() for p in model.parameters()) > 3e9
    with MemoryLM(model, method, segment_len=2048) as lm:
        assert lm.layers == frozenset({6, 12, 18})


def test_a_longllama_checkpoint_runs_fot_exactly(tmp_path, one_thread) -> None:
    folder = as_longllama(save_tiny_model(tmp_path / "longllama", layers=3, heads=4, kv_heads=2, context=16,
                                          seed=3), mem_layers=[1])
    source = resolve_model(str(folder))
    config = load_model_config(source)
    model, _ = load_model(source, device=torch.device("cpu"), dtype=torch.float32)
    ctx = MethodContext(3, 8, trained_context(config), checkpoint_memory_layers(config))
    method = METHODS.get("fot").config(ctx)
    doc = random_docs([44], seed=5)[0]
    with MemoryLM(model, method, segment_len=8) as lm:
        got = lm.score([doc])[0]
    expected = reference_nll(reference_llama(model), describe(method, n_layers=3, segment_len=8, trained_context=16),
                             doc)
    torch.testing.assert_close(got.double(), expected, atol=ATOL, rtol=0)
    with MemoryLM(model, METHODS.get("vanilla").config(ctx), segment_len=8) as lm:
        assert not torch.allclose(lm.score([doc])[0], got)  # the memory layer reads something


def test_a_longllama_without_memory_positions_is_refused_in_one_line(tmp_path, capsys) -> None:
    folder = as_longllama(save_tiny_model(tmp_path / "nopos"), mem_layers=[1], mem_positionals=False)
    books = write_text_docs(tmp_path / "books", [200])
    line = one_line_error(capsys, ["run", "--model", str(folder), "--methods", "fot", "--tasks", "pg19",
                                   "--data-dir", str(books), "--out", str(tmp_path / "out")])
    assert "mem_positionals=false" in line
