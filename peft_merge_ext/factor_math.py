"""Exact linear algebra on low-rank deltas, without ever forming a dense `out x in` matrix.

With deltas `D_i = B_i @ A_i` (`B_i`: `m x r_i`, `A_i`: `r_i x n`) and `R = sum(r_i)`:

- `gram_matrix`: `<D_i, D_j>_F = sum((B_i^T B_j) * (A_i A_j^T))`, costing `O((m + n) R^2)`.
- `linear_combination`: `sum(c_i D_i) = [c_1 B_1 ... c_k B_k] @ [A_1; ...; A_k]`, then `compress`.
- `compress`: QR of the stacked `B` and of the stacked `A^T`, SVD of the small `R x R` core: the exact numerical
  rank, or the optimal rank-k truncation (Eckart-Young), with balanced factors `U sqrt(S)`, `sqrt(S) V^T`.
- `slerp_coefficients` / `karcher_coefficients`: spherical interpolation and the spherical (Karcher) mean of the
  deltas, computed on coefficient vectors with the Gram matrix alone; the result stays in the deltas' span.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .contract import LowRankDelta

__all__ = [
    "CompressionStats",
    "KarcherResult",
    "compress",
    "compute_dtype_for",
    "gram_matrix",
    "karcher_coefficients",
    "linear_combination",
    "slerp_coefficients",
]

SLERP_COLINEAR_THRESHOLD = 0.9995


@dataclass(frozen=True)
class CompressionStats:
    """What `compress` kept.

    Args:
        rank (`int`): The output rank.
        numerical_rank (`int`): The exact numerical rank of the input (singular values above the tolerance).
        energy_kept (`float`): `sum(kept S^2) / sum(S^2)`, 1.0 when nothing was truncated.
    """

    rank: int
    numerical_rank: int
    energy_kept: float


@dataclass(frozen=True)
class KarcherResult:
    """Coefficients of a Karcher mean and how the iteration went."""

    coefficients: torch.Tensor
    iterations: int
    converged: bool


def compute_dtype_for(device: torch.device) -> torch.dtype:
    """The dtype factor-space maths runs in: float64, except on backends without it (MPS), which get float32."""
    return torch.float32 if device.type == "mps" else torch.float64


def gram_matrix(deltas: Sequence[LowRankDelta]) -> torch.Tensor:
    """Frobenius inner products `G[i, j] = <B_i A_i, B_j A_j>_F` from the factors alone.

    Args:
        deltas (`Sequence[LowRankDelta]`): The deltas, all of the same `(out, in)` shape.

    Returns:
        `torch.Tensor`: The symmetric `k x k` Gram matrix, in the deltas' dtype.
    """
    k = len(deltas)
    first = deltas[0]
    gram = torch.zeros(k, k, dtype=first.B.dtype, device=first.B.device)
    for i in range(k):
        for j in range(i, k):
            value = ((deltas[i].B.T @ deltas[j].B) * (deltas[i].A @ deltas[j].A.T)).sum()
            gram[i, j] = value
            gram[j, i] = value
    return gram


def _numerical_rank(singular_values: torch.Tensor, size: int, scale: float) -> int:
    if singular_values.numel() == 0 or singular_values[0] <= 0:
        return 0
    tolerance = max(float(singular_values[0]), scale) * size * torch.finfo(singular_values.dtype).eps
    return int((singular_values > tolerance).sum())


def compress(B: torch.Tensor, A: torch.Tensor, max_rank: int | None = None) -> tuple[LowRankDelta, CompressionStats]:
    """Re-factorize `B @ A` to its exact numerical rank, or to the optimal rank `max_rank` if that is lower.

    The tolerance is numpy's `matrix_rank` rule, `S_max * max(out, in, R) * eps(dtype)`, with `S_max` raised to
    `|B|_2 |A|_2` (the scale of the rounding error of the factored product): singular values at most that are treated
    as zero, so that cancellations (such as `D - D`) give rank 0 as a dense computation would, not rank-R noise.
    Cost: `O((out + in) R^2 + R^3)` for `R = B.shape[1]`; `out x in` is never formed.

    Args:
        B (`torch.Tensor`): Left factor `(out, R)`.
        A (`torch.Tensor`): Right factor `(R, in)`.
        max_rank (`int`, *optional*): Upper bound on the output rank (Eckart-Young truncation).

    Returns:
        `tuple[LowRankDelta, CompressionStats]`: Balanced factors `(U sqrt(S), sqrt(S) V^T)` of rank at least 1 (an
        all-zero delta gives rank-1 zero factors) and what was kept.
    """
    if max_rank is not None and max_rank < 1:
        raise ValueError(f"max_rank must be a positive integer or None, got {max_rank}.")
    out_features, in_features = B.shape[0], A.shape[1]
    q_b, r_b = torch.linalg.qr(B)  # B = Q_b R_b
    q_a, r_a = torch.linalg.qr(A.T)  # A = R_a^T Q_a^T
    core = r_b @ r_a.T
    u, s, vh = torch.linalg.svd(core, full_matrices=False)
    # |B|_2 |A|_2 (= |R_b|_2 |R_a|_2) bounds the size of the rounding error of the factored product.
    scale = float(torch.linalg.matrix_norm(r_b, ord=2) * torch.linalg.matrix_norm(r_a, ord=2)) if s.numel() else 0.0
    numerical_rank = _numerical_rank(s, max(out_features, in_features, B.shape[1]), scale)
    rank = numerical_rank if max_rank is None else min(numerical_rank, max_rank)
    total_energy = float((s[:numerical_rank] ** 2).sum())
    if rank == 0:
        zero = LowRankDelta(B.new_zeros(out_features, 1), A.new_zeros(1, in_features))
        return zero, CompressionStats(rank=1, numerical_rank=0, energy_kept=1.0)
    root = s[:rank].sqrt()
    new_b = (q_b @ u[:, :rank]) * root
    new_a = root[:, None] * (vh[:rank] @ q_a.T)
    kept = float((s[:rank] ** 2).sum())
    energy = kept / total_energy if total_energy > 0 else 1.0
    return LowRankDelta(new_b, new_a), CompressionStats(rank, numerical_rank, energy)


def linear_combination(
    deltas: Sequence[LowRankDelta], coefficients: Sequence[float] | torch.Tensor, max_rank: int | None = None
) -> tuple[LowRankDelta, CompressionStats]:
    """Exactly `sum(c_i D_i)`, compressed to its numerical rank (or the optimal rank `max_rank`).

    Args:
        deltas (`Sequence[LowRankDelta]`): The deltas `D_i`.
        coefficients (`Sequence[float]` or `torch.Tensor`): One coefficient per delta.
        max_rank (`int`, *optional*): Upper bound on the output rank.
    """
    if len(deltas) != len(coefficients):
        raise ValueError(f"Got {len(deltas)} deltas but {len(coefficients)} coefficients.")
    stacked_b = torch.cat([delta.B * float(c) for delta, c in zip(deltas, coefficients, strict=False)], dim=1)
    stacked_a = torch.cat([delta.A for delta in deltas], dim=0)
    return compress(stacked_b, stacked_a, max_rank)


def slerp_coefficients(gram: torch.Tensor, t: float) -> tuple[tuple[float, float], float | None]:
    """Coefficients `(c_1, c_2)` of SLERP between two deltas, so that the result is `c_1 D_1 + c_2 D_2`.

    The angle comes from the normalized inner product; the coefficients apply to the raw (unnormalized) deltas:
    `c_1 = sin((1 - t) theta) / sin(theta)`, `c_2 = sin(t theta) / sin(theta)`. Nearly colinear deltas
    (`|cos theta| > 0.9995`) and zero deltas fall back to linear interpolation `(1 - t, t)`.

    Args:
        gram (`torch.Tensor`): The `2 x 2` Gram matrix of the two deltas.
        t (`float`): The interpolation factor, 0 gives `D_1`, 1 gives `D_2`.

    Returns:
        `tuple[tuple[float, float], float | None]`: The coefficients and the angle theta in radians (`None` when a
        delta is zero).
    """
    norm_1 = math.sqrt(max(float(gram[0, 0]), 0.0))
    norm_2 = math.sqrt(max(float(gram[1, 1]), 0.0))
    if norm_1 == 0.0 or norm_2 == 0.0:
        return (1.0 - t, t), None
    cosine = min(max(float(gram[0, 1]) / (norm_1 * norm_2), -1.0), 1.0)
    theta = math.acos(cosine)
    if abs(cosine) > SLERP_COLINEAR_THRESHOLD:
        return (1.0 - t, t), theta
    sin_theta = math.sin(theta)
    return (math.sin((1.0 - t) * theta) / sin_theta, math.sin(t * theta) / sin_theta), theta


def _norm(gram: torch.Tensor, coefficients: torch.Tensor) -> float:
    return math.sqrt(max(float(coefficients @ gram @ coefficients), 0.0))


def karcher_coefficients(
    gram: torch.Tensor, weights: Sequence[float], tol: float = 1e-10, max_iter: int = 100
) -> KarcherResult:
    """Coefficients of the weighted Karcher mean of the unit directions `D_i / |D_i|`, rescaled by the weighted mean
    of the norms `sum(w_i |D_i|)`.

    Every point and tangent vector is a coefficient vector `c` over the deltas, with inner product `c^T G c`. Each
    step maps the directions to the tangent space at the current mean (log map), averages them with the weights and
    moves along the result (exp map), until the step is shorter than `tol` or `max_iter` steps were taken. Zero
    deltas have no direction: they count in the mean norm only.

    Args:
        gram (`torch.Tensor`): The `k x k` Gram matrix.
        weights (`Sequence[float]`): Non-negative weights summing to 1.
        tol (`float`): Stop when the tangent step is shorter than this (radians).
        max_iter (`int`): Maximum number of steps.
    """
    gram = gram.to(torch.float64)
    k = gram.shape[0]
    weights_t = torch.tensor([float(w) for w in weights], dtype=torch.float64, device=gram.device)
    norms = gram.diagonal().clamp_min(0).sqrt()
    mean_norm = float((weights_t * norms).sum())
    directional = (norms > 0) & (weights_t > 0)
    if mean_norm == 0.0 or not bool(directional.any()):
        return KarcherResult(torch.zeros(k, dtype=torch.float64, device=gram.device), 0, True)
    # Unit directions as coefficient vectors: u_i = e_i / |D_i|.
    units = torch.zeros(k, k, dtype=torch.float64, device=gram.device)
    index = torch.nonzero(directional).flatten()
    units[index, index] = 1.0 / norms[index]
    dir_weights = torch.where(directional, weights_t, torch.zeros_like(weights_t))
    dir_weights = dir_weights / dir_weights.sum()
    mean = units.T @ dir_weights
    mean_length = _norm(gram, mean)
    mean = mean / mean_length if mean_length > 0 else units[int(index[0])]
    iterations, converged = 0, False
    for iterations in range(1, max_iter + 1):  # noqa: B007 - the count is reported
        tangent = torch.zeros_like(mean)
        for i in index.tolist():
            cosine = min(max(float(units[i] @ gram @ mean), -1.0), 1.0)
            theta = math.acos(cosine)
            direction = units[i] - cosine * mean
            scale = theta / math.sin(theta) if theta > 1e-12 else 1.0
            tangent = tangent + dir_weights[i] * scale * direction
        step = _norm(gram, tangent)
        if step < tol:
            converged = True
            break
        mean = math.cos(step) * mean + math.sin(step) * tangent / step
        mean = mean / _norm(gram, mean)
    return KarcherResult(mean * mean_norm, iterations, converged)
