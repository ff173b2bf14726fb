"""mergekit's merge methods, reproduced on the full weights of one module at a time.

mergekit merges whole models: for a `base+adapter` reference it first writes `W + D_i` to disk as a full model, then
merges tensor by tensor. `linear`, `task_arithmetic` and `ties` are linear (or sign-masked) in the inputs, but
`slerp` and `karcher` take norms and angles of the full weights `W + D_i`, not of the deltas, so the result depends on
`W`. Each function here takes the inputs of one tensor (already in mergekit's working dtype, the config's `dtype`)
and returns what mergekit 0.1.5 computes for it, with the same defaults and the same dtype at each step (float32
accumulators, float64 for float64 inputs), so that results agree to float rounding.

`METHODS` declares, per method, its parameters (shared ones and per-model ones), their defaults, and whether a base
model is required. Random methods (`dare_*`, `della*`) and the others are not here: they are refused by the config
reader.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch is imported when a method runs: reading a configuration does not need it
    import torch

__all__ = ["METHODS", "MethodSpec", "karcher", "linear", "slerp", "task_arithmetic"]

REQUIRED = object()


def _accumulator(dtype: torch.dtype) -> torch.dtype:
    import torch

    return torch.float64 if dtype == torch.float64 else torch.float32


def linear(tensors: Sequence[torch.Tensor], weights: Sequence[float], normalize: bool = True) -> torch.Tensor:
    """`sum(w_i X_i)` (divided by `sum(w_i)` with `normalize`), accumulated in float32, in the inputs' dtype.

    Args:
        tensors (`Sequence[torch.Tensor]`): The inputs' values of one tensor.
        weights (`Sequence[float]`): One weight per input.
        normalize (`bool`, *optional*, defaults to `True`): Divide by the sum of the weights.
    """
    import torch

    dtype = tensors[0].dtype
    work = _accumulator(dtype)
    coefficients = torch.tensor(list(weights), dtype=work, device=tensors[0].device)
    result = torch.zeros(tensors[0].shape, dtype=work, device=tensors[0].device)
    for tensor, coefficient in zip(tensors, coefficients, strict=True):
        result.addcmul_(tensor, coefficient)
    if normalize:
        result.div_(coefficients.sum())
    return result.to(dtype)


def _keep_largest(delta: torch.Tensor, density: float, rescale: bool) -> torch.Tensor:
    """TIES' magnitude pruning: keep the `max(1, int(density * n))` entries of largest magnitude (`rescale`: then
    restore the L1 norm)."""
    import torch

    if density >= 1:
        return delta
    if density <= 0 or delta.numel() == 0:
        return torch.zeros_like(delta)
    count = max(1, int(density * delta.numel()))
    magnitudes = delta.abs().reshape(-1)
    if magnitudes.device.type == "cpu":
        magnitudes = magnitudes.float()
    order = torch.argsort(magnitudes, descending=True)[:count]
    mask = torch.zeros(delta.numel(), dtype=delta.dtype, device=delta.device)
    mask[order] = 1
    kept = delta * mask.reshape(delta.shape)
    if not rescale:
        return kept
    before, after = delta.abs().sum(), kept.abs().sum()
    if before < 1e-7 or after < 1e-7:
        return kept
    return kept * (before / after)


def task_arithmetic(
    base: torch.Tensor,
    tensors: Sequence[torch.Tensor],
    weights: Sequence[float],
    *,
    normalize: bool = False,
    lambda_: float = 1.0,
    densities: Sequence[float] | None = None,
    rescale: bool = False,
    sign_consensus: bool = False,
) -> torch.Tensor:
    """Task arithmetic on the deltas `X_i - base` (in the inputs' dtype), and TIES with `densities` (magnitude
    pruning) and `sign_consensus` (keep the entries agreeing with the sign of the weighted sum).

    Args:
        base (`torch.Tensor`): The base model's values.
        tensors (`Sequence[torch.Tensor]`): The other inputs' values.
        weights (`Sequence[float]`): One weight per other input.
        normalize (`bool`): Divide by the sum of the weights (of the entries kept, with `sign_consensus`).
        lambda_ (`float`): Scale of the merged delta.
        densities (`Sequence[float]`, *optional*): Per input, the fraction of entries kept (TIES).
        rescale (`bool`): Restore each pruned delta's L1 norm.
        sign_consensus (`bool`): TIES' sign election (mergekit's `consensus_method: sum`).
    """
    import torch

    if not tensors:
        return base
    deltas = base.new_empty((len(tensors), *base.shape))
    for index, tensor in enumerate(tensors):
        delta = tensor - base
        if densities is not None:
            delta = _keep_largest(delta, densities[index], rescale)
        deltas[index] = delta
    coefficients = torch.tensor(list(weights), dtype=deltas.dtype, device=deltas.device)
    coefficients = coefficients.reshape(-1, *([1] * base.dim()))
    deltas.mul_(coefficients)
    if sign_consensus:
        elected = (deltas.sum(dim=0) >= 0).to(deltas.dtype) * 2 - 1
        agrees = deltas.sign() == elected
        mixed = (deltas * agrees).sum(dim=0)
        divisor = (coefficients * agrees).sum(dim=0)
        divisor[divisor == 0] = 1
    else:
        mixed = deltas.sum(dim=0)
        divisor = coefficients.sum(dim=0)
        divisor[divisor.abs() < 1e-8] = 1
    if normalize:
        mixed /= divisor
    if lambda_ != 1:
        mixed *= lambda_
    return (base + mixed).to(base.dtype)


def slerp(
    v0: torch.Tensor, v1: torch.Tensor, t: float, dot_threshold: float = 0.9995, eps: float = 1e-8
) -> torch.Tensor:
    """Spherical interpolation between two whole tensors (the base model's `v0` and the other input's `v1`),
    angle from their normalized inner product, linear interpolation when they are nearly colinear.

    Args:
        v0 (`torch.Tensor`): The base model's values (`t = 0`).
        v1 (`torch.Tensor`): The other model's values (`t = 1`).
        t (`float`): The interpolation factor.
    """
    import torch

    work = _accumulator(v0.dtype)
    a, b = v0.reshape(-1).to(work), v1.reshape(-1).to(work)
    norm_a, norm_b = torch.linalg.vector_norm(a), torch.linalg.vector_norm(b)
    norm_a = norm_a if norm_a > eps else torch.ones_like(norm_a)
    norm_b = norm_b if norm_b > eps else torch.ones_like(norm_b)
    dot = float(((a / norm_a) * (b / norm_b)).sum().clamp(-1, 1))
    if abs(dot) > dot_threshold:
        first, second = 1 - t, t
    else:
        theta = math.acos(dot)
        first = math.sin((1 - t) * theta) / math.sin(theta)
        second = math.sin(t * theta) / math.sin(theta)
    weights = torch.tensor([first, second], dtype=work, device=a.device)
    return (weights[0] * a + weights[1] * b).to(v0.dtype).reshape(v0.shape)


def karcher(tensors: Sequence[torch.Tensor], max_iter: int = 10, tol: float = 1e-5) -> torch.Tensor:
    """The Karcher (Riemannian) mean of the whole tensors' directions on the unit sphere, equal weights, scaled by
    their mean norm; the iteration runs in the inputs' dtype as mergekit's does.

    Args:
        tensors (`Sequence[torch.Tensor]`): The inputs' values.
        max_iter (`int`): Iteration limit.
        tol (`float`): Stop when the tangent step is shorter than this; inputs with norm below it are skipped.
    """
    import torch

    if len(tensors) == 1:
        return tensors[0]
    work = _accumulator(tensors[0].dtype)
    alphas = [1.0 / len(tensors)] * len(tensors)
    norms = [torch.linalg.vector_norm(tensor.to(work)) for tensor in tensors]
    units = [
        torch.zeros_like(tensor) if norm.item() == 0.0 else (tensor / norm).to(tensor.dtype)
        for tensor, norm in zip(tensors, norms, strict=True)
    ]
    valid = [index for index, norm in enumerate(norms) if norm.item() > tol]
    if not valid:
        return sum(tensor * 0 for tensor in tensors)
    total = sum(alphas[index] for index in valid)
    pull = [(alphas[index] / total, units[index]) for index in valid]
    mean = torch.zeros_like(units[valid[0]])
    for alpha, unit in pull:
        mean += alpha * unit
    length = torch.linalg.vector_norm(mean.to(work))
    mean = units[valid[0]].clone() if length.item() < tol else (mean / length).to(mean.dtype)
    for _ in range(max_iter):
        tangent = torch.zeros_like(mean)
        for alpha, unit in pull:
            cosine = torch.clamp(torch.dot(mean.flatten(), unit.flatten()), -1.0, 1.0)
            angle = torch.arccos(cosine)
            if angle.item() < tol:
                continue
            tangent += alpha * (angle / torch.sin(angle)) * (unit - cosine * mean)
        step = torch.linalg.vector_norm(tangent.to(work))
        if step.item() < tol:
            break
        mean = (torch.cos(step) * mean + torch.sin(step) * (tangent / step)).to(mean.dtype)
        length = torch.linalg.vector_norm(mean.to(work))
        if length.item() > tol:
            mean = (mean / length).to(mean.dtype)
    scale = sum(alpha * norm for alpha, norm in zip(alphas, norms, strict=True))
    return scale * mean


@dataclass(frozen=True)
class MethodSpec:
    """A supported mergekit method: its parameters and whether it needs `base_model`.

    Args:
        shared (`dict[str, Any]`): Parameter -> default (`REQUIRED` when none) of parameters set once per tensor.
        per_model (`dict[str, Any]`): Parameter -> default of parameters set per input model.
        base (`str`): `"required"` (task_arithmetic, ties, slerp) or `"input"` (linear, karcher: `base_model`, when
            given, is one more input, as in mergekit).
        per_model_includes_base (`bool`): Whether per-model parameters are read for the base model too.
        max_inputs (`int`, *optional*): The number of inputs the method takes at most (slerp: 2).
    """

    shared: dict[str, Any] = field(default_factory=dict)
    per_model: dict[str, Any] = field(default_factory=dict)
    base: str = "input"
    per_model_includes_base: bool = True
    max_inputs: int | None = None


_TASK = {"normalize": False, "rescale": False, "int8_mask": False, "lambda": 1.0}
METHODS = {
    "linear": MethodSpec(shared={"normalize": True}, per_model={"weight": REQUIRED}),
    "task_arithmetic": MethodSpec(
        shared=_TASK, per_model={"weight": REQUIRED, "density": 1.0}, base="required", per_model_includes_base=False
    ),
    "ties": MethodSpec(
        shared={**_TASK, "normalize": True},
        per_model={"weight": REQUIRED, "density": 1.0},
        base="required",
        per_model_includes_base=False,
    ),
    "slerp": MethodSpec(shared={"t": REQUIRED}, base="required", max_inputs=2),
    "karcher": MethodSpec(shared={"max_iter": 10, "tol": 1e-5}),
}


def merge_tensor(
    method: str, inputs: Sequence[torch.Tensor], base_index: int | None, shared: dict[str, Any], per_model: list[dict]
) -> torch.Tensor:
    """One tensor merged with `method`: `inputs` in mergekit's order, `per_model[i]` the parameters of input `i`.

    Args:
        method (`str`): A key of `METHODS`.
        inputs (`Sequence[torch.Tensor]`): Every input's values, in the working dtype.
        base_index (`int`, *optional*): Which input is `base_model`.
        shared (`dict`): The shared parameters, resolved for this tensor.
        per_model (`list[dict]`): The per-model parameters, resolved for this tensor, one dict per input.
    """
    if method == "linear":
        return linear(inputs, [p["weight"] for p in per_model], bool(shared["normalize"]))
    if method == "karcher":
        return karcher(inputs, int(shared["max_iter"]), float(shared["tol"]))
    others = [index for index in range(len(inputs)) if index != base_index]
    base = inputs[base_index]
    if method == "slerp":
        return slerp(base, inputs[others[0]], float(shared["t"]))
    ties = method == "ties"
    return task_arithmetic(
        base,
        [inputs[index] for index in others],
        [per_model[index]["weight"] for index in others],
        normalize=bool(shared["normalize"]),
        lambda_=float(shared["lambda"]),
        densities=[per_model[index]["density"] for index in others] if ties else None,
        rescale=bool(shared["rescale"]),
        sign_consensus=ties,
    )
