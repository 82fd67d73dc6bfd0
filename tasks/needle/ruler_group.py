"""`ruler`: RULER's 13 tasks at the same context lengths, headlined by RULER's average over the 13 per length.

RULER's tables (NVIDIA/RULER README, commit c3f5e3b) report, per model and context length, the mean of the 13 task
scores (x100), and the mean of those over the lengths. This task runs the 8 needle variants, vt, cwe, fwe, qa_1
and qa_2 at one set of lengths and writes that: the headline `avg13` (mean over lengths), a row `avg13` per
length, and a row per task and length (`score`, x100). Without the QA files and without the hub (`qa=auto`, the
default) the two QA tasks are left out, one line on stderr says so and how to get them, and the headline is
named `avg11-synthetic`: an 11-task average is not RULER's number and is never labelled as one.
`qa=on` requires the QA data (one-line error before any model work when it is missing); `qa=off` always runs the 11.

The needle variants place their asked needle on the `depths` grid (RULER draws each sample's depth from 40) with
samples // len(depths) prompts per cell (at least one); the other tasks generate `samples` prompts per length.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from statistics import fmean
from typing import Any, Literal, cast

from unimem_bench.tasks.arguments import TaskArgError, arg, task_args
from unimem_bench.tasks.base import TASKS, MetricRow, QueryMode, SampleLog, ScoringLM, TaskOptions, TaskResult
from unimem_bench.tasks.data.hub import DataNotFoundError
from unimem_bench.tasks.needle.haystack import MIN_LENGTH, check_grid, haystack_source
from unimem_bench.tasks.needle.ruler import VARIANTS, PromptBuilder, RulerNeedleTask
from unimem_bench.tasks.needle.ruler_qa import FILES, GET_FILES, check_qa_data, find_file
from unimem_bench.tasks.samples import PrefixedLog

SYNTHETIC = tuple(f"ruler_niah_{v}" for v in VARIANTS) + ("ruler_vt", "ruler_cwe", "ruler_fwe")
QA_TASKS = ("ruler_qa_1", "ruler_qa_2")
GROUP_FACTORS = (1, 2, 4, 8)
"""Default lengths in multiples of the trained context: RULER measures from well inside a model's claimed context
to beyond it; below the trained context cwe's few-shot example and 120 answer tokens leave little haystack."""


def headline_name(with_qa: bool) -> str:
    """What the average is called: RULER's 13-task average only when all 13 ran."""
    return "avg13" if with_qa else "avg11-synthetic"


