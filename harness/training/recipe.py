"""What a fine-tuning run is asked to do (`FinetuneRecipe`: the one schema of its options, filled by a YAML recipe
and by command-line flags alike) and what follows from it before any weights are read (`plan_finetune`): the model
config, the method's resolved config, segment and window lengths, and the number of optimizer steps. Every bad
input fails here in one line.

A recipe file (recipes/*.yaml) sets `FinetuneRecipe` fields by name (`segment_len: 2048`; the overrides as
`set: [...]`, as the flag is spelled), with a `methods:` section holding each method's own values; values given
directly (the command line) win. Two keys are not fields: `methods` and `launch` (the accelerate config the recipe
is launched with). `model_config` is found relative to the recipe file, every other path relative to the current
folder; `{method}` in `out` becomes the method's name.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from transformers import AutoConfig, PretrainedConfig

from unimem_bench.harness.models.resolve import (
    ModelSource,
    checkpoint_memory_layers,
    checkpoint_summary_tokens,
    load_model_config,
    resolve_model,
    trained_context,
)
from unimem_bench.harness.runtime.device import resolve_device
from unimem_bench.harness.runtime.folders import check_output_folder
from unimem_bench.harness.runtime.overrides import check_override_types
from unimem_bench.harness.training.data import check_data
from unimem_bench.methods import METHODS, ConfigError, MethodContext, UniMemConfig, check_hookable

Schedule = Literal["linear", "constant"]
Precision = Literal["auto", "bf16", "fp32"]

# Fields of the model config that decide its shapes: a recipe's shipped config must agree with the loaded weights.
SHAPE_FIELDS = ("num_hidden_layers", "hidden_size", "num_attention_heads", "num_key_value_heads", "vocab_size",
                "max_position_embeddings")
# Keys of a recipe file that are not fields; and the field a key names when it differs (the flag's spelling).
RECIPE_ONLY = ("methods", "launch")
KEY_FIELDS = {"set": "overrides"}


@dataclass(frozen=True)
class FinetuneRecipe:
    """A fine-tuning run: the `unimem-bench finetune` options (a YAML recipe sets the same names)."""

    method: str
    """The method to fine-tune with (a registry name); its config decides stop-gradient or BPTT."""
    out: Path
    """Run folder: logs, plots, checkpoints, and the final export in `model/`."""
    tokens: int
    """Training tokens (the paper: 0.1B, one epoch); the schedule spans ceil(tokens / tokens per step) steps."""
    model: str | None = None
    """Local HF folder, hub id or llama2.c .bin (default: the embedded reference model)."""
    model_config: Path | None = None
    """The model's config.json, shipped with a recipe, so a dry run needs no hub; checked against the weights."""
    overrides: tuple[str, ...] = ()
    """`section.field=value` overrides of the method's config (e.g. training.bptt_segments=4)."""
    data: str = "github"
    """`github` (standard library), `pg19` (hub dataset) or a folder of text files."""
    heldout_docs: int | None = None
    """Files of a --data folder held out for perplexity (default: 10%, at least one)."""
    segment_len: int | None = None
    """Tokens per segment (default: half the model's trained context, as `run` uses)."""
    batch_size: int = 1
    """Document streams per process; each row keeps its own document and memory."""
    grad_accum: int = 1
    """Windows per row accumulated before each optimizer step."""
    lr: float = 5e-5
    """Peak AdamW learning rate (the paper's 5e-5)."""
    schedule: Schedule = "linear"
    """`linear` decay to zero after warm-up (the paper's), or `constant` after warm-up."""
    warmup_steps: int = 0
    """Linear warm-up steps from zero (the paper gives none)."""
    weight_decay: float = 0.0
    """AdamW decoupled weight decay on matrices (the paper's 0)."""
    clip: float = 1.0
    """Gradient-norm clip (the paper's 1.0); 0 turns clipping off."""
    precision: Precision = "auto"
    """`auto`: bf16 autocast on GPU, fp32 on CPU."""
    gradient_checkpointing: bool = False
    """Recompute decoder layers in backward instead of keeping their activations (memory for time)."""
    eval_every: int = 256
    """Held-out perplexity every N steps (the paper's 256), plus before training and at the end; 0: only those."""
    eval_docs: int = 4
    """Held-out documents evaluated (four long documents give a stable perplexity at little cost)."""
    eval_tokens: int | None = 8192
    """Tokens per held-out document (None: whole documents); 8,192 spans several segments of memory."""
    save_every: int = 0
    """Checkpoint every N steps (0: only when stopped with --stop-after-steps); the final export is always saved."""
    keep_checkpoints: int = 2
    """Newest checkpoints kept; older ones are deleted once a newer one is complete (two: one survives a crash
    while the next is written)."""
    seed: int = 0
    """Seeds the document order and torch."""
    device: str = "auto"
    """auto, cpu, cuda (under `accelerate launch` each process takes its own GPU)."""

    def __post_init__(self) -> None:
        positive = {"tokens": self.tokens, "batch_size": self.batch_size, "grad_accum": self.grad_accum,
                    "eval_docs": self.eval_docs, "keep_checkpoints": self.keep_checkpoints}
        nonneg = {"warmup_steps": self.warmup_steps, "eval_every": self.eval_every, "save_every": self.save_every}
        optional = {"segment_len": self.segment_len, "eval_tokens": self.eval_tokens}
        for name, value in {**positive, **{k: v for k, v in optional.items() if v is not None}}.items():
            if value < 1:
                raise ConfigError(f"--{name.replace('_', '-')} {value} must be >= 1")
        for name, value in nonneg.items():
            if value < 0:
                raise ConfigError(f"--{name.replace('_', '-')} {value} must be >= 0")
        if self.heldout_docs is not None and self.heldout_docs < 1:
            raise ConfigError(f"--heldout-docs {self.heldout_docs} must be >= 1")
        if not self.lr > 0:
            raise ConfigError(f"--lr {self.lr} must be > 0")
        if self.weight_decay < 0 or self.clip < 0:
            raise ConfigError("--weight-decay and --clip must be >= 0")
        if self.schedule not in ("linear", "constant"):
            raise ConfigError(f"--schedule {self.schedule!r} is not linear or constant")
        if self.precision not in ("auto", "bf16", "fp32"):
            raise ConfigError(f"--precision {self.precision!r} is not auto, bf16 or fp32")

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["out"], data["overrides"] = str(self.out), list(self.overrides)
        data["model_config"] = str(self.model_config) if self.model_config else None
        return data

    @classmethod
    def resolve(cls, recipe_file: Path | None = None, given: Mapping[str, Any] | None = None) -> FinetuneRecipe:
        """The run `given` describes (field values; None = unset) over the recipe file over the defaults.

        `overrides` accumulate: the file's, then the given ones (a later override of a field wins)."""
        given = {k: v for k, v in (given or {}).items() if v is not None}
        unknown = set(given) - set(_field_types())
        if unknown:
            raise ConfigError(f"finetune has no option {sorted(unknown)[0]!r}")
        values = read_recipe_file(recipe_file, given.get("method")) if recipe_file is not None else {}
        overrides = (*values.get("overrides", ()), *given.get("overrides", ()))
        values.update(given)
        values["overrides"] = tuple(overrides)
        for required in ("method", "tokens", "out"):
            if values.get(required) is None:
                raise ConfigError(f"finetune needs --{required} (on the command line or in the --recipe)")
        values["out"] = Path(str(values["out"]).replace("{method}", values["method"]))
        return cls(**values)


