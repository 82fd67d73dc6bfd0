"""Small LongBench-format data: every dataset's official jsonl schema, seeded, with answers the context supports.

`python -m unimem_bench.tasks.longbench.fixture DIR [--n N] [--words W]` writes `DIR/<dataset>.jsonl` for the 21
datasets and `DIR/<dataset>_e.jsonl` for the 13 LongBench-E ones (their lengths cycle through the three length buckets).
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path
from typing import Any

from unimem_bench.tasks.longbench.data import DATASETS, E_DATASETS

EN_WORDS = ("the", "a", "an", "little", "big", "red", "blue", "happy", "sad", "cat", "dog", "girl", "boy", "tree",
            "park", "ball", "sun", "moon", "house", "garden", "river", "friend", "mother", "father", "apple", "bird",
            "fish", "cake", "rain", "snow", "day", "night", "king", "queen", "ship", "town", "road", "book", "song",
            "jumped", "ran", "saw", "found", "liked", "played", "walked", "made", "gave", "took", "said", "looked",
            "smiled")
ZH_CHARS = ("的一是在不了有和人这中大为上个国我以要他时来用们生到作地于"
            "出就分对成会可主发年动同工也能下过子说产种面而方后多定")
TREC_CLASSES = ("Abbreviation", "Entity", "Description", "Human being", "Location", "Numeric value", "Description of "
                "a person", "Definition of something")
LSHT_CLASSES = ("体育", "财经", "科技", "娱乐", "教育", "体育新闻")


def sentence(rng: random.Random) -> str:
    words = [rng.choice(EN_WORDS) for _ in range(rng.randint(5, 12))]
    return " ".join(words).capitalize() + "."


def prose(rng: random.Random, words: int) -> str:
    out: list[str] = []
    while sum(len(s.split()) for s in out) < words:
        out.append(sentence(rng))
    return " ".join(out)


def zh_text(rng: random.Random, chars: int) -> str:
    clauses = ("".join(rng.choice(ZH_CHARS) for _ in range(rng.randint(8, 20))) for _ in range(chars // 14))
    return "。".join(clauses) + "。"


def code(rng: random.Random, lines: int) -> list[str]:
    out = ["def compute(values, scale):", "    total = 0"]
    for i in range(lines):
        out.append(f"    x{i} = values[{rng.randint(0, 9)}] * scale + {rng.randint(0, 99)}")
        out.append(f"    total += x{i}" if rng.random() < 0.7 else f"    # step {i}")
    return out


def record(name: str, rng: random.Random, words: int) -> dict[str, Any]:
    """One record of dataset `name` in the official schema (input, context, answers, all_classes ...)."""
    spec = DATASETS[name]
    classes = None
    if spec.language == "zh":
        context = zh_text(rng, words)
        answer = "".join(rng.choice(ZH_CHARS) for _ in range(4))
        question = f"什么是{answer[:2]}？"
        if name == "lsht":
            classes = list(LSHT_CLASSES)
            answer = rng.choice(LSHT_CLASSES)
            context = "".join(f"新闻：{zh_text(rng, 40)}\n类别：{rng.choice(LSHT_CLASSES)}\n"
                              for _ in range(words // 40))
            question = f"新闻：{zh_text(rng, 40)}\n类别："
        elif name == "passage_retrieval_zh":
            paragraphs = [zh_text(rng, 60) for _ in range(max(3, words // 60))]
            target = rng.randrange(len(paragraphs))
            context = "\n\n".join(f"段落{i + 1}：{p}" for i, p in enumerate(paragraphs))
            question, answer = paragraphs[target][:30], f"段落{target + 1}"
        elif name == "vcsum":
            question, answer = "", zh_text(rng, 40)
        context_words = len("".join((context + question).split()))
    else:
        context, question = prose(rng, words), ""
        answer = rng.choice(EN_WORDS)
        if spec.category in ("single_doc_qa", "multi_doc_qa"):
            noun = rng.choice(EN_WORDS)
            context += f" The secret of the {noun} is {answer}. " + prose(rng, 20)
            question = f"What is the secret of the {noun}?"
        elif spec.category == "summarization":
            answer = prose(rng, 30)
            question = "What did they decide?" if name == "qmsum" else ""
        elif name == "trec":
            classes = list(TREC_CLASSES)
            answer = rng.choice(TREC_CLASSES)
            context = "".join(f"Question: {sentence(rng)}\nType: {rng.choice(TREC_CLASSES)}\n"
                              for _ in range(words // 10))
            question = f"Question: {sentence(rng)}\nType:"
        elif name == "triviaqa":
            context = "\n\n".join(f"Passage: {sentence(rng)}\nQuestion: {sentence(rng)}\nAnswer: {rng.choice(EN_WORDS)}"
                                  for _ in range(words // 25))
            question = f"Passage: {sentence(rng)} {answer}.\nQuestion: {sentence(rng)}\nAnswer:"
        elif name == "samsum":
            context = "\n\n".join(f"Dialogue: A: {sentence(rng)}\nB: {sentence(rng)}\nSummary: {sentence(rng)}"
                                  for _ in range(words // 30))
            answer = sentence(rng)
            question = f"Dialogue: A: {sentence(rng)}\nB: {sentence(rng)}\nSummary:"
        elif name == "passage_count":
            unique = [prose(rng, 40) for _ in range(max(2, words // 80))]
            paragraphs = unique + rng.sample(unique, len(unique) // 2)
            rng.shuffle(paragraphs)
            context = "\n\n".join(f"Paragraph {i + 1}: {p}" for i, p in enumerate(paragraphs))
            answer = str(len(unique))
        elif name == "passage_retrieval_en":
            paragraphs = [prose(rng, 60) for _ in range(max(3, words // 60))]
            target = rng.randrange(len(paragraphs))
            context = "\n\n".join(f"Paragraph {i + 1}: {p}" for i, p in enumerate(paragraphs))
            question, answer = paragraphs[target][:120], f"Paragraph {target + 1}"
        elif spec.category == "code":
            lines = code(rng, max(4, words // 9))
            context = "\n".join(lines[:-2]) + "\n"
            question = "\n".join(lines[-2:]) + "\n"
            if name == "lcc":  # lcc has no input: the whole file is the context
                context, question = context + question, ""
            answer = f"    return total * {rng.randint(2, 9)}"
        context_words = len((context + question).split())
    return {"input": question, "context": context, "answers": [answer], "length": context_words + len(answer.split()),
            "dataset": name, "language": spec.language, "all_classes": classes, "_id": f"{rng.getrandbits(96):024x}"}


def write_longbench_dir(folder: Path, *, n: int = 2, words: int = 600, seed: int = 0,
                        e_words: tuple[int, ...] = (600, 4200, 8200)) -> Path:
    """Write the 21 v1 files (contexts of about `words` words) and the 13 LongBench-E files (contexts cycling
    through `e_words`, so that the buckets 0-4k, 4-8k and 8k+ all occur when n >= 3)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in DATASETS:
        rng = random.Random(f"{seed}/{name}")
        rows = [record(name, rng, words) for _ in range(n)]
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    for name in E_DATASETS:
        rng = random.Random(f"{seed}/{name}_e")
        rows = [record(name, rng, e_words[i % len(e_words)]) for i in range(n)]
        (folder / f"{name}_e.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return folder


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("folder", type=Path)
    parser.add_argument("--n", type=int, default=2, help="records per dataset")
    parser.add_argument("--words", type=int, default=600, help="context words of the v1 records")
    args = parser.parse_args()
    print(write_longbench_dir(args.folder, n=args.n, words=args.words))
