"""The native kernels against the matmul-and-numpy search and the PyTorch read, in one process: the search alone,
then inside methods' runs.

    python benchmarks/bench_native.py [--model PATH | --random-model 62m] [--methods fot,memorizing_transformer]
                                      [--length 16384] [--segment-len 128] [--repeats 4] [--threads 2]
    python benchmarks/bench_native.py --shapes 2x256x8192x40x32,2x256x1280x40x64 [--repeats 4] [--threads 1]

Part 1 times `retrieval.topk_exact` on each exact top-k method's own search shape (its KV heads, its queries a
segment, its full memory, its k) three ways, alternating: the numpy path (`UNIMEM_BENCH_FUSED_TOPK=0`), the fused
top-k kernel (`fused_topk`) on SIMD registers (`UNIMEM_BENCH_TILES=0`) and on AMX tiles where the CPU has them,
and checks that all give the same picks. Part 2 scores one random document per method five ways: vanilla; the
method on the numpy search and the PyTorch read (all kernels off); with the fused search on registers; with the
native read of the picked slots (`picked_read`) too; with the search on tiles too (the engine's default on CPU),
in alternating order `--repeats` times: medians of the per-token time and each variant's ratio to vanilla. All
run in this process, so the ratios compare runs taken side by side. `--shapes` times part 1 alone on given search
shapes (KV heads x query rows x slots x head dim x k), no model loaded.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
from methodbench.measure import PREFIX, load_llm, method_config, model_config, random_doc, run_score, set_threads

from unimem_bench.harness.cli.app import USER_ERRORS
from unimem_bench.methods.engine import fused_topk, native, picked_read
from unimem_bench.methods.engine.retrieval import topk_exact


def switched(search: bool, read: bool = False, tiles: bool = False) -> None:
    """The fused search, the native read and the search's AMX tiles on or off for what runs next."""
    os.environ[fused_topk.SWITCH_ENV] = "1" if search else "0"
    os.environ[picked_read.SWITCH_ENV] = "1" if read else "0"
    os.environ[fused_topk.TILES_ENV] = "1" if tiles else "0"


def search_shape(model: torch.nn.Module, name: str, segment_len: int) -> tuple[int, int, int, int, int]:
    """(KV heads, query rows a KV head, memory slots, head dim, k) of one memory layer's search at full memory."""
    config = model.config
    method = method_config(name, config, segment_len, ())
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return kv_heads, segment_len * heads // kv_heads, method.management.size, head_dim, method.reading.topk


def time_search(shape: tuple[int, int, int, int, int], repeats: int) -> tuple[dict[str, float], bool]:
    """Median ms of one search of `shape` on the numpy path, the kernel's SIMD registers and its AMX tiles
    (alternating runs), and whether all three give the same picks."""
    kv_heads, rows, slots, dim, k = shape
    g = torch.Generator().manual_seed(0)
    queries, keys = torch.randn(1, kv_heads, rows, dim, generator=g), torch.randn(1, kv_heads, slots, dim, generator=g)
    ways = {"numpy": (False, False), "registers": (True, False), "tiles": (True, True)}
    times: dict[str, list[float]] = {way: [] for way in ways}
    picks = {}
    for r in range(repeats * 5):
        for way, (search, tiles) in ways.items() if r % 2 == 0 else reversed(ways.items()):
            switched(search, tiles=tiles)
            start = time.perf_counter()
            picks[way] = topk_exact(queries, keys, k)[1]
            times[way].append(time.perf_counter() - start)
    same = all(torch.equal(picks["numpy"], found) for found in picks.values())
    return {way: statistics.median(t) * 1e3 for way, t in times.items()}, same


