"""Load karpathy/llama2.c legacy checkpoints as stock Hugging Face Llama models, converted in memory.

A llama2.c model ``.bin`` is a 7 x int32 header followed by raw float32 tensors; its tokenizer ``.bin`` holds the
sentencepiece pieces and scores. ``load_llama2c`` turns the pair into a ``LlamaForCausalLM`` and a fast tokenizer
without writing any file.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import LlamaConfig, LlamaForCausalLM, LlamaTokenizer, PreTrainedTokenizerFast
from transformers.tokenization_utils_base import generate_merges

__all__ = ["Llama2cFormatError", "find_llama2c_pair", "load_llama2c"]

_HEADER_BYTES = 7 * 4
_FLOAT_BYTES = 4
# llama2.c's newer exports (`export.py --version 1/2`) start with this uint32 instead of the legacy header.
_VERSIONED_MAGIC = 0x616B3432
# The exporter writes ids 0..2 as "<unk>", "\n<s>\n", "\n</s>\n"; Hugging Face spells them plainly.
_SPECIAL_PIECES = ("<unk>", "<s>", "</s>")


class Llama2cFormatError(ValueError):
    """A llama2.c model or tokenizer file that cannot be read; the message is one line naming the file."""


@dataclass(frozen=True)
class _Header:
    """The legacy model header, with the classifier-sharing flag split out of the vocab size's sign."""

    dim: int
    hidden_dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    vocab_size: int
    seq_len: int
    shared_classifier: bool

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_dim

    def describe(self) -> str:
        return (
            f"dim={self.dim} hidden_dim={self.hidden_dim} n_layers={self.n_layers} n_heads={self.n_heads} "
            f"n_kv_heads={self.n_kv_heads} vocab_size={self.vocab_size} seq_len={self.seq_len}"
        )

    def tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        """Shapes of the tensors after the header, in file order."""
        layers, dim, hidden, kv_dim = self.n_layers, self.dim, self.hidden_dim, self.kv_dim
        shapes = {
            "token_embedding": (self.vocab_size, dim),
            "rms_att": (layers, dim),
            "wq": (layers, dim, dim),
            "wk": (layers, kv_dim, dim),
            "wv": (layers, kv_dim, dim),
            "wo": (layers, dim, dim),
            "rms_ffn": (layers, dim),
            "w1": (layers, hidden, dim),
            "w2": (layers, dim, hidden),
            "w3": (layers, hidden, dim),
            "rms_final": (dim,),
            "freq_cis_real": (self.seq_len, self.head_dim // 2),
            "freq_cis_imag": (self.seq_len, self.head_dim // 2),
        }
        if not self.shared_classifier:
            shapes["wcls"] = (self.vocab_size, dim)
        return shapes

    def file_bytes(self) -> int:
        return _HEADER_BYTES + _FLOAT_BYTES * sum(math.prod(shape) for shape in self.tensor_shapes().values())


def _fail(path: Path, problem: str) -> Llama2cFormatError:
    return Llama2cFormatError(f"{path}: {problem}")


def _read_header(path: Path) -> _Header:
    """Parse and check the model header, and that the file is exactly as long as the header implies."""
    size = path.stat().st_size
    if size < _HEADER_BYTES:
        raise _fail(path, f"truncated llama2.c model: {size} bytes, the header alone needs {_HEADER_BYTES}")
    values = [int(v) for v in np.fromfile(path, dtype="<i4", count=7)]
    if values[0] & 0xFFFFFFFF == _VERSIONED_MAGIC:
        raise _fail(path, "versioned llama2.c export (magic 'ak42'); only the legacy format (--version 0) is supported")
    dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len = values
    if min(dim, hidden_dim, n_layers, n_heads, n_kv_heads, seq_len) <= 0 or vocab_size == 0:
        raise _fail(path, f"bad llama2.c header, sizes must be positive: {values}")
    if dim % n_heads or n_heads % n_kv_heads or (dim // n_heads) % 2:
        raise _fail(
            path,
            f"bad llama2.c header: dim={dim} n_heads={n_heads} n_kv_heads={n_kv_heads} need n_heads | dim, "
            "n_kv_heads | n_heads and an even head size",
        )
    header = _Header(dim, hidden_dim, n_layers, n_heads, n_kv_heads, abs(vocab_size), seq_len, vocab_size > 0)
    expected = header.file_bytes()
    if size != expected:
        kind = "truncated llama2.c model" if size < expected else "size mismatch"
        raise _fail(path, f"{kind}: header ({header.describe()}) needs {expected} bytes, file has {size}")
    return header


def _read_tensors(path: Path, header: _Header, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The tensors after the header, by llama2.c name, copied out of a memory map and cast to ``dtype``."""
    data = np.memmap(path, dtype="<f4", mode="r", offset=_HEADER_BYTES)
    tensors, offset = {}, 0
    for name, shape in header.tensor_shapes().items():
        count = math.prod(shape)
        tensors[name] = torch.tensor(data[offset : offset + count], dtype=dtype).reshape(shape)
        offset += count
    return tensors


def _unpermute(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder q/k rows from Meta's interleaved RoPE to Hugging Face's rotate_half layout."""
    dim1, dim2 = weight.shape
    return weight.view(n_heads, dim1 // n_heads // 2, 2, dim2).transpose(1, 2).reshape(dim1, dim2)


def _hf_state_dict(header: _Header, t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename llama2.c tensors to ``LlamaForCausalLM`` keys (the RoPE tables are recomputed by the model)."""
    state = {"model.embed_tokens.weight": t["token_embedding"], "model.norm.weight": t["rms_final"]}
    if not header.shared_classifier:
        state["lm_head.weight"] = t["wcls"]
    for i in range(header.n_layers):
        prefix = f"model.layers.{i}."
        state |= {
            prefix + "input_layernorm.weight": t["rms_att"][i],
            prefix + "self_attn.q_proj.weight": _unpermute(t["wq"][i], header.n_heads),
            prefix + "self_attn.k_proj.weight": _unpermute(t["wk"][i], header.n_kv_heads),
            prefix + "self_attn.v_proj.weight": t["wv"][i],
            prefix + "self_attn.o_proj.weight": t["wo"][i],
            prefix + "post_attention_layernorm.weight": t["rms_ffn"][i],
            prefix + "mlp.gate_proj.weight": t["w1"][i],
            prefix + "mlp.down_proj.weight": t["w2"][i],
            prefix + "mlp.up_proj.weight": t["w3"][i],
        }
    return state


def _llama_config(header: _Header) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=header.vocab_size,
        hidden_size=header.dim,
        intermediate_size=header.hidden_dim,
        num_hidden_layers=header.n_layers,
        num_attention_heads=header.n_heads,
        num_key_value_heads=header.n_kv_heads,
        max_position_embeddings=header.seq_len,
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=header.shared_classifier,
        bos_token_id=1,
        eos_token_id=2,
    )


def _read_tokenizer_pieces(path: Path, vocab_size: int) -> tuple[list[str], list[float]]:
    """Exactly ``vocab_size`` (piece, score) entries, with sentencepiece's '▁' restored and ids 0..2 named."""
    if vocab_size < len(_SPECIAL_PIECES):
        raise _fail(path, f"bad llama2.c tokenizer: vocab_size {vocab_size}, need at least <unk>, <s>, </s>")
    blob = path.read_bytes()
    if len(blob) < 4:
        raise _fail(path, f"truncated llama2.c tokenizer: {len(blob)} bytes, the header needs 4")
    (max_token_length,) = struct.unpack_from("<i", blob)
    pieces: list[str] = []
    scores: list[float] = []
    offset = 4
    for token_id in range(vocab_size):
        if offset + 8 > len(blob):
            raise _fail(path, f"truncated llama2.c tokenizer: ends after {token_id} of the model's {vocab_size} tokens")
        score, length = struct.unpack_from("<fi", blob, offset)
        offset += 8
        if not 0 < length <= max_token_length:
            raise _fail(path, f"bad llama2.c tokenizer: token {token_id} has length {length} (max {max_token_length})")
        if offset + length > len(blob):
            raise _fail(path, f"truncated llama2.c tokenizer: ends inside token {token_id} of {vocab_size}")
        try:
            piece = blob[offset : offset + length].decode("utf-8")
        except UnicodeDecodeError:
            raise _fail(path, f"bad llama2.c tokenizer: token {token_id} is not valid UTF-8") from None
        offset += length
        pieces.append(piece.replace(" ", "\u2581"))
        scores.append(score)
    if offset != len(blob):
        raise _fail(path, f"size mismatch: {len(blob) - offset} bytes left after the model's {vocab_size} tokens")
    pieces[: len(_SPECIAL_PIECES)] = _SPECIAL_PIECES
    if len(set(pieces)) != vocab_size:
        raise _fail(path, "bad llama2.c tokenizer: duplicate pieces")
    return pieces, scores


def _build_tokenizer(path: Path, vocab_size: int, model_max_length: int) -> PreTrainedTokenizerFast:
    """A Llama (sentencepiece-BPE, byte fallback) fast tokenizer whose merges follow the pieces' scores.

    Merges come from transformers' own ``generate_merges``, ranking pieces by score (file order breaks ties), which
    reproduces what its sentencepiece converter emits for the original ``tokenizer.model``.
    """
    pieces, scores = _read_tokenizer_pieces(path, vocab_size)
    by_score = sorted(range(vocab_size), key=lambda i: -scores[i])
    ranks = {pieces[i]: rank for rank, i in enumerate(by_score)}
    merges = generate_merges(ranks, skip_tokens=_SPECIAL_PIECES)
    return LlamaTokenizer(
        vocab={piece: i for i, piece in enumerate(pieces)},
        merges=merges,
        add_bos_token=True,
        add_eos_token=False,
        model_max_length=model_max_length,
    )


def load_llama2c(
    model_bin: Path, tokenizer_bin: Path, *, dtype: torch.dtype = torch.float32
) -> tuple[LlamaForCausalLM, PreTrainedTokenizerFast]:
    """Convert a llama2.c legacy checkpoint and its tokenizer into a Hugging Face model (eval mode) and tokenizer.

    Raises ``Llama2cFormatError`` if either file is truncated, has a bad header or does not match the other.
    """
    model_bin, tokenizer_bin = Path(model_bin), Path(tokenizer_bin)
    header = _read_header(model_bin)
    tokenizer = _build_tokenizer(tokenizer_bin, header.vocab_size, header.seq_len)
    state = _hf_state_dict(header, _read_tensors(model_bin, header, dtype))
    model = LlamaForCausalLM.from_pretrained(None, config=_llama_config(header), state_dict=state, dtype=dtype)
    return model, tokenizer


def _is_tokenizer_bin(path: Path) -> bool:
    return path.suffix == ".bin" and path.name.lower().startswith("tok")


def find_llama2c_pair(path: Path) -> tuple[Path, Path] | None:
    """``(model_bin, tokenizer_bin)`` for a llama2.c model ``.bin`` or a folder holding one, else ``None``.

    A folder must hold exactly one model ``.bin`` and one tokenizer ``.bin`` (``tok*.bin``, e.g. ``tok512.bin`` or
    ``tokenizer.bin``); a model file must have exactly one tokenizer ``.bin`` beside it. Only names are checked here;
    ``load_llama2c`` validates the contents.
    """
    path = Path(path)
    if path.is_dir():
        bins = sorted(p for p in path.glob("*.bin") if p.is_file())
        models = [p for p in bins if not _is_tokenizer_bin(p)]
    elif path.is_file() and path.suffix == ".bin" and not _is_tokenizer_bin(path):
        bins = sorted(p for p in path.parent.glob("*.bin") if p.is_file())
        models = [path]
    else:
        return None
    tokenizers = [p for p in bins if _is_tokenizer_bin(p)]
    return (models[0], tokenizers[0]) if len(models) == 1 and len(tokenizers) == 1 else None


def read_llama2c_config(model_bin: Path) -> LlamaConfig:
    """The HF config of a llama2.c checkpoint from its header alone (no weights read)."""
    return _llama_config(_read_header(model_bin))
