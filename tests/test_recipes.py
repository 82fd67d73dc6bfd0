"""Every shipped recipe resolves for each of its methods through the CLI's own options, the GPU recipes dry-run
(config resolution, model built on the meta device) offline, and their accelerate configs load in accelerate."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import yaml
from accelerate.commands.config.config_args import load_config_from_file
from helpers import SHARED_ABSENT, STORIES, one_line_error
from transformers import AutoConfig

from unimem_bench.harness.cli import app as cli
from unimem_bench.harness.cli.finetune import resolve_recipe
from unimem_bench.harness.training.recipe import FinetuneRecipe, plan_finetune
from unimem_bench.methods import METHODS, PAPER_CONTEXT

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))
GPU = {"tinyllama-1.1b.yaml": 1_100_048_384, "llama2-7b.yaml": 6_738_415_616}  # the models' published sizes


def test_every_recipe_file_loads_and_validates():
    """Each recipe is a mapping of `FinetuneRecipe` options (plus `launch` and per-method `methods`); the files it
    names load: the accelerate config in accelerate, the model config as a transformers config that fits the
    recipe's segments; and every JSON and YAML file under recipes/ parses."""
    assert {p.name for p in RECIPES} >= {*GPU, "stories260k-cpu.yaml", "reference-cpu.yaml"}
    options = {f.name for f in dataclasses.fields(FinetuneRecipe)} | {"launch", "methods"}
    for path in RECIPES:
        data = yaml.safe_load(path.read_text())
        assert isinstance(data, dict) and set(data) <= options, (path.name, set(data) - options)
        assert all(set(section or {}) <= options for section in data["methods"].values()), path.name
        if "launch" in data:
            assert load_config_from_file(str(ROOT / data["launch"])).num_processes >= 1
        if "model_config" in data:
            config = AutoConfig.for_model(**json.loads((path.parent / data["model_config"]).read_text()))
            assert config.model_type == "llama" and config.max_position_embeddings >= data["segment_len"]
    for path in (ROOT / "recipes").rglob("*"):
        if path.suffix == ".json":
            assert isinstance(json.loads(path.read_text()), dict), path
        elif path.suffix == ".yaml":
            assert isinstance(yaml.safe_load(path.read_text()), dict), path


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipe_resolves_for_every_method(path, monkeypatch):
    monkeypatch.chdir(ROOT)  # recipe paths are as typed from the repository root
    data = yaml.safe_load(path.read_text())
    # Every paper method, in the registry's order; training-free KV-cache compression (score eviction) has no recipe.
    # kNN-LM reads a datastore at inference only (finetune rejects it).
    trained = [n for n in METHODS.names() if not METHODS.get(n).config(PAPER_CONTEXT).management.scored
               and METHODS.get(n).config(PAPER_CONTEXT).reading.output != "knn"]
    assert list(data["methods"]) == trained
    if "stories260K" in str(data.get("model")) and not STORIES.exists():
        pytest.skip(f"{SHARED_ABSENT}: {STORIES} not found")
    per_step = set()
    for method in data["methods"]:
        args = cli.build_parser().parse_args(["finetune", "--recipe", str(path), "--method", method])
        recipe = resolve_recipe(args)
        assert recipe.method == method and recipe.out.name == method
        world = 8 if path.name in GPU else 1
        plan = plan_finetune(recipe, world=world)
        per_step.add(plan.tokens_per_step(recipe))
        if path.name in GPU:  # the paper's Appendix D settings
            assert (recipe.lr, recipe.schedule, recipe.weight_decay, recipe.clip) == (5e-5, "linear", 0.0, 1.0)
            assert (recipe.segment_len, recipe.eval_every, recipe.tokens) == (2048, 256, 100_000_000)
    if path.name in GPU:
        assert len(per_step) == 1  # every method sees the same tokens per optimizer step


def test_command_line_overrides_a_recipe(monkeypatch):
    monkeypatch.chdir(ROOT)
    args = cli.build_parser().parse_args(["finetune", "--recipe", "recipes/tinyllama-1.1b.yaml", "--method", "rmt",
                                          "--lr", "1e-4", "--set", "training.bptt_segments=4", "--out", "x"])
    recipe = resolve_recipe(args)
    assert (recipe.lr, recipe.grad_accum, recipe.out) == (1e-4, 2, Path("x"))
    assert plan_finetune(recipe).window_segments == 4


@pytest.mark.parametrize(("text", "message"), [
    ("tokens: 10\nlearning_rate: 1\n", "unknown option 'learning_rate'"),
    ("tokens: ten\n", "tokens: 'ten' is not an integer"),
    ("methods: {vanilla: {}}\n", "no section for method 'rmt'"),
    ("schedule: cosine\n", "schedule: 'cosine' is not one of linear, constant"),
    ("tokens: 10\n  lr: 1\n", "line 2 is not valid YAML"),
    ("tokens: 0\n", "--tokens 0 must be >= 1"),
])
def test_bad_recipe_fails_in_one_line(tmp_path, capsys, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    out = one_line_error(capsys, ["finetune", "--recipe", str(path), "--method", "rmt", "--out", str(tmp_path),
                                  "--dry-run"])
    assert message in out, out


@pytest.mark.parametrize("name", sorted(GPU))
def test_gpu_recipe_dry_runs_offline(name, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    for method in ("memorizing_transformer", "rmt"):
        assert cli.main(["finetune", "--recipe", f"recipes/{name}", "--method", method, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert f"{GPU[name] / 1e6:,.1f}M parameters" in out and "1,526 steps" in out
    assert "accelerate launch --config_file recipes/accelerate/zero3_offload.yaml" in out


def test_accelerate_configs_load():
    kinds = set()
    for path in sorted((ROOT / "recipes" / "accelerate").glob("*.yaml")):
        config = load_config_from_file(str(path))
        assert config.num_processes == 8
        kinds.add(config.distributed_type.value)
        if config.distributed_type == "DEEPSPEED":
            ds = json.loads((ROOT / config.deepspeed_config["deepspeed_config_file"]).read_text())
            zero = ds["zero_optimization"]
            assert zero["stage"] == 3 and zero["offload_optimizer"]["device"] == "cpu"
            assert zero["offload_param"]["device"] == "cpu"
    assert kinds == {"DEEPSPEED", "MULTI_GPU"}
