"""AutoCompressor: accumulated summary vectors (writing.memory_mode=accumulate) and a released checkpoint's
`embed_summary` through `--model`. The exactness of the accumulation against the float64 reference is in the grid of
test_unimem_reference.py (the method's default and the `ac-*` cases); here its properties and the loader."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest
import torch
from helpers import one_line_error, random_docs, save_tiny_model, tiny_llama, write_text_docs
from reference_unimem import reference_nll
from safetensors.torch import load_file
from test_unimem_reference import ATOL, describe, reference_llama
from transformers import AutoModelForCausalLM

from unimem_bench.harness.models.autocompressor import summary_embeddings
from unimem_bench.harness.models.resolve import (
    ModelSourceError,
    checkpoint_summary_tokens,
    load_model,
    load_model_config,
    resolve_model,
    trained_context,
)
from unimem_bench.methods import METHODS, ConfigError, MemoryLM, MethodContext, UniMemConfig

SEGMENT = 8
CTX = MethodContext(n_layers=2, segment_len=SEGMENT, trained_context=256)

AC_LLAMA2_7B = {
    # Llama-2-7b's config.json plus the fields AutoCompressor's training adds (princeton-nlp/AutoCompressors
    # train.py: summary_length, accumulate_summary, segment_gradient_checkpointing); the LLaMA class loads it.
    "architectures": ["LlamaAutoCompressorModel"], "model_type": "llama", "bos_token_id": 1, "eos_token_id": 2,
    "pad_token_id": 0, "hidden_act": "silu", "hidden_size": 4096, "intermediate_size": 11008,
    "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 32, "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-5, "rope_scaling": None, "tie_word_embeddings": False, "vocab_size": 32000,
    "summary_length": 50, "accumulate_summary": True, "segment_gradient_checkpointing": False,
}


def ac_config(*overrides: str) -> UniMemConfig:
    return METHODS.get("autocompressor").config(CTX, overrides)


def segments(lm: MemoryLM, doc: torch.Tensor, state=None) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Each segment's logits and the read slots held after it."""
    state = state or lm.new_state(1)
    logits, held = [], []
    with torch.no_grad():
        for start in range(0, len(doc), SEGMENT):
            logits.append(lm.forward_segment(state, doc[start:start + SEGMENT].unsqueeze(0), start))
            held.append(state.rmt.clone())
    return logits, held


def test_defaults_scale_kappa_and_cap_with_the_run() -> None:
    for segment, kappa, cap in [(128, 4, 380), (256, 8, 248), (1536, 50, 2500)]:
        ctx = MethodContext(n_layers=8, segment_len=segment, trained_context=512 if segment < 1536 else 4096)
        w = METHODS.get("autocompressor").config(ctx).writing
        assert (w.memory_tokens, w.memory_cap, w.memory_mode, w.write_slots) == (kappa, cap, "accumulate", "learned")
    paper = METHODS.get("autocompressor").config(MethodContext(22, 2048, 2048)).writing
    assert paper.memory_cap == 3 * paper.memory_tokens  # no room in the trained context: its training's 3 segments


def test_the_first_segment_reads_nothing(one_thread) -> None:
    model = tiny_llama()
    doc = random_docs([3 * SEGMENT], seed=2)[0]
    with torch.no_grad():
        plain = model(doc[:SEGMENT].unsqueeze(0)).logits
    with MemoryLM(model, ac_config(), segment_len=SEGMENT) as lm:
        logits, held = segments(lm, doc)
    torch.testing.assert_close(logits[0], plain, atol=1e-5, rtol=0)  # summary tokens come after: causally unseen
    assert not torch.allclose(logits[1], model(doc[SEGMENT:2 * SEGMENT].unsqueeze(0)).logits, atol=1e-3)
    kappa = lm.config.writing.memory_tokens
    assert [h.shape[1] for h in held] == [kappa, 2 * kappa, 3 * kappa]


def test_accumulation_keeps_the_newest_up_to_the_cap(one_thread) -> None:
    config = ac_config("writing.memory_tokens=2", "writing.memory_cap=5")
    with MemoryLM(tiny_llama(), config, segment_len=SEGMENT) as lm:
        _, held = segments(lm, random_docs([5 * SEGMENT], seed=3)[0])
    assert [h.shape[1] for h in held] == [2, 4, 5, 5, 5]
    for before, after in zip(held, held[1:], strict=False):
        keep = min(before.shape[1], 5 - 2)  # what survives of the earlier summaries: their newest
        torch.testing.assert_close(after[:, :keep], before[:, before.shape[1] - keep:], atol=0, rtol=0)


