"""The per-token targets of the methods benchmark, read off its measurements: each method's read class from its
config (UniMem Table 1's Reading column), its bound against vanilla at the longest length, and whether a memory
that is full by the shortest length keeps the per-token time flat.

Issue 13's targets: at 64K tokens, position reads <= 1.2x vanilla and similarity reads <= 1.5x; every memory-full
method flat from 16K to 64K (<= 1.25x). Score-based eviction is bounded against the same-size FIFO window instead
(`--parts eviction`), and memory tokens read whole (RMT, AutoCompressor: Table 1's "All") have no read bound.
"""


from dataclasses import dataclass

from rich.table import Table

from methodbench.measure import Point
from methodbench.report import Scaling, fmt_len, fmt_ratio, fmt_spread
from unimem_bench.methods.config import UniMemConfig

BOUNDS = {"position": 1.2, "similarity": 1.5}
"""Per-token time over vanilla's at the longest length, by read class."""
FLAT_BOUND = 1.25
"""Per-token time at the longest length over the shortest, for a memory already full at the shortest."""
FULL_STATE_GROWTH = 1.25
"""A memory whose state bytes grow less than this from the shortest length to the longest counts as full at the
shortest (a Clear All memory's fill at the last token varies a little with the length; Unlimiformer's doubles
from 16K to 64K by design, AutoCompressor's summaries grow until their cap)."""


def read_class(config: UniMemConfig) -> str:
    """`similarity` or `position` (Table 1's Reading; UniMix, both, counts as similarity), or why no bound
    against vanilla applies."""
    m, w, r = config.management, config.writing, config.reading
    if m.scored:
        return "eviction (bounded against FIFO)"
    if r.topk or r.lsh_buckets or r.clusters or r.output != "none":
        return "similarity"
    if m.size or w.pooled_tier:
        return "position"
    if w.memory_tokens:
        return "memory tokens (no read bound)"
    return "no memory"


@dataclass(frozen=True)
class Target:
    """One method against its bounds, at the longest length measured and against the shortest."""

    method: str
    read: str
    bound: float | None
    """The read class's bound at the longest length; None where none applies."""
    ratio: float
    low: float
    high: float
    fastest: float
    flat: float | None
    """Per-token time at the longest length over the shortest; None with one length."""
    flat_relative: float | None
    """The same growth of the ratio to vanilla (the machine's drift between lengths divided out)."""
    full: bool
    """The memory was full at the shortest length (its state grew less than `FULL_STATE_GROWTH` after it)."""

    def time_verdict(self) -> str:
        """`met` (median ratio within the bound), `met by the fastest runs` (only the fastest-runs ratio within:
        noise decides), `not met`, or `-`."""
        if self.bound is None:
            return "-"
        if self.ratio <= self.bound:
            return "met"
        return "met by the fastest runs" if self.fastest <= self.bound else "not met"

    def flat_verdict(self) -> str:
        """`met`, `drift` (the time grew, its ratio to vanilla did not: the machine slowed), `not met`, or why the
        bound does not apply."""
        if self.flat is None or self.flat_relative is None:
            return "-"
        if not self.full:
            return "memory grows"
        if self.flat <= FLAT_BOUND:
            return "met"
        return "drift" if self.flat_relative <= FLAT_BOUND else "not met"


def target(results: dict[tuple[str, int], Point], s: Scaling, read: str, lengths: list[int]) -> Target:
    """The method's `Target` from its points and its growth (`report.scaling`) from the shortest length."""
    top, short = max(lengths), min(lengths)
    first, last = results[s.method, short], results[s.method, top]
    time, relative = s.time.get(short), s.relative.get(short)
    return Target(s.method, read, BOUNDS.get(read), last.timing.ratio, last.timing.ratio_low, last.timing.ratio_high,
                  last.timing.fastest_ratio, None if time is None else time.ratio,
                  None if relative is None else relative.ratio,
                  last.memory.state_bytes <= FULL_STATE_GROWTH * first.memory.state_bytes)


def targets_table(rows: list[Target], lengths: list[int]) -> Table:
    top, short = fmt_len(max(lengths)), fmt_len(min(lengths))
    table = Table(title=f"Per-token targets: position reads <= {BOUNDS['position']:g}x vanilla, similarity reads <= "
                        f"{BOUNDS['similarity']:g}x at {top}; memory-full methods flat ({top}/{short} <= "
                        f"{FLAT_BOUND:g}x)", show_lines=True)
    for header in ("method", "read", "bound", f"{top} x vanilla", "fastest runs", "time target",
                   f"time {top}/{short}", "flat target"):
        table.add_column(header, justify="left" if header in ("method", "read") else "right")
    colours = {"met": "green", "met by the fastest runs": "yellow", "drift": "yellow", "not met": "red"}
    for t in rows:
        verdicts = [f"[{colours[v]}]{v}[/]" if v in colours else v for v in (t.time_verdict(), t.flat_verdict())]
        table.add_row(t.method, t.read, "-" if t.bound is None else f"<= {t.bound:g}x",
                      fmt_ratio(t.ratio) + fmt_spread(t.low, t.high), fmt_ratio(t.fastest), verdicts[0],
                      "n/a" if t.flat is None else fmt_ratio(t.flat), verdicts[1])
    return table


def target_rows(rows: list[Target], longest: int) -> list[tuple[str, str, int | str, str, float]]:
    """Tidy CSV rows: the bound (named by read class) and 1/0 verdicts, where they apply."""
    out: list[tuple[str, str, int | str, str, float]] = []
    for t in rows:
        if t.bound is not None:
            out += [("targets", t.method, longest, f"bound_{t.read}", t.bound),
                    ("targets", t.method, longest, "time_met", float(t.time_verdict() == "met")),
                    ("targets", t.method, longest, "time_met_by_fastest_runs", float(t.fastest <= t.bound))]
        if t.flat is not None:
            out.append(("targets", t.method, longest, "flat_time_ratio", t.flat))
        if t.flat is not None and t.full:
            out.append(("targets", t.method, longest, "flat_met", float(t.flat_verdict() in ("met", "drift"))))
    return out
