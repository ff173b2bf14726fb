"""Adding a canonical low-rank delta to a base weight, in the weight's own layout.

Shared by the in-memory `save_merged` / `push_merged` path and the out-of-core `merge_checkpoint`, so both produce
bit-identical tensors for the same inputs and dtype.
"""

from __future__ import annotations

import torch

from .contract import LowRankDelta

__all__ = ["delta_in_weight_layout", "merge_delta_into_weight"]


def delta_in_weight_layout(delta: LowRankDelta, weight_shape: tuple[int, ...], transpose: bool) -> torch.Tensor:
    """The dense delta laid out like the base weight.

    Args:
        delta (`LowRankDelta`): Canonical factors (`out x in`, scaling folded in).
        weight_shape (`tuple[int, ...]`): The base weight's shape.
        transpose (`bool`): `True` when the weight is stored `in x out`: GPT-2 `Conv1D` (`fan_in_fan_out`) and
            embeddings (`num_embeddings x embedding_dim`).

    Returns:
        `torch.Tensor`: `B @ A` (transposed and/or reshaped to `weight_shape` for conv kernels).
    """
    dense = delta.B @ delta.A
    if transpose:
        dense = dense.T
    if tuple(dense.shape) != tuple(weight_shape):
        dense = dense.reshape(weight_shape)
    return dense


def merge_delta_into_weight(
    weight: torch.Tensor, delta: LowRankDelta, transpose: bool, out_dtype: torch.dtype | None = None
) -> torch.Tensor:
    """`weight + delta` computed in float32 (float64 if the weight is float64) on the weight's device, cast to
    `out_dtype` (the weight's dtype by default). The input weight is not modified.
    """
    compute_dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
    factors = LowRankDelta(delta.B.to(weight.device, compute_dtype), delta.A.to(weight.device, compute_dtype))
    dense = delta_in_weight_layout(factors, tuple(weight.shape), transpose)
    merged = weight.to(compute_dtype) + dense
    return merged.to(out_dtype or weight.dtype)
