"""Two CPU processes (torch.distributed, gloo, through accelerate) against one: fine-tuning deals whole documents to
each process and computes the same run as one process with both rows; `run` splits documents across processes and
gathers one set of results, written once."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pandas as pd
import pytest
import torch
import torch.multiprocessing as mp
from helpers import save_tiny_model, write_text_docs
from safetensors.torch import load_file

from unimem_bench.harness.cli import app as cli
from unimem_bench.harness.runtime.distributed import Processes
from unimem_bench.methods import MemoryLM

pytestmark = pytest.mark.usefixtures("one_thread")


def finetune_argv(root: Path, out: Path, batch: int) -> list[str]:
    return ["finetune", "--method", "rmt", "--model", str(root / "tiny"), "--data", str(root / "docs"), "--tokens",
            "512", "--segment-len", "16", "--batch-size", str(batch), "--lr", "3e-3", "--eval-every", "4",
            "--eval-docs", "2", "--eval-tokens", "80", "--out", str(out)]


def run_argv(root: Path, model: Path, out: Path) -> list[str]:
    return ["run", "--model", str(model), "--tasks", "pg19", "--data-dir", str(root / "docs"), "--max-docs", "5",
            "--max-tokens", "150", "--batch-size", "1", "--out", str(out)]


def worker(rank: int, world: int, port: int, root: Path) -> None:
    """One launched process, as torchrun would start it (forked here: no second import of torch)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)  # the parent's single-process state came with the fork
    GradientState._reset_state()
    assert cli.main(finetune_argv(root, root / "two", batch=1)) == 0
    real_score = MemoryLM.score
    scored: list[int] = []

    def recording_score(self, docs, **kwargs):
        scored.extend(len(d) for d in docs)
        return real_score(self, docs, **kwargs)

    MemoryLM.score = recording_score
    assert cli.main(run_argv(root, root / "one" / "model", root / "results-two")) == 0
    (root / f"scored-rank{rank}.json").write_text(json.dumps(scored))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_equal_one(tmp_path):
    save_tiny_model(tmp_path / "tiny")
    write_text_docs(tmp_path / "docs", [1300] * 5)
    assert cli.main(finetune_argv(tmp_path, tmp_path / "one", batch=2)) == 0
    assert cli.main(run_argv(tmp_path, tmp_path / "one" / "model", tmp_path / "results-one")) == 0
    mp.start_processes(worker, args=(2, free_port(), tmp_path), nprocs=2, start_method="fork")

    one, two = tmp_path / "one", tmp_path / "two"
    # Each process streamed whole documents of its own, and together they streamed what one process's rows did.
    ranks = [pd.read_csv(two / f"data-rank{r}.csv") for r in range(2)]
    docs = [set(frame["doc_id"]) for frame in ranks]
    assert docs[0] and docs[1] and not docs[0] & docs[1]
    single = pd.read_csv(one / "data-rank0.csv")
    for r, frame in enumerate(ranks):
        assert set(frame["row"]) == {0}
        mine = single[single["row"] == r].drop(columns="row").reset_index(drop=True)
        pd.testing.assert_frame_equal(frame.drop(columns="row"), mine)
    # The same computation: losses, learning rates, held-out perplexities and weights, up to summation order.
    train_one, train_two = pd.read_csv(one / "train_log.csv"), pd.read_csv(two / "train_log.csv")
    assert list(train_two["tokens"]) == list(train_one["tokens"])
    for column in ("loss", "lr", "grad_norm"):
        assert train_two[column].tolist() == pytest.approx(train_one[column].tolist(), rel=1e-5), column
    eval_one, eval_two = pd.read_csv(one / "eval_log.csv"), pd.read_csv(two / "eval_log.csv")
    assert eval_two["heldout_ppl"].tolist() == pytest.approx(eval_one["heldout_ppl"].tolist(), rel=1e-5)
    weights_one, weights_two = load_file(one / "model" / "model.safetensors"), load_file(two / "model" /
                                                                                          "model.safetensors")
    for name, tensor in weights_one.items():
        torch.testing.assert_close(weights_two[name], tensor, atol=2e-6, rtol=1e-5, msg=name)

    # Sharded evaluation: each process scored a disjoint part of the documents, one set of results was written.
    scored = [json.loads((tmp_path / f"scored-rank{r}.json").read_text()) for r in range(2)]
    assert scored[0] and scored[1] and len(scored[0]) + len(scored[1]) == 5  # all 5 documents have >= 1,000 characters
    board_one = pd.read_csv(tmp_path / "results-one" / "leaderboard.csv")
    board_two = pd.read_csv(tmp_path / "results-two" / "leaderboard.csv")
    assert len(board_two) == len(board_one) and len(list((tmp_path / "results-two" / "runs").iterdir())) == 1
    assert board_two["value"].tolist() == pytest.approx(board_one["value"].tolist(), rel=1e-6)


def test_shard_deals_every_item_to_exactly_one_process():
    sizes = [5, 90, 12, 12, 40, 7, 66]
    parts = [Processes(rank, 3).shard(sizes) for rank in range(3)]
    assert sorted(i for part in parts for i in part) == list(range(len(sizes)))
    assert [sizes[part[0]] for part in parts] == [90, 66, 40]  # longest first, dealt round the processes


GENERATION_TASKS = "longbench,niah,ruler_niah_single_1"


