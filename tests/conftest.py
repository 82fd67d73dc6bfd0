"""Fixtures: a tiny random LLaMA, and the ../shared assets (tests needing them skip when it is absent)."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import BOOKS, STORIES, tiny_llama
from transformers import LlamaForCausalLM


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """The hub endpoint points at a closed local port: a test never reaches the network, even on a machine that has
    one, and hub lookups fail at once as they do offline."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")


@pytest.fixture
def model() -> LlamaForCausalLM:
    return tiny_llama()


@pytest.fixture(scope="session")
def stories_dir() -> Path:
    if not (STORIES / "config.json").exists():
        pytest.skip(f"../shared is absent: {STORIES} not found")
    return STORIES


@pytest.fixture(scope="session")
def books_dir() -> Path:
    if not BOOKS.is_dir():
        pytest.skip(f"../shared is absent: {BOOKS} not found")
    return BOOKS
