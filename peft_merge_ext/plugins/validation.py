"""Checks of weights and options shared by the built-in combination types' `validate` functions."""

from __future__ import annotations

import math
from typing import Any

from ..errors import MergeInputError

__all__ = ["check_adapter_count", "check_fraction", "check_non_negative", "check_not_all_zero"]


def check_non_negative(name: str, weights: list[float]) -> None:
    """Refuse negative weights and all-zero weights for a type where subtracting an adapter has no meaning."""
    if any(w < 0 for w in weights):
        raise MergeInputError(
            f"combination_type={name!r} needs non-negative weights, got {weights}; use 'weighted' to subtract "
            "adapters."
        )
    if not any(w > 0 for w in weights):
        raise MergeInputError(f"combination_type={name!r} needs at least one positive weight, got {weights}.")


def check_not_all_zero(name: str, weights: list[float]) -> None:
    """Refuse weights that are all 0 (the merged adapter would be zero)."""
    if not any(weights):
        raise MergeInputError(
            f"combination_type={name!r} got weights that are all 0 ({weights}): the merged adapter would be zero. "
            "Give at least one non-zero weight."
        )


def check_adapter_count(name: str, weights: list[float], minimum: int = 2) -> None:
    """Refuse fewer than `minimum` adapters."""
    if len(weights) < minimum:
        raise MergeInputError(
            f"combination_type={name!r} merges at least {minimum} adapters, got {len(weights)}; pass more adapters, "
            "or merge a single adapter without a combination type."
        )


def check_fraction(name: str, option: str, value: Any, *, allow_zero: bool = False) -> None:
    """Refuse an option that is not a number in `(0, 1]` (`[0, 1]` with `allow_zero`); bools are not numbers."""
    interval = "[0, 1]" if allow_zero else "(0, 1]"
    number = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
    if not number or not (0 <= value <= 1 if allow_zero else 0 < value <= 1):
        raise MergeInputError(
            f"combination_type={name!r}: {option} must be a number in {interval}, got {value!r:.100}; e.g. "
            f"{option}=0.5."
        )
