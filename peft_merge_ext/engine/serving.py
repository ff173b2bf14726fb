"""Serving-ready combined adapters: rank by energy (`svd_energy`) and one rank for every module (`uniform_rank`).

`svd_energy=e` keeps, per module, the smallest rank whose singular values hold the fraction `e` of the merged delta's
energy `sum(S^2)`, read from the factor-space SVD (`lowrank.factor_math.compress`), never from a dense matrix.
`uniform_rank` then gives every module of the adapter the same rank: the smallest value of a list (by default the
values vLLM accepts for `--max-lora-rank`) that is at least the largest rank any module needs; modules that need less
are padded with zero directions (zero columns of `B`, zero rows of `A`: the delta is unchanged). The adapter then has
a single `r`, no `rank_pattern` / `alpha_pattern`, scaling 1, no bias, DoRA or `modules_to_save`, as vLLM requires.

Both are read out of a merge's options by `pop_serving_options` (so every entry point that takes a type's options
takes them too), validated there, and recorded in the merge report, the lineage, the card and the recipe like any
option.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import MutableMapping, Sequence
from typing import Any

from ..errors import MergeInputError, short_repr

__all__ = [
    "SERVING_OPTIONS",
    "VLLM_MAX_LORA_RANKS",
    "check_serving_target",
    "pad_delta",
    "pop_serving_options",
    "snap_to_uniform_rank",
]

# vLLM's `LoRAConfig.max_lora_rank` is a closed set (`MaxLoRARanks` in vllm/config/lora.py); an adapter of rank r
# needs a server started with `--max-lora-rank` >= r.
VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
SERVING_OPTIONS = ("svd_energy", "uniform_rank")


def _quote(value: Any) -> str:
    return short_repr(value, 80)


def _check_energy(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise MergeInputError(f"svd_energy must be a number in (0, 1], got {_quote(value)}; e.g. svd_energy=0.99.")
    if not 0.0 < float(value) <= 1.0:
        raise MergeInputError(
            f"svd_energy must be in (0, 1] (the fraction of each module's energy sum(S^2) to keep), got {value!r}."
        )
    return float(value)


def _check_ranks(value: Any) -> tuple[int, ...] | None:
    if value is None or value is False:
        return None
    if value is True or value == "vllm":
        return VLLM_MAX_LORA_RANKS
    items = [value] if isinstance(value, int) and not isinstance(value, bool) else value
    if isinstance(items, (str, bytes)) or not isinstance(items, Sequence) or not items:
        raise MergeInputError(
            f"uniform_rank must be true (the ranks vLLM accepts: {', '.join(map(str, VLLM_MAX_LORA_RANKS))}) or a "
            f"list of allowed ranks, got {_quote(value)}."
        )
    for rank in items:
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise MergeInputError(f"uniform_rank must list positive integers, got {_quote(rank)} in {_quote(value)}.")
    return tuple(sorted(set(items)))


def pop_serving_options(
    options: MutableMapping[str, Any], svd_rank: int | None
) -> tuple[float | None, tuple[int, ...] | None]:
    """Remove `svd_energy` and `uniform_rank` from a merge's options and validate them.

    `uniform_rank` accepts `True` (the ranks vLLM accepts for `--max-lora-rank`), one rank, or a list of ranks.

    Returns:
        `tuple[float | None, tuple[int, ...] | None]`: The energy fraction and the sorted allowed ranks.

    Raises:
        `MergeInputError`: For a value out of range, or an `svd_rank` above every allowed uniform rank.
    """
    energy = _check_energy(options.pop("svd_energy", None))
    ranks = _check_ranks(options.pop("uniform_rank", None))
    if ranks is not None and svd_rank is not None and svd_rank > ranks[-1]:
        raise MergeInputError(
            f"svd_rank={svd_rank} is above the largest uniform rank {ranks[-1]}: lower svd_rank to at most "
            f"{ranks[-1]}, or add a larger rank to uniform_rank."
        )
    return energy, ranks


def check_serving_target(request: Any, merge_into_base: bool) -> None:
    """Refuse `uniform_rank` for a merged model (it shapes an adapter; a merged model has no rank)."""
    if request.uniform_rank is not None and merge_into_base:
        raise MergeInputError(
            "uniform_rank shapes a combined adapter for serving; with merge_into_base=True there is no adapter. "
            "Pass merge_into_base=False (CLI: --adapter-only), or drop uniform_rank (svd_energy works for both)."
        )


def pad_delta(delta: Any, rank: int) -> Any:
    """`delta` with zero directions appended up to `rank` (zero columns of `B`, zero rows of `A`): the same matrix."""
    from ..plugins.contract import LowRankDelta

    missing = rank - delta.rank
    if missing <= 0:
        return delta
    b = delta.B.new_zeros(delta.B.shape[0], rank)
    a = delta.A.new_zeros(rank, delta.A.shape[1])
    b[:, : delta.rank] = delta.B
    a[: delta.rank] = delta.A
    return LowRankDelta(b, a)


def snap_to_uniform_rank(merged: list[Any], request: Any, report: Any) -> list[Any]:
    """Give every module of a combined adapter the same rank: the smallest allowed rank (`request.uniform_rank`) at
    least the largest merged rank, zero-padding the others. Records `rank` (what is saved) and `content_rank` (the
    rank before padding) in the report.

    Args:
        merged (`list[MergedModule]`): Every module's merged factors.
        request (`MergeRequest`): The request (its `uniform_rank`).
        report (`ReportBuilder`): Where the per-module statistics are kept.

    Returns:
        `list[MergedModule]`: The modules with padded factors.

    Raises:
        `MergeInputError`: When a module needs a rank above every allowed one.
    """
    allowed = request.uniform_rank
    needed = max((m.delta.rank for m in merged), default=1)
    fitting = [rank for rank in allowed if rank >= needed]
    if not fitting:
        worst = max(merged, key=lambda m: m.delta.rank).module.name
        raise MergeInputError(
            f"Module {worst!r} needs rank {needed}, above the largest uniform rank {allowed[-1]}: pass "
            f"svd_rank={allowed[-1]} (best rank-{allowed[-1]} approximation) or svd_energy=<fraction> to truncate, "
            "or allow a larger rank. Nothing was written."
        )
    rank = fitting[0]
    for module in merged:
        stats = report.modules[module.module.name].stats
        stats["content_rank"] = module.delta.rank
        stats["rank"] = rank
    return [dataclasses.replace(m, delta=pad_delta(m.delta, rank)) for m in merged]
