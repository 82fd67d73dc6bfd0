"""`unimem-bench build-reference`: build (or rebuild) the embedded reference model."""

from __future__ import annotations

import argparse
from typing import Any

from unimem_bench.harness.cli.streams import Streams

NAME = "build-reference"


def register(sub: Any) -> None:
    parser = sub.add_parser(NAME, help="build (or rebuild) the embedded reference model")
    parser.add_argument("--force", action="store_true", help="rebuild even if it is cached")
    parser.set_defaults(func=execute)


def execute(args: argparse.Namespace, streams: Streams) -> int:
    from unimem_bench.harness.models.reference import build_reference

    path = build_reference(force=args.force, console=streams.err)
    streams.out.print(f"reference model: {path}", highlight=False, soft_wrap=True)
    return 0
