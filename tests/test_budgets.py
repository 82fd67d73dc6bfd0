"""Per-layer (PyramidKV) and per-head (AdaKV) score-eviction budgets, KV accounting, and equal budgets (issue 10).

Exactness against the float64 reference's explicit per-head slot lists (tests/reference_unimem.py): per-token NLL
within 1e-5 and, per layer and KV head, exactly the ids the reference keeps; the pyramid schedule and the adaptive
split against the reference's own; the run record's slots, footprint and bytes against a hand count.
"""

from __future__ import annotations

import dataclasses
import math
import random

import pytest
import torch
from helpers import random_docs, tiny_llama
from reference_unimem import EvictionSpec, HeadSlot, _keep, _keep_adaptive, eviction_nll, layer_budget
from test_eviction import config_for, peaked_llama, reference_llama

from unimem_bench.methods import METHODS, ConfigError, MemoryLM, MethodContext, UniMemConfig
from unimem_bench.methods.config import Management, Position, Reading, Writing
from unimem_bench.methods.engine import budgets

ATOL = 1e-5


def budget_config(spec: EvictionSpec) -> UniMemConfig:
    return config_for(spec).with_overrides([
        f"management.layer_budget={spec.layer_budget}", f"management.pyramid_beta={spec.pyramid_beta}",
        f"management.head_budget={spec.head_budget}", f"management.head_floor={spec.head_floor}",
        f"management.budget={spec.budget}"])


def engine_held(model: torch.nn.Module, spec: EvictionSpec, doc: torch.Tensor) -> tuple[torch.Tensor, list, dict]:
    """Per-token NLL, the ids each layer's KV heads hold at the end (padding dropped), and the run record."""
    with MemoryLM(model, budget_config(spec), segment_len=spec.segment_len) as lm:
        nll = lm.score([doc])[0]
        record = lm.usage_record()
        with torch.inference_mode(), lm.budget_for(len(doc)):
            state = lm.new_state(1)
            for start in range(0, len(doc) - 1, spec.segment_len):
                width = min(spec.segment_len, len(doc) - 1 - start)
                lm.forward_segment(state, doc[start:start + width].unsqueeze(0), start)
    held = []
    for i in sorted(state.layers):
        ids = state.layers[i].ids[0]
        for head in ids.tolist():  # padding only on the left of a head
            n_pad = sum(1 for x in head if x < 0)
            assert all(x < 0 for x in head[:n_pad]) and all(x >= 0 for x in head[n_pad:])
        held.append([[x for x in head if x >= 0] for head in ids.tolist()])
    return nll, held, record


CASES = [
    EvictionSpec(segment_len=5, size=7, policy="snapkv", position="compact", recent=2, observe=3, pool_kernel=3,
                 layer_budget="pyramid", pyramid_beta=3),
    EvictionSpec(segment_len=5, size=7, policy="snapkv", position="compact", recent=2, observe=3, pool_kernel=3,
                 head_budget="adaptive"),
    EvictionSpec(segment_len=4, size=6, policy="h2o", position="compact", sinks=1, recent=1, head_budget="adaptive",
                 layer_budget="pyramid", pyramid_beta=2, head_floor=0.0),
    EvictionSpec(segment_len=4, size=6, policy="knorm", position="official", head_budget="adaptive"),
    EvictionSpec(segment_len=5, size=8, policy="lru", position="absolute", head_budget="adaptive", sinks=2),
    EvictionSpec(segment_len=4, size=6, policy="tova", position="compact", layer_budget="pyramid", pyramid_beta=2),
    # A budget of 0.6 x 23 tokens: 14 slots, 2 x 12 unprotected ones exceed the 21 unprotected tokens, so the top
    # is capped (21) and the bottom raised (3).
    EvictionSpec(segment_len=4, size=14, policy="snapkv", position="compact", observe=2, pool_kernel=3, recent=2,
                 layer_budget="pyramid", budget=0.6),
    EvictionSpec(segment_len=3, size=5, policy="snapkv", position="absolute", observe=2, pool_kernel=3, recent=1,
                 layer_budget="pyramid", head_budget="adaptive", pyramid_beta=4, head_floor=0.0),
]


