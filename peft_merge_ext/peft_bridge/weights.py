"""The in-memory weight source: the base model's tensors, one at a time, merged where a delta applies.

Reads the user's model without modifying it: LoRA layers are seen through to their base layer, PEFT's
`modules_to_save` and trainable-token wrappers to the original module; modules offloaded by accelerate are onloaded
one at a time. What the adapters add beyond `B @ A` (`lowrank.tensor_edits`) is applied by the same `apply_edit` as
the on-disk path uses.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..checkpoint.writer import TensorSpec
from ..errors import MergeInputError
from ..lowrank.tensor_edits import same_edits

__all__ = [
    "MergedWeightsSource",
    "check_edit_keys",
    "check_loadable",
    "factors_onloaded",
    "is_quantized",
    "output_dtype",
]


@dataclass
class _Entry:
    key: str
    module: torch.nn.Module
    attribute: str


def _is_offloaded(module: torch.nn.Module) -> bool:
    hook = getattr(module, "_hf_hook", None)
    return hook is not None and bool(getattr(hook, "offload", False))


def _walk(module: torch.nn.Module, prefix: str) -> Iterator[tuple[str, torch.nn.Module, str]]:
    """`(key, owning module, attribute)` for every persistent tensor, keyed as in the plain base model: LoRA layers
    are seen through to their base layer, PEFT's `modules_to_save` / trainable-token wrappers to the original
    module."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    if isinstance(module, BaseTunerLayer):
        yield from _walk(module.base_layer, prefix)
        return
    original = getattr(module, "original_module", None)
    if original is not None and hasattr(module, "_disable_adapters"):  # PEFT's modules_to_save / tokens wrappers
        yield from _walk(original, prefix)
        return
    for name, tensor in module._parameters.items():
        if tensor is not None:
            yield f"{prefix}{name}", module, name
    non_persistent = getattr(module, "_non_persistent_buffers_set", set())
    for name, tensor in module._buffers.items():
        if tensor is not None and name not in non_persistent:
            yield f"{prefix}{name}", module, name
    for name, child in module._modules.items():
        if child is not None:
            yield from _walk(child, f"{prefix}{name}.")


@contextlib.contextmanager
def _onloaded(module: torch.nn.Module | None) -> Iterator[None]:
    if module is None:
        yield
        return
    from accelerate.utils import align_module_device

    with align_module_device(module):
        yield


def _has_offloaded_module(model: torch.nn.Module) -> bool:
    return any(_is_offloaded(module) for module in model.modules())


@contextlib.contextmanager
def factors_onloaded(base: torch.nn.Module, adapters: list[str], peft_type: bool = False) -> Iterator[None]:
    """Onload (accelerate offload) the modules holding the LoRA factors of `adapters` while the merged factors are
    computed; they go back to their offloaded state afterwards. Factors are small: this costs the adapters' size."""
    if not _has_offloaded_module(base):
        yield
        return
    from peft.tuners.lora import LoraLayer

    if peft_type:
        raise MergeInputError(
            "PEFT's own combination types needs a temporary adapter, which PEFT cannot "
            "create on a model with offloaded weights; use a plugin type (weighted, average, slerp, karcher) or load "
            "the model without offloading."
        )
    parents = {id(child): module for module in base.modules() for child in module.children()}
    owners: dict[int, torch.nn.Module] = {}
    for module in base.modules():
        if not isinstance(module, LoraLayer):
            continue
        holders = []
        for adapter in adapters:
            if adapter in module.lora_A:
                holders += [module.lora_A[adapter], module.lora_B[adapter]]
            elif adapter in module.lora_embedding_A:
                holders += [module.lora_embedding_A, module.lora_embedding_B]
        for holder in holders:
            owner = _nearest_offloaded(holder, parents)
            if owner is not None:
                owners[id(owner)] = owner
    with contextlib.ExitStack() as stack:
        for owner in owners.values():
            stack.enter_context(_onloaded(owner))
        yield


def check_loadable(model: torch.nn.Module) -> None:
    """Refuse tensors on the meta device that no accelerate offload hook can load (a model built without weights)."""
    parents = {id(child): module for module in model.modules() for child in module.children()}
    unloadable = [
        f"{name}.{attribute}".lstrip(".")
        for name, module in model.named_modules()
        for attribute, tensor in [*module._parameters.items(), *module._buffers.items()]
        if tensor is not None and tensor.device.type == "meta" and _nearest_offloaded(module, parents) is None
    ]
    if unloadable:
        raise MergeInputError(
            f"{unloadable[:3]} are on the meta device and no accelerate hook can load them; load the model with its "
            "weights (or with a device_map and an offload folder) before saving."
        )


def check_target_keys(keys: Sequence[str], merged: Sequence[Any], where: str) -> None:
    """Refuse merged modules whose base weight is not among `keys`."""
    missing = [m.weight_key for m in merged if m.weight_key not in keys]
    if missing:
        raise MergeInputError(f"The {where} has no weight for LoRA module(s) {missing[:5]}; cannot merge them.")


