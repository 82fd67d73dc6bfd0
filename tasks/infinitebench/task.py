"""`infinitebench`: InfiniteBench's 12 released tasks (En.Sum, En.QA, En.MC, En.Dia, Zh.QA, Code.Debug, Code.Run,
Math.Calc, Math.Find, Retrieve.PassKey, Retrieve.Number, Retrieve.KV) from the official files.

As OpenBMB/InfiniteBench at commit 88b3daa runs an open model (src/eval_yarn_mistral.py): the yarn-mistral prompt,
the prompt's tokens truncated in the middle to `max_length` (first and last half kept, decoded and re-encoded), greedy
generation of the task's official length, and compute_scores.py's scorer (x100 here). Data: `--data-dir DIR` with
the official `<task>.jsonl` files, else the hub dataset `xinrongzhang2022/InfiniteBench` (one split per task).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from statistics import fmean
from typing import Any

from unimem_bench.tasks.arguments import arg, task_args
from unimem_bench.tasks.base import (
    TASKS,
    MetricRow,
    SampleLog,
    ScoringLM,
    TaskOptions,
    TaskResult,
    generate_at_once,
    map_samples,
)
from unimem_bench.tasks.data.hub import DataNotFoundError, check_hub_dataset, hub_records
from unimem_bench.tasks.infinitebench.metrics import score_one
from unimem_bench.tasks.infinitebench.prompts import MAX_NEW_TOKENS, SHORT_NAMES, TASK_NAMES, create_prompt, get_answer
from unimem_bench.tasks.samples import encode, prompt_fields, truncate_middle_ids

HUB_ID = "xinrongzhang2022/InfiniteBench"
LOCAL = "the official InfiniteBench files (<task>.jsonl, e.g. passkey.jsonl, longbook_qa_eng.jsonl)"


def read_jsonl(path: Path) -> Iterator[dict[str, Any]]:
    with path.open(encoding="utf-8") as f:
        yield from (json.loads(line) for line in f if line.strip())


def load_examples(task: str, data_dir: Path | None, limit: int | None) -> list[dict[str, Any]]:
    if data_dir is not None:
        return list(islice(read_jsonl(data_dir / f"{task}.jsonl"), limit))
    try:
        return list(islice(hub_records(HUB_ID, split=task), limit))
    except Exception as err:  # a split missing or the network gone mid-run: name both ways out
        raise DataNotFoundError(f"hub dataset {HUB_ID!r} split {task!r} could not be read ({type(err).__name__}); "
                                f"pass --data-dir DIR with {task}.jsonl") from None


@dataclass(frozen=True)
class InfiniteBenchTask:
    """InfiniteBench from files or the hub: a score (x100) per task and their mean."""

    name: str
    version: str
    tasks: tuple[str, ...] = arg(())
    """Tasks to run (empty = all 12; names as the files: longbook_qa_eng, code_debug ...)."""
    max_length: int = arg(0)
    """Prompt tokens kept by the middle truncation (0 = the model's trained context; InfiniteBench: 128K)."""
    max_new_tokens: int = arg(0)
    """Tokens generated at most (0 = the official per-task lengths, 3 to 30,000)."""
    headline: str = "score"

    @property
    def higher_is_better(self) -> dict[str, bool]:
        return {"score": True}

    def __post_init__(self) -> None:
        unknown = [t for t in self.tasks if t not in TASK_NAMES]
        if unknown:
            raise ValueError(f"{self.name}.tasks: {unknown[0]!r} is not an InfiniteBench task; choose from "
                             f"{', '.join(TASK_NAMES)}")
        if self.max_length < 0 or self.max_new_tokens < 0:
            raise ValueError(f"{self.name}: max_length and max_new_tokens must be >= 0 (0 = the default)")

    @property
    def selected(self) -> tuple[str, ...]:
        return tuple(t for t in TASK_NAMES if t in self.tasks) if self.tasks else TASK_NAMES

    def check(self, options: TaskOptions) -> None:
        if options.data_dir is None:
            check_hub_dataset(HUB_ID, task=self.name, local=LOCAL)
            return
        missing = [f"{t}.jsonl" for t in self.selected if not (options.data_dir / f"{t}.jsonl").is_file()]
        if missing:
            raise DataNotFoundError(f"task {self.name!r}: --data-dir {options.data_dir} lacks {', '.join(missing[:3])}"
                                    f"{' and more' if len(missing) > 3 else ''}; add {LOCAL} or select fewer with "
                                    f"--task-arg {self.name}.tasks=NAME,...")

    def params(self, options: TaskOptions) -> dict[str, Any]:
        return {"data": str(options.data_dir) if options.data_dir else HUB_ID, "max_docs": options.max_docs,
                **task_args(self), "tasks": list(self.selected)}

    def run(self, lm: ScoringLM, tokenizer: Any, options: TaskOptions, log: SampleLog | None = None,
            progress: Callable[[int, int | None], None] | None = None) -> TaskResult:
        log = log if log is not None else SampleLog()
        examples = {t: load_examples(t, options.data_dir, options.max_docs) for t in self.selected}
        if progress is not None:
            progress(0, sum(len(e) for e in examples.values()))
        budget = self.max_length or lm.trained_context
        items = [(task, eg, f"{task}/{eg.get('id', i)}") for task, egs in examples.items() for i, eg in enumerate(egs)]
        if progress is not None:
            progress(sum(log.get(key) is not None for *_, key in items), None)

        def run_prompt(item: tuple[str, dict[str, Any], str]) -> dict[str, Any]:
            task, eg, key = item
            return {"key": key, **self.predict(lm, tokenizer, task, eg, budget)}

        todo = [item for item in items if log.get(item[2]) is None]
        for _, sample in map_samples(lm, run_prompt, todo):  # launched processes split the prompts
            log.add(sample["key"], sample)
            if progress is not None:
                progress(1, None)
        samples = [log.done[key] for *_, key in items]
        if not samples:
            raise DataNotFoundError(f"task {self.name!r}: the selected tasks hold no sample")
        return summarize(samples)

    def predict(self, lm: ScoringLM, tokenizer: Any, task: str, eg: dict[str, Any], budget: int) -> dict[str, Any]:
        """eval_yarn_mistral.get_pred: prompt, middle truncation (decode, re-encode), greedy generation, score."""
        ids = encode(tokenizer, create_prompt(eg, task), bos=False)
        truncated = len(ids) > budget
        if truncated:
            ids = encode(tokenizer, tokenizer.decode(truncate_middle_ids(ids, budget), skip_special_tokens=True),
                         bos=False)
        ids = encode(tokenizer, "", bos=True) + ids
        max_new = self.max_new_tokens or MAX_NEW_TOKENS[task]
        new = generate_at_once(lm, ids, max_new_tokens=max_new, eos_token_id=tokenizer.eos_token_id)
        prediction = tokenizer.decode(new, skip_special_tokens=True)
        label = get_answer(eg, task)
        return {"task": task, "id": eg.get("id"), **prompt_fields(ids), "truncated": truncated, "max_length": budget,
                "prediction": prediction, "answers": label, "new_tokens": len(new),
                "score": 100 * score_one(task, prediction, label)}


def summarize(samples: list[dict[str, Any]]) -> TaskResult:
    """Headline `score`: the mean of the task scores; a row per task (its InfiniteBench name)."""
    tasks = list(dict.fromkeys(s["task"] for s in samples))
    scores = {t: fmean(s["score"] for s in samples if s["task"] == t) for t in tasks}
    rows = [MetricRow(SHORT_NAMES[t], "score", scores[t], sum(s["task"] == t for s in samples),
                      max(s["prompt_tokens"] for s in samples if s["task"] == t)) for t in tasks]
    return TaskResult(metrics={"score": fmean(scores.values())}, samples=samples, n=len(samples),
                      context_len=max(s["prompt_tokens"] for s in samples), rows=rows)


TASKS.register("infinitebench")(InfiniteBenchTask(name="infinitebench", version="1.0"))
