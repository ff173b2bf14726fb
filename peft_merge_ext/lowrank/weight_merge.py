"""Adding a canonical low-rank delta to a base weight, in the weight's own layout.

Shared by the in-memory `save_merged` / `push_merged` path and the out-of-core `merge_checkpoint`, so both produce
bit-identical tensors for the same inputs and dtype. The sum is built a block of rows at a time (the base rows in
float32, then one fused `addmm_` adds the factors' product), so the extra memory is one block (about 4 MB, small
enough to stay in cache between the add and the cast) plus the output, not several full-size float32 temporaries.
"""

from __future__ import annotations

import torch

from ..plugins.contract import LowRankDelta

__all__ = ["DEFAULT_BLOCK_ELEMENTS", "merge_delta_into_weight"]

DEFAULT_BLOCK_ELEMENTS = 1 << 20


def merge_delta_into_weight(
    weight: torch.Tensor,
    delta: LowRankDelta,
    transpose: bool,
    out_dtype: torch.dtype | None = None,
    *,
    inplace: bool = False,
    block_elements: int = DEFAULT_BLOCK_ELEMENTS,
    magnitude: torch.Tensor | None = None,
) -> torch.Tensor:
    """`weight + delta`, computed in float32 (float64 for a float64 weight) on the weight's device, a block of rows
    at a time, and cast to `out_dtype` (the weight's dtype by default).

    Args:
        weight (`torch.Tensor`): The base weight (`out x in`, `in x out` when `transpose`, or a conv kernel).
        delta (`LowRankDelta`): Canonical factors of the delta.
        transpose (`bool`): Whether the weight is stored `in x out` (GPT-2 `Conv1D`, embeddings).
        out_dtype (`torch.dtype`, *optional*): The result's dtype; the weight's by default.
        inplace (`bool`, *optional*, defaults to `False`): Write the result into `weight` itself (only honoured when
            `weight` is contiguous and already of `out_dtype`); for callers that own the tensor, such as the
            out-of-core merge. The user's model weights are never passed with `inplace=True`.
        block_elements (`int`, *optional*): About how many elements each block of rows holds.
        magnitude (`torch.Tensor`, *optional*): A DoRA magnitude vector (one entry per output feature): each output
            feature of `weight + delta` is rescaled to this norm, `m / ||W + delta||` (norms over the input features,
            conv kernels included). Rows are output features unless `transpose`; then the column norms are gathered in
            a first pass over the blocks and applied in a second one.

    Returns:
        `torch.Tensor`: The merged weight.
    """
    out_dtype = out_dtype or weight.dtype
    compute_dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
    left = delta.B.to(weight.device, compute_dtype)
    right = delta.A.to(weight.device, compute_dtype)
    if inplace and weight.dtype == out_dtype and weight.is_contiguous():
        out = weight
    else:
        out = torch.empty(weight.shape, dtype=out_dtype, device=weight.device)
    rows = weight.shape[0]
    if rows == 0:
        return out
    weight_rows = weight.reshape(rows, -1)
    out_rows = out.view(rows, -1)
    step = max(1, block_elements // max(weight_rows.shape[1], 1))
    # One buffer for every block: fresh memory for each block would cost a page fault per 4 KB.
    buffer = torch.empty((min(step, rows), weight_rows.shape[1]), dtype=compute_dtype, device=weight.device)

    def merged_block(start: int, stop: int) -> torch.Tensor:
        block = buffer[: stop - start]
        block.copy_(weight_rows[start:stop])
        if transpose:
            block.addmm_(right[:, start:stop].T, left.T)
        else:
            block.addmm_(left[start:stop], right)
        return block

    column_scale = None
    if magnitude is not None and transpose:
        squares = torch.zeros(weight_rows.shape[1], dtype=compute_dtype, device=weight.device)
        for start in range(0, rows, step):
            squares += merged_block(start, min(rows, start + step)).square().sum(dim=0)
        column_scale = magnitude.reshape(-1).to(weight.device, compute_dtype) / squares.sqrt()
    elif magnitude is not None:
        magnitude = magnitude.reshape(-1).to(weight.device, compute_dtype)  # a conv's: 1 x out x 1 x 1
    for start in range(0, rows, step):
        stop = min(rows, start + step)
        block = merged_block(start, stop)
        if column_scale is not None:
            block.mul_(column_scale)
        elif magnitude is not None:
            block.mul_((magnitude[start:stop] / torch.linalg.vector_norm(block, dim=1)).unsqueeze(1))
        out_rows[start:stop] = block
    return out
