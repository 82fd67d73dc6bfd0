"""`infinitebench-synthetic`: InfiniteBench's retrieval tasks (Retrieve.PassKey, Retrieve.Number, Retrieve.KV)
generated offline by the benchmark's own rules, at the lengths of this model.

Rules from OpenBMB/InfiniteBench at commit 88b3daa, `data/construct_synthetic_dataset.py`: passkey and number_string
repeat the noise line "The grass is green. ... There and back again.\\n" j times before the answer line and the rest
after it; the passkey is 5 random digits, the number string 5 random digits with 5 of them duplicated in place
(10 digits); kv_retrieval is "JSON data:\\n{...}" of UUID key-value pairs (lost-in-the-middle's generator draws
uuid4s) and the question names one key. Prompts are the yarn-mistral templates, generation lengths 6 / 12 / 50,
scores the official ones (first integer equal; the value among the answer's words).

Here the noise lines (or pairs) are as many as fit the length (InfiniteBench fixes them for 128K tokens), the answer
sits `depth` of the way through them (InfiniteBench steps it evenly over the context; a depth grid draws the same
sweep), and `samples` prompts per cell (InfiniteBench: 5 for passkey, 10 for number_string, one per position for kv).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass
from statistics import fmean
from typing import Any

from unimem_bench.tasks.arguments import arg, task_args
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
from unimem_bench.tasks.infinitebench.metrics import score_one
from unimem_bench.tasks.infinitebench.prompts import MAX_NEW_TOKENS, SHORT_NAMES, create_prompt
from unimem_bench.tasks.needle.haystack import DEFAULT_DEPTHS, check_grid, depth_label, resolve_lengths
from unimem_bench.tasks.needle.lengths import Fitter, sample_rng
from unimem_bench.tasks.samples import prompt_fields

NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.\n"
ANSWER_LINES = {"passkey": "The pass key is {key}. Remember it. {key} is the pass key.\n",
                "number_string": "The sequence of digits is {key}. Remember it. {key} is the sequence of digits.\n"}
QUESTIONS = {"passkey": "What is the pass key?", "number_string": "What is the sequence of digits?"}
SYNTHETIC = ("passkey", "number_string", "kv_retrieval")


def passkey_key(rng: Any) -> str:
    return "".join(str(rng.randint(0, 9)) for _ in range(5))


def number_string_key(rng: Any) -> str:
    """5 random digits, then 5 times a digit duplicated in place (build_number_string)."""
    keys = [str(rng.randint(0, 9)) for _ in range(5)]
    for k in range(5):
        pos = rng.randint(0, 5 + k - 1)
        keys.insert(pos, keys[pos])
    return "".join(keys)


def noise_example(task: str, n_noise: int, depth: float, key: str) -> dict[str, Any]:
    """An official-format record: `depth` of the n noise lines before the answer line."""
    j = round(n_noise * depth)
    context = NOISE * j + ANSWER_LINES[task].format(key=key) + NOISE * (n_noise - j)
    return {"context": context, "input": QUESTIONS[task], "answer": key}


def kv_example(rng: Any, n_pairs: int, depth: float) -> dict[str, Any]:
    """build_kv_retrieval's record with n uuid4 pairs, the asked key `depth` of the way through them."""
    pairs = [(str(uuid.UUID(int=rng.getrandbits(128), version=4)), str(uuid.UUID(int=rng.getrandbits(128), version=4)))
             for _ in range(n_pairs)]
    text = "JSON data:\n{" + ", ".join(f'"{k}": "{v}"' for k, v in pairs) + "}"
    key, value = pairs[min(int(n_pairs * depth), n_pairs - 1)]
    return {"context": text, "input": f'\nKey: "{key}"\nThe value associated with the specified key is: ',
            "answer": value}


