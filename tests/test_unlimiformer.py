"""Unlimiformer's engine values: memory frozen after the prompt in generation, and what scaled_memory accepts."""

from __future__ import annotations

import pytest
import torch
from helpers import random_docs, tiny_llama

from unimem_bench.methods import METHODS, ConfigError, MemoryLM, MethodContext
from unimem_bench.methods.engine.memory import MemoryState


class RecordingLM(MemoryLM):
    """A MemoryLM that records, per committed segment, where it starts and whether it wrote memory."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.commits: list[tuple[int, bool, int]] = []

    def forward_segment(self, state: MemoryState, input_ids: torch.Tensor, doc_start: int,
                        write: bool = True) -> torch.Tensor:
        out = super().forward_segment(state, input_ids, doc_start, write)
        self.commits.append((doc_start, write, state.n_bank))
        return out


@pytest.mark.parametrize("freeze", [True, False])
def test_generation_writes_no_segment_of_generated_tokens_when_frozen(freeze, one_thread) -> None:
    model = tiny_llama(layers=2, context=16, seed=1)
    config = METHODS.get("unlimiformer").config(MethodContext(2, 8, 16), [f"management.freeze_after_prompt={freeze}"])
    prompt = random_docs([20], seed=2)[0]
    with RecordingLM(model, config, segment_len=8, trained_context=16) as lm:
        lm.generate(prompt, max_new_tokens=30)
        commits = lm.commits
    # Prompt segments at 0 and 8; the segment at 16 holds the prompt's last tokens; 24, 32, 40 are generated only.
    assert [start for start, _, _ in commits] == [0, 8, 16, 24, 32, 40]
    assert [write for _, write, _ in commits] == [True, True, True] + [not freeze] * 3
    assert commits[-1][2] == (24 if freeze else 48)  # memory slots held at the end


@pytest.mark.parametrize("overrides", [["position.mode=compact"], ["reading.window=4"], ["reading.topk=0",
                                                                                         "reading.read_all=true"]])
def test_scaled_memory_refuses_what_it_cannot_place(overrides) -> None:
    with pytest.raises(ConfigError, match="scaled_memory"):
        METHODS.get("unlimiformer").config(MethodContext(2, 8, 16), overrides)


def test_unlimiformer_reads_as_many_keys_as_the_trained_window() -> None:
    config = METHODS.get("unlimiformer").config(MethodContext(5, 128, 512))
    assert config.reading.topk == 512 and config.injection.layers == "all" and config.position.scaled_memory
