"""LongBench v1 (21 datasets) and LongBench-E (13 datasets in 0-4k / 4-8k / 8k+ length buckets), run as the official
`pred.py` and `eval.py` do.

Each sample's prompt is the dataset's official template filled with the record; a prompt longer than `max_length`
tokens keeps its first and last `max_length // 2` tokens (decoded and re-encoded, as pred.py does). `max_length`
defaults to THUDM's model2maxlen convention, room for the answer inside the trained context: the trained context
minus the largest generation length of the selected datasets (3,584 for a 4K model on all 21). A method without
memory reads the prompt and its generation at once; a memory method streams the prompt through its segments. The
method generates greedily up to the dataset's official length, stopping at EOS (samsum also at a newline, and never
before one new token: pred.py's min_length); the prediction is scored by the dataset's official metric (first line
only for trec, triviaqa, samsum and lsht; best over the answers) x100. Memory methods can instead read the whole
prompt: `context=stream` streams it through the method's segments, cut head-plus-tail only beyond
`stream_max_tokens`. Which was used is in the params and every sample, with the prompt's token count and a hash of
its ids (`save_prompts=true` adds the prompt text).

Scores as the official tables report them: per language, `score/en` and `score/zh`, the mean of that language's
category means (the code datasets count in both languages, as in THUDM's tables); `score/dataset_mean` is the plain
mean over the selected datasets; rows per dataset and per `category:<name>/<language>`.

Not reproduced: pred.py's chat wrappers (build_chat) for chat models (this harness evaluates base models through the
memory engine).

Data: `--data-dir DIR` with the official files `DIR/<dataset>.jsonl` (`<dataset>_e.jsonl` for LongBench-E; also
found in `DIR/data/`, where THUDM/LongBench's data.zip unpacks), or the hub parquet mirror lm-eval uses.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import islice
from statistics import fmean
from typing import Any, Literal

from unimem_bench.tasks.arguments import TaskArgError, arg, task_args
from unimem_bench.tasks.base import (
    TASKS,
    MetricRow,
    QueryMode,
    SampleLog,
    ScoringLM,
    TaskOptions,
    TaskResult,
    generate_at_once,
    ids_digest,
    map_samples,
    question_kwargs,
)
from unimem_bench.tasks.data.files import read_jsonl
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
    """Prompt tokens kept by the head-plus-tail truncation (0 = THUDM's model2maxlen convention: the trained
    context minus the largest generation length of the selected datasets, so prompt and answer fit it)."""
    context: Literal["truncate", "stream"] = arg("truncate")
    """`truncate`: the official truncation to max_length; `stream`: the whole prompt streams through the method's
    segments and memory, truncated only beyond stream_max_tokens."""
    stream_max_tokens: int = arg(32_768)
    """Prompt tokens kept in `stream` mode; 32K holds nearly every LongBench prompt for LLaMA-style tokenizers
    (6.7K English words on average) while bounding the slowest sample."""
    max_gen: int = arg(0)
    """Tokens generated at most (0 = the official per-dataset lengths, 32 to 512)."""
    save_prompts: bool = arg(False)
    """Write each prompt's text into its sample record (every record has its token count and a hash of its ids)."""
    query_mode: QueryMode = arg("query_agnostic")
    """`query_agnostic`: a compressing memory compresses the context before it sees the question; `query_aware`
    (kvpress' query_aware): every eviction also scores with the question's queries (the prompt after the context)."""
    headline: str = "score/en"

    @property
    def higher_is_better(self) -> dict[str, bool]:
        # The official metrics (F1, ROUGE-L, accuracy, edit similarity) x100, per row and in every average.
        return {"score": True, "score/en": True, "score/zh": True, "score/dataset_mean": True}

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

    @property
    def largest_gen(self) -> int:
        """The most tokens any selected dataset generates."""
        return self.max_gen or max(DATASETS[d].max_gen for d in self.selected)

    def default_max_length(self, trained_context: int) -> int:
        """`max_length` when not given: the trained context less the largest generation length (model2maxlen)."""
        return trained_context - self.largest_gen

    def check(self, options: TaskOptions) -> None:
        self.check_data(options)
        if options.trained_context is not None:
            self.prompt_budget(options.trained_context, options)  # a prompt must fit beside the answer

    def check_data(self, options: TaskOptions) -> None:
        if options.data_dir is None:
            check_hub_dataset(self.dataset, task=self.name, local=self.local_data)
            return
        if not options.data_dir.is_dir():
            raise DataNotFoundError(f"task {self.name!r}: --data-dir {options.data_dir} is not a folder")
        found = {d: find_file(options.data_dir, d, self.e) for d in self.selected}
        missing = [file_name(d, self.e) for d, path in found.items() if path is None]
        if missing:
            more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
            raise DataNotFoundError(f"task {self.name!r}: --data-dir {options.data_dir} lacks "
                                    f"{', '.join(missing[:3])}{more}; add {self.local_data} or select fewer with "
                                    f"--task-arg {self.name}.datasets=NAME,...")
        for path in filter(None, found.values()):  # the rows the run will read: a broken line fails now, naming
            deque(islice(read_jsonl(path), options.max_docs), maxlen=0)  # the file and line

    def params(self, options: TaskOptions) -> dict[str, Any]:
        params = {"data": str(options.data_dir) if options.data_dir else self.dataset, "max_docs": options.max_docs,
                  "max_tokens": options.max_tokens, **task_args(self), "datasets": list(self.selected)}
        if options.trained_context is not None:
            params["prompt_budget"] = self.prompt_budget(options.trained_context, options)
        return params

    def prompt_budget(self, trained_context: int, options: TaskOptions) -> int:
        """Prompt tokens kept: max_length (default: `default_max_length`), stream_max_tokens when streaming, and
        never more than --max-tokens."""
        if self.context == "stream":
            budget = self.stream_max_tokens
        else:
            budget = self.max_length or self.default_max_length(trained_context)
        if budget < 1:
            longest = max(self.selected, key=lambda d: DATASETS[d].max_gen)
            source = f"max_gen={self.max_gen}" if self.max_gen else f"{longest} generates {self.largest_gen}"
            raise TaskArgError(f"task {self.name!r}: a trained context of {trained_context} tokens leaves no prompt "
                               f"({source} new tokens); lower --task-arg {self.name}.max_gen=N, select datasets with "
                               f"{self.name}.datasets=..., or set {self.name}.max_length=N")
        return min(budget, options.max_tokens) if options.max_tokens else budget

    def predict(self, lm: ScoringLM, tokenizer: Any, spec: DatasetSpec, record: dict[str, Any],
                budget: int) -> dict[str, Any]:
        """Generate and score one sample; returns its record."""
        prompt, truncated = truncate_middle(tokenizer, record["prompt"], budget)
        ids = tokenizer(prompt)["input_ids"]
        max_gen = self.max_gen or spec.max_gen
        eos, min_new = tokenizer.eos_token_id, 0
        if spec.name == "samsum":
            # pred.py: a newline also ends samsum (else the model writes more dialogue), and min_length = prompt + 1
            # forbids both as the first token.
            eos, min_new = [eos, tokenizer.encode("\n", add_special_tokens=False)[-1]], 1
        question = tokenizer(record["question"], add_special_tokens=False)["input_ids"] if record["question"] else []
        new = generate_at_once(lm, ids, max_new_tokens=max_gen, eos_token_id=eos, min_new_tokens=min_new,
                               **question_kwargs(self.query_mode, question))
        prediction = tokenizer.decode(new, skip_special_tokens=True)
        score = 100 * score_sample(spec.name, spec.metric, prediction, record["answers"], record["all_classes"])
        sample = {"dataset": spec.name, "_id": record["_id"], "prediction": prediction, "answers": record["answers"],
                  "score": score, "category": spec.category, "language": spec.language, "length": record["length"],
                  "prompt_tokens": len(ids), "prompt_ids_sha256": ids_digest(ids), "truncated": truncated,
                  "context": self.context, "max_length": budget, "max_gen": max_gen, "generated_tokens": len(new),
                  "query_mode": self.query_mode}
        if self.save_prompts:
            sample["prompt"] = prompt
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
        budget = self.prompt_budget(lm.trained_context, options)
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
        samples = [log.done[key] for key, _, _ in keyed]
        if not samples:
            raise DataNotFoundError(f"task {self.name!r}: the selected datasets hold no sample")
        metrics, rows = summarize(samples, e=self.e)
        return TaskResult(metrics=metrics, samples=samples, n=len(samples),
                          context_len=max(s["prompt_tokens"] for s in samples), rows=rows)