def generation_argv(root: Path, out: Path) -> list[str]:
    """LongBench (fixture files), NIAH (the .txt book beside them) and a RULER variant on the tiny model through a
    memory method: 4 + 6 + 4 short generations, long prompts streaming through memory."""
    return ["run", "--model", str(root / "tiny"), "--methods", "transformer_xl", "--tasks", GENERATION_TASKS,
            "--data-dir", str(root / "data"), "--max-docs", "2", "--segment-len", "64", "--out", str(out),
            "--task-arg", "longbench.datasets=trec,passage_count", "--task-arg", "longbench.max_gen=6",
            "--task-arg", "niah.preset=story", "--task-arg", "niah.lengths=96,300", "--task-arg", "depths=0,0.5,1",
            "--task-arg", "niah.max_new_tokens=6", "--task-arg", "ruler_niah_single_1.lengths=700,900",
            "--task-arg", "ruler_niah_single_1.depths=0,1", "--task-arg", "ruler_niah_single_1.max_new_tokens=6"]


def generation_worker(rank: int, world: int, port: int, root: Path) -> None:
    """One launched process of `run` on generation tasks, recording the prompts it generated for."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    real_generate = MemoryLM.generate
    prompts: list[list[int]] = []

    def recording_generate(self, prompt, **kwargs):
        prompts.append(prompt.tolist())
        return real_generate(self, prompt, **kwargs)

    MemoryLM.generate = recording_generate
    assert cli.main(generation_argv(root, root / "results-two")) == 0
    (root / f"generated-rank{rank}.json").write_text(json.dumps(prompts))


def test_two_processes_split_generation_and_write_the_samples_of_one(tmp_path):
    from unimem_bench.tasks.longbench.fixture import write_longbench_dir

    save_tiny_model(tmp_path / "tiny")
    write_longbench_dir(tmp_path / "data", n=2, words=120)
    write_text_docs(tmp_path / "data", [3000])
    assert cli.main(generation_argv(tmp_path, tmp_path / "results-one")) == 0
    mp.start_processes(generation_worker, args=(2, free_port(), tmp_path), nprocs=2, start_method="fork")

    one, two = tmp_path / "results-one" / "runs", tmp_path / "results-two" / "runs"
    runs = sorted(p.name for p in one.iterdir())
    assert len(runs) == 3 and sorted(p.name for p in two.iterdir()) == runs  # 3 tasks, no partial logs left
    for rid in runs:
        assert (two / rid / "samples.jsonl").read_bytes() == (one / rid / "samples.jsonl").read_bytes(), rid
        assert (two / rid / "metrics.json").read_bytes() == (one / rid / "metrics.json").read_bytes(), rid
    # Every prompt was generated for by exactly one of the two processes, and each took its share.
    generated = [json.loads((tmp_path / f"generated-rank{r}.json").read_text()) for r in range(2)]
    samples = sum(len((one / rid / "samples.jsonl").read_text().splitlines()) for rid in runs)
    assert len(generated[0]) + len(generated[1]) == samples == 4 + 6 + 4
    assert abs(len(generated[0]) - len(generated[1])) <= 3  # one each per round; a task may leave one over
    board_one = pd.read_csv(tmp_path / "results-one" / "leaderboard.csv")
    board_two = pd.read_csv(tmp_path / "results-two" / "leaderboard.csv")
    pd.testing.assert_frame_equal(board_two.drop(columns="finished"), board_one.drop(columns="finished"))


def map_worker(rank: int, world: int, port: int, root: Path) -> None:
    """Deal 7 items to 2 processes through ShardedLM.map_samples, then a failing item: what each process saw."""
    import torch.distributed as dist

    from unimem_bench.harness.runtime.distributed import ShardedLM

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    sharded = ShardedLM(None, Processes(rank, world))
    computed: list[int] = []

    def square(item: int) -> dict[str, int]:
        computed.append(item)
        return {"item": item, "square": item * item}

    got = list(sharded.map_samples(square, list(range(7))))

    def fail_on_three(item: int) -> int:
        if item == 3:
            raise ValueError("item 3 is bad")
        return item

    seen: list[int] = []
    try:
        for index, _ in sharded.map_samples(fail_on_three, list(range(6))):
            seen.append(index)
        error = "none"
    except Exception as err:  # the test records which error each process raised
        error = f"{type(err).__name__}: {err}"
    dist.destroy_process_group()
    (root / f"map-rank{rank}.json").write_text(json.dumps({"got": got, "computed": computed, "seen": seen,
                                                            "error": error}))


def test_map_samples_deals_items_and_stops_every_process_on_an_error(tmp_path):
    mp.start_processes(map_worker, args=(2, free_port(), tmp_path), nprocs=2, start_method="fork")
    ranks = [json.loads((tmp_path / f"map-rank{r}.json").read_text()) for r in range(2)]
    expected = [[i, {"item": i, "square": i * i}] for i in range(7)]
    assert ranks[0]["got"] == ranks[1]["got"] == expected  # every process gets every result, in order
    assert ranks[0]["computed"] == [0, 2, 4, 6] and ranks[1]["computed"] == [1, 3, 5]  # each item computed once
    # Item 3 is process 1's, in the second round: both saw the first round, then both stopped.
    assert ranks[0]["seen"] == ranks[1]["seen"] == [0, 1]
    assert ranks[1]["error"] == "ValueError: item 3 is bad"
    assert ranks[0]["error"] == "RuntimeError: process 1 failed on a sample: ValueError: item 3 is bad"
