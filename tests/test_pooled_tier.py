"""The two-tier memory (writing.pooled_tier: Poolingformer, LongT5's TGlobal) against the float64 reference, its
property (ratio 1 and a tier large enough = one plain window over both), and the settings it refuses."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import random_docs, sweep_argv, tiny_llama
from lm_eval.api.instance import Instance
from test_unimem_reference import TINY_CONTEXT, Case, case, check_against_reference

from unimem_bench.harness.cli import app as cli
from unimem_bench.harness.evaluation import records
from unimem_bench.harness.evaluation.lm_eval_model import UnimemLM
from unimem_bench.harness.sweeps.presets import PRESETS, Axis
from unimem_bench.methods import METHODS, ConfigError, MemoryLM, MethodContext, describe

TIER = "writing.pooled_tier"

GRID = [
    # A window of 8 sliding into a tier, every tier overflow, pooling ratios 1-3 (groups not dividing a write).
    *[case(f"tier-{policy}", "transformer_xl", "reading.sliding=false", f"{TIER}=5", "writing.pool_ratio=2",
           f"management.overflow={policy}", doc=60) for policy in ("fifo", "clear", "clear-and-write")],
    case("tier-ratio3-uneven", "transformer_xl", f"{TIER}=4", "writing.pool_ratio=3", segment=5, doc=40),
    case("tier-ratio1", "transformer_xl", f"{TIER}=9", "writing.pool_ratio=1", "reading.sliding=false"),
    # Every position mode; a sliding window; a window smaller than the direct bank, with top-k over the rest.
    *[case(f"tier-{mode}", "poolingformer", f"position.mode={mode}", doc=60)
      for mode in ("official", "compact", "absolute")],
    case("tier-sliding", "poolingformer", "reading.sliding=true"),
    case("tier-window4-of-12-topk2", "memorizing_transformer", "management.size=12", "reading.window=4",
         "reading.topk=2", f"{TIER}=6", "writing.pool_ratio=2", "injection.layers=all", doc=60),
    # With document globals in front (compact: globals, tier, window consecutive), one-token segments.
    case("tier-globals-compact", "transformer_xl", "reading.global_tokens=3", f"{TIER}=4", "writing.pool_ratio=2",
         "position.mode=compact", "reading.sliding=false", doc=50),
    case("tier-segment1", "longt5", "management.size=3", "reading.window=3", "writing.pool_ratio=2", f"{TIER}=3",
         segment=1, doc=14),
    case("longt5-block4", "longt5", "writing.pool_ratio=4", f"{TIER}=3", "management.overflow=fifo", doc=70),
]


@pytest.mark.parametrize("spec", GRID, ids=lambda c: c.name)
def test_two_tier_equals_reference(spec: Case, one_thread) -> None:
    model = tiny_llama(layers=3, heads=4, kv_heads=2, context=TINY_CONTEXT, seed=3)
    check_against_reference(model, spec, random_docs([spec.doc], seed=5)[0], TINY_CONTEXT)


def scores(*overrides: str, doc: int = 70, segment: int = 8) -> torch.Tensor:
    model = tiny_llama(layers=2, heads=4, kv_heads=2, context=TINY_CONTEXT, seed=11)
    ctx = MethodContext(n_layers=2, segment_len=segment, trained_context=TINY_CONTEXT)
    config = METHODS.get("transformer_xl").config(ctx, ["reading.sliding=false", *overrides])
    with MemoryLM(model, config, segment_len=segment, trained_context=TINY_CONTEXT) as lm:
        return lm.score(random_docs([doc, doc - 9], seed=2), batch_size=2)[0]


@pytest.mark.parametrize("mode", ["official", "compact", "absolute"])
@pytest.mark.parametrize(("window", "tier"), [(8, 16), (16, 8), (8, 3)])
def test_ratio_one_and_a_large_tier_is_one_plain_window(mode: str, window: int, tier: int, one_thread) -> None:
    """Property: a window of W sliding into a FIFO tier of T unpooled slots reads, in every position mode, exactly
    what one window of W + T reads (batched, with a shorter second document)."""
    two_tier = scores(f"management.size={window}", f"reading.window={window}", f"{TIER}={tier}",
                      "writing.pool_ratio=1", "management.overflow=fifo", f"position.mode={mode}")
    plain = scores(f"management.size={window + tier}", f"reading.window={window + tier}", f"position.mode={mode}")
    torch.testing.assert_close(two_tier, plain, atol=1e-5, rtol=0)


def test_the_tier_is_read_and_pooling_changes_it(one_thread) -> None:
    window = scores("management.size=8", "reading.window=8")
    pooled = scores("management.size=8", "reading.window=8", f"{TIER}=6", "writing.pool_ratio=4")
    unpooled = scores("management.size=8", "reading.window=8", f"{TIER}=24", "writing.pool_ratio=1")
    assert torch.equal(window[:15], pooled[:15])  # the first two segments: nothing has left the window yet
    assert (window - pooled).abs().max() > 1e-4
    assert (pooled - unpooled).abs().max() > 1e-4


@pytest.mark.parametrize(("overrides", "problem"), [
    ((f"{TIER}=-1",), "pooled_tier"),
    (("writing.pool_ratio=1",), "pool_ratio=1"),
    ((f"{TIER}=4", "writing.kv=pooling"), "writing.kv=direct"),
    ((f"{TIER}=4", "management.eviction=knorm", "reading.sliding=false"), "management.eviction=fifo"),
    ((f"{TIER}=4", "position.mode=compact", "reading.global_tokens=2", "reading.sliding=true",
      "position.sink_shift=true"), "sink_shift"),
])
def test_bad_tier_settings_are_refused(overrides: tuple[str, ...], problem: str) -> None:
    ctx = MethodContext(n_layers=2, segment_len=8, trained_context=16)
    with pytest.raises(ConfigError, match=problem):
        METHODS.get("transformer_xl").config(ctx, list(overrides))


def test_the_tier_needs_a_direct_bank() -> None:
    ctx = MethodContext(n_layers=2, segment_len=8, trained_context=16)
    with pytest.raises(ConfigError, match="management.size > 0"):
        METHODS.get("vanilla").config(ctx, ["writing.kv=direct", f"{TIER}=4"])


@pytest.mark.parametrize("name", ["poolingformer", "longt5"])
def test_defaults_scale_with_the_segment_and_list_the_tier(name: str) -> None:
    small = METHODS.get(name).config(MethodContext(n_layers=2, segment_len=128, trained_context=512))
    large = METHODS.get(name).config(MethodContext(n_layers=2, segment_len=256, trained_context=512))
    assert large.writing.pooled_tier == 2 * small.writing.pooled_tier
    assert small.management.size == small.reading.window == 128 and not small.reading.sliding
    assert small.writing.pool_ratio == {"poolingformer": 4, "longt5": 16}[name]
    assert "pooled tier" in describe(small)["reading"]
    assert METHODS.get(name).fidelity.startswith("decoder variant")


def test_pooling_presets_scale_with_the_segment() -> None:
    ctx = MethodContext(n_layers=5, segment_len=128, trained_context=512)
    assert PRESETS["pool-ratio"].axes(ctx) == [Axis("writing.pool_ratio", ("1", "2", "4", "8", "16"))]
    assert PRESETS["pooled-tier"].axes(ctx) == [Axis("writing.pooled_tier", ("0", "16", "32", "64", "128", "256"))]


def test_run_and_the_pool_ratio_sweep_on_a_tiny_model(tiny_model_dir, tmp_path, capsys) -> None:
    """Both methods through `run`, and the pool-ratio preset through `sweep`: every point a finished run, the
    ratio changing the perplexity."""
    argv = sweep_argv(tiny_model_dir, tmp_path, "--preset", "pool-ratio")
    argv[2] = "poolingformer"
    assert cli.main(argv) == 0
    board = records.read_leaderboard(tmp_path / "leaderboard.csv")
    ppl = board[(board["metric"] == "token_ppl") & (board["subtask"].fillna("") == "")]
    assert len(ppl) == 5 and ppl["value"].nunique() == 5
    run = sweep_argv(tiny_model_dir, tmp_path / "run")
    run[:3] = ["run", "--methods", "vanilla,poolingformer,longt5"]
    assert cli.main(run) == 0
    board = records.read_leaderboard(tmp_path / "run" / "leaderboard.csv")
    assert set(board["method"]) == {"vanilla", "poolingformer", "longt5"}


@pytest.mark.parametrize("method", ["poolingformer", "longt5"])
def test_two_tier_methods_run_through_the_lm_eval_model(method, stories_dir, books_dir) -> None:
    text = next(iter(sorted(books_dir.glob("*.txt")))).read_text()[30_000:34_000]
    rolling = [Instance(request_type="loglikelihood_rolling", doc={}, arguments=(text,), idx=0)]
    ours = UnimemLM(pretrained=str(stories_dir), method=method, segment_len=64, batch_size=1)
    window = UnimemLM(pretrained=str(stories_dir), method=method, segment_len=64, batch_size=1,
                      set="writing.pooled_tier=0")
    got, plain = ours.loglikelihood_rolling(rolling)[0], window.loglikelihood_rolling(rolling)[0]
    assert math.isfinite(got) and got != plain  # the pooled tier is read
    until = [Instance(request_type="generate_until", doc={}, idx=0,
                      arguments=(text[:600], {"until": ["\n\n"], "max_gen_toks": 12, "do_sample": False}))]
    assert isinstance(ours.generate_until(until)[0], str)


def test_a_saved_state_with_a_tier_continues_exactly(one_thread) -> None:
    """A training checkpoint's memory (`MemoryState.state_dict`) keeps the pooled tier: a restored state continues
    the document with the same logits."""
    model = tiny_llama(layers=2, heads=4, kv_heads=2, context=TINY_CONTEXT, seed=11)
    ctx = MethodContext(n_layers=2, segment_len=8, trained_context=TINY_CONTEXT)
    config = METHODS.get("poolingformer").config(ctx, ["writing.pooled_tier=3", "writing.pool_ratio=2"])
    doc = random_docs([64], seed=4)[0].unsqueeze(0)
    with torch.no_grad(), MemoryLM(model, config, segment_len=8, trained_context=TINY_CONTEXT) as lm:
        state = lm.new_state(1)
        for start in range(0, 32, 8):
            lm.forward_segment(state, doc[:, start:start + 8], start)
        assert state.n_tier == 3 and state.layers[0].tier_keys.shape[2] == 3
        restored = lm.new_state(1)
        restored.load_state_dict(state.state_dict(), torch.device("cpu"))
        for start in range(32, 64, 8):
            torch.testing.assert_close(lm.forward_segment(restored, doc[:, start:start + 8], start),
                                       lm.forward_segment(state, doc[:, start:start + 8], start), atol=0, rtol=0)


@pytest.mark.parametrize("method", ["longt5", "poolingformer"])
def test_the_tier_room_reads_and_writes_as_new_tensors_do(method: str, one_thread) -> None:
    """Without autograd the tier is appended in place at the front of its room and read with the window and the
    segment laid after it (`tier.py`); with autograd every write makes new tensors and the read concatenates. Both
    give the same logits, bit for bit, and the inference run really used the room."""
    model = tiny_llama(layers=2, heads=4, kv_heads=2, context=TINY_CONTEXT, seed=5)
    ctx = MethodContext(n_layers=2, segment_len=8, trained_context=TINY_CONTEXT)
    config = METHODS.get(method).config(ctx, ["writing.pooled_tier=6", "writing.pool_ratio=2"])
    doc = random_docs([96], seed=6)[0].unsqueeze(0)
    logits = {}
    for mode in ("inference", "grad"):
        with (torch.inference_mode(mode == "inference"), torch.enable_grad() if mode == "grad" else torch.no_grad(),
              MemoryLM(model, config, segment_len=8, trained_context=TINY_CONTEXT) as lm):
            state = lm.new_state(1)
            logits[mode] = torch.cat([lm.forward_segment(state, doc[:, s:s + 8], s).detach() for s in range(0, 96, 8)])
            layer = state.layers[0]
            in_room = layer.tier_room is not None and layer.tier_keys.data_ptr() == layer.tier_room[0].data_ptr()
            assert in_room == (mode == "inference")
    torch.testing.assert_close(logits["inference"], logits["grad"], atol=0, rtol=0)
