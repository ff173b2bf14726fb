"""Spectral task merging, exact in factor space: TSV-Merge, Iso-C and Iso-CTS.

Notation: `D_i = B_i A_i` (canonical factors, LoRA scaling folded into `B_i`), weights `w_i`, `k` adapters,
`M = sum(w_i D_i)`. One QR pair of the stacked factors (`FactoredSpan`: `[B_1 ... B_k] = Q_b R_b`,
`[A_1; ...; A_k]^T = Q_a R_a`) puts every `w_i D_i`, `M` and their projections in `R x R` coordinates; every SVD and
every polar factor (`polar(Q_b X) = Q_b polar(X)`) runs there, and two GEMMs map the result back: the cost is
`O((out + in) R^2 + R^3)` per module and no `out x in` matrix is formed.

- TSV-Merge (Gargiulo et al., CVPR 2025, arXiv 2412.00081): per adapter `D_i = U_i S_i V_i^T`, the top
  `ceil(keep * r_i)` triplets kept, `U = [U_1' ... U_k']` and `V = [V_1' ... V_k']` decorrelated by their polar
  factors, result `U_perp blockdiag(w_i S_i') V_perp^T`.
- Iso-C (Marczak et al., ICML 2025, arXiv 2502.04959): `M = U S V^T` over its numerical rank, result
  `mean(S) U V^T` (an isotropic spectrum).
- Iso-CTS (same paper): the common subspace is the top `c` singular directions of `M`; each `w_i D_i` projected off
  it, `(I - U_c U_c^T) w_i D_i`, contributes its top `s` singular directions; all directions are concatenated,
  decorrelated by their polar factors and given the mean of their singular values.

Truncation (`svd_rank`): TSV's result is truncated optimally (Eckart-Young), as for the other types. An isotropic
result has all singular values equal, so every rank-`r` piece of it is an optimal truncation: Iso-C and Iso-CTS keep
the `r` directions whose singular values were the largest before the spectrum was flattened (for Iso-C: the top `r`
directions of `M`), each still at the level `mean(S)` of the untruncated result.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..plugins.contract import LowRankDelta
from .factor_math import FactoredSpan, core_svd, polar_factor

__all__ = ["IsotropicResult", "common_space_size", "iso_c_factors", "iso_cts_factors", "kept_triplets", "tsv_factors"]


@dataclass(frozen=True)
class IsotropicResult:
    """An isotropic merge `level * U_perp V_perp^T` and how it was built.

    Args:
        delta (`LowRankDelta`): The merged factors.
        level (`float`): The common singular value `mean(S)`.
        common_rank (`int`): The size of the common subspace (Iso-C: the numerical rank of `M`).
        task_rank (`int`): Directions added per adapter (Iso-CTS), 0 for Iso-C.
    """

    delta: LowRankDelta
    level: float
    common_rank: int
    task_rank: int


def kept_triplets(keep: float, rank: int) -> int:
    """`ceil(keep * rank)` (at least 1, at most `rank`; 0 for a zero delta). A relative `1e-9` guard keeps float
    rounding from adding a triplet (`(1/3) * 6` is `2.0000000000000004`)."""
    if rank == 0:
        return 0
    return min(rank, max(1, math.ceil(keep * rank * (1 - 1e-9))))


def _blocks(span: FactoredSpan, weights: Sequence[float]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each `w_i D_i` in the span's coordinates: `(w_i R_b[:, i], R_a[:, i])`, so that
    `w_i D_i = Q_b (w_i R_b[:, i]) R_a[:, i]^T Q_a^T`."""
    blocks, start = [], 0
    for rank, weight in zip(span.ranks, weights, strict=True):
        blocks.append((span.r_b[:, start : start + rank] * weight, span.r_a[:, start : start + rank]))
        start += rank
    return blocks


def _small_svd(
    r_b: torch.Tensor, r_a: torch.Tensor, span: FactoredSpan, noise_from: torch.Tensor | None = None
) -> tuple[torch.Tensor, ...]:
    """The thin SVD of `Q_b r_b r_a^T Q_a^T` in the span's coordinates (`u`, `s`, `vh` of the small core), at its
    numerical rank (see `core_svd` for `noise_from`): the singular vectors of the module-sized matrix are `Q_b u`
    and `vh Q_a^T`."""
    u, s, vh, rank = core_svd(r_b, r_a, span.shape, noise_from)
    return u[:, :rank], s[:rank], vh[:rank]


def tsv_factors(deltas: Sequence[LowRankDelta], weights: Sequence[float], keep: float) -> tuple[LowRankDelta, int]:
    """TSV-Merge: `U_perp blockdiag(w_i S_i') V_perp^T` as factors `(U_perp diag(w S'), V_perp^T)`.

    Each adapter keeps `kept_triplets(keep, r_i)` triplets of `D_i` (`r_i` its numerical rank); a negative weight
    negates its block. The result has rank at most `K = sum` of the kept counts.

    Returns:
        `tuple[LowRankDelta, int]`: The merged factors (not yet compressed) and `K`.
    """
    span = FactoredSpan.from_deltas(deltas)
    lefts, rights, values = [], [], []
    for (r_b, r_a), weight in zip(_blocks(span, [1.0] * len(deltas)), weights, strict=True):
        u, s, vh = _small_svd(r_b, r_a, span)
        count = kept_triplets(keep, s.numel())
        lefts.append(u[:, :count])
        rights.append(vh[:count])
        values.append(s[:count] * weight)
    total = sum(v.numel() for v in values)
    if total == 0:
        return _zero(deltas[0]), 0
    left = span.q_b @ (polar_factor(torch.cat(lefts, dim=1)) * torch.cat(values))
    right = polar_factor(torch.cat(rights, dim=0).T)
    return LowRankDelta(left, right.T @ span.q_a.T), total


