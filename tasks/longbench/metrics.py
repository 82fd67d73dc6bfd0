"""LongBench's official metrics (THUDM/LongBench `LongBench/metrics.py` and `eval.py`), one function per metric.

Every function scores one prediction against one ground truth and returns a value in [0, 1]; `score_sample` applies
the official scorer around them: the first-line rule of trec, triviaqa, samsum and lsht, then the best score over
the sample's answers. The same libraries as the official code do the text work: jieba (Chinese word segmentation),
the `rouge` package (ROUGE-L F); code similarity is fuzzywuzzy's `fuzz.ratio`, which the official code calls,
reimplemented here on the standard library (`fuzz_ratio`: fuzzywuzzy is GPL-2.0+, this package MIT; a test checks
identical scores against fuzzywuzzy itself).
"""

from __future__ import annotations

import re
import string
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from difflib import SequenceMatcher
from typing import Any

from rouge import Rouge

# What scores code_sim: recorded with LongBench runs, since fuzzywuzzy with python-Levenshtein installed scores
# differently (Levenshtein's ratio); the official environment has no python-Levenshtein, so difflib's is the one.
METRIC_IMPLEMENTATION = {"code_sim": "difflib.SequenceMatcher ratio, as fuzzywuzzy 0.18 fuzz.ratio without "
                                     "python-Levenshtein (unimem_bench.tasks.longbench.metrics.fuzz_ratio)"}

# Chinese punctuation removed by the official Chinese normaliser, besides ASCII punctuation.
ZH_PUNCTUATION = ("！？｡。＂＃＄％＆＇（）＊＋，－／：；＜＝＞＠［＼］＾＿｀｛｜｝～"
                  "｟｠｢｣､、〃》「」『』【】〔〕〖〗〘〙〚〛〜〝〞〟〰〾〿–—‘’‛“”„‟…‧﹏.")
_EN_PUNCT = frozenset(string.punctuation)
_ZH_PUNCT = frozenset(string.punctuation + ZH_PUNCTUATION)
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_NUMBER = re.compile(r"\d+")

# The datasets whose prediction is cut to its first line (after leading newlines) before scoring.
FIRST_LINE_DATASETS = frozenset({"trec", "triviaqa", "samsum", "lsht"})


def normalize_answer(text: str) -> str:
    """English answer normalisation (SQuAD's): lower case, drop punctuation, then articles, squeeze whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in _EN_PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


def normalize_zh_answer(text: str) -> str:
    """Chinese answer normalisation: lower case, drop ASCII and Chinese punctuation, remove all whitespace."""
    return "".join("".join(ch for ch in text.lower() if ch not in _ZH_PUNCT).split())


def token_f1(prediction: Sequence[str], ground_truth: Sequence[str]) -> float:
    """F1 of the two token multisets (0 when they share no token)."""
    same = sum((Counter(prediction) & Counter(ground_truth)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(prediction), same / len(ground_truth)
    return 2 * precision * recall / (precision + recall)


def qa_f1_score(prediction: str, ground_truth: str, **_: Any) -> float:
    """Token F1 of the normalised English answers."""
    return token_f1(normalize_answer(prediction).split(), normalize_answer(ground_truth).split())


def jieba_words(text: str) -> list[str]:
    """jieba's words in its default (accurate) mode; jieba is imported on first use, since its import is slow and
    warns through pkg_resources."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import jieba
    return list(jieba.cut(text, cut_all=False))


def _zh_tokens(text: str) -> list[str]:
    return [t for t in (normalize_zh_answer(w) for w in jieba_words(text)) if t]


def qa_f1_zh_score(prediction: str, ground_truth: str, **_: Any) -> float:
    """Token F1 over jieba words, each normalised, empty ones dropped."""
    return token_f1(_zh_tokens(prediction), _zh_tokens(ground_truth))


