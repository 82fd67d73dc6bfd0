"""Fine-tuned sweep points (`unimem-bench sweep --finetune RECIPE`): each point's method, with the point's config
overrides, is fine-tuned by the recipe, then its export is evaluated as a normal run.

A point's fine-tuning run folder is named by a hash of its resolved recipe (`<out>/finetune/<method>-<hash>`), so
the same recipe and config reuse one folder across sweeps and re-runs, and an interrupted run resumes there.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

from unimem_bench.harness.evaluation.runner import RunRequest
from unimem_bench.harness.training.recipe import FinetuneRecipe, plan_finetune


def point_recipe(path: Path, method: str, base: RunRequest, overrides: tuple[str, ...]) -> FinetuneRecipe:
    """The recipe's run for `method` with the point's `overrides` (and the sweep's --model and --segment-len when
    given), in its content-named folder under `base.out`; validated without reading weights or documents."""
    given = {"method": method, "overrides": overrides, "model": base.model, "segment_len": base.segment_len,
             "out": base.out / "finetune" / "pending"}
    recipe = FinetuneRecipe.resolve(path, given)
    described = {k: v for k, v in recipe.to_dict().items() if k != "out"}
    digest = hashlib.sha256(json.dumps(described, sort_keys=True, default=str).encode()).hexdigest()[:10]
    recipe = dataclasses.replace(recipe, out=base.out.resolve() / "finetune" / f"{method}-{digest}")
    plan_finetune(recipe)
    return recipe


def finetuned(recipe: FinetuneRecipe) -> bool:
    """Whether the recipe's run folder holds a finished run (and so its exported model)."""
    info = recipe.out / "finetune.json"
    return info.exists() and json.loads(info.read_text()).get("status") == "finished"
