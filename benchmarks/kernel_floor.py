"""How much of a method's per-token time above vanilla is PyTorch's own dense kernels, measured in one process.

    python benchmarks/kernel_floor.py [--model PATH | --random-model 62m] [--segment-len 128] [--length 16384]
                                      [--methods streaming_llm,bigbird,longnet,poolingformer,longt5] [--repeats 3]

Per method, after a warm-up, `--repeats` alternating pairs of runs (vanilla and the method) give the median time
ratio, and as many pairs under `torch.profiler` the work the method adds to PyTorch's dense kernels: the matmuls
(`aten::mm`, `addmm`, `bmm`, `baddbmm`) and the fused attention (`_scaled_dot_product_flash_attention_for_cpu`,
the other SDPA backends' kernels), grouped by op and input shapes. A group the method calls more often than
vanilla adds its extra calls at the method's time a call, one it calls less often takes vanilla's away (vanilla's
[segment x segment] attention becomes the method's [segment x memory + segment]); a group both call equally often
adds nothing, even where it ran slower in the method's run: under the profiler the model's linear layers run
15-17% slower beside a method's many small ops, untraced they take vanilla's time (benchmarks/README.md, s21). The
kernel floor is 1 + that added time / vanilla's untraced time: what the method's extra keys and layers cost at
PyTorch's own kernel speed, a ratio no bookkeeping around those kernels can beat. Above it is everything else:
copies, rotations, masks, merges, Python, and the engine's native search and read (ctypes calls the profiler does
not see; `floor.py` counts the similarity reads' arithmetic instead).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
from methodbench.measure import (
    PREFIX,
    load_llm,
    method_config,
    model_config,
    random_doc,
    run_score,
    set_threads,
    warm_up_doc,
)
from rich.console import Console
from rich.table import Table
from torch.profiler import ProfilerActivity, profile
from transformers import PreTrainedModel

from unimem_bench.harness.cli.app import USER_ERRORS
from unimem_bench.harness.cli.arguments import positive_int
from unimem_bench.methods.config import UniMemConfig

DEFAULT_METHODS = "streaming_llm,bigbird,longnet,poolingformer,longt5"
KERNELS = frozenset({
    "aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm",
    "aten::_scaled_dot_product_flash_attention_for_cpu", "aten::_flash_attention_forward",
    "aten::_efficient_attention_forward",
})
"""The dense compute kernels whose self time is counted: matmuls and the fused attention (the math SDPA path's
work is its bmm calls)."""


Calls = dict[tuple[str, str], tuple[int, float]]
"""(op, input shapes) -> (calls, self seconds) of the `KERNELS` in one scored document."""


def kernel_calls(model: PreTrainedModel, config: UniMemConfig, segment_len: int, doc: torch.Tensor) -> Calls:
    """The `KERNELS` that ran while one document was scored, under the profiler, by op and input shapes."""
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        run_score(model, config, segment_len, doc)
    return {(e.key, str(e.input_shapes)): (e.count, e.self_cpu_time_total / 1e6)
            for e in prof.key_averages(group_by_input_shape=True) if e.key in KERNELS}


class LinearClock:
    """Seconds spent inside the model's `nn.Linear` calls, by `perf_counter` forward hooks (no profiler): whether
    the model's own layers run slower in a method's run. The hooks are plain closures, so layers a method copies
    (LongMem's SideNet) keep counting into the same clock."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.seconds = 0.0
        self.calls = 0
        started = [0.0]

        def start(*_: object) -> None:
            started[0] = time.perf_counter()

        def stop(*_: object) -> None:
            self.seconds += time.perf_counter() - started[0]
            self.calls += 1

        self.hooks = [h for module in model.modules() if isinstance(module, torch.nn.Linear)
                      for h in (module.register_forward_pre_hook(start), module.register_forward_hook(stop))]

    def remove(self) -> None:
        for hook in self.hooks:
            hook.remove()


def added_seconds(method: Calls, vanilla: Calls) -> float:
    """The kernel time the method adds to vanilla's: per (op, shapes), its extra calls at its own time a call, or
    vanilla's calls it no longer makes at vanilla's."""
    added = 0.0
    for group in method.keys() | vanilla.keys():
        (n_m, t_m), (n_v, t_v) = method.get(group, (0, 0.0)), vanilla.get(group, (0, 0.0))
        if n_m > n_v:
            added += (n_m - n_v) * t_m / n_m
        elif n_v > n_m:
            added -= (n_v - n_m) * t_v / n_v
    return added


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="HF folder or llama2.c .bin")
    parser.add_argument("--random-model", default=None, metavar="SPEC", help="`62m` or hidden=..,layers=..,...")
    parser.add_argument("--segment-len", type=positive_int, default=128)
    parser.add_argument("--length", type=positive_int, default=16384, help="document tokens (default: 16384)")
    parser.add_argument("--methods", default=DEFAULT_METHODS)
    parser.add_argument("--repeats", type=positive_int, default=3, help="timed (vanilla, method) pairs (default: 3)")
    args = parser.parse_args()
    if (args.model is None) == (args.random_model is None):
        print("kernel_floor: give one of --model PATH or --random-model SPEC", file=sys.stderr)
        return 2
    spec = args.model or PREFIX + args.random_model
    names = [m.strip() for m in args.methods.split(",") if m.strip()]
    try:
        c = model_config(spec)
        configs = {name: method_config(name, c, args.segment_len, ()) for name in ["vanilla", *names]}
    except USER_ERRORS as err:
        print(f"kernel_floor: {err}", file=sys.stderr)
        return 2
    set_threads(1)
    model = load_llm(spec)
    doc = random_doc(model.config.vocab_size, args.length + 1)
    vanilla = configs["vanilla"]
    table = Table(title=f"{spec}, {args.length:,} tokens, segment {args.segment_len}, one thread")
    for col in ("method", "x vanilla (median)", "kernel floor", "above the floor", "linear layers x vanilla's",
                "vanilla µs/token"):
        table.add_column(col, justify="left" if col == "method" else "right")
    # Read around the untraced runs only. Its two Python hooks add about 2 us to each Linear call, in both timed runs:
    # 29 calls a 128-token segment on the reference model, well under 1% of either run.
    clock = LinearClock(model)
    try:
        for name in names:
            method = configs[name]
            for config in (vanilla, method):
                run_score(model, config, args.segment_len, warm_up_doc(doc, args.segment_len, config))
            ratios, base, kernels, linear = [], [], [], []
            for r in range(args.repeats):
                order = [(method, False), (vanilla, True)]
                times, traced, in_linear = {}, {}, {}
                for config, is_vanilla in order if r % 2 == 0 else order[::-1]:
                    clock.seconds = 0.0
                    times[is_vanilla] = run_score(model, config, args.segment_len, doc)[0]
                    in_linear[is_vanilla] = clock.seconds
                    traced[is_vanilla] = kernel_calls(model, config, args.segment_len, doc)
                ratios.append(times[False] / times[True])
                base.append(times[True])
                kernels.append(added_seconds(traced[False], traced[True]))
                linear.append(in_linear[False] / in_linear[True])
            t_vanilla = statistics.median(base)
            extra = statistics.median(kernels)
            ratio, floor = statistics.median(ratios), 1 + extra / t_vanilla
            table.add_row(name, f"x{ratio:.2f} ({min(ratios):.2f}-{max(ratios):.2f})", f"x{floor:.2f}",
                          f"{ratio - floor:+.2f}", f"x{statistics.median(linear):.2f}",
                          f"{t_vanilla * 1e6 / args.length:.1f}")
            print(f"{name}: x{ratio:.3f}, kernel floor x{floor:.3f}", file=sys.stderr, flush=True)
    finally:
        clock.remove()
    Console(width=130).print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
