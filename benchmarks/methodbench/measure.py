"""Measuring in fresh processes: per-token time of each method beside vanilla, peak memory and state bytes of one
streamed document, and top-k retrieval time (exact torch vs faiss Flat)."""


import contextlib
import ctypes
import dataclasses
import gc
import math
import resource
import statistics
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, PretrainedConfig, PreTrainedModel
from transformers.utils import logging as hf_logging

from methodbench.random_model import PREFIX, random_config
from unimem_bench.harness.models.resolve import (
    checkpoint_memory_layers,
    checkpoint_summary_tokens,
    load_model,
    load_model_config,
    resolve_model,
    trained_context,
)
from unimem_bench.methods import METHODS, MemoryLM, MethodContext, UniMemConfig
from unimem_bench.methods.config import Reading
from unimem_bench.methods.engine.faiss_bank import FaissBank
from unimem_bench.methods.engine.memory import MemoryState
from unimem_bench.methods.engine.retrieval import topk_exact

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
    """`--model` as given (HF folder, llama2.c .bin, hub id, or `random:<spec>` for `--random-model`); None = the
    random tiny LLaMA."""
    method: str
    overrides: tuple[str, ...]
    segment_len: int
    threads: int
    baseline: str = "vanilla"
    """What the method is timed against: `vanilla`, or `fifo`: the method's own memory size under FIFO eviction
    (the same-budget window an eviction policy must beat)."""


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
    ratio_low: float
    """The lowest of those per-repeat ratios: with `ratio_high`, the spread the machine's noise left."""
    ratio_high: float
    """The highest per-repeat ratio."""
    fastest_ratio: float
    """The method's fastest run / vanilla's fastest run. Other work on the machine only adds time, so on a busy
    machine this is the steadier figure: three processes of 7 repeats each (StreamingLLM, reference model, 16K) gave
    1.26-1.31 by this and 1.20-1.30 by the median of per-repeat ratios."""


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
    if spec is None:
        return tiny_config()
    if spec.startswith(PREFIX):
        return random_config(spec[len(PREFIX):])
    return load_model_config(resolve_model(spec))


def load_llm(spec: str | None) -> PreTrainedModel:
    """fp32 weights on CPU, in eval mode; the tiny model is seeded, so every process builds the same one. No
    tokenizer is needed (documents are random ids), so a folder with weights and config.json is enough."""
    hf_logging.disable_progress_bar()
    if spec is None or spec.startswith(PREFIX):
        torch.manual_seed(0)
        return LlamaForCausalLM(model_config(spec)).eval()
    source = resolve_model(spec)
    if source.kind == "llama2c":
        return load_model(source, device=torch.device("cpu"), dtype=torch.float32)[0]
    return AutoModelForCausalLM.from_pretrained(source.location, dtype=torch.float32).eval()


def method_config(name: str, config: PretrainedConfig, segment_len: int, overrides: tuple[str, ...]) -> UniMemConfig:
    """The registered defaults for this model and segment length; overrides never touch vanilla (the baseline)."""
    ctx = MethodContext(n_layers=config.num_hidden_layers, segment_len=segment_len,
                        trained_context=trained_context(config), memory_layers=checkpoint_memory_layers(config),
                        summary_tokens=checkpoint_summary_tokens(config))
    return METHODS.get(name).config(ctx, () if name == "vanilla" else overrides)


# ---------------------------------------------------------------- measurement helpers


def state_tensors(state: MemoryState) -> list[torch.Tensor]:
    """Every tensor the memory state holds: bank keys/values, pinned globals, the pooled tier, RMT memory tokens."""
    names = ("keys", "values", "global_keys", "global_values", "tier_keys", "tier_values")
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
    with MemoryLM(model, config, segment_len=segment_len) as lm, lm.budget_for(len(doc)):
        state = lm.new_state(1)
        ids = doc[:-1].unsqueeze(0)
        for start in range(0, ids.shape[1], lm.segment_len):
            lm.forward_segment(state, ids[:, start:start + lm.segment_len], start)
        return state


