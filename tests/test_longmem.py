"""LongMem (methods/longmem.py, engine/side_network.py): the SideNet against its frozen backbone, the gate, what
training reaches, the side-tuned export, and its configuration errors (tiny random LLaMAs; the float64 reference
grid is in test_unimem_reference.py)."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
from helpers import random_docs, save_tiny_model, tiny_llama, write_text_docs
from safetensors.torch import load_file

from unimem_bench.harness.cli import app as cli
from unimem_bench.harness.models.exports import read_saved_method
from unimem_bench.harness.training.data import Window
from unimem_bench.harness.training.trainer import SegmentTrainer
from unimem_bench.methods import METHODS, ConfigError, MemoryLM, MethodContext, UniMemConfig

pytestmark = pytest.mark.usefixtures("one_thread")

SEGMENT = 8


def longmem(n_layers: int = 4, *overrides: str) -> UniMemConfig:
    return METHODS.get("longmem").config(MethodContext(n_layers=n_layers, segment_len=SEGMENT, trained_context=256),
                                         list(overrides))


def random_gate(lm: MemoryLM) -> None:
    """Per-head gates of our own (an open, uneven mix), loaded as a side-tuned checkpoint's."""
    state = lm.method_state()
    state["side.gate"] = torch.randn(state["side.gate"].shape, generator=torch.Generator().manual_seed(3))
    lm.load_method_state(state)


def segment_logits(lm: MemoryLM, doc: torch.Tensor) -> list[torch.Tensor]:
    state = lm.new_state(1)
    with torch.no_grad():
        return [lm.forward_segment(state, doc[s:s + SEGMENT].unsqueeze(0), s) for s in range(0, len(doc), SEGMENT)]


@pytest.mark.parametrize("n_layers", [3, 4])
def test_identity_sidenet_gives_the_frozen_backbone_logits_exactly(n_layers):
    # Side layers that add nothing (output projections at zero) keep the side network's difference from the backbone
    # exactly 0, whatever the gate and the memory: the backbone's logits bit for bit, segment by segment.
    model = tiny_llama(layers=n_layers, seed=2)
    doc = random_docs([5 * SEGMENT], seed=4)[0]
    with torch.no_grad():
        backbone = [model(doc[s:s + SEGMENT].unsqueeze(0)).logits for s in range(0, len(doc), SEGMENT)]
    with MemoryLM(model, longmem(n_layers, "injection.side_init=identity"), segment_len=SEGMENT) as lm:
        random_gate(lm)
        got = segment_logits(lm, doc)
    assert all(torch.equal(g, b) for g, b in zip(got, backbone, strict=True))
    with MemoryLM(model, longmem(n_layers), segment_len=SEGMENT) as lm:  # copied side layers do change them
        assert not torch.allclose(segment_logits(lm, doc)[0], backbone[0])


def test_closed_gate_reads_local_attention_exactly():
    # Closed (g = -inf): the fusion layer is its local attention alone, so a segment gives the same logits after a
    # full memory as after none; open, the memory changes them.
    model = tiny_llama(layers=4, seed=2)
    doc = random_docs([4 * SEGMENT], seed=4)[0]
    last = doc[-SEGMENT:].unsqueeze(0)
    results = {}
    for gate in ("-.inf", "0.0"):
        with MemoryLM(model, longmem(4, f"injection.side_gate={gate}"), segment_len=SEGMENT) as lm:
            state = lm.new_state(1)
            with torch.no_grad():
                for s in range(0, len(doc) - SEGMENT, SEGMENT):
                    lm.forward_segment(state, doc[s:s + SEGMENT].unsqueeze(0), s)
                assert state.n_bank == 3 * SEGMENT
                with_memory = lm.forward_segment(state, last, 3 * SEGMENT)
                without = lm.forward_segment(lm.new_state(1), last, 3 * SEGMENT)
        results[gate] = torch.equal(with_memory, without)
    assert results == {"-.inf": True, "0.0": False}


