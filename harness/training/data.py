"""Fine-tuning data: a corpus split into training and held-out documents, dealt to processes and batch rows as whole
document streams, and cut into the windows of consecutive segments that training runs.

`--data` is `github` (the standard library's train split; its held-out split for perplexity), `pg19` (the Hugging
Face dataset, train and validation splits; needs a network) or a local folder of text files, whose held-out
documents are chosen by a hash of their names (stable when files come and go).

Dealing (`deal`): the training documents are shuffled once with the seed; document d of that order goes to process
d % world and, there, to row (d // world) % batch. Each row streams its own documents one after the other, so row i
of step t+1 continues the document of row i of step t and memory always holds that document's true previous
context; a process never sees another's documents. One process with `world x batch` rows deals exactly the same
streams (row r*world + p there is row r of process p), which is what makes a 2-process run equal a 1-process one.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from unimem_bench.tasks.data.corpora import read_stdlib_documents, read_text_dir
from unimem_bench.tasks.perplexity import CODE_SUFFIXES, encode_document

PG19_HUB_ID = "emozilla/pg19"
"""A parquet copy of DeepMind's PG-19 (the original `deepmind/pg19` is a loading script that `datasets` >= 3 no
longer runs): train / validation / test splits with a `text` column."""

HELDOUT_SALT = "unimem-bench/finetune-heldout/"
"""Prefix hashed with each file name of a `--data DIR` to pick its held-out documents."""

GITHUB_MIN_CHARS = 10_000
"""Held-out code files shorter than this are skipped, as the `github` task does: memory matters on long files."""


class DataError(FileNotFoundError):
    """Training data that cannot be used; the message is one line naming the problem and the fix."""


class HubDocuments(Sequence[tuple[str, str]]):
    """A Hugging Face dataset split as a sequence of (doc_id, text), read lazily row by row."""

    def __init__(self, dataset: Any, title_column: str) -> None:
        self.dataset = dataset
        self.title_column = title_column

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> tuple[str, str]:  # type: ignore[override]
        row = self.dataset[int(i)]
        return f"{i}:{row.get(self.title_column, '')}", row["text"]


@dataclass(frozen=True)
class Corpus:
    """Training and held-out documents, each a sequence of (doc_id, text) in a fixed order."""

    name: str
    """`github`, `pg19` or the folder's path (recorded in the run)."""
    train: Sequence[tuple[str, str]]
    """Documents to train on."""
    heldout: Sequence[tuple[str, str]]
    """Documents for held-out perplexity, never trained on."""


def check_data(data: str) -> None:
    """Cheap validation of `--data` before any model work."""
    if data in ("github", "pg19"):
        return
    folder = Path(data)
    if not folder.is_dir():
        raise DataError(f"--data {data}: not `github`, `pg19` nor an existing folder of text files")


def load_corpus(data: str, *, heldout_docs: int | None = None) -> Corpus:
    """Read `--data` and split it into training and held-out documents."""
    check_data(data)
    if data == "github":
        return Corpus("github", read_stdlib_documents("train"),
                      read_stdlib_documents("heldout", min_chars=GITHUB_MIN_CHARS))
    if data == "pg19":
        return _pg19()
    docs = [(name, text) for name, text in read_text_dir(Path(data), suffixes=CODE_SUFFIXES) if text.strip()]
    n_heldout = heldout_docs if heldout_docs is not None else max(1, round(0.1 * len(docs)))
    if len(docs) < n_heldout + 1:
        raise DataError(f"--data {data}: {len(docs)} text files, but {n_heldout} are held out for perplexity and at "
                        "least one must remain to train on: add files or lower --heldout-docs")
    by_hash = sorted(docs, key=lambda d: hashlib.sha256((HELDOUT_SALT + d[0]).encode()).hexdigest())
    heldout_names = {name for name, _ in by_hash[:n_heldout]}
    return Corpus(str(data), [d for d in docs if d[0] not in heldout_names],
                  [d for d in docs if d[0] in heldout_names])


def _pg19() -> Corpus:
    try:
        import datasets

        splits = datasets.load_dataset(PG19_HUB_ID, split=["train", "validation"])
    except Exception as err:  # offline, renamed or unreadable: datasets raises many types
        raise DataError(f"--data pg19: cannot load the hub dataset {PG19_HUB_ID} ({type(err).__name__}); offline, "
                        "pass --data DIR with .txt books instead (e.g. ../shared/data/books)") from None
    return Corpus("pg19", HubDocuments(splits[0], "short_book_title"), HubDocuments(splits[1], "short_book_title"))