def test_a_cap_of_one_segment_is_rmt_replacement_from_the_second_segment(one_thread) -> None:
    # With cap = kappa, each segment reads exactly the previous segment's kappa summary vectors, which is RMT with
    # learned write slots: given the same incoming vectors, both compute the same. They differ in the first segment
    # only: RMT reads its learned embeddings there (at positions 0..m-1, shifting the segment), AutoCompressor none.
    model = tiny_llama(seed=4)
    doc = random_docs([4 * SEGMENT], seed=4)[0]
    ac = ac_config("writing.memory_tokens=3", "writing.memory_cap=3")
    rmt = METHODS.get("rmt").config(CTX, ["writing.memory_tokens=3", "writing.write_slots=learned"])
    embeddings = {"memory_embeddings": torch.randn(3, 32, generator=torch.Generator().manual_seed(1))}
    with MemoryLM(model, ac, segment_len=SEGMENT) as lm:
        lm.load_method_state(embeddings)
        ac_logits, ac_held = segments(lm, doc)
    with MemoryLM(model, rmt, segment_len=SEGMENT) as lm:
        lm.load_method_state(embeddings)
        rmt_first, _ = segments(lm, doc[:SEGMENT])
        state = lm.new_state(1)
        state.rmt = ac_held[0]
        rmt_logits, rmt_held = segments(lm, doc[SEGMENT:], state)
    for a, r in zip(ac_logits[1:] + ac_held[1:], rmt_logits + rmt_held, strict=True):
        torch.testing.assert_close(a, r, atol=1e-6, rtol=0)
    assert not torch.allclose(ac_logits[0], rmt_first[0], atol=1e-3)


def test_summary_tokens_start_as_the_end_of_sequence_embedding() -> None:
    model = tiny_llama()
    with MemoryLM(model, ac_config(), segment_len=SEGMENT) as lm:
        eos = model.get_input_embeddings().weight[model.config.eos_token_id]
        assert lm.memory_embeddings is not None
        torch.testing.assert_close(lm.memory_embeddings.detach(), eos.expand_as(lm.memory_embeddings), atol=0,
                                   rtol=0)
    model.config.eos_token_id = None
    with pytest.raises(ConfigError, match="memory_init=noise"):
        MemoryLM(model, ac_config(), segment_len=SEGMENT)


@pytest.mark.parametrize(("overrides", "message"), [
    (["writing.write_slots=memory"], "write_slots=learned"),
    (["writing.memory_cap=1", "writing.memory_tokens=2"], "at least writing.memory_tokens=2"),
])
def test_bad_accumulation_settings_are_refused(overrides, message) -> None:
    with pytest.raises(ConfigError, match=message):
        ac_config(*overrides)


def test_the_llama2_7b_checkpoint_config_maps_to_autocompressor_on_the_meta_device(tmp_path) -> None:
    (tmp_path / "config.json").write_text(json.dumps(AC_LLAMA2_7B))
    with pytest.raises(ModelSourceError, match="no embed_summary.weight"):  # before any weights load
        load_model_config(resolve_model(str(tmp_path)))
    shard = "pytorch_model-00002-of-00002.bin"  # the summary weight alone: the LLaMA weights would be 13 GB
    torch.save({"embed_summary.weight": torch.zeros(50, 4096, dtype=torch.bfloat16)}, tmp_path / shard)
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": {
        "model.embed_tokens.weight": "pytorch_model-00001-of-00002.bin", "embed_summary.weight": shard}}))
    config = load_model_config(resolve_model(str(tmp_path)))
    assert summary_embeddings(str(tmp_path), hub=False).shape == (50, 4096)
    kappa = checkpoint_summary_tokens(config)
    assert config.model_type == "llama" and kappa == 50
    ctx = MethodContext(config.num_hidden_layers, 1536, trained_context(config), summary_tokens=kappa)
    method = METHODS.get("autocompressor").config(ctx)
    assert (method.writing.memory_tokens, method.writing.memory_cap, method.position.mode) == (50, 2500, "official")
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
        model.register_buffer("summary_embeddings", torch.empty(50, 4096), persistent=False)
    assert sum(p.numel() for p in model.parameters()) > 6e9
    with MemoryLM(model, method, segment_len=1536) as lm:
        assert lm.memory_embeddings is not None and lm.memory_embeddings.shape == (50, 4096)
    with pytest.raises(ConfigError, match="writing.memory_tokens=50"):
        MemoryLM(model, method.with_overrides(["writing.memory_tokens=8"]), segment_len=1536)


