"""The embedded default model: a small LLaMA pretrained here, on the standard library's source, when none is given.

On an offline machine no pretrained weights can be downloaded, so ``build_reference`` trains its own: a byte-level
BPE tokenizer and a stock ``LlamaForCausalLM`` with grouped-query attention, pretrained on random ``context``-token
windows of the "train" split of the standard library (``unimem_bench.tasks.data.corpora``) with a fixed recipe and seed,
in about five minutes on two CPU cores. Its trained context is short on purpose: standard-library files of thousands
of tokens are genuinely long for it, which is what long-context memory methods streaming segments need.

The result is a normal Hugging Face folder (``AutoModelForCausalLM`` / ``AutoTokenizer.from_pretrained`` load it)
plus ``recipe.json``, cached in ``reference_dir()`` and reused when present.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import platform
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import tokenizers
import torch
import transformers
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from unimem_bench.methods import cache
from unimem_bench.tasks.data.corpora import read_stdlib_documents

RECIPE_VERSION = "v1"
"""Names the cache folder; bump it whenever the default recipe or the build code changes what gets built."""

BOS, EOS, PAD = "<s>", "</s>", "<pad>"
SPECIAL_TOKENS = (BOS, EOS, PAD)
"""The BPE trainer gives special tokens the first ids, in this order."""


@dataclass(frozen=True)
class ReferenceRecipe:
    """Everything that decides the reference model; the defaults fit ~5 minutes of building on 2 CPU cores."""

    vocab_size: int = 4096
    """BPE vocabulary including the 3 special tokens; ~3.5 characters of Python per token, and the tied output layer
    stays a small share of compute."""
    hidden_size: int = 160
    """Model width: the largest that still sees most of the train split once within the time budget."""
    num_layers: int = 4
    """Decoder layers; depth is cheap at this width and buys more than width per FLOP."""
    num_heads: int = 4
    """Query heads (head dim = hidden_size / num_heads = 40)."""
    num_kv_heads: int = 2
    """Key/value heads: fewer than query heads (GQA), so methods meet the grouped KV layout of modern LLaMAs."""
    intermediate_size: int = 480
    """SwiGLU width, 3x hidden as in LLaMA."""
    context: int = 256
    """Trained context in tokens; short on purpose so that standard-library files are long documents for it."""
    rope_theta: float = 10000.0
    """RoPE base (LLaMA-2 default)."""
    batch_size: int = 16
    """Windows per step: 4096 tokens, large enough for stable AdamW steps, small enough for many of them."""
    steps: int = 450
    """Optimizer steps; 450 x 16 x 256 = 1.84M tokens, about 0.6 epoch of the train split, ~4.5 min of training."""
    peak_lr: float = 3e-3
    """AdamW peak learning rate; tiny models with short schedules tolerate and need a high one."""
    warmup_steps: int = 30
    """Linear warmup from 0 to peak_lr, then cosine decay."""
    min_lr_ratio: float = 0.1
    """Cosine decay ends at peak_lr * min_lr_ratio."""
    weight_decay: float = 0.1
    """AdamW decoupled weight decay, applied to matrices only (not norms)."""
    adam_betas: tuple[float, float] = (0.9, 0.95)
    """AdamW betas; beta2 = 0.95 reacts faster in a short run."""
    grad_clip: float = 1.0
    """Global gradient-norm clip."""
    seed: int = 0
    """Seeds weight init and window sampling; same seed, same machine -> same weights."""
    max_files: int | None = None
    """Use only the first N files of each split (sorted by path); None = all. For quick test builds."""
    eval_windows: int = 128
    """Held-out windows of ``context`` tokens, evenly spaced over the held-out split, for the held-out loss."""


def reference_config(recipe: ReferenceRecipe = ReferenceRecipe()) -> LlamaConfig:
    """The model config a recipe builds (known before building: the run validates methods against it)."""
    return LlamaConfig(
        vocab_size=recipe.vocab_size,
        hidden_size=recipe.hidden_size,
        intermediate_size=recipe.intermediate_size,
        num_hidden_layers=recipe.num_layers,
        num_attention_heads=recipe.num_heads,
        num_key_value_heads=recipe.num_kv_heads,
        max_position_embeddings=recipe.context,
        rope_parameters={"rope_type": "default", "rope_theta": recipe.rope_theta},
        tie_word_embeddings=True,
        bos_token_id=SPECIAL_TOKENS.index(BOS),
        eos_token_id=SPECIAL_TOKENS.index(EOS),
        pad_token_id=SPECIAL_TOKENS.index(PAD),
    )


def reference_dir(cache_root: Path | None = None, *, recipe: ReferenceRecipe = ReferenceRecipe()) -> Path:
    """Folder of the reference model: ``<cache root>/reference-<RECIPE_VERSION>``; a non-default recipe gets a suffix
    from a hash of its fields so it never shadows the default. The cache root is ``cache_root``, else
    ``$UNIMEM_BENCH_CACHE``, else the user cache directory."""
    name = f"reference-{RECIPE_VERSION}"
    if recipe != ReferenceRecipe():
        fields = json.dumps(dataclasses.asdict(recipe), sort_keys=True)
        name += "-" + hashlib.sha256(fields.encode("utf-8")).hexdigest()[:8]
    return Path(cache_root if cache_root is not None else cache.cache_root()) / name


def build_reference(
    *,
    cache_root: Path | None = None,
    force: bool = False,
    recipe: ReferenceRecipe = ReferenceRecipe(),
    console: Console | None = None,
) -> Path:
    """Build the reference model into ``reference_dir(cache_root, recipe=recipe)`` and return that folder; a no-op
    when it is already built, unless ``force``. The folder appears atomically (built in a temporary sibling, then
    renamed)."""
    final = reference_dir(cache_root, recipe=recipe)
    if (final / "recipe.json").is_file() and not force:
        return final
    console = console or Console(stderr=True)
    final.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    previous_threads = torch.get_num_threads()
    try:
        torch.set_num_threads(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
        _build(work, recipe, console)
        _publish(work, final)
    finally:
        torch.set_num_threads(previous_threads)
        shutil.rmtree(work, ignore_errors=True)
    console.log(f"reference model ready in {final}")
    return final


def _publish(work: Path, final: Path) -> None:
    """Move the finished ``work`` folder to ``final``, replacing an older build there."""
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}-{time.time_ns()}")
        final.rename(old)
    try:
        work.rename(final)
    except OSError:
        if not (final / "recipe.json").is_file():  # not a concurrent build that finished first
            raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _build(out: Path, recipe: ReferenceRecipe, console: Console) -> None:
    started = time.perf_counter()
    train_docs = [text for _, text in read_stdlib_documents("train")[: recipe.max_files]]
    heldout_docs = [text for _, text in read_stdlib_documents("heldout")[: recipe.max_files]]
    console.log(f"training a {recipe.vocab_size}-token BPE tokenizer on {len(train_docs)} standard-library files")
    tokenizer = _train_tokenizer(train_docs, recipe.vocab_size)
    train_stream = _token_stream(tokenizer, train_docs)
    heldout_stream = _token_stream(tokenizer, heldout_docs)
    console.log(f"train split: {train_stream.numel():,} tokens; held-out split: {heldout_stream.numel():,} tokens")

    assert [tokenizer.token_to_id(t) for t in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))
    config = reference_config(recipe)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(recipe.seed)
        model = LlamaForCausalLM(config)
    train_started = time.perf_counter()
    train_losses = _pretrain(model, train_stream, recipe, console)
    train_seconds = time.perf_counter() - train_started
    heldout_loss, heldout_tokens = _heldout_loss(model, heldout_stream, recipe)
    console.log(f"held-out loss {heldout_loss:.4f} nats/token over {heldout_tokens:,} tokens")

    model.save_pretrained(out)
    hf_tokenizer = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=BOS, eos_token=EOS, pad_token=PAD)
    hf_tokenizer.save_pretrained(out)
    tail = train_losses[-max(1, len(train_losses) // 20) :]
    tokens_trained = recipe.steps * recipe.batch_size * recipe.context
    info = {
        "recipe_version": RECIPE_VERSION,
        "recipe": dataclasses.asdict(recipe),
        "seed": recipe.seed,
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "tokenizers": tokenizers.__version__,
        },
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "train_files": len(train_docs),
        "train_split_tokens": train_stream.numel(),
        "tokens_trained": tokens_trained,
        "train_seconds": round(train_seconds, 1),
        "train_tokens_per_second": round(tokens_trained / train_seconds),
        "final_train_loss": sum(tail) / len(tail),
        "final_train_loss_note": f"mean over the last {len(tail)} steps, nats/token",
        "heldout_files": len(heldout_docs),
        "heldout_eval_tokens": heldout_tokens,
        "heldout_loss": heldout_loss,
        "torch_threads": torch.get_num_threads(),
        "build_seconds": round(time.perf_counter() - started, 1),
    }
    (out / "recipe.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")


def _train_tokenizer(texts: Sequence[str], vocab_size: int) -> Tokenizer:
    """Byte-level BPE (GPT-2 style pre-tokenization, no unknown tokens) that prepends BOS when encoding."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    tokenizer.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, tokenizer.token_to_id(BOS))]
            ),
        ]
    )
    return tokenizer


