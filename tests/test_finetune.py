"""Fine-tuning: gradient reach per training strategy, gradient checkpointing, document streams, exact resume, and a
fine-tuned export evaluated by `run` with its own method (tiny random LLaMA and a character tokenizer, CPU)."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch
from helpers import random_docs, save_tiny_model, tiny_llama, write_text_docs
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from unimem_bench.harness.cli import app as cli
from unimem_bench.harness.models.exports import read_saved_method
from unimem_bench.harness.models.resolve import resolve_model
from unimem_bench.harness.training.data import DocumentStreams, Window, deal
from unimem_bench.harness.training.log import CsvLog
from unimem_bench.harness.training.trainer import SegmentTrainer
from unimem_bench.methods import METHODS, MemoryLM, MethodContext
from unimem_bench.tasks import TASKS, TaskOptions

pytestmark = pytest.mark.usefixtures("one_thread")

EXACT = ["step", "tokens", "loss", "lr", "grad_norm"]


def method_lm(name: str, segment: int = 8, checkpointing: bool = False) -> tuple[MemoryLM, int]:
    """The method on a fresh tiny model, BPTT windows widened to 3 segments; returns (lm, segments per window)."""
    model = tiny_llama()
    config = METHODS.get(name).config(MethodContext(n_layers=2, segment_len=segment, trained_context=256))
    bptt = config.training.strategy != "stop_gradient"
    if bptt:
        config = config.with_overrides(["training.bptt_segments=3"])
    if checkpointing:
        model.activation_checkpointing_enable()
    return MemoryLM(model, config, segment_len=segment), config.training.window_segments


# A SideNet method trains its side layers only: its frozen backbone's activations take no gradient (test_longmem.py
# checks what the gradients reach there).
WINDOW_METHODS = [n for n in METHODS.names()
                  if not METHODS.get(n).config(MethodContext(2, 8, 256)).injection.side_layers]


@pytest.mark.parametrize("name", WINDOW_METHODS)
def test_gradients_reach_exactly_the_window(name):
    # Each segment's loss must reach the activations (input embeddings) of exactly the segments from its window's
    # start to itself: k-1 segments back at a window's end under BPTT, none before itself under stop-gradient.
    lm, k = method_lm(name)
    trainer = SegmentTrainer(lm).train()
    seg = lm.segment_len
    doc = random_docs([6 * seg + 1])[0]
    acts: list[torch.Tensor] = []

    def keep(module, inputs, output):
        output.retain_grad()
        acts.append(output)

    lm.model.get_input_embeddings().register_forward_hook(keep)
    state = lm.new_state(1)
    for first in range(0, 6, k):
        window = Window(0, "doc", doc, tuple(s * seg for s in range(first, first + k)), seg)
        losses = trainer(state, window)
        for j, loss in enumerate(losses):
            grads = torch.autograd.grad(loss, acts, retain_graph=True, allow_unused=True)
            reached = [i for i, g in enumerate(grads) if g is not None and g.abs().sum() > 0]
            assert reached == list(range(first, first + j + 1)), (name, first + j, reached)
        state.detach()


@pytest.mark.parametrize("name", ["rmt", "longformer", "memorizing_transformer", "unimix", "reformer", "routing"])
def test_gradient_checkpointing_gives_the_same_gradients(name):
    doc = random_docs([6 * 8 + 1])[0]
    results = []
    for checkpointing in (False, True):
        lm, k = method_lm(name, checkpointing=checkpointing)
        trainer = SegmentTrainer(lm).train()
        state = lm.new_state(1)
        losses = []
        for first in range(0, 6, k):
            loss = trainer(state, Window(0, "doc", doc, tuple(s * 8 for s in range(first, first + k)), 8)).sum()
            loss.backward()
            state.detach()
            losses.append(loss.detach())
        results.append((torch.stack(losses), {n: p.grad.clone() for n, p in lm.named_parameters()}))
    (loss_a, grads_a), (loss_b, grads_b) = results
    torch.testing.assert_close(loss_b, loss_a, atol=1e-6, rtol=0)
    for n in grads_a:
        torch.testing.assert_close(grads_b[n], grads_a[n], atol=1e-6, rtol=1e-5, msg=n)


def test_deal_gives_each_process_whole_document_streams():
    n, world, batch = 23, 3, 2
    per_process = [deal(n, world=world, rank=r, batch=batch, seed=7) for r in range(world)]
    streams = [row for rows in per_process for row in rows]
    assert sorted(d for row in streams for d in row) == list(range(n))  # every document once, in one stream
    one = deal(n, world=1, rank=0, batch=world * batch, seed=7)
    # One process with world x batch rows streams exactly the same documents: its row r*world+p is (p, r).
    assert all(one[r * world + p] == per_process[p][r] for p in range(world) for r in range(batch))
    assert deal(n, world=1, rank=0, batch=2, seed=8) != deal(n, world=1, rank=0, batch=2, seed=7)


def test_streams_continue_each_row_document():
    from helpers import char_tokenizer

    docs = [(f"d{i}", "x" * n) for i, n in enumerate([40, 15, 70, 33])]
    streams = DocumentStreams(docs, [[0, 1], [2, 3]], char_tokenizer(), segment_len=8, window_segments=2)
    for row in (0, 1):
        windows = [streams.next_window(row) for _ in range(14)]
        passes: list[list[Window]] = []
        for w in windows:
            if w.opens_document:
                passes.append([])
            else:  # row i's next window continues its document where the last one stopped
                assert w.doc_id == passes[-1][-1].doc_id and w.starts[0] == passes[-1][-1].starts[-1] + 8
            passes[-1].append(w)
        assert [p[0].doc_id for p in passes[:4]] == [docs[i][0] for i in streams.rows[row]] * 2  # then epoch 2
        for p in passes[:-1]:  # each completed pass trains every target of its document exactly once
            starts = [s for w in p for s in w.starts]
            assert starts == list(range(0, len(p[0].ids) - 1, 8))
            assert sum(w.n_targets for w in p) == len(p[0].ids) - 1


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("assets")
    return save_tiny_model(root / "tiny"), write_text_docs(root / "docs", [1300] * 5)


def finetune_argv(assets, out, method, tokens, *extra):
    model, docs = assets
    return ["finetune", "--method", method, "--model", str(model), "--data", str(docs), "--tokens", str(tokens),
            "--segment-len", "16", "--batch-size", "2", "--lr", "3e-3", "--warmup-steps", "2", "--eval-every", "3",
            "--eval-docs", "1", "--eval-tokens", "80", "--out", str(out), *extra]


@pytest.mark.parametrize(("method", "tokens"), [("rmt", 640), ("memorizing_transformer", 320)])
def test_resumed_run_reproduces_the_uninterrupted_run_exactly(assets, tmp_path, monkeypatch, method, tokens):
    assert cli.main(finetune_argv(assets, tmp_path / "a", method, tokens)) == 0
    real_append = CsvLog.append

    def crash_at_step_5(self, row):
        if self.path.name == "train_log.csv" and row["step"] == 5:
            raise KeyboardInterrupt
        real_append(self, row)

    monkeypatch.setattr(CsvLog, "append", crash_at_step_5)
    argv = finetune_argv(assets, tmp_path / "b", method, tokens, "--save-every", "2")
    assert cli.main(argv) == 130  # crashed after step 5: the newest checkpoint is step 4, mid-document
    assert sorted(p.name for p in (tmp_path / "b" / "checkpoints").iterdir()) == ["step-000002", "step-000004"]
    monkeypatch.setattr(CsvLog, "append", real_append)
    assert cli.main(argv) == 2  # an existing run is never overwritten without --resume
    assert cli.main([*argv, "--resume"]) == 0
    a, b = tmp_path / "a", tmp_path / "b"
    train_a, train_b = pd.read_csv(a / "train_log.csv"), pd.read_csv(b / "train_log.csv")
    assert len(train_a) == 10
    pd.testing.assert_frame_equal(train_b[EXACT], train_a[EXACT], check_exact=True)
    pd.testing.assert_frame_equal(pd.read_csv(b / "eval_log.csv")[["step", "tokens", "heldout_ppl"]],
                                  pd.read_csv(a / "eval_log.csv")[["step", "tokens", "heldout_ppl"]], check_exact=True)
    pd.testing.assert_frame_equal(pd.read_csv(b / "data-rank0.csv"), pd.read_csv(a / "data-rank0.csv"))
    weights_a, weights_b = load_file(a / "model" / "model.safetensors"), load_file(b / "model" / "model.safetensors")
    assert all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)
    evals = pd.read_csv(a / "eval_log.csv")
    assert list(evals["step"]) == [0, 3, 6, 9, 10]
    assert json.loads((a / "finetune.json").read_text())["status"] == "finished"
    assert (a / "loss.png").stat().st_size > 10_000


def test_export_is_evaluated_by_run_with_its_method_and_learned_memory(assets, tmp_path, capsys):
    out = tmp_path / "ft"
    assert cli.main(finetune_argv(assets, out, "rmt", 256, "--eval-every", "0")) == 0
    export = out / "model"
    assert resolve_model(str(out)).location == str(export)  # a run folder stands for its exported model
    saved = read_saved_method(export)
    assert saved is not None and saved.method == "rmt" and saved.segment_len == 16
    assert cli.main(["run", "--model", str(export), "--tasks", "pg19", "--data-dir", str(assets[1]), "--max-docs",
                     "2", "--max-tokens", "200", "--out", str(tmp_path / "results")]) == 0
    board = pd.read_csv(tmp_path / "results" / "leaderboard.csv")
    assert set(board["method"]) == {"rmt"}  # a fine-tuned export runs its own method by default
    got = float(board[board["metric"] == "token_ppl"]["value"].iloc[0])

    model, tokenizer = AutoModelForCausalLM.from_pretrained(export).eval(), AutoTokenizer.from_pretrained(export)
    options = TaskOptions(data_dir=assets[1], max_docs=2, max_tokens=200)
    learned = load_file(export / "unimem_method.safetensors")["memory_embeddings"]
    with MemoryLM(model, saved.config, segment_len=16) as lm:
        assert not torch.equal(lm.memory_embeddings.detach(), learned)  # training moved the memory tokens
        untrained = TASKS.get("pg19").run(lm, tokenizer, options).metrics["token_ppl"]
        lm.load_method_state({"memory_embeddings": learned})
        expected = TASKS.get("pg19").run(lm, tokenizer, options).metrics["token_ppl"]
    assert got == pytest.approx(expected, rel=1e-6)
    assert got != pytest.approx(untrained, rel=1e-6)


@pytest.mark.parametrize(("extra", "message"), [
    (["--set", "reading.index=faiss-flat", "--method", "memorizing_transformer"], "cannot be fine-tuned"),
    (["--batch-size", "5"], "cannot give 1 process(es) x 5 rows"),
    (["--data", "/nonexistent/books"], "/nonexistent/books"),
    (["--set", "training.strategy=bptt", "--set", "training.bptt_segments=0"], "must be >= 1"),
    (["--lr", "0"], "--lr 0.0 must be > 0"),
    (["--method", "knn_lm"], "at inference only"),
])
def test_bad_finetune_input_fails_in_one_line(assets, tmp_path, capsys, extra, message):
    assert cli.main(finetune_argv(assets, tmp_path / "x", "transformer_xl", 256, *extra)) == 2
    out = capsys.readouterr().err.strip().splitlines()[-1]
    assert out.startswith("error:") and message in out, out