def _isotropic(
    span: FactoredSpan, left: torch.Tensor, right: torch.Tensor, values: torch.Tensor, max_rank: int | None
) -> tuple[LowRankDelta, float]:
    """`mean(values) * Q_b polar(left) polar(right)^T Q_a^T` (`left`, `right`: columns in the span's coordinates),
    keeping the `max_rank` columns of largest `values` first."""
    level = float(values.mean())
    left_perp, right_perp = polar_factor(left), polar_factor(right)
    if max_rank is not None and values.numel() > max_rank:
        order = torch.argsort(values, descending=True, stable=True)[:max_rank]
        left_perp, right_perp = left_perp[:, order], right_perp[:, order]
    root = math.sqrt(level)
    return LowRankDelta(span.q_b @ (left_perp * root), (right_perp * root).T @ span.q_a.T), level


def iso_c_factors(deltas: Sequence[LowRankDelta], weights: Sequence[float], max_rank: int | None) -> IsotropicResult:
    """Iso-C: `mean(S) U V^T` for the thin SVD `M = U S V^T` at the numerical rank of `M` (truncated to the top
    `max_rank` directions of `M` when given). A zero `M` gives a zero delta."""
    span = FactoredSpan.from_deltas(deltas)
    blocks = _blocks(span, weights)
    u, s, vh = _small_svd(torch.cat([r_b for r_b, _ in blocks], dim=1), span.r_a, span)
    if s.numel() == 0:
        return IsotropicResult(_zero(deltas[0]), 0.0, 0, 0)
    level = float(s.mean())
    count = s.numel() if max_rank is None else min(s.numel(), max_rank)
    root = math.sqrt(level)  # already an SVD: no polar step needed
    delta = LowRankDelta(span.q_b @ (u[:, :count] * root), (vh[:count] * root) @ span.q_a.T)
    return IsotropicResult(delta, level, s.numel(), 0)


def common_space_size(total: int, fraction: float, tasks: int) -> tuple[int, int]:
    """The paper's split of `total` directions: `c = int(total * fraction)` common ones, then the task-specific
    remainder rounded to a multiple of `tasks` (`round((total - c) / tasks) * tasks`) and `c` adjusted to match
    (at least 0).

    Returns:
        `tuple[int, int]`: The common size `c` and the directions per task `s`.
    """
    common = int(total * fraction)
    per_task = round((total - common) / tasks) if tasks else 0
    return max(0, total - per_task * tasks), per_task


def iso_cts_factors(
    deltas: Sequence[LowRankDelta], weights: Sequence[float], common_space_fraction: float, max_rank: int | None
) -> IsotropicResult:
    """Iso-CTS in factor space.

    The total size is `T = min(out, in, sum of the numerical ranks of the w_i D_i)` (what `M` can span; the paper's
    dense matrices use `min(out, in)`), split by `common_space_size` over the `t` adapters with a non-zero
    `w_i D_i`. The common directions are the top `c` singular triplets of `M` (fewer if `M` has lower rank); each
    `(I - U_c U_c^T) w_i B_i A_i` adds its top `s` triplets. Result: `mean(S*) polar(U*) polar(V*)^T` over all kept
    triplets `S*`. Everything after one QR pair of the stacked factors runs on `R x R` matrices.
    """
    span = FactoredSpan.from_deltas(deltas)
    blocks = _blocks(span, weights)
    ranks = [_small_svd(r_b, r_a, span)[1].numel() for r_b, r_a in blocks]  # 0 for a zero weight
    active = [block for block, rank in zip(blocks, ranks, strict=True) if rank > 0]
    out_features, in_features = span.shape
    total = min(out_features, in_features, sum(ranks))
    u, s, vh = _small_svd(torch.cat([r_b for r_b, _ in blocks], dim=1), span.r_a, span)
    if s.numel() == 0 or not active:
        return IsotropicResult(_zero(deltas[0]), 0.0, 0, 0)
    common, per_task = common_space_size(total, common_space_fraction, len(active))
    common = min(common, s.numel())
    basis = u[:, :common]
    lefts, rights, values = [basis], [vh[:common].T], [s[:common]]
    for r_b, r_a in active:
        # (I - U_c U_c^T) w_i D_i; what the projection leaves of a task inside the common subspace is noise
        task_u, task_s, task_vh = _small_svd(r_b - basis @ (basis.T @ r_b), r_a, span, noise_from=r_b)
        lefts.append(task_u[:, :per_task])
        rights.append(task_vh[:per_task].T)
        values.append(task_s[:per_task])
    delta, level = _isotropic(span, torch.cat(lefts, dim=1), torch.cat(rights, dim=1), torch.cat(values), max_rank)
    return IsotropicResult(delta, level, common, per_task)


def _zero(like: LowRankDelta) -> LowRankDelta:
    out_features, in_features = like.shape
    return LowRankDelta(like.B.new_zeros(out_features, 1), like.A.new_zeros(1, in_features))
