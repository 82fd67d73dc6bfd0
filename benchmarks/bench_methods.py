"""Speed and memory of every method against vanilla, and top-k retrieval time (exact torch vs faiss Flat).

    python benchmarks/bench_methods.py [--model PATH | --random-model 62m] [--segment-len 256]
                                       [--lengths 4096,16384,32768,65536] [--methods all] [--repeats 3]
                                       [--parts methods,topk,eviction] [--budget 0.25] [--out results/benchmarks]
                                       [--quick]

Every measurement runs in a fresh process that loads the model and warms up first. Timing: one process per
method alternates vanilla and the method over one random document at each length, so every ratio compares two
runs taken side by side. Memory: one process per (method, length) streams the document once and reports the peak
RSS increase and the bytes of the final memory state. `--parts eviction` times each score-based eviction method
against the FIFO window of the same size, and streams it at `--budget` to compare its peak RSS with the full cache's
KV bytes. See benchmarks/README.md for how to read the tables.
"""


import argparse
import os
import sys
import time
from pathlib import Path

from methodbench.eviction import EvictionResult, eviction_rows, eviction_table, run_eviction
from methodbench.measure import (
    PRELOAD,
    Job,
    Point,
    bench_retrieval,
    measure_memory,
    method_config,
    model_config,
    set_threads,
    time_method,
)
from methodbench.pool import measuring_pool
from methodbench.random_model import PREFIX, describe
from methodbench.report import (
    csv_rows,
    fmt_bytes,
    fmt_len,
    fmt_ratio,
    methods_table,
    retrieval_table,
    scaling,
    scaling_table,
    write_csv,
)
from methodbench.targets import read_class, target, target_rows, targets_table
from rich.console import Console

from unimem_bench.harness.cli.app import USER_ERRORS
from unimem_bench.harness.cli.arguments import positive_int
from unimem_bench.methods import METHODS

DEFAULT_MODEL = Path(__file__).resolve().parents[1].parent / "shared" / "models" / "stories260K"
DEFAULT_LENGTHS = (4096, 16384, 32768, 65536)
QUICK_LENGTHS = (4096, 8192)
DEFAULT_MEMORY_SIZES = (8192, 16384, 32768, 65536)
QUICK_MEMORY_SIZES = (8192, 16384)
PARTS = ("methods", "topk", "eviction")