@pytest.mark.parametrize("spec", CASES, ids=lambda s: f"{s.policy}-{s.position}-{s.layer_budget}-{s.head_budget}")
def test_budgeted_eviction_matches_reference(spec: EvictionSpec) -> None:
    model = peaked_llama(layers=3, heads=4, kv_heads=2, context=64).double()
    doc = torch.randperm(99, generator=torch.Generator().manual_seed(3))[:23]
    trace: list = []
    ref_nll, ref_held = eviction_nll(reference_llama(model), spec, doc, trace)
    nll, held, record = engine_held(model, spec, doc)
    torch.testing.assert_close(nll.double(), ref_nll, atol=ATOL, rtol=0)
    assert held == ref_held
    sizes = [sum(len(h) for h in layer) for layer in held]
    tokens = len(doc) if spec.budget else 0
    budget = [layer_budget(spec, i, 3, tokens) * 2 for i in range(3)]
    assert sizes == [min(b, 2 * (len(doc) - 1)) for b in budget]  # each layer's heads hold its budget together
    if spec.layer_budget == "pyramid":
        assert budget[0] > budget[-1]
    if spec.head_budget == "adaptive" and spec.policy != "h2o":  # heads really kept different numbers at some
        # point (h2o's accumulated scores happen to split this document evenly in every layer)
        assert any(len(set(layer)) > 1 for _, lengths in trace for layer in lengths)
    # Accounting by hand from the reference's trace: slots held while each segment ran x its tokens.
    for i, usage in record["layers"].items():
        layer = int(i)
        assert usage["footprint"] == [sum(w * lengths[layer][h] for w, lengths in trace) for h in range(2)]
        assert usage["peak_slots"] == [max(lengths[layer][h] for _, lengths in trace) for h in range(2)]
    states = [lengths for _, lengths in trace[1:]] + [[[len(h) for h in layer] for layer in ref_held]]
    head_dim = model.config.hidden_size // model.config.num_attention_heads
    assert record["peak_kv_bytes"] == max(sum(map(sum, s)) for s in states) * 2 * head_dim * 8  # float64


@pytest.mark.parametrize("n_layers", [1, 2, 3, 5, 22, 32])
@pytest.mark.parametrize(("size", "sinks", "recent", "beta"), [(128, 0, 32, 20), (7, 0, 2, 3), (1000, 4, 0, 20),
                                                                (40, 2, 3, 1), (9, 0, 0, 20)])
