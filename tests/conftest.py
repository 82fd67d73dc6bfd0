"""Fixtures: a tiny random LLaMA, and the ../shared assets (tests needing them skip when it is absent, and fail
instead under UNIMEM_REQUIRE_SHARED=1, as in CI, which always has them)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from helpers import BOOKS, SHARED_ABSENT, STORIES, sweep_argv, tiny_llama
from transformers import LlamaForCausalLM


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> object:
    """Under UNIMEM_REQUIRE_SHARED=1 a test skipped for a missing ../shared asset is reported as failed."""
    outcome = yield
    report = outcome.get_result()
    if report.skipped and os.environ.get("UNIMEM_REQUIRE_SHARED") == "1":
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        if reason.removeprefix("Skipped: ").startswith(SHARED_ABSENT):
            report.outcome = "failed"
            report.longrepr = f"UNIMEM_REQUIRE_SHARED=1 but the test was skipped: {reason}"
    return None


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """The hub endpoint points at a closed local port: a test never reaches the network, even on a machine that has
    one, and hub lookups fail at once as they do offline."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")


@pytest.fixture
def no_model_work(monkeypatch):
    """Fail the test if weights are loaded (by `run`, the trainer, or any transformers `from_pretrained`): bad input
    must be caught before."""
    from transformers import PreTrainedModel

    from unimem_bench.harness.evaluation import runner
    from unimem_bench.harness.models import resolve
    from unimem_bench.harness.training import trainer

    def forbidden(*args, **kwargs):
        raise AssertionError("model weights were loaded before the input was validated")

    for module in (runner, resolve, trainer):
        monkeypatch.setattr(module, "load_model", forbidden)
    monkeypatch.setattr(PreTrainedModel, "from_pretrained", classmethod(forbidden))


@pytest.fixture
def one_thread():
    """One torch thread for the test: tiny models gain nothing from intra-op threads, and on a busy 2-core machine
    lose much to their contention (restored after the test)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def model() -> LlamaForCausalLM:
    return tiny_llama()


@pytest.fixture(scope="session")
def stories_dir() -> Path:
    if not (STORIES / "config.json").exists():
        pytest.skip(f"{SHARED_ABSENT}: {STORIES} not found")
    return STORIES


@pytest.fixture(scope="session")
def books_dir() -> Path:
    if not BOOKS.is_dir():
        pytest.skip(f"{SHARED_ABSENT}: {BOOKS} not found")
    return BOOKS


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 3-layer LLaMA with its own BPE tokenizer, built in seconds by the reference recipe machinery."""
    from unimem_bench.harness.models.reference import ReferenceRecipe, build_reference

    recipe = ReferenceRecipe(vocab_size=300, hidden_size=32, intermediate_size=64, num_layers=3, num_heads=2,
                             num_kv_heads=1, context=64, batch_size=4, steps=6, warmup_steps=2, max_files=5,
                             eval_windows=4)
    return build_reference(cache_root=tmp_path_factory.mktemp("tiny-model"), recipe=recipe)


@pytest.fixture(scope="session")
def sweep_results_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Results of three sweeps on the tiny model: layer placement (serial), top-k (2 worker processes), window."""
    from unimem_bench.harness.cli import app as cli

    out = tmp_path_factory.mktemp("sweep-results")
    threads = torch.get_num_threads()
    # One thread: this model's matrices are tiny, and on a busy machine extra threads only wait for each other.
    torch.set_num_threads(1)
    try:
        for args in (["--preset", "layer-placement"], ["--vary", "reading.topk=0,4,8", "--workers", "2"],
                     ["--vary", "reading.window=0,8,16"]):
            assert cli.main(sweep_argv(tiny_model_dir, out, *args)) == 0
    finally:
        torch.set_num_threads(threads)
    return out


@pytest.fixture(scope="session", params=[("-mno-avx512f", 8), ("-mno-avx512f -mno-avx2 -mno-fma", 1)],
                ids=["avx2", "plain-c"])
def instruction_set_build(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    """The native kernels built by this machine's compiler told to leave out AVX-512, then AVX2 (SIMD width 8, then
    1), loaded; skips where the compiler does not take the flags or gives another width (not x86-64)."""
    from unimem_bench.methods.engine import native

    flags, width = request.param
    path = native.build(tmp_path_factory.mktemp("native"), f"cc {flags}")
    if path is None:
        pytest.skip(f"this compiler does not take {flags} (not x86-64)")
    lib = native.load(path)
    if lib.simd_width() != width:
        pytest.skip(f"{flags} gave a build of SIMD width {lib.simd_width()} here")
    return lib
