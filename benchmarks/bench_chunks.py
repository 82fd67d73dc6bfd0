"""Chunk-level retrieval (LongMem's token-to-chunk) against token-level exact top-k, reading the same tokens.

    python benchmarks/bench_chunks.py [--memory 65536] [--chunk-size 4] [--topk 32] [--queries 512]
                                      [--kv-heads 4] [--head-dim 64] [--repeats 7] [--threads 1] [--read native]

Times the whole similarity read of one layer for one segment, as the engine runs it (methods/engine/attention.py,
`merge_topk`): the search, then the picked slots' softmax part merged into a local read's output by log-sum-exp.
`--read native` (the engine's default on CPU) merges in one pass of `picked_read`, which scores a chunk read's slots
against the bank itself; `--read torch` gathers the picked keys and values and merges in PyTorch ops (the engine
without the native kernels). The chunk keys are those the engine keeps between reads (`pages.cached_chunk_keys`:
under FIFO a chunk's key never changes, so a read keys only the chunks written since, one segment's worth); the
rows "keys recomputed" key every chunk of the memory in each read, as the engine did before that cache. All paths
run alternately in this one process on the same random memory; the ratio of medians is printed (token time / chunk
time, so > 1 means chunks are faster).
"""

import argparse
import statistics
import sys
import time

import torch

from unimem_bench.methods.engine import native, picked_read
from unimem_bench.methods.engine.attention import gather_slots, merge_picked
from unimem_bench.methods.engine.retrieval import chunk_keys, topk_chunk_slots, topk_exact

SCALE = 0.125  # the softmax scale of head dim 64 (any positive scale costs the same)


def read_tokens(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, k: int, local: tuple[torch.Tensor, ...],
                native_read: bool) -> torch.Tensor:
    logits, idx = topk_exact(q, keys, k)  # [batch, kv_heads, q, k]
    if native_read:
        merged = picked_read.merge(q, None, values, idx, 0, logits, *local, SCALE)
        assert merged is not None
        return merged
    return torch_read(logits, gather_slots(values, idx), *local)


def read_chunks(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, k: int, chunk: int, kind: str,
                keyed: torch.Tensor | None, local: tuple[torch.Tensor, ...], native_read: bool) -> torch.Tensor:
    idx, found = topk_chunk_slots(q, keys, k, chunk, kind, keyed=keyed)
    if native_read:
        merged = picked_read.merge(q, keys, values, idx.masked_fill(~found, -1), 0, None, *local, SCALE)
        assert merged is not None
        return merged
    logits = torch.einsum("bhqd,bhqkd->bhqk", q, gather_slots(keys, idx)).masked_fill(~found, float("-inf"))
    return torch_read(logits, gather_slots(values, idx), *local)


def torch_read(logits: torch.Tensor, picked_v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    """`merge_topk`'s PyTorch merge of the picked slots into the local read."""
    return merge_picked(out, lse, logits * SCALE, picked_v)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--memory", type=int, default=65536, help="memory slots per KV head")
    parser.add_argument("--chunk-size", type=int, default=4, help="slots per chunk (LongMem: 4)")
    parser.add_argument("--topk", type=int, default=32, help="tokens read per query (both paths)")
    parser.add_argument("--queries", type=int, default=512, help="query rows per KV head (segment x group)")
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--read", choices=["native", "torch"], default="native",
                        help="merge the picked slots by the native kernel (the engine's CPU default) or in PyTorch")
    args = parser.parse_args()
    native_read = args.read == "native"
    if native_read and native.library() is None:
        print("bench_chunks: the native kernels cannot be built here (no C compiler): run with --read torch",
              file=sys.stderr)
        raise SystemExit(2)
    torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(0)
    shape = (1, args.kv_heads)
    q = torch.randn(*shape, args.queries, args.head_dim, generator=generator)  # [batch, kv_heads, q, dim]
    keys = torch.randn(*shape, args.memory, args.head_dim, generator=generator)  # [batch, kv_heads, n, dim]
    values = torch.randn(*shape, args.memory, args.head_dim, generator=generator)
    local = (torch.randn(*shape, args.queries, args.head_dim, generator=generator),  # a local read's output
             torch.randn(*shape, args.queries, generator=generator))  # and its log-sum-exp
    runs = {"token top-k": lambda: read_tokens(q, keys, values, args.topk, local, native_read)}
    for kind in ("mean", "bounds"):
        keyed = chunk_keys(keys, args.chunk_size, kind)  # [batch, kv_heads, chunks, key dim], as the engine caches
        runs[f"chunks ({kind})"] = lambda kind=kind, keyed=keyed: read_chunks(
            q, keys, values, args.topk, args.chunk_size, kind, keyed, local, native_read)
        runs[f"chunks ({kind}), keys recomputed"] = lambda kind=kind: read_chunks(
            q, keys, values, args.topk, args.chunk_size, kind, None, local, native_read)
    times: dict[str, list[float]] = {name: [] for name in runs}
    for run in runs.values():  # warm-up
        run()
    for _ in range(args.repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    base = statistics.median(times["token top-k"])
    print(f"memory {args.memory:,} slots x {args.kv_heads} KV heads, head dim {args.head_dim}, {args.queries} queries, "
          f"{args.topk} tokens read, chunks of {args.chunk_size}, {args.threads} thread(s), {args.repeats} repeats, "
          f"{args.read} read")
    for name, samples in times.items():
        median = statistics.median(samples)
        print(f"{name:>32}: {median * 1e3:8.1f} ms   speed-up vs token top-k {base / median:5.2f}x")


if __name__ == "__main__":
    main()
