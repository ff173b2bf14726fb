"""TIES / DARE merging on small matrices: Core Space merging and KnOTS, exact in factor space.

Notation: `D_i = B_i A_i` (canonical factors, LoRA scaling folded into `B_i`), `B_i`: `out x r_i`, `A_i`:
`r_i x in`, `R = sum(r_i)`, weights `w_i`. Nothing here forms an `out x in` matrix; each function costs
`O((out + in) R^2 + R^3)` (KnOTS: the element-wise merge touches `k` matrices of `rho x in`).

- Core Space (Panariello et al., NeurIPS 2025, arXiv 2509.17786): `U` = left singular vectors of
  `[B_1 ... B_k]`, `V` = right singular vectors of `[A_1; ...; A_k]` (numerical rank kept), cores
  `M_i = U^T D_i V = (U^T B_i)(A_i V)`; the cores are merged with TIES or DARE and the result is `U M V^T`. Since
  `U U^T B_i = B_i` and `A_i V V^T = A_i`, `D_i = U M_i V^T` exactly: nothing is lost by going to the core space.
- KnOTS (Stoica et al., ICLR 2025, arXiv 2410.19735): the SVD of the column-concatenated updates
  `[D_1 ... D_k] = U S [V_1^T ... V_k^T]`, computed from a QR of `[B_1 ... B_k]` and one QR per `A_i^T`; TIES or
  DARE merge the task components `V_i^T` (`rho x in` each), and the result is `U S V_merged^T`.

The element-wise step follows PEFT's `peft.utils.merge_utils` semantics (`ties`, `dare_ties`, `dare_linear`):
magnitude pruning keeps the `int(density * numel)` largest entries of each matrix (DARE: keeps each entry with
probability `density` and rescales by `1 / density`), the majority sign is elected on the pruned, unweighted
matrices (`"total"`: sign of their sum, `"frequency"`: sign of the count of signs), the weights multiply the pruned
matrices, and the entries agreeing with the elected sign are averaged (disjoint mean); `dare_linear` sums them.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..plugins.contract import LowRankDelta
from .factor_math import FactoredSpan, core_svd, triangle_basis

__all__ = [
    "CoreSpace",
    "ElementwiseMerge",
    "MergeStats",
    "fix_signs",
    "knots_components",
    "merge_elementwise",
    "module_seed",
]

MAJORITY_SIGN_METHODS = ("total", "frequency")


@dataclass(frozen=True)
class ElementwiseMerge:
    """How `k` small matrices are merged entry by entry.

    Args:
        density (`float`): The fraction of entries kept, in `(0, 1]` (1 keeps everything).
        majority_sign_method (`str`): `"total"` or `"frequency"`, as in PEFT.
        elect_sign (`bool`): Elect a majority sign and average the agreeing entries (TIES, `dare_ties`); `False`
            sums the weighted entries (`dare_linear`).
        generator (`torch.Generator`, *optional*): DARE's random drop, `None` for TIES' magnitude pruning.
    """

    density: float
    majority_sign_method: str = "total"
    elect_sign: bool = True
    generator: torch.Generator | None = None


@dataclass(frozen=True)
class MergeStats:
    """What an element-wise merge did.

    Args:
        kept_fraction (`float`): Entries kept by the pruning / random drop, over all entries of the `k` matrices.
        sign_conflict_rate (`float`): Among the positions where at least one kept entry is non-zero, the fraction
            where kept entries of both signs meet (what sign election resolves).
    """

    kept_fraction: float
    sign_conflict_rate: float


def module_seed(seed: int, module_name: str) -> int:
    """The seed of DARE's random drop at one module: a hash of the user's `seed` and the module's name, so that
    modules of equal shape get independent masks and a merge is reproducible in any process (`0 <= s < 2**63`)."""
    digest = hashlib.blake2b(f"{seed}\0{module_name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def _prune(matrix: torch.Tensor, how: ElementwiseMerge) -> tuple[torch.Tensor, int]:
    """One matrix pruned as PEFT's `prune` does, and the number of entries kept."""
    if how.density >= 1:
        return matrix, matrix.numel()
    if how.generator is not None:  # DARE: keep with probability `density`, rescale by 1 / density
        mask = torch.bernoulli(torch.full_like(matrix, how.density), generator=how.generator)
        return matrix * mask / how.density, int(mask.sum())
    count = int(how.density * matrix.numel())
    if count == 0:
        return torch.zeros_like(matrix), 0
    magnitudes = matrix.abs().reshape(-1)
    # The `count` largest magnitudes: a selection (`kthvalue`, linear time) instead of `topk` (slow for a large
    # `count`). A zero threshold keeps every non-zero entry, as `topk` would (the zeros it adds change nothing);
    # ties at a positive threshold, which would select more than `count` entries, fall back to `topk`.
    threshold = torch.kthvalue(magnitudes, magnitudes.numel() - count + 1).values
    mask = magnitudes >= threshold
    if threshold > 0 and int(mask.sum()) != count:
        mask = torch.zeros_like(mask)
        mask[torch.topk(magnitudes, k=count, largest=True).indices] = True
    return matrix * mask.reshape(matrix.shape), count


