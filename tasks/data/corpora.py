"""Local text corpora that need no download: the Python standard library's source and folders of plain-text books.

Standard-library split rule (``stdlib_split``):

* Files: every ``*.py`` file under ``stdlib_root()`` that decodes as UTF-8, except those with a path component
  ``site-packages``, ``__pycache__``, ``test``, ``tests`` or ``idle_test`` (the test suites: ``test/``,
  ``unittest/test``, ``idlelib/idle_test``, ``lib2to3/tests``, ``ctypes/test``, ...), those in a top-level folder
  that is not a package (no ``__init__.py``: ``config-3.x-<platform>``, ``lib-dynload``), and the build-generated,
  platform-named ``_sysconfigdata_*.py``.
* Module: the first component of a file's path relative to the root, ``.py`` dropped; everything under ``email/``
  is the module ``email``, ``argparse.py`` is ``argparse``. A module lies wholly in one split.
* Split: a module is "heldout" when the first 8 bytes of ``sha256(SPLIT_SALT + name)``, read as a big-endian
  integer, fall in the lowest ``HELDOUT_PERCENT`` percent of their range; else "train". The hash depends only on
  the name, so the split is the same on every machine with the same Python version, and a module keeps its side
  when other modules come or go between versions.
"""

from __future__ import annotations

import hashlib
import os
import re
import sysconfig
from pathlib import Path
from typing import Literal

Split = Literal["train", "heldout"]

SPLIT_SALT = "unimem-bench/stdlib-split/"
"""Prefix hashed with each module name; changing it reshuffles the split."""
HELDOUT_PERCENT = 10
"""Share of modules (not files or characters) that go to "heldout"."""

_EXCLUDED_PARTS = frozenset({"site-packages", "__pycache__", "test", "tests", "idle_test"})
# Project Gutenberg's marker lines, with or without a space after the asterisks ("***START OF THE PROJECT ...").
_GUTENBERG_START = re.compile(r"\*\*\*\s*START OF")
_GUTENBERG_END = re.compile(r"\*\*\*\s*END OF")


def stdlib_root() -> Path:
    """The running Python's standard-library source folder."""
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_module(path: Path) -> str:
    """The top-level module a standard-library file belongs to (``email/mime/text.py`` -> ``email``)."""
    return _module_of(path.resolve().relative_to(stdlib_root().resolve()))


def _module_of(relative: Path) -> str:
    return relative.parts[0].removesuffix(".py")


def _module_split(module: str) -> Split:
    digest = hashlib.sha256((SPLIT_SALT + module).encode("utf-8")).digest()
    return "heldout" if int.from_bytes(digest[:8], "big") * 100 < HELDOUT_PERCENT * 2**64 else "train"


def _source_files(root: Path) -> list[Path]:
    """Every source file under ``root`` that the split rule keeps, sorted by relative path."""
    found = [p for p in root.glob("*.py") if not p.name.startswith("_sysconfigdata_")]
    for top in root.iterdir():
        if not (top / "__init__.py").is_file() or top.name in _EXCLUDED_PARTS:
            continue
        for folder, subfolders, names in os.walk(top):
            subfolders[:] = [d for d in subfolders if d not in _EXCLUDED_PARTS]
            found.extend(Path(folder, name) for name in names if name.endswith(".py"))
    return sorted((p for p in found if _is_utf8(p)), key=lambda p: p.relative_to(root).as_posix())


def _is_utf8(path: Path) -> bool:
    try:
        path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def stdlib_split(split: Split) -> list[Path]:
    """The standard library's source files in ``split``, sorted by relative path (rule in the module docstring)."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', not {split!r}")
    root = stdlib_root()
    return [p for p in _source_files(root) if _module_split(_module_of(p.relative_to(root))) == split]


def read_stdlib_documents(split: Split, *, min_chars: int = 0) -> list[tuple[str, str]]:
    """``(doc_id, text)`` for each file of ``split`` with at least ``min_chars`` characters; doc_id is the relative
    POSIX path (``email/message.py``)."""
    root = stdlib_root()
    docs = [(p.relative_to(root).as_posix(), p.read_text(encoding="utf-8")) for p in stdlib_split(split)]
    return [(doc_id, text) for doc_id, text in docs if len(text) >= min_chars]


def strip_gutenberg(text: str) -> str:
    """Keep only the lines strictly between the ``*** START OF`` and ``*** END OF`` marker lines of a Project
    Gutenberg text (also written ``***START OF``), as PG-19 does; a text without a start marker comes back unchanged,
    one without an end marker is kept to its end. Surrounding whitespace is stripped."""
    lines = text.splitlines(keepends=True)
    start = next((i for i, line in enumerate(lines) if _GUTENBERG_START.match(line.lstrip("\ufeff"))), None)
    if start is None:
        return text
    end = next((i for i in range(start + 1, len(lines)) if _GUTENBERG_END.match(lines[i])), len(lines))
    return "".join(lines[start + 1 : end]).strip()


def read_text_dir(
    path: Path, *, suffixes: tuple[str, ...] = (".txt",), strip_pg_header: bool = True
) -> list[tuple[str, str]]:
    """``(file name, text)`` for each file in ``path`` whose name ends with one of ``suffixes``, sorted by name;
    Gutenberg boilerplate stripped when ``strip_pg_header``."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"text folder not found: {path}")
    files = sorted(p for p in path.iterdir() if p.is_file() and p.name.endswith(tuple(suffixes)))
    if not files:
        raise FileNotFoundError(f"no {'/'.join(suffixes)} files in text folder: {path}")
    docs = [(p.name, p.read_text(encoding="utf-8")) for p in files]
    return [(name, strip_gutenberg(text) if strip_pg_header else text) for name, text in docs]
