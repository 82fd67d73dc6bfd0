"""RULER's QA tasks: qa_1 over SQuAD v2 dev, qa_2 over HotpotQA dev (distractor), string_match_part.

Compared with NVIDIA/RULER at commit c3f5e3b (scripts/data/synthetic/qa.py, constants.py, eval constants): the
readers (SQuAD: unique paragraphs sorted, answerable questions only, the question's own paragraph plus the other
paragraphs of its article before random ones; HotpotQA: "title\\nsentences" documents, every context document of a
question), "Document {i}:\\n{document}" joined by blank lines, the documents shuffled with the fixed seed, the
template and answer prefix, 32 tokens generated, sample i asks question i, and string_match_part. `query_mode`: the
question a query_aware compression observes is the template after the documents (instruction, question, answer
prefix).

Data: RULER's files `squad.json` (SQuAD 2.0 dev-v2.0.json) and `hotpotqa.json` (hotpot_dev_distractor_v1.json) in
--data-dir (or its `json/` folder, where RULER's download script puts them); else the hub copies `rajpurkar/squad_v2`
and `hotpotqa/hotpot_qa` (config distractor), validation split.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from unimem_bench.tasks.arguments import arg, task_args
from unimem_bench.tasks.base import TASKS, AccuracyHeadline, QueryMode, SampleLog, ScoringLM, TaskOptions, TaskResult
from unimem_bench.tasks.data.hub import DataNotFoundError, check_hub_dataset, hub_records
from unimem_bench.tasks.needle.haystack import check_grid
from unimem_bench.tasks.needle.lengths import (
    Fitter,
    after_context,
    length_result,
    run_lengths,
    sample_rng,
    task_lengths,
)

TEMPLATE = ("Answer the question based on the given documents. Only give me the answer and do not output any other "
            "words.\n\nThe following are given documents.\n\n{context}\n\nAnswer the question based on the given "
            "documents. Only give me the answer and do not output any other words.\n\nQuestion: {query}")
ANSWER_PREFIX = " Answer:"
DOCUMENT_PROMPT = "Document {i}:\n{document}"
FILES = {"squad": "squad.json", "hotpotqa": "hotpotqa.json"}
HUB = {"squad": ("rajpurkar/squad_v2", None), "hotpotqa": ("hotpotqa/hotpot_qa", "distractor")}
GET_FILES = ("RULER's squad.json and hotpotqa.json (scripts/data/synthetic/json/download_qa_dataset.sh: SQuAD "
             "dev-v2.0.json and hotpot_dev_distractor_v1.json)")


@dataclass(frozen=True)
class QA:
    """RULER's questions and documents of one dataset."""

    questions: list[dict[str, Any]]
    """query, outputs (answers), context (indices of its documents), more_context (same-article paragraphs)."""
    docs: list[str]


def read_squad(data: dict[str, Any]) -> QA:
    """RULER's read_squad on the official SQuAD 2.0 json."""
    docs = sorted({p["context"] for d in data["data"] for p in d["paragraphs"]})
    index = {c: i for i, c in enumerate(docs)}
    questions = []
    for d in data["data"]:
        more = [index[p["context"]] for p in d["paragraphs"]]
        for p in d["paragraphs"]:
            for qa in p["qas"]:
                if not qa["is_impossible"]:
                    questions.append({"query": qa["question"], "outputs": [a["text"] for a in qa["answers"]],
                                      "context": [index[p["context"]]],
                                      "more_context": [i for i in more if i != index[p["context"]]]})
    return QA(questions, docs)


def read_hotpotqa(data: list[dict[str, Any]]) -> QA:
    """RULER's read_hotpotqa on the official distractor dev json."""
    docs = sorted({f"{t}\n{''.join(p)}" for d in data for t, p in d["context"]})
    index = {c: i for i, c in enumerate(docs)}
    return QA([{"query": d["question"], "outputs": [d["answer"]],
                "context": [index[f"{t}\n{''.join(p)}"] for t, p in d["context"]]} for d in data], docs)


