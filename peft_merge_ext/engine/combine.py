"""Combine: the one place a combination function is called, for every entry point.

A factor source (a live PEFT model, `peft_bridge.source`, or adapter folders, `checkpoint.adapter_files`) lists the
modules to merge as `FactorModule`s; `combine_module` reads each adapter's canonical factors there (zeros where an
adapter does not touch the module), checks them, and produces the module's merged factors: the single adapter as it
is (times its weight) when no method was asked for, or the plugin type's result, checked and bounded to `svd_rank`.
`ReportBuilder` gathers the per-module statistics into the `MergeReport`.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import CombinationError, MergeInputError
from ..lowrank.factor_math import compress, compute_dtype_for
from ..plugins.contract import LowRankDelta, ModuleContext
from .report import MergeReport, ModuleReport
from .request import MergeRequest

__all__ = ["FactorModule", "MergedModule", "ReportBuilder", "combine_factors", "combine_module", "num_layers", "plain"]

_LAYER_INDEX = re.compile(r"\.(\d+)(?:\.|$)")


@dataclass
class FactorModule:
    """One module whose LoRA factors a source can read.

    Args:
        name (`str`): The module's name in the base model.
        kind (`str`): `"linear"` (also GPT-2 `Conv1D`), `"embedding"` or `"conv"`.
        shape (`tuple[int, int]`): `(out, in)` of the canonical delta.
        read (`Callable[[str], LowRankDelta | None]`): Adapter name -> its canonical factors (scaling folded into
            `B`) in the compute dtype, fresh tensors the caller may modify; `None` when the adapter is absent here.
        device (`torch.device`): Where the factors are read to and combined.
        storage_dtype (`torch.dtype`): The dtype the factors are stored in (a combined adapter is saved in it).
        transpose (`bool`): Whether the base weight is stored `in x out` (GPT-2 `Conv1D`, embeddings).
        handle (`Any`): What the source needs to find the module again (the PEFT layer, for a live model).
        kernel (`tuple[int, ...]`): The conv kernel size, `()` for other kinds.
    """

    name: str
    kind: str
    shape: tuple[int, int]
    read: Callable[[str], LowRankDelta | None]
    device: torch.device
    storage_dtype: torch.dtype
    transpose: bool = False
    handle: Any = None
    kernel: tuple[int, ...] = ()

    @property
    def layer_index(self) -> int | None:
        """The first number in the dotted name (the block index), if any."""
        match = _LAYER_INDEX.search(self.name)
        return int(match.group(1)) if match else None


@dataclass
class MergedModule:
    """A module's merged factors (canonical, scaling folded in), ready to be added to its base weight or saved."""

    module: FactorModule
    delta: LowRankDelta

    @property
    def weight_key(self) -> str:
        """The key of the base weight the delta applies to."""
        return f"{self.module.name}.weight"


def num_layers(config: Mapping[str, Any] | None, module_names: Sequence[str] = ()) -> int | None:
    """The number of blocks, for depth schedules: from the config (its `text_config` for multimodal models), else
    one more than the largest block index among `module_names`."""
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        value = (config or {}).get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    text_config = (config or {}).get("text_config")
    if isinstance(text_config, Mapping):
        return num_layers(text_config, module_names)
    indices = [int(m.group(1)) for name in module_names if (m := _LAYER_INDEX.search(name))]
    return max(indices) + 1 if indices else None


def _check_finite(delta: LowRankDelta, what: str) -> None:
    # A float64 sum is finite exactly when every entry is (inf and nan propagate; realistic factors cannot overflow
    # it): one cheap pass per factor, no boolean copy.
    for label, factor in (("B", delta.B), ("A", delta.A)):
        if not math.isfinite(float(factor.sum(dtype=torch.float64))):
            raise CombinationError(f"{what} has non-finite values (NaN or Inf) in its {label} factor.")


def _as_factors(result: Any, shape: tuple[int, int], context: ModuleContext, request: MergeRequest) -> LowRankDelta:
    name = request.method
    provider = request.combination.provider
    where = f"combination_type={name!r} (from {provider})"
    if isinstance(result, LowRankDelta):
        if result.shape != shape:
            raise CombinationError(
                f"{where} returned a delta of shape {result.shape} for {context.name!r}, expected {shape}."
            )
        delta = result
    elif isinstance(result, torch.Tensor):
        if tuple(result.shape) != shape:
            raise CombinationError(
                f"{where} returned a dense delta of shape {tuple(result.shape)} for {context.name!r}, expected "
                f"{shape}."
            )
        if not bool(torch.isfinite(result).all()):
            raise CombinationError(f"{where} returned non-finite values (NaN or Inf) for {context.name!r}.")
        u, s, vh = torch.linalg.svd(result, full_matrices=False)
        delta, stats = compress(u * s, vh, context.svd_rank)
        context.stats.setdefault("rank", stats.rank)
        context.stats.setdefault("energy_kept", stats.energy_kept)
    else:
        raise CombinationError(f"{where} must return a LowRankDelta or a dense tensor, got {type(result).__name__}.")
    _check_finite(delta, f"The result of {where} for {context.name!r}")
    if delta.rank > min(shape):
        delta, stats = compress(delta.B, delta.A, min(shape))
        context.stats["rank"] = stats.rank
    if context.svd_rank is not None and delta.rank > context.svd_rank:
        delta, stats = compress(delta.B, delta.A, context.svd_rank)
        context.stats["rank"] = stats.rank
        context.stats["energy_kept"] = stats.energy_kept
    context.stats.setdefault("rank", delta.rank)
    return delta


