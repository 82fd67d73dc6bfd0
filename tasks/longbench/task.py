"""LongBench v1 (21 datasets) and LongBench-E (13 datasets in 0-4k / 4-8k / 8k+ length buckets), run as the official
`pred.py` and `eval.py` do.

Each sample's prompt is the dataset's official template filled with the record; a prompt longer than `max_length`
tokens keeps its first and last `max_length // 2` tokens (decoded and re-encoded, as pred.py does); the method
generates greedily up to the dataset's official length, stopping at EOS (samsum also at a newline); the prediction
is scored by the dataset's official metric (first line only for trec, triviaqa, samsum and lsht; best over the
answers) x100. Memory methods can instead read the whole prompt: `context=stream` streams it through the method's
segments, cut head-plus-tail only beyond `stream_max_tokens`. Which was used is in the params and every sample.

Not reproduced: pred.py's chat wrappers (build_chat) for chat models (this harness evaluates base models through the
memory engine), and samsum's `min_length`, which forbids EOS and newline as the first token (the engine's generate
has no logit suppression; here a leading newline is allowed and skipped by the first-line rule).

Data: `--data-dir DIR` with the official files `DIR/<dataset>.jsonl` (`<dataset>_e.jsonl` for LongBench-E; also
found in `DIR/data/`, where THUDM/LongBench's data.zip unpacks), or the hub parquet mirror lm-eval uses.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from statistics import fmean
from typing import Any, Literal

import torch

from unimem_bench.tasks.arguments import arg, task_args
from unimem_bench.tasks.base import TASKS, MetricRow, SampleLog, ScoringLM, TaskOptions, TaskResult, map_samples
from unimem_bench.tasks.data.hub import DataNotFoundError, check_hub_dataset
from unimem_bench.tasks.longbench.data import (
    BUCKETS,
    DATASETS,
    E_DATASETS,
    DatasetSpec,
    bucket,
    file_name,
    find_file,
    load_records,
    truncate_middle,
)
from unimem_bench.tasks.longbench.metrics import score_sample


@dataclass(frozen=True)
class LongBenchTask:
    """LongBench v1 or LongBench-E: per-dataset, per-category and average scores (x100)."""

    name: str
    version: str
    e: bool
    """LongBench-E: its 13 datasets from the `<dataset>_e` files, with length-bucket rows."""
    datasets: tuple[str, ...] = arg(())
    """Datasets to run (empty = all of the variant: 21 for longbench, 13 for longbench-e)."""
    dataset: str = arg("Xnhyacinth/LongBench")
    """Hub dataset id read through `datasets` when no --data-dir is given (lm-eval's parquet mirror; one config per
    dataset, `<dataset>_e` for LongBench-E)."""
    max_length: int = arg(0)
    """Prompt tokens kept by the head-plus-tail truncation (0 = the model's trained context)."""
    context: Literal["truncate", "stream"] = arg("truncate")
    """`truncate`: the official truncation to max_length; `stream`: the whole prompt streams through the method's
    segments and memory, truncated only beyond stream_max_tokens."""
    stream_max_tokens: int = arg(32_768)
    """Prompt tokens kept in `stream` mode; 32K holds nearly every LongBench prompt for LLaMA-style tokenizers
    (6.7K English words on average) while bounding the slowest sample."""
    max_gen: int = arg(0)
    """Tokens generated at most (0 = the official per-dataset lengths, 32 to 512)."""
    headline: str = "score"

    @property
    def higher_is_better(self) -> dict[str, bool]:
        return {"score": True}  # the official metrics (F1, ROUGE-L, accuracy, edit similarity) x100

    def __post_init__(self) -> None:
        allowed = E_DATASETS if self.e else tuple(DATASETS)
        unknown = [d for d in self.datasets if d not in allowed]
        if unknown:
            raise ValueError(f"{self.name}.datasets: {unknown[0]!r} is not a {self.name} dataset; choose from "
                             f"{', '.join(allowed)}")
        if self.max_length < 0 or self.max_gen < 0:
            raise ValueError(f"{self.name}: max_length and max_gen must be >= 0 (0 = the default)")
        if self.stream_max_tokens < 1:
            raise ValueError(f"{self.name}.stream_max_tokens {self.stream_max_tokens} must be >= 1")

    @property
    def local_data(self) -> str:
        """What --data-dir must hold, for error messages."""
        return (f"the official LongBench jsonl files (<dataset>{'_e' if self.e else ''}.jsonl; THUDM/LongBench's "
                "data.zip)")

    @property
    def selected(self) -> tuple[str, ...]:
        """The datasets to run, in the official order."""
        allowed = E_DATASETS if self.e else tuple(DATASETS)
        return tuple(d for d in allowed if d in self.datasets) if self.datasets else allowed

    def check(self, options: TaskOptions) -> None:
        if options.data_dir is None:
            check_hub_dataset(self.dataset, task=self.name, local=self.local_data)
            return
        if not options.data_dir.is_dir():
            raise DataNotFoundError(f"task {self.name!r}: --data-dir {options.data_dir} is not a folder")
        missing = [file_name(d, self.e) for d in self.selected if find_file(options.data_dir, d, self.e) is None]
        if missing:
            more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
            raise DataNotFoundError(f"task {self.name!r}: --data-dir {options.data_dir} lacks "
                                    f"{', '.join(missing[:3])}{more}; add {self.local_data} or select fewer with "
                                    f"--task-arg {self.name}.datasets=NAME,...")

    def params(self, options: TaskOptions) -> dict[str, Any]:
        return {"data": str(options.data_dir) if options.data_dir else self.dataset, "max_docs": options.max_docs,
                "max_tokens": options.max_tokens, **task_args(self), "datasets": list(self.selected)}

    def prompt_budget(self, lm: ScoringLM, options: TaskOptions) -> int:
        """Prompt tokens kept: max_length (or the trained context), stream_max_tokens when streaming, and never
        more than --max-tokens."""
        budget = self.stream_max_tokens if self.context == "stream" else self.max_length or lm.trained_context
        return min(budget, options.max_tokens) if options.max_tokens else budget

    def predict(self, lm: ScoringLM, tokenizer: Any, spec: DatasetSpec, record: dict[str, Any],
                budget: int) -> dict[str, Any]:
        """Generate and score one sample; returns its record."""
        prompt, truncated = truncate_middle(tokenizer, record["prompt"], budget)
        ids = tokenizer(prompt)["input_ids"]
        max_gen = self.max_gen or spec.max_gen
        stop = None
        if spec.name == "samsum":  # pred.py also stops samsum at a newline, else the model writes more dialogue
            stop = stop_at_newline(tokenizer.encode("\n", add_special_tokens=False)[-1])
        new = lm.generate(torch.tensor(ids, dtype=torch.long), max_new_tokens=max_gen,
                          eos_token_id=tokenizer.eos_token_id, stop=stop)
        prediction = tokenizer.decode(new, skip_special_tokens=True)
        score = 100 * score_sample(spec.name, spec.metric, prediction, record["answers"], record["all_classes"])
        sample = {"dataset": spec.name, "_id": record["_id"], "prediction": prediction, "answers": record["answers"],
                  "score": score, "category": spec.category, "length": record["length"], "prompt_tokens": len(ids),
                  "truncated": truncated, "context": self.context, "max_length": budget, "max_gen": max_gen,
                  "generated_tokens": len(new)}
        if self.e:
            sample["bucket"] = bucket(record["length"])
        return sample

    def run(self, lm: ScoringLM, tokenizer: Any, options: TaskOptions, log: SampleLog | None = None,
            progress: Callable[[int, int | None], None] | None = None) -> TaskResult:
        log = log if log is not None else SampleLog()
        records = {d: load_records(DATASETS[d], e=self.e, data_dir=options.data_dir, hub_id=self.dataset,
                                   limit=options.max_docs) for d in self.selected}
        if progress is not None:
            progress(0, sum(len(r) for r in records.values()))
        budget = self.prompt_budget(lm, options)
        keyed = [(f"{name}/{record['_id']}", name, record) for name, recs in records.items() for record in recs]
        todo = [item for item in keyed if log.get(item[0]) is None]
        if progress is not None:
            progress(len(keyed) - len(todo), None)

        def predict(item: tuple[str, str, dict[str, Any]]) -> dict[str, Any]:
            _, name, record = item
            return self.predict(lm, tokenizer, DATASETS[name], record, budget)

        for index, sample in map_samples(lm, predict, todo):  # launched processes split the samples
            log.add(todo[index][0], sample)
            if progress is not None:
                progress(1, None)
        samples = [log.get(key) for key, _, _ in keyed]
        if not samples:
            raise DataNotFoundError(f"task {self.name!r}: the selected datasets hold no sample")
        metrics, rows = summarize(samples, e=self.e)
        return TaskResult(metrics=metrics, samples=samples, n=len(samples),
                          context_len=max(s["prompt_tokens"] for s in samples), rows=rows)


def stop_at_newline(newline: int) -> Callable[[list[int]], bool]:
    """Stop once a newline follows some generated text (samsum's extra end-of-sequence token)."""
    return lambda generated: len(generated) > 1 and generated[-1] == newline


def _row(subtask: str, samples: Sequence[dict[str, Any]], value: float) -> MetricRow:
    return MetricRow(subtask, "score", value, len(samples), max(s["prompt_tokens"] for s in samples))


def summarize(samples: list[dict[str, Any]], *, e: bool) -> tuple[dict[str, float], list[MetricRow]]:
    """Headline `score` (mean of the dataset scores, as LongBench averages) and rows per dataset, per category, and
    for LongBench-E per dataset and length bucket and per bucket (mean over the datasets that have it)."""
    by_dataset: dict[str, list[dict[str, Any]]] = {}
    for s in samples:
        by_dataset.setdefault(s["dataset"], []).append(s)
    scores = {d: fmean(s["score"] for s in group) for d, group in by_dataset.items()}
    rows = [_row(d, group, scores[d]) for d, group in by_dataset.items()]
    categories: dict[str, list[str]] = {}
    for d in by_dataset:
        categories.setdefault(DATASETS[d].category, []).append(d)
    for category, names in categories.items():
        rows.append(_row(f"category:{category}", [s for d in names for s in by_dataset[d]],
                         fmean(scores[d] for d in names)))
    if e:
        per_bucket: dict[str, list[float]] = {b: [] for b in BUCKETS}
        for d, group in by_dataset.items():
            for b in BUCKETS:
                inside = [s for s in group if s["bucket"] == b]
                if inside:  # the official scorer_e would report nan for an empty bucket; no row instead
                    value = fmean(s["score"] for s in inside)
                    per_bucket[b].append(value)
                    rows.append(_row(f"{d}/{b}", inside, value))
        for b, values in per_bucket.items():
            if values:
                rows.append(_row(f"length:{b}", [s for s in samples if s["bucket"] == b], fmean(values)))
    return {"score": fmean(scores.values())}, rows


TASKS.register("longbench")(LongBenchTask(name="longbench", version="1.0", e=False))
TASKS.register("longbench-e")(LongBenchTask(name="longbench-e", version="1.0", e=True))
