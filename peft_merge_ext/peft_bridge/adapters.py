"""Creating combined adapters inside a PEFT model (for plugin types), and recording the lineage of PEFT's own.

The new adapter's records (its lineage and merge report) are kept by `records`.

Creating the adapter goes through PEFT's `inject_adapter` with `low_cpu_mem_usage=True` (no random initialization,
so the user's RNG stream is untouched). That call patches `torch.nn.Module.register_parameter` for the whole process
while it runs, so creations are serialized by one lock: several threads combining on separate models get correct
results, and the patch is always undone.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import threading
from collections.abc import Sequence
from typing import Any

from ..errors import CombinationError, MergeInputError
from ..plugins.contract import LowRankDelta
from .records import RECORDS, set_lineage, set_report
from .source import LiveFactorSource, merge_live

__all__ = [
    "add_combined_adapter",
    "check_new_adapter_name",
    "create_adapter",
    "freeze_adapter",
    "record_peft_lineage",
]

_INJECT_LOCK = threading.Lock()


def check_new_adapter_name(lora_model: Any, adapter_name: Any) -> None:
    """Refuse a name PEFT cannot use for a new adapter, or one already taken."""
    if not isinstance(adapter_name, str) or not re.fullmatch(r"[^.\s]+", adapter_name):
        raise MergeInputError(
            f"adapter_name must be a non-empty string without '.' or spaces, got {str(adapter_name)[:80]!r}."
        )
    if adapter_name in lora_model.peft_config:
        raise MergeInputError(
            f"An adapter named {adapter_name!r} already exists; pick a free name or delete it first with "
            f"model.delete_adapter({adapter_name!r})."
        )


def add_combined_adapter(
    lora_model: Any, adapter_name: str, request: Any, search: dict[str, Any] | None = None
) -> Any:
    """Combine with a resolved plugin-type request and add the result to `lora_model` as `adapter_name`, with its
    lineage and report.

    Returns:
        `MergeReport`: The per-module report.
    """
    from ..checkpoint.side_files import hub_id_of
    from ..engine.merge_info import Lineage, library_versions

    check_new_adapter_name(lora_model, adapter_name)
    source = LiveFactorSource(lora_model.model, lora_model.peft_config, list(lora_model.active_adapters), lora_model)
    merged, report = merge_live(source, request)
    base = getattr(lora_model.model, "name_or_path", None)
    lineage = Lineage(
        method=request.method,
        provider=request.provider,
        sources=[
            source.describe(a, w, lazy_digest=True) for a, w in zip(request.adapters, request.weights, strict=True)
        ],
        options=dict(report.options),
        svd_rank=request.svd_rank,
        base_model=hub_id_of(base) or hub_id_of(lora_model.peft_config[request.adapters[0]].base_model_name_or_path),
        report_summary=report.summary(),
        versions=library_versions(),
        search=search,
    )
    create_adapter(
        lora_model, adapter_name, [(m.module, m.delta) for m in merged], request.adapters[0], lineage, report
    )
    return report


def _sources(source: Any, request: Any) -> list[Any]:
    """The request's adapters as lineage sources, their digests computed when a card or a record needs them."""
    pairs = zip(request.adapters, request.weights, strict=True)
    return [source.describe(adapter, weight, lazy_digest=True) for adapter, weight in pairs]


def _inject(lora_model: Any, adapter_name: str) -> None:
    """PEFT's `inject_adapter` without initialization, under the process-wide lock (one version-checked call)."""
    inject = getattr(lora_model, "inject_adapter", None)
    if inject is None or "low_cpu_mem_usage" not in inspect.signature(inject).parameters:
        from importlib.metadata import version

        raise MergeInputError(
            f"This PEFT ({version('peft')}) has no LoraModel.inject_adapter(low_cpu_mem_usage=...), which "
            "peft-merge-ext uses to create the combined adapter; install peft>=0.13."
        )
    inject(lora_model.model, adapter_name, low_cpu_mem_usage=True)


