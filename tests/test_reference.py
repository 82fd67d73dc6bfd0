"""Tests for the embedded reference model: the build pipeline on a tiny recipe; the full recipe only with -m slow."""

import dataclasses
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from rich.console import Console
from safetensors.torch import load_file
from tokenizers import Tokenizer
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

from unimem_bench.harness.models import reference
from unimem_bench.harness.models.reference import RECIPE_VERSION, ReferenceRecipe, build_reference, reference_dir
from unimem_bench.tasks.data.corpora import read_stdlib_documents

TINY = ReferenceRecipe(
    vocab_size=300,
    hidden_size=32,
    intermediate_size=64,
    num_layers=1,
    num_heads=2,
    num_kv_heads=1,
    context=64,
    batch_size=4,
    steps=6,
    warmup_steps=2,
    max_files=5,
    eval_windows=4,
)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_reference(cache_root=tmp_path_factory.mktemp("cache"), recipe=TINY)


def test_tiny_build_loads_with_auto_classes(tiny_dir: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.config.num_key_value_heads < model.config.num_attention_heads
    assert model.config.max_position_embeddings == TINY.context
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == ("<s>", "</s>", "<pad>")
    assert model.config.bos_token_id == tokenizer.bos_token_id
    assert model.config.pad_token_id == tokenizer.pad_token_id
    source = "def f(x):\n    return x + 1\n"
    ids = tokenizer(source, return_tensors="pt").input_ids
    assert ids[0, 0].item() == tokenizer.bos_token_id
    assert tokenizer.decode(ids[0], skip_special_tokens=True) == source
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert logits.shape == (1, ids.shape[1], TINY.vocab_size)


def test_tiny_build_writes_recipe_json(tiny_dir: Path) -> None:
    info = json.loads((tiny_dir / "recipe.json").read_text(encoding="utf-8"))
    assert info["recipe"]["hidden_size"] == TINY.hidden_size and info["seed"] == TINY.seed
    assert info["tokens_trained"] == TINY.steps * TINY.batch_size * TINY.context
    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    assert info["num_parameters"] == sum(p.numel() for p in model.parameters())
    # The held-out loss, recomputed from the saved model and tokenizer: the mean next-token cross-entropy over the
    # recipe's evenly spaced held-out windows.
    tokenizer = Tokenizer.from_file(str(tiny_dir / "tokenizer.json"))
    heldout = [text for _, text in read_stdlib_documents("heldout")[: TINY.max_files]]
    stream = torch.tensor([i for enc in tokenizer.encode_batch(heldout) for i in enc.ids])
    starts = torch.linspace(0, stream.numel() - TINY.context, TINY.eval_windows).long()
    windows = stream[starts[:, None] + torch.arange(TINY.context)]  # [windows, context]
    with torch.no_grad():
        logits = model(input_ids=windows).logits[:, :-1]  # [windows, context - 1, vocab]
    nll = F.cross_entropy(logits.reshape(-1, TINY.vocab_size), windows[:, 1:].reshape(-1))
    assert info["heldout_eval_tokens"] == TINY.eval_windows * (TINY.context - 1)
    assert info["heldout_loss"] == pytest.approx(nll.item(), rel=1e-5)
    # The training loss, reproduced: the same seed and recipe train the same model to the same losses.
    train = [text for _, text in read_stdlib_documents("train")[: TINY.max_files]]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY.seed)
        fresh = LlamaForCausalLM(reference.reference_config(TINY))
    losses = reference._pretrain(fresh, torch.tensor([i for enc in tokenizer.encode_batch(train) for i in enc.ids]),
                                 TINY, Console(quiet=True))
    tail = losses[-max(1, len(losses) // 20):]
    assert info["final_train_loss"] == pytest.approx(sum(tail) / len(tail), rel=1e-5)
    assert info["build_seconds"] >= info["train_seconds"]
    assert {"torch", "transformers", "tokenizers", "python"} <= info["versions"].keys()
    assert not list(tiny_dir.parent.glob(".*")), "temporary build folders left behind"


def test_second_call_reuses_the_build(tiny_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args: object) -> None:
        raise AssertionError("rebuilt although the folder was present")

    monkeypatch.setattr(reference, "_build", fail)
    assert build_reference(cache_root=tiny_dir.parent, recipe=TINY) == tiny_dir
    with pytest.raises(AssertionError, match="rebuilt"):
        build_reference(cache_root=tiny_dir.parent, recipe=TINY, force=True)
    assert (tiny_dir / "recipe.json").is_file(), "a failed forced rebuild must keep the old build"


def test_same_seed_same_weights_and_force_rebuild(tiny_dir: Path, tmp_path: Path) -> None:
    first = load_file(tiny_dir / "model.safetensors")
    threads = torch.get_num_threads()
    built = build_reference(cache_root=tmp_path, recipe=TINY)
    assert torch.get_num_threads() == threads
    (built / "marker").write_text("old build", encoding="utf-8")
    assert build_reference(cache_root=tmp_path, recipe=TINY, force=True) == built
    assert not (built / "marker").exists() and [p.name for p in tmp_path.iterdir()] == [built.name]
    again = load_file(built / "model.safetensors")
    assert first.keys() == again.keys()
    assert all(torch.equal(first[name], again[name]) for name in first)
    reseeded = dataclasses.replace(TINY, seed=1)
    other = load_file(build_reference(cache_root=tmp_path, recipe=reseeded) / "model.safetensors")
    assert not all(torch.equal(first[name], other[name]) for name in first)


def test_reference_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("UNIMEM_BENCH_CACHE", str(tmp_path / "env"))
    assert reference_dir() == tmp_path / "env" / f"reference-{RECIPE_VERSION}"
    assert reference_dir(tmp_path) == tmp_path / f"reference-{RECIPE_VERSION}"
    custom = reference_dir(tmp_path, recipe=TINY)
    assert custom.parent == tmp_path and custom.name.startswith(f"reference-{RECIPE_VERSION}-")
    assert custom != reference_dir(tmp_path, recipe=dataclasses.replace(TINY, seed=1))


@pytest.mark.slow
def test_full_recipe_build(tmp_path: Path) -> None:
    built = build_reference(cache_root=tmp_path)
    assert built == tmp_path / f"reference-{RECIPE_VERSION}"
    info = json.loads((built / "recipe.json").read_text(encoding="utf-8"))
    assert info["build_seconds"] < 600
    # Measured 4.81 nats/token on 2026-11-23 (train loss 3.9; held-out modules are other code); a regression guard.
    assert info["heldout_loss"] < 5.0
    assert AutoModelForCausalLM.from_pretrained(built).config.num_key_value_heads == ReferenceRecipe().num_kv_heads


def test_reference_config_predicts_the_built_model(tiny_dir: Path) -> None:
    # The runner validates methods against reference_config() before the model is built: it must be exact.
    built = AutoModelForCausalLM.from_pretrained(tiny_dir).config
    predicted = reference.reference_config(TINY)
    for field in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                  "max_position_embeddings", "bos_token_id", "eos_token_id", "pad_token_id"):
        assert getattr(predicted, field) == getattr(built, field), field
