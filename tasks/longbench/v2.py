"""`longbench-v2`: LongBench v2's 503 multiple-choice questions (Bai et al., 2024, arXiv 2412.15204).

As THUDM/LongBench's pred.py and result.py run it (commit 2e00731, the repository's root: prompts/0shot.txt,
0shot_cot.txt, 0shot_cot_ans.txt): the template filled by replacing $DOC$, $Q$ and $C_A$..$C_D$ (each stripped), the
prompt's tokens cut to their first and last max_length // 2 when longer (decoded), 128 new tokens, or with
`cot=true` 1,024 tokens of reasoning that fill $COT$ of the answer prompt and 128 more; the answer extracted by
"The correct answer is (X)" or "The correct answer is X" after dropping '*'; accuracy x100 overall, per difficulty
(easy, hard) and per length (short, medium, long), as result.py tabulates. Greedy decoding where pred.py samples at
temperature 0.1 (a seeded, repeatable score). Data: `--data-dir DIR` with `data.json` (the release's list of
records), else the hub dataset `THUDM/LongBench-v2` (train split).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
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
from unimem_bench.tasks.data.hub import DataNotFoundError, check_hub_dataset, hub_records
from unimem_bench.tasks.samples import encode, prompt_fields, truncate_middle_ids

HUB_ID = "THUDM/LongBench-v2"
LOCAL = "LongBench v2's data.json (the list of 503 records from THUDM/LongBench-v2)"
_CHOICES = ("What is the correct answer to this question: $Q$\nChoices:\n(A) $C_A$\n(B) $C_B$\n(C) $C_C$\n"
            "(D) $C_D$\n\n")
TEMPLATE_0SHOT = ("Please read the following text and answer the question below.\n\n<text>\n$DOC$\n</text>\n\n"
                  + _CHOICES + "Format your response as follows: \"The correct answer is (insert answer here)\".")
TEMPLATE_0SHOT_COT = ("Please read the following text and answer the questions below.\n\n<text>\n$DOC$\n</text>\n\n"
                      + _CHOICES + "Let’s think step by step:")
TEMPLATE_0SHOT_COT_ANS = ("Please read the following text and answer the questions below.\n\nThe text is too long and "
                          "omitted here.\n\n" + _CHOICES + "Let’s think step by step: $COT$\n\nBased on the above, "
                          "what is the single, most likely answer choice? Format your response as follows: "
                          "\"The correct answer is (insert answer here)\".")
DIFFICULTIES = ("easy", "hard")
LENGTHS = ("short", "medium", "long")


def fill(template: str, item: dict[str, Any]) -> str:
    """pred.py's replacements, in its order."""
    return (template.replace("$DOC$", item["context"].strip()).replace("$Q$", item["question"].strip())
            .replace("$C_A$", item["choice_A"].strip()).replace("$C_B$", item["choice_B"].strip())
            .replace("$C_C$", item["choice_C"].strip()).replace("$C_D$", item["choice_D"].strip()))


def extract_answer(response: str) -> str | None:
    """pred.py's extract_answer."""
    response = response.replace("*", "")
    match = re.search(r"The correct answer is \(([A-D])\)", response) or re.search(r"The correct answer is ([A-D])",
                                                                                   response)
    return match.group(1) if match else None


def load_items(data_dir: Path | None, limit: int | None) -> list[dict[str, Any]]:
    if data_dir is not None:
        items = json.loads((data_dir / "data.json").read_text(encoding="utf-8"))
    else:
        try:
            items = list(hub_records(HUB_ID, split="train"))
        except Exception as err:  # the network gone mid-run: name both ways out
            raise DataNotFoundError(f"hub dataset {HUB_ID!r} could not be read ({type(err).__name__}); pass "
                                    f"--data-dir DIR with {LOCAL}") from None
    return items[:limit] if limit else items