def check_edit_keys(keys: Sequence[str], edits: Mapping[str, Any], where: str) -> None:
    """Refuse edits (biases, copies, rows, expert tensors) whose base tensor is not among `keys`."""
    missing = sorted(set(edits) - set(keys))
    if missing:
        raise MergeInputError(
            f"The {where} has no tensor {missing[:5]} that the adapter changes (a LoRA bias needs a layer with a "
            "bias; modules_to_save and trainable tokens need the module they were trained on); use the base model "
            "the adapter was trained on."
        )


class MergedWeightsSource:
    """The merged model's tensors, one at a time, from the in-memory model.

    Args:
        base (`torch.nn.Module`): The transformers model holding the LoRA layers.
        deltas (`list`): The merged deltas per module.
        dtype (`torch.dtype`, *optional*): Cast floating-point tensors to this dtype.
        edits (`Mapping[str, TensorEdit]`, *optional*): What the adapters add beyond `B @ A`, per tensor key
            (`engine.features.combine_extras`).
    """

    def __init__(
        self,
        base: torch.nn.Module,
        merged: Sequence[Any],
        dtype: torch.dtype | None,
        edits: Mapping[str, Any] | None = None,
    ) -> None:
        self.base = base
        self.deltas: Mapping[str, Any] = {m.weight_key: m for m in merged}
        self.edits: Mapping[str, Any] = dict(edits or {})
        self.dtype = dtype
        self.entries = [_Entry(key, module, attribute) for key, module, attribute in _walk(base, "")]
        check_target_keys([e.key for e in self.entries], merged, "model")
        check_edit_keys([e.key for e in self.entries], self.edits, "model")
        self._parents = {id(child): module for module in base.modules() for child in module.children()}
        self.untied: list[str] = []
        self._skip = self._tied_duplicates()

    def _tied_duplicates(self) -> set[str]:
        """Keys to leave out because they alias another written tensor (unless merging makes them differ)."""
        groups: dict[int, list[str]] = {}
        for entry in self.entries:
            tensor = getattr(entry.module, entry.attribute)
            groups.setdefault(id(tensor), []).append(entry.key)
        tied_targets = set(getattr(self.base, "all_tied_weights_keys", None) or {})
        skip: set[str] = set()
        for keys in groups.values():
            if len(keys) < 2:
                continue
            if any(key in self.deltas for key in keys) or not same_edits(self.edits, keys):
                self.untied.extend(keys)
                continue
            keep = next((key for key in keys if key not in tied_targets), keys[0])
            skip.update(key for key in keys if key != keep)
        return skip

    def _cast(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.dtype is not None and tensor.is_floating_point():
            return tensor.to(self.dtype)
        return tensor

    def specs(self) -> list[TensorSpec]:
        """Name, shape and output dtype of every tensor `tensors()` yields, in the same order, without onloading
        anything (offloaded parameters keep their shape and dtype on the meta device)."""
        return [
            TensorSpec(entry.key, tuple(tensor.shape), output_dtype(tensor.dtype, self.dtype))
            for entry in self.entries
            if entry.key not in self._skip
            for tensor in [getattr(entry.module, entry.attribute)]
        ]

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield `(key, tensor)` in model order; each merged tensor is computed just before it is yielded, offloaded
        modules are onloaded one at a time."""
        from ..lowrank.tensor_edits import apply_edit

        group: list[_Entry] = []
        group_root: torch.nn.Module | None = None
        for entry in [*self.entries, None]:
            root = None if entry is None else _nearest_offloaded(entry.module, self._parents)
            if group and (entry is None or root is not group_root):
                with _onloaded(group_root):
                    for item in group:
                        if item.key in self._skip:
                            continue
                        tensor = getattr(item.module, item.attribute).detach()
                        delta = self.deltas.get(item.key)
                        edit = self.edits.get(item.key)
                        if delta is None and edit is None:
                            yield item.key, self._cast(tensor)
                        else:
                            transpose = delta is not None and delta.module.transpose
                            factors = delta.delta if delta is not None else None
                            yield item.key, apply_edit(tensor, factors, transpose, edit, self.dtype)
                group = []
            if entry is not None:
                group.append(entry)
                group_root = root


def output_dtype(stored: torch.dtype, requested: torch.dtype | None) -> torch.dtype:
    """The dtype a tensor is written in: `requested` for floating-point tensors when given, else its own."""
    return requested if requested is not None and stored.is_floating_point else stored


def _nearest_offloaded(module: torch.nn.Module, parents: dict[int, torch.nn.Module]) -> torch.nn.Module | None:
    current: torch.nn.Module | None = module
    while current is not None:
        if _is_offloaded(current):
            return current
        current = parents.get(id(current))
    return None


def is_quantized(base: torch.nn.Module) -> bool:
    """Whether the in-memory base is quantized (bitsandbytes, GPTQ, ...): its weights cannot be merged into as is."""
    config = getattr(base, "config", None)
    return bool(
        getattr(base, "is_quantized", False)
        or getattr(base, "hf_quantizer", None) is not None
        or getattr(config, "quantization_config", None) is not None
    )
