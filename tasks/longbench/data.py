"""LongBench's datasets: the official prompt templates, generation lengths, metrics and categories, the data readers
and the official head-plus-tail truncation.

Templates and lengths are THUDM/LongBench's `LongBench/config/dataset2prompt.json` and `dataset2maxlen.json` (commit
2e00731, the one lm-eval cites). lm-eval's yaml copies differ from them only in whitespace for triviaqa, samsum
(one newline before the question instead of two), passage_count, passage_retrieval_en (no trailing space) and lcc,
repobench-p (no trailing newline); the tests pin that.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

from unimem_bench.tasks.data.files import read_jsonl
from unimem_bench.tasks.data.hub import DataNotFoundError, hub_records


@dataclass(frozen=True)
class DatasetSpec:
    """One LongBench dataset as the official code runs it."""

    name: str
    prompt: str
    """The prompt template, formatted with the record's `context` and `input`."""
    max_gen: int
    """Tokens generated at most (dataset2maxlen.json)."""
    metric: str
    """A key of `longbench_metrics.METRICS` (eval.py's dataset2metric)."""
    category: str
    """The LongBench paper's task category."""
    language: str
    """"en" or "zh": `length` counts words in English and characters in Chinese."""


_MQA = ("Answer the question based on the given passages. Only give me the answer and do not output any other words."
        "\n\nThe following are given passages.\n{context}\n\nAnswer the question based on the given passages. Only "
        "give me the answer and do not output any other words.\n\nQuestion: {input}\nAnswer:")
_QASPER_RULES = ("as concisely as you can, using a single phrase or sentence if possible. If the question cannot be "
                 "answered based on the information in the article, write \"unanswerable\". If the question is a "
                 "yes/no question, answer \"yes\", \"no\", or \"unanswerable\". Do not provide any explanation.")
_NARRATIVE_RULES = "asconcisely as you can, using a single phrase if possible. Do not provide any explanation."

