"""The benchmark's random models and eviction baselines (benchmarks/methodbench): shapes, the FIFO twin, KV bytes."""

from __future__ import annotations

import io
import sys
from pathlib import Path

import pytest
import torch
from rich.console import Console

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from methodbench.eviction import full_kv_bytes  # noqa: E402
from methodbench.measure import (  # noqa: E402
    Job,
    Memory,
    Point,
    fifo_twin,
    load_llm,
    method_config,
    model_config,
    time_method,
)
from methodbench.random_model import PREFIX, parse  # noqa: E402
from methodbench.report import csv_rows, methods_table  # noqa: E402

from unimem_bench.methods.config import ConfigError  # noqa: E402
from unimem_bench.methods.engine.memory_lm import MemoryLM  # noqa: E402


def test_the_62m_preset_has_real_widths():
    config = model_config(PREFIX + "62m")
    assert config.hidden_size // config.num_attention_heads == 64
    params = sum(p.numel() for p in load_llm(PREFIX + "hidden=64,layers=1,heads=2,vocab=100").parameters())
    assert params == 2 * 100 * 64 + 4 * 64 * 64 + 3 * 64 * 192 + 2 * 64 + 64  # embeddings, attention, MLP, norms
    assert parse("62m")["kv_heads"] == 8


@pytest.mark.parametrize("bad", ["hidden=0", "depth=3", "hidden=100,heads=8", "heads=8,kv_heads=3"])
def test_a_bad_random_model_names_its_part(bad):
    with pytest.raises(ConfigError, match="--random-model"):
        parse(bad)


@pytest.mark.parametrize(("method", "overrides"), [("h2o", ()), ("h2o", ("management.budget=0.25",)),
                                                   ("pyramidkv", ()), ("adakv", ())])
def test_the_fifo_twin_holds_as_many_slots_as_the_eviction_method(method, overrides):
    config = model_config(PREFIX + "hidden=64,layers=2,heads=2,vocab=100")
    evicting = method_config(method, config, 16, overrides)
    twin = fifo_twin(evicting, 200)
    assert twin.management.eviction == "fifo" and not twin.management.scored
    assert twin.reading == evicting.reading and twin.position == evicting.position
    model = load_llm(PREFIX + "hidden=64,layers=2,heads=2,vocab=100")
    with MemoryLM(model, evicting, segment_len=16) as lm, lm.budget_for(200):
        assert twin.management.size == lm.config.management.size


def test_full_kv_bytes_counts_keys_and_values_of_every_layer():
    config = model_config(PREFIX + "hidden=64,layers=3,heads=4,kv_heads=2")
    assert full_kv_bytes(config, 10) == 2 * 10 * 3 * 2 * 16 * torch.float32.itemsize


def test_timing_reports_the_spread_of_its_repeats():
    """Three alternating repeats: the median ratio lies within the lowest and highest repeat's, and the table cell
    and the CSV carry all three."""
    import faiss

    job = Job(model=PREFIX + "hidden=64,layers=1,heads=2,vocab=100", method="transformer_xl", overrides=(),
              segment_len=16, threads=torch.get_num_threads())  # the test process's own torch thread count
    faiss_threads = faiss.omp_get_max_threads()
    try:
        timing = time_method(job, (48,), 3)[48]
    finally:
        faiss.omp_set_num_threads(faiss_threads)  # time_method sets faiss's threads too: the test leaves them as found
    assert timing.ratio_low <= timing.ratio <= timing.ratio_high
    point = Point("transformer_xl", 48, timing, Memory(0, 0, 0))
    metrics = {row[3]: row[4] for row in csv_rows([point], [], [], {}, 48)}
    assert (metrics["ratio_vs_vanilla_low"], metrics["ratio_vs_vanilla"], metrics["ratio_vs_vanilla_high"]) == (
        timing.ratio_low, timing.ratio, timing.ratio_high)
    # the ratio of the fastest runs reaches the CSV under its own name, and the table
    assert metrics["ratio_vs_vanilla_fastest_runs"] == timing.fastest_ratio > 0
    console = Console(width=200, record=True, file=io.StringIO())
    console.print(methods_table({("transformer_xl", 48): point}, ["transformer_xl"], [48], 16))
    text = console.export_text()
    assert f"x{timing.ratio:.2f}" in text and (timing.ratio_low == timing.ratio_high
                                               or f"({timing.ratio_low:.2f}-{timing.ratio_high:.2f})" in text)
    assert f"fastest runs x{timing.fastest_ratio:.2f}" in text


