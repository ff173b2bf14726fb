"""The built-in combination types, registered through the same hook as any third-party plugin.

All four work in factor space: their cost is `O((out + in) R^2 + R^3)` per module and they never form a dense delta.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ..errors import CombinationError, MergeInputError
from ..lowrank.factor_math import FactoredSpan, karcher_coefficients, slerp_coefficients
from ..plugins.contract import LowRankDelta, ModuleContext
from ..plugins.hookspecs import hookimpl
from .builtin_task_methods import register_task_merging_types
from .validation import check_non_negative, check_not_all_zero

__all__ = ["average", "karcher", "register_combination_types", "resolve_t", "slerp", "weighted"]


def _finish(span: FactoredSpan, coefficients: Sequence[float], context: ModuleContext) -> LowRankDelta:
    merged, stats = span.combine(coefficients, context.svd_rank)
    context.record(rank=stats.rank, numerical_rank=stats.numerical_rank, energy_kept=stats.energy_kept)
    return merged


def weighted(deltas: Sequence[LowRankDelta], weights: Sequence[float], context: ModuleContext) -> LowRankDelta:
    """`sum(w_i D_i)` with the weights exactly as given (negative weights subtract)."""
    return _finish(FactoredSpan.from_deltas(deltas), weights, context)


def _validate_weighted(weights: list[float], options: dict[str, Any]) -> None:
    check_not_all_zero("weighted", weights)


def _validate_average(weights: list[float], options: dict[str, Any]) -> None:
    if math.isclose(sum(weights), 0.0, abs_tol=1e-12):
        raise MergeInputError(
            f"combination_type='average' normalizes the weights to sum 1, but {weights} sum to 0; give weights with "
            "a non-zero sum, or use 'weighted' for raw coefficients."
        )


def average(deltas: Sequence[LowRankDelta], weights: Sequence[float], context: ModuleContext) -> LowRankDelta:
    """`sum(w_i D_i) / sum(w_i)`: equal weights give the plain mean."""
    total = sum(weights)
    return _finish(FactoredSpan.from_deltas(deltas), [w / total for w in weights], context)


def _check_t_value(value: Any, where: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) <= 1.0:
        raise MergeInputError(f"slerp: t{where} must be a number between 0 and 1, got {repr(value)[:100]}.")


def _check_t(t: Any) -> None:
    if t is None:
        return
    if isinstance(t, Mapping):
        if not t:
            raise MergeInputError("slerp: a t dict needs at least one entry, e.g. {'self_attn': 0.3, 'default': 0.5}.")
        if "default" not in t:
            # Checked here, before any work: `resolve_t` would only find out at the first module no key matches.
            keys = ", ".join(repr(key)[:50] for key in list(t)[:10])
            raise CombinationError(
                f"slerp: the t dict ({keys}) has no 'default' entry for the modules none of its keys matches; add "
                "one, e.g. {'self_attn': 0.3, 'default': 0.5}."
            )
        for key, value in t.items():
            if not isinstance(key, str):
                raise MergeInputError(f"slerp: t dict keys must be module-name substrings, got {key!r}.")
            _check_t(value) if isinstance(value, (list, tuple)) else _check_t_value(value, f"[{key!r}]")
        return
    if isinstance(t, (list, tuple)):
        if not t:
            raise MergeInputError("slerp: a t list needs at least one anchor value.")
        for value in t:
            _check_t_value(value, " anchors")
        return
    _check_t_value(t, "")


def _interpolate_anchors(anchors: Sequence[float], position: float | None) -> float:
    if len(anchors) == 1:
        return float(anchors[0])
    if position is None:
        return float(anchors[0])
    scaled = position * (len(anchors) - 1)
    low = min(math.floor(scaled), len(anchors) - 2)
    fraction = scaled - low
    return float(anchors[low]) * (1.0 - fraction) + float(anchors[low + 1]) * fraction


def resolve_t(t: Any, weights: Sequence[float], context: ModuleContext) -> float:
    """The SLERP factor for one module.

    Args:
        t: `None` (use `w_2 / (w_1 + w_2)`), a float, a list of anchors interpolated linearly over depth
            (`layer_index / (num_layers - 1)`; modules outside numbered blocks take the first anchor), or a dict
            mapping module-name substrings to a float or a list, the first matching key winning, `"default"` for
            the rest (required: a dict without it is refused before any work).
        weights: The two adapter weights.
        context: The module's context.
    """
    if t is None:
        return float(weights[1]) / float(weights[0] + weights[1])
    if isinstance(t, Mapping):
        for key, value in t.items():
            if key != "default" and key in context.name:
                return resolve_t(value, weights, context)
        if "default" in t:
            return resolve_t(t["default"], weights, context)
        raise CombinationError(
            f"slerp: no key of the t dict ({', '.join(map(repr, t))}) matches module {context.name!r}; add a "
            "'default' entry."
        )
    if isinstance(t, (list, tuple)):
        return _interpolate_anchors(t, context.depth)
    return float(t)


def _validate_slerp(weights: list[float], options: dict[str, Any]) -> None:
    if len(weights) != 2:
        raise MergeInputError(f"combination_type='slerp' interpolates exactly 2 adapters, got {len(weights)}.")
    check_non_negative("slerp", weights)
    _check_t(options.get("t"))


def slerp(
    deltas: Sequence[LowRankDelta], weights: Sequence[float], context: ModuleContext, t: Any = None
) -> LowRankDelta:
    """Spherical interpolation `sin((1-t) theta)/sin(theta) D_1 + sin(t theta)/sin(theta) D_2`."""
    factor = resolve_t(t, weights, context)
    span = FactoredSpan.from_deltas(deltas)
    coefficients, theta = slerp_coefficients(span.gram(), factor)
    context.record(t=factor, theta_degrees=None if theta is None else math.degrees(theta))
    return _finish(span, coefficients, context)


def _validate_karcher(weights: list[float], options: dict[str, Any]) -> None:
    if len(weights) < 2:
        raise MergeInputError(f"combination_type='karcher' needs at least 2 adapters, got {len(weights)}.")
    check_non_negative("karcher", weights)
    tol, max_iter = options.get("tol"), options.get("max_iter")
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not tol > 0:
        raise MergeInputError(f"karcher: tol must be a positive number, got {tol!r}.")
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
        raise MergeInputError(f"karcher: max_iter must be a positive integer, got {max_iter!r}.")


def karcher(
    deltas: Sequence[LowRankDelta],
    weights: Sequence[float],
    context: ModuleContext,
    tol: float = 1e-10,
    max_iter: int = 100,
) -> LowRankDelta:
    """Weighted Karcher mean of the directions `D_i / |D_i|` on the sphere, rescaled by the mean norm."""
    total = sum(weights)
    normalized = [w / total for w in weights]
    span = FactoredSpan.from_deltas(deltas)
    result = karcher_coefficients(span.gram().to(torch.float64), normalized, tol=tol, max_iter=max_iter)
    context.record(iterations=result.iterations, converged=result.converged)
    return _finish(span, result.coefficients.tolist(), context)


@hookimpl
def register_combination_types(register: Any) -> None:
    """Register `weighted`, `average`, `slerp`, `karcher` and the task-merging types (`plugins.builtin_task_methods`:
    `core_ties`, `core_dare`, `tsv`, `iso_c`, `iso_cts`, `knots_ties`, `knots_dare`)."""
    register(
        "weighted",
        weighted,
        description="Exact weighted sum of the deltas, sum(w_i * B_i A_i).",
        validate=_validate_weighted,
    )
    register(
        "average",
        average,
        description="Exact weighted mean of the deltas, weights normalized to sum 1.",
        validate=_validate_average,
    )
    register(
        "slerp",
        slerp,
        description="Spherical interpolation of two deltas; t from the weights, a float, a depth schedule or a dict.",
        validate=_validate_slerp,
    )
    register(
        "karcher",
        karcher,
        description="Weighted Karcher (Riemannian) mean of the delta directions, scaled by the mean norm.",
        validate=_validate_karcher,
    )
    register_task_merging_types(register)