SPECS: tuple[DatasetSpec, ...] = (
    DatasetSpec("narrativeqa", "You are given a story, which can be either a novel or a movie script, and a question. "
                f"Answer the question {_NARRATIVE_RULES}\n\nStory: {{context}}\n\nNow, answer the question based on "
                f"the story {_NARRATIVE_RULES}\n\nQuestion: {{input}}\n\nAnswer:", 128, "qa_f1", "single_doc_qa", "en"),
    DatasetSpec("qasper", f"You are given a scientific article and a question. Answer the question {_QASPER_RULES}"
                f"\n\nArticle: {{context}}\n\n Answer the question based on the above article {_QASPER_RULES}\n\n"
                "Question: {input}\n\nAnswer:", 128, "qa_f1", "single_doc_qa", "en"),
    DatasetSpec("multifieldqa_en", "Read the following text and answer briefly.\n\n{context}\n\nNow, answer the "
                "following question based on the above text, only give me the answer and do not output any other "
                "words.\n\nQuestion: {input}\nAnswer:", 64, "qa_f1", "single_doc_qa", "en"),
    DatasetSpec("multifieldqa_zh", "阅读以下文字并用中文简短回答：\n\n{context}\n\n现在请基于上面的文章回答下面的问题，"
                "只告诉我答案，不要输出任何其他字词。\n\n问题：{input}\n回答：", 64, "qa_f1_zh", "single_doc_qa", "zh"),
    DatasetSpec("hotpotqa", _MQA, 32, "qa_f1", "multi_doc_qa", "en"),
    DatasetSpec("2wikimqa", _MQA, 32, "qa_f1", "multi_doc_qa", "en"),
    DatasetSpec("musique", _MQA, 32, "qa_f1", "multi_doc_qa", "en"),
    DatasetSpec("dureader", "请基于给定的文章回答下述问题。\n\n文章：{context}\n\n请基于上述文章回答下面的问题。\n\n"
                "问题：{input}\n回答：", 128, "rouge_zh", "multi_doc_qa", "zh"),
    DatasetSpec("gov_report", "You are given a report by a government agency. Write a one-page summary of the report."
                "\n\nReport:\n{context}\n\nNow, write a one-page summary of the report.\n\nSummary:", 512, "rouge",
                "summarization", "en"),
    DatasetSpec("qmsum", "You are given a meeting transcript and a query containing a question or instruction. Answer "
                "the query in one or more sentences.\n\nTranscript:\n{context}\n\nNow, answer the query based on the "
                "above meeting transcript in one or more sentences.\n\nQuery: {input}\nAnswer:", 512, "rouge",
                "summarization", "en"),
    DatasetSpec("multi_news", "You are given several news passages. Write a one-page summary of all news. \n\nNews:\n"
                "{context}\n\nNow, write a one-page summary of all the news.\n\nSummary:", 512, "rouge",
                "summarization", "en"),
    DatasetSpec("vcsum", "下面有一段会议记录，请你阅读后，写一段总结，总结会议的内容。\n"
                "会议记录：\n{context}\n\n会议总结：", 512, "rouge_zh", "summarization", "zh"),
    DatasetSpec("trec", "Please determine the type of the question below. Here are some examples of questions.\n\n"
                "{context}\n{input}", 64, "classification", "few_shot", "en"),
    DatasetSpec("triviaqa", "Answer the question based on the given passage. Only give me the answer and do not output "
                "any other words. The following are some examples.\n\n{context}\n\n{input}", 32, "qa_f1", "few_shot",
                "en"),
    DatasetSpec("samsum", "Summarize the dialogue into a few short sentences. The following are some examples.\n\n"
                "{context}\n\n{input}", 128, "rouge", "few_shot", "en"),
    DatasetSpec("lsht", "请判断给定新闻的类别，下面是一些例子。\n\n{context}\n{input}", 64, "classification",
                "few_shot", "zh"),
    DatasetSpec("passage_count", "There are some paragraphs below sourced from Wikipedia. Some of them may be "
                "duplicates. Please carefully read these paragraphs and determine how many unique paragraphs there "
                "are after removing duplicates. In other words, how many non-repeating paragraphs are there in total?"
                "\n\n{context}\n\nPlease enter the final count of unique paragraphs after removing duplicates. The "
                "output format should only contain the number, such as 1, 2, 3, and so on.\n\nThe final answer is: ",
                32, "count", "synthetic", "en"),
    DatasetSpec("passage_retrieval_en", "Here are 30 paragraphs from Wikipedia, along with an abstract. Please "
                "determine which paragraph the abstract is from.\n\n{context}\n\nThe following is an abstract.\n\n"
                "{input}\n\nPlease enter the number of the paragraph that the abstract is from. The answer format "
                "must be like \"Paragraph 1\", \"Paragraph 2\", etc.\n\nThe answer is: ", 32, "retrieval",
                "synthetic", "en"),
    DatasetSpec("passage_retrieval_zh", "以下是若干段落文字，以及其中一个段落的摘要。请确定给定的摘要出自哪一段。\n\n"
                "{context}\n\n下面是一个摘要\n\n{input}\n\n请输入摘要所属段落的编号。答案格式必须是\"段落1\"，\"段落2\"等格式"
                "\n\n答案是：", 32, "retrieval_zh", "synthetic", "zh"),
    DatasetSpec("lcc", "Please complete the code given below. \n{context}Next line of code:\n", 64, "code_sim", "code",
                "en"),
    DatasetSpec("repobench-p", "Please complete the code given below. \n{context}{input}Next line of code:\n", 64,
                "code_sim", "code", "en"),
)
DATASETS: dict[str, DatasetSpec] = {s.name: s for s in SPECS}
"""All 21 LongBench v1 datasets in the official order."""
E_DATASETS: tuple[str, ...] = ("qasper", "multifieldqa_en", "hotpotqa", "2wikimqa", "gov_report", "multi_news", "trec",
                               "triviaqa", "samsum", "passage_count", "passage_retrieval_en", "lcc", "repobench-p")
