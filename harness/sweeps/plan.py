"""Sweeps: config fields varied over points (a grid or zipped lists), every point a normal `unimem-bench run`.

A point is a `RunRequest` with the base overrides plus its `section.field=value` overrides, planned by `plan_run`,
so its run ids, records and leaderboard rows are exactly those `unimem-bench run --set field=value` writes, and a
point whose run ids are finished is skipped. The definition is saved before anything runs, as
`sweeps/<name>.yaml` (axes, base request, points with their run ids) and `sweeps/<name>.csv` (one row per run id
with the swept values), which the leaderboard, plots and notebooks read through `harness/reporting/results.py`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from unimem_bench.harness.evaluation import records
from unimem_bench.harness.evaluation.runner import Plan, RunRequest, plan_run
from unimem_bench.harness.models.resolve import (
    checkpoint_memory_layers,
    checkpoint_summary_tokens,
    load_model_config,
    resolve_model,
    trained_context,
)
from unimem_bench.harness.reporting.results import SWEEPS_DIR
from unimem_bench.harness.runtime import environment as run_env
from unimem_bench.harness.sweeps.finetuned import finetuned, point_recipe
from unimem_bench.harness.sweeps.presets import PRESETS, Axis
from unimem_bench.harness.training.recipe import FinetuneRecipe
from unimem_bench.methods import METHODS, ConfigError, MethodContext


@dataclass(frozen=True)
class SweepRequest:
    """Everything `unimem-bench sweep` was asked for."""

    base: RunRequest
    """The run every point starts from (methods, tasks, model, options, base overrides)."""
    axes: tuple[Axis, ...] = ()
    """`--vary` axes, added after the preset's."""
    preset: str | None = None
    """A name in PRESETS."""
    zipped: bool = False
    """Pair the i-th values of every axis instead of taking their cartesian product."""
    name: str | None = None
    """Sweep name (file stem under sweeps/); None derives one from the preset, methods and points."""
    finetune: Path | None = None
    """A fine-tuning recipe (recipes/*.yaml): each point is fine-tuned with it first, then its export evaluated."""

    def __post_init__(self) -> None:
        if self.preset is not None and self.preset not in PRESETS:
            raise ConfigError(f"unknown sweep preset {self.preset!r}: choose one of {', '.join(PRESETS)}")
        if self.preset is None and not self.axes:
            raise ConfigError("a sweep needs --preset NAME or at least one --vary section.field=v1,v2")
        if self.name is not None and (not self.name or "/" in self.name or self.name.startswith(".")):
            raise ConfigError(f"--name {self.name!r} must be a plain file name (no '/', not starting with '.')")


@dataclass(frozen=True)
class Unit:
    """One point for one method: a normal run request, planned (after fine-tuning, for a fine-tuned sweep)."""

    point: int
    """The point's index in sweep order."""
    values: dict[str, str]
    """Swept field -> value at this point."""
    method: str
    """The one method this unit runs."""
    request: RunRequest
    """The base request with `methods=method` and the point's overrides appended; for a fine-tuned point, the
    evaluation of its export (which carries the point's config)."""
    plan: Plan | None
    """`plan_run(request)`: its cells carry the run ids. None for a fine-tuned point (its model comes later)."""
    finetune: FinetuneRecipe | None = None
    """The fine-tuning run this point's evaluation needs first."""

    def results(self) -> list[tuple[str, str]]:
        """(task, run id) of each result; a fine-tuned point has them once its export exists (planned then)."""
        if self.plan is not None:
            return [(c.task.name, c.run_id) for c in self.plan.cells]
        if self.finetune is not None and finetuned(self.finetune):
            return [(c.task.name, c.run_id) for c in plan_run(self.request).cells]
        return []

    def run_ids(self) -> list[str]:
        return [rid for _, rid in self.results()]

    @property
    def key(self) -> str:
        """What makes two units the same work: their run ids, or their fine-tuning run folder."""
        return str(self.finetune.out) if self.finetune is not None else "\n".join(self.run_ids())

    @property
    def label(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.values.items())


@dataclass(frozen=True)
class SweepPlan:
    """A sweep resolved into units, ready to save and run."""

    name: str
    """File stem of the saved definition under sweeps/."""
    request: SweepRequest
    """What was asked for."""
    axes: tuple[Axis, ...]
    """The preset's axes (resolved for this model), then the --vary ones."""
    units: list[Unit]
    """Point-major, then method, in sweep order."""
    n_layers: int
    """Decoder layers of the model (saved with the definition: layer analyses need it)."""
    model: str
    """The model's id (before fine-tuning, for a fine-tuned sweep)."""
    segment_len: int
    """The base segment length."""


def point_values(axes: tuple[Axis, ...], zipped: bool) -> list[dict[str, str]]:
    """Each point as {field: value}: the cartesian product of the axes, or their values paired up when zipped."""
    fields = [a.field for a in axes]
    if len(set(fields)) != len(fields):
        raise ConfigError(f"a sweep varies {sorted(f for f in fields if fields.count(f) > 1)[0]} twice: give each "
                          "field once")
    if zipped:
        lengths = {a.field: len(a.values) for a in axes}
        if len(set(lengths.values())) > 1:
            raise ConfigError(f"--zip pairs values, so every --vary needs as many values; got {lengths}")
        combos: list[tuple[str, ...]] = list(zip(*(a.values for a in axes), strict=True))
    else:
        combos = list(itertools.product(*(a.values for a in axes)))
    return [dict(zip(fields, combo, strict=True)) for combo in combos]


