"""The methods benchmark's targets table (benchmarks/methodbench/targets.py): read classes from the registered
configs against UniMem Table 1, and the verdicts computed from measured points."""

from __future__ import annotations

import io
import sys
from pathlib import Path

import pytest
from rich.console import Console

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from methodbench.measure import Memory, Point, Timing, method_config, model_config  # noqa: E402
from methodbench.random_model import PREFIX  # noqa: E402
from methodbench.report import scaling  # noqa: E402
from methodbench.targets import read_class, target, target_rows, targets_table  # noqa: E402

from unimem_bench.methods import METHODS  # noqa: E402

# UniMem Table 1's Reading column (../shared/PAPER-NOTES.md), with the project's additions classified by their
# readers: LongMem, Quest and InfLLM retrieve chunks by similarity; the KV-compression family evicts by score.
TABLE_1_READING = {
    "transformer_xl": "position", "longformer": "position", "streaming_llm": "position", "bigbird": "position",
    "longnet": "position", "poolingformer": "position", "longt5": "position",
    "memorizing_transformer": "similarity", "unimix": "similarity", "fot": "similarity", "unlimiformer": "similarity",
    "reformer": "similarity", "routing": "similarity", "knn_lm": "similarity", "trime": "similarity",
    "longmem": "similarity", "quest": "similarity", "infllm": "similarity",
}
NO_READ_BOUND = {"rmt", "autocompressor", "vanilla", "position_interpolation"}


@pytest.mark.parametrize("name", METHODS.names())
def test_every_registered_method_gets_its_table_1_read_class(name):
    config = method_config(name, model_config(PREFIX + "hidden=64,layers=4,heads=2,vocab=100"), 16, ())
    read = read_class(config)
    if name in TABLE_1_READING:
        assert read == TABLE_1_READING[name]
    elif name in NO_READ_BOUND:
        assert read in ("memory tokens (no read bound)", "no memory")
    else:  # every other method evicts by score and is bounded against its FIFO twin
        assert config.management.scored and read.startswith("eviction")


def point(name: str, length: int, us: float, ratios: tuple[float, float, float], fastest: float,
          state: int) -> Point:
    low, median, high = ratios
    timing = Timing(us, us, us / median, us / median, median, low, high, fastest)
    return Point(name, length, timing, Memory(0, state, state))


@pytest.mark.parametrize(("read", "ratio", "fastest", "verdict"), [
    ("position", 1.19, 1.25, "met"),
    ("position", 1.21, 1.18, "met by the fastest runs"),
    ("position", 1.21, 1.21, "not met"),
    ("similarity", 1.49, 1.6, "met"),
    ("similarity", 1.6, 1.55, "not met"),
    ("no memory", 3.0, 3.0, "-"),
])
def test_the_time_verdict_reads_the_median_then_the_fastest_runs(read, ratio, fastest, verdict):
    results = {("m", 16): point("m", 16, 100.0, (1.0, 1.0, 1.0), 1.0, 10),
               ("m", 64): point("m", 64, 100.0, (ratio - 0.1, ratio, ratio + 0.1), fastest, 10)}
    assert target(results, scaling(results, "m", [16, 64]), read, [16, 64]).time_verdict() == verdict


@pytest.mark.parametrize(("us_long", "ratio_long", "state_long", "verdict"), [
    (124.0, 1.0, 10, "met"),
    (130.0, 1.0, 10, "drift"),  # the time grew 1.3x, its ratio to vanilla did not: the machine slowed
    (130.0, 1.3, 10, "not met"),
    (130.0, 1.3, 12, "not met"),  # 1.2x more state: still full (a Clear All memory's fill varies with the length)
    (300.0, 3.0, 20, "memory grows"),  # Unlimiformer's memory doubles from 16K to 64K by design
])
def test_the_flat_verdict_applies_to_memories_full_at_the_shortest_length(us_long, ratio_long, state_long, verdict):
    results = {("m", 16): point("m", 16, 100.0, (1.0, 1.0, 1.0), 1.0, 10),
               ("m", 64): point("m", 64, us_long, (ratio_long,) * 3, ratio_long, state_long)}
    t = target(results, scaling(results, "m", [16, 64]), "position", [16, 64])
    assert t.flat == pytest.approx(us_long / 100.0)
    assert t.flat_verdict() == verdict
    metrics = {row[3]: row[4] for row in target_rows([t], 64)}
    assert metrics["flat_time_ratio"] == pytest.approx(us_long / 100.0)
    assert metrics.get("flat_met") == (None if verdict == "memory grows" else float(verdict in ("met", "drift")))


def test_the_table_and_rows_name_bound_and_verdicts():
    results = {("fot", n): point("fot", n, 250.0, (2.4, 2.5, 2.7), 2.45, 10) for n in (16, 64)}
    results |= {("vanilla", n): point("vanilla", n, 100.0, (0.98, 1.0, 1.02), 1.0, 0) for n in (16, 64)}
    rows = [target(results, scaling(results, name, [16, 64]), read, [16, 64])
            for name, read in (("fot", "similarity"), ("vanilla", "no memory"))]
    console = Console(file=io.StringIO(), width=200)
    console.print(targets_table(rows, [16, 64]))
    text = console.file.getvalue()
    assert "x2.50 (2.40-2.70)" in text and "<= 1.5x" in text and "not met" in text
    assert ("targets", "fot", 64, "bound_similarity", 1.5) in target_rows(rows, 64)
    assert ("targets", "fot", 64, "time_met", 0.0) in target_rows(rows, 64)
    assert not [r for r in target_rows(rows, 64) if r[1] == "vanilla" and r[3].startswith(("bound", "time"))]


@pytest.mark.slow
def test_bench_methods_writes_the_targets_of_every_method(tmp_path):
    """The whole benchmark on a tiny random model: the CSV carries the targets rows beside the timings."""
    import csv

    import bench_methods

    code = bench_methods.main(["--random-model", "hidden=64,layers=2,heads=2,vocab=100", "--segment-len", "16",
                               "--lengths", "32,64", "--repeats", "1", "--parts", "methods", "--skip-vanilla-row",
                               "--methods", "transformer_xl,fot", "--out", str(tmp_path)])
    assert code == 0
    with (tmp_path / "bench_methods.csv").open() as f:
        rows = [r for r in csv.DictReader(f) if r["benchmark"] == "targets"]
    bounds = {r["method"]: r["metric"] for r in rows if r["metric"].startswith("bound_")}
    assert bounds == {"transformer_xl": "bound_position", "fot": "bound_similarity"}