def rouge_score(prediction: str, ground_truth: str, **_: Any) -> float:
    """ROUGE-L F of the `rouge` package; 0 where it refuses the pair (an empty side, or a recursion too deep)."""
    try:
        scores = Rouge().get_scores([prediction], [ground_truth], avg=True)
    except Exception:  # the official code catches everything the package raises and scores it 0
        return 0.0
    return float(scores["rouge-l"]["f"])


def rouge_zh_score(prediction: str, ground_truth: str, **_: Any) -> float:
    """ROUGE-L F over jieba words joined by spaces."""
    return rouge_score(" ".join(jieba_words(prediction)), " ".join(jieba_words(ground_truth)))


def classification_score(prediction: str, ground_truth: str, *, all_classes: Sequence[str], **_: Any) -> float:
    """1/k when the true class is among the k class names found in the prediction, else 0.

    Class names that are proper substrings of the true class are dropped from the matches, with the official loop's
    quirk kept: it removed items from the list it was iterating, so the item after each removed one is not checked.
    """
    matches = [name for name in all_classes if name in prediction]
    i = 0
    while i < len(matches):
        term = matches[i]
        if term in ground_truth and term != ground_truth:
            matches.remove(term)
        i += 1
    return 1.0 / len(matches) if ground_truth in matches else 0.0


def _number_share(prediction: str, target: str) -> float:
    """The share of the numbers in the prediction that equal `target` (0 when it has none)."""
    numbers = _NUMBER.findall(prediction)
    return sum(n == target for n in numbers) / len(numbers) if numbers else 0.0


def retrieval_score(prediction: str, ground_truth: str, **_: Any) -> float:
    """Share of the prediction's numbers that name the true paragraph ("Paragraph N")."""
    return _number_share(prediction, re.findall(r"Paragraph (\d+)", ground_truth)[0])


def retrieval_zh_score(prediction: str, ground_truth: str, **_: Any) -> float:
    """Share of the prediction's numbers that name the true paragraph ("段落N")."""
    return _number_share(prediction, re.findall(r"段落(\d+)", ground_truth)[0])


def count_score(prediction: str, ground_truth: str, **_: Any) -> float:
    """Share of the prediction's numbers that equal the true count."""
    return _number_share(prediction, str(ground_truth))


def fuzz_ratio(a: str, b: str) -> int:
    """fuzzywuzzy's `fuzz.ratio` without python-Levenshtein: 100 for equal strings (two empty ones included), 0 when
    one is empty, else difflib's SequenceMatcher ratio (default junk heuristic) x 100, rounded half to even."""
    if a == b:
        return 100
    if not a or not b:
        return 0
    return round(100 * SequenceMatcher(None, a, b).ratio())


def code_sim_score(prediction: str, ground_truth: str, **_: Any) -> float:
    """fuzzywuzzy's ratio / 100 between the true next line and the prediction's first line (after leading
    newlines) that holds no backtick, `#` or `//` (comments and markdown fences are skipped; "" when none)."""
    line = next((ln for ln in prediction.lstrip("\n").split("\n")
                 if "`" not in ln and "#" not in ln and "//" not in ln), "")
    return fuzz_ratio(line, ground_truth) / 100


METRICS: dict[str, Callable[..., float]] = {
    "qa_f1": qa_f1_score,
    "qa_f1_zh": qa_f1_zh_score,
    "rouge": rouge_score,
    "rouge_zh": rouge_zh_score,
    "classification": classification_score,
    "retrieval": retrieval_score,
    "retrieval_zh": retrieval_zh_score,
    "count": count_score,
    "code_sim": code_sim_score,
}


def first_line(prediction: str) -> str:
    """The official rule for the few-shot datasets: the first line after any leading newlines."""
    return prediction.lstrip("\n").split("\n")[0]


def score_sample(dataset: str, metric: str, prediction: str, answers: Sequence[str],
                 all_classes: Sequence[str] | None) -> float:
    """The official per-sample score in [0, 1]: first-line rule where it applies, best over the answers."""
    if dataset in FIRST_LINE_DATASETS:
        prediction = first_line(prediction)
    fn = METRICS[metric]
    return max([0.0] + [fn(prediction, answer, all_classes=all_classes or ()) for answer in answers])