def as_autocompressor(folder: Path, summary: torch.Tensor | None) -> Path:
    """A saved tiny LLaMA as an AutoCompressor release has it: `summary_length` in its config and
    `embed_summary.weight` in a second .bin shard named by pytorch_model.bin.index.json."""
    config = json.loads((folder / "config.json").read_text())
    config.update(architectures=["LlamaAutoCompressorModel"], summary_length=3, accumulate_summary=True)
    (folder / "config.json").write_text(json.dumps(config))
    if summary is not None:
        from safetensors.torch import load_file

        names = {name: "model.safetensors" for name in load_file(folder / "model.safetensors")}
        torch.save({"embed_summary.weight": summary}, folder / "pytorch_model-00002-of-00002.bin")
        names["embed_summary.weight"] = "pytorch_model-00002-of-00002.bin"
        (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": names}))
    return folder


def test_a_checkpoint_s_summary_embeddings_load_through_model_and_run_exactly(tmp_path, one_thread) -> None:
    summary = torch.randn(3, 32, generator=torch.Generator().manual_seed(9))
    folder = as_autocompressor(save_tiny_model(tmp_path / "ac", layers=3, seed=3, context=16), summary)
    source = resolve_model(str(folder))
    config = load_model_config(source)
    model, _ = load_model(source, device=torch.device("cpu"), dtype=torch.float32)
    torch.testing.assert_close(model.summary_embeddings, summary, atol=0, rtol=0)
    ctx = MethodContext(3, SEGMENT, trained_context(config), summary_tokens=checkpoint_summary_tokens(config))
    method = METHODS.get("autocompressor").config(ctx)
    doc = random_docs([44], seed=5)[0]
    with MemoryLM(model, method, segment_len=SEGMENT) as lm:
        assert lm.memory_embeddings is not None
        torch.testing.assert_close(lm.memory_embeddings.detach(), summary, atol=0, rtol=0)
        got = lm.score([doc])[0]
    spec = describe(method, n_layers=3, segment_len=SEGMENT, trained_context=16)
    expected = reference_nll(reference_llama(model), spec, doc, summary)
    torch.testing.assert_close(got.double(), expected, atol=ATOL, rtol=0)


def test_a_checkpoint_without_its_summary_weight_is_refused_in_one_line(tmp_path, capsys) -> None:
    folder = as_autocompressor(save_tiny_model(tmp_path / "ac"), summary=None)
    books = write_text_docs(tmp_path / "books", [2000])
    line = one_line_error(capsys, ["run", "--model", str(folder), "--methods", "autocompressor", "--tasks", "pg19",
                                   "--data-dir", str(books), "--out", str(tmp_path / "out")])
    assert "embed_summary.weight" in line


def test_autocompressor_runs_through_finetune_run_and_sweep(tmp_path, one_thread) -> None:
    from unimem_bench.harness.cli import app as cli

    model, docs = save_tiny_model(tmp_path / "tiny"), write_text_docs(tmp_path / "docs", [1300] * 4)
    out = tmp_path / "ft"
    assert cli.main(["finetune", "--method", "autocompressor", "--model", str(model), "--data", str(docs),
                     "--tokens", "256", "--segment-len", "16", "--batch-size", "2", "--lr", "3e-3",
                     "--warmup-steps", "2", "--eval-every", "0", "--out", str(out)]) == 0
    learned = load_file(out / "model" / "unimem_method.safetensors")["memory_embeddings"]
    eos = tiny_llama().get_input_embeddings().weight[2]
    assert learned.shape == (1, 32) and not torch.allclose(learned[0], eos)  # training moved the summary token
    assert cli.main(["run", "--model", str(out), "--tasks", "pg19", "--data-dir", str(docs), "--max-docs", "2",
                     "--max-tokens", "200", "--out", str(tmp_path / "results")]) == 0
    board = pd.read_csv(tmp_path / "results" / "leaderboard.csv")
    assert set(board["method"]) == {"autocompressor"}
    assert cli.main(["sweep", "--method", "autocompressor", "--preset", "summary-cap", "--model", str(model),
                     "--tasks", "pg19", "--data-dir", str(docs), "--max-docs", "1", "--max-tokens", "128",
                     "--segment-len", "16", "--out", str(tmp_path / "sweep")]) == 0
    swept = pd.read_csv(tmp_path / "sweep" / "leaderboard.csv")
    ppl = swept[(swept["metric"] == "token_ppl") & swept["subtask"].isna()]["value"]
    # Caps of 1, 2, 4, 8 summary vectors and all: 8 segments of 16 make 8 (kappa = 1), so 8 and all are one run.
    assert len(ppl) == 5 and ppl.nunique() == 4


def test_autocompressor_runs_through_the_lm_eval_model(stories_dir, books_dir) -> None:
    from lm_eval.api.instance import Instance

    from unimem_bench.harness.evaluation.lm_eval_model import UnimemLM

    text = next(iter(sorted(books_dir.glob("*.txt")))).read_text()[30_000:32_500]
    rolling = [Instance(request_type="loglikelihood_rolling", doc={}, arguments=(text,), idx=0)]
    ours = UnimemLM(pretrained=str(stories_dir), method="autocompressor", segment_len=64, batch_size=1)
    vanilla = UnimemLM(pretrained=str(stories_dir), method="vanilla", segment_len=64, batch_size=1, max_gen_toks=8)
    got, plain = ours.loglikelihood_rolling(rolling)[0], vanilla.loglikelihood_rolling(rolling)[0]
    assert math.isfinite(got) and got != plain  # later segments read the summary vectors
    until = [Instance(request_type="generate_until", doc={}, idx=0,
                      arguments=(text[:600], {"until": ["\n\n"], "max_gen_toks": 12, "do_sample": False}))]
    assert isinstance(ours.generate_until(until)[0], str)
