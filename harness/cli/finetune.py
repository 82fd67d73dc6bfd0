"""`unimem-bench finetune` and `unimem-bench finetune-plot`: options, YAML recipes, the dry run.

A recipe (recipes/*.yaml) sets the same options as the command line, by name (`segment_len: 2048`, `set: [...]`),
with a `methods:` section holding each method's own options; options given on the command line win. Two keys are
not options: `methods` and `launch` (the accelerate config the recipe is launched with; the dry run prints the
command). `model_config` is found relative to the recipe file, every other path relative to the current folder.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import yaml
from rich.console import Console
from rich.table import Table

from unimem_bench.harness.runtime.distributed import launched_world
from unimem_bench.harness.training.recipe import FinetunePlan, FinetuneRecipe, plan_finetune
from unimem_bench.methods import ConfigError, MemoryLM, describe

# Options that steer one invocation rather than describe the run: never in a recipe.
CONTROL = ("recipe", "resume", "stop_after_steps", "dry_run")
RECIPE_ONLY = ("methods", "launch")


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be >= 1")
    return value


def _default(name: str) -> object:
    """A `FinetuneRecipe` default, for help texts (one source of truth)."""
    return FinetuneRecipe.__dataclass_fields__[name].default


def add_finetune_parsers(sub: Any, *, exit_on_error: bool = True) -> None:
    """The `finetune` and `finetune-plot` subcommands (defaults None: unset options fall to the recipe, then to
    `FinetuneRecipe`'s defaults). Recipes are parsed with `exit_on_error=False`, so a bad value raises."""
    ft = sub.add_parser("finetune", help="fine-tune a method, streaming documents segment by segment with memory",
                        argument_default=None, exit_on_error=exit_on_error)
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
    ft.add_argument("--schedule", choices=["linear", "constant"],
                    help=f"after warm-up (default {_default('schedule')})")
    ft.add_argument("--warmup-steps", type=int, help=f"linear warm-up steps (default {_default('warmup_steps')})")
    ft.add_argument("--weight-decay", type=float, help=f"AdamW weight decay (default {_default('weight_decay')})")
    ft.add_argument("--clip", type=float, help=f"gradient-norm clip, 0 = off (default {_default('clip')})")
    ft.add_argument("--precision", choices=["auto", "bf16", "fp32"], help="auto: bf16 on GPU, fp32 on CPU")
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

    plot = sub.add_parser("finetune-plot", help="held-out perplexity after N fine-tuning tokens, per method "
                                                "(the paper's Appendix C), from fine-tuning run folders")
    plot.add_argument("runs", nargs="+", type=Path, help="run folders written by `unimem-bench finetune`")
    plot.add_argument("--out", type=Path, default=Path("results/plots/finetune_data_scale.png"))


def _finetune_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="unimem-bench", exit_on_error=False)
    add_finetune_parsers(parser.add_subparsers(dest="command"), exit_on_error=False)
    return parser


def _option_dests() -> dict[str, str]:
    """Recipe key -> argparse dest for every option a recipe may set."""
    sub = _finetune_parser()._subparsers._group_actions[0].choices["finetune"]  # type: ignore[union-attr, index]
    keys = {}
    for action in sub._actions:
        if action.dest in CONTROL or action.dest == "help":
            continue
        long = next(s for s in action.option_strings if s.startswith("--"))
        keys[long[2:].replace("-", "_")] = action.dest
    return keys


def recipe_argv(path: Path, method: str | None) -> list[str]:
    """The command-line options a recipe sets for `method` (its top level, then its `methods: <method>` section)."""
    if not path.is_file():
        raise FileNotFoundError(f"--recipe {path}: no such file")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"recipe {path} must be a mapping of option: value")
    methods = data.get("methods") or {}
    if method is None:
        raise ConfigError(f"recipe {path}: name the method with --method (the recipe has: {', '.join(methods)})")
    if methods and method not in methods:
        raise ConfigError(f"recipe {path} has no section for method {method!r}: it has {', '.join(methods)}")
    items = {k: v for k, v in data.items() if k not in RECIPE_ONLY}
    section = methods.get(method) or {}
    if not isinstance(section, dict):
        raise ConfigError(f"recipe {path}: methods.{method} must be a mapping of option: value")
    keys = _option_dests()
    argv: list[str] = []
    for key, value in [*items.items(), *section.items()]:
        if key not in keys:
            raise ConfigError(f"recipe {path}: unknown option {key!r}; options: {', '.join(sorted(keys))}, "
                              f"plus {', '.join(RECIPE_ONLY)}")
        if key == "model_config" and value is not None:
            value = (path.parent / str(value)).as_posix()
        argv.extend(_flags(key, value))
    return argv


