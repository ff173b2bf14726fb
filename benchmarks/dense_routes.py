"""Dense full-space routes of the newer combination types, timed for `benchmarks/combination_speed.py`.

This is what a user without factor-space maths runs, in float32 as such code runs: form each adapter's dense
`out x in` delta (PEFT's `get_delta_weight`), then the method on the dense matrices:

- `core_ties` / `core_dare`: the full-space merges Core Space replaces: PEFT's `ties` / `dare_ties` semantics
  element-wise on the `out x in` deltas (magnitude pruning to `int(density * numel)` entries per delta or a random
  drop rescaled by `1 / density`, sign election on the pruned deltas, weights, disjoint mean). Not the same result
  as the core-space merge (TIES is not invariant to the basis it runs in), the same work the paper compares with.
- `tsv`: a dense thin SVD per delta (`torch.linalg.svd(full_matrices=False)`), the top `ceil(keep * r_i)` triplets,
  polar factors of the concatenated bases, `U_perp blockdiag(w_i S_i') V_perp^T`.
- `iso_c`: `M = sum(w_i D_i)`, its dense thin SVD at the numerical rank, `mean(S) U V^T`.
- `iso_cts`: the dense SVD of `M`, the top `c` directions as the common subspace, each `w_i D_i` projected off it
  and its top `s` triplets from a dense SVD, polar factors of the concatenation, all at the mean singular value
  (`T = min(out, in, sum r_i)` split as in the paper: `c = int(T * fraction)`, `s = round((T - c) / k)`,
  `c = T - k s`; the ranks `r_i` are the adapters' LoRA ranks, which a user knows without an SVD).
- `knots_ties` / `knots_dare`: the dense thin SVD of the concatenation `[D_1 ... D_k]` (`out x k in`), TIES / DARE
  on the task blocks `V_i^T` of its right singular vectors, `U S V_merged^T`.

Written from the papers' formulas, independently of `peft_merge_ext.lowrank`. A dense SVD of a 4096 x 14336 float32
matrix takes minutes on 2 CPU cores; with `charge_repeats=True` only the first SVD of each shape is run with
`torch.linalg.svd` and timed, and every later SVD of the same shape is charged that time (LAPACK's cost depends on the
shape, not the values) while its values come from `torch.svd_lowrank` with `q = rank bound + 10` (exact to float32
rounding for these low-rank matrices), so the route's result stays comparable.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["DENSE_ROUTES", "DenseOps", "DenseRoute"]


@dataclass
class DenseOps:
    """Runs and times the dense steps of one route; `seconds` is the route's total, `steps` its breakdown."""

    charge_repeats: bool = False
    measured_svd: dict[tuple[int, int], float] = field(default_factory=dict)
    steps: list[tuple[str, float, bool]] = field(default_factory=list)

    @property
    def seconds(self) -> float:
        return sum(seconds for _, seconds, _ in self.steps)

    @property
    def charged(self) -> int:
        return sum(1 for _, _, charged in self.steps if charged)

    def reset(self) -> None:
        self.steps = []

    def run(self, label: str, function: Callable[[], Any]) -> Any:
        started = time.perf_counter()
        result = function()
        self.steps.append((label, time.perf_counter() - started, False))
        return result

    def svd(self, matrix: torch.Tensor, bound: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The thin SVD of `matrix` at its numerical rank, at most `bound` (the sum of the LoRA ranks involved, which
        a user knows: float32 deltas carry rounding noise above a float64 tolerance)."""
        shape = (matrix.shape[0], matrix.shape[1])
        if self.charge_repeats and shape in self.measured_svd:
            q = min(bound + 10, *shape)
            u, s, v = torch.svd_lowrank(matrix, q=q, niter=4)
            vh = v.T
            self.steps.append((f"svd {shape[0]}x{shape[1]} (charged)", self.measured_svd[shape], True))
        else:
            started = time.perf_counter()
            u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
            seconds = time.perf_counter() - started
            self.measured_svd.setdefault(shape, seconds)
            self.steps.append((f"svd {shape[0]}x{shape[1]}", seconds, False))
        rank = int((s > s[0] * max(shape) * torch.finfo(s.dtype).eps).sum()) if s.numel() else 0
        rank = min(rank, bound)  # float64 maths on float32 deltas: their rounding is not rank
        return u[:, :rank], s[:rank], vh[:rank]

    def polar(self, matrix: torch.Tensor) -> torch.Tensor:
        """The orthogonal polar factor `P Q^T` of a tall `matrix = P S Q^T`."""
        return self.run("polar", lambda: _polar(matrix))

    def elementwise(
        self, matrices: Sequence[torch.Tensor], weights: Sequence[float], options: dict[str, Any], random: bool
    ) -> torch.Tensor:
        return self.run("ties/dare", lambda: _ties_or_dare(matrices, weights, options, random))


def _polar(matrix: torch.Tensor) -> torch.Tensor:
    u, _, vh = torch.linalg.svd(matrix, full_matrices=False)
    return u @ vh


def _ties_or_dare(
    matrices: Sequence[torch.Tensor], weights: Sequence[float], options: dict[str, Any], random: bool
) -> torch.Tensor:
    """PEFT's `ties` (magnitude pruning) or `dare_ties` / `dare_linear` (random drop) semantics on dense matrices."""
    density = float(options.get("density", 0.5))
    pruned = []
    generator = torch.Generator(device=matrices[0].device).manual_seed(int(options.get("seed", 0)))
    for matrix in matrices:
        if density >= 1:
            pruned.append(matrix)
        elif random:
            keep = torch.bernoulli(torch.full_like(matrix, density), generator=generator)
            pruned.append(matrix * keep / density)
        else:
            flat = matrix.abs().reshape(-1)
            keep = torch.zeros_like(flat)
            keep[torch.topk(flat, k=int(density * flat.numel())).indices] = 1
            pruned.append(matrix * keep.reshape(matrix.shape))
    stacked = torch.stack(pruned)
    scale = torch.tensor(list(weights), dtype=stacked.dtype, device=stacked.device).reshape(-1, 1, 1)
    if not options.get("elect_sign", True):
        return (stacked * scale).sum(dim=0)
    signs = stacked.sign()
    votes = stacked.sum(dim=0) if options.get("majority_sign_method", "total") == "total" else signs.sum(dim=0)
    majority = torch.where(votes >= 0, 1.0, -1.0).to(stacked.dtype)
    agree = (signs == majority).to(stacked.dtype)
    return (stacked * scale * agree).sum(dim=0) / agree.sum(dim=0).clamp(min=1.0)


# ----------------------------------------------------------------------------------------------------------------
# The routes: (ops, dense deltas, weights, LoRA ranks, options) -> merged dense delta


def _full_space(random: bool):
    def route(ops: DenseOps, deltas, weights, ranks, options) -> torch.Tensor:
        return ops.elementwise(deltas, weights, options, random)

    return route


def _tsv(ops: DenseOps, deltas, weights, ranks, options) -> torch.Tensor:
    keep = options.get("keep")
    keep = 1.0 / len(deltas) if keep is None else float(keep)
    lefts, rights, values = [], [], []
    for delta, weight, rank in zip(deltas, weights, ranks, strict=True):
        u, s, vh = ops.svd(delta, rank)
        count = min(s.numel(), max(1, math.ceil(keep * s.numel() * (1 - 1e-9)))) if s.numel() else 0
        lefts.append(u[:, :count])
        rights.append(vh[:count])
        values.append(s[:count] * weight)
    left = ops.polar(torch.cat(lefts, dim=1))
    right = ops.polar(torch.cat(rights, dim=0).T)
    return ops.run("product", lambda: (left * torch.cat(values)) @ right.T)


def _iso_c(ops: DenseOps, deltas, weights, ranks, options) -> torch.Tensor:
    merged = ops.run("sum", lambda: sum(w * d for w, d in zip(weights, deltas, strict=True)))
    u, s, vh = ops.svd(merged, sum(ranks))
    return ops.run("product", lambda: float(s.mean()) * (u @ vh))


def _iso_cts(ops: DenseOps, deltas, weights, ranks, options) -> torch.Tensor:
    fraction = float(options.get("common_space_fraction", 0.8))
    active = [(d, w, r) for d, w, r in zip(deltas, weights, ranks, strict=True) if w != 0 and r > 0]
    out_features, in_features = deltas[0].shape
    total = min(out_features, in_features, sum(r for _, _, r in active))
    common = int(total * fraction)
    per_task = round((total - common) / len(active))
    common = max(0, total - per_task * len(active))
    merged = ops.run("sum", lambda: sum(w * d for w, d in zip(weights, deltas, strict=True)))
    u, s, vh = ops.svd(merged, sum(ranks))
    common = min(common, s.numel())
    basis = u[:, :common]
    lefts, rights, values = [basis], [vh[:common]], [s[:common]]
    for delta, weight, rank in active:
        projected = ops.run("project", lambda d=delta, w=weight: w * d - basis @ (basis.T @ (w * d)))
        pu, ps, pvh = ops.svd(projected, rank)
        lefts.append(pu[:, :per_task])
        rights.append(pvh[:per_task])
        values.append(ps[:per_task])
    level = float(torch.cat(values).mean())
    left = ops.polar(torch.cat(lefts, dim=1))
    right = ops.polar(torch.cat(rights, dim=0).T)
    return ops.run("product", lambda: level * (left @ right.T))


def _knots(random: bool):
    def route(ops: DenseOps, deltas, weights, ranks, options) -> torch.Tensor:
        concatenated = ops.run("concatenate", lambda: torch.cat(list(deltas), dim=1))
        u, s, vh = ops.svd(concatenated, sum(ranks))
        in_features = deltas[0].shape[1]
        blocks = [vh[:, i * in_features : (i + 1) * in_features] for i in range(len(deltas))]
        merged = ops.elementwise(blocks, weights, options, random)
        return ops.run("product", lambda: (u * s) @ merged)

    return route


@dataclass(frozen=True)
class DenseRoute:
    """A dense route and how its result relates to the factor-space type's.

    Args:
        function (`Callable`): `(ops, deltas, weights, ranks, options) -> dense delta`.
        description (`str`): What the route computes.
        same_result (`bool`): Whether it computes the same matrix as the factor-space type (up to rounding);
            `False` for the full-space TIES/DARE (another method) and for random drops (other draws).
    """

    function: Callable[..., torch.Tensor]
    description: str
    same_result: bool


DENSE_ROUTES = {
    "core_ties": DenseRoute(_full_space(False), "full-space TIES on the dense deltas", False),
    "core_dare": DenseRoute(_full_space(True), "full-space DARE-TIES on the dense deltas", False),
    "tsv": DenseRoute(_tsv, "k dense SVDs, polar factors", True),
    "iso_c": DenseRoute(_iso_c, "dense SVD of the sum", True),
    "iso_cts": DenseRoute(_iso_cts, "1 + k dense SVDs, polar factors", True),
    "knots_ties": DenseRoute(_knots(False), "dense SVD of the concatenation, TIES", True),
    "knots_dare": DenseRoute(_knots(True), "dense SVD of the concatenation, DARE", False),
}
