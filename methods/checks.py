"""What every dimension's validation shares: the one-line ConfigError, choice and sign checks, layer lists."""

from __future__ import annotations

import typing


class ConfigError(ValueError):
    """A configuration that cannot run; the message is one line naming the problem and the fix."""


def check_choice(name: str, value: object, kind: object) -> None:
    """Raise ConfigError unless `value` is one of the Literal `kind`'s choices."""
    choices = typing.get_args(kind)
    if value not in choices:
        raise ConfigError(f"{name}={value!r} is not one of {', '.join(map(repr, choices))}")


def check_nonneg(**values: int) -> None:
    """Raise ConfigError for the first negative value, named by its keyword."""
    for name, value in values.items():
        if value < 0:
            raise ConfigError(f"{name}={value} must be >= 0")


def parse_layers(spec: object) -> tuple[int, ...]:
    """`2,5` / `12-21` / `0,4-6` / a sequence of ints -> a sorted tuple of distinct 0-based indices."""
    if isinstance(spec, int):
        items: list[object] = [spec]
    elif isinstance(spec, str):
        items = [part.strip() for part in spec.split(",") if part.strip()]
    else:
        items = list(spec)  # type: ignore[call-overload]
    out: set[int] = set()
    for item in items:
        text = str(item)
        lo, dash, hi = text.partition("-")
        try:
            span = range(int(lo), int(hi) + 1) if dash else range(int(lo), int(lo) + 1)
        except ValueError:
            raise ConfigError(f"injection.layers: {text!r} is not a layer index or range like 12-21") from None
        if not span or span.start < 0:
            raise ConfigError(f"injection.layers: {text!r} is not a non-empty range of indices >= 0")
        out.update(span)
    if not out:
        raise ConfigError("injection.layers is empty: give `all`, indices like 2,5 or a range like 12-21")
    return tuple(sorted(out))


def format_layers(layers: tuple[int, ...] | str) -> str:
    """The inverse of `parse_layers`, compressing runs: (0, 4, 5, 6) -> `0,4-6`."""
    if isinstance(layers, str):
        return layers
    runs: list[list[int]] = []
    for i in layers:
        if runs and i == runs[-1][1] + 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)