def test_training_reaches_only_the_sidenet_and_close_unfreezes_the_backbone():
    model = tiny_llama(layers=4, seed=2)
    doc = random_docs([3 * SEGMENT + 1], seed=4)[0]
    with MemoryLM(model, longmem(4), segment_len=SEGMENT) as lm:
        trainer = SegmentTrainer(lm).train()
        state = lm.new_state(1)
        for first in range(3):  # stop-gradient: one segment per window, the bank filled by the earlier ones
            trainer(state, Window(0, "doc", doc, (first * SEGMENT,), SEGMENT)).sum().backward()
        trained = {n for n, p in lm.named_parameters() if p.requires_grad}
        reached = {n for n, p in lm.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
        assert trained == reached == set(lm.method_state())  # every SideNet parameter, the gate included
        assert all(n.startswith("side.") for n in trained)
    assert all(p.requires_grad for p in model.parameters())


def test_bad_side_network_configs_fail_in_one_line():
    with pytest.raises(ConfigError, match="side_fusion=3 names a side layer"):
        longmem(4, "injection.side_fusion=3")
    with pytest.raises(ConfigError, match="single index"):
        longmem(4, "injection.layers=1,2")
    with pytest.raises(ConfigError, match="reads a FIFO bank"):
        longmem(4, "reading.window=4")
    with pytest.raises(ConfigError, match="at most 2"):
        longmem(4, "injection.side_layers=3").bind(n_layers=4, segment_len=SEGMENT)
    assert longmem(4).without_memory().injection.side_layers == 0  # without memory it is the backbone


def test_side_tuned_export_holds_the_sidenet_apart_and_run_reloads_it(tmp_path):
    model_dir = save_tiny_model(tmp_path / "tiny")
    docs = write_text_docs(tmp_path / "docs", [1300] * 4)
    out = tmp_path / "ft"
    argv = ["finetune", "--method", "longmem", "--model", str(model_dir), "--data", str(docs), "--tokens", "256",
            "--segment-len", "16", "--batch-size", "2", "--lr", "3e-3", "--warmup-steps", "2", "--eval-every", "0",
            "--eval-docs", "1", "--eval-tokens", "80", "--out", str(out)]
    assert cli.main(argv) == 0
    export = out / "model"
    side = load_file(export / "unimem_method.safetensors")
    assert side and all(name.startswith("side.") for name in side)  # the SideNet in a file of its own
    before, after = load_file(model_dir / "model.safetensors"), load_file(export / "model.safetensors")
    assert all(torch.equal(before[k], after[k]) for k in before)  # the backbone stayed frozen
    saved = read_saved_method(export)
    assert saved is not None and saved.method == "longmem"
    results = tmp_path / "results"
    assert cli.main(["run", "--model", str(export), "--tasks", "pg19", "--data-dir", str(docs), "--max-docs", "1",
                     "--max-tokens", "120", "--out", str(results)]) == 0
    board = pd.read_csv(results / "leaderboard.csv")
    got = float(board[(board["metric"] == "token_ppl") & (board["subtask"].isna())]["value"].iloc[0])
    # The same export with the SideNet as initialised (copied from the backbone): another perplexity.
    assert cli.main(["run", "--model", str(model_dir), "--methods", "longmem", "--tasks", "pg19", "--data-dir",
                     str(docs), "--max-docs", "1", "--max-tokens", "120", "--segment-len", "16", "--out",
                     str(tmp_path / "fresh")]) == 0
    fresh = pd.read_csv(tmp_path / "fresh" / "leaderboard.csv")
    untrained = float(fresh[(fresh["metric"] == "token_ppl") & (fresh["subtask"].isna())]["value"].iloc[0])
    assert got != pytest.approx(untrained, rel=1e-6)
    # The lm-eval model loads the side-tuned SideNet too.
    from lm_eval.api.instance import Instance

    from unimem_bench.harness.evaluation.lm_eval_model import UnimemLM

    text = (docs / sorted(p.name for p in docs.iterdir())[0]).read_text()[:200]
    rolling = [Instance(request_type="loglikelihood_rolling", doc={}, arguments=(text,), idx=0)]
    tuned = UnimemLM(pretrained=str(export), method="longmem").loglikelihood_rolling(rolling)[0]
    initial = UnimemLM(pretrained=str(model_dir), method="longmem", segment_len=16).loglikelihood_rolling(rolling)[0]
    assert tuned != pytest.approx(initial, rel=1e-6)


def test_small_k_selection_equals_the_two_stage_selection(monkeypatch):
    """LongMem's chunk search picks k <= 4 by argmax passes (`retrieval._first_maxima`): the same positions and
    values as the general selection, ties (to the lower position), -inf and NaN rows included, input untouched."""
    from unimem_bench.methods.engine import retrieval

    g = torch.Generator().manual_seed(0)
    for trial in range(600):
        rows, n = int(torch.randint(1, 9, (1,), generator=g)), int(torch.randint(1, 60, (1,), generator=g))
        k = int(torch.randint(1, min(n, retrieval.FIRST_MAXIMA_K) + 1, (1,), generator=g))
        scores = torch.randint(0, 4, (rows, n), generator=g).float() if trial % 2 else torch.randn(rows, n, generator=g)
        scores[torch.rand(rows, n, generator=g) < (0.3 if trial % 3 == 0 else 0.0)] = float("-inf")
        scores[torch.rand(rows, n, generator=g) < (0.05 if trial % 7 == 0 else 0.0)] = float("nan")
        before = scores.clone()
        values, pos = retrieval.top_in_key_order(scores, k)
        assert torch.equal(scores.nan_to_num(7.0), before.nan_to_num(7.0))
        with monkeypatch.context() as patch:
            patch.setattr(retrieval, "FIRST_MAXIMA_K", 0)
            general_values, general_pos = retrieval.top_in_key_order(scores, k)
        assert torch.equal(pos, general_pos)
        assert torch.equal(values.nan_to_num(9.0), general_values.nan_to_num(9.0))


@pytest.mark.parametrize("overrides, kept", [((), True), (("reading.chunk_size=3", "reading.topk=6"), False)])
def test_kept_chunk_keys_equal_the_banks_and_the_memory_layers_keys_are_the_backbones(overrides, kept):
    # Through FIFO eviction (16 slots, segments of 8) the chunk keys carried across segments equal chunk_keys of the
    # bank; with chunks of 3 (a write leaves a partial chunk) they are computed at each read. The bank holds the
    # backbone memory layer's own unrotated keys/values (tapped while the backbone ran).
    from unimem_bench.methods.engine.retrieval import chunk_keys
    from unimem_bench.methods.engine.side_network import projections

    model = tiny_llama(layers=4, seed=2)
    doc = random_docs([6 * SEGMENT], seed=4)[0]
    with MemoryLM(model, longmem(4, "management.size=16", *overrides), segment_len=SEGMENT) as lm:
        assert lm.side is not None
        state = lm.new_state(1)
        (layer,) = lm.layers
        source = model.model.layers[lm.side.source]
        with torch.no_grad():
            for s in range(0, len(doc), SEGMENT):
                lm.forward_segment(state, doc[s:s + SEGMENT].unsqueeze(0), s)
                bank = state.layers[layer]
                assert bank.keys is not None and bank.keys.shape[2] == min(s + SEGMENT, 16)
                held = lm.side.chunks.value
                assert (held is not None) == (kept or s == 0)  # chunks of 3: whole only after the first write
                if held is not None:
                    assert torch.equal(held, chunk_keys(bank.keys, lm.side.chunk, "mean"))
            hidden = model(doc[-SEGMENT:].unsqueeze(0), output_hidden_states=True).hidden_states[lm.side.source]
            _, keys, values = projections(source.self_attn, source.input_layernorm(hidden))
        assert torch.equal(bank.keys[:, :, -SEGMENT:], keys) and torch.equal(bank.values[:, :, -SEGMENT:], values)
