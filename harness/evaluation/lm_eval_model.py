"""lm-eval integration: every unimem-bench method as the lm-eval model `unimem`.

Importing this module registers `UnimemLM` with lm-eval as `unimem` (lm-eval has no plugin discovery), so any lm-eval
task runs on any method:

    unimem-bench lm-eval --model unimem --model_args pretrained=PATH,method=transformer_xl --tasks TASK
    lm_eval.simple_evaluate(model=UnimemLM(pretrained=PATH, method="transformer_xl"), tasks=[TASK])

`unimem-bench lm-eval ARGS` is lm-eval's own CLI with this module imported first, so every lm-eval argument works and
`--model hf` still means lm-eval's Hugging Face model. lm-eval stays an optional import for the rest of the package:
only this module imports it.

The three request types go through the engine (`MemoryLM`), weights loaded once per model:
- loglikelihood(context, continuation): lm-eval's own tokenization (TemplateLM: the context's trailing whitespace moves
  to the continuation; an empty context becomes the prefix token); context + continuation stream through the method
  and the continuation's NLLs are summed, with lm-eval's is_greedy flag from `score_tokens`.
- loglikelihood_rolling: see `UnimemLM.loglikelihood_rolling`.
- generate_until: `MemoryLM.generate`, stopped once a stop string appears in the decoded text and cut at the first
  one, as lm-eval's hf model does; greedy, or seeded sampling from the task's gen_kwargs. As in every task, a method
  without memory reads the (max_length-truncated) prompt and its budget at once, a memory method streams it.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import lm_eval.models  # noqa: F401  # lm-eval fills its model registry lazily only while it is empty: fill it first
import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import (
    handle_stop_sequences,
    has_bos_prefix,
    normalize_gen_kwargs,
    postprocess_generated_text,
)
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

from unimem_bench.harness.evaluation.datastore import attach_datastore, datastore_files
from unimem_bench.harness.models.exports import SavedMethod
from unimem_bench.harness.models.resolve import (
    ModelSource,
    checkpoint_memory_layers,
    checkpoint_summary_tokens,
    load_model,
    load_model_config,
    resolve_model,
    saved_method,
    trained_context,
)
from unimem_bench.harness.runtime.device import default_dtype, resolve_device
from unimem_bench.harness.runtime.overrides import check_override_types
from unimem_bench.methods import (
    METHODS,
    ConfigError,
    MemoryLM,
    MethodContext,
    Sampling,
    UniMemConfig,
    check_hookable,
)
from unimem_bench.tasks.base import generate_at_once

if TYPE_CHECKING:
    from lm_eval.api.instance import Instance

log = logging.getLogger(__name__)
DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}
SAMPLING_KEYS = ("do_sample", "temperature", "top_p")


@dataclass(frozen=True)
class UnimemArgs:
    """The `unimem` model's arguments (lm-eval's `--model_args`); `set` there is `overrides` here."""

    pretrained: str | None = None
    """What `unimem-bench run --model` takes: a local HF folder, a hub id, a llama2.c .bin; None = the reference."""
    method: str = "vanilla"
    """A registered method (`unimem-bench list`)."""
    segment_len: int | None = None
    """Tokens per streamed segment. None: the trained context for methods without memory (one segment reads what
    lm-eval's hf model reads at once, so vanilla equals it), half of it for memory methods (memory plus segment fit
    the trained context, as `unimem-bench run` does)."""
    overrides: tuple[str, ...] = ()
    """Config overrides `section.field=value`. In model_args: `set=reading.topk=8;management.size=1024` (`;` between
    them, because lm-eval splits model_args on commas; quote a value with commas: `set="injection.layers=0,4"`)."""
    max_length: int | None = None
    """Longest input read, used as lm-eval's hf uses it: loglikelihood keeps the last max_length + 1 tokens,
    generation the last max_length - max_gen_toks prompt tokens, loglikelihood_rolling cuts texts into lm-eval's
    rolling windows of max_length. None: the method's local context for methods without memory (all they can read),
    unlimited for memory methods (they stream the whole text through memory)."""
    max_gen_toks: int = 256
    """Generation budget when a task gives none (lm-eval's hf default)."""
    batch_size: int = 1
    """Documents (or rolling windows) streamed together; generation runs one prompt at a time."""
    device: str = "auto"
    """auto (cuda when available), cpu, cuda, cuda:1 ..."""
    dtype: str = "auto"
    """auto (bfloat16 on cuda, float32 on cpu, as `unimem-bench run`), float32, float64, bfloat16 or float16."""
    add_bos_token: bool | None = None
    """As lm-eval's hf model: None leaves special tokens to the tokenizer's default."""
    seed: int = 0
    """Sampling seed: request i of a generate_until call draws with seed + i (repeats of one prompt differ)."""

    def __post_init__(self) -> None:
        for name in ("segment_len", "max_length", "max_gen_toks", "batch_size"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                hint = "; unimem has no automatic batch size" if name == "batch_size" else ""
                raise ConfigError(f"unimem model_args: {name}={value!r} must be an integer >= 1{hint}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise ConfigError(f"unimem model_args: seed={self.seed!r} must be an integer")
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise ConfigError(f"unimem model_args: dtype={self.dtype!r}; choose auto, {', '.join(DTYPES)}")

    @classmethod
    def from_model_args(cls, model_args: Mapping[str, Any]) -> UnimemArgs:
        """Build from lm-eval's parsed model_args (values may arrive as strings, `set` in any accepted form)."""
        known = {f.name for f in dataclasses.fields(cls)} - {"overrides"} | {"set"}
        unknown = sorted(set(model_args) - known)
        if unknown:
            raise ConfigError(f"unimem model_args: unknown {unknown[0]!r}; known: {', '.join(sorted(known))}")
        values = {k: v for k, v in model_args.items() if v is not None and k != "set"}
        for name in ("segment_len", "max_length", "max_gen_toks", "batch_size", "seed"):
            if isinstance(values.get(name), str) and values[name].strip().isdigit():
                values[name] = int(values[name])
        if isinstance(values.get("add_bos_token"), str):
            values["add_bos_token"] = values["add_bos_token"].strip().lower() == "true"
        for name in ("pretrained", "method", "device", "dtype"):
            if name in values:
                values[name] = str(values[name])
        return cls(overrides=parse_overrides(model_args.get("set")), **values)


def parse_overrides(spec: str | Sequence[str] | Mapping[str, Any] | None) -> tuple[str, ...]:
    """`a.b=1;c.d=2`, a list of `a.b=1` strings, or a mapping {a.b: 1} -> (`a.b=1`, ...)."""
    if spec is None:
        return ()
    if isinstance(spec, Mapping):
        return tuple(f"{key}={value}" for key, value in spec.items())
    items = spec.split(";") if isinstance(spec, str) else [str(item) for item in spec]
    return tuple(item.strip() for item in items if item.strip())


def carries_memory(config: UniMemConfig) -> bool:
    """Whether anything reaches a segment from the ones before it (a KV memory, RMT memory tokens or a datastore)."""
    return config.has_memory


@dataclass(frozen=True)
class ModelPlan:
    """The checked, weight-free part of a `unimem` model: what to load and how to wrap it."""

    source: ModelSource
    config: UniMemConfig
    segment_len: int
    """Tokens per segment given to the method (the method may read several: position interpolation)."""
    trained_context: int
    max_length: int | None
    """Resolved `UnimemArgs.max_length`."""
    saved: SavedMethod | None = None
    """A fine-tuned export's own method (when `method` names it): its config, segment length and learned parameters
    (RMT's memory tokens, LongMem's SideNet), as `run` evaluates it."""


def plan_model(args: UnimemArgs) -> ModelPlan:
    """Resolve and validate model, method and overrides without loading weights; one-line errors."""
    check_override_types(args.overrides)
    source = resolve_model(args.pretrained)
    model_config = load_model_config(source)
    check_hookable(model_config)
    context = trained_context(model_config)
    method = METHODS.get(args.method)
    n_layers = model_config.num_hidden_layers
    # Whether a method has memory does not depend on the segment length its sizes scale with.
    layers = checkpoint_memory_layers(model_config)
    saved = saved_method(source)
    if saved is not None and saved.method != args.method:
        saved = None
    summary = checkpoint_summary_tokens(model_config)
    probe = method.config(MethodContext(n_layers, args.segment_len or max(1, context // 2), context, layers, summary),
                          args.overrides)
    memory = carries_memory(probe)
    segment_len = args.segment_len or (saved.segment_len if saved else max(1, context // 2) if memory else context)
    config = (saved.config.with_overrides(list(args.overrides)) if saved
              else method.config(MethodContext(n_layers, segment_len, context, layers, summary), args.overrides))
    config.bind(n_layers=n_layers, segment_len=segment_len)
    datastore_files(config)
    local = segment_len * config.position.segment_factor
    max_length = args.max_length or (None if memory else local)
    if max_length is not None and args.max_gen_toks >= max_length:
        raise ConfigError(f"unimem model_args: max_gen_toks={args.max_gen_toks} leaves no prompt in "
                          f"max_length={max_length}: lower max_gen_toks or raise max_length")
    return ModelPlan(source, config, segment_len, context, max_length, saved)


@register_model("unimem")
class UnimemLM(TemplateLM):
    """A unimem-bench method as an lm-eval model; keyword arguments are `UnimemArgs` fields (`set=` for overrides)."""

    def __init__(self, **model_args: Any) -> None:
        super().__init__()
        self.args = UnimemArgs.from_model_args(model_args)
        self.plan = plan_model(self.args)
        self._device = resolve_device(self.args.device, fall_back=True)
        dtype = DTYPES.get(self.args.dtype) or default_dtype(self._device)
        model, self.tokenizer = load_model(self.plan.source, device=self._device, dtype=dtype)
        self.lm = MemoryLM(model, self.plan.config, segment_len=self.plan.segment_len,
                           trained_context=self.plan.trained_context)
        if self.plan.saved is not None:
            self.plan.saved.load_into(self.lm)
        attach_datastore(self.lm, self.tokenizer)
        eos = getattr(model.generation_config, "eos_token_id", None)
        # Generation stops where transformers' generate would: the model's generation config, else the tokenizer's.
        self.stop_ids: int | list[int] = eos if eos is not None else self.tokenizer.eos_token_id

    @property
    def max_length(self) -> int | None:
        return self.plan.max_length

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        # As lm-eval's hf model: BOS conditions the first token, EOS when the tokenizer has no BOS.
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.tokenizer.eos_token_id

    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer.name_or_path.replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, left_truncate_len: int | None = None,
                   **kwargs: Any) -> list[int]:
        """lm-eval's hf tokenization: the tokenizer's special tokens unless told, none if the text starts with BOS."""
        flag = add_special_tokens if add_special_tokens is not None else self.args.add_bos_token
        if add_special_tokens is None and has_bos_prefix(string, self.tokenizer.decode(self.prefix_token_id)):
            flag = False
        ids = self.tokenizer.encode(string, **({} if flag is None else {"add_special_tokens": flag}))
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def tok_decode(self, tokens: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(chat_history, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)

    def get_model_info(self) -> dict[str, Any]:
        """Added to lm-eval's results config."""
        return {"pretrained": self.plan.source.name, "method": self.args.method,
                "segment_len": self.plan.segment_len, "max_length": self.plan.max_length,
                "method_config": self.plan.config.to_dict()}

    def _score(self, docs: list[list[int]], desc: str, disable_tqdm: bool) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(nll, greedy) of every token after the first of each document, streamed through the method."""
        total = sum(max(0, len(d) - 1) for d in docs)
        with tqdm(total=total, desc=desc, unit="tok", disable=disable_tqdm) as bar:
            scores = self.lm.score_tokens([torch.tensor(d, dtype=torch.long) for d in docs],
                                          batch_size=self.args.batch_size, progress=bar.update)
        return [(s.nll, s.greedy) for s in scores]

    def _loglikelihood_tokens(self, requests: list[tuple[tuple[str, str], list[int], list[int]]],
                              disable_tqdm: bool = False, **kwargs: Any) -> list[tuple[float, bool]]:
        docs = []
        for _, context_enc, continuation_enc in requests:
            tokens = context_enc + continuation_enc
            if self.max_length is not None:
                if len(continuation_enc) > self.max_length:
                    raise ValueError(f"a continuation of {len(continuation_enc)} tokens does not fit max_length="
                                     f"{self.max_length}: raise max_length in --model_args")
                tokens = tokens[-(self.max_length + 1):]  # as lm-eval's hf: the context is cut from the left
            docs.append(tokens)
        results = []
        for (pair, _, continuation_enc), (nll, greedy) in zip(requests, self._score(docs, "unimem loglikelihood",
                                                                                   disable_tqdm), strict=True):
            n = len(continuation_enc)
            answer = (-float(nll[len(nll) - n:].double().sum()), bool(greedy[len(greedy) - n:].all()))
            self.cache_hook.add_partial("loglikelihood", pair, answer)
            results.append(answer)
        return results

    def rolling_windows(self, tokens: list[int]) -> list[tuple[list[int], list[int]]]:
        """(context, predicted) windows covering `tokens` once: lm-eval's own rolling windows of max_length (context
        length 1, disjoint), or one window of everything when max_length is unlimited."""
        if not tokens:
            return []
        if self.max_length is None:
            return [([self.prefix_token_id], tokens)]
        windows = get_rolling_token_windows(token_list=tokens, prefix_token=self.prefix_token_id,
                                            max_seq_len=self.max_length, context_len=1)
        return [make_disjoint_window(w) for w in windows]

    def loglikelihood_rolling(self, requests: list[Instance], disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of each whole text, the prefix token first, as lm-eval's hf model computes it.

        The text is cut into lm-eval's rolling windows of `max_length` (`rolling_windows`) and each window streams
        through the method in segments of L = the method's local context. lm-eval's windows: the first one reads
        [prefix] + t[:L-1] and predicts t[:L]; each following full one reads the L tokens before the ones it predicts
        (t[kL-1 : (k+1)L-1] -> t[kL : (k+1)L]), which is exactly the engine's k-th segment of [prefix] + t, since a
        segment of L tokens predicts the next L. A last, partial window re-reads earlier text so that it still reads
        L tokens. Methods without memory (default max_length = L) therefore score every window in one segment, as
        hf does in one forward: vanilla equals lm-eval's hf model. Memory methods (default max_length unlimited)
        stream [prefix] + t as one document: the same segments, each reading what came before from memory, the last
        one included.
        """
        windows, owners = [], []
        for index, (string,) in enumerate(req.args for req in requests):
            for context, predicted in self.rolling_windows(self.tok_encode(string)):
                windows.append(context + predicted)
                owners.append((index, len(predicted)))
        totals = [0.0] * len(requests)
        for (index, n), (nll, _) in zip(owners, self._score(windows, "unimem loglikelihood_rolling", disable_tqdm),
                                        strict=True):
            totals[index] -= float(nll[len(nll) - n:].double().sum())
        for req, total in zip(requests, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    def generate_until(self, requests: list[Instance], disable_tqdm: bool = False) -> list[str]:
        eos_text = self.tok_decode([self.eot_token_id], skip_special_tokens=False)
        results = []
        for index, (context, gen_kwargs) in enumerate(tqdm([req.args for req in requests], disable=disable_tqdm,
                                                           desc="unimem generate_until")):
            kwargs = dict(normalize_gen_kwargs(gen_kwargs, self.args.max_gen_toks))
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos_text)
            budget = int(kwargs.pop("max_gen_toks"))
            sampling = self.sampling(kwargs, seed=self.args.seed + index)
            keep = None
            if self.max_length is not None:
                if budget >= self.max_length:
                    raise ValueError(f"max_gen_toks={budget} leaves no prompt in max_length={self.max_length}")
                keep = self.max_length - budget  # as lm-eval's hf: room for the whole budget
            prompt = self.tok_encode(context, left_truncate_len=keep) or [self.prefix_token_id]
            # Prompt and budget read at once by a method without memory (as the tasks do); memory methods stream.
            ids = generate_at_once(self.lm, prompt, max_new_tokens=budget, eos_token_id=self.stop_ids,
                                   stop=self.stopper(until), sampling=sampling)
            text = postprocess_generated_text(self.tok_decode(ids), until, None)
            self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
            results.append(text)
        return results

    def stopper(self, until: list[str]) -> Callable[[list[int]], bool]:
        """True once the decoded new tokens contain a stop string."""
        stops = [s for s in until if s]
        return lambda ids: any(s in self.tok_decode(ids, skip_special_tokens=False) for s in stops)

    @staticmethod
    def sampling(kwargs: Mapping[str, Any], *, seed: int) -> Sampling:
        """Greedy, or lm-eval's do_sample/temperature/top_p as a seeded `Sampling`; other generation keys fail."""
        unknown = sorted(set(kwargs) - set(SAMPLING_KEYS))
        if unknown:
            raise ValueError(f"generation argument {unknown[0]!r} is not supported by unimem (it supports until, "
                             f"max_gen_toks, {', '.join(SAMPLING_KEYS)})")
        temperature = float(kwargs.get("temperature") or 0.0)
        if not kwargs.get("do_sample") or temperature == 0.0:
            return Sampling()
        return Sampling(do_sample=True, temperature=temperature, top_p=float(kwargs.get("top_p") or 1.0), seed=seed)


def run_lm_eval_cli(argv: Sequence[str]) -> int:
    """lm-eval's own command line (`lm-eval ARGS`) with `unimem` registered; returns its exit status."""
    from lm_eval.__main__ import cli_evaluate

    saved = sys.argv
    sys.argv = ["lm-eval", *argv]  # lm-eval's parser reads sys.argv itself: its entry point takes no arguments
    try:
        cli_evaluate()
    except SystemExit as done:
        return done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
    finally:
        sys.argv = saved
    return 0