def plan_sweep(req: SweepRequest) -> SweepPlan:
    """Resolve axes (the preset needs the model's depth) and plan every point with `plan_run`, reading no weights;
    every bad value fails here in one line."""
    if req.base.methods is None:
        raise ConfigError("a sweep needs --method: one method or a comma list")
    methods = METHODS.resolve(req.base.methods)
    base = req.base
    if req.finetune is not None:  # the recipe names the model and segment length unless the sweep does
        first = point_recipe(req.finetune, methods[0], base, base.overrides)
        base = dataclasses.replace(base, model=first.model, segment_len=first.segment_len)
    source = resolve_model(base.model)
    model_config = load_model_config(source)
    context = trained_context(model_config)
    ctx = MethodContext(n_layers=model_config.num_hidden_layers,
                        segment_len=base.segment_len or max(1, context // 2), trained_context=context,
                        memory_layers=checkpoint_memory_layers(model_config),
                        summary_tokens=checkpoint_summary_tokens(model_config))
    axes = (*PRESETS[req.preset].axes(ctx), *req.axes) if req.preset is not None else req.axes
    units = []
    for i, values in enumerate(point_values(axes, req.zipped)):
        overrides = (*base.overrides, *(f"{field}={value}" for field, value in values.items()))
        for method in methods:
            run = dataclasses.replace(base, methods=method, overrides=overrides)
            try:
                plan = plan_run(run)  # a fine-tuned point is checked on the base model, before any training
                if req.finetune is not None:
                    recipe = point_recipe(req.finetune, method, req.base, overrides)
                    evaluation = dataclasses.replace(req.base, methods=method, model=str(recipe.out), overrides=())
                    units.append(Unit(i, values, method, evaluation, None, recipe))
                    continue
            except ConfigError as err:
                raise ConfigError(f"sweep point {', '.join(f'{k}={v}' for k, v in values.items())} ({method}): "
                                  f"{err}") from None
            units.append(Unit(i, values, method, run, plan))
    return SweepPlan(req.name or default_name(req, methods, units), req, axes, units, ctx.n_layers, source.name,
                     ctx.segment_len)


def default_name(req: SweepRequest, methods: list[str], units: list[Unit]) -> str:
    """`<preset or fields>-<methods>-<hash of the units>`: the same command gives the same name."""
    what = req.preset or "+".join(a.field.partition(".")[2] for a in req.axes)
    digest = hashlib.sha256("\n".join(u.key for u in units).encode()).hexdigest()[:6]
    return f"{what}-{'+'.join(methods)}-{digest}"


def points_frame(plan: SweepPlan) -> pd.DataFrame:
    """One row per run id: point index, method, task, run_id and the swept values (strings)."""
    rows = [{"point": u.point, "method": u.method, "task": task, "run_id": rid, **u.values}
            for u in plan.units for task, rid in u.results()]
    return pd.DataFrame(rows, columns=["point", "method", "task", "run_id", *(a.field for a in plan.axes)])


def definition(plan: SweepPlan, argv: list[str] | None = None,
               flags: dict[str, Any] | None = None) -> dict[str, Any]:
    """What the sweep YAML holds: enough to see what was run and to re-run it (`flags`: the sweep's command-line
    flags, which `unimem-bench sweep --config <this file>` reads)."""
    base = plan.request.base
    # Through JSON: paths become strings and tuples (task arguments) lists, which safe YAML can write.
    options = json.loads(json.dumps(dataclasses.asdict(base.options), default=str))
    return {
        "name": plan.name,
        "preset": plan.request.preset,
        "mode": "zip" if plan.request.zipped else "grid",
        "axes": {a.field: list(a.values) for a in plan.axes},
        "methods": list(dict.fromkeys(u.method for u in plan.units)),
        "base": {"tasks": base.tasks, "model": plan.model, "model_layers": plan.n_layers,
                 "segment_len": plan.segment_len, "overrides": list(base.overrides), "seed": base.seed,
                 "options": options},
        "finetune": str(plan.request.finetune) if plan.request.finetune else None,
        "command": "unimem-bench " + " ".join(argv) if argv else None,
        "flags": flags,
        "points": [{"point": u.point, "method": u.method, "values": u.values,
                    "runs": dict(u.results()),
                    **({"finetune": str(u.finetune.out)} if u.finetune else {})} for u in plan.units],
    }


def save_definition(plan: SweepPlan, out: Path, argv: list[str] | None = None,
                    flags: dict[str, Any] | None = None) -> Path:
    """Write sweeps/<name>.yaml and .csv atomically; a different sweep already saved under the name is an error."""
    folder = out / SWEEPS_DIR
    path = folder / f"{plan.name}.yaml"
    data = definition(plan, argv, flags)
    if path.exists():
        old = yaml.safe_load(path.read_text()) or {}
        if [_identity(p) for p in old.get("points", [])] != [_identity(p) for p in data["points"]]:
            raise ConfigError(f"sweep {plan.name!r} already exists in {folder} with other points: pass another "
                              f"--name or remove {path}")
        data["created"] = old.get("created", run_env.now())
    else:
        data["created"] = run_env.now()
    records.atomic_write_text(yaml.safe_dump(data, sort_keys=False), path)
    records.atomic_write_csv(points_frame(plan), folder / f"{plan.name}.csv")
    return path


def _identity(point: dict[str, Any]) -> Any:
    """A saved point's work: its fine-tuning folder (its run ids appear once trained), else its run ids."""
    return point.get("finetune") or point.get("runs")
