"""The UniMem config: validation, YAML round trips, overrides, layer specs, method presets."""

from __future__ import annotations

import pytest

from unimem_bench.methods import METHODS, PAPER_CONTEXT, ConfigError, MethodContext, UniMemConfig
from unimem_bench.methods.config import Injection, Management, Reading, Writing, format_layers, parse_layers


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"reading": Reading(topk=8)}, "reading.topk=8 needs memory"),
    ({"management": Management(size=8), "writing": Writing(kv="direct"), "reading": Reading(window=16)},
     "larger than management.size=8"),
    ({"management": Management(size=8), "reading": Reading(window=8)}, "set writing.kv=direct"),
    ({"management": Management(size=8), "writing": Writing(kv="direct")}, "nothing reads it"),
])
def test_contradictory_dimensions_fail_in_one_line(kwargs, message):
    with pytest.raises(ConfigError, match=message) as info:
        UniMemConfig(**kwargs)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("bad", [
    lambda: Management(size=-1), lambda: Management(overflow="lru"), lambda: Writing(kv="copy"),
    lambda: Writing(pool_ratio=1), lambda: Reading(read_all=True, window=4), lambda: Reading(index="annoy"),
])
def test_bad_field_values_are_rejected(bad):
    with pytest.raises(ConfigError):
        bad()


def test_injection_is_validated_against_model_depth():
    config = METHODS.get("memorizing_transformer").config(MethodContext(22, 2048, 2048))
    assert config.bind(n_layers=22, segment_len=2048) == (11, 21)
    with pytest.raises(ConfigError, match="names layer 11 but the model has 5 layers"):
        config.bind(n_layers=5, segment_len=2048)


def test_layer_specs_parse_and_format():
    assert parse_layers("0,4-6") == (0, 4, 5, 6)
    assert parse_layers([3, 1, 3]) == (1, 3)
    assert format_layers((0, 4, 5, 6)) == "0,4-6"
    assert Injection("12-21").resolve(22) == tuple(range(12, 22))
    for bad in ("", "a", "5-2", "-1"):
        with pytest.raises(ConfigError):
            parse_layers(bad)


@pytest.mark.parametrize("name", METHODS.names())
def test_every_preset_round_trips_through_yaml(name):
    config = METHODS.get(name).config(PAPER_CONTEXT)
    assert UniMemConfig.from_yaml(config.to_yaml()) == config


def test_overrides_change_one_field_and_revalidate():
    base = METHODS.get("memorizing_transformer").config(PAPER_CONTEXT)
    changed = base.with_overrides(["reading.topk=8", "injection.layers=1-3", "reading.index=faiss-flat"])
    assert (changed.reading.topk, changed.injection.layers, changed.reading.index) == (8, (1, 2, 3), "faiss-flat")
    assert changed.management == base.management
    with pytest.raises(ConfigError, match="needs memory"):
        base.with_overrides(["management.size=0"])
    for bad, message in (("reading.topk", "section.field=value"), ("memory.size=3", "unknown section"),
                         ("reading.k=3", "has no field 'k'")):
        with pytest.raises(ConfigError, match=message):
            base.with_overrides([bad])


def test_presets_scale_with_model_and_segment():
    ctx = MethodContext(n_layers=5, segment_len=256, trained_context=512)
    xl = METHODS.get("transformer_xl").config(ctx)
    assert (xl.management.size, xl.reading.window) == (256, 256)
    unimix = METHODS.get("unimix").config(ctx)
    assert unimix.injection.layers == (2, 3, 4)
    assert unimix.writing.memory_tokens == 5  # 40 per 2,048 tokens
    assert unimix.management.size == 10 * 256  # K/V slots only: the memory tokens are not counted again
    paper = METHODS.get("unimix").config(PAPER_CONTEXT)
    # Table 2: 20,520 = 20,480 K/V tokens + 40 compressed tokens.
    assert (paper.management.size, paper.reading.topk, paper.writing.memory_tokens) == (20_480, 4, 40)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"chunk_size": 4, "topk": 6}, "multiple of it"),
    ({"chunk_size": 4}, "multiple of it"),
    ({"chunk_size": 4, "topk": 8, "index": "faiss-flat"}, "reading.index=torch"),
    ({"chunk_size": 4, "topk": 8, "chunk_key": "max"}, "reading.chunk_key"),
])
def test_chunk_retrieval_values_are_validated(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        Reading(**kwargs)
