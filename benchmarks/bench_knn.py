"""Per-token time of kNN-LM with a 64K-entry datastore against vanilla, in one process.

    python benchmarks/bench_knn.py [--model PATH | --shape HIDDEN,LAYERS,VOCAB] [--entries 65536] [--length 4096]
                                   [--segment-len 256] [--indexes faiss-ivf,faiss-flat,torch] [--repeats 3]
                                   [--threads 1]

The external datastore holds `--entries` (key, next token) pairs of a random document read by the model itself
(real keys; its build time is reported apart). Each timed run scores one random document of `--length` tokens,
streamed in segments: kNN-LM searches the external datastore and the document's own (which grows to the document)
once per segment, batched over the segment's queries, and mixes the distributions. Vanilla and each index are
timed alternately, `--repeats` times; medians, and the ratio to vanilla's median. `--shape` builds a random
LLaMA of that hidden size, depth and vocabulary instead (seeded; times hold, perplexity would not): the search costs
the same per query whatever the model, so its share of the time shrinks as the model grows.
"""

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from methodbench.measure import load_llm, random_doc, set_threads
from transformers import LlamaConfig, LlamaForCausalLM

from unimem_bench.methods import METHODS, MemoryLM, MethodContext
from unimem_bench.methods.engine.output_memory import corpus_datastore

DEFAULT_MODEL = Path(__file__).resolve().parents[1].parent / "shared" / "models" / "stories260K"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(DEFAULT_MODEL) if DEFAULT_MODEL.exists() else None)
    parser.add_argument("--shape", default="", help="HIDDEN,LAYERS,VOCAB of a random LLaMA, e.g. 512,8,32000")
    parser.add_argument("--entries", type=int, default=65536)
    parser.add_argument("--length", type=int, default=4096)
    parser.add_argument("--segment-len", type=int, default=256)
    parser.add_argument("--indexes", default="faiss-ivf,faiss-flat,torch")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    set_threads(args.threads)
    model = random_llama(args.shape) if args.shape else load_llm(args.model)
    vocab, layers = model.config.vocab_size, model.config.num_hidden_layers
    ctx = MethodContext(n_layers=layers, segment_len=args.segment_len, trained_context=args.segment_len * 2)
    doc = random_doc(vocab, args.length)
    corpus = [torch.randint(0, vocab, (args.entries + 1,), generator=torch.Generator().manual_seed(1))]
    runs: dict[str, object] = {"vanilla": METHODS.get("vanilla").config(ctx)}
    for index in args.indexes.split(","):
        runs[index] = METHODS.get("knn_lm").config(ctx, [f"reading.index={index}"])
    times: dict[str, list[float]] = {name: [] for name in runs}
    with tempfile.TemporaryDirectory() as cache:
        lms = {}
        for name, config in runs.items():
            lm = MemoryLM(model, config, segment_len=args.segment_len)
            if lm.output is not None:
                started = time.perf_counter()
                lm.output.external = corpus_datastore(lm.output, lm, corpus, Path(cache) / name)
                print(f"{name}: datastore of {len(lm.output.external):,} entries built in "
                      f"{time.perf_counter() - started:.1f} s", file=sys.stderr)
            lms[name] = lm
        for lm in lms.values():  # warm-up (faiss and torch first-call costs)
            lm.score([doc[:args.segment_len * 2]])
        for _ in range(args.repeats):
            for name, lm in lms.items():
                started = time.perf_counter()
                lm.score([doc])
                times[name].append(time.perf_counter() - started)
        for lm in lms.values():
            lm.close()
    base = statistics.median(times["vanilla"])
    print(f"| method | index | ms / token | ratio vs vanilla |  ({args.length:,} tokens, segment {args.segment_len}, "
          f"{args.entries:,}-entry datastore, {args.threads} thread(s), model "
          f"{'random LLaMA ' + args.shape if args.shape else args.model or 'tiny random'})")
    print("|---|---|---:|---:|")
    for name, values in times.items():
        median = statistics.median(values)
        method = "vanilla" if name == "vanilla" else "knn_lm"
        index = "-" if name == "vanilla" else name
        print(f"| {method} | {index} | {1000 * median / args.length:.3f} | {median / base:.2f}x |")
    return 0


def random_llama(shape: str) -> LlamaForCausalLM:
    """A seeded random LLaMA of hidden size, depth and vocabulary `shape` (head dim 64, SwiGLU width 8/3 hidden)."""
    hidden, layers, vocab = (int(v) for v in shape.split(","))
    config = LlamaConfig(hidden_size=hidden, intermediate_size=hidden * 8 // 3, num_hidden_layers=layers,
                         num_attention_heads=max(1, hidden // 64), num_key_value_heads=max(1, hidden // 64),
                         vocab_size=vocab, max_position_embeddings=4096)
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


if __name__ == "__main__":
    sys.exit(main())
