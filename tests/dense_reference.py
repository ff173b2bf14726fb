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
