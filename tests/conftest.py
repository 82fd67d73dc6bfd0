"""Fixtures: a tiny random LLaMA, and the ../shared assets (tests needing them skip when it is absent)."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import BOOKS, STORIES, tiny_llama
from transformers import LlamaForCausalLM


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