def test_pyramid_schedule_keeps_the_uniform_total(n_layers, size, sinks, recent, beta) -> None:
    m = Management(size=size, eviction="snapkv", sinks=sinks, recent=recent, layer_budget="pyramid",
                   pyramid_beta=beta)
    spec = EvictionSpec(segment_len=1, size=size, policy="snapkv", sinks=sinks, recent=recent, layer_budget="pyramid",
                        pyramid_beta=beta)
    sizes = [budgets.layer_size(m, size, i, n_layers) for i in range(n_layers)]
    assert sizes == [layer_budget(spec, i, n_layers) for i in range(n_layers)]
    assert sum(sizes) == n_layers * size
    assert sizes == sorted(sizes, reverse=True) and min(sizes) >= sinks + recent
    if n_layers > 1 and beta > 1 and size - sinks - recent >= beta:
        assert sizes[0] > size > sizes[-1]
    for tokens in (size, size + (size - sinks - recent) // 2, 10 * size):  # within the budget, capped, free
        capped = [budgets.layer_size(m, size, i, n_layers, tokens) for i in range(n_layers)]
        assert capped == [layer_budget(spec, i, n_layers, tokens) for i in range(n_layers)]
        assert sum(capped) == n_layers * size and max(capped) <= max(tokens, size)
        assert capped == sorted(capped, reverse=True)


@pytest.mark.parametrize("seed", range(6))
def test_adaptive_split_matches_reference_with_ties(seed) -> None:
    """Integer scores (many ties across and within heads), heads of different lengths padded on the left."""
    rng = random.Random(seed)
    heads, budget = 3, rng.randint(2, 6)
    m = Management(size=budget, eviction="knorm", sinks=1, recent=1, head_budget="adaptive", head_floor=0.34)
    lengths = [rng.randint(budget - 1, budget + 5) for _ in range(heads)]
    width = max(lengths)
    end = 40
    pool = [sorted(rng.sample(range(end), n)) for n in lengths]
    ids = torch.full((1, heads, width), -1)
    scores = torch.zeros(1, heads, width)
    ref = []
    for g, chosen in enumerate(pool):
        values = [float(rng.randint(0, 3)) for _ in chosen]
        ids[0, g, width - len(chosen):] = torch.tensor(chosen)
        scores[0, g, width - len(chosen):] = torch.tensor(values)
        ref.append([HeadSlot(i, torch.zeros(1), torch.zeros(1), v) for i, v in zip(chosen, values, strict=True)])
    spec = EvictionSpec(segment_len=1, size=budget, policy="knorm", sinks=1, recent=1, head_budget="adaptive",
                        head_floor=0.34)
    want = [[s.id for s in head] for head in _keep_adaptive(spec, ref, end, budget)]
    keep = budgets.keep_slots(m, scores, ids, budget, end)[0]
    got = [[int(ids[0, g, j]) for j in row if j >= 0] for g, row in enumerate(keep.tolist())]
    assert got == want


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("padded", [False, True], ids=["full heads", "padded heads"])
def test_uniform_split_matches_reference_with_ties(seed, padded) -> None:
    """The uniform per-head selection: unpadded heads take `keep_slots`' fast path (`eviction.keep_indices`),
    padded ones its general path; both keep the reference's slots under integer scores (ties within heads)."""
    rng = random.Random(seed)
    heads, budget = 3, rng.randint(2, 6)
    m = Management(size=budget, eviction="knorm", sinks=1, recent=1, head_budget="uniform")
    width = budget + rng.randint(1, 5)
    # Padded: the first head fills the width, the second is shorter, the third either.
    lengths = [width, rng.randint(budget - 1, width - 1), rng.randint(budget - 1, width)] if padded else [width] * 3
    end = 40
    ids = torch.full((1, heads, width), -1)
    scores = torch.zeros(1, heads, width)
    spec = EvictionSpec(segment_len=1, size=budget, policy="knorm", sinks=1, recent=1)
    want = []
    for g, n in enumerate(lengths):
        chosen = sorted(rng.sample(range(end), n))
        values = [float(rng.randint(0, 3)) for _ in chosen]
        ids[0, g, width - n:] = torch.tensor(chosen)
        scores[0, g, width - n:] = torch.tensor(values)
        ref = [HeadSlot(i, torch.zeros(1), torch.zeros(1), v) for i, v in zip(chosen, values, strict=True)]
        want.append([s.id for s in _keep(spec, ref, end, budget)])
    keep = budgets.keep_slots(m, scores, ids, budget, end)[0]
    got = [[int(ids[0, g, j]) for j in row if j >= 0] for g, row in enumerate(keep.tolist())]
    assert got == want
    assert padded == bool((ids < 0).any())  # each case reaches the path it names


def test_fifo_accounting_by_hand() -> None:
    """Transformer-XL-like FIFO memory of 4 slots, segments of 4 over 13 tokens: held 0, 4, 4 while the three
    segments run, so each KV head's footprint is 0*4 + 4*4 + 4*4 = 32 slot-tokens and its peak 4 slots."""
    model = tiny_llama(layers=2, heads=4, kv_heads=2)
    config = UniMemConfig(management=Management(size=4), writing=Writing(kv="direct"), reading=Reading(window=4))
    with MemoryLM(model, config, segment_len=4) as lm:
        lm.score(random_docs([13]))
        record = lm.usage_record()
    head_dim = 32 // 4
    assert record["kv_footprint"] == 2 * 2 * 32
    assert record["peak_kv_bytes"] == 2 * 2 * 4 * 2 * head_dim * 4  # layers x kv heads x slots x (K, V) x float32
    for usage in record["layers"].values():
        assert usage["footprint"] == [32, 32] and usage["peak_slots"] == [4, 4]
        assert usage["evicted"] == 4 + 4 and usage["read"] == 0 + 4 + 4


@pytest.mark.parametrize("name", ["transformer_xl", "memorizing_transformer", "streaming_llm", "pyramidkv", "adakv"])
def test_budget_means_the_same_slots_for_every_method(name) -> None:
    """management.budget=0.25 scores each document as management.size=ceil(0.25 x its tokens) does (and a window
    that covered the memory covers the new size), for FIFO and score-evicting methods alike."""
    model = tiny_llama(layers=2, heads=4, kv_heads=2, context=128)
    docs = random_docs([61, 45], seed=4)
    ctx = MethodContext(n_layers=2, segment_len=4, trained_context=128)
    default = METHODS.get(name).config(ctx)
    window = ["reading.window=8"] if default.reading.window else []  # XL, StreamingLLM: the window covers memory
    base = METHODS.get(name).config(ctx, ["management.size=8", *window])
    with MemoryLM(model, base.with_overrides(["management.budget=0.25"]), segment_len=4) as lm:
        got = lm.score(docs)
        evicted = sum(u.evicted for u in lm.usage.values())
    assert evicted > 0
    for doc, nll in zip(docs, got, strict=True):
        size = math.ceil(len(doc) / 4)
        window = [f"reading.window={size}"] if base.reading.window == base.management.size else []
        with MemoryLM(model, base.with_overrides([f"management.size={size}", *window]), segment_len=4) as lm:
            torch.testing.assert_close(nll, lm.score([doc])[0], atol=0, rtol=0)


@pytest.mark.parametrize("name", ["pyramidkv", "adakv"])
def test_budgeted_compression_that_never_compressed_fails(name) -> None:
    model = tiny_llama(layers=2, heads=4, kv_heads=2, context=64)
    doc = random_docs([40], seed=2)[0]
    config = METHODS.get(name).config(MethodContext(2, 40, 64), ["management.size=16"])
    with MemoryLM(model, config, segment_len=40) as lm:  # one segment: every query read the full cache
        lm.score([doc])
        assert sum(u.evicted for u in lm.usage.values()) > 0
        with pytest.raises(ConfigError, match="compressed nothing"):
            lm.check_compressed()
    with MemoryLM(model, config, segment_len=8) as lm:
        lm.score([doc])
        lm.check_compressed()


def test_budget_config_errors() -> None:
    with pytest.raises(ConfigError, match="tova scores a slot once"):
        Management(size=8, eviction="tova", head_budget="adaptive")
    with pytest.raises(ConfigError, match="split a score-evicting budget"):
        Management(size=8, layer_budget="pyramid")
    with pytest.raises(ConfigError, match="pyramid_beta=0"):
        Management(size=8, eviction="h2o", pyramid_beta=0)
    with pytest.raises(ConfigError, match="management.budget sizes a key/value memory"):
        Management(budget=0.5)
    assert dataclasses.replace(Management(size=8), budget=0.5).budget == 0.5  # FIFO memories take a budget too
    with pytest.raises(ConfigError, match="layer_budget"):
        UniMemConfig(management=Management(size=8, eviction="h2o"), writing=Writing(kv="direct"),
                     reading=Reading(read_all=True), position=Position()).with_overrides(
                         ["management.layer_budget=steep"])


@pytest.mark.parametrize("method", ["pyramidkv", "adakv"])
def test_budgeted_methods_run_through_the_lm_eval_model(method, stories_dir, books_dir) -> None:
    from lm_eval.api.instance import Instance

    from unimem_bench.harness.evaluation.lm_eval_model import UnimemLM

    text = next(iter(sorted(books_dir.glob("*.txt")))).read_text()[30_000:32_500]
    rolling = [Instance(request_type="loglikelihood_rolling", doc={}, arguments=(text,), idx=0)]
    ours = UnimemLM(pretrained=str(stories_dir), method=method, segment_len=64, batch_size=1)
    xl = UnimemLM(pretrained=str(stories_dir), method="snapkv", segment_len=64, batch_size=1)
    got, uniform = ours.loglikelihood_rolling(rolling)[0], xl.loglikelihood_rolling(rolling)[0]
    assert math.isfinite(got) and got != uniform  # the split budgets changed what was kept
    until = [Instance(request_type="generate_until", doc={}, idx=0,
                      arguments=(text[:600], {"until": ["\n\n"], "max_gen_toks": 12, "do_sample": False}))]
    assert isinstance(ours.generate_until(until)[0], str)


def test_budget_sweep_records_footprints_and_draws_the_pareto_view(tiny_model_dir, tmp_path, capsys) -> None:
    """`sweep --preset budget` over a score-evicting, a FIFO and a top-k method: every point records its KV
    footprint, which shrinks with the budget, and the sweep writes the Pareto figure."""
    import json

    import yaml

    from unimem_bench.harness.cli import app as cli

    out = tmp_path / "out"
    argv = ["sweep", "--preset", "budget", "--methods", "adakv,transformer_xl,memorizing_transformer", "--model",
            str(tiny_model_dir), "--tasks", "github", "--max-docs", "2", "--max-tokens", "128", "--segment-len", "16",
            "--out", str(out)]
    assert cli.main(argv) == 0
    assert "_pareto.png" in capsys.readouterr().out
    sweep = yaml.safe_load(next((out / "sweeps").glob("budget-*.yaml")).read_text())
    footprints: dict[str, list[int]] = {}
    for point in sweep["points"]:
        record = json.loads((out / "runs" / point["runs"]["github"] / "run.json").read_text())
        footprints.setdefault(point["method"], []).append(record["memory_usage"]["kv_footprint"])
    for method, values in footprints.items():  # budgets 1, 0.5, 0.25, 0.125 in this order
        assert values == sorted(values, reverse=True) and values[0] > values[-1] > 0, method
    assert len(list((out / "plots").glob("sweep_budget-*_pareto.*"))) == 2


@pytest.mark.parametrize("spec", [CASES[1], CASES[2], CASES[3]], ids=["snapkv-adaptive", "h2o-both", "knorm-official"])
def test_budgeted_banks_read_in_key_blocks_match_the_reference(spec: EvictionSpec, monkeypatch) -> None:
    """Each layer read at its own width in blocks of 2 slots (blocks of padding skipped, partly padded ones
    masked per KV head) keeps and scores what the reference does."""
    from unimem_bench.methods.engine import split_read

    monkeypatch.setattr(split_read, "KEY_BLOCK", 2)
    model = peaked_llama(layers=3, heads=4, kv_heads=2, context=64).double()
    doc = torch.randperm(99, generator=torch.Generator().manual_seed(3))[:23]
    ref_nll, ref_held = eviction_nll(reference_llama(model), spec, doc)
    nll, held, _ = engine_held(model, spec, doc)
    torch.testing.assert_close(nll.double(), ref_nll, atol=ATOL, rtol=0)
    assert held == ref_held


@pytest.mark.parametrize("seed", range(6))
def test_padded_banks_compact_in_place_as_a_fresh_gather(seed, monkeypatch) -> None:
    """`take_padded` in place (heads moving slots left and right, blocks smaller than a head) against the gather
    into a new tensor, for random per-head keeps of a padded bank."""
    monkeypatch.setattr("unimem_bench.methods.engine.eviction.TAKE_BLOCK", 3)
    gen = torch.Generator().manual_seed(seed)
    batch, kv_heads, n_held, n_new, dim = 2, 3, 17, 5, 4
    for width in (n_held, n_held - 4, 9):
        keep = torch.full((batch, kv_heads, width), -1, dtype=torch.long)
        for b in range(batch):
            for h in range(kv_heads):
                count = int(torch.randint(0, width + 1, (1,), generator=gen))
                chosen = torch.randperm(n_held + n_new, generator=gen)[:count].sort().values
                keep[b, h, width - count:] = chosen
        held = torch.randn(batch, kv_heads, n_held, dim, generator=gen)
        new = torch.randn(batch, kv_heads, n_new, dim, generator=gen)
        want = budgets.take_padded(held.clone(), new, keep, padded=True, in_place=False)
        got = budgets.take_padded(held, new, keep, padded=True, in_place=True)
        assert torch.equal(got, want)
        assert got.data_ptr() == held.data_ptr()  # compacted inside the held bank


def test_pooled_tier_counts_in_the_held_bytes() -> None:
    """A 4-slot window whose evicted slots are pooled by 2 into a tier of up to 4 slots, segments of 4 over 13
    tokens: after the segments the memory holds 4, 4 + 2 and 4 + 4 slots per KV head, so the peak is 8 slots, as
    the final state's tensors show."""
    model = tiny_llama(layers=2, heads=4, kv_heads=2)
    config = UniMemConfig(management=Management(size=4, overflow="fifo"),
                          writing=Writing(kv="direct", pool_ratio=2, pooled_tier=4), reading=Reading(window=4))
    with MemoryLM(model, config, segment_len=4) as lm:
        state = lm.new_state(1)
        ids = random_docs([13])[0][:-1].unsqueeze(0)
        for start in range(0, 12, 4):
            lm.forward_segment(state, ids[:, start:start + 4], start)
        record = lm.usage_record()
    head_dim = 32 // 4
    held = [layer.keys.shape[2] + layer.tier_keys.shape[2] for layer in state.layers.values()]
    assert held == [8, 8]
    assert record["peak_kv_bytes"] == 2 * 2 * 8 * 2 * head_dim * 4  # layers x kv heads x slots x (K, V) x float32