def merge_elementwise(
    matrices: Sequence[torch.Tensor], weights: Sequence[float], how: ElementwiseMerge
) -> tuple[torch.Tensor, MergeStats]:
    """TIES / DARE on `k` matrices of one shape, with PEFT's semantics (see the module docstring).

    Args:
        matrices (`Sequence[torch.Tensor]`): The `k` matrices, pruned in this order (DARE draws in this order).
        weights (`Sequence[float]`): One weight per matrix, applied after pruning and sign election.
        how (`ElementwiseMerge`): Density, sign election and the random generator.

    Returns:
        `tuple[torch.Tensor, MergeStats]`: The merged matrix and what was kept.
    """
    pruned, kept = [], 0
    for matrix in matrices:
        result, count = _prune(matrix, how)
        pruned.append(result)
        kept += count
    stacked = torch.stack(pruned)
    scale = torch.as_tensor(list(weights), dtype=stacked.dtype).to(stacked.device)
    scale = scale.reshape(-1, *([1] * (stacked.ndim - 1)))
    signs = stacked.sign()
    nonzero = signs.abs().sum(dim=0)  # per position: how many kept entries are non-zero
    sign_sum = signs.sum(dim=0)  # |sign_sum| < nonzero exactly where both signs meet
    touched_count = int((nonzero > 0).sum())
    stats = MergeStats(
        kept_fraction=kept / stacked.numel() if stacked.numel() else 1.0,
        sign_conflict_rate=int((sign_sum.abs() < nonzero).sum()) / touched_count if touched_count else 0.0,
    )
    if not how.elect_sign:
        return (stacked * scale).sum(dim=0), stats
    votes = stacked.sum(dim=0) if how.majority_sign_method == "total" else sign_sum
    majority = torch.where(votes >= 0, 1.0, -1.0).to(stacked.dtype)
    agree = signs == majority
    merged = torch.where(agree, stacked * scale, 0.0).sum(dim=0)
    return merged / agree.sum(dim=0).clamp(min=1).to(stacked.dtype), stats


def fix_signs(basis: torch.Tensor, coordinates: torch.Tensor) -> torch.Tensor:
    """`coordinates` (`P`, singular vectors `basis @ P`) with each column's sign chosen so that the entries of
    `basis @ P` sum to a positive number: a sign convention that does not depend on the SVD or QR routine, computed
    as `(1^T basis) P` without forming `basis @ P`.

    With `majority_sign_method="total"` the merges here do not depend on the signs at all (flipping a basis vector
    flips a whole row of every core, and pruning and sign election are symmetric under that). A tied vote is the
    exception: PEFT elects `+` when the votes sum to exactly 0, which happens with `"frequency"` (as many positive
    as negative entries, e.g. two adapters that disagree); there the convention decides, so it is fixed here.
    """
    signs = (basis.sum(dim=0) @ coordinates).sign()
    return coordinates * torch.where(signs == 0, torch.ones_like(signs), signs)