def time_shapes(shapes: str, repeats: int, threads: int) -> int:
    """Part 1 on the given search shapes (`--shapes`)."""
    try:
        parsed = [tuple(int(x) for x in shape.split("x")) for shape in shapes.split(",")]
    except ValueError:
        parsed = []
    if not parsed or any(len(shape) != 5 or min(shape) < 1 or shape[4] >= shape[2] for shape in parsed):
        print(f"bench_native: --shapes {shapes!r}: give HEADSxROWSxSLOTSxDIMxK, comma-separated, with K below SLOTS "
              "(e.g. 2x256x8192x40x32)", file=sys.stderr)
        return 2
    set_threads(threads)
    print(f"search alone, {threads} thread(s) (median of {5 * repeats} alternating runs)")
    for shape in parsed:
        ms, same = time_search(shape, repeats)  # type: ignore[arg-type]
        print(f"  [{shape[0]} KV heads x {shape[1]} queries x {shape[2]} slots, dim {shape[3]}, k {shape[4]}]: "
              f"numpy {ms['numpy']:.2f} ms, registers {ms['registers']:.2f} ms, tiles {ms['tiles']:.2f} ms "
              f"(x{ms['tiles'] / ms['registers']:.2f} registers), same picks: {same}")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="a model folder (default: the tiny random model)")
    parser.add_argument("--random-model", default="", help="a random LLaMA of real widths, e.g. 62m")
    parser.add_argument("--methods", default="fot,memorizing_transformer")
    parser.add_argument("--length", type=int, default=16384)
    parser.add_argument("--segment-len", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--shapes", default="", help="HEADSxROWSxSLOTSxDIMxK,...: part 1 alone on these shapes")
    args = parser.parse_args()
    if native.library() is None:
        print("bench_native: the kernels cannot be built here (no C compiler, or no SIMD): nothing to compare; "
              "install a C compiler (cc) with OpenMP", file=sys.stderr)
        return 2
    if args.shapes:
        return time_shapes(args.shapes, args.repeats, args.threads)
    spec = PREFIX + args.random_model if args.random_model else args.model
    names = args.methods.split(",")
    try:  # from the config alone, before any weights load
        config = model_config(spec)
        methods = {name: method_config(name, config, args.segment_len, ()) for name in names}
    except USER_ERRORS as err:
        print(f"bench_native: {err}", file=sys.stderr)
        return 2
    if unread := [name for name, m in methods.items() if not m.reading.topk]:
        print(f"bench_native: {', '.join(unread)} do not read memory by search (reading.topk is 0): choose from "
              "memorizing_transformer, unimix, fot, longmem, or a method with reading.chunk_size", file=sys.stderr)
        return 2
    set_threads(args.threads)
    model = load_llm(spec)
    # Part 1 times the exact token search; chunk reads and faiss indexes search otherwise.
    exact = [name for name, m in methods.items() if m.reading.index == "torch" and not m.reading.chunk_size]
    if exact:
        print(f"search alone (median of {5 * args.repeats} alternating runs)")
    for name in exact:
        shape = search_shape(model, name, args.segment_len)
        ms, same = time_search(shape, args.repeats)
        print(f"  {name:24s} [{shape[0]} KV heads x {shape[1]} queries x {shape[2]} slots, dim {shape[3]}, "
              f"k {shape[4]}]: numpy {ms['numpy']:.2f} ms, registers {ms['registers']:.2f} ms "
              f"(x{ms['registers'] / ms['numpy']:.2f}), tiles {ms['tiles']:.2f} ms (x{ms['tiles'] / ms['numpy']:.2f}"
              f"{'' if native.library().tiles_usable() else ': no AMX here, the registers ran'}), "
              f"same picks: {same}")
    doc = random_doc(model.config.vocab_size, args.length)
    vanilla = method_config("vanilla", model.config, args.segment_len, ())
    print(f"\nper-token time, {args.length} tokens, segment {args.segment_len} (median of {args.repeats})")
    for name in names:
        method = method_config(name, model.config, args.segment_len, ())
        for config in (vanilla, method):  # warm-up: both reading paths run once before anything is timed
            run_score(model, config, args.segment_len, doc[:2 * args.segment_len + 1])
        order = [("vanilla", vanilla, (True, True, True)), ("no kernels", method, (False, False, False)),
                 ("fused search", method, (True, False, False)), ("+ native read", method, (True, True, False)),
                 ("+ tiles", method, (True, True, True))]
        runs: dict[str, list[float]] = {role: [] for role, _, _ in order}
        for r in range(args.repeats):
            for role, config, on in order if r % 2 == 0 else order[::-1]:
                switched(*on)
                runs[role].append(run_score(model, config, args.segment_len, doc)[0] * 1e6 / args.length)
        us = {role: statistics.median(times) for role, times in runs.items()}
        print(f"  {name:24s} vanilla {us['vanilla']:.0f} us, " + ", ".join(
            f"{role} {us[role]:.0f} us (x{us[role] / us['vanilla']:.2f})" for role, _, _ in order[1:]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
