"""`unimem-bench finetune`: fine-tune a method from flags and/or a YAML recipe, or dry-run it.

Every option is a `FinetuneRecipe` field (the one schema of fine-tuning options; see harness/training/recipe.py for
the recipe file): flags default to None so that unset ones fall to the recipe, then to the field's default.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import typing
from pathlib import Path
from typing import Any

import torch
import yaml
from rich.console import Console
from rich.table import Table

from unimem_bench.harness.cli.arguments import positive_int
from unimem_bench.harness.cli.streams import Streams
from unimem_bench.harness.runtime.distributed import launched_world
from unimem_bench.harness.training.recipe import FinetunePlan, FinetuneRecipe, Precision, Schedule, plan_finetune
from unimem_bench.methods import ConfigError, MemoryLM, describe

NAME = "finetune"
log = logging.getLogger(__name__)


def _default(name: str) -> object:
    """A `FinetuneRecipe` default, for help texts (one source of truth)."""
    return {f.name: f.default for f in dataclasses.fields(FinetuneRecipe)}[name]


def register(sub: Any) -> None:
    ft = sub.add_parser(NAME, help="fine-tune a method, streaming documents segment by segment with memory",
                        argument_default=None)
    ft.add_argument("--recipe", type=Path, help="YAML recipe (recipes/); command-line options override it")
    ft.add_argument("--method", help="the method to fine-tune (see `unimem-bench list`)")
    ft.add_argument("--set", dest="overrides", action="append", metavar="FIELD=VALUE",
                    help="method config override, e.g. --set training.bptt_segments=4 (repeatable)")
    ft.add_argument("--model", help="local HF folder, hub id or llama2.c .bin (default: the reference model)")
    ft.add_argument("--model-config", type=Path, help="the model's config.json (a recipe ships it for dry runs)")
    ft.add_argument("--data", help=f"github, pg19, or a folder of text files (default {_default('data')})")
    ft.add_argument("--heldout-docs", type=positive_int, help="files of a --data folder held out (default: 10%%)")
    ft.add_argument("--tokens", type=positive_int, help="training tokens (required, here or in the recipe)")
    ft.add_argument("--segment-len", type=positive_int, help="tokens per segment (default: half the trained context)")
    ft.add_argument("--batch-size", type=positive_int,
                    help=f"document streams per process (default {_default('batch_size')})")
    ft.add_argument("--grad-accum", type=positive_int,
                    help=f"windows per stream per optimizer step (default {_default('grad_accum')})")
    ft.add_argument("--lr", type=float, help=f"peak learning rate (default {_default('lr')})")
    ft.add_argument("--schedule", choices=typing.get_args(Schedule),
                    help=f"after warm-up (default {_default('schedule')})")
    ft.add_argument("--warmup-steps", type=int, help=f"linear warm-up steps (default {_default('warmup_steps')})")
    ft.add_argument("--weight-decay", type=float, help=f"AdamW weight decay (default {_default('weight_decay')})")
    ft.add_argument("--clip", type=float, help=f"gradient-norm clip, 0 = off (default {_default('clip')})")
    ft.add_argument("--precision", choices=typing.get_args(Precision), help="auto: bf16 on GPU, fp32 on CPU")
    ft.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction,
                    help="recompute decoder layers in backward (default off)")
    ft.add_argument("--eval-every", type=int,
                    help=f"held-out perplexity every N steps, 0 = start/end (default {_default('eval_every')})")
    ft.add_argument("--eval-docs", type=positive_int,
                    help=f"held-out documents evaluated (default {_default('eval_docs')})")
    ft.add_argument("--eval-tokens", type=positive_int,
                    help=f"tokens per held-out document (default {_default('eval_tokens')})")
    ft.add_argument("--save-every", type=int,
                    help=f"checkpoint every N steps (default {_default('save_every')}: only when stopped)")
    ft.add_argument("--keep-checkpoints", type=positive_int,
                    help=f"newest checkpoints kept (default {_default('keep_checkpoints')})")
    ft.add_argument("--seed", type=int, help=f"document order and torch seed (default {_default('seed')})")
    ft.add_argument("--device", help=f"auto, cpu, cuda (default {_default('device')})")
    ft.add_argument("--out", type=Path,
                    help="run folder, `{method}` replaced by the method (required, here or in the recipe)")
    ft.add_argument("--resume", action="store_true", default=False,
                    help="continue the run in --out from its newest checkpoint")
    ft.add_argument("--stop-after-steps", type=positive_int,
                    help="end this invocation after N steps with a checkpoint (the schedule still spans --tokens)")
    ft.add_argument("--dry-run", action="store_true", default=False,
                    help="resolve the recipe and build the model on the meta device; train nothing")
    ft.set_defaults(func=execute)


def given_fields(args: argparse.Namespace) -> dict[str, Any]:
    """The `FinetuneRecipe` fields set on the command line (unset flags are None)."""
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(FinetuneRecipe)
            if getattr(args, f.name, None) is not None}


def resolve_recipe(args: argparse.Namespace) -> FinetuneRecipe:
    """The run the command line describes over its --recipe over `FinetuneRecipe`'s defaults."""
    given = given_fields(args)
    if given.get("overrides") is not None:
        given["overrides"] = tuple(given["overrides"])
    return FinetuneRecipe.resolve(args.recipe, given)