def int_list(text: str) -> list[int]:
    return [positive_int(part) for part in text.split(",") if part.strip()]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None,
                        help=f"HF folder, llama2.c .bin or hub id (default: {DEFAULT_MODEL}, else a random tiny LLaMA)")
    parser.add_argument("--random-model", default=None, metavar="SPEC",
                        help="a seeded random LLaMA instead of --model: `62m`, or "
                             "hidden=512,layers=8,heads=8,kv_heads=8[,intermediate=..,vocab=..,context=..]")
    parser.add_argument("--segment-len", type=positive_int, default=256, help="tokens per segment (default: 256)")
    parser.add_argument("--lengths", type=int_list, default=None,
                        help="document lengths in tokens (default: 4096,16384,32768,65536)")
    parser.add_argument("--methods", default="all", help="`all` or a comma list; vanilla is always run")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                        help="config override for every method but vanilla, e.g. --set reading.index=faiss-flat")
    parser.add_argument("--parts", default="methods,topk",
                        help="comma list of methods (time and memory vs vanilla), topk (torch vs faiss), eviction "
                             "(score-based eviction vs the same-size FIFO, peak RSS at --budget); default "
                             "methods,topk")
    parser.add_argument("--skip-vanilla-row", action="store_true",
                        help="do not time vanilla against itself (its noise-floor row); every method is still timed "
                             "beside vanilla in its own process")
    parser.add_argument("--budget", type=float, default=0.25,
                        help="management.budget of the eviction part's peak-RSS run (default 0.25: 4x compression)")
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
    parts = {p.strip() for p in args.parts.split(",") if p.strip()}
    if not parts or parts - set(PARTS):
        console.print(f"[red]error:[/red] --parts {args.parts!r} must name some of {', '.join(PARTS)}")
        return 2
    if args.random_model is not None and args.model is not None:
        console.print("[red]error:[/red] give --model or --random-model, not both")
        return 2
    spec = args.model if args.random_model is None else PREFIX + args.random_model
    if spec is None and (DEFAULT_MODEL / "config.json").exists():
        spec = str(DEFAULT_MODEL)
    elif spec is None:
        console.print(f"[yellow]note: {DEFAULT_MODEL} not found; using a random tiny LLaMA of the same shape "
                      "(times and memory stand, perplexity would not)[/yellow]")
    picked = METHODS.names() if args.methods == "all" else [m.strip() for m in args.methods.split(",") if m.strip()]
    methods = [*([] if args.skip_vanilla_row else ["vanilla"]), *[m for m in picked if m != "vanilla"]]
    overrides = tuple(args.overrides)
    try:
        config = model_config(spec)
        # a bad method name, override or model fails here in one line, before any process
        method_configs = {name: method_config(name, config, args.segment_len, overrides) for name in methods}
        evicting = [name for name in methods if method_configs[name].management.scored]
        if "eviction" in parts:
            for name in evicting:
                method_config(name, config, args.segment_len, (*overrides, f"management.budget={args.budget}"))
    except USER_ERRORS as err:
        console.print(f"[red]error:[/red] {err}")
        return 2
    if "eviction" in parts and not evicting:
        console.print("[red]error:[/red] --parts eviction needs a score-based eviction method in --methods "
                      "(h2o, tova, snapkv, knorm)")
        return 2
    set_threads(args.threads)
    load_start = os.getloadavg()[0]
    name = describe(args.random_model) if args.random_model is not None else spec or "random tiny LLaMA"
    console.print(f"model {name} | segment {args.segment_len} | lengths "
                  f"{', '.join(map(fmt_len, lengths))} | repeats {repeats} | threads {args.threads} | "
                  f"load average {load_start:.2f} (other processes make timings noisy; ratios are same-process)")

    started = time.perf_counter()

    def log(text: str) -> None:
        console.log(f"{text}  [{time.perf_counter() - started:.0f} s]")

    results: dict[tuple[str, int], Point] = {}
    evictions: list[EvictionResult] = []
    out = args.out / "bench_methods.csv"

    def run_record() -> dict[str, float]:
        return {"segment_len": args.segment_len, "repeats": repeats, "threads": args.threads,
                "load_average_start": load_start, "load_average_end": os.getloadavg()[0],
                "seconds": time.perf_counter() - started}

    with measuring_pool(PRELOAD) as pool:
        for name in methods if "methods" in parts else []:
            job = Job(spec, name, overrides, args.segment_len, args.threads)
            timings = pool.submit(time_method, job, tuple(lengths), repeats).result()
            log(f"{name:>24} time/token: " + ", ".join(
                f"{fmt_len(n)} {t.us_per_token:.1f} µs ({fmt_ratio(t.ratio)} vanilla)" for n, t in timings.items()))
            for n in lengths:
                memory = pool.submit(measure_memory, job, n).result()
                results[name, n] = Point(name, n, timings[n], memory)
                log(f"{name:>24} {fmt_len(n):>4}: peak +{fmt_bytes(memory.peak_rss_increase)}, "
                    f"state {fmt_bytes(memory.state_bytes)}")
            # Every finished method is on disk at once: a run of an hour that fails late keeps what it measured.
            write_csv(out, csv_rows(list(results.values()), [], [], run_record(), max(lengths)))
        for name in evicting if "eviction" in parts else []:
            job = Job(spec, name, overrides, args.segment_len, args.threads)
            evictions.append(run_eviction(pool, job, lengths, repeats, args.budget, config, log))
    retrieval = bench_retrieval(config, args.segment_len, sizes, args.topk, repeats) if "topk" in parts else []

    scalings = [scaling(results, name, lengths) for name in methods] if "methods" in parts else []
    targets = [target(results, s, read_class(method_configs[s.method]), lengths) for s in scalings]
    if "methods" in parts:
        console.print(methods_table(results, methods, lengths, args.segment_len))
        console.print(scaling_table(scalings, lengths))
        console.print(targets_table(targets, lengths))
    if "topk" in parts:
        kv_heads = config.num_key_value_heads
        queries = (f"{kv_heads} KV heads x {config.num_attention_heads // kv_heads * args.segment_len} queries, "
                   f"median of {repeats}")
        console.print(retrieval_table(retrieval, queries, args.topk))
    if evictions:
        console.print(eviction_table(evictions, lengths))
    run = run_record()
    rows = (csv_rows(list(results.values()), scalings, retrieval, run, max(lengths)) + eviction_rows(evictions)
            + target_rows(targets, max(lengths)))
    write_csv(out, rows)
    console.print(f"load average at the end {run['load_average_end']:.2f}; wrote {out} in {run['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
