"""Per-token time of kNN-LM with a 64K-entry datastore against vanilla, in one process.

    python benchmarks/bench_knn.py [--model PATH | --shape HIDDEN,LAYERS,VOCAB] [--entries 65536] [--length 4096]
                                   [--segment-len 256] [--indexes faiss-ivf,faiss-flat,torch] [--probes 1,2,4]
                                   [--set FIELD=VALUE ...] [--books DIR] [--repeats 3] [--threads 1]

The external datastore holds `--entries` (key, next token) pairs of a random document read by the model itself
(real keys; its build time is reported apart). Each timed run scores one random document of `--length` tokens,
streamed in segments: kNN-LM searches the external datastore and the document's own (which grows to the document)
once per segment, batched over the segment's queries, and mixes the distributions. Vanilla and each index are
timed alternately, `--repeats` times; medians, and the ratio to vanilla's median. `--shape` builds a random
LLaMA of that hidden size, depth and vocabulary instead (seeded; times hold, perplexity would not): the search costs
the same per query whatever the model, so its share of the time shrinks as the model grows.

`--probes` adds one faiss-ivf run per number of probed cells (`reading.ivf_probe`); `--set` overrides a knn_lm
field in every run. `--books DIR` (the model's tokenizer needed) makes both documents real text: the datastore is
the first `--entries` tokens of the folder's books in name order but the last, the scored document `--length`
tokens from the middle of the last one; the table then adds each run's perplexity and the recall of its external
search: the fraction of the exact k nearest entries (faiss Flat) that the run's index returns for the document's
queries.
"""

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from methodbench.measure import load_llm, random_doc, set_threads
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from unimem_bench.methods import METHODS, MemoryLM, MethodContext
from unimem_bench.methods.engine.output_memory import Datastore, FfnInputTap, corpus_datastore

DEFAULT_MODEL = Path(__file__).resolve().parents[1].parent / "shared" / "models" / "stories260K"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(DEFAULT_MODEL) if DEFAULT_MODEL.exists() else None)
    parser.add_argument("--shape", default="", help="HIDDEN,LAYERS,VOCAB of a random LLaMA, e.g. 512,8,32000")
    parser.add_argument("--entries", type=int, default=65536)
    parser.add_argument("--length", type=int, default=4096)
    parser.add_argument("--segment-len", type=int, default=256)
    parser.add_argument("--indexes", default="faiss-ivf,faiss-flat,torch")
    parser.add_argument("--probes", default="", help="extra faiss-ivf runs, one per reading.ivf_probe value")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="knn_lm config override for every run (repeatable)")
    parser.add_argument("--books", default="", help="folder of .txt books: real text instead of random tokens")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    if args.books and (args.shape or not args.model or not any(Path(args.books).glob("*.txt"))):
        print(f"bench_knn: --books needs --model (a folder with a tokenizer) and .txt files in {args.books!r}",
              file=sys.stderr)
        return 2
    set_threads(args.threads)
    model = random_llama(args.shape) if args.shape else load_llm(args.model)
    vocab, layers = model.config.vocab_size, model.config.num_hidden_layers
    ctx = MethodContext(n_layers=layers, segment_len=args.segment_len, trained_context=args.segment_len * 2)
    if args.books:
        doc, corpus = book_tokens(args.model, Path(args.books), args.entries, args.length)
    else:
        doc = random_doc(vocab, args.length)
        corpus = [torch.randint(0, vocab, (args.entries + 1,), generator=torch.Generator().manual_seed(1))]
    runs: dict[str, object] = {"vanilla": METHODS.get("vanilla").config(ctx)}
    for index in args.indexes.split(","):
        runs[index] = METHODS.get("knn_lm").config(ctx, [f"reading.index={index}", *args.set])
    for probe in filter(None, args.probes.split(",")):
        runs[f"faiss-ivf, {probe} probed"] = METHODS.get("knn_lm").config(
            ctx, ["reading.index=faiss-ivf", *args.set, f"reading.ivf_probe={probe}"])
    times: dict[str, list[float]] = {name: [] for name in runs}
    nll: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as cache:
        lms = {}
        for name, config in runs.items():
            lm = MemoryLM(model, config, segment_len=args.segment_len)
            if lm.output is not None:
                started = time.perf_counter()
                lm.output.external = corpus_datastore(lm.output, lm, corpus, Path(cache))
                print(f"{name}: datastore of {len(lm.output.external):,} entries ready in "
                      f"{time.perf_counter() - started:.1f} s", file=sys.stderr)
            lms[name] = lm
        for lm in lms.values():  # warm-up (faiss and torch first-call costs)
            lm.score([doc[:args.segment_len * 2]])
        for repeat in range(args.repeats):
            for name, lm in (lms.items() if repeat % 2 == 0 else reversed(lms.items())):
                started = time.perf_counter()
                scores = lm.score([doc])[0]
                times[name].append(time.perf_counter() - started)
                nll[name] = float(scores.double().mean())
        recall = external_recall(model, lms, doc, args.segment_len) if args.books else {}
        for lm in lms.values():
            lm.close()
    base = statistics.median(times["vanilla"])
    text = f"books of {args.books}" if args.books else "random tokens"
    print(f"| method | index | ms / token | ratio vs vanilla |{' perplexity | recall |' if args.books else ''}  "
          f"({args.length:,} tokens of {text}, segment {args.segment_len}, {args.entries:,}-entry datastore, "
          f"{args.threads} thread(s), model {'random LLaMA ' + args.shape if args.shape else args.model})")
    print(f"|---|---|---:|---:|{'---:|---:|' if args.books else ''}")
    for name, values in times.items():
        median = statistics.median(values)
        method = "vanilla" if name == "vanilla" else "knn_lm"
        index = "-" if name == "vanilla" else name
        quality = f" {np.exp(nll[name]):.3f} | {recall.get(name, '-')} |" if args.books else ""
        print(f"| {method} | {index} | {1000 * median / args.length:.3f} | {median / base:.2f}x |{quality}")
    return 0