"""The 13 datasets of LongBench-E (pred.py's list)."""
BUCKETS: tuple[str, ...] = ("0-4k", "4-8k", "8k+")


def bucket(length: int) -> str:
    """LongBench-E's length bucket of a sample (eval.py: `length` < 4000, < 8000, else)."""
    return "0-4k" if length < 4000 else "4-8k" if length < 8000 else "8k+"


def file_name(dataset: str, e: bool) -> str:
    """The official file name: `<dataset>.jsonl`, `<dataset>_e.jsonl` for LongBench-E."""
    return f"{dataset}{'_e' if e else ''}.jsonl"


def find_file(data_dir: Path, dataset: str, e: bool) -> Path | None:
    """The dataset's file in `data_dir` or in its `data/` folder (data.zip unpacks to data/)."""
    for folder in (data_dir, data_dir / "data"):
        if (folder / file_name(dataset, e)).is_file():
            return folder / file_name(dataset, e)
    return None


def normalize_record(row: dict[str, Any], spec: DatasetSpec) -> dict[str, Any]:
    """A record in the official jsonl schema, plus `prompt`: the official prompt of the record.

    Besides the official rows (input, context) this takes the "formatted" parquet mirrors (kvpress' layout: the
    template's head already in `context`, the question part in `question`, the template's tail in `answer_prefix`),
    whose three parts joined are the official prompt.
    """
    if "answer_prefix" in row:
        prompt = row["context"] + row["question"] + row["answer_prefix"]
        text = row["context"] + row["question"]
        asked = row["question"] + row["answer_prefix"]
    else:
        question = row["input"] if "input" in row else row.get("question", "")
        prompt = spec.prompt.format(context=row["context"], input=question)
        text = row["context"] + question
        tail = spec.prompt.split("{context}", 1)[1]  # the template after the context holds the question
        asked = tail.format(input=question) if "{input}" in tail else question
    length = row.get("length")
    if length is None:  # words (English) or characters (Chinese), as the official field counts them
        length = len(text.split()) if spec.language == "en" else len("".join(text.split()))
    return {"_id": str(row.get("_id", "")), "prompt": prompt, "question": asked, "answers": list(row["answers"]),
            "all_classes": list(row["all_classes"]) if row.get("all_classes") else None, "length": int(length)}


def load_records(spec: DatasetSpec, *, e: bool, data_dir: Path | None, hub_id: str,
                 limit: int | None) -> list[dict[str, Any]]:
    """The dataset's first `limit` records from `data_dir` (official jsonl) or else the hub mirror `hub_id`."""
    if data_dir is not None:
        path = find_file(data_dir, spec.name, e)
        if path is None:
            raise DataNotFoundError(f"--data-dir {data_dir} has no {file_name(spec.name, e)}")
        rows = list(islice(read_jsonl(path), limit))
    else:
        config = f"{spec.name}_e" if e else spec.name
        try:
            rows = list(islice(hub_records(hub_id, name=config, split="test"), limit))
        except Exception as err:  # unknown config, network gone mid-run: name both ways out
            raise DataNotFoundError(f"hub dataset {hub_id!r} config {config!r} could not be read "
                                    f"({type(err).__name__}); pass --data-dir DIR with {file_name(spec.name, e)}"
                                    ) from None
    records = [normalize_record(row, spec) for row in rows]
    for i, record in enumerate(records):
        record["_id"] = record["_id"] or f"{spec.name}-{i}"  # a stable key for rows without an id
    return records


def truncate_middle(tokenizer: Any, prompt: str, max_length: int) -> tuple[str, bool]:
    """The official truncation (pred.py): a prompt of more than `max_length` tokens keeps its first and last
    `max_length // 2` tokens, decoded back to text; returns (prompt, truncated)."""
    ids = tokenizer(prompt)["input_ids"]
    if len(ids) <= max_length:
        return prompt, False
    half = max_length // 2
    return (tokenizer.decode(ids[:half], skip_special_tokens=True)
            + tokenizer.decode(ids[-half:], skip_special_tokens=True)), True
