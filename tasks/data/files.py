"""Local data files read the way users have them: text in its declared or detected encoding (Project Gutenberg
still ships Latin-1 books), jsonl whose broken line is named.

Text is read as UTF-8 when it decodes; otherwise by the encoding a Gutenberg header declares ("Character set
encoding: ISO-8859-1"), else as Windows-1252 (a superset of Latin-1's printable characters, the usual encoding of
non-UTF-8 English text) and, if that fails too, as Latin-1, which decodes any bytes. Every fallback is logged.
"""

from __future__ import annotations

import codecs
import contextlib
import json
import logging
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# Gutenberg's header line; it sits within the first few dozen lines of every book that has one.
_DECLARED = re.compile(rb"^\s*Character set encoding:\s*([A-Za-z0-9_.:-]+)", re.MULTILINE | re.IGNORECASE)
_HEADER_BYTES = 8192


class DataFormatError(ValueError):
    """A local data file that cannot be parsed; the message names the file, the line and the fix."""


def declared_encoding(raw: bytes) -> str | None:
    """The encoding a Gutenberg header declares (a Python codec name), or None."""
    found = _DECLARED.search(raw[:_HEADER_BYTES])
    if found is None:
        return None
    name = found.group(1).decode("ascii")
    try:
        return codecs.lookup(name).name
    except LookupError:
        return None


def read_text(path: Path) -> str:
    """The file's text, newlines translated as `Path.read_text` does: UTF-8, else its declared encoding, else
    cp1252, else Latin-1 (logged)."""
    raw = Path(path).read_bytes()
    return _universal_newlines(_decode(raw, path))


def _decode(raw: bytes, path: Path) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        pass
    declared = declared_encoding(raw)
    if declared is not None and declared != "utf-8":
        with contextlib.suppress(UnicodeDecodeError):
            text = raw.decode(declared)
            log.info("read %s as %s (declared in its header; not UTF-8)", path, declared)
            return text
    try:
        text, encoding = raw.decode("cp1252"), "cp1252"
    except UnicodeDecodeError:
        text, encoding = raw.decode("latin-1"), "latin-1"
    log.info("read %s as %s (not UTF-8, no encoding declared: detected)", path, encoding)
    return text


def _universal_newlines(text: str) -> str:
    """\r\n and \r as \n, as text-mode reading gives them (Gutenberg books have \r\n line ends)."""
    return text.replace("\r\n", "\n").replace("\r", "\n")


def read_jsonl(path: Path) -> Iterator[dict[str, Any]]:
    """The rows of a jsonl file, read lazily; a line that is not a JSON object fails naming the file and line."""
    with Path(path).open("rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise DataFormatError(f"{path} line {number} is not UTF-8 (JSON Lines files are UTF-8): re-save the "
                                      "file as UTF-8") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataFormatError(f"{path} line {number} is not valid JSON ({err.msg} at column {err.colno}): "
                                      "fix or remove that line") from None
            if not isinstance(row, dict):
                raise DataFormatError(f"{path} line {number} is not a JSON object: fix or remove that line")
            yield row