def dry_run(recipe: FinetuneRecipe, plan: FinetunePlan, launch: str | None, recipe_path: Path | None,
            console: Console) -> None:
    """Print what the run would do; the model is built on the meta device (shapes, no memory, no weights)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(plan.model_config)
    lm = MemoryLM(model, plan.config, segment_len=plan.segment_len, trained_context=plan.trained_context)
    n_model = sum(p.numel() for p in model.parameters())
    n_method = sum(t.numel() for t in lm.method_state().values())
    cfg = plan.model_config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    # Keys and values of every injected layer's bank, in bf16, for one document stream.
    bank_mib = (plan.config.management.size * len(lm.layers) * cfg.num_key_value_heads * head_dim * 2 * 2) / 2**20
    table = Table(title=f"finetune {recipe.method} (dry run)", show_header=False)
    rows = {
        "model": f"{plan.source.name}: {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, "
                 f"{n_model / 1e6:,.1f}M parameters (built on the meta device)",
        "method": ", ".join(f"{k} {v}" for k, v in describe(plan.config).items()),
        "learned by the method": f"{n_method:,} parameters" + (" (memory tokens)" if n_method else ""),
        "segments": f"{plan.segment_len} tokens ({plan.forward_len} per forward); window {plan.window_segments} "
                    f"segment(s) per backward ({plan.config.training.strategy})",
        "memory bank per stream": f"{bank_mib:,.1f} MiB (bf16)",
        "data": f"{recipe.data} (not read in a dry run)",
        "schedule": f"{plan.steps:,} steps x <= {plan.tokens_per_step(recipe):,} tokens ({plan.world} process(es) x "
                    f"{recipe.batch_size} rows x {recipe.grad_accum} accumulation) = {recipe.tokens:,} tokens",
        "optimizer": f"AdamW lr {recipe.lr:g} {recipe.schedule}, warm-up {recipe.warmup_steps}, weight decay "
                     f"{recipe.weight_decay:g}, clip {recipe.clip:g}, precision {recipe.precision}, gradient "
                     f"checkpointing {'on' if recipe.gradient_checkpointing else 'off'}",
        "evaluation": f"every {recipe.eval_every} steps, {recipe.eval_docs} held-out docs x {recipe.eval_tokens} "
                      "tokens",
        "output": str(recipe.out),
    }
    for key, value in rows.items():
        table.add_row(key, value)
    console.print(table)
    if launch:
        console.print(f"launch: accelerate launch --config_file {launch} -m unimem_bench.harness.cli finetune "
                      f"--recipe {recipe_path} --method {recipe.method}", soft_wrap=True)


def recipe_launch(path: Path | None) -> tuple[str | None, int]:
    """The accelerate config a recipe names under `launch` (checked to exist) and the processes it launches."""
    launch = (yaml.safe_load(path.read_text()) or {}).get("launch") if path is not None else None
    if launch is None:
        return None, 1
    if not Path(launch).is_file():
        raise FileNotFoundError(f"recipe {path}: launch config {launch} not found (paths are relative to the "
                                "current folder: run from the repository root)")
    try:
        processes = int((yaml.safe_load(Path(launch).read_text()) or {}).get("num_processes", 1))
    except (yaml.YAMLError, ValueError, TypeError, AttributeError):
        raise ConfigError(f"recipe {path}: launch config {launch} is not an accelerate config with num_processes"
                          ) from None
    return launch, processes


def execute(args: argparse.Namespace, streams: Streams) -> int:
    recipe = resolve_recipe(args)
    if args.dry_run:
        launch, processes = recipe_launch(args.recipe)
        # Steps depend on the processes: those of this launch, else those the recipe's launch config starts.
        plan = plan_finetune(recipe, world=launched_world() if launched_world() > 1 else processes)
        dry_run(recipe, plan, launch, args.recipe, streams.out)
        return 0
    from unimem_bench.harness.training.trainer import finetune

    try:
        finetune(recipe, resume=args.resume, stop_after_steps=args.stop_after_steps, console=streams.err)
    except KeyboardInterrupt:
        log.warning("interrupted: checkpoints in %s are kept; run the same command with --resume to continue from "
                    "the newest", recipe.out / "checkpoints")
        return 130
    return 0
