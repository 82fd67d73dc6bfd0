"""Document sharding across processes for `accelerate launch` (or torchrun): each process scores whole documents,
results are gathered so every process holds all of them, and only the main process writes.

Launched alone, everything here is a no-op: one process, rank 0, nothing gathered.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist


def launched_world() -> int:
    """How many processes the launcher started (1 when run directly)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    """Rank 0 (or no launcher): the process that prints and writes; readable before any process group exists."""
    return int(os.environ.get("RANK", "0")) == 0


@dataclass(frozen=True)
class Processes:
    """This process's place among those the launcher started."""

    rank: int = 0
    """This process's index."""
    world: int = 1
    """How many processes there are."""

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.world:
            raise ValueError(f"process rank {self.rank} is not in 0..{self.world - 1}")

    @classmethod
    def join(cls, *, cpu: bool) -> Processes:
        """Join the launcher's process group (gloo on CPU, NCCL on GPUs, through accelerate); alone: rank 0 of 1."""
        if launched_world() > 1 and not dist.is_initialized():
            from accelerate import PartialState

            PartialState(cpu=cpu)
        if not dist.is_initialized():
            return cls()
        return cls(dist.get_rank(), dist.get_world_size())

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def shard(self, sizes: Sequence[int]) -> list[int]:
        """The items this process takes: dealt longest first, so every process gets a similar amount of work."""
        order = sorted(range(len(sizes)), key=lambda i: (-sizes[i], i))
        return order[self.rank::self.world]

    def gather(self, mine: list[int], values: list[Any], n: int) -> list[Any]:
        """Every process's (indices, values) joined into one list of `n` values in index order, on every process."""
        if self.world == 1:
            out: list[Any] = [None] * n
            for i, v in zip(mine, values, strict=True):
                out[i] = v
            return out
        parts: list[Any] = [None] * self.world
        dist.all_gather_object(parts, (mine, values))
        out = [None] * n
        for indices, vals in parts:
            for i, v in zip(indices, vals, strict=True):
                out[i] = v
        return out


Item = TypeVar("Item")
Out = TypeVar("Out")


class ShardedLM:
    """A scoring LM whose `score` splits documents across processes and gathers the results on all of them, and
    whose `map_samples` does the same for a generation task's samples (the contract's `SampleSharding`).

    Each document or sample is computed whole by one process (its memory never leaves that process), so the gathered
    results are exactly those of one process computing everything. Anything else is passed through to the wrapped LM.
    """

    def __init__(self, lm: Any, processes: Processes) -> None:
        self.lm = lm
        self.processes = processes

    def score(self, docs: Sequence[torch.Tensor], *, batch_size: int = 1,
              progress: Callable[[int], None] | None = None) -> list[torch.Tensor]:
        mine = self.processes.shard([len(d) for d in docs])
        nlls = self.lm.score([docs[i] for i in mine], batch_size=batch_size, progress=progress) if mine else []
        return self.processes.gather(mine, [n.cpu() for n in nlls], len(docs))

    def map_samples(self, fn: Callable[[Item], Out], items: Sequence[Item]) -> Iterator[tuple[int, Out]]:
        """`(index, fn(item))` for every item, on every process. Items go out in rounds of one per process (item
        r * world + rank is this process's in round r: neighbouring samples, e.g. the cells of one context length,
        cost about the same), and each round's results are exchanged before they are yielded, so a task logs
        every finished sample at once and an interrupted run loses at most one round. An error in any process
        stops every process: the one that failed raises its own exception, the others a RuntimeError naming it."""
        world, rank = self.processes.world, self.processes.rank
        for start in range(0, len(items), world):
            failed: Exception | None = None
            mine: tuple[bool, Any] = (True, None)
            if start + rank < len(items):
                try:
                    mine = (True, fn(items[start + rank]))
                except Exception as err:  # every process must reach the exchange below, or the others hang in it
                    if world == 1:
                        raise
                    failed, mine = err, (False, f"{type(err).__name__}: {err}")
            parts: list[Any] = [mine]
            if world > 1:
                parts = [None] * world
                dist.all_gather_object(parts, mine)
            if failed is not None:
                raise failed
            errors = [(r, detail) for r, (ok, detail) in enumerate(parts) if not ok]
            if errors:
                raise RuntimeError(f"process {errors[0][0]} failed on a sample: {errors[0][1]}")
            for r, (_, value) in enumerate(parts):
                if start + r < len(items):
                    yield start + r, value

    def __getattr__(self, name: str) -> Any:
        return getattr(self.lm, name)


def local_device(name: str) -> torch.device:
    """`--device` for this process: `auto` is this process's own GPU under a launcher (LOCAL_RANK), else cuda/cpu."""
    if name != "auto":
        return torch.device(name)
    if not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
