"""The llama2.c loader against the same model (stories260K) shipped in Hugging Face format under ../shared."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import SHARED_ABSENT, STORIES
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerFast

from unimem_bench.harness.models.llama2c import Llama2cFormatError, find_llama2c_pair, load_llama2c

HF_DIR = STORIES
LLAMA2C_DIR = HF_DIR / "llama2c"
MODEL_BIN = LLAMA2C_DIR / "stories260K.bin"
TOKENIZER_BIN = LLAMA2C_DIR / "tok512.bin"

pytestmark = pytest.mark.skipif(
    not (MODEL_BIN.is_file() and TOKENIZER_BIN.is_file() and (HF_DIR / "config.json").is_file()),
    reason=f"{SHARED_ABSENT}: stories260K reference checkpoints not found under {HF_DIR}",
)

Pair = tuple[PreTrainedModel, PreTrainedTokenizerFast]

STORY = (
    "Once upon a time, there was a little girl named Lily. She loved to play outside in the park. "
    'One day, she saw a big, red ball under a tree. She ran to it and said, "Can I play with you?"'
)
TEXTS = [
    STORY,
    "Tom had 3 apples and 12 pears.\nHe ate 1!\n\nThen: 2 + 2 = 4?",
    "Hi,   there\tfriend... (really) [yes] {no} ~ok~ @#$%^&*",
    "Zoë ate crème brûlée — naïve café, 日本語, Привет, emoji 🐱🚀.",
    "\n\nline\r\nbreaks\n",
]


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    """A 260K-parameter model runs fastest on one thread; OpenMP threads stall badly on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def converted() -> Pair:
    return load_llama2c(MODEL_BIN, TOKENIZER_BIN)


@pytest.fixture(scope="module")
def reference() -> Pair:
    return AutoModelForCausalLM.from_pretrained(HF_DIR), AutoTokenizer.from_pretrained(HF_DIR)


def _logits(model: PreTrainedModel, input_ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids).logits


def test_logits_match_hf_copy(converted: Pair, reference: Pair) -> None:
    model, _ = converted
    ref_model, ref_tok = reference
    assert model.config.tie_word_embeddings and model.dtype == torch.float32
    input_ids = ref_tok(STORY, return_tensors="pt").input_ids
    torch.testing.assert_close(_logits(model, input_ids), _logits(ref_model, input_ids), rtol=0, atol=1e-4)


def test_untied_classifier(converted: Pair, reference: Pair, tmp_path: Path) -> None:
    """A negative vocab_size means a separate wcls after the RoPE tables; here a copy of the embedding."""
    header = np.fromfile(MODEL_BIN, dtype="<i4", count=7)
    body = np.fromfile(MODEL_BIN, dtype="<f4", offset=7 * 4)
    dim, vocab = int(header[0]), int(header[5])
    header[5] = -vocab
    untied = tmp_path / "untied.bin"
    untied.write_bytes(header.tobytes() + body.tobytes() + body[: vocab * dim].tobytes())

    model, _ = load_llama2c(untied, TOKENIZER_BIN)
    assert not model.config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
    input_ids = reference[1](STORY, return_tensors="pt").input_ids
    torch.testing.assert_close(_logits(model, input_ids), _logits(converted[0], input_ids), rtol=0, atol=1e-4)


