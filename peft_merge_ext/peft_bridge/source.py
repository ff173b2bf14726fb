"""The live factor source: LoRA factors read from a PEFT model (or a transformers model with adapters loaded by
transformers), in the canonical orientation of the combination contract.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from ..engine.combine import FactorModule, num_layers
from ..engine.merge_info import AdapterInfo
from ..errors import AdapterCompatibilityError, MergeInputError
from ..lowrank.factor_math import compute_dtype_for
from .layers import (
    LoraModuleInfo,
    check_supported,
    factor_device_dtype,
    factor_tensors,
    find_lora_modules,
    has_adapter,
    in_out_features,
    read_factors,
)
from .records import get_hub_id, get_lineage, records

__all__ = ["LiveFactorSource", "adapter_sha256", "merge_live", "resolve_model"]


@dataclass
class LiveFactorSource:
    """The adapters of a model in memory.

    Args:
        base (`torch.nn.Module`): The transformers model holding the LoRA layers.
        configs (`Mapping[str, Any]`): Adapter name -> `LoraConfig`.
        active (`list[str]`): The active adapters.
        lora_model (`LoraModel`, *optional*): PEFT's `LoraModel`, when the model is a `PeftModel` / `LoraModel`.
    """

    base: torch.nn.Module
    configs: Mapping[str, Any]
    active: list[str]
    lora_model: Any = None

    @property
    def num_layers(self) -> int | None:
        """The number of blocks, for depth schedules."""
        config = getattr(self.base, "config", None)
        data = config.to_dict() if hasattr(config, "to_dict") else {}
        return num_layers(data, [name for name, _ in self.base.named_modules()])

    def modules(self, adapters: list[str]) -> list[FactorModule]:
        """The modules holding a LoRA layer for at least one of `adapters`, in model order (checked supported)."""
        from ..engine.features import adapter_features

        found = find_lora_modules(self.base, adapters)
        if not found and not any(adapter_features(self.configs[adapter]) for adapter in adapters):
            raise MergeInputError(f"None of the adapters {adapters} has LoRA layers in this model.")
        result = []
        for info in found:
            for adapter in adapters:
                check_supported(info, adapter)
            present = [adapter for adapter in adapters if has_adapter(info.module, adapter)]
            device, storage_dtype = factor_device_dtype(info, present)
            kernel = tuple(info.module.get_base_layer().weight.shape[2:]) if info.kind == "conv" else ()
            result.append(
                FactorModule(
                    name=info.name,
                    kind=info.kind,
                    shape=in_out_features(info, present[0]),
                    read=_reader(info, compute_dtype_for(device)),
                    device=device,
                    storage_dtype=storage_dtype,
                    transpose=info.kind == "embedding" or bool(getattr(info.module, "fan_in_fan_out", False)),
                    handle=info.module,
                    kernel=kernel,
                )
            )
        return result

    def edits(self, request: Any) -> dict[str, Any]:
        """What the request's adapters add beyond `B @ A` (DoRA, biases, copies, rows, expert deltas), combined per
        base tensor key (`engine.features.combine_extras`)."""
        from ..engine.features import adapter_features, combine_extras
        from .extras import live_extras

        adapters = request.adapters
        extras = {a: live_extras(self.base, a) for a in adapters if adapter_features(self.configs[a])}
        return combine_extras(request.method, adapters, request.weights, extras)

    def describe(self, adapter: str, weight: float, lazy_digest: bool = False) -> AdapterInfo:
        """The card's description of `adapter`: config, content digest, Hub id and lineage when known.

        With `lazy_digest`, the digest is computed when first needed (`AdapterInfo.resolve`), and only if the adapter's
        tensors are unchanged by then (else it stays unknown).
        """
        config = self.configs[adapter]
        ranks = [config.r, *(getattr(config, "rank_pattern", None) or {}).values()]
        modules = config.target_modules
        if isinstance(modules, str):
            modules = [modules]
        hub_id = get_hub_id(config)
        return AdapterInfo(
            name=adapter,
            source=hub_id,
            weight=float(weight),
            rank=int(max(ranks)),
            alpha=float(config.lora_alpha),
            target_modules=sorted(modules or []),
            use_rslora=bool(getattr(config, "use_rslora", False)),
            sha256=None if lazy_digest else _cached_sha256(self.base, adapter, config),
            sha256_of="tensors",
            pending_sha256=_digest_later(self.base, adapter, config) if lazy_digest else None,
            hub_id=hub_id,
            lineage=get_lineage(config),
        )


def _reader(info: LoraModuleInfo, dtype: torch.dtype) -> Any:
    return lambda adapter: read_factors(info, adapter, dtype)


def adapter_sha256(base: torch.nn.Module, adapter: str) -> str:
    """SHA-256 of an adapter's tensors: for each LoRA module in model order, its name, then A's and B's dtype, shape
    and bytes; then, named, every tensor it stores beyond those (DoRA magnitudes, biases, copies, rows, factors on
    parameters)."""
    from .extras import extra_tensors

    digest = hashlib.sha256()
    named = [(info.name, factor_tensors(info.module, adapter)) for info in find_lora_modules(base, [adapter])]
    named += [(name, (tensor,)) for name, tensor in extra_tensors(base, adapter)]  # DoRA, biases, copies, ...
    for name, tensors in named:
        digest.update(name.encode())
        for tensor in tensors:
            data = tensor.detach().to("cpu").contiguous()
            digest.update(f"{data.dtype}{tuple(data.shape)}".encode())
            digest.update(data.reshape(-1).view(torch.uint8).numpy())  # hashed in place, no copy
    return digest.hexdigest()


def _adapter_tensors(base: torch.nn.Module, adapter: str) -> list[torch.Tensor]:
    """Every stored tensor of `adapter` that its digest covers."""
    from .extras import extra_tensors

    factors = [t for info in find_lora_modules(base, [adapter]) for t in factor_tensors(info.module, adapter)]
    return factors + [tensor for _, tensor in extra_tensors(base, adapter)]


def _digest_later(base: torch.nn.Module, adapter: str, config: Any) -> Any:
    """A callable giving `adapter`'s digest later, or `None` if its tensors were replaced or modified meanwhile."""
    import weakref

    tensors = _adapter_tensors(base, adapter)
    snapshot = [(weakref.ref(t), t._version) for t in tensors]
    base_ref = weakref.ref(base)

    def digest() -> str | None:
        model = base_ref()
        if model is None or any(ref() is None or ref()._version != version for ref, version in snapshot):
            return None
        current = _adapter_tensors(model, adapter)
        if len(current) != len(snapshot) or any(ref() is not t for (ref, _), t in zip(snapshot, current, strict=True)):
            return None
        return _cached_sha256(model, adapter, config)

    return digest


