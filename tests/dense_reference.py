"""Dense float64 reference formulas shared by the tests (written independently of the factor-space code)."""

from __future__ import annotations

import math

import torch


def dense_karcher(matrices: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    """Weighted Karcher mean of the unit directions (dense Riemannian gradient iteration), scaled by the mean norm."""
    total = sum(weights)
    weights = [w / total for w in weights]
    vectors = [m.flatten() for m in matrices]
    norms = [float(v.norm()) for v in vectors]
    mean_norm = sum(w * n for w, n in zip(weights, norms, strict=True))
    points = [(w, v / n) for w, v, n in zip(weights, vectors, norms, strict=True) if n > 0 and w > 0]
    if not points:
        return torch.zeros_like(matrices[0])
    point_total = sum(w for w, _ in points)
    points = [(w / point_total, u) for w, u in points]
    mean = sum(w * u for w, u in points)
    mean = mean / mean.norm()
    for _ in range(1000):
        tangent = torch.zeros_like(mean)
        for w, u in points:
            cosine = min(max(float(u @ mean), -1.0), 1.0)
            angle = math.acos(cosine)
            if angle > 1e-12:
                tangent += w * angle / math.sin(angle) * (u - cosine * mean)
        step = float(tangent.norm())
        if step < 1e-14:
            break
        mean = math.cos(step) * mean + math.sin(step) * tangent / step
        mean = mean / mean.norm()
    return (mean * mean_norm).reshape(matrices[0].shape)


def dense_slerp(first: torch.Tensor, second: torch.Tensor, t: float) -> torch.Tensor:
    """The model-merging SLERP convention on raw deltas, with the colinear and zero fallbacks, densely."""
    x, y = first.flatten(), second.flatten()
    nx, ny = float(x.norm()), float(y.norm())
    if nx == 0 or ny == 0:
        return (1 - t) * first + t * second
    cosine = min(max(float(x @ y) / (nx * ny), -1.0), 1.0)
    if abs(cosine) > 0.9995:
        return (1 - t) * first + t * second
    theta = math.acos(cosine)
    return (math.sin((1 - t) * theta) * first + math.sin(t * theta) * second) / math.sin(theta)


# ----------------------------------------------------------------------------------------------------------------
# Task-merging types (Core Space, TSV, Iso-C/CTS, KnOTS): dense float64 references from the formulas. Their inputs
# are each adapter's canonical factors (B_i with the scaling folded in, A_i), since Core Space merging depends on
# the split; every SVD below is a plain dense SVD of a dense matrix, and the TIES / DARE steps call PEFT's own
# `merge_utils` functions on the dense cores / task components.


def _dense_rank(s: torch.Tensor, top: float | None = None) -> int:
    """Singular values above 1e-9 of the largest, or of `top` (the test inputs have wide rank gaps)."""
    top = float(s[0]) if top is None and s.numel() else top
    return int((s > top * 1e-9).sum()) if s.numel() and top > 0 else 0


def _dense_svd(matrix: torch.Tensor, top: float | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    rank = _dense_rank(s, top)
    return u[:, :rank], s[:rank], vh[:rank]


def _positive_sum(basis: torch.Tensor) -> torch.Tensor:
    """Columns signed so that their entries sum to a positive number (decides PEFT's tied sign votes)."""
    for j in range(basis.shape[1]):
        if basis[:, j].sum() < 0:
            basis[:, j] = -basis[:, j]
    return basis


def _dense_polar(matrix: torch.Tensor) -> torch.Tensor:
    """P Q^T from the SVD at the numerical rank (the partial isometry when columns repeat)."""
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    rank = _dense_rank(s)
    return u[:, :rank] @ vh[:rank]


def _peft_merge(matrices: list[torch.Tensor], weights: list[float], options: dict, name: str, dare: bool):
    """PEFT's ties / dare_ties / dare_linear on small dense matrices (DARE: the global RNG seeded per module)."""
    import warnings

    from peft.utils import merge_utils

    from peft_merge_ext.lowrank.core_space import module_seed

    density = options.get("density", 0.5)
    method = options.get("majority_sign_method", "total")
    scale = torch.tensor(weights, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT warns that density 1 prunes nothing
        if not dare:
            return merge_utils.ties(matrices, scale, density, method)
        torch.manual_seed(module_seed(options.get("seed", 0), name))
        if options.get("elect_sign", True):
            return merge_utils.dare_ties(matrices, scale, density, method)
        return merge_utils.dare_linear(matrices, scale, density)


def _optimal(matrix: torch.Tensor, rank: int | None) -> torch.Tensor:
    if rank is None:
        return matrix
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    return (u[:, :rank] * s[:rank]) @ vh[:rank]


def dense_core_space(factors, weights, options, name, svd_rank=None, dare=False):
    """U M V^T with U, V the singular vectors of the stacked B_i / A_i and M PEFT's merge of the cores U^T D_i V."""
    left = _positive_sum(_dense_svd(torch.cat([b for b, _ in factors], dim=1))[0])
    right = _positive_sum(_dense_svd(torch.cat([a for _, a in factors], dim=0))[2].T.clone())
    cores = [left.T @ (b @ a) @ right for b, a in factors]
    return _optimal(left @ _peft_merge(cores, weights, options, name, dare) @ right.T, svd_rank)


def dense_knots(factors, weights, options, name, svd_rank=None, dare=False):
    """SVD of the dense [D_1 ... D_k] = U S [V_1^T ... V_k^T]; PEFT's merge of the V_i^T; U S V_merged^T."""
    width = factors[0][1].shape[1]
    u, s, vh = _dense_svd(torch.cat([b @ a for b, a in factors], dim=1))
    flips = torch.sign((_positive_sum(u.clone()) * u).sum(dim=0))  # +1 / -1 per singular pair
    u, vh = u * flips, vh * flips[:, None]
    # The blocks of V^T, written as S^-1 U^T D_i (exactly zero for an absent adapter, not SVD rounding noise).
    components = [(u.T @ (b @ a)) / s[:, None] for b, a in factors]
    assert all(torch.allclose(c, vh[:, i * width : (i + 1) * width], atol=1e-8) for i, c in enumerate(components))
    return _optimal((u * s) @ _peft_merge(components, weights, options, name, dare), svd_rank)


def dense_tsv(factors, weights, options, name, svd_rank=None):
    """Top ceil(keep r_i) triplets of each dense D_i, polar factors of the concatenated bases, scaled by w_i S_i."""
    keep = options.get("keep") or 1 / len(factors)
    lefts, rights, values = [], [], []
    for (b, a), weight in zip(factors, weights, strict=True):
        u, s, vh = _dense_svd(b @ a)
        count = 0 if s.numel() == 0 else min(s.numel(), max(1, math.ceil(keep * s.numel() - 1e-9)))
        lefts.append(u[:, :count])
        rights.append(vh[:count].T)
        values.append(weight * s[:count])
    left, right = _dense_polar(torch.cat(lefts, dim=1)), _dense_polar(torch.cat(rights, dim=1))
    return _optimal((left * torch.cat(values)) @ right.T, svd_rank)


def dense_iso_c(factors, weights, options, name, svd_rank=None):
    """mean(S) U V^T of the dense sum(w_i D_i), keeping its top svd_rank directions when given."""
    u, s, vh = _dense_svd(sum(w * (b @ a) for (b, a), w in zip(factors, weights, strict=True)))
    if s.numel() == 0:
        return torch.zeros(factors[0][0].shape[0], factors[0][1].shape[1], dtype=torch.float64)
    count = s.numel() if svd_rank is None else min(svd_rank, s.numel())
    return float(s.mean()) * u[:, :count] @ vh[:count]


def dense_iso_cts(factors, weights, options, name, svd_rank=None):
    """Iso-CTS on dense matrices: common directions of sum(w_i D_i), task directions of the projected w_i D_i."""
    deltas = [w * (b @ a) for (b, a), w in zip(factors, weights, strict=True)]
    ranks = [_dense_rank(torch.linalg.svdvals(d)) for d in deltas]
    active = [d for d, w, r in zip(deltas, weights, ranks, strict=True) if w != 0 and r > 0]
    out_features, in_features = deltas[0].shape
    total = min(out_features, in_features, sum(r for d, w, r in zip(deltas, weights, ranks, strict=True) if w != 0))
    per_task = round((total - int(total * options.get("common_space_fraction", 0.8))) / len(active))
    u, s, vh = _dense_svd(sum(deltas))
    common = min(max(0, total - per_task * len(active)), s.numel())
    lefts, rights, values = [u[:, :common]], [vh[:common].T], [s[:common]]
    projector = torch.eye(out_features, dtype=torch.float64) - u[:, :common] @ u[:, :common].T
    for delta in active:  # a projection that leaves only rounding noise (relative to the task) is zero
        ut, st, vht = _dense_svd(projector @ delta, top=float(torch.linalg.matrix_norm(delta, ord=2)))
        lefts.append(ut[:, :per_task])
        rights.append(vht[:per_task].T)
        values.append(st[:per_task])
    spectrum = torch.cat(values)
    left, right = _dense_polar(torch.cat(lefts, dim=1)), _dense_polar(torch.cat(rights, dim=1))
    if svd_rank is not None and spectrum.numel() > svd_rank:
        order = sorted(range(spectrum.numel()), key=lambda j: -float(spectrum[j]))[:svd_rank]
        left, right = left[:, order], right[:, order]
    return float(spectrum.mean()) * left @ right.T


# name -> reference(factors, weights, options, module_name, svd_rank) -> the canonical (out x in) merged delta
FACTOR_REFERENCES = {
    "core_ties": dense_core_space,
    "core_dare": lambda *args, **kwargs: dense_core_space(*args, **kwargs, dare=True),
    "knots_ties": dense_knots,
    "knots_dare": lambda *args, **kwargs: dense_knots(*args, **kwargs, dare=True),
    "tsv": dense_tsv,
    "iso_c": dense_iso_c,
    "iso_cts": dense_iso_cts,
}