def _token_stream(tokenizer: Tokenizer, texts: Sequence[str]) -> torch.Tensor:
    """All ``texts`` encoded and concatenated, each preceded by BOS."""
    encodings = tokenizer.encode_batch(list(texts), add_special_tokens=True)
    return torch.tensor([i for enc in encodings for i in enc.ids], dtype=torch.long)


def _lr_factor(step: int, recipe: ReferenceRecipe) -> float:
    """Linear warmup to 1, then cosine decay to ``min_lr_ratio``."""
    if step < recipe.warmup_steps:
        return (step + 1) / recipe.warmup_steps
    progress = (step - recipe.warmup_steps) / max(1, recipe.steps - recipe.warmup_steps)
    return recipe.min_lr_ratio + (1 - recipe.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def _pretrain(model: LlamaForCausalLM, stream: torch.Tensor, recipe: ReferenceRecipe, console: Console) -> list[float]:
    """Train on random ``context``-token windows of ``stream``; returns the loss of every step."""
    if stream.numel() <= recipe.context:
        raise ValueError(f"train split has {stream.numel()} tokens, fewer than one {recipe.context}-token window")
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        [
            {"params": [p for p in params if p.ndim >= 2], "weight_decay": recipe.weight_decay},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
        ],
        lr=recipe.peak_lr,
        betas=recipe.adam_betas,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: _lr_factor(step, recipe))
    generator = torch.Generator().manual_seed(recipe.seed)
    offsets = torch.arange(recipe.context)
    losses: list[float] = []
    smoothed = float("nan")
    columns = (
        TextColumn("[bold]pretraining reference model"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.3f}"),
        TextColumn("{task.fields[tps]:,.0f} tok/s"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
    )
    model.train()
    with Progress(*columns, console=console) as progress:
        task = progress.add_task("pretrain", total=recipe.steps, loss=smoothed, tps=0.0)
        started = time.perf_counter()
        for step in range(recipe.steps):
            starts = torch.randint(0, stream.numel() - recipe.context + 1, (recipe.batch_size, 1), generator=generator)
            batch = stream[starts + offsets]
            loss = model(input_ids=batch, labels=batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, recipe.grad_clip)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
            smoothed = losses[-1] if step == 0 else 0.95 * smoothed + 0.05 * losses[-1]
            tps = (step + 1) * recipe.batch_size * recipe.context / (time.perf_counter() - started)
            progress.update(task, advance=1, loss=smoothed, tps=tps)
    model.eval()
    return losses


@torch.no_grad()
def _heldout_loss(model: LlamaForCausalLM, stream: torch.Tensor, recipe: ReferenceRecipe) -> tuple[float, int]:
    """Mean next-token loss (nats/token) over ``eval_windows`` evenly spaced ``context``-token windows of ``stream``;
    returns it with the number of tokens predicted."""
    n_windows = min(recipe.eval_windows, stream.numel() // recipe.context)
    if n_windows == 0:
        raise ValueError(f"held-out split has {stream.numel()} tokens, fewer than one {recipe.context}-token window")
    starts = torch.linspace(0, stream.numel() - recipe.context, n_windows).long()
    windows = stream[starts[:, None] + torch.arange(recipe.context)]
    total, count = 0.0, 0
    for batch in windows.split(recipe.batch_size):
        predicted = batch.numel() - batch.shape[0]  # the first token of each window is not predicted
        total += model(input_ids=batch, labels=batch).loss.item() * predicted
        count += predicted
    return total / count, count
