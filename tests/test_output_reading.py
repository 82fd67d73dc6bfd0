"""Reading at the output distribution: kNN-LM's mixture and TRIME's joint softmax (methods/engine/output_memory.py).

Token-level exactness against the float64 reference is in test_unimem_reference.py (cases knn-*, trime-*); here:
lambda = 0 is vanilla, kNN-LM's mixture and TRIME's joint softmax equal their formulas (kNN-LM's gradients too),
the datastore search is an exact brute-force search, TRIME's training loss reads the segment through its joint
softmax (gradients reach the memory keys), the corpus datastore is cached by content, and kNN-LM lowers perplexity
on a real book with a repeated passage.
"""

from __future__ import annotations

import re

import pandas as pd
import pytest
import torch
from helpers import one_line_error, random_docs, save_tiny_model, sweep_argv, tiny_llama, write_text_docs
from reference_unimem import Description, reference_nll
from test_unimem_reference import reference_llama

from unimem_bench.harness.cli import app as cli
from unimem_bench.methods import METHODS, ConfigError, MemoryLM, MethodContext
from unimem_bench.methods.config import Reading
from unimem_bench.methods.engine import output_memory
from unimem_bench.methods.engine.output_memory import Datastore, corpus_datastore

CTX = MethodContext(n_layers=2, segment_len=8, trained_context=256)