def test_dtype() -> None:
    model, _ = load_llama2c(MODEL_BIN, TOKENIZER_BIN, dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16
    assert torch.get_default_dtype() == torch.float32


@pytest.mark.parametrize("text", TEXTS)
def test_tokenizer_matches_hf_copy(converted: Pair, reference: Pair, text: str) -> None:
    _, tokenizer = converted
    _, ref_tok = reference
    ids = tokenizer(text).input_ids
    assert ids == ref_tok(text).input_ids
    assert ids[0] == tokenizer.bos_token_id == 1
    assert tokenizer.decode(ids, skip_special_tokens=True) == ref_tok.decode(ids, skip_special_tokens=True)
    assert tokenizer.decode(ids, skip_special_tokens=True) == text


def test_tokenizer_specials(converted: Pair, reference: Pair) -> None:
    _, tokenizer = converted
    _, ref_tok = reference
    assert isinstance(tokenizer, PreTrainedTokenizerFast)
    assert (tokenizer.unk_token, tokenizer.bos_token, tokenizer.eos_token) == ("<unk>", "<s>", "</s>")
    assert (tokenizer.unk_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 1, 2)
    assert tokenizer.get_vocab() == ref_tok.get_vocab()
    assert tokenizer("a", "b").input_ids == ref_tok("a", "b").input_ids


def test_greedy_generation_matches(converted: Pair, reference: Pair) -> None:
    model, tokenizer = converted
    ref_model, ref_tok = reference
    prompt = tokenizer("Once upon a time", return_tensors="pt").input_ids
    kwargs = {"max_new_tokens": 40, "do_sample": False}
    out = model.generate(prompt, **kwargs)
    ref_out = ref_model.generate(ref_tok("Once upon a time", return_tensors="pt").input_ids, **kwargs)
    assert out.tolist() == ref_out.tolist()
    assert tokenizer.decode(out[0], skip_special_tokens=True) == ref_tok.decode(ref_out[0], skip_special_tokens=True)


def _truncated_model(path: Path) -> tuple[Path, Path]:
    path.write_bytes(MODEL_BIN.read_bytes()[:-1000])
    return path, TOKENIZER_BIN


def _short_header(path: Path) -> tuple[Path, Path]:
    path.write_bytes(MODEL_BIN.read_bytes()[:20])
    return path, TOKENIZER_BIN


def _bad_heads(path: Path) -> tuple[Path, Path]:
    blob = bytearray(MODEL_BIN.read_bytes())
    blob[12:16] = np.int32(7).tobytes()  # n_heads = 7 does not divide dim = 64
    path.write_bytes(bytes(blob))
    return path, TOKENIZER_BIN


def _extra_bytes(path: Path) -> tuple[Path, Path]:
    path.write_bytes(MODEL_BIN.read_bytes() + b"\0" * 8)
    return path, TOKENIZER_BIN


def _versioned_export(path: Path) -> tuple[Path, Path]:
    path.write_bytes(np.uint32(0x616B3432).tobytes() + np.int32(2).tobytes() + b"\0" * 248)
    return path, TOKENIZER_BIN


def _truncated_tokenizer(path: Path) -> tuple[Path, Path]:
    path.write_bytes(TOKENIZER_BIN.read_bytes()[:-3])
    return MODEL_BIN, path


def _corrupted_tokenizer(path: Path) -> tuple[Path, Path]:
    blob = bytearray(TOKENIZER_BIN.read_bytes())
    blob[8:12] = np.int32(-5).tobytes()  # byte length of token 0
    path.write_bytes(bytes(blob))
    return MODEL_BIN, path


@pytest.mark.parametrize(
    ("corrupt", "expected"),
    [
        (_truncated_model, "truncated llama2.c model"),
        (_short_header, "truncated llama2.c model"),
        (_bad_heads, "bad llama2.c header"),
        (_extra_bytes, "size mismatch"),
        (_versioned_export, "only the legacy format"),
        (_truncated_tokenizer, "truncated llama2.c tokenizer"),
        (_corrupted_tokenizer, "bad llama2.c tokenizer"),
    ],
)
def test_format_errors(corrupt: Callable[[Path], tuple[Path, Path]], expected: str, tmp_path: Path) -> None:
    model_bin, tokenizer_bin = corrupt(tmp_path / "broken.bin")
    with pytest.raises(Llama2cFormatError, match=expected) as info:
        load_llama2c(model_bin, tokenizer_bin)
    message = str(info.value)
    assert "\n" not in message
    assert "broken.bin" in message


def test_find_llama2c_pair(tmp_path: Path) -> None:
    assert find_llama2c_pair(LLAMA2C_DIR) == (MODEL_BIN, TOKENIZER_BIN)
    assert find_llama2c_pair(MODEL_BIN) == (MODEL_BIN, TOKENIZER_BIN)
    assert find_llama2c_pair(HF_DIR) is None
    assert find_llama2c_pair(HF_DIR / "model.safetensors") is None
    assert find_llama2c_pair(TOKENIZER_BIN) is None
    assert find_llama2c_pair(tmp_path / "missing") is None

    shutil.copy(MODEL_BIN, tmp_path / "a.bin")
    shutil.copy(MODEL_BIN, tmp_path / "b.bin")
    shutil.copy(TOKENIZER_BIN, tmp_path / "tokenizer.bin")
    assert find_llama2c_pair(tmp_path) is None  # two candidate models
    assert find_llama2c_pair(tmp_path / "b.bin") == (tmp_path / "b.bin", tmp_path / "tokenizer.bin")