def book_tokens(model: str, books: Path, entries: int, length: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(scored document [length + 1], [datastore corpus of entries + 1 tokens]) from the books in name order."""
    tokenizer = AutoTokenizer.from_pretrained(model)
    tokenizer.model_max_length = 1 << 30  # whole books: the model never reads more than a segment at once
    paths = sorted(books.glob("*.txt"))
    held_out = tokenizer(paths[-1].read_text(errors="replace"))["input_ids"]
    middle = max(0, len(held_out) // 2 - length // 2)
    doc = torch.tensor(held_out[middle:middle + length + 1])
    corpus: list[int] = []
    for path in paths[:-1]:
        corpus += tokenizer(path.read_text(errors="replace"))["input_ids"]
        if len(corpus) > entries:
            break
    return doc, [torch.tensor(corpus[:entries + 1])]


def external_recall(model: Any, lms: dict[str, MemoryLM], doc: torch.Tensor, segment_len: int) -> dict[str, str]:
    """Per run, the mean fraction of each query's exact k nearest external entries its external search returns
    (the queries: the document's keys, read segment by segment without memory, as knn_lm reads them)."""
    import faiss

    tap = FfnInputTap(model.get_decoder())
    with torch.inference_mode():
        queries = []
        for start in range(0, len(doc) - 1, segment_len):
            model(input_ids=doc[None, start:start + segment_len], use_cache=False)
            queries.append(tap.take()[0].float())
    tap.remove()
    q = np.ascontiguousarray(torch.cat(queries).numpy())
    found: dict[str, str] = {}
    for name, lm in lms.items():
        reader = lm.output
        store: Datastore | None = None if reader is None else reader.external
        if reader is None or store is None:
            continue
        k = reader.reading.output_topk
        exact = faiss.IndexFlatL2(store.dim)
        exact.add(store.keys.numpy())
        truth = exact.search(q, k)[1]
        got = store.index.search(q, k)[1] if store.index is not None else truth
        hits = [len(np.intersect1d(a, b)) / k for a, b in zip(got, truth, strict=True)]
        found[name] = f"{np.mean(hits):.3f}"
    return found


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