@pytest.mark.parametrize("index", ["torch", "faiss-flat", "faiss-ivf"])
def test_knn_with_lambda_zero_equals_vanilla(model, index):
    docs = random_docs([45, 30])
    with MemoryLM(model, METHODS.get("vanilla").config(CTX), segment_len=8) as lm:
        plain = lm.score(docs, batch_size=2)
    config = METHODS.get("knn_lm").config(CTX, ["reading.output_lambda=0", f"reading.index={index}"])
    with MemoryLM(model, config, segment_len=8) as lm:
        mixed = lm.score(docs, batch_size=2)
        full = METHODS.get("knn_lm").config(CTX, [f"reading.index={index}"])
    for a, b in zip(mixed, plain, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    with MemoryLM(model, full, segment_len=8) as lm:
        assert not torch.allclose(lm.score(docs)[0][8:], plain[0][8:])  # with lambda 0.25 the datastore counts


def naive_knn_mixture(logits: torch.Tensor, neg_dist: torch.Tensor, tokens: torch.Tensor, lam: float,
                      temperature: float) -> torch.Tensor:
    """kNN-LM's log(lam p_kNN + (1 - lam) p_LM) in float64, query by query, p_kNN by a full-vocabulary scatter."""
    out = []
    for logit, dist, tok in zip(logits.double().flatten(0, 1), neg_dist.double().flatten(0, 1),
                                tokens.flatten(0, 1), strict=True):
        p_lm = torch.softmax(logit, -1)
        if not torch.isfinite(dist).any():
            out.append(p_lm.log())
            continue
        weights = torch.softmax(dist / temperature, -1)
        p_knn = torch.zeros_like(p_lm)
        for w, t in zip(weights, tok.tolist(), strict=True):
            if w > 0:
                p_knn = p_knn + w * torch.nn.functional.one_hot(torch.tensor(t), len(p_lm)).double()
        out.append((lam * p_knn + (1 - lam) * p_lm).log())
    return torch.stack(out).view(logits.shape)


@pytest.mark.parametrize("lam", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_knn_mixture_equals_a_float64_reference(lam, temperature):
    """The mixture scored at the neighbours' tokens only equals the full-vocabulary formula, with tokens voted by
    several neighbours, padded neighbours (-inf) and a query with none; so do the gradients on the logits, once
    per token however many neighbours voted for it."""
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 5, 13, generator=g) * 3
    neg_dist = -torch.rand(2, 5, 6, generator=g) * 4
    tokens = torch.randint(0, 4, (2, 5, 6), generator=g)  # 6 votes over 4 tokens: repeats in every query
    neg_dist[0, 1], tokens[0, 1] = float("-inf"), 0  # no neighbour
    neg_dist[1, 2, 3:], tokens[1, 2, 3:] = float("-inf"), 0  # three found
    expected = naive_knn_mixture(logits, neg_dist, tokens, lam, temperature)
    got = output_memory.knn_mixture(logits.clone(), neg_dist, tokens, lam, temperature)
    assert torch.equal(torch.isinf(got), torch.isinf(expected))
    finite = torch.isfinite(expected)
    torch.testing.assert_close(got[finite].double(), expected[finite], atol=1e-5, rtol=0)
    if lam == 1.0:  # p_LM gets no weight: no gradient to compare
        return
    probe = torch.randn(logits.shape, generator=g)
    wide = logits.double().requires_grad_()
    (naive_knn_mixture(wide, neg_dist, tokens, lam, temperature) * probe).sum().backward()
    ours = logits.clone().requires_grad_()
    (output_memory.knn_mixture(ours, neg_dist, tokens, lam, temperature) * probe).sum().backward()
    torch.testing.assert_close(ours.grad.double(), wide.grad, atol=1e-5, rtol=0)


@pytest.mark.parametrize("grad", [False, True])
def test_joint_softmax_equals_a_float64_reference(grad):
    """TRIME's one softmax over vocabulary and memory, without autograd (log p's own buffer, the vocabulary's
    normaliser from the log-softmax) and with it, against the formula in float64: repeated memory tokens, entries
    not read (-inf) and a query reading nothing."""
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(2, 5, 13, generator=g) * 3
    scores = torch.randn(2, 5, 7, generator=g) * 3
    tokens = torch.randint(0, 5, (2, 5, 7), generator=g)
    scores[0, 2] = float("-inf")  # reads nothing
    scores[1, :, 4:] = float("-inf")
    wide, mem = logits.double(), scores.double()
    mass = torch.zeros_like(wide).scatter_add(-1, tokens, mem.exp())
    expected = (wide.exp() + mass).log() - torch.cat([wide, mem], -1).logsumexp(-1, keepdim=True)
    got = output_memory.joint_softmax(logits.requires_grad_(grad), scores, tokens)
    assert got.requires_grad == grad
    torch.testing.assert_close(got.detach().double(), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("metric", ["l2", "ip"])
@pytest.mark.parametrize("index", ["torch", "faiss-flat"])
def test_datastore_search_equals_brute_force(metric, index):
    generator = torch.Generator().manual_seed(0)
    keys = torch.randn(3000, 16, generator=generator)
    queries = torch.randn(40, 16, generator=generator)
    store = Datastore(Reading(index=index), metric, 16)
    for lo in range(0, 3000, 700):  # written segment by segment, as documents stream
        store.add(keys[lo:lo + 700], torch.arange(lo, min(lo + 700, 3000)))
    scores, tokens = store.search(queries, 25)
    k64, q64 = keys.double(), queries.double()
    exact = -torch.cdist(q64, k64).square() if metric == "l2" else q64 @ k64.T
    best, ids = exact.topk(25, dim=-1)
    # A token is its entry's index here. The entries found have exactly the k best scores (in float64), in order;
    # they are the brute-force entries except where two scores tie in float32.
    torch.testing.assert_close(exact.gather(-1, tokens), best, atol=1e-4, rtol=0)
    assert (tokens == ids).float().mean() > 0.99
    torch.testing.assert_close(scores.double(), best, atol=1e-3, rtol=1e-5)


def test_ivf_datastore_is_exact_below_its_training_size_then_approximate_with_high_recall():
    generator = torch.Generator().manual_seed(1)
    keys = torch.randn(4000, 8, generator=generator)
    queries = keys[:50] + 0.01 * torch.randn(50, 8, generator=generator)
    store = Datastore(Reading(index="faiss-ivf", ivf_lists=16, ivf_probe=4), "l2", 8)
    store.add(keys[:600], torch.arange(600))
    assert store.index is None  # exact torch search: 600 < 39 x 16 training points
    store.add(keys[600:], torch.arange(600, 4000))
    assert store.index.nprobe == 4
    _, tokens = store.search(queries, 1)
    assert torch.equal(tokens[:, 0], torch.arange(50))


def test_trime_training_loss_reads_the_segment_through_the_joint_softmax():
    # vanilla trained with training.strategy=trime: its training forward is TRIME's joint softmax over the
    # vocabulary and the segment's earlier tokens (the float64 reference's local memory), and gradients reach the
    # memory keys; evaluation (no gradient) is the model's own distribution.
    model = tiny_llama(seed=2).double()
    config = METHODS.get("vanilla").config(CTX, ["training.strategy=trime"])
    doc = random_docs([17], seed=3)[0]
    with MemoryLM(model, config, segment_len=16) as lm:
        state = lm.new_state(1)
        logp = lm.forward_segment(state, doc[None, :16], 0)[0]
        nll = -logp[torch.arange(16), doc[1:17]]
        keys = []
        hook = lm.decoder.layers[-1].mlp.register_forward_pre_hook(lambda m, a: keys.append(a[0]))
        logp = lm.forward_segment(lm.new_state(1), doc[None, :16], 0)[0]
        hook.remove()
        (grad,) = torch.autograd.grad(logp[15, doc[16]], keys[0])
        plain = lm.score([doc])[0]
    spec = Description(segment_len=16, output="trime", output_topk=1)
    expected = reference_nll(reference_llama(model), spec, doc)
    torch.testing.assert_close(nll.detach(), expected, atol=1e-5, rtol=0)  # float32 RMSNorm and RoPE inside
    assert grad[0, :15].abs().sum() > 0  # the memory keys of tokens 0..14 get gradient through the joint softmax
    assert not torch.allclose(plain, expected)


def test_corpus_datastore_is_saved_and_reloaded_by_content(model, tmp_path, monkeypatch):
    corpus = random_docs([30, 21], seed=4)
    config = METHODS.get("knn_lm").config(CTX, ["reading.index=faiss-flat"])
    with MemoryLM(model, config, segment_len=8) as lm:
        assert lm.output is not None
        built = corpus_datastore(lm.output, lm, corpus, tmp_path)
        assert len(built) == 29 + 20  # every token with a next token
        assert len(list(tmp_path.glob("datastore-*.pt"))) == 1 and len(list(tmp_path.glob("*.faiss"))) == 1

        def forbidden(*args, **kwargs):
            raise AssertionError("the cached datastore was rebuilt")

        monkeypatch.setattr(output_memory.Datastore, "add", forbidden)
        loaded = corpus_datastore(lm.output, lm, corpus, tmp_path)
        monkeypatch.undo()
        assert torch.equal(loaded.keys, built.keys) and torch.equal(loaded.values, built.values)
        assert loaded.index.ntotal == 49
        other = corpus_datastore(lm.output, lm, [corpus[0]], tmp_path)  # other tokens: another datastore
        assert len(other) == 29 and len(list(tmp_path.glob("datastore-*.pt"))) == 2
        doc = random_docs([40], seed=5)[0]
        alone = lm.score([doc])[0]
        lm.output.external = loaded
        with_corpus = lm.score([doc])[0]
    assert not torch.allclose(alone[:7], with_corpus[:7])  # the first segment reads the corpus only


def test_knn_lowers_perplexity_on_a_book_with_a_repeated_passage(stories_dir, books_dir, one_thread):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    text = next(iter(sorted(books_dir.glob("*.txt")))).read_text(errors="replace")[40_000:44_000]
    ids = torch.tensor(AutoTokenizer.from_pretrained(stories_dir)(text)["input_ids"][:400])
    doc = torch.cat([ids, ids])  # the passage, then the same passage again
    model = AutoModelForCausalLM.from_pretrained(stories_dir).eval()
    ctx = MethodContext(n_layers=model.config.num_hidden_layers, segment_len=64, trained_context=512)
    nll = {}
    for name in ("vanilla", "knn_lm", "trime"):
        with MemoryLM(model, METHODS.get(name).config(ctx), segment_len=64) as lm:
            nll[name] = lm.score([doc])[0]
    second = slice(len(ids), None)
    print({name: f"{float(v[second].mean()):.3f} nats" for name, v in nll.items()}, "on the repeated passage")
    assert nll["knn_lm"][second].mean() < 0.8 * nll["vanilla"][second].mean()
    assert nll["trime"][second].mean() < nll["vanilla"][second].mean()


@pytest.mark.parametrize(("overrides", "message"), [
    (["reading.output_lambda=1.5"], "must be in [0, 1]"),
    (["reading.output_topk=0"], "must be >= 1"),
    (["reading.output_temperature=0"], "must be > 0"),
    (["reading.output=cache"], "is not one of"),
    (["training.strategy=trime"], "not kNN-LM's mixture"),
    (["reading.output=none", "reading.output_datastore=books"], "set reading.output=knn or trime"),
])
def test_bad_output_reading_values_fail_in_one_line(overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        METHODS.get("knn_lm").config(CTX, overrides)
    config = METHODS.get("knn_lm").config(CTX)
    assert config.has_memory and not config.without_memory().has_memory  # lm-eval streams it, never reads at once


def test_knn_sweeps_with_a_corpus_datastore_and_lambda_zero_runs_as_vanilla(tiny_model_dir, tmp_path, one_thread):
    corpus = write_text_docs(tmp_path / "corpus", [1500, 900])
    cache = tmp_path / "cache"
    argv = sweep_argv(tiny_model_dir, tmp_path / "out", "--vary", "reading.output_lambda=0,0.5", "--set",
                      f"reading.output_datastore={corpus}", "--set", f"reading.output_cache={cache}")
    argv[argv.index("unimix")] = "knn_lm"
    assert cli.main(argv) == 0
    assert len(list(cache.glob("datastore-*.pt"))) == 1  # both points read one cached datastore
    run = sweep_argv(tiny_model_dir, tmp_path / "plain")
    run[0:3] = ["run", "--methods", "vanilla"]
    assert cli.main(run) == 0
    board = pd.read_csv(tmp_path / "out" / "leaderboard.csv")
    ppl = board[(board["metric"] == "token_ppl") & board["subtask"].isna()]
    vanilla = pd.read_csv(tmp_path / "plain" / "leaderboard.csv")
    plain = vanilla[(vanilla["metric"] == "token_ppl") & vanilla["subtask"].isna()]["value"].item()
    values = sorted(ppl["value"])
    assert len(values) == 2 and plain in (pytest.approx(values[0], rel=1e-5), pytest.approx(values[1], rel=1e-5))
    assert values[0] != pytest.approx(values[1], rel=1e-4)


def test_a_missing_corpus_datastore_fails_in_one_line(tiny_model_dir, tmp_path, capsys, no_model_work):
    argv = sweep_argv(tiny_model_dir, tmp_path, "--set", "reading.output_datastore=/nonexistent/corpus")
    argv[0:3] = ["run", "--methods", "knn_lm"]
    assert "reading.output_datastore=/nonexistent/corpus: no such .txt file" in one_line_error(capsys, argv)


def test_trime_finetunes_with_its_joint_softmax_loss(tmp_path, one_thread):
    model, docs = save_tiny_model(tmp_path / "tiny"), write_text_docs(tmp_path / "docs", [1300] * 3)
    out = tmp_path / "ft"
    assert cli.main(["finetune", "--method", "trime", "--model", str(model), "--data", str(docs), "--tokens", "320",
                     "--segment-len", "16", "--batch-size", "2", "--lr", "3e-3", "--warmup-steps", "2",
                     "--eval-every", "5", "--eval-docs", "1", "--eval-tokens", "80", "--out", str(out)]) == 0
    evals = pd.read_csv(out / "eval_log.csv")
    assert evals["heldout_ppl"].iloc[-1] < evals["heldout_ppl"].iloc[0]
    assert cli.main(["run", "--model", str(out), "--tasks", "pg19", "--data-dir", str(docs), "--max-docs", "1",
                     "--max-tokens", "120", "--out", str(tmp_path / "results")]) == 0
    assert set(pd.read_csv(tmp_path / "results" / "leaderboard.csv")["method"]) == {"trime"}
