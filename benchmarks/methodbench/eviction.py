"""Eviction policies against FIFO at the same budget, and their peak RSS under a compression budget against the
full cache's KV bytes (the KV-cache compression targets: <= 1.5x FIFO's per-token time, flat with length, peak RSS
at 4x compression <= 0.4x the full cache's KV bytes)."""


import dataclasses
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass

from rich.table import Table
from transformers import PretrainedConfig

from methodbench.measure import Job, Memory, Timing, measure_memory, time_method
from methodbench.report import fmt_bytes, fmt_len, fmt_ratio, fmt_spread

VS_FIFO_LIMIT = 1.5
"""Per-token time of an eviction policy over the same-size FIFO window's, at the longest length."""
FLAT_LIMIT = 1.25
"""Per-token time (as a ratio to FIFO) at the longest length over the same at the shortest."""
PEAK_VS_FULL_LIMIT = 0.4
"""Peak RSS increase at the budget over the full cache's KV bytes at the longest length."""


@dataclass(frozen=True)
class EvictionResult:
    """One eviction policy: its timings against its FIFO twin per length, and its peak at the budget."""

    method: str
    timings: dict[int, Timing]
    """Per length; the `vanilla_*` fields hold the FIFO twin's figures."""
    budget: float
    memory: Memory
    """The streaming run at the longest length with management.budget=`budget`."""
    full_kv_bytes: int
    """Keys and values of every token at every layer at the longest length (what a full cache holds)."""


def full_kv_bytes(config: PretrainedConfig, tokens: int, bytes_per_value: int = 4) -> int:
    """Bytes of an uncompressed KV cache of `tokens` tokens: keys and values at every layer and KV head."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return 2 * tokens * config.num_hidden_layers * config.num_key_value_heads * head_dim * bytes_per_value


def run_eviction(pool: Executor, job: Job, lengths: list[int], repeats: int, budget: float,
                 config: PretrainedConfig, log: Callable[[str], None]) -> EvictionResult:
    """Time the job's method against its FIFO twin (fresh process), then stream the longest document at `budget`
    (fresh process)."""
    vs_fifo = dataclasses.replace(job, baseline="fifo")
    timings = pool.submit(time_method, vs_fifo, tuple(lengths), repeats).result()
    log(f"{job.method:>24} vs FIFO: " + ", ".join(
        f"{fmt_len(n)} {t.us_per_token:.1f} µs ({fmt_ratio(t.ratio)} FIFO)" for n, t in timings.items()))
    at_budget = dataclasses.replace(job, overrides=(*job.overrides, f"management.budget={budget}"))
    top = max(lengths)
    memory = pool.submit(measure_memory, at_budget, top).result()
    full = full_kv_bytes(config, top)
    log(f"{job.method:>24} budget {budget:g} at {fmt_len(top)}: peak +{fmt_bytes(memory.peak_rss_increase)} "
        f"(full KV {fmt_bytes(full)})")
    return EvictionResult(job.method, timings, budget, memory, full)


def mark(ok: bool) -> str:
    return "[green]ok[/]" if ok else "[red]FAIL[/]"


def eviction_table(results: list[EvictionResult], lengths: list[int]) -> Table:
    short, top = min(lengths), max(lengths)
    budget = results[0].budget if results else 0.0
    table = Table(title=f"Eviction vs the same-size FIFO window (same process), and peak RSS at "
                        f"management.budget={budget:g} vs the full cache's KV bytes at {fmt_len(top)}",
                  show_lines=True)
    table.add_column("method", no_wrap=True)
    for n in lengths:
        table.add_column(f"{fmt_len(n)} µs/token (FIFO)", justify="right")
    for header in (f"ratio {fmt_len(top)}/{fmt_len(short)}", "peak / full KV", "acceptance"):
        table.add_column(header, justify="right")
    for r in results:
        cells = [f"{r.timings[n].us_per_token:.1f} ({r.timings[n].vanilla_us_per_token:.1f})\n"
                 f"{fmt_ratio(r.timings[n].ratio)}{fmt_spread(r.timings[n].ratio_low, r.timings[n].ratio_high)}"
                 for n in lengths]
        growth = r.timings[top].ratio / r.timings[short].ratio
        peak = r.memory.peak_rss_increase / r.full_kv_bytes
        checks = (f"<= {VS_FIFO_LIMIT:g}x FIFO: {mark(r.timings[top].ratio <= VS_FIFO_LIMIT)}\n"
                  f"flat <= {FLAT_LIMIT:g}x: {mark(growth <= FLAT_LIMIT)}\n"
                  f"peak <= {PEAK_VS_FULL_LIMIT:g}x: {mark(peak <= PEAK_VS_FULL_LIMIT)}")
        table.add_row(r.method, *cells, fmt_ratio(growth),
                      f"{fmt_bytes(r.memory.peak_rss_increase)} / {fmt_bytes(r.full_kv_bytes)}\n{fmt_ratio(peak)}",
                      checks)
    return table


def eviction_rows(results: list[EvictionResult]) -> list[tuple[str, str, int | str, str, float]]:
    """CSV rows of benchmark `eviction`."""
    rows: list[tuple[str, str, int | str, str, float]] = []
    for r in results:
        for n, t in r.timings.items():
            rows += [("eviction", r.method, n, "us_per_token", t.us_per_token),
                     ("eviction", r.method, n, "fifo_us_per_token", t.vanilla_us_per_token),
                     ("eviction", r.method, n, "ratio_vs_fifo", t.ratio),
                     ("eviction", r.method, n, "ratio_vs_fifo_low", t.ratio_low),
                     ("eviction", r.method, n, "ratio_vs_fifo_high", t.ratio_high)]
        top = max(r.timings)
        rows += [("eviction", r.method, top, "budget", r.budget),
                 ("eviction", r.method, top, "budget_peak_rss_increase_bytes", r.memory.peak_rss_increase),
                 ("eviction", r.method, top, "budget_state_bytes", r.memory.state_bytes),
                 ("eviction", r.method, top, "full_kv_bytes", r.full_kv_bytes),
                 ("eviction", r.method, top, "peak_vs_full_kv", r.memory.peak_rss_increase / r.full_kv_bytes)]
    return rows
