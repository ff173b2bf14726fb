"""Exact linear algebra on low-rank deltas, without ever forming a dense `out x in` matrix.

With deltas `D_i = B_i @ A_i` (`B_i`: `m x r_i`, `A_i`: `r_i x n`) and `R = sum(r_i)`:

- `gram_matrix`: `<D_i, D_j>_F = sum((B_i^T B_j) * (A_i A_j^T))`, costing `O((m + n) R^2)` (two stacked products).
- `linear_combination`: `sum(c_i D_i) = [c_1 B_1 ... c_k B_k] @ [A_1; ...; A_k]`, then `compress`.
- `compress`: QR of the stacked `B` and of the stacked `A^T`, SVD of the small `R x R` core: the exact numerical
  rank, or the optimal rank-k truncation (Eckart-Young), with balanced factors `U sqrt(S)`, `sqrt(S) V^T`.
- `FactoredSpan`: that QR pair computed once per module, from which the Gram matrix and any linear combination follow
  with `R x R` work (what SLERP and Karcher use).
- `slerp_coefficients` / `karcher_coefficients`: spherical interpolation and the spherical (Karcher) mean of the
  deltas, computed on coefficient vectors with the Gram matrix alone; the result stays in the deltas' span.
- `core_svd`, `triangle_basis`, `polar_factor`, `compress_in_bases`: the SVD of a small core `R_b R_a^T` with the
  numerical rank of the product it stands for, the singular vectors of a stacked factor in its QR coordinates, the
  nearest matrix with orthonormal columns, and `compress` for a product given in orthonormal bases: the building
  blocks of the task-merging types (`lowrank.core_space`, `lowrank.spectral`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..plugins.contract import LowRankDelta

__all__ = [
    "CompressionStats",
    "FactoredSpan",
    "KarcherResult",
    "compress",
    "compress_in_bases",
    "compute_dtype_for",
    "core_svd",
    "energy_rank",
    "gram_matrix",
    "karcher_coefficients",
    "linear_combination",
    "polar_factor",
    "slerp_coefficients",
    "triangle_basis",
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
    stacked_b = torch.cat([delta.B for delta in deltas], dim=1)
    stacked_a = torch.cat([delta.A for delta in deltas], dim=0)
    return _block_sums((stacked_b.T @ stacked_b) * (stacked_a @ stacked_a.T), [delta.rank for delta in deltas])


def _block_sums(product: torch.Tensor, ranks: Sequence[int]) -> torch.Tensor:
    """`G[i, j]` = the sum of block `(i, j)` of the `R x R` matrix `product` (blocks of sizes `ranks`), symmetrized."""
    blocks = torch.zeros(len(ranks), product.shape[0], dtype=product.dtype, device=product.device)
    start = 0
    for index, rank in enumerate(ranks):
        blocks[index, start : start + rank] = 1.0
        start += rank
    gram = blocks @ product @ blocks.T
    return (gram + gram.T) / 2


def _numerical_rank(singular_values: torch.Tensor, shape: tuple[int, int], stacked: int, scale: float) -> int:
    """The count of singular values above numpy's `matrix_rank` tolerance `S_max * max(shape) * eps` and above the
    rounding noise of the factored product, `8 * R * eps * |B|_2 |A|_2` (`R` = `stacked`; measured: below 2 R eps)."""
    if singular_values.numel() == 0 or singular_values[0] <= 0:
        return 0
    eps = torch.finfo(singular_values.dtype).eps
    tolerance = max(float(singular_values[0]) * max(shape) * eps, scale * 8 * stacked * eps)
    return int((singular_values > tolerance).sum())


@dataclass(frozen=True)
class FactoredSpan:
    """Deltas `D_1 ... D_k` stacked and orthogonalized once: `[B_1 ... B_k] = Q_b R_b`, `[A_1; ...; A_k]^T = Q_a R_a`.

    Their Gram matrix and any linear combination of them then cost only `R x R` work (plus mapping the result back
    with `Q_b` and `Q_a`): SLERP and Karcher means use one QR pair per module, not one for the Gram matrix and one
    for the result.

    Args:
        q_b (`torch.Tensor`): `(out, min(out, R))`, orthonormal columns.
        r_b (`torch.Tensor`): `(min(out, R), R)`.
        q_a (`torch.Tensor`): `(in, min(in, R))`, orthonormal columns.
        r_a (`torch.Tensor`): `(min(in, R), R)`.
        ranks (`tuple[int, ...]`): The rank `r_i` of each delta, in stacking order.
    """

    q_b: torch.Tensor
    r_b: torch.Tensor
    q_a: torch.Tensor
    r_a: torch.Tensor
    ranks: tuple[int, ...]

    @classmethod
    def from_deltas(cls, deltas: Sequence[LowRankDelta]) -> FactoredSpan:
        """QR-factorize the stacked factors of `deltas` (all of the same `(out, in)` shape)."""
        if not deltas:
            raise ValueError("FactoredSpan needs at least one delta.")
        shapes = {delta.shape for delta in deltas}
        if len(shapes) != 1:
            raise ValueError(f"All deltas must have the same (out, in) shape, got {sorted(shapes)}.")
        stacked_b = torch.cat([delta.B for delta in deltas], dim=1) if len(deltas) > 1 else deltas[0].B
        stacked_a = torch.cat([delta.A for delta in deltas], dim=0) if len(deltas) > 1 else deltas[0].A
        q_b, r_b = torch.linalg.qr(stacked_b)  # B = Q_b R_b
        q_a, r_a = torch.linalg.qr(stacked_a.T)  # A = R_a^T Q_a^T
        return cls(q_b, r_b, q_a, r_a, tuple(delta.rank for delta in deltas))

    @property
    def shape(self) -> tuple[int, int]:
        """The `(out, in)` shape of the deltas."""
        return (self.q_b.shape[0], self.q_a.shape[0])

    def _expand(self, per_delta: Sequence[float] | torch.Tensor) -> torch.Tensor:
        """One value per stacked column: `per_delta[i]` repeated `r_i` times."""
        values = torch.as_tensor(per_delta, dtype=self.r_b.dtype).to(self.r_b.device)
        return values.repeat_interleave(torch.tensor(self.ranks, device=self.r_b.device))

    def gram(self) -> torch.Tensor:
        """The `k x k` Gram matrix `<D_i, D_j>_F`: the block sums of `(B^T B) * (A A^T)` with `B^T B = R_b^T R_b`."""
        return _block_sums((self.r_b.T @ self.r_b) * (self.r_a.T @ self.r_a), self.ranks)

    def combine(
        self, coefficients: Sequence[float] | torch.Tensor, max_rank: int | None = None, energy: float | None = None
    ) -> tuple[LowRankDelta, CompressionStats]:
        """Exactly `sum(c_i D_i)` at its numerical rank, or its optimal rank-`max_rank` truncation.

        Args:
            coefficients (`Sequence[float]` or `torch.Tensor`): One coefficient per delta.
            max_rank (`int`, *optional*): Upper bound on the output rank.
            energy (`float`, *optional*): Keep the smallest rank whose singular values hold at least this fraction of
                `sum(S^2)` (in `(0, 1]`), if lower than `max_rank`.
        """
        if len(coefficients) != len(self.ranks):
            raise ValueError(f"Got {len(self.ranks)} deltas but {len(coefficients)} coefficients.")
        scaled_r_b = self.r_b * self._expand(coefficients)  # c_i B_i = Q_b (R_b diag(c))
        return _compress_core(self.q_b, scaled_r_b, self.q_a, self.r_a, max_rank, energy)


def _compress_core(
    q_b: torch.Tensor,
    r_b: torch.Tensor,
    q_a: torch.Tensor,
    r_a: torch.Tensor,
    max_rank: int | None,
    energy: float | None = None,
) -> tuple[LowRankDelta, CompressionStats]:
    """`Q_b R_b R_a^T Q_a^T` re-factorized through the SVD of the small core `R_b R_a^T`, truncated to `max_rank`
    and to the smallest rank holding the fraction `energy` of `sum(S^2)`."""
    if max_rank is not None and max_rank < 1:
        raise ValueError(f"max_rank must be a positive integer or None, got {max_rank}.")
    out_features, in_features = q_b.shape[0], q_a.shape[0]
    u, s, vh, numerical_rank = core_svd(r_b, r_a, (out_features, in_features))
    rank = numerical_rank if max_rank is None else min(numerical_rank, max_rank)
    if energy is not None and numerical_rank > 0:
        rank = min(rank, energy_rank(s[:numerical_rank], energy))
    if rank == 0:
        zero = LowRankDelta(q_b.new_zeros(out_features, 1), q_a.new_zeros(1, in_features))
        return zero, CompressionStats(rank=1, numerical_rank=0, energy_kept=1.0)
    root = s[:rank].sqrt()
    new_b = q_b @ (u[:, :rank] * root)  # the small matrices take the scaling, the big products are single GEMMs
    new_a = (root[:, None] * vh[:rank]) @ q_a.T
    energies = s[:numerical_rank] ** 2
    total_energy = float(energies.sum())
    kept = float(energies[:rank].sum()) / total_energy if total_energy > 0 else 1.0
    return LowRankDelta(new_b, new_a), CompressionStats(rank, numerical_rank, kept)


def core_svd(
    r_b: torch.Tensor, r_a: torch.Tensor, shape: tuple[int, int], noise_from: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """The SVD `u, s, vh` of the small core `R_b R_a^T` and the numerical rank of the `shape`-sized product
    `Q_b R_b R_a^T Q_a^T` it stands for (the tolerance of `compress`).

    Args:
        noise_from (`torch.Tensor`, *optional*): The factor `r_b` was computed from by a projection (which can
            cancel it down to rounding noise): its size, not the projection's, sets the rounding-noise tolerance.
    """
    u, s, vh = torch.linalg.svd(r_b @ r_a.T, full_matrices=False)
    # |B|_2 |A|_2 (= |R_b|_2 |R_a|_2) sets the size of the rounding error of the factored product.
    left = r_b if noise_from is None else noise_from
    scale = float(torch.linalg.matrix_norm(left, ord=2) * torch.linalg.matrix_norm(r_a, ord=2)) if s.numel() else 0.0
    return u, s, vh, _numerical_rank(s, shape, r_b.shape[1], scale)


def triangle_basis(r: torch.Tensor, rows: int) -> torch.Tensor:
    """The left singular vectors of a tall `rows x R` matrix `Q r` (`Q` from its QR), at its numerical rank
    (numpy's `matrix_rank` tolerance) and in order of decreasing singular value, as coordinates `P` in `Q`'s basis:
    the singular vectors themselves are `Q P`. Cost `O(R^3)`.

    Args:
        r (`torch.Tensor`): The QR triangle, `(min(rows, R), R)`.
        rows (`int`): The number of rows of `Q r`.

    Returns:
        `torch.Tensor`: `(min(rows, R), rho)` with orthonormal columns.
    """
    u, s, _ = torch.linalg.svd(r, full_matrices=False)
    return u[:, : _numerical_rank(s, (rows, r.shape[1]), 0, 0.0)]


def polar_factor(matrix: torch.Tensor) -> torch.Tensor:
    """The orthogonal polar factor `P Q^T` of `matrix = P diag(S) Q^T` (thin SVD): the matrix with orthonormal
    columns (orthonormal rows when it is wide) nearest to `matrix` in Frobenius norm, through one QR and a small SVD.

    A rank-deficient `matrix` (e.g. two equal columns) has no unique polar factor; the singular pairs at its
    numerical rank (numpy's `matrix_rank` tolerance) give the unique partial isometry on its range instead, which
    maps equal columns to equal columns.

    Args:
        matrix (`torch.Tensor`): `(n, K)`.

    Returns:
        `torch.Tensor`: `(n, K)`.
    """
    q, r = torch.linalg.qr(matrix)
    u, s, vh = torch.linalg.svd(r, full_matrices=False)
    rank = _numerical_rank(s, tuple(matrix.shape), 0, 0.0)
    return q @ (u[:, :rank] @ vh[:rank])


def energy_rank(singular_values: torch.Tensor, energy: float) -> int:
    """The smallest `k` with `sum(S[:k]^2) >= energy * sum(S^2)` (`S` sorted descending, `energy` in `(0, 1]`)."""
    energies = singular_values**2  # in the compute dtype (float64, float32 on MPS)
    cumulative = torch.cumsum(energies, 0)
    below = int((cumulative < energy * cumulative[-1]).sum())
    return min(below + 1, singular_values.numel())


def compress_in_bases(
    left: torch.Tensor, core: torch.Tensor, right: torch.Tensor, max_rank: int | None = None
) -> tuple[LowRankDelta, CompressionStats]:
    """`compress` for a product already given in orthonormal bases, `left @ core @ right^T` (`left`: `out x p` and
    `right`: `in x q` with orthonormal columns, `core`: `p x q`): the SVD of `core` alone, no QR.

    Args:
        left (`torch.Tensor`): `(out, p)`, orthonormal columns.
        core (`torch.Tensor`): `(p, q)`.
        right (`torch.Tensor`): `(in, q)`, orthonormal columns.
        max_rank (`int`, *optional*): Upper bound on the output rank.
    """
    identity = torch.eye(core.shape[1], dtype=core.dtype, device=core.device)
    return _compress_core(left, core, right, identity, max_rank)


def compress(
    B: torch.Tensor, A: torch.Tensor, max_rank: int | None = None, energy: float | None = None
) -> tuple[LowRankDelta, CompressionStats]:
    """Re-factorize `B @ A` to its exact numerical rank, or to the optimal rank `max_rank` if that is lower.

    Singular values are treated as zero up to numpy's `matrix_rank` tolerance, `S_max * max(out, in) * eps(dtype)`,
    or up to the rounding noise of the factored product, `8 * R * eps * |B|_2 |A|_2`, if that is larger: so that
    cancellations (such as `D - D`) give rank 0 as a dense computation would, not rank-R noise.
    Cost: `O((out + in) R^2 + R^3)` for `R = B.shape[1]`; `out x in` is never formed.

    Args:
        B (`torch.Tensor`): Left factor `(out, R)`.
        A (`torch.Tensor`): Right factor `(R, in)`.
        max_rank (`int`, *optional*): Upper bound on the output rank (Eckart-Young truncation).
        energy (`float`, *optional*): Keep only the smallest rank holding this fraction of `sum(S^2)` (`svd_energy`).

    Returns:
        `tuple[LowRankDelta, CompressionStats]`: Balanced factors `(U sqrt(S), sqrt(S) V^T)` of rank at least 1 (an
        all-zero delta gives rank-1 zero factors) and what was kept.
    """
    return FactoredSpan.from_deltas([LowRankDelta(B, A)]).combine([1.0], max_rank, energy)


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
    return FactoredSpan.from_deltas(deltas).combine(coefficients, max_rank)


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


# Below this sin(theta), an input is taken as equal or opposite to the current mean (see karcher_coefficients).
_KARCHER_ANTIPODAL_SIN = 1e-12
# Angles computed from a Gram matrix are resolved to about sqrt(eps) ~ 1e-8 rad only (acos near 1, quadratic forms of
# nearly colinear deltas): a step below this that no longer shrinks is rounding noise, and the iteration has converged.
_KARCHER_NOISE_STEP = 1e-6


def _matvec(gram: list[list[float]], vector: list[float]) -> list[float]:
    return [sum(g * v for g, v in zip(row, vector, strict=True)) for row in gram]


def _length(gram: list[list[float]], vector: list[float]) -> float:
    return math.sqrt(max(sum(v * gv for v, gv in zip(vector, _matvec(gram, vector), strict=True)), 0.0))


def karcher_coefficients(
    gram: torch.Tensor, weights: Sequence[float], tol: float = 1e-10, max_iter: int = 100
) -> KarcherResult:
    """Coefficients of the weighted Karcher mean of the unit directions `D_i / |D_i|`, rescaled by the weighted mean
    of the norms `sum(w_i |D_i|)`.

    Every point and tangent vector is a coefficient vector `c` over the deltas, with inner product `c^T G c`. Each
    step maps the directions to the tangent space at the current mean (log map), averages them with the weights and
    moves along the result (exp map), until the step is shorter than `tol` (or, below 1e-6 rad, stops shrinking: the
    rounding floor of angles computed from a Gram matrix is about 1e-8 rad) or `max_iter` steps were taken. Zero
    deltas have no direction: they count in the mean norm only; an input exactly opposite to the current mean has no
    defined direction to pull along and is skipped in that step (a measure-zero case). The iteration runs on Python
    floats: `k` is the number of adapters, so each step is a handful of `k x k` products, cheaper than launching
    tensor operations.

    Args:
        gram (`torch.Tensor`): The `k x k` Gram matrix.
        weights (`Sequence[float]`): Non-negative weights summing to 1.
        tol (`float`): Stop when the tangent step is shorter than this (radians).
        max_iter (`int`): Maximum number of steps.
    """
    g = gram.to(torch.float64).tolist()
    k = len(g)
    weights = [float(w) for w in weights]
    norms = [math.sqrt(max(g[i][i], 0.0)) for i in range(k)]
    mean_norm = sum(w * n for w, n in zip(weights, norms, strict=True))
    index = [i for i in range(k) if norms[i] > 0 and weights[i] > 0]
    if mean_norm == 0.0 or not index:
        return KarcherResult(torch.zeros(k, dtype=torch.float64, device=gram.device), 0, True)
    total = sum(weights[i] for i in index)
    dir_weights = {i: weights[i] / total for i in index}
    # Unit directions as coefficient vectors: u_i = e_i / |D_i|; the first mean is their normalized weighted sum.
    mean = [dir_weights[i] / norms[i] if i in dir_weights else 0.0 for i in range(k)]
    mean_length = _length(g, mean)
    if mean_length > 0:
        mean = [m / mean_length for m in mean]
    else:
        mean = [1.0 / norms[index[0]] if j == index[0] else 0.0 for j in range(k)]
    iterations, converged, previous_step = 0, False, math.inf
    for iterations in range(1, max_iter + 1):  # noqa: B007 - the count is reported
        g_mean = _matvec(g, mean)
        tangent = [0.0] * k
        for i in index:
            cosine = min(max(g_mean[i] / norms[i], -1.0), 1.0)  # <u_i, mean>
            theta = math.acos(cosine)
            sin_theta = math.sin(theta)
            if sin_theta < _KARCHER_ANTIPODAL_SIN:
                # Equal to the mean (no pull), or opposite to it: the log map has no defined direction, skip it.
                continue
            scale = dir_weights[i] * theta / sin_theta
            for j in range(k):  # log map: scale * (u_i - cosine * mean)
                tangent[j] -= scale * cosine * mean[j]
            tangent[i] += scale / norms[i]
        step = _length(g, tangent)
        if step < tol or (step < _KARCHER_NOISE_STEP and step >= previous_step):
            converged = True  # below tol, or at the rounding floor of Gram arithmetic (the step stopped shrinking)
            break
        previous_step = step
        moved = [math.cos(step) * m + math.sin(step) * v / step for m, v in zip(mean, tangent, strict=True)]
        length = _length(g, moved)
        if not length > 0:  # a degenerate step (rounding in a near-singular Gram matrix): keep the last mean
            break
        mean = [m / length for m in moved]
    coefficients = torch.tensor([m * mean_norm for m in mean], dtype=torch.float64, device=gram.device)
    return KarcherResult(coefficients, iterations, converged)