def _flags(key: str, value: Any) -> list[str]:
    flag = "--" + key.replace("_", "-")
    if value is None:
        return []
    if isinstance(value, bool):
        return [flag if value else "--no-" + key.replace("_", "-")]
    if isinstance(value, list):
        return [part for item in value for part in (flag, str(item))]
    return [flag, str(value)]


def resolve_recipe(args: argparse.Namespace) -> FinetuneRecipe:
    """The run described by the command line over the recipe over `FinetuneRecipe`'s defaults."""
    given = dict(vars(args))
    merged: dict[str, Any] = {}
    if args.recipe is not None:
        parser = _finetune_parser()
        try:
            from_recipe = vars(parser.parse_args(["finetune", *recipe_argv(args.recipe, args.method)]))
        except argparse.ArgumentError as err:
            raise ConfigError(f"recipe {args.recipe}: {err}") from None
        merged = {k: v for k, v in from_recipe.items() if v is not None}
        merged["overrides"] = [*(from_recipe.get("overrides") or []), *(given.get("overrides") or [])]
    merged.update({k: v for k, v in given.items() if v is not None and k != "overrides"})
    merged.setdefault("overrides", given.get("overrides") or [])
    for required in ("method", "tokens", "out"):
        if merged.get(required) is None:
            raise ConfigError(f"finetune needs --{required} (on the command line or in the --recipe)")
    fields = {k: v for k, v in merged.items() if k not in (*CONTROL, "command")}
    fields["overrides"] = tuple(fields["overrides"])
    fields["out"] = Path(str(fields["out"]).replace("{method}", fields["method"]))
    return FinetuneRecipe(**fields)


def recipe_for(path: Path, method: str, argv: Sequence[str] = ()) -> FinetuneRecipe:
    """The run a recipe file describes for `method`, with further `finetune` options (`--set ...`, `--out ...`)
    over it, as `unimem-bench finetune --recipe PATH --method METHOD ARGV` would resolve it (sweeps use this)."""
    try:
        args = _finetune_parser().parse_args(["finetune", "--recipe", str(path), "--method", method, *argv])
    except argparse.ArgumentError as err:
        raise ConfigError(f"finetune options {' '.join(argv)}: {err}") from None
    return resolve_recipe(args)


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
    return launch, int((yaml.safe_load(Path(launch).read_text()) or {}).get("num_processes", 1))


def cmd_finetune(args: argparse.Namespace, console: Console) -> int:
    recipe = resolve_recipe(args)
    if args.dry_run:
        launch, processes = recipe_launch(args.recipe)
        # Steps depend on the processes: those of this launch, else those the recipe's launch config starts.
        plan = plan_finetune(recipe, world=launched_world() if launched_world() > 1 else processes)
        dry_run(recipe, plan, launch, args.recipe, console)
        return 0
    from unimem_bench.harness.training.trainer import finetune

    try:
        finetune(recipe, resume=args.resume, stop_after_steps=args.stop_after_steps, console=console)
    except KeyboardInterrupt:
        console.print(f"[yellow]interrupted[/yellow]: checkpoints in {recipe.out / 'checkpoints'} are kept; run the "
                      "same command with --resume to continue from the newest")
        return 130
    return 0


def cmd_finetune_plot(args: argparse.Namespace, console: Console) -> int:
    from unimem_bench.harness.training.log import data_scale_table, plot_data_scale

    path = plot_data_scale(args.runs, args.out)
    table = data_scale_table(args.runs)
    out = Table(title="held-out perplexity after N fine-tuning tokens")
    for column in ("method", "step", "tokens", "heldout_ppl"):
        out.add_column(column, justify="left" if column == "method" else "right")
    for row in table.itertuples():
        out.add_row(row.method, str(row.step), f"{row.tokens:,}", f"{row.heldout_ppl:.4f}")
    console.print(out)
    console.print(f"plot: {path}")
    return 0