def test_floor_counts_the_weights_and_the_search() -> None:
    """benchmarks/floor.py: vanilla's weight term is the model's linear parameters (one multiply-add each per token),
    and a top-k read grows by one dot product per query head and memory layer for each slot added to the memory."""
    from floor import read_macs, vanilla_macs

    config = model_config(f"{PREFIX}hidden=64,layers=3,heads=4,kv_heads=2,vocab=99")
    model = load_llm(f"{PREFIX}hidden=64,layers=3,heads=4,kv_heads=2,vocab=99")
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    args = (config.hidden_size, 3, 4, 2, config.intermediate_size, 99)
    attention = vanilla_macs(*args, segment=8) - linear
    assert attention == 3 * 4 * 16 * 2 * 4.5  # layers x heads x dim x (scores, values) x mean keys of 8 causal
    small = method_config("memorizing_transformer", config, 8, ("management.size=32",))
    large = method_config("memorizing_transformer", config, 8, ("management.size=64",))
    grown = read_macs(large, 3, 4, 2, 16, 8) - read_macs(small, 3, 4, 2, 16, 8)
    assert grown == len(small.injection.resolve(3)) * 4 * 16 * 32
    assert read_macs(method_config("vanilla", config, 8, ()), 3, 4, 2, 16, 8) is None
    # A FIFO memory is read full; a clearing one holds half its size on average (0, 1, ..., m segments).
    clear = method_config("routing", config, 8, ("management.size=32",))
    fifo = method_config("routing", config, 8, ("management.size=32", "management.overflow=fifo"))
    dense_half = read_macs(fifo, 3, 4, 2, 16, 8) - read_macs(clear, 3, 4, 2, 16, 8)
    assert dense_half == len(clear.injection.resolve(3)) * 4 * 16 * 2 * 16


def test_kernel_floor_sees_the_matmuls_and_the_fused_attention() -> None:
    """benchmarks/kernel_floor.py counts kernels by the profiler's op names: a vanilla run must show both a matmul
    and the fused attention under them (a renamed op would silently put the floor at x1.00)."""
    from kernel_floor import kernel_calls

    spec = f"{PREFIX}hidden=32,layers=2,heads=4,kv_heads=2,vocab=99"
    config, model = model_config(spec), load_llm(spec)
    tokens, segment = 64, 16
    doc = torch.randint(0, 99, (tokens + 1,))
    calls = kernel_calls(model, method_config("vanilla", config, segment, ()), segment, doc)
    ops = {op for op, _ in calls}
    assert {"aten::mm", "aten::addmm"} & ops
    # one fused attention call per segment and layer
    fused = sum(n for (op, _), (n, _) in calls.items() if op == "aten::_scaled_dot_product_flash_attention_for_cpu")
    assert fused == tokens // segment * config.num_hidden_layers


def test_linear_clock_counts_every_linear_call_copies_included() -> None:
    """kernel_floor's LinearClock counts each nn.Linear call of a forward (7 a LLaMA layer, and the LM head), also
    in a layer deep-copied after it was hooked (LongMem's SideNet), and leaves no hook behind."""
    import copy

    from kernel_floor import LinearClock

    spec = f"{PREFIX}hidden=32,layers=2,heads=4,kv_heads=2,vocab=99"
    model = load_llm(spec)
    clock = LinearClock(model)
    ids = torch.randint(0, 99, (1, 8))
    with torch.no_grad():
        model(ids)
    assert clock.calls == 2 * 7 + 1 and clock.seconds > 0
    layer = copy.deepcopy(model.model.layers[0])
    with torch.no_grad():
        layer(torch.randn(1, 8, 32), position_embeddings=model.model.rotary_emb(torch.randn(1, 8, 32),
                                                                                torch.arange(8)[None]))
    assert clock.calls == 2 * 7 + 1 + 7
    clock.remove()
    with torch.no_grad():
        model(ids)
    assert clock.calls == 2 * 7 + 1 + 7


def test_kernel_floor_adds_extra_calls_and_takes_replaced_ones() -> None:
    """A group called as often by both runs adds nothing, however long it took; extra calls count at the method's
    time a call; calls the method no longer makes are taken away at vanilla's."""
    from kernel_floor import added_seconds

    vanilla = {("aten::mm", "[[8, 4]]"): (10, 1.0), ("sdpa", "[[1, 8]]"): (4, 0.4)}
    method = {("aten::mm", "[[8, 4]]"): (10, 3.0), ("sdpa", "[[1, 16]]"): (4, 0.9), ("aten::bmm", "[[2]]"): (2, 0.1)}
    assert added_seconds(method, vanilla) == pytest.approx(0.9 - 0.4 + 0.1)
    more = {**vanilla, ("aten::mm", "[[8, 4]]"): (15, 2.0)}  # 5 extra calls at 2.0 / 15 each
    assert added_seconds(more, vanilla) == pytest.approx(5 * 2.0 / 15)
