"""What a merge does to a base tensor beyond adding `B @ A`: one description, one function, both weight sources.

An adapter trained with PEFT's LoRA can carry more than low-rank factors. Each piece becomes a `TensorEdit` on the base
tensor it changes, and `apply_edit` computes the merged tensor, for the in-memory `save_merged` path
(`peft_bridge.weights`) and the on-disk path (`checkpoint.base_checkpoint`) alike, so both give bit-identical tensors:

| adapter piece                         | merged tensor (`w`: the adapter's coefficient in the merge)            |
|---------------------------------------|-------------------------------------------------------------------------|
| DoRA magnitude `m` (`use_dora`)       | `m / ||W + BA|| * (W + BA)`, norms per output feature (one adapter)     |
| `lora_B.bias` (`lora_bias`)           | `bias + sum_i w_i s_i b_i`                                              |
| trained copy (`modules_to_save`)      | `W + sum_i w_i (copy_i - W)`; one adapter with `w = 1`: the copy        |
| trained rows (`trainable_token_indices`) | the same rule, row by row; one adapter with `w = 1`: the rows         |
| LoRA on an `nn.Parameter` (`target_parameters`, MoE experts) | `W[e] + sum_i w_i B_ie A_ie` for every expert `e` |
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from ..plugins.contract import LowRankDelta
from .weight_merge import merge_delta_into_weight

__all__ = ["AdapterExtras", "ExpertFactors", "Stored", "TensorEdit", "apply_edit", "expert_deltas", "same_edits"]


@dataclass(frozen=True)
class Stored:
    """A tensor an adapter stores, read only when the merge needs it.

    Args:
        tag (`str`): Identifies the stored tensor (two edits reading the same tensor have the same tag).
        read (`Callable[[], torch.Tensor]`): Returns the tensor as stored (not modified by the caller).
        scale (`float`, *optional*, defaults to 1.0): A factor applied to it (the LoRA scaling of a bias).
    """

    tag: str
    read: Callable[[], torch.Tensor] = field(compare=False)
    scale: float = 1.0


@dataclass(frozen=True)
class ExpertFactors:
    """LoRA on an `nn.Parameter` (PEFT's `target_parameters`): one canonical delta per expert.

    Args:
        tag (`str`): Identifies the stored factors.
        read (`Callable[[], list[LowRankDelta]]`): The per-expert deltas, scaling folded into `B`.
        transpose (`bool`): Whether each expert's weight is stored `in x out`.
        stacked (`bool`): Whether the parameter is a stack of experts (3-D) rather than one matrix.
    """

    tag: str
    read: Callable[[], list[LowRankDelta]] = field(compare=False)
    transpose: bool = False
    stacked: bool = True


@dataclass
class AdapterExtras:
    """Everything one adapter adds beyond its LoRA factors on modules, keyed by the base tensor it changes."""

    magnitudes: dict[str, Stored] = field(default_factory=dict)
    biases: dict[str, Stored] = field(default_factory=dict)
    copies: dict[str, Stored] = field(default_factory=dict)
    rows: dict[str, tuple[tuple[int, ...], Stored]] = field(default_factory=dict)
    experts: dict[str, ExpertFactors] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.magnitudes or self.biases or self.copies or self.rows or self.experts)

    def keys(self) -> set[str]:
        """Every base tensor key this adapter changes beyond its LoRA factors."""
        return {*self.magnitudes, *self.biases, *self.copies, *self.rows, *self.experts}


@dataclass
class TensorEdit:
    """The combined edit of one base tensor (see the module docstring for each rule)."""

    key: str
    magnitude: Stored | None = None
    add: list[tuple[float, Stored]] = field(default_factory=list)
    copies: list[tuple[float, Stored]] = field(default_factory=list)
    rows: list[tuple[float, tuple[int, ...], Stored]] = field(default_factory=list)
    experts: list[tuple[float, ExpertFactors]] = field(default_factory=list)

    def signature(self) -> tuple:
        """Equal for two edits that give equal results on the same tensor (tied weights keep their tie then)."""
        return (
            self.magnitude,
            tuple(self.add),
            tuple(self.copies),
            tuple((w, rows, s) for w, rows, s in self.rows),
            tuple(self.experts),
        )


def same_edits(edits: Mapping[str, TensorEdit], keys: Sequence[str]) -> bool:
    """Whether tied tensors `keys` get equal edits (none at all included), so that they stay tied when merged."""
    return len({edits[key].signature() if key in edits else None for key in keys}) == 1


def expert_deltas(a: torch.Tensor, b: torch.Tensor, experts: int, scaling: float, dtype: torch.dtype) -> list:
    """The canonical per-expert deltas of PEFT's `ParamWrapper` factors: `A` is `(experts * r) x in` with expert `e`
    in rows `e*r ... e*r + r - 1`, `B` is `out x (r * experts)` with expert `e` in columns `e, e + experts, ...`."""
    rank = a.shape[0] // experts
    a = a.to(dtype).reshape(experts, rank, a.shape[-1])
    b = b.to(dtype).reshape(b.shape[0], rank, experts)
    return [LowRankDelta(b[:, :, e] * scaling, a[e].clone()) for e in range(experts)]


def _compute_dtype(weight: torch.Tensor) -> torch.dtype:
    return torch.float64 if weight.dtype == torch.float64 else torch.float32


def _replaced(weight: torch.Tensor, edit: TensorEdit, out_dtype: torch.dtype) -> torch.Tensor:
    """`W + sum w (copy - W)`, the copy itself for a single copy of weight 1."""
    if len(edit.copies) == 1 and edit.copies[0][0] == 1.0:
        return edit.copies[0][1].read().to(weight.device, out_dtype, copy=True)
    compute = _compute_dtype(weight)
    base = weight.to(compute)
    result = base.clone()
    for coefficient, stored in edit.copies:
        result += coefficient * (stored.read().to(weight.device, compute) - base)
    return result.to(out_dtype)


def _rows_replaced(weight: torch.Tensor, edit: TensorEdit, out_dtype: torch.dtype) -> torch.Tensor:
    """The same rule as `_replaced`, for the trained rows only."""
    result = weight.to(out_dtype, copy=True)
    if len(edit.rows) == 1 and edit.rows[0][0] == 1.0:
        _, indices, stored = edit.rows[0]
        index = torch.tensor(indices, device=weight.device)
        return result.index_copy_(0, index, stored.read().to(weight.device, out_dtype))
    compute = _compute_dtype(weight)
    touched = sorted({i for _, indices, _ in edit.rows for i in indices})
    position = {row: p for p, row in enumerate(touched)}
    union = torch.tensor(touched, device=weight.device)
    base = weight.index_select(0, union).to(compute)
    accumulated = base.clone()
    for coefficient, indices, stored in edit.rows:
        at = torch.tensor([position[i] for i in indices], device=weight.device)
        accumulated.index_add_(0, at, coefficient * (stored.read().to(weight.device, compute) - base[at]))
    return result.index_copy_(0, union, accumulated.to(out_dtype))


def _experts_merged(weight: torch.Tensor, edit: TensorEdit, out_dtype: torch.dtype) -> torch.Tensor:
    layouts = {(f.transpose, f.stacked) for _, f in edit.experts}
    transpose, stacked = layouts.pop()
    read = [(coefficient, factors.read()) for coefficient, factors in edit.experts]

    def summed(expert: int) -> LowRankDelta:
        left = torch.cat([c * deltas[expert].B for c, deltas in read], dim=1)
        right = torch.cat([deltas[expert].A for _, deltas in read], dim=0)
        return LowRankDelta(left, right)

    if not stacked:
        return merge_delta_into_weight(weight, summed(0), transpose, out_dtype)
    out = torch.empty(weight.shape, dtype=out_dtype, device=weight.device)
    for expert in range(weight.shape[0]):
        out[expert] = merge_delta_into_weight(weight[expert], summed(expert), transpose, out_dtype)
    return out


def apply_edit(
    weight: torch.Tensor,
    delta: LowRankDelta | None,
    transpose: bool,
    edit: TensorEdit | None,
    out_dtype: torch.dtype | None = None,
    *,
    inplace: bool = False,
) -> torch.Tensor:
    """The merged tensor: `weight` with its combined LoRA `delta` (if any) and its `edit` (if any) applied.

    Args:
        weight (`torch.Tensor`): The base tensor.
        delta (`LowRankDelta`, *optional*): Its combined low-rank delta.
        transpose (`bool`): Whether `weight` is stored `in x out`.
        edit (`TensorEdit`, *optional*): What the adapters add beyond `B @ A` here.
        out_dtype (`torch.dtype`, *optional*): The result's dtype; the weight's by default.
        inplace (`bool`, *optional*, defaults to `False`): Passed to `merge_delta_into_weight` (callers owning
            `weight` only).

    Returns:
        `torch.Tensor`: The merged tensor.
    """
    out_dtype = out_dtype or weight.dtype
    if edit is None:
        if delta is None:
            return weight.to(out_dtype)
        return merge_delta_into_weight(weight, delta, transpose, out_dtype, inplace=inplace)
    if edit.experts:
        return _experts_merged(weight, edit, out_dtype)
    compute = _compute_dtype(weight)
    more = delta is not None or bool(edit.add)
    if edit.copies:
        weight = _replaced(weight, edit, compute if more else out_dtype)
        inplace = True
    elif edit.rows:
        weight = _rows_replaced(weight, edit, compute if more else out_dtype)
        inplace = True
    if delta is not None:
        magnitude = edit.magnitude.read() if edit.magnitude is not None else None
        weight = merge_delta_into_weight(
            weight, delta, transpose, compute if edit.add else out_dtype, inplace=inplace, magnitude=magnitude
        )
    if edit.add:
        result = weight.to(compute)
        for coefficient, stored in edit.add:
            result = result + stored.read().to(weight.device, compute) * stored.scale * coefficient
        return result.to(out_dtype)
    return weight.to(out_dtype)