def _field_types() -> dict[str, Any]:
    return typing.get_type_hints(FinetuneRecipe)


def read_recipe_file(path: Path, method: str | None) -> dict[str, Any]:
    """The field values a recipe file sets for `method`: its top level, then its `methods: <method>` section, each
    value checked against the field's type; one-line errors naming the file."""
    if not path.is_file():
        raise FileNotFoundError(f"--recipe {path}: no such file")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"recipe {path}{where} is not valid YAML ({getattr(err, 'problem', None) or err}): "
                          "fix the file") from None
    if not isinstance(data, dict):
        raise ConfigError(f"recipe {path} must be a mapping of option: value")
    methods = data.get("methods") or {}
    if method is None:
        raise ConfigError(f"recipe {path}: name the method with --method (the recipe has: {', '.join(methods)})")
    if methods and method not in methods:
        raise ConfigError(f"recipe {path} has no section for method {method!r}: it has {', '.join(methods)}")
    section = methods.get(method) or {}
    if not isinstance(section, dict):
        raise ConfigError(f"recipe {path}: methods.{method} must be a mapping of option: value")
    types_ = _field_types()
    keys = [*(k for k in types_ if k not in KEY_FIELDS.values()), *KEY_FIELDS]
    fields: dict[str, Any] = {"overrides": ()}
    for key, value in [*((k, v) for k, v in data.items() if k not in RECIPE_ONLY), *section.items()]:
        name = KEY_FIELDS.get(str(key), str(key))
        if key not in keys:
            close = difflib.get_close_matches(str(key), keys, n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"options: {', '.join(sorted(keys))}"
            raise ConfigError(f"recipe {path}: unknown option {key!r}; {hint} (plus {', '.join(RECIPE_ONLY)})")
        value = _typed(value, types_[name], f"recipe {path}: {key}")
        if name == "model_config" and value is not None:
            value = path.parent / value
        fields[name] = (*fields["overrides"], *value) if name == "overrides" else value
    return fields


def _typed(value: Any, kind: Any, where: str) -> Any:
    """`value` (from YAML) as the field type `kind`, or a one-line ConfigError."""
    options = typing.get_args(kind) if typing.get_origin(kind) in (typing.Union, types.UnionType) else (kind,)
    if value is None:
        if type(None) in options:
            return None
        raise ConfigError(f"{where} needs a value")
    kind = next(k for k in options if k is not type(None))
    if typing.get_origin(kind) is Literal:
        if value not in typing.get_args(kind):
            raise ConfigError(f"{where}: {value!r} is not one of {', '.join(map(str, typing.get_args(kind)))}")
        return value
    if typing.get_origin(kind) is tuple:
        items = value if isinstance(value, list) else [value]
        if not all(isinstance(v, str | int | float) for v in items):
            raise ConfigError(f"{where}: expected a list of section.field=value strings, got {value!r}")
        return tuple(str(v) for v in items)
    if kind is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: {value!r} is not true or false")
        return value
    if kind in (int, float):
        try:
            if isinstance(value, bool) or (kind is int and isinstance(value, float)):
                raise ValueError
            return kind(value)
        except ValueError:
            raise ConfigError(f"{where}: {value!r} is not {'an integer' if kind is int else 'a number'}") from None
    if not isinstance(value, str | int | float) or isinstance(value, bool):
        raise ConfigError(f"{where}: {value!r} is not a {'path' if kind is Path else 'string'}")
    return kind(str(value))


@dataclass(frozen=True)
class FinetunePlan:
    """What a recipe resolves to before any weights are read."""

    source: ModelSource
    """The resolved --model."""
    model_config: PretrainedConfig
    """Its config (the recipe's shipped one when given)."""
    config: UniMemConfig
    """The method's resolved config."""
    segment_len: int
    """The run's segment length (position interpolation reads several at once: `forward_len`)."""
    trained_context: int
    """The model's trained context length."""
    window_segments: int
    """Segments per forward/backward: k under BPTT (memory detached every k segments), 1 under stop-gradient."""
    world: int
    """Processes the run is launched with."""
    steps: int
    """Optimizer steps the schedule spans."""

    @property
    def forward_len(self) -> int:
        """Tokens the method reads per segment (position interpolation reads several run segments at once)."""
        return self.segment_len * self.config.position.segment_factor

    def tokens_per_step(self, recipe: FinetuneRecipe) -> int:
        """At most this many tokens per optimizer step, over all processes (fewer when documents end)."""
        return self.world * recipe.batch_size * recipe.grad_accum * self.window_segments * self.forward_len


def read_model_config(recipe: FinetuneRecipe, source: ModelSource) -> PretrainedConfig:
    """The recipe's shipped config.json when it names one, else the model's own (no weights read)."""
    if recipe.model_config is None:
        return load_model_config(source)
    if not recipe.model_config.is_file():
        raise FileNotFoundError(f"--model-config {recipe.model_config}: no such file")
    return AutoConfig.from_pretrained(recipe.model_config)


def check_same_shapes(shipped: PretrainedConfig, loaded: PretrainedConfig, where: str) -> None:
    """Fail when the loaded model's shapes differ from the config the run was planned with."""
    for name in SHAPE_FIELDS:
        if getattr(shipped, name, None) != getattr(loaded, name, None):
            raise ConfigError(f"--model-config {where} says {name}={getattr(shipped, name, None)} but the model has "
                              f"{getattr(loaded, name, None)}: point --model-config at this model's config.json")


def plan_finetune(recipe: FinetuneRecipe, *, world: int = 1) -> FinetunePlan:
    """Resolve and validate the method, model and data source of a recipe (reading neither weights nor documents);
    raises one-line errors."""
    method = METHODS.get(recipe.method)
    resolve_device(recipe.device)
    check_output_folder(recipe.out, "--out")
    check_override_types(recipe.overrides)
    check_data(recipe.data)
    source = resolve_model(recipe.model)
    model_config = read_model_config(recipe, source)
    check_hookable(model_config)
    context = trained_context(model_config)
    segment_len = recipe.segment_len or max(1, context // 2)
    ctx = MethodContext(n_layers=model_config.num_hidden_layers, segment_len=segment_len, trained_context=context,
                        memory_layers=checkpoint_memory_layers(model_config),
                        summary_tokens=checkpoint_summary_tokens(model_config))
    config = method.config(ctx, recipe.overrides)
    config.bind(n_layers=ctx.n_layers, segment_len=segment_len)
    if config.reading.topk and config.reading.index != "torch":
        # faiss returns scores as numbers: the query would get no gradient through the retrieved keys.
        raise ConfigError(f"reading.index={config.reading.index} cannot be fine-tuned (faiss scores carry no "
                          "gradient): train with reading.index=torch, evaluate with any index")
    if config.reading.output == "knn":
        raise ConfigError(f"method {recipe.method!r} reads kNN-LM's datastore at inference only (nothing of it is "
                          "trained; UniMem Table 1 marks it inference-focused): fine-tune another method, e.g. "
                          "trime, and evaluate kNN-LM with `unimem-bench run`")
    if config.reading.output_datastore:
        raise ConfigError("reading.output_datastore is read at inference only: fine-tune without it (TRIME trains "
                          "on the segment's own tokens) and give it to `unimem-bench run`")
    k = config.training.window_segments
    plan = FinetunePlan(source=source, model_config=model_config, config=config, segment_len=segment_len,
                        trained_context=context, window_segments=k, world=world, steps=1)
    steps = math.ceil(recipe.tokens / plan.tokens_per_step(recipe))
    return dataclasses.replace(plan, steps=steps)
