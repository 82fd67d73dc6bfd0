"""Tests for the local corpora: the standard-library split, Gutenberg stripping and text folders."""

import re
from pathlib import Path

import pytest

from unimem_bench.tasks.data.corpora import (
    read_stdlib_documents,
    read_text_dir,
    stdlib_module,
    stdlib_root,
    stdlib_split,
    strip_gutenberg,
)

BOOKS = Path(__file__).resolve().parents[2] / "shared" / "data" / "books"
TEST_FOLDERS = {"test", "tests", "idle_test"}


@pytest.fixture(scope="module")
def splits() -> dict[str, list[Path]]:
    return {name: stdlib_split(name) for name in ("train", "heldout")}


def test_split_is_deterministic(splits: dict[str, list[Path]]) -> None:
    assert stdlib_split("train") == splits["train"]
    assert stdlib_split("heldout") == splits["heldout"]


def test_split_is_by_module_and_disjoint(splits: dict[str, list[Path]]) -> None:
    train = {stdlib_module(p) for p in splits["train"]}
    heldout = {stdlib_module(p) for p in splits["heldout"]}
    assert not set(splits["train"]) & set(splits["heldout"])
    assert not train & heldout
    assert 0.05 <= len(heldout) / (len(train) + len(heldout)) <= 0.15
    assert "email" in train | heldout


def test_split_covers_every_module() -> None:
    root = stdlib_root()
    expected = {p.stem for p in root.glob("*.py") if not p.name.startswith("_sysconfigdata_")}
    expected |= {p.parent.name for p in root.glob("*/__init__.py")} - TEST_FOLDERS
    found = {stdlib_module(p) for name in ("train", "heldout") for p in stdlib_split(name)}
    assert found == expected


def test_split_excludes_tests_and_site_packages(splits: dict[str, list[Path]]) -> None:
    for path in splits["train"] + splits["heldout"]:
        parts = set(path.relative_to(stdlib_root()).parts)
        assert not parts & (TEST_FOLDERS | {"site-packages", "__pycache__"}), path
        assert path.suffix == ".py"


def test_split_rejects_unknown_name() -> None:
    with pytest.raises(ValueError, match="split"):
        stdlib_split("validation")  # type: ignore[arg-type]


def test_read_stdlib_documents_min_chars() -> None:
    docs = read_stdlib_documents("heldout", min_chars=4096)
    assert docs and all(len(text) >= 4096 for _, text in docs)
    assert len(docs) < len(stdlib_split("heldout"))
    assert all(not doc_id.startswith("/") and doc_id.endswith(".py") for doc_id, _ in docs)


def test_strip_gutenberg_synthetic() -> None:
    text = (
        "\ufeffThe Project Gutenberg EBook of Foo\nLicense blah\n"
        "*** START OF THIS PROJECT GUTENBERG EBOOK FOO ***\n\nChapter 1\nIt was a dark night.\n\n"
        "*** END OF THIS PROJECT GUTENBERG EBOOK FOO ***\nMore license text\n"
    )
    assert strip_gutenberg(text) == "Chapter 1\nIt was a dark night."
    assert strip_gutenberg(text.replace("*** START", "***START").replace("*** END", "***END")) == (
        "Chapter 1\nIt was a dark night.")
    assert strip_gutenberg("no markers here\n") == "no markers here\n"


# A marker line as Project Gutenberg writes it, with or without the space, and its licence section.
MARKER_LINE = re.compile(r"^\*{3}\s*(START|END) OF TH(E|IS) PROJECT GUTENBERG", re.MULTILINE | re.IGNORECASE)


@pytest.mark.skipif(not BOOKS.is_dir(), reason="shared book folder absent")
@pytest.mark.parametrize("book", sorted(p.name for p in BOOKS.glob("*.txt")) if BOOKS.is_dir() else [])
def test_strip_gutenberg_every_shared_book(book: str) -> None:
    raw = (BOOKS / book).read_bytes().decode("utf-8", errors="replace")
    body = strip_gutenberg(raw)
    markers = [m.group(1).upper() for m in MARKER_LINE.finditer(raw)]
    if not markers:  # not a Gutenberg file (the Debian KJV text): untouched
        assert body == raw
        return
    assert markers[:2] == ["START", "END"]
    # The body is exactly the text between the two marker lines, found here by character offsets.
    first, second = list(MARKER_LINE.finditer(raw))[:2]
    assert body == raw[raw.index("\n", first.start()) + 1:second.start()].strip()
    assert not MARKER_LINE.search(body) and "FULL LICENSE" not in body and "Gutenberg-tm" not in body
    assert 0.8 * len(raw) < len(body) < len(raw)


@pytest.mark.skipif(not BOOKS.is_dir(), reason="shared book folder absent")
def test_read_text_dir_books() -> None:
    docs = read_text_dir(BOOKS)
    assert [name for name, _ in docs] == sorted(p.name for p in BOOKS.glob("*.txt"))
    assert all("*** START OF" not in text for _, text in docs)


def test_read_text_dir(tmp_path: Path) -> None:
    (tmp_path / "b.txt").write_text("second", encoding="utf-8")
    (tmp_path / "a.txt").write_text("x\n*** START OF IT ***\nfirst\n*** END OF IT ***\n", encoding="utf-8")
    (tmp_path / "c.md").write_text("ignored", encoding="utf-8")
    assert read_text_dir(tmp_path) == [("a.txt", "first"), ("b.txt", "second")]
    assert read_text_dir(tmp_path, strip_pg_header=False)[0][1].startswith("x\n")
    assert [name for name, _ in read_text_dir(tmp_path, suffixes=(".md",))] == ["c.md"]


def test_read_text_dir_missing_or_empty(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="not found"):
        read_text_dir(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="no .txt files"):
        read_text_dir(tmp_path)