def warm_up_doc(doc: torch.Tensor, segment_len: int, config: UniMemConfig) -> torch.Tensor:
    """Two of the method's segments, so the memory-reading path runs once before anything is measured."""
    return doc[:2 * segment_len * config.position.segment_factor + 1]


def fifo_twin(config: UniMemConfig, tokens: int) -> UniMemConfig:
    """The same method with FIFO in place of its score-based eviction, holding as many slots as the method does on
    a `tokens`-token input (its size, or its budget resolved as `MemoryLM.budget_for` does), nothing protected: a
    StreamingLLM-like window of the same number of slots (per-layer and per-head budgets made uniform: the same
    total), the baseline an eviction policy's cost is judged by."""
    m = config.management
    size = max(1, m.sinks + m.recent, math.ceil(m.budget * tokens)) if m.budget else m.size
    fifo = dataclasses.replace(m, eviction="fifo", sinks=0, recent=0, budget=0.0, size=size, layer_budget="uniform",
                               head_budget="uniform")
    return dataclasses.replace(config, name=f"{config.name}-fifo", management=fifo)


def configs(job: Job, model: PreTrainedModel, tokens: int) -> tuple[UniMemConfig, UniMemConfig]:
    """(the baseline, the job's method) for this model and a `tokens`-token document."""
    method = method_config(job.method, model.config, job.segment_len, job.overrides)
    if job.baseline == "fifo":
        return fifo_twin(method, tokens), method
    return method_config("vanilla", model.config, job.segment_len, ()), method


def time_method(job: Job, lengths: tuple[int, ...], repeats: int) -> dict[int, Timing]:
    """Runs in a fresh process: after a warm-up, per length, `repeats` (method, baseline) pairs in alternating
    order, so each ratio compares two runs taken side by side (`Timing`'s vanilla fields hold the baseline)."""
    set_threads(job.threads)
    model = load_llm(job.model)
    doc = random_doc(model.config.vocab_size, max(lengths))
    for config in configs(job, model, max(lengths)):
        run_score(model, config, job.segment_len, warm_up_doc(doc, job.segment_len, config))
    timings = {}
    for n in lengths:
        baseline, method = configs(job, model, n + 1)
        runs: dict[str, list[tuple[float, float]]] = {"method": [], "vanilla": []}
        for r in range(repeats):
            order = [("method", method), ("vanilla", baseline)]
            for role, config in order if r % 2 == 0 else order[::-1]:
                runs[role].append(run_score(model, config, job.segment_len, doc[:n + 1]))
        per_token = 1e6 / n
        ratios = [m[0] / v[0] for m, v in zip(runs["method"], runs["vanilla"], strict=True)]
        timings[n] = Timing(
            us_per_token=statistics.median(w for w, _ in runs["method"]) * per_token,
            cpu_us_per_token=statistics.median(c for _, c in runs["method"]) * per_token,
            vanilla_us_per_token=statistics.median(w for w, _ in runs["vanilla"]) * per_token,
            vanilla_cpu_us_per_token=statistics.median(c for _, c in runs["vanilla"]) * per_token,
            ratio=statistics.median(ratios),
            ratio_low=min(ratios),
            ratio_high=max(ratios),
            fastest_ratio=min(w for w, _ in runs["method"]) / min(w for w, _ in runs["vanilla"]),
        )
    return timings


def measure_memory(job: Job, length: int) -> Memory:
    """Runs in a fresh process: load, warm up, then stream one document and read the peak RSS and the state."""
    exact_rss_accounting()
    set_threads(job.threads)
    model = load_llm(job.model)
    _, method = configs(job, model, length + 1)
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
        faiss_s, (_, faiss_idx) = median_time(lambda bank=bank, size=size: bank.search(queries, k, 0, 0, size),
                                              repeats)
        same = (torch_idx.sort(-1).values == faiss_idx.sort(-1).values).all(-1)
        results.append(RetrievalResult(size, torch_s * 1e3, faiss_s * 1e3, same.float().mean().item()))
    return results


# ---------------------------------------------------------------- reporting