def _row(subtask: str, samples: Sequence[dict[str, Any]], value: float) -> MetricRow:
    return MetricRow(subtask, "score", value, len(samples), max(s["prompt_tokens"] for s in samples))


LANGUAGES = ("en", "zh")


def language_datasets(language: str, datasets: Sequence[str]) -> list[str]:
    """The datasets of `datasets` that a language's official average covers: its own and the code datasets (THUDM's
    English and Chinese tables both hold the code category)."""
    return [d for d in datasets if DATASETS[d].language == language or DATASETS[d].category == "code"]


def summarize(samples: list[dict[str, Any]], *, e: bool) -> tuple[dict[str, float], list[MetricRow]]:
    """Headline `score/<language>` (the mean of that language's category means, as the official tables average) for
    each language with a dataset of its own, `score/dataset_mean` (the mean of the dataset scores), and rows per
    dataset, per `category:<name>/<language>`, and for LongBench-E per dataset and length bucket and per bucket
    (mean over the datasets that have it)."""
    by_dataset: dict[str, list[dict[str, Any]]] = {}
    for s in samples:
        by_dataset.setdefault(s["dataset"], []).append(s)
    scores = {d: fmean(s["score"] for s in group) for d, group in by_dataset.items()}
    rows = [_row(d, group, scores[d]) for d, group in by_dataset.items()]
    metrics = {}
    for language in LANGUAGES:
        names = language_datasets(language, list(by_dataset))
        if not any(DATASETS[d].language == language and DATASETS[d].category != "code" for d in names):
            continue  # the code datasets alone make no language score
        categories: dict[str, list[str]] = {}
        for d in names:
            categories.setdefault(DATASETS[d].category, []).append(d)
        means = {c: fmean(scores[d] for d in group) for c, group in categories.items()}
        for category, group in categories.items():
            rows.append(_row(f"category:{category}/{language}", [s for d in group for s in by_dataset[d]],
                             means[category]))
        metrics[f"score/{language}"] = fmean(means.values())
    metrics["score/dataset_mean"] = fmean(scores.values())
    if e:
        per_bucket: dict[str, list[float]] = {b: [] for b in BUCKETS}
        for d, in_dataset in by_dataset.items():
            for b in BUCKETS:
                inside = [s for s in in_dataset if s["bucket"] == b]
                if inside:  # the official scorer_e would report nan for an empty bucket; no row instead
                    value = fmean(s["score"] for s in inside)
                    per_bucket[b].append(value)
                    rows.append(_row(f"{d}/{b}", inside, value))
        for b, values in per_bucket.items():
            if values:
                rows.append(_row(f"length:{b}", [s for s in samples if s["bucket"] == b], fmean(values)))
    return metrics, rows


TASKS.register("longbench")(LongBenchTask(name="longbench", version="2.0", e=False))
TASKS.register("longbench-e")(LongBenchTask(name="longbench-e", version="2.0", e=True))