def _cached_sha256(base: torch.nn.Module, adapter: str, config: Any) -> str:
    """`adapter_sha256`, computed again only when a factor tensor was replaced (held by weak reference) or modified
    in place (its version counter changed): describing the same adapter twice costs one hash."""
    import weakref

    tensors = _adapter_tensors(base, adapter)
    cached = records(config).get("sha256")
    if cached is not None:
        refs, versions, digest = cached
        if len(refs) == len(tensors) and all(
            ref() is tensor and version == tensor._version
            for ref, version, tensor in zip(refs, versions, tensors, strict=True)
        ):
            return digest
    digest = adapter_sha256(base, adapter)
    records(config)["sha256"] = ([weakref.ref(t) for t in tensors], [t._version for t in tensors], digest)
    return digest


def resolve_model(model: Any) -> LiveFactorSource:
    """The live factor source of a `PeftModel`, a `LoraModel`, or a transformers model with adapters loaded by
    `model.load_adapter`.

    Raises:
        `AdapterCompatibilityError`: For a PEFT model of another kind than LoRA.
        `MergeInputError`: For a model without adapters.
    """
    from peft import PeftModel
    from peft.tuners.lora import LoraModel

    if isinstance(model, PeftModel):
        lora_model = model.base_model
        if not isinstance(lora_model, LoraModel):
            raise AdapterCompatibilityError(
                f"peft-merge-ext merges LoRA adapters; this PeftModel holds a {type(lora_model).__name__}."
            )
        return LiveFactorSource(lora_model.model, lora_model.peft_config, list(model.active_adapters), lora_model)
    if isinstance(model, LoraModel):
        return LiveFactorSource(model.model, model.peft_config, list(model.active_adapters), model)
    if getattr(model, "_hf_peft_config_loaded", False) and getattr(model, "peft_config", None):
        return LiveFactorSource(model, model.peft_config, _layer_active_adapters(model))
    raise MergeInputError(
        f"This {type(model).__name__} has no LoRA adapters to merge. Load one first (PeftModel.from_pretrained(model, "
        "adapter) or model.load_adapter(adapter)); a plain model is saved with save_pretrained."
    )


def _layer_active_adapters(model: torch.nn.Module) -> list[str]:
    """The active adapters as the LoRA layers see them (what transformers' `active_adapters()` reports)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            active = module.active_adapters
            return [active] if isinstance(active, str) else list(active)
    return []


def merge_live(source: LiveFactorSource, request: Any) -> tuple[list[Any], Any]:
    """Every module's merged factors for a resolved request, from a live model, and the merge report.

    Registered types and single adapters go through `engine.combine`; PEFT's own types through PEFT
    (`peft_types.merged_by_peft`). The model is only read (PEFT's types add a temporary adapter and remove it).
    """
    from ..engine.combine import MergedModule, ReportBuilder

    modules = source.modules(request.adapters)
    report = ReportBuilder(request, [module.name for module in modules])
    if request.is_peft_type:
        from .peft_types import merged_by_peft

        return merged_by_peft(source, request, report), report.build()
    layers = source.num_layers
    merged = [MergedModule(module, report.combine(module, layers)) for module in modules]
    if request.uniform_rank is not None:
        from ..engine.serving import snap_to_uniform_rank

        merged = snap_to_uniform_rank(merged, request, report)
    return merged, report.build()
