"""Speed and memory of every method against vanilla, and top-k retrieval time (exact torch vs faiss Flat).

    python benchmarks/bench_methods.py [--model PATH] [--segment-len 256] [--lengths 4096,16384,32768,65536]
                                       [--methods all] [--repeats 3] [--out results/benchmarks] [--quick]

Every measurement runs in a fresh process that loads the model and warms up first. Timing: one process per
method alternates vanilla and the method over one random document at each length, so every ratio compares two
runs taken side by side. Memory: one process per (method, length) streams the document once and reports the peak
RSS increase and the bytes of the final memory state. See benchmarks/README.md for how to read the tables.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import ctypes
import dataclasses
import gc
import multiprocessing
import os
import resource
import statistics
import sys
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import torch
from rich.console import Console
from rich.table import Table
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, PretrainedConfig, PreTrainedModel
from transformers.utils import logging as hf_logging

from unimem_bench.harness.cli.app import USER_ERRORS
from unimem_bench.harness.cli.arguments import positive_int
from unimem_bench.harness.models.resolve import load_model, load_model_config, resolve_model, trained_context
from unimem_bench.methods import METHODS, MemoryLM, MethodContext, UniMemConfig
from unimem_bench.methods.config import Reading
from unimem_bench.methods.engine.memory import MemoryState
from unimem_bench.methods.engine.retrieval import FaissBank, topk_exact

DEFAULT_MODEL = Path(__file__).resolve().parents[1].parent / "shared" / "models" / "stories260K"
DEFAULT_LENGTHS = (4096, 16384, 32768, 65536)
QUICK_LENGTHS = (4096, 8192)
DEFAULT_MEMORY_SIZES = (8192, 16384, 32768, 65536)
QUICK_MEMORY_SIZES = (8192, 16384)
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

PRELOAD = ("torch", "faiss", "rich.table", "transformers.models.llama.modeling_llama", "unimem_bench.harness.cli",
           "unimem_bench.methods")
"""What the fork server imports once for every measuring process (the slow part of starting one)."""

M_MMAP_THRESHOLD = -3
"""glibc's mallopt parameter number (malloc.h)."""

T = TypeVar("T")


@dataclass(frozen=True)
class Job:
    """What a measuring process needs to rebuild the model and a method's config."""

    model: str | None
    """`--model` as given (HF folder, llama2.c .bin, hub id); None = the random tiny LLaMA."""
    method: str
    overrides: tuple[str, ...]
    segment_len: int
    threads: int


@dataclass(frozen=True)
class Timing:
    """Medians over repeats, per scored token."""

    us_per_token: float
    cpu_us_per_token: float
    vanilla_us_per_token: float
    """Vanilla timed in the same process, alternating with the method."""
    vanilla_cpu_us_per_token: float
    ratio: float
    """Median over repeats of method time / vanilla time of the same repeat (wall clock)."""


@dataclass(frozen=True)
class Memory:
    """One streaming run of a method in a fresh process, in bytes."""

    peak_rss_increase: int
    """Peak RSS over the RSS after model load and warm-up."""
    state_bytes: int
    """numel * element_size over the final memory state's tensors."""
    state_storage_bytes: int
    """The distinct storages behind those tensors (larger when a view keeps a bigger buffer alive)."""


@dataclass(frozen=True)
class Point:
    """Timing and memory of one method at one document length."""

    method: str
    length: int
    timing: Timing
    memory: Memory


@dataclass(frozen=True)
class RetrievalResult:
    """Top-k search over `size` memory keys for one segment's queries."""

    size: int
    torch_ms: float
    faiss_ms: float
    identical: float
    """Fraction of (row, head, query) whose k neighbour ids are the same set in both searches."""


# ---------------------------------------------------------------- model