@dataclass(frozen=True)
class LongBenchV2Task(AccuracyHeadline):
    """LongBench v2 multiple choice, with or without chain of thought."""

    name: str
    version: str
    cot: bool = arg(False)
    """Chain of thought: reason first (1,024 tokens), then answer from the reasoning (pred.py --cot)."""
    max_length: int = arg(0)
    """Prompt tokens kept by the head-plus-tail cut (0 = the model's trained context; pred.py: 128K for most
    models)."""

    def __post_init__(self) -> None:
        if self.max_length < 0:
            raise ValueError(f"{self.name}.max_length {self.max_length} must be >= 0 (0 = the trained context)")

    def check(self, options: TaskOptions) -> None:
        if options.data_dir is None:
            check_hub_dataset(HUB_ID, task=self.name, local=LOCAL)
        elif not (options.data_dir / "data.json").is_file():
            raise DataNotFoundError(f"task {self.name!r}: --data-dir {options.data_dir} has no data.json; add {LOCAL}")

    def params(self, options: TaskOptions) -> dict[str, Any]:
        return {"data": str(options.data_dir) if options.data_dir else HUB_ID, "max_docs": options.max_docs,
                **task_args(self)}

    def query(self, lm: ScoringLM, tokenizer: Any, prompt: str, budget: int, max_new: int) -> tuple[str, list[int]]:
        """pred.py's query_llm: the head-plus-tail cut, then greedy generation; returns (text, prompt ids)."""
        ids = encode(tokenizer, prompt, bos=False)
        if len(ids) > budget:
            ids = encode(tokenizer, tokenizer.decode(truncate_middle_ids(ids, budget), skip_special_tokens=True),
                         bos=False)
        ids = encode(tokenizer, "") + ids
        new = generate_at_once(lm, ids, max_new_tokens=max_new, eos_token_id=tokenizer.eos_token_id)
        return tokenizer.decode(new, skip_special_tokens=True), ids

    def predict(self, lm: ScoringLM, tokenizer: Any, item: dict[str, Any], budget: int) -> dict[str, Any]:
        sample: dict[str, Any] = {"_id": item["_id"], "domain": item.get("domain"), "difficulty": item["difficulty"],
                                  "length": item["length"]}
        if self.cot:
            reasoning, ids = self.query(lm, tokenizer, fill(TEMPLATE_0SHOT_COT, item), budget, 1024)
            sample["response_cot"] = reasoning.strip()
            output, _ = self.query(lm, tokenizer, fill(TEMPLATE_0SHOT_COT_ANS, item).replace(
                "$COT$", reasoning.strip()), budget, 128)
        else:
            output, ids = self.query(lm, tokenizer, fill(TEMPLATE_0SHOT, item), budget, 128)
        pred = extract_answer(output.strip())
        return {**sample, **prompt_fields(ids), "prediction": output.strip(), "pred": pred, "answers": [item["answer"]],
                "accuracy": float(pred == item["answer"])}

    def run(self, lm: ScoringLM, tokenizer: Any, options: TaskOptions, log: SampleLog | None = None,
            progress: Callable[[int, int | None], None] | None = None) -> TaskResult:
        log = log if log is not None else SampleLog()
        items = load_items(options.data_dir, options.max_docs)
        budget = self.max_length or lm.trained_context
        if progress is not None:
            progress(0, len(items))
            progress(sum(log.get(item["_id"]) is not None for item in items), None)
        todo = [item for item in items if log.get(item["_id"]) is None]
        for _, sample in map_samples(lm, lambda item: self.predict(lm, tokenizer, item, budget), todo):
            log.add(sample["_id"], sample)  # launched processes split the questions
            if progress is not None:
                progress(1, None)
        samples = [log.done[item["_id"]] for item in items]
        if not samples:
            raise DataNotFoundError(f"task {self.name!r}: the data holds no question")
        return summarize(samples)


def summarize(samples: list[dict[str, Any]]) -> TaskResult:
    """result.py's table: accuracy x100 overall, per difficulty and per length bucket."""
    rows = []
    context = max(s["prompt_tokens"] for s in samples)
    for field, buckets in (("difficulty", DIFFICULTIES), ("length", LENGTHS)):
        for bucket in buckets:
            inside = [s for s in samples if s[field] == bucket]
            if inside:  # result.py would divide by zero on an empty bucket; no row instead
                rows.append(MetricRow(f"{field}:{bucket}", "accuracy", 100 * fmean(s["accuracy"] for s in inside),
                                      len(inside), max(s["prompt_tokens"] for s in inside)))
    return TaskResult(metrics={"accuracy": 100 * fmean(s["accuracy"] for s in samples)}, samples=samples,
                      n=len(samples), context_len=context, rows=rows)


TASKS.register("longbench-v2")(LongBenchV2Task(name="longbench-v2", version="1.0"))
