"""LongBench metrics against lm-eval's independent implementation, on seeded (prediction, answer) pairs.

Every metric is compared on at least 200 pairs mixing exact, partial, empty, punctuated, case-changed, Chinese and
code-line predictions. lm-eval's module is loaded from its file, so lm-eval's task registry is never imported.
"""

from __future__ import annotations

import importlib.util
import random
import string
from collections.abc import Callable
from pathlib import Path

import pytest

from unimem_bench.tasks.longbench import metrics as ours

PAIRS = 240
EN = ("the", "a", "an", "The", "A", "cat", "dog", "Paris", "paris", "France", "river", "blue", "1984", "42", "run",
      "running", "ran", "yes", "no", "unanswerable", "Lily's", "mother-in-law", "U.S.", "New", "York", "city", "of",
      "north")
PUNCT = list(",.!?;:'\"()-")
ZH = list("北京上海中国人民银行大学生的了是在和有我你他她它们年月日东西南北市区县")
ZH_PUNCT = list("，。！？：；“”（）【】、…")
# Class names nested in others ("Human", "being" in "Human being"), adjacent, so that the official loop's skip of the
# item after a removed one changes scores.
TREC = ["Location", "Human", "being", "Human being", "Description", "Description of a person", "Entity",
        "Numeric value", "City", "Definition of something", "Abbreviation"]
LSHT = ["体育", "新闻", "体育新闻", "财经", "科技", "娱乐", "教育", "国际"]