def tiny_config() -> LlamaConfig:
    """A random LLaMA with stories260K's shape, used when ../shared is absent."""
    return LlamaConfig(hidden_size=64, intermediate_size=172, num_hidden_layers=5, num_attention_heads=8,
                       num_key_value_heads=4, vocab_size=512, max_position_embeddings=512, tie_word_embeddings=True,
                       rope_parameters={"rope_type": "default", "rope_theta": 10000.0})


def model_config(spec: str | None) -> PretrainedConfig:
    """The config of `--model` (no weights)."""
    return tiny_config() if spec is None else load_model_config(resolve_model(spec))


def load_llm(spec: str | None) -> PreTrainedModel:
    """fp32 weights on CPU, in eval mode; the tiny model is seeded, so every process builds the same one. No
    tokenizer is needed (documents are random ids), so a folder with weights and config.json is enough."""
    hf_logging.disable_progress_bar()
    if spec is None:
        torch.manual_seed(0)
        return LlamaForCausalLM(tiny_config()).eval()
    source = resolve_model(spec)
    if source.kind == "llama2c":
        return load_model(source, device=torch.device("cpu"), dtype=torch.float32)[0]
    return AutoModelForCausalLM.from_pretrained(source.location, dtype=torch.float32).eval()


def method_config(name: str, config: PretrainedConfig, segment_len: int, overrides: tuple[str, ...]) -> UniMemConfig:
    """The registered defaults for this model and segment length; overrides never touch vanilla (the baseline)."""
    ctx = MethodContext(n_layers=config.num_hidden_layers, segment_len=segment_len,
                        trained_context=trained_context(config))
    return METHODS.get(name).config(ctx, () if name == "vanilla" else overrides)


# ---------------------------------------------------------------- measurement helpers


def state_tensors(state: MemoryState) -> list[torch.Tensor]:
    """Every tensor the memory state holds: bank keys/values, pinned globals, RMT memory tokens."""
    names = ("keys", "values", "global_keys", "global_values")
    tensors = [getattr(layer, name) for layer in state.layers.values() for name in names]
    return [t for t in [*tensors, state.rmt] if t is not None]


def state_sizes(state: MemoryState) -> tuple[int, int]:
    """(bytes of the state's tensors, bytes of the distinct storages behind them).

    The second is larger when a state tensor is a view that keeps a bigger buffer alive."""
    tensors = state_tensors(state)
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(t.numel() * t.element_size() for t in tensors), sum(storages.values())


def _status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def _maxrss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def exact_rss_accounting() -> None:
    """Make RSS follow live memory (glibc only; elsewhere a no-op, and RSS keeps the allocator's slack).

    Every block over 64 KiB is mmap'ed, so free() returns it to the OS at once instead of glibc keeping it for
    reuse. Called first thing in memory processes only: timing processes keep glibc's defaults."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    libc.mallopt(M_MMAP_THRESHOLD, 64 * 1024)


def start_peak_rss() -> int:
    """The baseline of a peak-RSS measurement, in bytes.

    On Linux, the current RSS, with the kernel's high-water mark reset to it where allowed (clear_refs 5);
    elsewhere the process-lifetime ru_maxrss. Either way, a fresh process per point keeps earlier work out."""
    status = Path("/proc/self/status")
    if not status.exists():
        return _maxrss_bytes()
    # Where the reset is refused, the mark also covers load and warm-up, which a fresh process keeps small.
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")
    return _status_bytes("VmRSS")


def peak_rss() -> int:
    """The peak RSS in bytes (since `start_peak_rss` where it could reset the mark)."""
    return _status_bytes("VmHWM") if Path("/proc/self/status").exists() else _maxrss_bytes()


def set_threads(threads: int) -> None:
    """Intra-op threads for torch and faiss (OpenMP)."""
    import faiss

    torch.set_num_threads(threads)
    faiss.omp_set_num_threads(threads)


def random_doc(vocab: int, length: int) -> torch.Tensor:
    """`length` + 1 random token ids: scoring them scores exactly `length` tokens."""
    return torch.randint(0, vocab, (length + 1,), generator=torch.Generator().manual_seed(0))


def run_score(model: PreTrainedModel, config: UniMemConfig, segment_len: int, doc: torch.Tensor) -> tuple[float, float]:
    """Score one document with `MemoryLM.score`: (wall seconds, process CPU seconds). Hooking is not timed."""
    gc.collect()
    with MemoryLM(model, config, segment_len=segment_len) as lm:
        wall, cpu = time.perf_counter(), time.process_time()
        lm.score([doc])
        return time.perf_counter() - wall, time.process_time() - cpu


@torch.inference_mode()
def stream(model: PreTrainedModel, config: UniMemConfig, segment_len: int, doc: torch.Tensor) -> MemoryState:
    """Feed the tokens `score` feeds through `forward_segment`, dropping the logits; returns the final memory.

    The memory run uses this rather than `score`, whose per-token output (4 bytes a token) is not memory."""
    with MemoryLM(model, config, segment_len=segment_len) as lm:
        state = lm.new_state(1)
        ids = doc[:-1].unsqueeze(0)
        for start in range(0, ids.shape[1], lm.segment_len):
            lm.forward_segment(state, ids[:, start:start + lm.segment_len], start)
        return state


def warm_up_doc(doc: torch.Tensor, segment_len: int, config: UniMemConfig) -> torch.Tensor:
    """Two of the method's segments, so the memory-reading path runs once before anything is measured."""
    return doc[:2 * segment_len * config.position.segment_factor + 1]


