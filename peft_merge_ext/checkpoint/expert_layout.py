"""Where a fused MoE expert tensor lives in a checkpoint that stores the experts one by one.

transformers holds the experts of many MoE models fused (`mlp.experts.gate_up_proj`, `experts x out x in`) but their
checkpoints store one matrix per expert and projection (Mixtral `block_sparse_moe.experts.3.w1.weight`); its weight
conversion mapping fuses them when loading. LoRA on `target_parameters` updates the fused tensor, so the out-of-core
merge needs the inverse: which stored tensor holds which rows of which expert. This module asks transformers' own
mapping (on a model built on the meta device), and understands its common MoE form: stack the experts
(`MergeModulelist(dim=0)`), then optionally concatenate the projections along the output rows (`Concatenate(dim=1)`).
Anything else is left out, and the merge refuses such an adapter with the fix.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["ExpertSlice", "stored_expert_slices"]


@dataclass(frozen=True)
class ExpertSlice:
    """A stored tensor holding rows `start ... start + rows - 1` of expert `expert` of a fused expert tensor."""

    key: str
    expert: int
    start: int
    rows: int


def _transforms(config: Mapping[str, Any]) -> tuple[list[Any], list[Any]] | None:
    try:
        import torch
        import transformers
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming

        model_class = getattr(transformers, (config.get("architectures") or [""])[0])
        with warnings.catch_warnings(), torch.device("meta"):
            warnings.simplefilter("ignore")
            model = model_class(transformers.AutoConfig.for_model(**config))
        transforms = get_model_conversion_mapping(model)
    except Exception:
        return None
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    return renamings, converters


def _stacked_rows(converter: Any) -> bool:
    """Whether `converter` stacks experts and then (if at all) concatenates projections along the output rows."""
    names = [(type(op).__name__, getattr(op, "dim", None)) for op in converter.operations]
    return names in ([("MergeModulelist", 0)], [("MergeModulelist", 0), ("Concatenate", 1)])


def stored_expert_slices(
    config: Mapping[str, Any], shapes: Mapping[str, tuple[int, ...]]
) -> dict[str, list[ExpertSlice]]:
    """Fused tensor key -> the stored 2-D tensors it is made of (in a per-expert checkpoint), from transformers'
    conversion mapping for the base architecture; empty when the architecture has none this module understands."""
    found = _transforms(config)
    if found is None:
        return {}
    from transformers.core_model_loading import rename_source_key

    renamings, converters = found
    parts: dict[str, list[tuple[int, int, str]]] = {}
    for key, shape in shapes.items():
        if len(shape) != 2:
            continue
        try:
            fused, pattern = rename_source_key(key, renamings, converters)
        except Exception:
            continue
        converter = next((c for c in converters if pattern in c.source_patterns), None)
        if pattern is None or converter is None or not _stacked_rows(converter):
            continue
        regex = re.escape(pattern).replace(r"\*", r"(\d+)")
        match = re.search(regex, key) or re.search(regex, _renamed(key, renamings))
        if match is None or not match.groups():
            continue
        parts.setdefault(fused, []).append((int(match.group(1)), converter.source_patterns.index(pattern), key))
    result: dict[str, list[ExpertSlice]] = {}
    for fused, entries in parts.items():
        slices, offsets = [], {}
        for expert, _, key in sorted(entries):  # experts in order, each in the converter's order
            start = offsets.get(expert, 0)
            slices.append(ExpertSlice(key, expert, start, shapes[key][0]))
            offsets[expert] = start + shapes[key][0]
        result[fused] = slices
    return result


def _renamed(key: str, renamings: list[Any]) -> str:
    from transformers.core_model_loading import apply_renamings

    return apply_renamings(key, renamings)
