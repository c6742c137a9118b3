"""Config value checks: each names the key and what it must be.

    checks.integer(0, "train.epochs", 1)
    # ValueError: train.epochs must be an integer >= 1, got 0.
"""

from __future__ import annotations

import math


def is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def integer(value, key: str, low: int, high: int | None = None, note: str = "") -> int:
    if not is_int(value) or value < low or (high is not None and value > high):
        bound = f"in [{low}, {high}]" if high is not None else f">= {low}"
        raise ValueError(f"{key} must be an integer {bound}{note}, got {value!r}.")
    return value


def number(value, key: str, low: float, high: float = math.inf, *, open_low=False,
           open_high=False, note: str = "") -> float:
    ok = is_number(value) and (value > low if open_low else value >= low) and (
        value < high if open_high else value <= high)
    if not ok:
        left, right = "(" if open_low else "[", ")" if open_high else "]"
        bound = f"in {left}{low:g}, {high:g}{right}" if high != math.inf else (
            f"> {low:g}" if open_low else f">= {low:g}")
        raise ValueError(f"{key} must be a number {bound}{note}, got {value!r}.")
    return float(value)


def boolean(value, key: str) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{key} must be True or False, got {value!r}.")
    return value


def choice(value, key: str, choices) -> str:
    if value not in choices:
        raise ValueError(f"Unknown {key} {value!r}. Choose one of: {', '.join(choices)}.")
    return value


def text(value, key: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{key} must be a string, got {value!r}.")
    return value
