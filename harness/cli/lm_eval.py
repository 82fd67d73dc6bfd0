"""`unimem-bench lm-eval ARGS`: lm-eval's own command line with the `unimem` model registered; ARGS go to it
verbatim (argparse's REMAINDER cannot take arguments that start with a dash, so `app.parse` passes them through)."""

from __future__ import annotations

import argparse
from typing import Any

from unimem_bench.harness.cli.streams import Streams

NAME = "lm-eval"
PASS_THROUGH = True
"""Everything after the command's name is handed to lm-eval unparsed (`args.passthrough`)."""


def register(sub: Any) -> None:
    parser = sub.add_parser(NAME, add_help=False,
                            help="lm-eval's own CLI with the `unimem` model registered: unimem-bench lm-eval --model "
                                 "unimem --model_args pretrained=PATH,method=NAME --tasks TASK ...")
    parser.set_defaults(func=execute, passthrough=[])


def execute(args: argparse.Namespace, streams: Streams) -> int:
    from unimem_bench.harness.evaluation.lm_eval_model import (
        run_lm_eval_cli,  # importing it registers `unimem` with lm-eval
    )

    return run_lm_eval_cli(args.passthrough)
