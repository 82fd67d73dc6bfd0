"""The external datastore of kNN-LM / TRIME (`reading.output_datastore`): a corpus of .txt files, tokenized with the
run's tokenizer, read once by the model and cached by content hash (`methods/engine/output_memory.py`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from unimem_bench.harness.models.reference import reference_dir
from unimem_bench.methods import ConfigError, MemoryLM, UniMemConfig
from unimem_bench.methods.engine.output_memory import corpus_datastore
from unimem_bench.tasks.data.corpora import strip_gutenberg
from unimem_bench.tasks.data.files import read_text


def datastore_files(config: UniMemConfig) -> list[Path]:
    """The corpus files of `reading.output_datastore` (none when it is empty); a one-line error when it names
    nothing readable. Runs before any weights load."""
    given = config.reading.output_datastore
    if not given:
        return []
    path = Path(given).expanduser()
    files = [path] if path.is_file() else sorted(path.glob("*.txt")) if path.is_dir() else []
    if not files:
        raise ConfigError(f"reading.output_datastore={given}: no such .txt file or folder of .txt files; give the "
                          "corpus kNN-LM / TRIME should index")
    return files


def attach_datastore(lm: MemoryLM, tokenizer: Any) -> None:
    """Give `lm` the external datastore its config names (built once, then loaded from the cache)."""
    files = datastore_files(lm.config)
    if not files or lm.output is None:
        return
    docs = [torch.tensor(tokenizer(strip_gutenberg(read_text(f)))["input_ids"]) for f in files]
    r = lm.config.reading
    cache = Path(r.output_cache).expanduser() if r.output_cache else reference_dir().parent / "datastores"
    lm.output.external = corpus_datastore(lm.output, lm, docs, cache)