def create_adapter(
    lora_model: Any,
    adapter_name: str,
    merged: Sequence[tuple[Any, LowRankDelta]],
    template: str,
    lineage: Any = None,
    report: Any = None,
) -> None:
    """Add a combined adapter to a `LoraModel`: one PEFT adapter whose factors are the merged ones (scaling 1).

    Nothing is modified until this is called with every module's factors ready; if creating the adapter fails
    midway it is removed again, so the model is left as it was. The new adapter is frozen and inactive.

    Args:
        lora_model (`LoraModel`): The model.
        adapter_name (`str`): A free name.
        merged (`Sequence[tuple[FactorModule, LowRankDelta]]`): The modules (from `source.LiveFactorSource`) and
            their merged factors.
        template (`str`): The source adapter whose config the new one is derived from.
        lineage (`Lineage`, *optional*): How it was made.
        report (`MergeReport`, *optional*): The per-module report (`peft_merge_ext.get_merge_report`).
    """
    from ..checkpoint.adapter_output import combined_adapter_config
    from .adapter_state import delete_adapter

    check_new_adapter_name(lora_model, adapter_name)
    base_config = lora_model.peft_config[template]
    data = combined_adapter_config(
        base_config.to_dict(),
        {module.name: delta.rank for module, delta in merged},
        base_config.base_model_name_or_path,
    )
    fields = {field.name for field in dataclasses.fields(base_config) if field.init}
    config = dataclasses.replace(base_config, **{key: value for key, value in data.items() if key in fields})
    config.__dict__.pop(RECORDS, None)
    active_before = list(lora_model.active_adapters)
    lora_model.peft_config[adapter_name] = config
    try:
        with _INJECT_LOCK:  # no other creation may run while the patch is in place or parameters are being set
            _fill(lora_model, adapter_name, merged)
    except BaseException:
        delete_adapter(lora_model, adapter_name, active_before)
        lora_model.peft_config.pop(adapter_name, None)
        raise
    if list(lora_model.active_adapters) != active_before:
        lora_model.set_adapter(active_before if len(active_before) > 1 else active_before[0])
    set_lineage(config, lineage)
    set_report(config, report)


def _fill(lora_model: Any, adapter_name: str, merged: Sequence[tuple[Any, LowRankDelta]]) -> None:
    """Create the adapter's layers with PEFT and store the merged factors in them (frozen)."""
    from .layers import write_factors

    _inject(lora_model, adapter_name)
    for module, delta in merged:
        layer = module.handle
        if adapter_name not in getattr(layer, "lora_A", {}) and adapter_name not in getattr(
            layer, "lora_embedding_A", {}
        ):
            raise CombinationError(f"PEFT did not create adapter {adapter_name!r} at {module.name!r}.")
        write_factors(layer, adapter_name, delta, module.storage_dtype)
        layer.scaling[adapter_name] = 1.0
    for name, parameter in adapter_parameters(lora_model, adapter_name):
        if parameter.device.type == "meta":
            raise CombinationError(
                f"Creating adapter {adapter_name!r} left {name} on the meta device: another thread was creating "
                "modules under accelerate's init_empty_weights at the same time. Retry."
            )
    freeze_adapter(lora_model, adapter_name)


def adapter_parameters(lora_model: Any, adapter_name: str) -> list[tuple[str, Any]]:
    """`(name, parameter)` of every parameter of adapter `adapter_name` in a `LoraModel`."""
    return [
        (name, parameter)
        for name, parameter in lora_model.model.named_parameters()
        if f".{adapter_name}." in name or name.endswith(f".{adapter_name}")
    ]


def freeze_adapter(lora_model: Any, adapter_name: str) -> None:
    """Set `requires_grad=False` on every parameter of adapter `adapter_name` (a merge result is not trained)."""
    for _, parameter in adapter_parameters(lora_model, adapter_name):
        parameter.requires_grad_(False)


def record_peft_lineage(lora_model: Any, adapter_name: str, request: Any) -> None:
    """Attach the lineage of an adapter PEFT's own `add_weighted_adapter` just created (its arguments untouched)."""
    from ..engine.merge_info import Lineage, library_versions

    source = LiveFactorSource(lora_model.model, lora_model.peft_config, list(lora_model.active_adapters), lora_model)
    config = lora_model.peft_config.get(adapter_name)
    if config is None:
        return
    lineage = Lineage(
        method=request.method,
        provider="peft",
        sources=[
            source.describe(a, w, lazy_digest=True) for a, w in zip(request.adapters, request.weights, strict=True)
        ],
        options={k: v for k, v in request.options.items() if v is not None},
        svd_rank=request.svd_rank,
        versions=library_versions(),
    )
    set_lineage(config, lineage)