def configs(job: Job, model: PreTrainedModel) -> tuple[UniMemConfig, UniMemConfig]:
    """(vanilla, the job's method) for this model."""
    return (method_config("vanilla", model.config, job.segment_len, ()),
            method_config(job.method, model.config, job.segment_len, job.overrides))


def time_method(job: Job, lengths: tuple[int, ...], repeats: int) -> dict[int, Timing]:
    """Runs in a fresh process: after a warm-up, per length, `repeats` (method, vanilla) pairs in alternating
    order, so each ratio compares two runs taken side by side."""
    set_threads(job.threads)
    model = load_llm(job.model)
    vanilla, method = configs(job, model)
    doc = random_doc(model.config.vocab_size, max(lengths))
    for config in (vanilla, method):
        run_score(model, config, job.segment_len, warm_up_doc(doc, job.segment_len, config))
    timings = {}
    for n in lengths:
        runs: dict[str, list[tuple[float, float]]] = {"method": [], "vanilla": []}
        for r in range(repeats):
            order = [("method", method), ("vanilla", vanilla)]
            for role, config in order if r % 2 == 0 else order[::-1]:
                runs[role].append(run_score(model, config, job.segment_len, doc[:n + 1]))
        per_token = 1e6 / n
        timings[n] = Timing(
            us_per_token=statistics.median(w for w, _ in runs["method"]) * per_token,
            cpu_us_per_token=statistics.median(c for _, c in runs["method"]) * per_token,
            vanilla_us_per_token=statistics.median(w for w, _ in runs["vanilla"]) * per_token,
            vanilla_cpu_us_per_token=statistics.median(c for _, c in runs["vanilla"]) * per_token,
            ratio=statistics.median(m[0] / v[0] for m, v in zip(runs["method"], runs["vanilla"], strict=True)),
        )
    return timings


def measure_memory(job: Job, length: int) -> Memory:
    """Runs in a fresh process: load, warm up, then stream one document and read the peak RSS and the state."""
    exact_rss_accounting()
    set_threads(job.threads)
    model = load_llm(job.model)
    _, method = configs(job, model)
    doc = random_doc(model.config.vocab_size, length)
    stream(model, method, job.segment_len, warm_up_doc(doc, job.segment_len, method))
    gc.collect()
    base = start_peak_rss()
    state = stream(model, method, job.segment_len, doc)
    peak = peak_rss() - base
    return Memory(peak, *state_sizes(state))


