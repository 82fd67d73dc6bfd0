"""Helpers shared by the tests: tiny random LLaMA models (fp32, CPU) and the ../shared asset paths."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
STORIES = SHARED / "models" / "stories260K"
BOOKS = SHARED / "data" / "books"
# Every skip for a missing ../shared asset starts with this; UNIMEM_REQUIRE_SHARED=1 (.ci/run) makes them failures.
SHARED_ABSENT = "../shared is absent"


def tiny_llama(*, layers: int = 2, heads: int = 4, kv_heads: int = 2, seed: int = 0, context: int = 256,
               **rope: object) -> LlamaForCausalLM:
    """hidden 32, vocab 99: small enough that every exactness test runs in well under a second."""
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=heads,
                         num_key_value_heads=kv_heads, vocab_size=99, max_position_embeddings=context,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0, **rope})
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


def random_docs(lengths: list[int], seed: int = 1) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 99, (n,), generator=generator) for n in lengths]


CHARS = " abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,;:!?'-\n"
WORDS = ("the", "memory", "of", "a", "long", "document", "streams", "through", "segments", "while", "every", "method",
         "keeps", "what", "it", "read", "before", "and", "learns", "to", "use", "when", "story", "comes", "back", "old",
         "name", "or", "place")


def char_tokenizer():
    """A character-level fast tokenizer (BOS <s>, unknown <unk>): real offsets, no training, < 99 ids."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(["<unk>", "<s>", "</s>", *CHARS])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def save_tiny_model(folder: Path, **kwargs: object) -> Path:
    """A tiny random LLaMA and its character tokenizer as a Hugging Face folder (what `--model` takes)."""
    tiny_llama(**kwargs).save_pretrained(folder)
    char_tokenizer().save_pretrained(folder)
    return folder


def write_text_docs(folder: Path, lengths: list[int], seed: int = 0) -> Path:
    """`doc-NN.txt` files of random sentences from a small vocabulary, `lengths` in characters."""
    import random

    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i, n in enumerate(lengths):
        text = ""
        while len(text) < n:
            text += " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 12))).capitalize() + ".\n"
        (folder / f"doc-{i:02d}.txt").write_text(text[:n])
    return folder


def sweep_argv(model_dir: Path, out: Path, *args: str) -> list[str]:
    """`unimem-bench sweep` of unimix on the tiny model: 2 short standard-library files, 16-token segments."""
    return ["sweep", "--method", "unimix", "--model", str(model_dir), "--tasks", "github", "--max-docs", "2",
            "--max-tokens", "128", "--segment-len", "16", "--out", str(out), *args]


def one_line_error(capsys, argv: list[str]) -> str:
    """Run the CLI, expect exit status 2, nothing on stdout and a single `error:` line on stderr; return that line."""
    from unimem_bench.harness.cli import app as cli

    capsys.readouterr()  # what earlier calls of the test printed
    assert cli.main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == "", captured.out
    err = captured.err.strip()
    assert err.startswith("error:") and "\n" not in err, err
    return err


def interrupt_task_run(monkeypatch, task: object, on_call: int) -> None:
    """Make the task's class raise KeyboardInterrupt on its `on_call`-th run (Ctrl-C in the middle of a grid)."""
    real_run = type(task).run
    calls = []

    def run_then_interrupt(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == on_call:
            raise KeyboardInterrupt
        return real_run(self, *args, **kwargs)

    monkeypatch.setattr(type(task), "run", run_then_interrupt)


def slow_only(request, why: str) -> None:
    """Skip a slow-tier test unless `-m slow` selected it (a plain `pytest` runs every marker)."""
    import pytest

    if "slow" not in request.config.getoption("markexpr"):
        pytest.skip(f"{why}; run with -m slow")
