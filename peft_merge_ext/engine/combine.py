"""The merge engine: validates a combination request, computes every module's merged factors, then creates the
new adapter in one step (or leaves the model untouched when anything fails)."""

from __future__ import annotations

import dataclasses
import math
import re
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..engine.report import MergeReport, ModuleReport
from ..errors import AdapterCompatibilityError, CombinationError, MergeInputError
from ..lowrank.factor_math import compress, compute_dtype_for
from ..peft_bridge.layers import (
    LoraModuleInfo,
    check_supported,
    factor_device_dtype,
    find_lora_modules,
    in_out_features,
    read_factors,
    write_factors,
)
from ..plugins.contract import LowRankDelta, ModuleContext
from ..plugins.registry import CombinationType, check_weights, get_combination_types

__all__ = [
    "CombinationRequest",
    "MergedModule",
    "add_combined_adapter",
    "combine_adapters",
    "combine_factors",
    "prepare_request",
]

# PEFT keyword arguments that only PEFT's own types use, with their defaults.
PEFT_ONLY_ARGUMENTS = {
    "svd_clamp": None,
    "svd_full_matrices": True,
    "svd_driver": None,
    "density": None,
    "majority_sign_method": "total",
}


@dataclass
class CombinationRequest:
    """A validated request: which adapters, weights, type, options and output rank bound."""

    adapters: list[str]
    weights: list[float]
    combination: CombinationType
    options: dict[str, Any]
    svd_rank: int | None = None


@dataclass
class MergedModule:
    """The merged factors of one module, in canonical orientation with scaling 1."""

    info: LoraModuleInfo
    delta: LowRankDelta
    dtype: torch.dtype
    stats: dict[str, Any] = field(default_factory=dict)


def check_adapter_configs(peft_config: Mapping[str, Any], adapters: Sequence[str]) -> None:
    """Refuse adapters whose config has features the combination contract cannot represent.

    A LoRA config is recognised by `peft_type == "LORA"` (PEFT's `PeftType` is a `str` enum), which holds for
    `peft.LoraConfig` and for the configs `adapter_files` parses without importing PEFT, and not for AdaLoRA and the
    other PEFT types (including `LoraConfig` subclasses such as `AdaLoraConfig`).
    """
    for adapter in adapters:
        config = peft_config[adapter]
        if getattr(config, "peft_type", None) != "LORA":
            raise AdapterCompatibilityError(
                f"Adapter {adapter!r} is a {type(config).__name__}, not a plain LoraConfig adapter; only "
                "LoRA adapters can be combined."
            )
        if getattr(config, "use_dora", False):
            raise AdapterCompatibilityError(
                f"Adapter {adapter!r} uses DoRA (use_dora=True): its update is not B @ A and cannot be combined "
                "exactly. Merge it into the base on its own, or retrain it as plain LoRA."
            )
        if getattr(config, "lora_bias", False):
            raise AdapterCompatibilityError(
                f"Adapter {adapter!r} has lora_bias=True: its bias update cannot be expressed as low-rank factors."
            )
        if getattr(config, "target_parameters", None):
            raise AdapterCompatibilityError(
                f"Adapter {adapter!r} targets nn.Parameter (target_parameters); those cannot be combined."
            )
        if getattr(config, "modules_to_save", None) or getattr(config, "trainable_token_indices", None):
            raise AdapterCompatibilityError(
                f"Adapter {adapter!r} also trains full modules (modules_to_save / trainable_token_indices): those are "
                "dense copies, not LoRA factors, and would be silently dropped. Combine adapters without them."
            )


def prepare_request(
    peft_config: Mapping[str, Any],
    adapters: Any,
    weights: Any,
    combination_type: str,
    svd_rank: Any = None,
    options: Mapping[str, Any] | None = None,
    peft_arguments: Mapping[str, Any] | None = None,
) -> CombinationRequest:
    """Validate everything about a combination request before any work is done.

    Raises:
        `MergeInputError`: For unknown adapters, bad weights, unknown options or PEFT-only arguments.
        `AdapterCompatibilityError`: For adapters the contract cannot represent.
    """
    types = get_combination_types()
    combination = types[combination_type]
    if isinstance(adapters, str) or not isinstance(adapters, Sequence) or not adapters:
        raise MergeInputError(f"adapters must be a non-empty list of adapter names, got {adapters!r}.")
    adapters = list(adapters)
    duplicates = [name for name, count in Counter(adapters).items() if count > 1]
    if duplicates:
        raise MergeInputError(
            f"Adapter(s) {duplicates} appear more than once; give each adapter once with its weight."
        )
    missing = [name for name in adapters if name not in peft_config]
    if missing:
        raise MergeInputError(
            f"Unknown adapter(s) {missing}; the model has: {', '.join(map(repr, peft_config)) or 'none'}."
        )
    weights = check_weights(weights, len(adapters))
    for name, value in (peft_arguments or {}).items():
        if value != PEFT_ONLY_ARGUMENTS[name]:
            raise MergeInputError(
                f"{name}={value!r} is only used by PEFT's own combination types; combination_type="
                f"{combination_type!r} does not take it."
            )
    if svd_rank is not None and (isinstance(svd_rank, bool) or not isinstance(svd_rank, int) or svd_rank < 1):
        raise MergeInputError(f"svd_rank must be a positive integer or None, got {svd_rank!r}.")
    resolved = combination.resolve_options(dict(options or {}))
    combination.check_weights(weights, resolved)
    check_adapter_configs(peft_config, adapters)
    return CombinationRequest(adapters, weights, combination, resolved, svd_rank)


