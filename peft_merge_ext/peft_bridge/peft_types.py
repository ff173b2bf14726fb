"""PEFT's own combination types (`svd`, `cat`, `ties`, `dare_*`, ...), run by PEFT itself.

PEFT's algorithms are not re-implemented here, so results are exactly PEFT's: its `add_weighted_adapter` creates a
temporary adapter, whose factors are read, then the model is put back exactly as it was (`AdapterState`).
"""

from __future__ import annotations

from typing import Any

from ..engine.combine import MergedModule, ReportBuilder
from ..engine.request import MergeRequest
from ..errors import MergeInputError
from .adapter_state import AdapterState

__all__ = ["TEMPORARY_ADAPTER", "merged_by_peft"]

TEMPORARY_ADAPTER = "peft_merge_ext_tmp"


def merged_by_peft(source: Any, request: MergeRequest, report: ReportBuilder) -> list[MergedModule]:
    """The merged factors of every module, computed by PEFT's `add_weighted_adapter` into a temporary adapter.

    Raises:
        `MergeInputError`: When the model is not a PEFT model, or PEFT refuses the request.
    """
    if source.lora_model is None:
        raise MergeInputError(
            f"combination_type={request.method!r} is one of PEFT's own types, which need a PeftModel; for a model "
            "with adapters loaded by transformers use a plugin type (weighted, average, slerp, karcher)."
        )
    if TEMPORARY_ADAPTER in source.configs:
        raise MergeInputError(f"The adapter name {TEMPORARY_ADAPTER!r} is reserved by peft-merge-ext; rename it.")
    state = AdapterState.capture(source.lora_model)
    try:
        try:
            source.lora_model.add_weighted_adapter(
                request.adapters,
                request.weights,
                TEMPORARY_ADAPTER,
                combination_type=request.method,
                svd_rank=request.svd_rank,
                **request.options,
            )
        except ValueError as error:
            raise MergeInputError(f"PEFT's add_weighted_adapter refused the request: {error}") from error
        merged = []
        for module in source.modules([TEMPORARY_ADAPTER]):
            delta = module.read(TEMPORARY_ADAPTER)
            report.add(module.name, module.layer_index, {"rank": delta.rank})
            merged.append(MergedModule(module, delta))
        return merged
    finally:
        state.restore()