def deal(n_docs: int, *, world: int, rank: int, batch: int, seed: int) -> list[list[int]]:
    """Indices of the training documents each of this process's `batch` rows streams, in order (see module doc)."""
    if n_docs < world * batch:
        raise DataError(f"{n_docs} training documents cannot give {world} process(es) x {batch} rows a whole "
                        "document each: lower --batch-size (or use fewer processes, or more data)")
    order = list(range(n_docs))
    random.Random(seed).shuffle(order)
    rows: list[list[int]] = [[] for _ in range(batch)]
    for d, doc in enumerate(order):
        if d % world == rank:
            rows[(d // world) % batch].append(doc)
    return rows


@dataclass(frozen=True)
class Window:
    """Consecutive segments of one document that one forward/backward covers (k segments under BPTT)."""

    row: int
    """The batch row (document stream) it belongs to."""
    doc_id: str
    """The document's id (file name, module path or dataset row)."""
    ids: torch.Tensor
    """[n] the whole document's token ids."""
    starts: tuple[int, ...]
    """Document position of each segment's first input token."""
    segment_len: int
    """Tokens per segment (per forward)."""

    def __post_init__(self) -> None:
        if not self.starts or self.starts[-1] >= len(self.ids) - 1:
            raise ValueError(f"a window needs segments starting before the last token of {self.doc_id!r}")

    def segments(self) -> list[tuple[int, torch.Tensor, torch.Tensor]]:
        """(start, input ids [width], target ids [width]) per segment: every token after the first is a target once,
        a segment's first token predicted by the last position of the previous one (as evaluation scores it)."""
        out = []
        for start in self.starts:
            width = min(self.segment_len, len(self.ids) - 1 - start)
            out.append((start, self.ids[start:start + width], self.ids[start + 1:start + width + 1]))
        return out

    @property
    def n_targets(self) -> int:
        return sum(min(self.segment_len, len(self.ids) - 1 - s) for s in self.starts)

    @property
    def opens_document(self) -> bool:
        """Whether this window starts its document (memory must start empty)."""
        return self.starts[0] == 0


class DocumentStreams:
    """This process's rows, each streaming its own documents window by window; resumable from `state_dict`."""

    def __init__(self, docs: Sequence[tuple[str, str]], rows: list[list[int]], tokenizer: Any, *, segment_len: int,
                 window_segments: int) -> None:
        self.docs = docs
        self.rows = rows
        self.tokenizer = tokenizer
        self.segment_len = segment_len
        self.window_segments = window_segments
        self.cursor = [0] * len(rows)
        """Per row, how many documents it has started (an index into its list, modulo its length: later epochs)."""
        self.offset = [0] * len(rows)
        """Per row, the document position of the next segment."""
        self._current: list[tuple[int, str, torch.Tensor] | None] = [None] * len(rows)

    def _document(self, row: int) -> tuple[str, torch.Tensor]:
        """The row's current document (tokenized once), skipping any too short to have a target."""
        while True:
            index = self.rows[row][self.cursor[row] % len(self.rows[row])]
            cached = self._current[row]
            if cached is None or cached[0] != index:
                doc_id, text = self.docs[index]
                ids, _ = encode_document(self.tokenizer, text, None)
                self._current[row] = cached = (index, doc_id, ids)
            if len(cached[2]) >= 2:
                return cached[1], cached[2]
            self.cursor[row] += 1

    def next_window(self, row: int) -> Window:
        """The row's next window: up to `window_segments` segments, ending early at the document's end."""
        doc_id, ids = self._document(row)
        last = len(ids) - 1  # positions that have a target
        starts = tuple(range(self.offset[row], min(last, self.offset[row] + self.window_segments * self.segment_len),
                             self.segment_len))
        window = Window(row, doc_id, ids, starts, self.segment_len)
        self.offset[row] = starts[-1] + self.segment_len
        if self.offset[row] >= last:
            self.cursor[row] += 1
            self.offset[row] = 0
        return window

    def state_dict(self) -> dict[str, list[int]]:
        return {"cursor": list(self.cursor), "offset": list(self.offset)}

    def load_state_dict(self, state: dict[str, list[int]]) -> None:
        if len(state["cursor"]) != len(self.rows):
            raise DataError(f"the checkpoint streams {len(state['cursor'])} rows per process but this run has "
                            f"{len(self.rows)}: resume with the same --batch-size and number of processes")
        self.cursor, self.offset = list(state["cursor"]), list(state["offset"])


def heldout_documents(corpus: Corpus, tokenizer: Any, *, max_docs: int, max_tokens: int | None) -> list[
        tuple[str, torch.Tensor]]:
    """The first `max_docs` held-out documents, tokenized and truncated to `max_tokens`."""
    out = []
    for i in range(min(max_docs, len(corpus.heldout))):
        doc_id, text = corpus.heldout[i]
        ids, _ = encode_document(tokenizer, text, max_tokens)
        if len(ids) >= 2:
            out.append((doc_id, ids))
    if not out:
        raise DataError(f"--data {corpus.name}: no held-out document with at least two tokens to measure perplexity")
    return out
