"""FoT, Unlimiformer, LongMem, kNN-LM, TRIME, Reformer, the Routing Transformer, Quest and InfLLM through the lm-eval
model: rolling log-likelihood through memory, generation."""

from __future__ import annotations

import math

import pytest
from lm_eval.api.instance import Instance

from unimem_bench.harness.evaluation.lm_eval_model import UnimemLM


@pytest.mark.parametrize("method", ["fot", "unlimiformer", "longmem", "knn_lm", "trime", "reformer", "routing",
                                    "quest", "infllm"])
def test_similarity_methods_run_through_the_lm_eval_model(method, stories_dir, books_dir) -> None:
    text = next(iter(sorted(books_dir.glob("*.txt")))).read_text()[30_000:32_500]
    rolling = [Instance(request_type="loglikelihood_rolling", doc={}, arguments=(text,), idx=0)]
    ours = UnimemLM(pretrained=str(stories_dir), method=method, segment_len=64, batch_size=1)
    vanilla = UnimemLM(pretrained=str(stories_dir), method="vanilla", segment_len=64, batch_size=1, max_gen_toks=8)
    got, plain = ours.loglikelihood_rolling(rolling)[0], vanilla.loglikelihood_rolling(rolling)[0]
    assert math.isfinite(got) and got != plain  # the memory layers read something
    until = [Instance(request_type="generate_until", doc={}, idx=0,
                      arguments=(text[:600], {"until": ["\n\n"], "max_gen_toks": 12, "do_sample": False}))]
    assert isinstance(ours.generate_until(until)[0], str)