def _num_layers(model: torch.nn.Module, modules: list[LoraModuleInfo]) -> int | None:
    config = getattr(model, "config", None)
    for attribute in ("num_hidden_layers", "n_layer", "num_layers"):
        value = getattr(config, attribute, None)
        if isinstance(value, int) and value > 0:
            return value
    indices = [info.layer_index for info in modules if info.layer_index is not None]
    return max(indices) + 1 if indices else None


def _as_factors(result: Any, shape: tuple[int, int], context: ModuleContext, name: str) -> LowRankDelta:
    if isinstance(result, LowRankDelta):
        if result.shape != shape:
            raise CombinationError(
                f"combination_type={name!r} returned a delta of shape {result.shape} for {context.name!r}, "
                f"expected {shape}."
            )
        delta = result
    elif isinstance(result, torch.Tensor):
        if tuple(result.shape) != shape:
            raise CombinationError(
                f"combination_type={name!r} returned a dense delta of shape {tuple(result.shape)} for "
                f"{context.name!r}, expected {shape}."
            )
        u, s, vh = torch.linalg.svd(result, full_matrices=False)
        delta, stats = compress(u * s, vh, context.svd_rank)
        context.stats.setdefault("rank", stats.rank)
        context.stats.setdefault("energy_kept", stats.energy_kept)
    else:
        raise CombinationError(
            f"combination_type={name!r} must return a LowRankDelta or a dense tensor, got {type(result).__name__}."
        )
    # A float64 sum is finite exactly when every entry is (inf and nan propagate; realistic factors cannot overflow
    # it): one cheap pass per factor, no boolean copy of the factors.
    if not all(math.isfinite(float(factor.sum(dtype=torch.float64))) for factor in (delta.B, delta.A)):
        raise CombinationError(f"combination_type={name!r} produced non-finite values for {context.name!r}.")
    if context.svd_rank is not None and delta.rank > context.svd_rank:
        delta, stats = compress(delta.B, delta.A, context.svd_rank)
        context.stats["rank"] = stats.rank
        context.stats["energy_kept"] = stats.energy_kept
    context.stats.setdefault("rank", delta.rank)
    return delta


def combine_factors(
    request: CombinationRequest,
    deltas: list[LowRankDelta],
    name: str,
    layer_index: int | None = None,
    num_layers: int | None = None,
) -> tuple[LowRankDelta, dict[str, Any]]:
    """Combine one module's input deltas (canonical factors, one per adapter, zeros where absent) with the
    request's type, weights and options.

    This is the single place a combination function is called: the PEFT patch, `save_merged` and the out-of-core
    `merge_checkpoint` all go through it.

    Returns:
        `tuple[LowRankDelta, dict]`: The merged factors (rank at most `svd_rank`) and the module's statistics.
    """
    combination = request.combination
    shape = deltas[0].shape
    context = ModuleContext(name, layer_index, num_layers, request.svd_rank)
    try:
        result = combination.function(list(deltas), list(request.weights), context, **request.options)
    except (CombinationError, MergeInputError):
        raise
    except Exception as error:
        raise CombinationError(
            f"combination_type={combination.name!r} (from {combination.provider}) failed on {name!r}: "
            f"{type(error).__name__}: {error}"
        ) from error
    delta = _as_factors(result, shape, context, combination.name)
    return delta, dict(context.stats)