def squad_from_hub(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The hub's flat SQuAD v2 rows in the official nested layout (article -> paragraphs -> qas)."""
    articles: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for row in rows:
        paragraphs = articles.setdefault(row["title"], {})
        paragraphs.setdefault(row["context"], []).append(
            {"question": row["question"], "is_impossible": not row["answers"]["text"],
             "answers": [{"text": t} for t in row["answers"]["text"]]})
    return {"data": [{"paragraphs": [{"context": c, "qas": q} for c, q in paragraphs.items()]}
                     for paragraphs in articles.values()]}


def hotpotqa_from_hub(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The hub's HotpotQA rows (context as {title: [...], sentences: [[...]]}) in the official layout."""
    return [{"question": r["question"], "answer": r["answer"],
             "context": [[t, s] for t, s in zip(r["context"]["title"], r["context"]["sentences"], strict=True)]}
            for r in rows]


def find_file(data_dir: Path, dataset: str) -> Path | None:
    for folder in (data_dir, data_dir / "json"):
        if (folder / FILES[dataset]).is_file():
            return folder / FILES[dataset]
    return None


def load_qa(dataset: str, data_dir: Path | None) -> QA:
    """The dataset from --data-dir (RULER's file) or else the hub."""
    if data_dir is not None:
        path = find_file(data_dir, dataset)
        if path is None:
            raise DataNotFoundError(f"--data-dir {data_dir} has no {FILES[dataset]}")
        data = json.loads(path.read_text(encoding="utf-8"))
    else:
        repo, config = HUB[dataset]
        rows = list(hub_records(repo, name=config, split="validation"))
        data = squad_from_hub(rows) if dataset == "squad" else hotpotqa_from_hub(rows)
    return read_squad(data) if dataset == "squad" else read_hotpotqa(data)


def qa_text(qa: QA, index: int, num_docs: int, rng: random.Random, seed: int) -> tuple[str, list[str]]:
    """RULER's generate_input_output for QA: the question's documents, then same-article ones, then random ones
    (or every document repeated when num_docs exceeds them), shuffled with the fixed seed."""
    question = qa.questions[index % len(qa.questions)]
    own, more = question["context"], question.get("more_context", [])
    if num_docs < len(qa.docs):
        if num_docs - len(own) > len(more):
            taken = set(own + more)
            others = [i for i in range(len(qa.docs)) if i not in taken]
            chosen = own + more + rng.sample(others, max(0, num_docs - len(own) - len(more)))
        else:
            chosen = own + rng.sample(more, max(0, num_docs - len(own)))
        docs = [qa.docs[i] for i in chosen]
    else:
        docs = (qa.docs * -(-num_docs // len(qa.docs)))[:num_docs]
    random.Random(seed).shuffle(docs)
    context = "\n\n".join(DOCUMENT_PROMPT.format(i=i + 1, document=d) for i, d in enumerate(docs))
    return (TEMPLATE + ANSWER_PREFIX).format(context=context, query=question["query"]), list(question["outputs"])


def check_qa_data(name: str, dataset: str, data_dir: Path | None) -> None:
    """One line before any model work when neither the file nor the hub is there."""
    if data_dir is not None and find_file(data_dir, dataset) is not None:
        return
    if data_dir is not None:
        raise DataNotFoundError(f"task {name!r}: --data-dir {data_dir} has no {FILES[dataset]}; add {GET_FILES}")
    check_hub_dataset(HUB[dataset][0], task=name, local=f"{FILES[dataset]} ({GET_FILES})")


@dataclass(frozen=True)
class RulerQATask(AccuracyHeadline):
    """RULER qa_1 (SQuAD) or qa_2 (HotpotQA): `samples` questions per context length, string_match_part."""

    name: str
    version: str
    dataset: Literal["squad", "hotpotqa"]
    lengths: tuple[int, ...] = arg(())
    """Context lengths in tokens, prompt plus max_new_tokens (empty: 1/4 to 8 x the model's trained context, less
    those too short for the prompt)."""
    samples: int = arg(20)
    """Questions per length (RULER generates 500; 20 keeps a CPU run in minutes)."""
    max_new_tokens: int = arg(32)
    """Tokens generated per prompt (RULER's tokens_to_generate for qa)."""
    seed: int = arg(42)
    """Seed of the distractor documents and their order (RULER's random_seed)."""
    query_mode: QueryMode = arg("query_agnostic")
    """`query_agnostic`: a compressing memory compresses the documents before it sees the question; `query_aware`
    (kvpress' query_aware): every eviction also scores with the question's queries (the prompt after the documents)."""

    def __post_init__(self) -> None:
        check_grid(self.name, self.lengths, (0.0,), self.max_new_tokens)
        if self.samples < 1:
            raise ValueError(f"{self.name}.samples {self.samples} must be >= 1")

    def check(self, options: TaskOptions) -> None:
        check_qa_data(self.name, self.dataset, options.data_dir)

    def params(self, options: TaskOptions) -> dict[str, Any]:
        source = find_file(options.data_dir, self.dataset) if options.data_dir else None
        return {"dataset": self.dataset, "data": str(source) if source else HUB[self.dataset][0], **task_args(self)}

    def run(self, lm: ScoringLM, tokenizer: Any, options: TaskOptions, log: SampleLog | None = None,
            progress: Callable[[int, int | None], None] | None = None) -> TaskResult:
        log = log if log is not None else SampleLog()
        qa = load_qa(self.dataset, options.data_dir)
        seed, name = self.seed, self.name

        def make(length: int, sample: int, n: int) -> tuple[str, list[str]]:
            return qa_text(qa, sample, n, sample_rng(seed, name, length, sample), seed)

        fitter = Fitter(self.name, tokenizer, self.max_new_tokens, make, start=1,
                        question_start=after_context(TEMPLATE + ANSWER_PREFIX))
        lengths = task_lengths(self.name, self.lengths, lm.trained_context, fitter)
        return length_result(run_lengths(self.name, lm, tokenizer, fitter, lengths, self.samples,
                                         "string_match_part", log, progress, self.query_mode))


TASKS.register("ruler_qa_1")(RulerQATask(name="ruler_qa_1", version="1.0", dataset="squad"))
TASKS.register("ruler_qa_2")(RulerQATask(name="ruler_qa_2", version="1.0", dataset="hotpotqa"))