@dataclass(frozen=True)
class RulerGroup:
    """RULER's 13 tasks (or the 11 synthetic ones when the QA data is missing) at the same lengths."""

    name: str
    version: str
    lengths: tuple[int, ...] = arg(())
    """Context lengths in tokens, prompt plus generation (empty: 1, 2, 4 and 8 x the model's trained context)."""
    samples: int = arg(20)
    """Prompts per task and length (RULER: 500; needle variants spread them over the depths)."""
    depths: tuple[float, ...] = arg((0.0, 0.25, 0.5, 0.75, 1.0))
    """Depths of the needle variants' asked needle."""
    seed: int = arg(42)
    """Seed of every task's prompts."""
    fewshot_tokens: int = arg(500)
    """vt's in-context example at most this long (RULER: 500; also at most 1/8 of the length)."""
    qa: Literal["auto", "on", "off"] = arg("auto")
    """QA tasks: `auto` runs them when --data-dir has squad.json/hotpotqa.json or the hub answers, `on` requires
    them, `off` leaves them out."""
    query_mode: QueryMode = arg("query_agnostic")
    """Every member's `query_mode`: `query_agnostic` compresses each context before the question is seen,
    `query_aware` lets every eviction also score with the question's queries."""
    found_qa: dict[str, bool] = field(default_factory=dict, init=False, compare=False, repr=False)
    """Whether this instance's last check (before any model work) or run found the QA data: the headline names what
    the run averages, and the runner reads it after the run (init=False: every copy starts empty)."""

    def __post_init__(self) -> None:
        check_grid(self.name, self.lengths, self.depths, 1)
        if self.samples < 1:
            raise ValueError(f"{self.name}.samples {self.samples} must be >= 1")

    @property
    def headline(self) -> str:
        """`avg13`, or `avg11-synthetic` when the QA tasks are off or their data was not found."""
        return headline_name(self.qa != "off" and self.found_qa.get("qa", True))

    @property
    def higher_is_better(self) -> dict[str, bool]:
        return {"avg13": True, "avg11-synthetic": True, "score": True}

    def qa_source(self, options: TaskOptions) -> TaskOptions | None:
        """The options the QA tasks read their data with (--data-dir's files, else the hub), or None without data
        (recorded in found_qa)."""
        source = self._qa_source(options)
        self.found_qa["qa"] = source is not None
        return source

    def _qa_source(self, options: TaskOptions) -> TaskOptions | None:
        if self.qa == "off":
            return None
        data_dir = options.data_dir
        if data_dir is not None and all(find_file(data_dir, d) is not None for d in FILES):
            return options
        hub = dataclasses.replace(options, data_dir=None)
        try:
            for task in QA_TASKS:
                TASKS.get(task).check(hub)
        except DataNotFoundError:
            if self.qa == "on":
                raise
            return None
        return hub

    def check(self, options: TaskOptions) -> None:
        for task in SYNTHETIC:
            TASKS.get(task).check(options)
        if self.qa == "on" and options.data_dir is not None:
            missing = [f for d, f in FILES.items() if find_file(options.data_dir, d) is None]
            if missing:
                check_qa_data(self.name, next(d for d, f in FILES.items() if f == missing[0]), options.data_dir)
        elif self.qa_source(options) is None and self.qa == "auto":
            print(f"warning: {self.name}: no QA data (squad.json, hotpotqa.json in --data-dir, nor the hub), so the "
                  f"headline is avg11-synthetic, not RULER's 13-task average; add {GET_FILES} or pass --task-arg "
                  f"{self.name}.qa=off", file=sys.stderr)

    def params(self, options: TaskOptions) -> dict[str, Any]:
        """The members that run (so a run with the QA data never reuses one without it), after `check`."""
        with_qa = self.found_qa["qa"] if "qa" in self.found_qa else self.qa_source(options) is not None
        return {"haystack": haystack_source(options.data_dir), **task_args(self),
                "tasks": [t.name for t in self.tasks(0, with_qa=with_qa)]}

    def resolved_lengths(self, trained_context: int) -> tuple[int, ...]:
        if self.lengths:
            return self.lengths
        return tuple(max(MIN_LENGTH, f * trained_context) for f in GROUP_FACTORS)

    def tasks(self, trained_context: int, *, with_qa: bool) -> list[Any]:
        """The member tasks, each set to the group's lengths, samples, seed and query_mode."""
        lengths = self.resolved_lengths(trained_context) if trained_context else self.lengths
        common = {"lengths": lengths, "seed": self.seed, "query_mode": self.query_mode}
        out = []
        for name in SYNTHETIC + (QA_TASKS if with_qa else ()):
            task = TASKS.get(name)
            if name.startswith("ruler_niah_"):
                args = {**common, "depths": self.depths, "samples": max(1, self.samples // len(self.depths))}
            elif name in ("ruler_vt", "ruler_cwe", "ruler_fwe"):
                args = {**common, "samples": self.samples, "fewshot_tokens": self.fewshot_tokens}
            else:
                args = {**common, "samples": self.samples}
            out.append(dataclasses.replace(cast(Any, task), **args))
        return out

    def fitting_lengths(self, members: list[Any], tokenizer: Any, options: TaskOptions,
                        trained_context: int) -> tuple[int, ...]:
        """The lengths every member's smallest prompt fits: all given ones (else a one-line error naming the task),
        or the default ones that fit."""
        lengths = self.resolved_lengths(trained_context)
        misfits = {n: [t.name for t in members if not member_fits(t, tokenizer, options, n)] for n in lengths}
        if self.lengths:
            bad = [(n, names) for n, names in misfits.items() if names]
            if bad:
                n, names = bad[0]
                raise TaskArgError(f"{self.name}.lengths {n}: too short for {', '.join(names)} (RULER's prompts "
                                   f"with this tokenizer); use longer lengths")
            return lengths
        kept = tuple(n for n in lengths if not misfits[n])
        if not kept:
            raise TaskArgError(f"{self.name}: no default length holds every task's prompt; give "
                               f"--task-arg {self.name}.lengths=...")
        return kept

    def run(self, lm: ScoringLM, tokenizer: Any, options: TaskOptions, log: SampleLog | None = None,
            progress: Callable[[int, int | None], None] | None = None) -> TaskResult:
        log = log if log is not None else SampleLog()
        qa_options = self.qa_source(options)
        total = 0

        def sub_progress(advance: int, new_total: int | None) -> None:
            nonlocal total
            if progress is None:
                return
            if new_total is not None:
                total += new_total
                progress(0, total)
            progress(advance, None)

        members = self.tasks(lm.trained_context, with_qa=qa_options is not None)
        lengths = self.fitting_lengths(members, tokenizer, options, lm.trained_context)
        members = [dataclasses.replace(task, lengths=lengths) for task in members]
        samples: list[dict[str, Any]] = []
        for task in members:
            task_options = qa_options if task.name in QA_TASKS else options
            result = task.run(lm, tokenizer, task_options, PrefixedLog(log, task.name), progress=sub_progress)
            samples += [{"task": task.name.removeprefix("ruler_"), **s} for s in result.samples]
        return summarize(samples, with_qa=qa_options is not None)


def member_fits(task: Any, tokenizer: Any, options: TaskOptions, length: int) -> bool:
    """Whether a member's smallest prompt and generation fit `length` (QA prompts are checked as they are built)."""
    if isinstance(task, RulerNeedleTask):
        return PromptBuilder(task, tokenizer, options, length).fits(length, 0.0, 0, 0)
    return task.fits(tokenizer, options, length) if hasattr(task, "fits") else True


def sample_score(sample: dict[str, Any]) -> float:
    """A member sample's score in [0, 1] (needle variants record `accuracy`, the others `score`)."""
    return float(sample["accuracy"] if "accuracy" in sample else sample["score"])


def summarize(samples: list[dict[str, Any]], *, with_qa: bool) -> TaskResult:
    """RULER's table: per length the mean over tasks of each task's mean score x100, then the mean over lengths."""
    name = headline_name(with_qa)
    tasks = list(dict.fromkeys(s["task"] for s in samples))
    lengths = sorted({s["context_len"] for s in samples})
    rows: list[MetricRow] = []
    per_length = {}
    for length in lengths:
        scores = []
        for task in tasks:
            group = [s for s in samples if s["task"] == task and s["context_len"] == length]
            value = 100 * fmean(sample_score(s) for s in group)
            scores.append(value)
            rows.append(MetricRow(task, "score", value, len(group), length))
        per_length[length] = fmean(scores)
        rows.append(MetricRow(name, "score", per_length[length], len(tasks), length))
    return TaskResult(metrics={name: fmean(per_length.values())}, samples=samples, n=len(samples),
                      context_len=max(lengths), rows=rows)


TASKS.register("ruler")(RulerGroup(name="ruler", version="1.0"))
