"""What needle tasks share: haystack text, the length x depth grid, needle placement by tokens, answer scoring.

The haystack is a folder of books (Project Gutenberg boilerplate stripped, concatenated in file-name order and
repeated when a context needs more) or, with no folder, RULER's noise: one fixed paragraph repeated.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from unimem_bench.tasks.data.corpora import read_text_dir

NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
"""RULER's repeated-sentence haystack (its `noise`/`repeat` type)."""

# Characters tokenised per requested haystack token: prose averages 3-5 characters per token with a 32K vocabulary
# and about 2 with a tiny one, so 12 leaves a wide margin without tokenising whole books.
CHARS_PER_TOKEN_BOUND = 12

# A context must also hold the model's answer: lengths below this many tokens are rejected up front.
MIN_LENGTH = 16

LENGTH_FACTORS = (0.25, 0.5, 1, 2, 4, 8)
"""Default context lengths as multiples of the model's trained context: from well inside it to 8x beyond."""

DEFAULT_DEPTHS = tuple(round(i / 10, 1) for i in range(11))
"""Needle depths 0 (start of the haystack) to 1 (its end) in steps of 0.1."""


def check_grid(task: str, lengths: Sequence[int], depths: Sequence[float], max_new_tokens: int) -> None:
    """Raise ValueError naming the argument when the grid is malformed (used by the tasks' __post_init__)."""
    if max_new_tokens < 1:
        raise ValueError(f"{task}.max_new_tokens {max_new_tokens} must be >= 1")
    for length in lengths:
        if length < max(MIN_LENGTH, max_new_tokens + 1):
            raise ValueError(f"{task}.lengths: {length} cannot hold a prompt and {max_new_tokens} new tokens; "
                             f"use lengths above {max(MIN_LENGTH, max_new_tokens + 1)}")
    if len(set(lengths)) != len(lengths):
        raise ValueError(f"{task}.lengths {','.join(map(str, lengths))} repeats a length")
    if not depths:
        raise ValueError(f"{task}.depths is empty: give depths between 0 and 1, e.g. 0,0.5,1")
    if any(not 0 <= d <= 1 for d in depths):
        raise ValueError(f"{task}.depths {','.join(map(str, depths))}: every depth must be between 0 and 1")
    if len({float(d) for d in depths}) != len(depths):
        raise ValueError(f"{task}.depths {','.join(map(str, depths))} repeats a depth")


def resolve_lengths(lengths: Sequence[int], trained_context: int) -> list[int]:
    """The grid's context lengths: the given ones, or LENGTH_FACTORS x the trained context."""
    if lengths:
        return list(lengths)
    return sorted({max(MIN_LENGTH, int(f * trained_context)) for f in LENGTH_FACTORS})


def depth_label(depth: float) -> str:
    """`depth=0.25`: the subtask of a grid cell in the leaderboard (always a float, so 0 reads `depth=0.0`)."""
    return f"depth={float(depth)}"


def cell_key(length: int, depth: float) -> str:
    """The resume key of a grid cell."""
    return f"L={length}/{depth_label(depth)}"


def haystack_source(data_dir: Path | None) -> str:
    """What the haystack is made of, for the task's params."""
    return str(data_dir) if data_dir is not None else "noise"


def haystack_text(data_dir: Path | None) -> str:
    """The books of `data_dir` (boilerplate stripped) joined by blank lines, or RULER's noise paragraph."""
    if data_dir is None:
        return NOISE
    texts = [text for _, text in read_text_dir(Path(data_dir), suffixes=(".txt",), strip_pg_header=True)]
    text = "\n\n".join(t for t in texts if t.strip())
    if not text.strip():
        raise FileNotFoundError(f"the .txt files in {data_dir} are empty: give --data-dir a folder of books")
    return text


def repeat_to(text: str, n_chars: int, sep: str) -> str:
    """`text` repeated (joined by `sep`) until it has at least `n_chars` characters, then cut there."""
    copies = -(-n_chars // (len(text) + len(sep)))
    return sep.join([text] * max(copies, 1))[:n_chars]


def haystack_ids(tokenizer: Any, text: str, n_tokens: int) -> list[int]:
    """The first `n_tokens` token ids of the haystack stream (`text` repeated as often as needed)."""
    n_chars = max(n_tokens, 1) * CHARS_PER_TOKEN_BOUND
    while True:
        ids = tokenizer(repeat_to(text, n_chars, "\n\n"), add_special_tokens=False)["input_ids"]
        if len(ids) >= n_tokens:
            return ids[:n_tokens]
        n_chars *= 2


class SentenceEnds:
    """Which token ids end a sentence: their text, stripped, ends with '.' (decoded once per id, then cached)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.known: dict[int, bool] = {}

    def __call__(self, token: int) -> bool:
        if token not in self.known:
            self.known[token] = self.tokenizer.decode([token]).strip().endswith(".")
        return self.known[token]


def insert_needle(haystack: Sequence[int], needle: Sequence[int], depth: float,
                  is_sentence_end: Any) -> tuple[list[int], int]:
    """gkamradt's placement: the needle goes `depth` of the way into the haystack tokens, then moves back until the
    token before it ends a sentence (or to the start). Depth 1 puts it at the very end. Returns (ids, where)."""
    if depth >= 1:
        at = len(haystack)
    else:
        at = int(len(haystack) * depth)
        while at > 0 and not is_sentence_end(haystack[at - 1]):
            at -= 1
    return [*haystack[:at], *needle, *haystack[at:]], at


def normalize(text: str) -> str:
    """Lower case, runs of whitespace as one space."""
    return " ".join(text.lower().split())


def substring_match(answer: str, prediction: str) -> bool:
    """The needle's answer appears in the prediction (case-insensitive, whitespace normalised)."""
    return normalize(answer) in normalize(prediction)


_CONTROL = re.compile(r"[\x00-\x1f]")


def string_match_all(prediction: str, references: Sequence[str]) -> float:
    """RULER's metric: the fraction of references found in the prediction (case-insensitive), after RULER's
    postprocessing (control characters become newlines)."""
    if not references:
        raise ValueError("string_match_all needs at least one reference")
    pred = _CONTROL.sub("\n", prediction).strip().lower()
    return sum(ref.lower() in pred for ref in references) / len(references)