@dataclass(frozen=True)
class CoreSpace:
    """The shared bases of Core Space merging, in the coordinates of one QR pair of the stacked factors.

    `U` (`out x r_u`) = left singular vectors of `[B_1 ... B_k] = Q_b R_b` is `Q_b P`, and `V` (`in x r_v`) = right
    singular vectors of `[A_1; ...; A_k]` (`= R_a^T Q_a^T`) is `Q_a W`, at their numerical ranks, in order of
    decreasing singular value, signs fixed by `fix_signs`. The cores `M_i = U^T B_i A_i V` are then
    `(P^T R_b[:, i])(R_a[:, i]^T W)`: the whole merge costs one QR pair, `O((out + in) R^2 + R^3)`.

    Args:
        span (`FactoredSpan`): The QR pair of the stacked factors.
        left (`torch.Tensor`): `P`, `(min(out, R), r_u)`.
        right (`torch.Tensor`): `W`, `(min(in, R), r_v)`.
    """

    span: FactoredSpan
    left: torch.Tensor
    right: torch.Tensor

    @classmethod
    def from_deltas(cls, deltas: Sequence[LowRankDelta]) -> CoreSpace:
        """The bases of `deltas` (all of one `(out, in)` shape)."""
        span = FactoredSpan.from_deltas(deltas)
        out_features, in_features = span.shape
        left = fix_signs(span.q_b, triangle_basis(span.r_b, out_features))
        return cls(span, left, fix_signs(span.q_a, triangle_basis(span.r_a, in_features)))

    def cores(self) -> list[torch.Tensor]:
        """The cores `M_i = U^T B_i A_i V` (`r_u x r_v` each)."""
        cores, start = [], 0
        for rank in self.span.ranks:
            columns = slice(start, start + rank)
            cores.append((self.left.T @ self.span.r_b[:, columns]) @ (self.span.r_a[:, columns].T @ self.right))
            start += rank
        return cores

    def expand(self, core: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`U core V^T` as `(Q_b, P core W^T, Q_a)`, for `compress_in_bases`."""
        return self.span.q_b, self.left @ core @ self.right.T, self.span.q_a


def knots_components(
    deltas: Sequence[LowRankDelta],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """The thin SVD `[D_1 ... D_k] = U diag(S) [V_1^T ... V_k^T]` at its numerical rank `rho`, from the factors.

    `[D_1 ... D_k] = [B_1 ... B_k] blockdiag(A_1, ..., A_k)`; with `[B_1 ... B_k] = Q_b R_b` and
    `A_i^T = Q_i R_i`, it is `Q_b (R_b blockdiag(R_i)^T) blockdiag(Q_i)^T`, so the SVD of the small core gives
    `U = Q_b P` and `S` (and the numerical rank; signs fixed by `fix_signs`), and each task component is
    `V_i^T = S^-1 U^T B_i A_i = S^-1 (P^T R_b[:, i]) A_i`. Cost `O((out + in) R^2 + R^3)` (and `rho x in` per
    component).

    Returns:
        `tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[torch.Tensor]]`: `Q_b`, `P` (`U = Q_b P`), `S`
        (`rho`) and the task components `V_i^T` (`rho x in` each).
    """
    q_b, r_b = torch.linalg.qr(torch.cat([delta.B for delta in deltas], dim=1))
    r_a = torch.block_diag(*[torch.linalg.qr(delta.A.T)[1] for delta in deltas])
    out_features, in_features = deltas[0].shape
    u, s, _, rank = core_svd(r_b, r_a, (out_features, len(deltas) * in_features))
    left, values = fix_signs(q_b, u[:, :rank]), s[:rank]
    # V_i^T = S^-1 U^T D_i: exactly zero for an adapter absent here (its B_i and A_i are zeros), where the rows of
    # the core's right singular vectors would hold rounding noise that TIES' sign count would pick up.
    components, start = [], 0
    for delta in deltas:
        columns = slice(start, start + delta.rank)
        components.append(((left.T @ r_b[:, columns]) / values[:, None]) @ delta.A)
        start += delta.rank
    return q_b, left, values, components
