"""Segment-streamed fine-tuning of a method: every document flows through consecutive segments with the method's
memory carried, exactly as evaluation streams it, while AdamW trains the model and the method's own parameters.

One optimizer step: every row of every process runs `grad_accum` windows (k segments under BPTT, one under
stop-gradient), each one forward and one backward; memory is detached after each window, so gradients reach k-1
segments back. The loss of a step is the mean NLL over all its target tokens on all processes: each window's
summed NLL is divided by the global token count before backward, so N processes with B rows compute exactly the
gradient of one process with N x B rows (up to float summation order).

accelerate places the model and wraps it for data parallelism (DDP, or DeepSpeed ZeRO-3 from a recipe's accelerate
config); documents are dealt whole to processes and rows (`training_data.deal`), never batches round-robin.
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from torch import nn
from transformers import PreTrainedModel

from unimem_bench.harness.models import exports as checkpoints
from unimem_bench.harness.models.resolve import load_model
from unimem_bench.harness.runtime import environment as run_env
from unimem_bench.harness.runtime.device import is_cpu
from unimem_bench.harness.runtime.distributed import Processes, ShardedLM
from unimem_bench.harness.training.data import DocumentStreams, Window, deal, heldout_documents, load_corpus
from unimem_bench.harness.training.log import EVAL_COLUMNS, TRAIN_COLUMNS, CsvLog, plot_loss
from unimem_bench.harness.training.recipe import FinetunePlan, FinetuneRecipe, check_same_shapes, plan_finetune
from unimem_bench.methods import ConfigError, MemoryLM
from unimem_bench.methods.engine.memory import MemoryState

DATA_COLUMNS = ["step", "row", "doc_id", "start", "segments", "tokens"]

# Held-out documents streamed together: batching never changes a score, so this only trades memory for speed.
EVAL_BATCH = 4


class SegmentTrainer(nn.Module):
    """The module accelerate prepares (DDP / DeepSpeed wrap it): one forward runs one window of one stream."""

    def __init__(self, lm: MemoryLM) -> None:
        super().__init__()
        self.lm = lm

    def forward(self, state: MemoryState, window: Window) -> torch.Tensor:
        """Summed NLL (nats) of each segment's targets, [n_segments]; `state` is updated as evaluation does."""
        device = self.lm.device
        out = []
        for start, ids, targets in window.segments():
            logits = self.lm.forward_segment(state, ids.unsqueeze(0).to(device), start)  # [1, width, vocab]
            out.append(F.cross_entropy(logits[0].float(), targets.to(device), reduction="sum"))
        return torch.stack(out)


class RunFolderError(ConfigError):
    """A --out that holds another run; the message names the fix."""