def combine_adapters(model: torch.nn.Module, request: CombinationRequest) -> tuple[list[MergedModule], MergeReport]:
    """Compute the merged factors of every module touched by the request. Reads the model, never modifies it.

    Args:
        model (`torch.nn.Module`): The model holding the LoRA layers (a `LoraModel`'s `.model`, or any module tree).
        request (`CombinationRequest`): A request from `prepare_request`.

    Returns:
        `tuple[list[MergedModule], MergeReport]`: The merged modules, in model order, and the report.
    """
    modules = find_lora_modules(model, request.adapters)
    if not modules:
        raise MergeInputError(f"None of the adapters {request.adapters} has LoRA layers in this model.")
    for info in modules:
        for adapter in request.adapters:
            check_supported(info, adapter)
    num_layers = _num_layers(model, modules)
    combination = request.combination
    started = time.perf_counter()
    merged: list[MergedModule] = []
    for info in modules:
        present = [a for a in request.adapters if _has(info, a)]
        device, storage_dtype = factor_device_dtype(info, present)
        compute_dtype = compute_dtype_for(device)
        out_features, in_features = in_out_features(info, present[0])
        deltas = []
        for adapter in request.adapters:
            delta = read_factors(info, adapter, compute_dtype)
            if delta is None:
                zeros = torch.zeros(out_features, 1, dtype=compute_dtype, device=device)
                delta = LowRankDelta(zeros, torch.zeros(1, in_features, dtype=compute_dtype, device=device))
            deltas.append(delta)
        delta, stats = combine_factors(request, deltas, info.name, info.layer_index, num_layers)
        merged.append(MergedModule(info, delta, storage_dtype, stats))
    report = MergeReport(
        combination_type=combination.name,
        adapters=list(request.adapters),
        weights=list(request.weights),
        options=_plain(request.options),
        svd_rank=request.svd_rank,
        provider=combination.provider,
        seconds=time.perf_counter() - started,
        modules=[ModuleReport(m.info.name, m.info.layer_index, _plain(m.stats)) for m in merged],
    )
    return merged, report


def _has(info: LoraModuleInfo, adapter: str) -> bool:
    module = info.module
    return adapter in getattr(module, "lora_A", {}) or adapter in getattr(module, "lora_embedding_A", {})


def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def _new_adapter_config(template: Any, merged: list[MergedModule]) -> Any:
    """A LoraConfig with effective scaling exactly 1 everywhere and per-module ranks through `rank_pattern`."""
    ranks = Counter(m.delta.rank for m in merged)
    default_rank = ranks.most_common(1)[0][0]
    pattern = {re.escape(m.info.name): m.delta.rank for m in merged if m.delta.rank != default_rank}
    names = {f.name for f in dataclasses.fields(template)}
    changes = {
        "r": default_rank,
        "lora_alpha": default_rank,
        "rank_pattern": pattern,
        "alpha_pattern": dict(pattern),
        "target_modules": sorted(m.info.name for m in merged),
        "use_rslora": False,
        "use_dora": False,
        "lora_bias": False,
        "layers_to_transform": None,
        "layers_pattern": None,
        "exclude_modules": None,
        "modules_to_save": None,
        "init_lora_weights": True,
        "lora_dropout": 0.0,
    }
    return dataclasses.replace(template, **{k: v for k, v in changes.items() if k in names})


def add_combined_adapter(lora_model: Any, adapter_name: str, request: CombinationRequest) -> MergeReport:
    """Compute the combination and add it to `lora_model` (a PEFT `LoraModel`) as `adapter_name`.

    Nothing is modified until every module's factors are computed; if creating the adapter fails midway, it is
    removed again, so the model is left as it was.
    """
    if not isinstance(adapter_name, str) or not adapter_name or "." in adapter_name:
        raise MergeInputError(f"adapter_name must be a non-empty string without '.', got {adapter_name!r}.")
    if adapter_name in lora_model.peft_config:
        raise MergeInputError(
            f"An adapter named {adapter_name!r} already exists; pick a free name or delete it first with "
            f"model.delete_adapter({adapter_name!r})."
        )
    merged, report = combine_adapters(lora_model.model, request)
    config = _new_adapter_config(lora_model.peft_config[request.adapters[0]], merged)
    active_before = list(lora_model.active_adapters)
    lora_model.peft_config[adapter_name] = config
    try:
        try:
            lora_model.inject_adapter(lora_model.model, adapter_name, low_cpu_mem_usage=True)
        except TypeError:
            lora_model.inject_adapter(lora_model.model, adapter_name)
        for module in merged:
            if not _has(module.info, adapter_name):
                raise CombinationError(f"PEFT did not create adapter {adapter_name!r} at {module.info.name!r}.")
            write_factors(module.info, adapter_name, module.delta, module.dtype)
            module.info.module.scaling[adapter_name] = 1.0
        if list(lora_model.active_adapters) != active_before:
            lora_model.set_adapter(active_before if len(active_before) > 1 else active_before[0])
        _freeze(lora_model, adapter_name)
    except BaseException:
        _remove_adapter(lora_model, adapter_name, active_before)
        raise
    reports = lora_model.__dict__.setdefault("peft_merge_ext_reports", {})
    reports[adapter_name] = report
    return report


def _freeze(lora_model: Any, adapter_name: str) -> None:
    for name, parameter in lora_model.model.named_parameters():
        if f".{adapter_name}." in name or name.endswith(f".{adapter_name}"):
            parameter.requires_grad = False


def _remove_adapter(lora_model: Any, adapter_name: str, active_before: list[str]) -> None:
    from peft.tuners.lora import LoraLayer

    for module in lora_model.model.modules():
        if isinstance(module, LoraLayer):
            module.delete_adapter(adapter_name)
    lora_model.peft_config.pop(adapter_name, None)
    if list(lora_model.active_adapters) != active_before:
        lora_model.set_adapter(active_before if len(active_before) > 1 else active_before[0])