@pytest.fixture(scope="module")
def lm_eval_metrics():
    """lm-eval's LongBench metrics module, loaded from its file."""
    spec = importlib.util.find_spec("lm_eval")
    if spec is None or spec.origin is None:
        pytest.skip("lm-eval is not installed (pip install -e '.[dev]')")
    path = Path(spec.origin).parent / "tasks" / "longbench" / "metrics.py"
    module_spec = importlib.util.spec_from_file_location("lm_eval_longbench_metrics", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def en_text(rng: random.Random, n: int) -> str:
    words = []
    for _ in range(n):
        word = rng.choice(EN)
        if rng.random() < 0.2:
            word = word.upper() if rng.random() < 0.5 else word + rng.choice(PUNCT)
        words.append(word)
    return (" " if rng.random() < 0.8 else "  ").join(words)


def zh_text(rng: random.Random, n: int) -> str:
    chars = [rng.choice(ZH) if rng.random() > 0.15 else rng.choice(ZH_PUNCT) for _ in range(n)]
    if rng.random() < 0.2:
        chars.insert(rng.randrange(n + 1), f" {rng.choice(EN)} ")
    return "".join(chars)


def variant(rng: random.Random, truth: str, make: Callable[[random.Random, int], str]) -> str:
    """A prediction for `truth`: exact, empty, partial, wrapped in extra text, re-punctuated, or unrelated."""
    kind = rng.randrange(7)
    if kind == 0:
        return truth
    if kind == 1:
        return rng.choice(["", " ", "\n"])
    if kind == 2:
        return truth[: rng.randrange(len(truth) + 1)]
    if kind == 3:
        return f"{make(rng, rng.randint(1, 4))} {truth} {make(rng, rng.randint(0, 3))}"
    if kind == 4:
        return truth.upper() + rng.choice(PUNCT + ZH_PUNCT)
    if kind == 5:
        return "".join(ch for ch in truth if rng.random() > 0.3)
    return make(rng, rng.randint(1, 12))


def text_pairs(seed: int, make: Callable[[random.Random, int], str]) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    pairs = []
    for _ in range(PAIRS):
        truth = make(rng, rng.randint(1, 10))
        pairs.append((variant(rng, truth, make), truth))
    return pairs


def class_pairs(seed: int, classes: list[str]) -> list[tuple[str, str, list[str]]]:
    rng = random.Random(seed)
    pairs = []
    for _ in range(PAIRS):
        truth = rng.choice(classes)
        named = rng.sample(classes, rng.randint(0, 3)) + ([truth] if rng.random() < 0.6 else [])
        rng.shuffle(named)
        pred = rng.choice(["", "Type: ", "类别："]) + rng.choice([", ", " or ", "\n", ""]).join(named)
        # all_classes as the data has it: sometimes with repeats, sometimes a true class missing from the list
        all_classes = classes + rng.sample(classes, rng.randint(0, 2))
        pairs.append((pred, truth, all_classes))
    return pairs


def number_pairs(seed: int, template: str) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    pairs = []
    for _ in range(PAIRS):
        target = rng.randint(1, 30)
        numbers = [rng.choice([target, rng.randint(0, 40)]) for _ in range(rng.randint(0, 3))]
        pred = rng.choice(["", "The answer is ", "答案是"]) + ", ".join(template.format(n) for n in numbers)
        if rng.random() < 0.2:
            pred += f" ({rng.randint(0, 99)} words)"
        pairs.append((pred, template.format(target) if "{}" in template else str(target)))
    return pairs


def code_line(rng: random.Random) -> str:
    name = rng.choice(["x", "total", "self.cache", "result", "items[i]"])
    return (" " * rng.choice([0, 4, 8]) + f"{name} = {rng.choice(['compute', 'len', 'max'])}"
            f"({rng.choice(['a', 'b, c', 'values[2:]'])}){rng.choice(['', ';', ' + 1'])}")


def code_pairs(seed: int, *, blank_first: bool) -> list[tuple[str, str]]:
    """Completions that start with newlines, markdown fences and comments before the code line; `blank_first`
    puts a whitespace-only line first, where THUDM's rule and lm-eval's (since its v6) part ways."""
    rng = random.Random(seed)
    pairs = []
    for _ in range(PAIRS):
        truth = code_line(rng)
        lines = rng.sample(["```python", "# the next line", "// js comment", "see `x`", "#"], rng.randint(0, 3))
        if rng.random() < 0.9:  # else only comments and fences: nothing to compare, score 0
            lines.append(rng.choice([truth, code_line(rng), truth.strip(), truth[: len(truth) // 2]]))
            if rng.random() < 0.5:
                lines.append(code_line(rng))
        if blank_first:
            lines.insert(0, rng.choice(["  ", "\t", "    "]))
        pairs.append(("\n" * rng.randint(0, 2) + "\n".join(lines), truth))
    return pairs


def has_blank_before_code(prediction: str) -> bool:
    for line in prediction.lstrip("\n").split("\n"):
        if "`" not in line and "#" not in line and "//" not in line:
            return not line.strip()
    return False


@pytest.mark.parametrize(("metric", "pairs"), [
    ("qa_f1_score", lambda: text_pairs(1, en_text)),
    ("qa_f1_zh_score", lambda: text_pairs(2, zh_text) + text_pairs(3, en_text)[:40]),
    ("rouge_score", lambda: text_pairs(4, en_text)),
    ("rouge_zh_score", lambda: text_pairs(5, zh_text)),
    ("retrieval_score", lambda: number_pairs(6, "Paragraph {}")),
    ("retrieval_zh_score", lambda: number_pairs(7, "段落{}")),
    ("count_score", lambda: number_pairs(8, "{}")),
    ("code_sim_score", lambda: [p for p in code_pairs(9, blank_first=False) if not has_blank_before_code(p[0])]),
])
def test_metric_agrees_with_lm_eval(lm_eval_metrics, metric, pairs):
    pairs = pairs()
    assert len(pairs) >= 200
    mine, theirs = getattr(ours, metric), getattr(lm_eval_metrics, metric)
    values = [mine(pred, truth) for pred, truth in pairs]
    assert values == [theirs(pred, truth) for pred, truth in pairs]
    assert len(set(values)) >= 3  # the pairs reach zero, partial and full scores, not one value
    assert 0.0 in values and max(values) == pytest.approx(1.0)


@pytest.mark.parametrize(("seed", "classes"), [(10, TREC), (11, LSHT)])
def test_classification_agrees_with_lm_eval(lm_eval_metrics, seed, classes):
    pairs = class_pairs(seed, classes)
    values = [ours.classification_score(p, t, all_classes=c) for p, t, c in pairs]
    assert values == [lm_eval_metrics.classification_score(p, t, all_classes=c) for p, t, c in pairs]
    assert {0.0, 1.0} <= set(values) and any(0 < v < 1 for v in values)


def test_code_sim_scores_a_blank_first_line_as_thudm_does(lm_eval_metrics):
    """THUDM's rule takes the first line without a backtick, `#` or `//`, even a whitespace-only one; lm-eval skips
    those lines since its v6. Ours keeps the official rule: the blank line is what gets compared."""
    pairs = code_pairs(12, blank_first=True)
    assert all(has_blank_before_code(pred) for pred, _ in pairs)
    for pred, truth in pairs:
        blank = next(ln for ln in pred.lstrip("\n").split("\n") if not ln.strip())
        assert ours.code_sim_score(pred, truth) == ours.fuzz_ratio(blank, truth) / 100
    assert sum(ours.code_sim_score(p, t) < lm_eval_metrics.code_sim_score(p, t) for p, t in pairs) > 100


def test_best_over_answers_agrees_with_lm_eval_wrappers(lm_eval_metrics):
    """score_sample (no first-line rule for these datasets) = lm-eval's get_*_score on stripped predictions."""
    rng = random.Random(13)
    cases = [("qasper", "qa_f1", en_text), ("dureader", "rouge_zh", zh_text), ("gov_report", "rouge", en_text),
             ("multifieldqa_zh", "qa_f1_zh", zh_text)]
    for dataset, metric, make in cases:
        for _ in range(60):
            answers = [make(rng, rng.randint(1, 8)) for _ in range(rng.randint(1, 3))]
            pred = variant(rng, rng.choice(answers), make).strip()
            theirs = getattr(lm_eval_metrics, f"get_{metric}_score")({"answers": answers}, [pred])
            assert ours.score_sample(dataset, metric, pred, answers, None) == next(iter(theirs.values()))


def test_first_line_rule_applies_to_the_four_official_datasets_only():
    pred = "\n\nParis\nLondon is the answer"
    assert ours.first_line(pred) == "Paris"
    assert ours.score_sample("triviaqa", "qa_f1", pred, ["Paris"], None) == 1.0
    assert ours.score_sample("hotpotqa", "qa_f1", pred, ["Paris"], None) == pytest.approx(0.4)
    assert ours.score_sample("trec", "classification", "Location\nHuman being", ["Location"], TREC) == 1.0
    assert ours.score_sample("lsht", "classification", "\n体育\n财经", ["财经"], LSHT) == 0.0
    assert ours.score_sample("samsum", "rouge", "a b c\nd e f", ["a b c"], None) == pytest.approx(1.0)


def test_classification_keeps_the_official_skip_after_a_removed_match():
    # "Human" is dropped as a substring of the truth; the loop then skips "being", which stays a match: 1/2.
    assert ours.classification_score("Human being", "Human being", all_classes=["Human", "being", "Human being"]) == 0.5
    assert ours.classification_score("Human being", "Human being", all_classes=["Human", "Human being"]) == 1.0


def fuzz_pairs(seed: int, n: int) -> list[tuple[str, str]]:
    """Generated string pairs: empty, whitespace-only, equal, edited copies, unrelated, unicode (Chinese, accents,
    emoji, combining marks) and long lines past difflib's 200-character junk heuristic."""
    rng = random.Random(seed)
    alphabets = [string.ascii_letters + string.digits + string.punctuation, " \t\n", "".join(ZH) + "".join(ZH_PUNCT),
                 "éèàüößçñøåÉ\u0301\u0308", "😀🚀🐍∑∫≈≠", string.ascii_lowercase[:4]]

    def text(length: int) -> str:
        chars = rng.choice(alphabets) + (rng.choice(alphabets) if rng.random() < 0.5 else "")
        return "".join(rng.choice(chars) for _ in range(length))

    def edit(s: str) -> str:
        chars = list(s)
        for _ in range(rng.randint(1, max(1, len(s) // 4))):
            op, i = rng.random(), rng.randrange(len(chars) + 1)
            if op < 0.4:
                chars.insert(i, text(1))
            elif chars and op < 0.7:
                del chars[min(i, len(chars) - 1)]
            elif chars:
                chars[min(i, len(chars) - 1)] = text(1)
        return "".join(chars)

    pairs = [("", ""), ("", "a"), ("a", ""), (" ", ""), (" ", "  "), ("\t", " "), ("abc", "abc ")]
    while len(pairs) < n:
        a = text(rng.choice([0, 1, 2, 5, 20, 80, 250, 600]))
        kind = rng.random()
        b = a if kind < 0.1 else edit(a) if kind < 0.6 else text(rng.choice([0, 1, 3, 20, 80, 300]))
        pairs.append((a, b) if rng.random() < 0.5 else (b, a))
    return pairs


def test_fuzz_ratio_equals_fuzzywuzzy_on_thousands_of_pairs():
    """The standard-library ratio scores exactly as fuzzywuzzy (the official code's GPL dependency, in the dev extra
    only as this oracle), including its rounding of halves and its empty and equal-string rules."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fuzzywuzzy warns that it falls back to difflib: the backend LongBench uses
        from fuzzywuzzy import fuzz

    pairs = fuzz_pairs(14, 4000)
    ours_scores = [ours.fuzz_ratio(a, b) for a, b in pairs]
    assert ours_scores == [fuzz.ratio(a, b) for a, b in pairs]
    assert len(set(ours_scores)) > 80 and {0, 100} <= set(ours_scores)
    assert any(len(a) > 200 and len(b) > 200 and 0 < s < 100 for (a, b), s in zip(pairs, ours_scores, strict=True))
