"""`babilong`: BABILong (Kuratov et al., 2024, arXiv 2406.10149) qa1-qa5 from the official data.

As booydar/babilong's scripts/run_model_on_babilong.py runs a model (commit 7a6efee): the prompt with instruction,
examples and post prompt, no chat template, tokenised with special tokens, 20 new tokens greedily, and
compare_answers against the task's labels. Data: `--data-dir DIR` with the files data/create_tasks.py writes
(`DIR/<task>/<length>.json`: [{input, question, target}]), else the hub dataset `RMT-team/babilong` (config =
length, split = task). Lengths are BABILong's names (0k = the facts alone, 1k = 1,000 GPT-2 tokens of PG-19 text
around them, ... 128k); the default runs 0k up to 8x the model's trained context, i.e. beyond what it was trained on.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from statistics import fmean
from typing import Any

from unimem_bench.tasks.arguments import arg, task_args
from unimem_bench.tasks.babilong.prompts import MAX_NEW_TOKENS, TASK_LABELS, compare_answers, task_prompt
from unimem_bench.tasks.babilong.prompts import TASKS as QA_TASKS
from unimem_bench.tasks.base import (
    TASKS,
    AccuracyHeadline,
    MetricRow,
    SampleLog,
    ScoringLM,
    TaskOptions,
    TaskResult,
    generate_at_once,
    map_samples,
)
from unimem_bench.tasks.data.hub import DataNotFoundError, check_hub_dataset, hub_records
from unimem_bench.tasks.samples import encode, prompt_fields

HUB_ID = "RMT-team/babilong"
SPLITS = ("0k", "1k", "2k", "4k", "8k", "16k", "32k", "64k", "128k", "256k", "512k", "1M")
LOCAL = "BABILong's files (<task>/<length>.json as data/create_tasks.py writes them, e.g. qa1/0k.json)"


def split_tokens(split: str) -> int:
    """The nominal context length of a split in tokens (BABILong counts 1k as 1,000)."""
    return 1_000_000 if split == "1M" else int(split[:-1]) * 1000


def default_splits(trained_context: int) -> tuple[str, ...]:
    """0k up to 8x the trained context: inside the model's context and beyond it."""
    return tuple(s for s in SPLITS if split_tokens(s) <= 8 * trained_context)


def load_split(task: str, split: str, data_dir: Path | None, limit: int | None) -> list[dict[str, Any]]:
    if data_dir is not None:
        rows = json.loads((data_dir / task / f"{split}.json").read_text(encoding="utf-8"))
        return rows[:limit] if limit else rows
    try:
        return list(islice(hub_records(HUB_ID, name=split, split=task), limit))
    except Exception as err:  # a config missing or the network gone mid-run: name both ways out
        raise DataNotFoundError(f"hub dataset {HUB_ID!r} {split}/{task} could not be read ({type(err).__name__}); "
                                f"pass --data-dir DIR with {task}/{split}.json") from None


def predict(lm: ScoringLM, tokenizer: Any, task: str, context: str, question: str, target: str) -> dict[str, Any]:
    """One official BABILong prediction and its check."""
    ids = encode(tokenizer, task_prompt(task, context, question))
    new = generate_at_once(lm, ids, max_new_tokens=MAX_NEW_TOKENS, eos_token_id=tokenizer.eos_token_id)
    output = tokenizer.decode(new, skip_special_tokens=True).strip()
    return {**prompt_fields(ids), "question": question, "prediction": output, "answers": [target],
            "accuracy": float(compare_answers(target, output, question, TASK_LABELS[task]))}


def summarize(samples: list[dict[str, Any]]) -> TaskResult:
    """Headline: accuracy over every sample; rows per task and length, per length (`length`) and per task."""
    rows = []
    lengths = sorted({s["context_len"] for s in samples})
    tasks = list(dict.fromkeys(s["task"] for s in samples))
    for length in lengths:
        at = [s for s in samples if s["context_len"] == length]
        for task in tasks:
            cell = [s for s in at if s["task"] == task]
            if cell:
                rows.append(MetricRow(task, "accuracy", fmean(s["accuracy"] for s in cell), len(cell), length))
        rows.append(MetricRow("length", "accuracy", fmean(s["accuracy"] for s in at), len(at), length))
    return TaskResult(metrics={"accuracy": fmean(s["accuracy"] for s in samples)}, samples=samples, n=len(samples),
                      context_len=max(lengths), rows=rows)


@dataclass(frozen=True)
class BabilongTask(AccuracyHeadline):
    """BABILong qa1-qa5 at BABILong's lengths, from files or the hub."""

    name: str
    version: str
    tasks: tuple[str, ...] = arg(QA_TASKS)
    """Which of qa1 ... qa5 to run."""
    lengths: tuple[str, ...] = arg(())
    """BABILong split names (0k, 1k, 2k ... 128k; empty: 0k up to 8x the model's trained context)."""

    def __post_init__(self) -> None:
        if not self.tasks or any(t not in QA_TASKS for t in self.tasks):
            raise ValueError(f"{self.name}.tasks: choose from {', '.join(QA_TASKS)}")
        if any(s not in SPLITS for s in self.lengths):
            raise ValueError(f"{self.name}.lengths: choose from {', '.join(SPLITS)}")

    def check(self, options: TaskOptions) -> None:
        if options.data_dir is None:
            check_hub_dataset(HUB_ID, task=self.name, local=LOCAL)
            return
        missing = [f"{t}/{s}.json" for t in self.tasks for s in (self.lengths or ("0k",))
                   if not (options.data_dir / t / f"{s}.json").is_file()]
        if missing:
            raise DataNotFoundError(f"task {self.name!r}: --data-dir {options.data_dir} lacks {missing[0]}; add "
                                    f"{LOCAL}, or run babilong-synthetic for generated samples on your own books")

    def params(self, options: TaskOptions) -> dict[str, Any]:
        return {"data": str(options.data_dir) if options.data_dir else HUB_ID, "max_docs": options.max_docs,
                **task_args(self)}

    def run(self, lm: ScoringLM, tokenizer: Any, options: TaskOptions, log: SampleLog | None = None,
            progress: Callable[[int, int | None], None] | None = None) -> TaskResult:
        log = log if log is not None else SampleLog()
        splits = self.lengths or default_splits(lm.trained_context)
        data = {(t, s): load_split(t, s, options.data_dir, options.max_docs) for t in self.tasks for s in splits}
        if progress is not None:
            progress(0, sum(len(rows) for rows in data.values()))
        items = [(task, split, row, f"{task}/{split}/{i}") for (task, split), rows in data.items()
                 for i, row in enumerate(rows)]
        if progress is not None:
            progress(sum(log.get(key) is not None for *_, key in items), None)

        def run_prompt(item: tuple[str, str, dict[str, Any], str]) -> dict[str, Any]:
            task, split, row, key = item
            return {"key": key, "task": task, "split": split, "context_len": split_tokens(split),
                    **predict(lm, tokenizer, task, row["input"], row["question"], row["target"])}

        todo = [item for item in items if log.get(item[3]) is None]
        for _, sample in map_samples(lm, run_prompt, todo):  # launched processes split the prompts
            log.add(sample["key"], sample)
            if progress is not None:
                progress(1, None)
        samples = [log.done[key] for *_, key in items]
        if not samples:
            raise DataNotFoundError(f"task {self.name!r}: the selected splits hold no sample")
        return summarize(samples)


TASKS.register("babilong")(BabilongTask(name="babilong", version="1.0"))
