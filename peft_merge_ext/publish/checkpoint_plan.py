"""Planning an out-of-core merge: everything about the inputs is checked before any output exists.

`plan_checkpoint_merge` reads the base checkpoint's headers (never its weights), the adapters' configs and factor
shapes, resolves the request (`engine.request`), finds which base weight each adapter module updates and in which
layout, and estimates the memory the merge needs. `--dry-run` prints `MergePlan.describe()`.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..checkpoint.base_checkpoint import BaseCheckpoint, architecture_of
from ..checkpoint.folder_source import FolderFactorSource
from ..checkpoint.side_files import dtype_name, hub_id_of, parse_dtype
from ..engine.request import MergeRequest, resolve_request
from ..errors import MergeInputError

__all__ = ["MergePlan", "plan_checkpoint_merge", "resolve_device"]


@dataclass
class MergePlan:
    """What a checkpoint merge will do, computed without touching the base weights.

    Args:
        base (`str`): The base as given.
        base_folder (`Path`, *optional*): Its local folder (`None` when only an adapter is written).
        base_config (`dict`): Its `config.json`.
        source (`FolderFactorSource`): The adapters.
        request (`MergeRequest`): The resolved request.
        checkpoint (`BaseCheckpoint`, *optional*): The base weights (`None` when only an adapter is written).
        targets (`dict[str, str]`): Weight key -> module name of every weight that gets a delta.
        transpose (`dict[str, bool]`): Weight key -> whether the weight is stored `in x out`.
        out_dtype (`torch.dtype`, *optional*): The requested output dtype.
        merge_into_base (`bool`): A merged model (`True`) or a combined adapter (`False`).
        device (`torch.device`): Where the deltas are computed.
        output_bytes (`int`): Size of the merged weights.
        estimated_peak_bytes (`int`): Estimated memory the work needs on top of the Python/torch baseline.
        problems (`list[str]`): Validation errors; the merge refuses to run while there are any.
        warnings (`list[str]`): Things worth knowing that do not stop the merge.
        module_order (`list[str]`): Module names in model order.
        edits (`dict[str, TensorEdit]`): What the adapters add beyond `B @ A`, per base tensor key
            (`checkpoint.adapter_extras.checkpoint_edits`).
    """

    base: str
    base_folder: Path | None
    base_config: dict[str, Any]
    source: FolderFactorSource
    request: MergeRequest
    checkpoint: BaseCheckpoint | None
    out_dtype: Any
    merge_into_base: bool
    device: Any
    targets: dict[str, str] = field(default_factory=dict)
    transpose: dict[str, bool] = field(default_factory=dict)
    output_bytes: int = 0
    estimated_peak_bytes: int = 0
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    module_order: list[str] = field(default_factory=list)
    edits: dict[str, Any] = field(default_factory=dict)

    @property
    def adapters(self) -> list[Any]:
        """The adapters (`adapter_files.AdapterFiles`)."""
        return self.source.adapters

    @property
    def tensors(self) -> list[Any]:
        """The base tensors in read order (empty for an adapter-only plan)."""
        return self.checkpoint.tensors if self.checkpoint is not None else []

    def describe(self) -> str:
        """A human-readable summary of the plan (what `--dry-run` prints)."""
        lines = [f"Base: {self.base} ({len(self.tensors)} tensors)"]
        for adapter, weight in zip(self.adapters, self.request.weights, strict=True):
            ranks = sorted({m.rank for m in [*adapter.modules.values(), *adapter.param_wrappers]})
            rank_text = str(ranks[0]) if len(ranks) == 1 else f"{ranks[0]}-{ranks[-1]}"
            lines.append(
                f"Adapter: {adapter.name} (weight {weight:g}, rank {rank_text}, {len(adapter.modules)} modules, "
                f"rslora={bool(adapter.config.use_rslora)})"
            )
        method = self.request.method or "single adapter, merged as is"
        options = self.request.options
        lines.append(f"Method: {method}" + (f" options {options}" if options else ""))
        if self.request.svd_rank is not None:
            lines.append(f"Rank bound (svd_rank): {self.request.svd_rank}")
        if self.merge_into_base:
            touched = sum(t.nbytes for t in self.tensors if t.name in self.targets)
            lines.append(f"Tensors touched: {len(self.targets)} of {len(self.tensors)} ({_human(touched)})")
            dtype = dtype_name(self.out_dtype) if self.out_dtype is not None else "unchanged"
            lines.append(f"Output: {_human(self.output_bytes)} of weights, dtype {dtype}")
        else:
            lines.append(f"Output: one combined LoRA adapter over {len(self.module_order)} modules")
        lines.append(
            f"Estimated peak memory for the work: {_human(self.estimated_peak_bytes)} (plus the Python and torch "
            "baseline)"
        )
        if self.edits:
            from ..engine.features import describe_edits

            beyond = ", ".join(f"{kind} {len(keys)}" for kind, keys in describe_edits(self.edits).items())
            lines.append(f"Beyond B @ A: {beyond}")
        lines.extend(f"Warning: {text}" for text in self.warnings)
        lines.extend(f"Problem: {text}" for text in self.problems)
        lines.append("Validation: OK" if not self.problems else f"Validation: {len(self.problems)} problem(s)")
        return "\n".join(lines)


def _human(size: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(size) < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size:.1f} TB"  # pragma: no cover


def resolve_device(device: Any) -> Any:
    """`torch.device(device)`, the CPU by default (and, with a warning, when CUDA is asked for but missing)."""
    import torch

    if device is None:
        return torch.device("cpu")
    try:
        target = torch.device(device)
    except (RuntimeError, TypeError):
        raise MergeInputError(f"Unknown device {str(device)[:50]!r}; use cpu, cuda or cuda:N.") from None
    if target.type == "cuda" and not torch.cuda.is_available():
        warnings.warn("device='cuda' was asked for but CUDA is not available; computing on the CPU.", stacklevel=4)
        return torch.device("cpu")
    return target


def _natural_order(names: list[str]) -> list[str]:
    """Module names sorted with numbers compared as numbers (`layers.2` before `layers.10`)."""
    modules = {name.rsplit(".", 1)[0] for name in names}
    return sorted(modules, key=lambda name: [(0, int(p), "") if p.isdigit() else (1, 0, p) for p in name.split(".")])


def plan_checkpoint_merge(
    base: str | Path | None,
    adapters: Sequence[str | Path],
    *,
    combination_type: str | None = None,
    weights: Sequence[float] | None = None,
    dtype: Any = None,
    svd_rank: int | None = None,
    allow_pickle: bool = False,
    device: Any = None,
    strict: bool = True,
    merge_into_base: bool = True,
    **combination_options: Any,
) -> MergePlan:
    """Validate a checkpoint merge and describe it, without reading any base weight.

    Args:
        base, adapters, combination_type, weights, dtype, svd_rank, allow_pickle, device, merge_into_base,
            combination_options: As in `merge_checkpoint`.
        strict (`bool`, *optional*, defaults to `True`): Raise on the first problem. With `False`, shape and target
            problems are collected in `MergePlan.problems` (for `--dry-run`); unreadable inputs still raise.

    Returns:
        `MergePlan`: The plan.

    Raises:
        `MergeInputError`: Any invalid input (subclasses for incompatible adapters and unknown types).
    """
    from ..checkpoint.adapter_files import resolve_folder

    if not isinstance(merge_into_base, bool):
        raise MergeInputError(f"merge_into_base must be True or False, got {merge_into_base!r}.")
    out_dtype = parse_dtype(dtype)
    target_device = resolve_device(device)
    source = FolderFactorSource(adapters, allow_pickle=allow_pickle, device=target_device)
    request = resolve_request(
        source.configs,
        source.names,
        weights,
        combination_type,
        svd_rank,
        combination_options,
        peft_types_allowed=False,
        merge_into_base=merge_into_base,
    )
    from ..engine.serving import check_serving_target

    check_serving_target(request, merge_into_base)
    base_folder, base_config, checkpoint = None, {}, None
    if base is not None:
        base_folder = resolve_folder(base, "base model", "config.json")
        config_path = base_folder / "config.json"
        if not config_path.is_file():
            raise MergeInputError(f"The base folder {base!s} has no config.json; pass a transformers model folder.")
        try:
            base_config = json.loads(config_path.read_text())
        except (ValueError, UnicodeDecodeError):
            raise MergeInputError(f"The config.json of the base {base!s} is not valid JSON.") from None
        if merge_into_base:
            checkpoint = BaseCheckpoint(base_folder, allow_pickle)
    elif merge_into_base:
        raise MergeInputError("A merge into the base needs the base model: pass base=.")
    label = str(base) if base is not None else "(none: adapter only)"
    plan = MergePlan(
        label, base_folder, base_config, source, request, checkpoint, out_dtype, merge_into_base, target_device
    )
    _check_provenance(plan)
    if checkpoint is not None:
        _validate_targets(plan)
        plan.output_bytes = sum(spec.nbytes for spec in checkpoint.specs(out_dtype))
    else:
        plan.module_order = _natural_order([f"{name}.weight" for name in source.module_names()])
    _estimate_memory(plan)
    if strict and plan.problems:
        raise MergeInputError(
            plan.problems[0] + (f" ({len(plan.problems) - 1} more problem(s))" if len(plan.problems) > 1 else "")
        )
    for text in plan.warnings:
        warnings.warn(text, UserWarning, stacklevel=3)
    return plan


def _estimate_memory(plan: MergePlan) -> None:
    from ..checkpoint.background_writer import DEFAULT_MAX_PENDING_BYTES
    from ..lowrank.weight_merge import DEFAULT_BLOCK_ELEMENTS

    # Tensors that go through memory: the targets and those changing dtype (the others are copied file to file). Each
    # is its input plus its output; the writer thread holds at most max(64 MB, one output) more.
    read = [
        (t, s)
        for t, s in zip(plan.tensors, plan.checkpoint.specs(plan.out_dtype) if plan.checkpoint else [], strict=True)
        if t.name in plan.targets or s.dtype != t.dtype or t.data_offset is None
    ]
    largest = max((t.nbytes + s.nbytes for t, s in read), default=0)
    largest_output = max((s.nbytes for _, s in read), default=0)
    block = DEFAULT_BLOCK_ELEMENTS * 8 if plan.targets else 0
    # One module's factors per adapter at a time, plus the combined factors (at most their concatenation).
    factor_bytes = sum(max((m.nbytes for m in adapter.modules.values()), default=0) for adapter in plan.adapters)
    plan.estimated_peak_bytes = largest + max(DEFAULT_MAX_PENDING_BYTES, largest_output) + block + 2 * factor_bytes


def _check_provenance(plan: MergePlan) -> None:
    architectures = plan.base_config.get("architectures") or []
    hub_base = hub_id_of(plan.base)
    recorded = {a.base_model_name_or_path for a in plan.adapters if a.base_model_name_or_path}
    if hub_base is not None and recorded - {hub_base}:
        plan.warnings.append(
            f"The adapters were trained on {', '.join(sorted(recorded))} (base_model_name_or_path), not {hub_base}."
        )
    elif len(recorded) > 1:
        plan.warnings.append(f"The adapters record different base models: {', '.join(sorted(recorded))}.")
    for adapter in plan.adapters:
        trained_on = ((getattr(adapter.config, "auto_mapping", None) or {}) or {}).get("base_model_class")
        if trained_on and architectures and trained_on != architectures[0]:
            plan.problems.append(
                f"Adapter {adapter.name!r} was trained on a {trained_on} but the base is a {architectures[0]}; use "
                "the base model the adapter was trained on."
            )


def _validate_targets(plan: MergePlan) -> None:
    checkpoint = plan.checkpoint
    by_name = checkpoint.by_name
    # Only GPT-2 style `Conv1D` weights are stored `in x out`; PEFT records fan_in_fan_out=True in the config of any
    # adapter targeting one, so the architecture is only built (on the meta device) for those adapters. Embeddings
    # and missing weights may involve tied weights, which only the architecture knows.
    needs_architecture = any(
        getattr(a.config, "fan_in_fan_out", False)
        or any(m.kind == "embedding" or m.weight_key not in by_name for m in a.modules.values())
        or (a.extras is not None and (a.extras.rows or a.extras.copies))
        for a in plan.adapters
    )
    architecture = architecture_of(plan.base_config) if needs_architecture else None
    classes, tied = architecture if architecture is not None else (None, {})
    plan.module_order = list(classes) if classes else _natural_order(list(by_name))
    from ..checkpoint.adapter_extras import checkpoint_edits
    from ..lowrank.factor_math import compute_dtype_for

    shapes = {tensor.name: tensor.shape for tensor in checkpoint.tensors}
    compute_dtype = compute_dtype_for(plan.device)
    plan.edits = checkpoint_edits(plan.adapters, plan.request, shapes, tied, compute_dtype, plan.base_config)
    checkpoint.untie(tied, {m.weight_key for a in plan.adapters for m in a.modules.values()}, plan.edits)
    plan.edits = {key: edit for key, edit in plan.edits.items() if key in by_name or key not in tied}
    missing = sorted(set(plan.edits) - set(by_name))
    if missing:
        plan.problems.append(
            f"The base checkpoint has no tensor {missing[:5]} that the adapters change (a LoRA bias needs a layer "
            "with a bias; modules_to_save and trainable tokens need the module they were trained on); wrong base "
            "model?"
        )
    for adapter in plan.adapters:
        for key, shape in adapter.saved_base_layers.items():
            base_tensor = by_name.get(key)
            if base_tensor is not None and base_tensor.shape != shape:
                plan.problems.append(
                    f"Adapter {adapter.name!r} was trained with {key} of shape {shape} (resized embeddings?) but the "
                    f"base has {base_tensor.shape}."
                )
        for module in adapter.modules.values():
            key = module.weight_key
            tensor = by_name.get(key)
            if tensor is None:
                tied_embeddings = plan.base_config.get("tie_word_embeddings") and "lm_head" in key
                plan.problems.append(
                    f"Adapter {adapter.name!r} targets {module.name!r} but the base checkpoint has no {key!r}"
                    + (
                        " (its weights are tied to the input embeddings)."
                        if tied_embeddings
                        else "; wrong base model?"
                    )
                )
                continue
            out_features, in_features = module.shape
            class_name = classes.get(module.name) if classes else None
            if module.kind == "embedding":
                transpose = True
            elif class_name is not None:
                transpose = class_name == "Conv1D"
            else:
                transpose = bool(adapter.config.fan_in_fan_out) and len(tensor.shape) == 2
                if tensor.shape == (in_features, out_features) and tensor.shape != (out_features, in_features):
                    transpose = True
            expected = (in_features, out_features) if transpose else (out_features, in_features)
            numel = 1
            for size in tensor.shape:
                numel *= size
            matches = tensor.shape == expected or (
                module.kind == "conv" and tensor.shape[0] == out_features and numel == out_features * in_features
            )
            if not matches:
                plan.problems.append(
                    f"Adapter {adapter.name!r}: {module.name!r} has a delta of shape {expected} but the base weight "
                    f"{key!r} is {tensor.shape}; the adapter was trained on a different model."
                )
                continue
            if plan.transpose.get(key, transpose) != transpose:
                plan.problems.append(f"Adapters disagree on the layout of {key!r}.")
            plan.targets[key] = module.name
            plan.transpose[key] = transpose
