"""The arithmetic floor of the similarity reads: per token, the multiply-adds a method's memory read adds to vanilla's.

    python benchmarks/floor.py [--model PATH | --random-model 62m] [--segment-len 128]
                               [--methods memorizing_transformer,unimix,fot,reformer,routing]

Counted from the model's config and each method's registered defaults, nothing timed. A method cannot run faster
than x(1 + read / vanilla) at the efficiency vanilla's own matmuls reach; what a benchmark ratio shows above that
is selection, gathers, masks, merges and Python. Per token, at the segment length given:
- vanilla: the weights (query, key, value and output projections, the MLP, the LM head) and causal local attention
  over (segment + 1) / 2 keys on average, scores and values;
- top-k reads: per memory layer and query head, a dot product with every searchable slot (the memory less its
  window) and the top-k values; a window adds its slots' scores and values;
- LSH buckets (Reformer): per layer, the queries projected on rounds x buckets / 2 directions, the memory keys once
  per read, and the dense read of the memory as held at a read: all of it under FIFO, half on average under a
  clearing overflow (a Clear All memory of m segments is read holding 0, 1, ..., m of them);
- k-means clusters (Routing): the dense read of that memory and the queries' distances to the centroids.
The selection's own comparisons (top-k, argmax) are not multiply-adds and are not counted.
"""

import argparse
import sys

from methodbench.measure import method_config, model_config
from methodbench.random_model import PREFIX

from unimem_bench.harness.cli.app import USER_ERRORS
from unimem_bench.methods.config import UniMemConfig

DEFAULT_METHODS = "memorizing_transformer,unimix,fot,reformer,routing"


def vanilla_macs(hidden: int, layers: int, heads: int, kv_heads: int, intermediate: int, vocab: int,
                 segment: int) -> float:
    """Multiply-adds a token of the plain model at this segment length."""
    dim = hidden // heads
    weights = layers * (2 * hidden * hidden + 2 * hidden * kv_heads * dim + 3 * hidden * intermediate) + hidden * vocab
    return weights + layers * heads * dim * 2 * (segment + 1) / 2


def read_macs(config: UniMemConfig, layers: int, heads: int, kv_heads: int, dim: int, segment: int) -> float | None:
    """Multiply-adds a token that the method's memory read adds (None: not a similarity read)."""
    r, size = config.reading, config.management.size
    n_layers = len(config.injection.resolve(layers))
    held = size if config.management.overflow == "fifo" else size / 2  # slots a read finds, on average
    if r.lsh_buckets:
        directions = r.lsh_rounds * r.lsh_buckets // 2
        hashing = heads * dim * directions + kv_heads * dim * directions * held / segment
        return n_layers * (hashing + heads * held * dim * 2)
    if r.clusters:
        return n_layers * (heads * held * dim * 2 + heads * dim * r.clusters)
    if r.topk and not r.chunk_size:
        window = min(r.window, size)
        return n_layers * heads * dim * ((size - window) + 2 * window + r.topk)
    return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="a Hugging Face folder (its config.json is read)")
    parser.add_argument("--random-model", default="", help="`62m` or hidden=..,layers=..,heads=..,kv_heads=..")
    parser.add_argument("--segment-len", type=int, default=128)
    parser.add_argument("--methods", default=DEFAULT_METHODS)
    args = parser.parse_args()
    if bool(args.model) == bool(args.random_model):
        print("floor: give one of --model PATH or --random-model SPEC", file=sys.stderr)
        return 2
    spec = args.model or PREFIX + args.random_model
    try:
        c = model_config(spec)
        configs = {name: method_config(name, c, args.segment_len, ()) for name in args.methods.split(",")}
    except USER_ERRORS as err:
        print(f"floor: {err}", file=sys.stderr)
        return 2
    layers, heads, kv_heads = c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads
    dim = c.hidden_size // heads
    vanilla = vanilla_macs(c.hidden_size, layers, heads, kv_heads, c.intermediate_size, c.vocab_size, args.segment_len)
    print(f"{spec}: vanilla {vanilla / 1e6:.3f}M multiply-adds a token at segment {args.segment_len}")
    for name, config in configs.items():
        extra = read_macs(config, layers, heads, kv_heads, dim, args.segment_len)
        if extra is None:
            print(f"  {name}: not a similarity read")
            continue
        print(f"  {name}: +{extra / 1e6:.3f}M -> floor x{1 + extra / vanilla:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
