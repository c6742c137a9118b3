"""Config value checks: each names the key and what it must be.

    checks.integer(0, "train.epochs", 1)
    # ValueError: train.epochs must be an integer >= 1, got 0.
"""

from __future__ import annotations

import math
import os


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


def increasing_fractions(value, key: str) -> tuple[float, ...]:
    """A sequence of increasing numbers in (0, 1] (fractions of a run)."""
    ok = isinstance(value, (tuple, list)) and all(is_number(v) and 0 < v <= 1 for v in value)
    if not ok or list(value) != sorted(value):
        raise ValueError(f"{key} must be increasing fractions in (0, 1], got {value!r}.")
    return tuple(float(v) for v in value)


# What one training image costs at least, per input pixel: the float32 input
# (12 bytes) and the first convolution's output kept for the backward pass
# (32 channels at half the side: 32 bytes). Every backbone here holds more.
MIN_TRAIN_BYTES_PER_PIXEL = 12 + 32


def image_size(size: int, backbone: str, low: int, default: int, batch: int,
               workers: int = 1, memory_bytes: int | None = None) -> int:
    """`model.image_size` within the backbone's limits, and a batch that can fit.

    Args:
        size: the resolved side (the default already put in for 0).
        backbone, low, default: the backbone's name, `min_size` and
            `default_size`, for the message.
        batch: `train.global_batch_size`; a host holds `batch / workers`.
        memory_bytes: the host's memory (default: this machine's).

    Raises:
        ValueError: a side the backbone cannot take, or a batch whose lower
            bound of memory (`MIN_TRAIN_BYTES_PER_PIXEL`) exceeds the host's.
    """
    if size < low:
        raise ValueError(
            f"model.image_size={size} is too small for backbone '{backbone}': it needs "
            f"{low} to 4096 (0 = its default {default})."
        )
    if memory_bytes is None:
        memory_bytes = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    per_host = -(-batch // max(1, workers))
    need = per_host * size * size * MIN_TRAIN_BYTES_PER_PIXEL
    if need > memory_bytes:
        raise ValueError(
            f"model.image_size={size} with train.global_batch_size={batch} needs at least "
            f"{need / 2**30:,.0f} GiB for one training batch{' per host' if workers > 1 else ''}, "
            f"this machine has {memory_bytes / 2**30:,.0f} GiB: lower either "
            "(optimizer.accumulation_steps keeps the effective batch)."
        )
    return size
