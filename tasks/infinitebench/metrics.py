"""InfiniteBench's scorers, as `src/compute_scores.py` (OpenBMB/InfiniteBench at commit 88b3daa) defines them for
every model but GPT-4 (whose math_calc drops the first number). En.Sum's ROUGE-Lsum is `rouge_score`'s, which
`evaluate.load("rouge")` wraps (no stemmer, F-measure)."""

from __future__ import annotations

import re
import string
from collections import Counter
from typing import Any


def normalize_answer(s: str) -> str:
    s = "".join(ch for ch in s.lower() if ch not in set(string.punctuation))
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", s).split())


CN_PUNCTUATION = ("！？｡。＂＃＄％＆＇（）＊＋，－／：；＜＝＞＠［＼］＾＿｀｛｜｝～｟｠"
                  "｢｣､、〃》「」『』【】〔〕〖〗〘〙〚〛〜〝〞〟〰〾〿–—‘’‛“”„‟…‧﹏.")


def normalize_zh_answer(s: str) -> str:
    drop = set(string.punctuation + CN_PUNCTUATION)
    return "".join("".join(ch for ch in s.lower() if ch not in drop).split())


def f1_score(prediction: list[str], truth: list[str]) -> float:
    same = sum((Counter(prediction) & Counter(truth)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(prediction), same / len(truth)
    return 2 * precision * recall / (precision + recall)


def qa_f1(pred: str, truths: Any) -> float:
    truths = [truths] if isinstance(truths, str) else truths
    return max((f1_score(normalize_answer(pred).split(), normalize_answer(t).split()) for t in truths), default=0.0)


def qa_f1_zh(pred: str, truths: Any) -> float:
    truths = [truths] if isinstance(truths, str) else truths
    return max((f1_score(list(normalize_zh_answer(pred)), list(normalize_zh_answer(t))) for t in truths),
               default=0.0)


def first_int_match(prediction: str) -> str:
    return next((item for item in re.split("[^0-9]", prediction) if item), "")


def _words(pred: str, chars: str | list[str]) -> list[str]:
    for c in chars:
        pred = pred.replace(c, " ")
    return pred.split()


def _label(label: Any) -> Any:
    return label[0] if isinstance(label, list) else label


def kv_retrieval(pred: str, label: Any) -> bool:
    return _label(label) in _words(pred, ["\n", ":", '"', "'", ".", ",", "?", "!", "{", "}"])


def passkey(pred: str, label: Any) -> bool:
    return _label(label) == first_int_match(pred)


def code_run(pred: str, label: Any) -> bool:
    words = _words(pred.strip(), ["\n", ".", "`", "'", '"', ":"])
    try:
        return bool(words) and _label(label) == int(words[-1])
    except ValueError:
        return False


def code_debug(pred: str, label: Any) -> bool:
    pred = pred.strip()
    letter, fn_name = label[1], label[0]
    if pred[:2] in (f"{letter}.", f"{letter}:"):
        return True
    pred = " ".join(_words(pred, ["\n", "`", "'", '"', "-", "*", "Option", "option"]))
    for prefix in ("answer is:", "is:", "answer:", "correct option is:"):
        idx = pred.find(prefix)
        if idx == -1:
            continue
        if len(pred) < idx + len(prefix) + 1:
            return False
        rest = pred[idx + len(prefix) + 1:]
        return any(rest.startswith(s) for s in (letter, fn_name))
    return False


def math_find(pred: str, label: Any) -> bool:
    label = _label(label)
    number = re.search(r"\d+\.\d+|\d+", pred)
    if number is None:
        return False
    if isinstance(label, int):
        try:
            return int(number.group(0)) == label
        except ValueError:  # the official int("3.5") raises; a decimal never matches an integer label
            return False
    return float(number.group(0)) == float(label)


def longdialogue_qa_eng(pred: str, label: Any) -> bool:
    return label[0] in [w.upper() for w in _words(pred.strip(), ["\n", ":", '"', "'", ".", ",", "?", "!", "{", "}"])]


def longbook_choice_eng(pred: str, label: Any) -> bool:
    pred = pred.strip()
    if pred == "":
        return False
    if pred[0] in "ABCD":
        return pred[0] in label
    if pred in label:
        return True
    pred = " ".join(_words(pred, ["\n", '"', "'", ".", ",", "?", "!", "{", "}"]))
    for prefix in ("answer is:", "answer:", "answer is", "option is"):
        idx = pred.find(prefix)
        if idx == -1:
            continue
        if len(pred) < idx + len(prefix) + 1:
            return False
        after = pred[idx + len(prefix) + 1:]
        return any(after.startswith(s) for s in label)
    return next((word in label for word in pred.split() if word in "ABCD"), False)


def rouge_lsum(pred: str, label: Any) -> float:
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeLsum"], use_stemmer=False)
    return scorer.score(_label(label), pred)["rougeLsum"].fmeasure


def math_calc(pred: str, label: Any) -> float:
    if isinstance(label[0], list):
        label = label[0]
    numbers = [int(item) for item in re.split("[^0-9]", pred) if item]
    count = 0
    for expected, got in zip(label, numbers, strict=False):
        if expected != got:
            break
        count += 1
    return count / len(label)


SCORERS = {"kv_retrieval": kv_retrieval, "passkey": passkey, "number_string": passkey, "code_run": code_run,
           "code_debug": code_debug, "longdialogue_qa_eng": longdialogue_qa_eng, "longbook_qa_eng": qa_f1,
           "longbook_sum_eng": rouge_lsum, "longbook_choice_eng": longbook_choice_eng, "longbook_qa_chn": qa_f1_zh,
           "math_find": math_find, "math_calc": math_calc}


def score_one(task: str, pred: str, label: Any) -> float:
    """compute_scores.get_score_one: a float in [0, 1]."""
    return float(SCORERS[task](pred, label))