def combine_factors(
    request: MergeRequest,
    deltas: list[LowRankDelta],
    name: str,
    layer_index: int | None = None,
    layers: int | None = None,
) -> tuple[LowRankDelta, dict[str, Any]]:
    """Combine one module's input deltas (canonical factors, one per adapter, zeros where absent) with the request's
    plugin type, weights and options. The only caller of combination functions.

    Returns:
        `tuple[LowRankDelta, dict]`: The merged factors (rank at most `svd_rank` and `min(out, in)`) and the
        module's statistics.
    """
    combination = request.combination
    shape = deltas[0].shape
    # With svd_energy the type computes the full delta; the rank and energy bounds are applied together below, so
    # the energy kept is a fraction of the whole delta's energy.
    energy = request.svd_energy
    context = ModuleContext(name, layer_index, layers, request.svd_rank if energy is None else None)
    try:
        result = combination.function(list(deltas), list(request.weights), context, **request.options)
    except (CombinationError, MergeInputError):
        raise
    except Exception as error:
        raise CombinationError(
            f"combination_type={combination.name!r} (from {combination.provider}) failed on {name!r}: "
            f"{type(error).__name__}: {error}"
        ) from error
    delta = _as_factors(result, shape, context, request)
    if energy is not None:
        delta, stats = compress(delta.B, delta.A, request.svd_rank, energy)
        context.stats.update(rank=stats.rank, energy_kept=stats.energy_kept)
    return delta, dict(context.stats)


def combine_module(
    request: MergeRequest, module: FactorModule, layers: int | None
) -> tuple[LowRankDelta, dict[str, Any]]:
    """The merged factors of one module: read every adapter's factors (checked finite), zero-fill the absent ones,
    then either take the single adapter as it is (times its weight) or call the plugin type.

    Raises:
        `MergeInputError`: When an adapter's factors hold NaN or Inf (naming the adapter and the module).
        `CombinationError`: When the combination fails or returns an unusable result (naming the plugin).
    """
    compute_dtype = compute_dtype_for(module.device)
    deltas = []
    for adapter in request.adapters:
        delta = module.read(adapter)
        if delta is None:
            out_features, in_features = module.shape
            zeros = torch.zeros(out_features, 1, dtype=compute_dtype, device=module.device)
            delta = LowRankDelta(zeros, torch.zeros(1, in_features, dtype=compute_dtype, device=module.device))
        else:
            try:
                _check_finite(delta, f"Adapter {adapter!r} at {module.name!r}")
            except CombinationError as error:
                raise MergeInputError(f"{error} Retrain or repair that adapter; nothing was written.") from None
        deltas.append(delta)
    if request.method is None:
        delta = deltas[0]
        weight = request.weights[0]
        if weight != 1.0:
            delta = LowRankDelta(delta.B * weight, delta.A)
        return delta, {"rank": delta.rank}
    return combine_factors(request, deltas, module.name, module.layer_index, layers)


class ReportBuilder:
    """Gathers per-module statistics and the combination time into a `MergeReport`."""

    def __init__(self, request: MergeRequest, module_order: Sequence[str] = ()) -> None:
        self.request = request
        self.order = {name: index for index, name in enumerate(module_order)}
        self.modules: dict[str, ModuleReport] = {}
        self.seconds = 0.0

    def combine(self, module: FactorModule, layers: int | None) -> LowRankDelta:
        """`combine_module`, timed and recorded."""
        started = time.perf_counter()
        delta, stats = combine_module(self.request, module, layers)
        self.seconds += time.perf_counter() - started
        self.modules[module.name] = ModuleReport(module.name, module.layer_index, plain(stats))
        return delta

    def add(self, name: str, layer_index: int | None, stats: Mapping[str, Any]) -> None:
        """Record a module computed elsewhere (PEFT's own types)."""
        self.modules[name] = ModuleReport(name, layer_index, plain(dict(stats)))

    def build(self) -> MergeReport:
        """The report, modules in model order."""
        request = self.request
        names = sorted(self.modules, key=lambda name: (self.order.get(name, len(self.order)), name))
        return MergeReport(
            combination_type=request.method or "none",
            adapters=list(request.adapters),
            weights=list(request.weights),
            options=plain(
                {k: v for k, v in request.options.items() if v is not None or not request.is_peft_type}
                | request.serving_options
            ),
            svd_rank=request.svd_rank,
            provider=request.provider,
            seconds=self.seconds,
            modules=[self.modules[name] for name in names],
        )


def plain(value: Any) -> Any:
    """`value` as JSON-ready data: tensors to lists, non-finite floats to strings, mappings with string keys."""
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value
