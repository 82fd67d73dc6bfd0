"""Reading the measurements: the methods table, the scaling verdicts against the acceptance bounds, the retrieval
table and the CSV."""


import csv
import dataclasses
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from rich.table import Table

from methodbench.measure import Point, RetrievalResult

MID_LENGTH = 32768
"""The second reference length of the scaling table: methods whose memory fills late are compared with it."""

# The acceptance bounds of the scaling table. Memory of these methods is full after a segment or two, so their
# per-token cost must not grow past the shortest length...
FLAT_FROM_SHORTEST = ("transformer_xl", "longformer", "rmt")
# ...and these fill a 10-segment memory, so the comparison starts at 32K.
FLAT_FROM_MID = ("memorizing_transformer", "unimix")
SCALING_LIMIT = 1.25
XL_VS_VANILLA_LIMIT = 1.5
PEAK_RESOLUTION = 2**20
"""Peak-memory growth below 1 MiB passes whatever its ratio: the kernel's RSS counters are approximate to a few
hundred KiB, and a tiny model's peak is itself about 1 MiB."""


def fmt_len(n: int) -> str:
    return f"{n // 1024}K" if n % 1024 == 0 else str(n)


def fmt_bytes(n: float) -> str:
    for unit, scale in (("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n:.0f} B"


def fmt_ratio(x: float | None) -> str:
    return "n/a" if x is None else f"x{x:.2f}"


def fmt_spread(low: float, high: float) -> str:
    """` (1.15-1.27)`: the lowest and highest per-repeat ratio, or nothing where they are equal (one repeat)."""
    return f" ({low:.2f}-{high:.2f})" if high > low else ""


def methods_table(results: dict[tuple[str, int], Point], methods: list[str], lengths: list[int],
                  segment_len: int) -> Table:
    table = Table(title=f"Per-token time and peak memory (segment {segment_len}); ratio = method / vanilla, "
                        "same process", show_lines=True)
    table.add_column("method", no_wrap=True)
    for n in lengths:
        table.add_column(fmt_len(n), justify="right")
    for name in methods:
        cells = []
        for n in lengths:
            t, m = results[name, n].timing, results[name, n].memory
            cells.append(f"{t.us_per_token:.1f} µs  {fmt_ratio(t.ratio)}{fmt_spread(t.ratio_low, t.ratio_high)}\n"
                         f"fastest runs {fmt_ratio(t.fastest_ratio)}\n"
                         f"peak +{fmt_bytes(m.peak_rss_increase)}\nstate {fmt_bytes(m.state_bytes)}")
        table.add_row(name, *cells)
    return table


@dataclass(frozen=True)
class Growth:
    """A figure at the longest length against the same figure at a shorter reference length."""

    ratio: float
    delta: float

    def ok(self, limit: float, slack: float = 0.0) -> bool:
        """Within `limit` times the reference, or within `slack` of it in absolute terms."""
        return self.ratio <= limit or self.delta <= slack


def growths(values: dict[int, float], refs: Iterable[int]) -> dict[int, Growth]:
    """values at the longest length vs at each reference length that was measured and is shorter."""
    top = max(values)
    return {ref: Growth(values[top] / values[ref], values[top] - values[ref])
            for ref in refs if ref != top and values.get(ref, 0) > 0}


@dataclass(frozen=True)
class Scaling:
    """One method's growth to the longest length from the shortest and from 32K (keys: reference lengths that
    were run), and its worst ratio to vanilla over all lengths."""

    method: str
    time: dict[int, Growth]
    relative: dict[int, Growth]
    """Growth of the ratio to vanilla: per-token time with the machine's drift between lengths divided out."""
    peak: dict[int, Growth]
    worst_vs_vanilla: float


def scaling(results: dict[tuple[str, int], Point], name: str, lengths: list[int]) -> Scaling:
    points = {n: results[name, n] for n in lengths}
    refs = (min(lengths), MID_LENGTH)
    return Scaling(
        name,
        time=growths({n: p.timing.us_per_token for n, p in points.items()}, refs),
        relative=growths({n: p.timing.ratio for n, p in points.items()}, refs),
        peak=growths({n: float(p.memory.peak_rss_increase) for n, p in points.items()}, refs),
        worst_vs_vanilla=max(p.timing.ratio for p in points.values()),
    )


def verdict(s: Scaling, shortest: int) -> str:
    """The acceptance bounds that apply to this method: ok, FAIL, n/a (a length was not run), or drift (the
    per-token time grew past the bound but its ratio to vanilla did not: the machine slowed, not the method)."""
    checks: list[tuple[str, str]] = []
    for ref, bounded in ((shortest, FLAT_FROM_SHORTEST), (MID_LENGTH, FLAT_FROM_MID)):
        if s.method not in bounded:
            continue
        bound = f"<= {SCALING_LIMIT:g}x {fmt_len(ref)}"
        time, relative, peak = s.time.get(ref), s.relative.get(ref), s.peak.get(ref)
        if time is None or relative is None or peak is None:
            checks += [(f"time {bound}", "n/a"), (f"peak {bound}", "n/a")]
            continue
        time_mark = "ok" if time.ok(SCALING_LIMIT) else "drift" if relative.ok(SCALING_LIMIT) else "FAIL"
        checks += [(f"time {bound}", time_mark),
                   (f"peak {bound}", "ok" if peak.ok(SCALING_LIMIT, PEAK_RESOLUTION) else "FAIL")]
    if s.method == "transformer_xl":
        checks.append((f"time <= {XL_VS_VANILLA_LIMIT:g}x vanilla",
                       "ok" if s.worst_vs_vanilla <= XL_VS_VANILLA_LIMIT else "FAIL"))
    colours = {"ok": "green", "drift": "yellow", "FAIL": "red", "n/a": "default"}
    return "\n".join(f"{label}: [{colours[mark]}]{mark}[/]" for label, mark in checks) or "-"


def time_cell(s: Scaling, ref: int) -> str:
    """`x1.35` over `vs vanilla x1.03`: the raw growth, and the growth of the ratio to vanilla."""
    if ref not in s.time:
        return "n/a"
    return f"{fmt_ratio(s.time[ref].ratio)}\nvs vanilla {fmt_ratio(s.relative[ref].ratio)}"


def peak_cell(s: Scaling, ref: int) -> str:
    """`x1.30 (+312.0 KiB)`."""
    if ref not in s.peak:
        return "n/a"
    g = s.peak[ref]
    return f"{fmt_ratio(g.ratio)} ({'+' if g.delta >= 0 else '-'}{fmt_bytes(abs(g.delta))})"


def scaling_table(rows: list[Scaling], lengths: list[int]) -> Table:
    top, short, mid = max(lengths), min(lengths), MID_LENGTH
    table = Table(title=f"Growth with document length: the {fmt_len(top)} figure over the {fmt_len(short)} and "
                        f"{fmt_len(mid)} ones", show_lines=True)
    table.add_column("method", no_wrap=True)
    for header in (f"time {fmt_len(top)}/{fmt_len(short)}", f"time {fmt_len(top)}/{fmt_len(mid)}",
                   f"peak {fmt_len(top)}/{fmt_len(short)}", f"peak {fmt_len(top)}/{fmt_len(mid)}",
                   "worst time vs vanilla", "acceptance"):
        table.add_column(header, justify="right")
    for s in rows:
        table.add_row(s.method, time_cell(s, short), time_cell(s, mid), peak_cell(s, short), peak_cell(s, mid),
                      fmt_ratio(s.worst_vs_vanilla), verdict(s, short))
    return table


def retrieval_table(rows: list[RetrievalResult], queries: str, k: int) -> Table:
    table = Table(title=f"Top-{k} retrieval for one segment of queries ({queries}): exact torch vs faiss Flat")
    for header in ("memory keys", "torch ms", "faiss ms", "faiss / torch", "identical neighbours"):
        table.add_column(header, justify="right")
    for r in rows:
        table.add_row(fmt_len(r.size), f"{r.torch_ms:.1f}", f"{r.faiss_ms:.1f}", fmt_ratio(r.faiss_ms / r.torch_ms),
                      f"{r.identical:.2%}")
    return table


def csv_rows(points: list[Point], scalings: list[Scaling], retrieval: list[RetrievalResult], run: dict[str, float],
             longest: int) -> list[tuple[str, str, int | str, str, float]]:
    """Tidy rows: (benchmark, method, length, metric, value)."""
    rows: list[tuple[str, str, int | str, str, float]] = [("run", "", "", k, v) for k, v in run.items()]
    renamed = {"ratio": "ratio_vs_vanilla", "ratio_low": "ratio_vs_vanilla_low", "ratio_high": "ratio_vs_vanilla_high",
               "fastest_ratio": "ratio_vs_vanilla_fastest_runs", "peak_rss_increase": "peak_rss_increase_bytes"}
    for p in points:
        for part in (p.timing, p.memory):
            for f in dataclasses.fields(part):
                rows.append(("methods", p.method, p.length, renamed.get(f.name, f.name), getattr(part, f.name)))
    for s in scalings:
        rows.append(("scaling", s.method, longest, "worst_ratio_vs_vanilla", s.worst_vs_vanilla))
        for kind, table in (("time", s.time), ("relative_time", s.relative), ("peak", s.peak)):
            for ref, g in table.items():
                rows.append(("scaling", s.method, longest, f"{kind}_ratio_vs_{ref}", g.ratio))
        for ref, g in s.time.items():
            rows.append(("scaling", s.method, longest, f"time_growth_us_per_token_vs_{ref}", g.delta))
        for ref, g in s.peak.items():
            rows.append(("scaling", s.method, longest, f"peak_growth_bytes_vs_{ref}", g.delta))
    for r in retrieval:
        rows.append(("topk", "torch", r.size, "ms_per_search", r.torch_ms))
        rows.append(("topk", "faiss-flat", r.size, "ms_per_search", r.faiss_ms))
        rows.append(("topk", "faiss-flat", r.size, "ratio_vs_torch", r.faiss_ms / r.torch_ms))
        rows.append(("topk", "faiss-flat", r.size, "identical_fraction", r.identical))
    return rows


def write_csv(path: Path, rows: list[tuple[str, str, int | str, str, float]]) -> None:
    """Write atomically (a partial file never replaces a good one)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".csv.tmp")
    with tmp.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(("benchmark", "method", "length", "metric", "value"))
        writer.writerows(rows)
    os.replace(tmp, path)


# ---------------------------------------------------------------- CLI