def median_time(fn: Callable[[], T], repeats: int) -> tuple[float, T]:
    """(median seconds over `repeats` calls after one warm-up call, the last result)."""
    result = fn()
    times = []
    for _ in range(repeats):
        gc.collect()
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def bench_retrieval(config: PretrainedConfig, segment_len: int, sizes: Iterable[int], k: int,
                    repeats: int) -> list[RetrievalResult]:
    """topk_exact vs FaissBank (faiss-flat) for one segment of queries of one injected layer, as the engine
    searches them: [1, kv_heads, group * segment_len, head_dim]. Indexes are built outside the timed region."""
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    generator = torch.Generator().manual_seed(0)
    queries = torch.randn(1, kv_heads, heads // kv_heads * segment_len, head_dim, generator=generator)
    results = []
    for size in sizes:
        keys = torch.randn(1, kv_heads, size, head_dim, generator=generator)
        bank = FaissBank(Reading(topk=k, index="faiss-flat"), capacity=size)
        bank.rebuild(keys, first_id=0)
        torch_s, (_, torch_idx) = median_time(lambda keys=keys: topk_exact(queries, keys, k), repeats)
        faiss_s, (_, faiss_idx) = median_time(lambda bank=bank, size=size: bank.search(queries, k, 0, size), repeats)
        same = (torch_idx.sort(-1).values == faiss_idx.sort(-1).values).all(-1)
        results.append(RetrievalResult(size, torch_s * 1e3, faiss_s * 1e3, same.float().mean().item()))
    return results


# ---------------------------------------------------------------- reporting


def fmt_len(n: int) -> str:
    return f"{n // 1024}K" if n % 1024 == 0 else str(n)


def fmt_bytes(n: float) -> str:
    for unit, scale in (("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n:.0f} B"


def fmt_ratio(x: float | None) -> str:
    return "n/a" if x is None else f"x{x:.2f}"


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
            cells.append(f"{t.us_per_token:.1f} µs  {fmt_ratio(t.ratio)}\n"
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
    renamed = {"ratio": "ratio_vs_vanilla", "peak_rss_increase": "peak_rss_increase_bytes"}
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


def int_list(text: str) -> list[int]:
    return [positive_int(part) for part in text.split(",") if part.strip()]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None,
                        help=f"HF folder, llama2.c .bin or hub id (default: {DEFAULT_MODEL}, else a random tiny LLaMA)")
    parser.add_argument("--segment-len", type=positive_int, default=256, help="tokens per segment (default: 256)")
    parser.add_argument("--lengths", type=int_list, default=None,
                        help="document lengths in tokens (default: 4096,16384,32768,65536)")
    parser.add_argument("--methods", default="all", help="`all` or a comma list; vanilla is always run")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                        help="config override for every method but vanilla, e.g. --set reading.index=faiss-flat")
    parser.add_argument("--repeats", type=positive_int, default=None, help="timed runs per point (default: 3)")
    parser.add_argument("--memory-sizes", type=int_list, default=None,
                        help="memory keys for the top-k benchmark (default: 8192,16384,32768,65536)")
    parser.add_argument("--topk", type=positive_int, default=32, help="k of the top-k benchmark (default: 32)")
    parser.add_argument("--threads", type=positive_int, default=1,
                        help="torch/faiss threads (default: 1; a tiny model only loses to intra-op threading)")
    parser.add_argument("--out", type=Path, default=Path("results/benchmarks"), help="folder for bench_methods.csv")
    parser.add_argument("--quick", action="store_true",
                        help="smoke test: lengths 4096,8192, one repeat, memory sizes 8192,16384")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    console = Console()
    if not console.is_terminal:
        console.width = max(console.width, 160)
    lengths = sorted(set(args.lengths or (QUICK_LENGTHS if args.quick else DEFAULT_LENGTHS)))
    sizes = sorted(set(args.memory_sizes or (QUICK_MEMORY_SIZES if args.quick else DEFAULT_MEMORY_SIZES)))
    repeats = args.repeats or (1 if args.quick else 3)
    spec = args.model
    if spec is None and (DEFAULT_MODEL / "config.json").exists():
        spec = str(DEFAULT_MODEL)
    elif spec is None:
        console.print(f"[yellow]note: {DEFAULT_MODEL} not found; using a random tiny LLaMA of the same shape "
                      "(times and memory stand, perplexity would not)[/yellow]")
    picked = METHODS.names() if args.methods == "all" else [m.strip() for m in args.methods.split(",") if m.strip()]
    methods = ["vanilla", *[m for m in picked if m != "vanilla"]]
    overrides = tuple(args.overrides)
    try:
        config = model_config(spec)
        for name in methods:  # a bad method name, override or model fails here in one line, before any process
            method_config(name, config, args.segment_len, overrides)
    except USER_ERRORS as err:
        console.print(f"[red]error:[/red] {err}")
        return 2
    set_threads(args.threads)
    load_start = os.getloadavg()[0]
    console.print(f"model {spec or 'random tiny LLaMA'} | segment {args.segment_len} | lengths "
                  f"{', '.join(map(fmt_len, lengths))} | repeats {repeats} | threads {args.threads} | "
                  f"load average {load_start:.2f} (other processes make timings noisy; ratios are same-process)")

    started = time.perf_counter()

    def log(text: str) -> None:
        console.log(f"{text}  [{time.perf_counter() - started:.0f} s]")

    results: dict[tuple[str, int], Point] = {}
    # One task per fresh process, forked from a server that imported the libraries but never ran a model (spawn
    # where there is no fork): nothing carries over between measurements, and imports are paid once.
    context = multiprocessing.get_context("forkserver" if "forkserver" in multiprocessing.get_all_start_methods()
                                          else "spawn")
    if context.get_start_method() == "forkserver":
        context.set_forkserver_preload(list(PRELOAD))
    with ProcessPoolExecutor(max_workers=1, mp_context=context, max_tasks_per_child=1) as pool:
        for name in methods:
            job = Job(spec, name, overrides, args.segment_len, args.threads)
            timings = pool.submit(time_method, job, tuple(lengths), repeats).result()
            log(f"{name:>24} time/token: " + ", ".join(
                f"{fmt_len(n)} {t.us_per_token:.1f} µs ({fmt_ratio(t.ratio)} vanilla)" for n, t in timings.items()))
            for n in lengths:
                memory = pool.submit(measure_memory, job, n).result()
                results[name, n] = Point(name, n, timings[n], memory)
                log(f"{name:>24} {fmt_len(n):>4}: peak +{fmt_bytes(memory.peak_rss_increase)}, "
                    f"state {fmt_bytes(memory.state_bytes)}")
    retrieval = bench_retrieval(config, args.segment_len, sizes, args.topk, repeats)
    load_end = os.getloadavg()[0]

    scalings = [scaling(results, name, lengths) for name in methods]
    console.print(methods_table(results, methods, lengths, args.segment_len))
    console.print(scaling_table(scalings, lengths))
    kv_heads = config.num_key_value_heads
    queries = (f"{kv_heads} KV heads x {config.num_attention_heads // kv_heads * args.segment_len} queries, "
               f"median of {repeats}")
    console.print(retrieval_table(retrieval, queries, args.topk))
    run = {"segment_len": args.segment_len, "repeats": repeats, "threads": args.threads,
           "load_average_start": load_start, "load_average_end": load_end,
           "seconds": time.perf_counter() - started}
    out = args.out / "bench_methods.csv"
    write_csv(out, csv_rows(list(results.values()), scalings, retrieval, run, max(lengths)))
    console.print(f"load average at the end {load_end:.2f}; wrote {out} in {run['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
