"""Example peft-merge-ext plugin: the Model Stock combination type (Jang et al., 2024, arXiv:2403.19522).

Model Stock averages `k` fine-tuned task vectors and pulls the average back towards the base model by a ratio that
depends only on the angle `theta` between the task vectors:

    merged = t * mean(D_i),    t = k cos(theta) / (1 + (k - 1) cos(theta))

(the paper's `w_H = t * w_avg + (1 - t) * w_0`, written for deltas `D_i = w_i - w_0`). The ratio is computed per
module from the Gram matrix of the deltas, so the merge never forms a dense `out x in` matrix.

Usage, after `pip install peft-merge-ext-example`:

```python
model.add_weighted_adapter(["a", "b", "c"], [1, 1, 1], "stock", combination_type="model_stock")
```
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from peft_merge_ext.plugins import (
    LowRankDelta,
    MergeInputError,
    ModuleContext,
    gram_matrix,
    hookimpl,
    linear_combination,
)

__all__ = ["model_stock", "model_stock_ratio", "register_combination_types"]

__version__ = "0.1.0"


def model_stock_ratio(cosine: float, k: float) -> float:
    """The Model Stock interpolation ratio `t = k cos / (1 + (k - 1) cos)`.

    Args:
        cosine (`float`): The cosine of the angle between the task vectors, clamped to `[0, 1]`: deltas at 90 degrees
            or more agree on nothing, so Model Stock falls back to the base model (`t = 0`).
        k (`float`): The number of averaged deltas (the effective number with unequal weights, at least 1).

    Returns:
        `float`: The ratio `t` in `[0, 1]`; 1 for `k = 1` or colinear deltas.
    """
    cosine = min(max(cosine, 0.0), 1.0)
    return k * cosine / (1.0 + (k - 1.0) * cosine)


def _mean_pairwise_cosine(gram: Any, weights: Sequence[float]) -> float | None:
    """Mean cosine over pairs of non-zero deltas, pair `(i, j)` weighted by `w_i w_j`; `None` without such pairs."""
    norms = [math.sqrt(max(float(gram[i, i]), 0.0)) for i in range(len(weights))]
    total, pair_weight = 0.0, 0.0
    for i in range(len(weights)):
        for j in range(i + 1, len(weights)):
            weight = weights[i] * weights[j]
            if norms[i] == 0.0 or norms[j] == 0.0 or weight == 0.0:
                continue
            total += weight * float(gram[i, j]) / (norms[i] * norms[j])
            pair_weight += weight
    return total / pair_weight if pair_weight > 0 else None


def model_stock(deltas: Sequence[LowRankDelta], weights: Sequence[float], context: ModuleContext) -> LowRankDelta:
    """Model Stock of one module's deltas.

    With normalized weights `p_i = w_i / sum(w)`, the merged delta is `t * sum(p_i D_i)` where:

    - `cos(theta)` is the mean pairwise cosine of the deltas (pair `(i, j)` weighted by `p_i p_j`; modules an
      adapter does not touch arrive as zero deltas and are left out of the angle);
    - `k` is the effective number of averaged deltas `1 / sum(p_i^2)` (Kish), which is exactly `k` for equal weights
      and keeps the paper's derivation valid for a weighted mean;
    - when fewer than two non-zero deltas remain, `cos(theta) = 1`, so `t = 1` (the weighted mean itself).

    Records `t`, `cos_theta` and `k_effective` in the merge report.
    """
    total = sum(weights)
    normalized = [w / total for w in weights]
    cosine = _mean_pairwise_cosine(gram_matrix(deltas), normalized)
    k_effective = 1.0 / sum(p * p for p in normalized)
    t = model_stock_ratio(1.0 if cosine is None else cosine, k_effective)
    merged, stats = linear_combination(deltas, [t * p for p in normalized], context.svd_rank)
    context.record(t=t, cos_theta=cosine, k_effective=k_effective, rank=stats.rank, energy_kept=stats.energy_kept)
    return merged


def validate_model_stock(weights: list[float], options: dict[str, Any]) -> None:
    """Model Stock averages: the weights must be non-negative with a positive sum."""
    if any(w < 0 for w in weights) or not sum(weights) > 0:
        raise MergeInputError(
            f"combination_type='model_stock' takes a weighted mean: weights must be non-negative with a positive "
            f"sum, got {weights}. Use equal weights (e.g. [1, 1, 1]) for the paper's plain mean."
        )


@hookimpl
def register_combination_types(register: Any) -> None:
    """Register `model_stock`."""
    register(
        "model_stock",
        model_stock,
        description="Model Stock (Jang et al., 2024): the mean delta scaled by t = k cos / (1 + (k - 1) cos).",
        validate=validate_model_stock,
    )