@dataclass(frozen=True)
class InfiniteBenchSynthetic(AccuracyHeadline):
    """Retrieve.PassKey, Retrieve.Number and Retrieve.KV over a length x depth grid."""

    name: str
    version: str
    tasks: tuple[str, ...] = arg(SYNTHETIC)
    """Which of passkey, number_string, kv_retrieval to run."""
    lengths: tuple[int, ...] = arg(())
    """Context lengths in tokens, prompt plus generation (empty: 1/4 to 8 x the model's trained context)."""
    depths: tuple[float, ...] = arg(DEFAULT_DEPTHS)
    """Where the answer sits among the noise lines or pairs."""
    samples: int = arg(2)
    """Prompts per task and cell."""
    seed: int = arg(42)
    """Seed of the keys and values."""

    def __post_init__(self) -> None:
        check_grid(self.name, self.lengths, self.depths, max(MAX_NEW_TOKENS[t] for t in SYNTHETIC))
        unknown = [t for t in self.tasks if t not in SYNTHETIC]
        if unknown or not self.tasks:
            raise ValueError(f"{self.name}.tasks: choose from {', '.join(SYNTHETIC)}")
        if self.samples < 1:
            raise ValueError(f"{self.name}.samples {self.samples} must be >= 1")

    def check(self, options: TaskOptions) -> None:
        """Generated offline: nothing to check."""

    def params(self, options: TaskOptions) -> dict[str, Any]:
        return task_args(self)

    def maker(self, task: str, depth: float) -> Callable[[int, int, int], tuple[str, list[str]]]:
        def make(length: int, sample: int, n: int) -> tuple[str, list[str]]:
            rng = sample_rng(self.seed, self.name, task, length, depth, sample)
            eg = kv_example(rng, n, depth) if task == "kv_retrieval" else noise_example(
                task, n, depth, passkey_key(rng) if task == "passkey" else number_string_key(rng))
            return create_prompt(eg, task), [eg["answer"]]

        return make

    def run(self, lm: ScoringLM, tokenizer: Any, options: TaskOptions, log: SampleLog | None = None,
            progress: Callable[[int, int | None], None] | None = None) -> TaskResult:
        log = log if log is not None else SampleLog()
        lengths = resolve_lengths(self.lengths, lm.trained_context)
        fitters = {(t, float(d)): Fitter(self.name, tokenizer, MAX_NEW_TOKENS[t], self.maker(t, float(d)), start=1)
                   for t in self.tasks for d in self.depths}
        if not self.lengths:  # default lengths too short for a prompt are left out
            lengths = [n for n in lengths if all(f.fits(n, 0, 1) for f in fitters.values())] or lengths
        for fitter in fitters.values():  # checked before the first prompt runs
            for length in lengths:
                fitter.require(length)
        keys = [(t, n, float(d), i, f"{t}/L={n}/{depth_label(d)}/sample={i}")
                for t in self.tasks for n in lengths for d in self.depths for i in range(self.samples)]
        if progress is not None:
            progress(0, len(keys))
            progress(sum(log.get(k[-1]) is not None for k in keys), None)

        def run_prompt(item: tuple[str, int, float, int, str]) -> dict[str, Any]:
            task, length, depth, i, key = item
            ids, built = fitters[task, depth].build(length, i)
            new = generate_at_once(lm, ids, max_new_tokens=MAX_NEW_TOKENS[task],
                              eos_token_id=tokenizer.eos_token_id)
            prediction = tokenizer.decode(new, skip_special_tokens=True)
            return {"key": key, "task": task, "context_len": length, "depth": depth, "sample": i,
                    **prompt_fields(ids), "haystack_units": built.n, "prediction": prediction,
                    "answers": built.answers, "score": score_one(task, prediction, built.answers[0])}

        todo = [item for item in keys if log.get(item[-1]) is None]
        for _, sample in map_samples(lm, run_prompt, todo):  # launched processes split the prompts
            log.add(sample["key"], sample)
            if progress is not None:
                progress(1, None)
        return summarize([log.done[k[-1]] for k in keys])


def summarize(samples: list[dict[str, Any]]) -> TaskResult:
    """Headline: the mean of the tasks' accuracies; rows per task, per task and length, per task and grid cell."""
    tasks = list(dict.fromkeys(s["task"] for s in samples))
    rows = []
    for task in tasks:
        mine = [s for s in samples if s["task"] == task]
        lengths = sorted({s["context_len"] for s in mine})
        for length in lengths:
            at = [s for s in mine if s["context_len"] == length]
            rows.append(MetricRow(SHORT_NAMES[task], "accuracy", fmean(s["score"] for s in at), len(at), length))
            for depth in dict.fromkeys(s["depth"] for s in at):
                cell = [s for s in at if s["depth"] == depth]
                rows.append(MetricRow(f"{SHORT_NAMES[task]}/{depth_label(depth)}", "accuracy",
                                      fmean(s["score"] for s in cell), len(cell), length))
    accuracy = fmean(fmean(s["score"] for s in samples if s["task"] == t) for t in tasks)
    return TaskResult(metrics={"accuracy": accuracy}, samples=samples, n=len(samples),
                      context_len=max(s["context_len"] for s in samples), rows=rows)


TASKS.register("infinitebench-synthetic")(InfiniteBenchSynthetic(name="infinitebench-synthetic", version="1.0"))
