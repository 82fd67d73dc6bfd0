"""Output folders checked while planning, so that a bad `--out` fails before any model work."""

from __future__ import annotations

from pathlib import Path

from unimem_bench.methods import ConfigError


def check_output_folder(path: Path, flag: str) -> None:
    """`path` is, or can be created as, a folder: neither it nor any existing parent is a file."""
    path = Path(path)
    for folder in (path, *path.parents):
        if folder.exists():
            if not folder.is_dir():
                what = f"{flag} {path} is a file" if folder == path else f"{flag} {path} lies under the file {folder}"
                raise ConfigError(f"{what}: point {flag} at a folder")
            return
