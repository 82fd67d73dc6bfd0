"""`section.field=value` overrides checked against the config's field types before any method config is built, so
`--set reading.window=abc` fails in one line naming the field and the type it takes."""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Iterable

import yaml

from unimem_bench.methods import ConfigError, UniMemConfig

_KINDS = {int: "an integer", float: "a number", bool: "true or false"}


def check_override_types(overrides: Iterable[str]) -> None:
    """Raise ConfigError for an override whose value is not YAML, or not of its field's scalar type (int, float,
    bool); names, sections and value ranges are left to the config's own validation."""
    sections = typing.get_type_hints(UniMemConfig)
    for item in overrides:
        key, sep, raw = item.partition("=")
        section, _, name = key.strip().partition(".")
        kind = sections.get(section)
        if not sep or not dataclasses.is_dataclass(kind):
            continue
        field = typing.get_type_hints(kind).get(name)
        if field not in _KINDS:
            continue
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            raise ConfigError(f"--set {item!r}: the value is not valid YAML; {section}.{name} takes "
                              f"{_KINDS[field]}") from None
        if field is bool:
            fits = isinstance(value, bool)
        else:  # YAML's true/false are not numbers here
            fits = not isinstance(value, bool) and isinstance(value, int | float if field is float else int)
        if not fits:
            raise ConfigError(f"--set {item!r}: {section}.{name} takes {_KINDS[field]}, not {value!r}")