def finetune(recipe: FinetuneRecipe, *, resume: bool = False, stop_after_steps: int | None = None,
             console: Console | None = None) -> Path:
    """Fine-tune `recipe.method`; returns the run folder. Resumable; every process of a launch calls this."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    console = console or Console()
    cpu = is_cpu(recipe.device)
    bf16 = recipe.precision == "bf16" or (recipe.precision == "auto" and not cpu)
    # The scheduler steps once per optimizer step, itself (accelerate would step it once per process).
    # RMT write slots fed from memory use the learned memory embeddings only in a document's first segment, so a
    # DDP step may leave them without gradient.
    accelerator = Accelerator(cpu=cpu, mixed_precision="bf16" if bf16 else "no",
                              gradient_accumulation_steps=recipe.batch_size * recipe.grad_accum,
                              step_scheduler_with_optimizer=False,
                              kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])
    processes = Processes(accelerator.process_index, accelerator.num_processes)
    plan = plan_finetune(recipe, world=processes.world)
    checkpoint = _open_run_folder(recipe, plan, resume, processes)
    if isinstance(checkpoint, str):  # "finished"
        console.print(f"{recipe.out} already holds the finished run: its model is in {recipe.out / 'model'}")
        return recipe.out
    run = _Run(recipe, plan, accelerator, processes, console)
    return run.train(checkpoint, stop_after_steps)


def _open_run_folder(recipe: FinetuneRecipe, plan: FinetunePlan, resume: bool,
                     processes: Processes) -> Path | str | None:
    """Check `--out` against `--resume`; returns the checkpoint to resume from, "finished", or None (fresh)."""
    info_path = recipe.out / "finetune.json"
    if info_path.exists():
        info = json.loads(info_path.read_text())
        if not resume:
            raise RunFolderError(f"--out {recipe.out} already holds a fine-tuning run: pass --resume to continue it, "
                                 "or choose another --out")
        saved = {k: v for k, v in info["recipe"].items() if k != "out"}
        now = {k: v for k, v in recipe.to_dict().items() if k != "out"}
        changed = [k for k in now if saved.get(k) != now[k]]
        if changed:
            k = changed[0]
            raise ConfigError(f"--resume: the run in {recipe.out} was started with {k}={saved.get(k)!r}, not "
                              f"{now[k]!r}: resume with the same settings, or choose another --out")
        if info.get("world", 1) != plan.world:
            raise ConfigError(f"--resume: the run in {recipe.out} used {info.get('world', 1)} processes, not "
                              f"{plan.world}: documents are dealt per process, so resume with the same number")
        if info.get("status") == "finished":
            return "finished"
        found = checkpoints.complete_checkpoints(recipe.out)
        return found[-1][1] if found else None
    processes.barrier()  # nobody writes before every process has seen whether the folder was there
    if processes.is_main:
        recipe.out.mkdir(parents=True, exist_ok=True)
        _write_info(recipe.out, {"method": recipe.method, "status": "running", "world": plan.world,
                                 "steps": plan.steps, "tokens_per_step": plan.tokens_per_step(recipe),
                                 "window_segments": plan.window_segments, "segment_len": plan.segment_len,
                                 "recipe": recipe.to_dict(), "config": plan.config.to_dict(),
                                 "started": run_env.now(),
                                 **run_env.environment(seed=recipe.seed, device=recipe.device,
                                                       model=plan.source.name)})
    processes.barrier()
    return None


def _write_info(out: Path, info: dict[str, Any]) -> None:
    tmp = out / ".finetune.json.tmp"
    tmp.write_text(json.dumps(info, indent=2, default=str) + "\n")
    tmp.replace(out / "finetune.json")


def _update_info(out: Path, **fields: Any) -> None:
    info = json.loads((out / "finetune.json").read_text())
    info.update(fields)
    _write_info(out, info)


def _param_groups(module: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Decay matrices only (norm gains and other vectors keep their scale), as transformers' Trainer does."""
    params = [p for p in module.parameters() if p.requires_grad]
    return [{"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]


class _Run:
    """One process's part of a fine-tuning run."""

    def __init__(self, recipe: FinetuneRecipe, plan: FinetunePlan, accelerator: Any, processes: Processes,
                 console: Console) -> None:
        self.recipe, self.plan, self.accelerator, self.processes = recipe, plan, accelerator, processes
        self.console = console if processes.is_main else Console(quiet=True)
        self.out = recipe.out
        torch.manual_seed(recipe.seed)
        self.corpus = load_corpus(recipe.data, heldout_docs=recipe.heldout_docs)
        rows = deal(len(self.corpus.train), world=processes.world, rank=processes.rank, batch=recipe.batch_size,
                    seed=recipe.seed)
        model, self.tokenizer = load_model(plan.source, device=torch.device("cpu"), dtype=torch.float32,
                                           console=self.console)
        if recipe.model_config is not None:
            check_same_shapes(plan.model_config, model.config, str(recipe.model_config))
        if recipe.gradient_checkpointing:
            model.activation_checkpointing_enable()
        with _gathered_embeddings(accelerator, model):
            lm = MemoryLM(model, plan.config, segment_len=plan.segment_len, trained_context=plan.trained_context)
        trainer = SegmentTrainer(lm).train()
        optimizer = _optimizer(accelerator, trainer, recipe)
        from transformers import get_scheduler

        scheduler = get_scheduler(recipe.schedule if recipe.schedule == "linear" else "constant_with_warmup",
                                  optimizer, num_warmup_steps=recipe.warmup_steps, num_training_steps=plan.steps)
        _configure_deepspeed(accelerator, recipe)
        self.trainer, self.optimizer, self.scheduler = accelerator.prepare(trainer, optimizer, scheduler)
        self.lm: MemoryLM = accelerator.unwrap_model(self.trainer).lm
        self.streams = DocumentStreams(self.corpus.train, rows, self.tokenizer, segment_len=plan.forward_len,
                                       window_segments=plan.window_segments)
        self.states: list[MemoryState | None] = [None] * recipe.batch_size
        self.heldout = heldout_documents(self.corpus, self.tokenizer, max_docs=recipe.eval_docs,
                                         max_tokens=recipe.eval_tokens)
        self.train_log = CsvLog(self.out / "train_log.csv", TRAIN_COLUMNS)
        self.eval_log = CsvLog(self.out / "eval_log.csv", EVAL_COLUMNS)
        self.data_log = CsvLog(self.out / f"data-rank{processes.rank}.csv", DATA_COLUMNS)
        self.step, self.tokens, self.elapsed = 0, 0, 0.0

    def train(self, checkpoint: Path | None, stop_after_steps: int | None) -> Path:
        recipe, plan = self.recipe, self.plan
        if checkpoint is not None:
            self._restore(checkpoint)
        else:  # a fresh start, or a resume that crashed before its first checkpoint: no rows survive
            for log in self._own_logs():
                log.truncate(-1)
        if self.processes.is_main:
            _update_info(self.out, heldout=[doc_id for doc_id, _ in self.heldout],
                         train_docs=len(self.corpus.train), data=self.corpus.name)
        self.console.print(f"fine-tuning [bold]{recipe.method}[/bold] on {self.corpus.name}: {plan.steps} steps of "
                           f"<= {plan.tokens_per_step(recipe):,} tokens, {plan.world} process(es) x "
                           f"{recipe.batch_size} rows, window {plan.window_segments} x {plan.forward_len} tokens"
                           + (f", resumed at step {self.step}" if self.step else ""))
        if self.step == 0:
            self._evaluate()
        stop = plan.steps if stop_after_steps is None else min(plan.steps, self.step + stop_after_steps)
        with self._progress() as advance:
            while self.step < stop:
                self._train_step()
                advance(self.step)
                if recipe.eval_every and self.step % recipe.eval_every == 0 and self.step < plan.steps:
                    self._evaluate()
                if recipe.save_every and self.step % recipe.save_every == 0 and self.step < stop:
                    self._checkpoint()
        if self.step < plan.steps:
            folder = self._checkpoint()
            if self.processes.is_main:
                plot_loss(self.out, f"{recipe.method} fine-tuning ({plan.source.name})")
            self.console.print(f"stopped at step {self.step} of {plan.steps}: checkpoint {folder}; continue with "
                               "the same command and --resume")
            return self.out
        self._evaluate()
        self._export(self.out / "model")
        if self.processes.is_main:
            _update_info(self.out, status="finished", finished=run_env.now(), tokens_seen=self.tokens)
            plot_loss(self.out, f"{recipe.method} fine-tuning ({plan.source.name})")
        self.processes.barrier()
        self.console.print(f"done: model {self.out / 'model'}, logs {self.out / 'train_log.csv'}, "
                           f"{self.out / 'eval_log.csv'}, plot {self.out / 'loss.png'}")
        return self.out

    @contextlib.contextmanager
    def _progress(self) -> Iterator[Any]:
        columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn()]
        with Progress(*columns, console=self.console, disable=not self.processes.is_main) as progress:
            bar = progress.add_task(f"{self.recipe.method} steps", total=self.plan.steps, completed=self.step, info="")

            def advance(step: int) -> None:
                row = self._last
                progress.update(bar, completed=step, info=f"loss {row['loss']:.3f} lr {row['lr']:.2e} "
                                                          f"{row['tokens_per_s']:,.0f} tok/s")

            yield advance

    def _train_step(self) -> None:
        accelerator, recipe = self.accelerator, self.recipe
        started = time.perf_counter()
        windows = [self.streams.next_window(row) for _ in range(recipe.grad_accum) for row in range(recipe.batch_size)]
        local = torch.tensor([sum(w.n_targets for w in windows)], dtype=torch.float64, device=accelerator.device)
        total = float(accelerator.reduce(local, "sum").item())
        # accelerate divides by the accumulation count and DDP averages over processes: undo both, so the step's
        # gradient is that of the mean NLL over all its tokens on all processes.
        scale = accelerator.gradient_accumulation_steps * accelerator.num_processes / total
        lr = self.scheduler.get_last_lr()[0]
        nll_sum, grad_norm = 0.0, float("nan")
        for window in windows:
            if window.opens_document:
                self.states[window.row] = self.lm.new_state(1)
            state = self.states[window.row]
            assert state is not None  # a row's first window opens a document (or a resumed state was loaded)
            with accelerator.accumulate(self.trainer):
                nll = self.trainer(state, window).sum()
                accelerator.backward(nll * scale)
                if accelerator.sync_gradients:
                    norm = accelerator.clip_grad_norm_(self.trainer.parameters(), recipe.clip or math.inf)
                    grad_norm = float(norm) if norm is not None else float("nan")
                    self.optimizer.step()
                    self.scheduler.step()
                    self.optimizer.zero_grad()
            state.detach()  # the end of a BPTT window (a no-op under stop-gradient)
            nll_sum += float(nll.detach())
        if not accelerator.sync_gradients:
            raise RuntimeError("internal: an optimizer step ended between gradient synchronisations")
        global_nll = float(accelerator.reduce(torch.tensor([nll_sum], dtype=torch.float64,
                                                           device=accelerator.device), "sum").item())
        self.step += 1
        self.tokens += int(total)
        seconds = time.perf_counter() - started
        self.elapsed += seconds
        for window in windows:
            self.data_log.append({"step": self.step, "row": window.row, "doc_id": window.doc_id,
                                  "start": window.starts[0], "segments": len(window.starts),
                                  "tokens": window.n_targets})
        self._last = {"step": self.step, "tokens": self.tokens, "loss": global_nll / total, "lr": lr,
                      "grad_norm": grad_norm, "tokens_per_s": round(total / seconds, 1),
                      "elapsed_s": round(self.elapsed, 3)}
        if self.processes.is_main:
            self.train_log.append(self._last)

    def _evaluate(self) -> None:
        """Held-out perplexity of the method as it stands (documents split across processes)."""
        started = time.perf_counter()
        self.trainer.eval()
        with self.accelerator.autocast():  # the training precision (bf16 on GPU), outside the prepared forward too
            nlls = ShardedLM(self.lm, self.processes).score([ids for _, ids in self.heldout], batch_size=EVAL_BATCH)
        self.trainer.train()
        nll = float(sum(float(n.double().sum()) for n in nlls))
        n = sum(len(x) for x in nlls)
        row = {"step": self.step, "tokens": self.tokens, "heldout_ppl": math.exp(nll / n), "heldout_nll": nll / n,
               "heldout_tokens": n, "seconds": round(time.perf_counter() - started, 3)}
        if self.processes.is_main:
            self.eval_log.append(row)
        self.console.print(f"step {self.step}: held-out perplexity {row['heldout_ppl']:.4f} over {n:,} tokens")

    def _export(self, folder: Path) -> None:
        """The model in Hugging Face format plus the method (config, learned memory): what `run --model` reads."""
        state_dict = self.accelerator.get_state_dict(self.trainer)  # every process: ZeRO-3 gathers the shards
        if self.processes.is_main:
            tmp = folder.with_name(f".{folder.name}.tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            checkpoints.write_export(tmp, lm=self.lm, state_dict=state_dict, tokenizer=self.tokenizer,
                                     method=self.recipe.method, segment_len=self.plan.segment_len,
                                     info={"trained_context": self.plan.trained_context, "step": self.step,
                                           "tokens_seen": self.tokens, "base_model": self.plan.source.name})
            if folder.exists():
                shutil.rmtree(folder)
            tmp.replace(folder)
        self.processes.barrier()

    def _checkpoint(self) -> Path:
        stage = checkpoints.staging_dir(self.out, self.step)
        if self.processes.is_main:
            shutil.rmtree(stage, ignore_errors=True)
            stage.mkdir(parents=True)
        self.processes.barrier()
        self._export(stage / "model")
        # torch.save rather than safetensors: tied weights (a shared tensor) need no special handling there.
        self.accelerator.save_state(str(stage / "trainer"), safe_serialization=False)
        checkpoints.save_streams(stage, self.processes.rank, {
            "step": self.step, "tokens": self.tokens, "elapsed": self.elapsed, "streams": self.streams.state_dict(),
            "memory": [s.state_dict() if s is not None else None for s in self.states]})
        self.processes.barrier()
        final = checkpoints.step_dir(self.out, self.step)
        if self.processes.is_main:
            checkpoints.publish(self.out, self.step, self.recipe.keep_checkpoints)
        self.processes.barrier()
        return final

    def _restore(self, folder: Path) -> None:
        self.accelerator.load_state(str(folder / "trainer"))
        data = checkpoints.load_streams(folder, self.processes.rank)
        self.streams.load_state_dict(data["streams"])
        for row, saved in enumerate(data["memory"]):
            if saved is not None:
                state = self.lm.new_state(1)
                state.load_state_dict(saved, self.lm.device)
                self.states[row] = state
        self.step, self.tokens, self.elapsed = data["step"], data["tokens"], data["elapsed"]
        for log in self._own_logs():
            log.truncate(self.step)
        self.processes.barrier()

    def _own_logs(self) -> list[CsvLog]:
        """The logs this process writes: its data log, and the main process the shared ones."""
        return [self.train_log, self.eval_log, self.data_log] if self.processes.is_main else [self.data_log]


def _gathered_embeddings(accelerator: Any, model: PreTrainedModel) -> Any:
    """Under ZeRO-3 the embedding is partitioned at load time: gather it while MemoryLM reads its shape and scale."""
    plugin = accelerator.state.deepspeed_plugin
    if plugin is None or plugin.zero_stage != 3:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters([model.get_input_embeddings().get_parameter("weight")])


def _optimizer(accelerator: Any, trainer: nn.Module, recipe: FinetuneRecipe) -> torch.optim.Optimizer:
    """AdamW; DeepSpeed's CPU AdamW (the same update) when ZeRO offloads the optimizer state to CPU."""
    groups = _param_groups(trainer, recipe.weight_decay)
    plugin = accelerator.state.deepspeed_plugin
    offload = plugin is not None and (plugin.deepspeed_config.get("zero_optimization", {})
                                      .get("offload_optimizer", {}).get("device") == "cpu")
    if offload:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, lr=recipe.lr, adamw_mode=True)
    return torch.optim.AdamW(groups, lr=recipe.lr)


def _configure_deepspeed(accelerator: Any, recipe: FinetuneRecipe) -> None:
    """Fill the DeepSpeed config's per-run values: one document window per micro-step, the recipe's clip."""
    plugin = accelerator.state.deepspeed_plugin
    if plugin is None:
        return
    plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = 1
    plugin.deepspeed_config["gradient_clipping"] = recipe.clip

