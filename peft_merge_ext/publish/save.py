"""`save_merged` / `push_merged`: publish ONE model (or one combined adapter) from a model carrying LoRA adapters.

The user's model is never modified: merged weights are computed module by module from the base weights and the
adapters' canonical factors (`weight_merge.merge_delta_into_weight`) and each one is written straight to its place
in safetensors shards planned up front from the tensors' names, shapes and dtypes
(`checkpoint_writer.ShardedSafetensorsWriter`, each byte written once) inside an atomic output folder. Extra memory
is one merged tensor at a time, plus, for modules offloaded by accelerate, one onloaded module.

Where the merged delta comes from:

- no `combination_type`, one adapter: that adapter as it is (times its weight when one is given);
- no `combination_type`, several adapters: their weighted sum (`weighted`, weights 1 by default), which is what a
  PEFT model with several active adapters computes;
- a registered plugin type (`weighted`, `average`, `slerp`, `karcher`, ...): `combine.prepare_request` +
  `combine.combine_adapters`, which only read the model;
- one of PEFT's own types (`svd`, `cat`, `ties`, `dare_*`, ...): PEFT's `add_weighted_adapter` creates a temporary
  adapter, its factors are read, then it is deleted and the active adapters and every parameter's `requires_grad`
  are restored (PEFT's algorithms are not re-implemented here, so the result is exactly PEFT's).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..checkpoint.writer import ShardedSafetensorsWriter, TensorSpec, atomic_directory, parse_size
from ..engine.merge_info import AdapterInfo, MergeInfo
from ..engine.report import MergeReport, ModuleReport
from ..errors import AdapterCompatibilityError, MergeInputError
from ..plugins.contract import LowRankDelta

__all__ = [
    "CheckpointWeightsSource",
    "MergedWeightsSource",
    "base_folder",
    "base_hub_id",
    "push_merged",
    "save_merged",
]

ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "spiece.model",
    "chat_template.jinja",
    "chat_template.json",
)
_TEMPORARY_ADAPTER = "peft_merge_ext_tmp"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_CACHE_FOLDER = re.compile(r"models--([^/\\]+?)--([^/\\]+)")


# ---------------------------------------------------------------------------------------------------------------------
# Which model, which adapters
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class _AdapterModel:
    """What `save_merged` needs from a PeftModel or a transformers model with adapters loaded by transformers."""

    base: torch.nn.Module  # the transformers model holding the LoRA layers
    peft_config: Mapping[str, Any]
    active: list[str]
    lora_model: Any = None  # PEFT's LoraModel, when the model is a PeftModel


def _resolve_model(model: Any) -> _AdapterModel:
    from peft import PeftModel
    from peft.tuners.lora import LoraModel

    if isinstance(model, PeftModel):
        lora_model = model.base_model
        if not isinstance(lora_model, LoraModel):
            raise AdapterCompatibilityError(
                f"save_merged/push_merged merge LoRA adapters; this PeftModel holds a {type(lora_model).__name__}."
            )
        return _AdapterModel(lora_model.model, lora_model.peft_config, list(model.active_adapters), lora_model)
    if getattr(model, "_hf_peft_config_loaded", False) and getattr(model, "peft_config", None):
        return _AdapterModel(model, model.peft_config, _layer_active_adapters(model))
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


@dataclass
class _MergedDelta:
    """The merged delta of one module: canonical factors with scaling folded in."""

    name: str
    module: Any
    kind: str
    layer_index: int | None
    delta: LowRankDelta
    dtype: torch.dtype
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def transpose(self) -> bool:
        """Whether the base weight is stored `in x out` (embeddings, GPT-2 `Conv1D` with `fan_in_fan_out`)."""
        return self.kind == "embedding" or bool(getattr(self.module, "fan_in_fan_out", False))


def _default_weights(weights: Any, count: int) -> list[float]:
    from ..plugins.registry import check_weights

    return [1.0] * count if weights is None else check_weights(weights, count)


def _plugin_deltas(
    target: _AdapterModel,
    adapters: list[str],
    weights: Any,
    combination_type: str,
    svd_rank: int | None,
    options: dict[str, Any],
) -> tuple[list[_MergedDelta], MergeReport]:
    from ..engine.combine import combine_adapters, prepare_request

    request = prepare_request(
        target.peft_config, adapters, _default_weights(weights, len(adapters)), combination_type, svd_rank, options
    )
    merged, report = combine_adapters(target.base, request)
    deltas = [
        _MergedDelta(m.info.name, m.info.module, m.info.kind, m.info.layer_index, m.delta, m.dtype, dict(m.stats))
        for m in merged
    ]
    return deltas, report


def _single_deltas(target: _AdapterModel, adapter: str, weight: float) -> tuple[list[_MergedDelta], MergeReport]:
    from ..engine.combine import check_adapter_configs
    from ..peft_bridge.layers import check_supported, factor_device_dtype, find_lora_modules, read_factors

    check_adapter_configs(target.peft_config, [adapter])
    deltas = []
    for info in find_lora_modules(target.base, [adapter]):
        check_supported(info, adapter)
        _, dtype = factor_device_dtype(info, [adapter])
        delta = read_factors(info, adapter, torch.float32)
        if weight != 1.0:
            delta = LowRankDelta(delta.B * weight, delta.A)
        deltas.append(
            _MergedDelta(info.name, info.module, info.kind, info.layer_index, delta, dtype, {"rank": delta.rank})
        )
    if not deltas:
        raise MergeInputError(f"Adapter {adapter!r} has no LoRA layers in this model.")
    return deltas, _plain_report("none", [adapter], [weight], {}, None, "peft-merge-ext", deltas)


def _plain_report(
    combination_type: str,
    adapters: list[str],
    weights: list[float],
    options: dict[str, Any],
    svd_rank: int | None,
    provider: str,
    deltas: list[_MergedDelta],
) -> MergeReport:
    return MergeReport(
        combination_type=combination_type,
        adapters=list(adapters),
        weights=list(weights),
        options=options,
        svd_rank=svd_rank,
        provider=provider,
        seconds=0.0,
        modules=[ModuleReport(d.name, d.layer_index, dict(d.stats)) for d in deltas],
    )


@contextlib.contextmanager
def _restored(target: _AdapterModel) -> Iterator[None]:
    """Put back active adapters, adapter configs, `requires_grad` and train/eval mode after PEFT's own code ran."""
    lora_model = target.lora_model
    configs = dict(lora_model.peft_config)
    active = list(lora_model.active_adapters)
    grads = {name: p.requires_grad for name, p in lora_model.model.named_parameters()}
    modes = {name: m.training for name, m in lora_model.model.named_modules()}
    try:
        yield
    finally:
        if _TEMPORARY_ADAPTER in lora_model.peft_config and _TEMPORARY_ADAPTER not in configs:
            lora_model.delete_adapter(_TEMPORARY_ADAPTER)
        lora_model.peft_config.clear()
        lora_model.peft_config.update(configs)
        if list(lora_model.active_adapters) != active:
            lora_model.set_adapter(active)
        for name, parameter in lora_model.model.named_parameters():
            if name in grads:
                parameter.requires_grad = grads[name]
        for name, module in lora_model.model.named_modules():
            if name in modes:
                module.training = modes[name]


def _peft_type_deltas(
    target: _AdapterModel,
    adapters: list[str],
    weights: Any,
    combination_type: str,
    svd_rank: int | None,
    options: dict[str, Any],
) -> tuple[list[_MergedDelta], MergeReport]:
    from ..engine.combine import PEFT_ONLY_ARGUMENTS, check_adapter_configs
    from ..peft_bridge.layers import factor_device_dtype, find_lora_modules, read_factors

    if target.lora_model is None:
        raise MergeInputError(
            f"combination_type={combination_type!r} is one of PEFT's own types, which need a PeftModel; for a model "
            "with adapters loaded by transformers use a plugin type (weighted, average, slerp, karcher)."
        )
    missing = [name for name in adapters if name not in target.peft_config]
    if missing:
        known = ", ".join(map(repr, target.peft_config))
        raise MergeInputError(f"Unknown adapter(s) {missing}; the model has: {known}.")
    if _TEMPORARY_ADAPTER in target.peft_config:
        raise MergeInputError(f"The adapter name {_TEMPORARY_ADAPTER!r} is reserved by save_merged; rename it.")
    unknown = sorted(set(options) - set(PEFT_ONLY_ARGUMENTS))
    if unknown:
        raise MergeInputError(
            f"Unknown option(s) {', '.join(map(repr, unknown))} for PEFT's combination_type={combination_type!r}; it "
            f"accepts: svd_rank, {', '.join(PEFT_ONLY_ARGUMENTS)}."
        )
    check_adapter_configs(target.peft_config, adapters)
    weights = _default_weights(weights, len(adapters))
    with _restored(target):
        try:
            target.lora_model.add_weighted_adapter(
                adapters, weights, _TEMPORARY_ADAPTER, combination_type=combination_type, svd_rank=svd_rank, **options
            )
        except ValueError as error:
            raise MergeInputError(f"PEFT's add_weighted_adapter refused the request: {error}") from error
        deltas = []
        for info in find_lora_modules(target.base, [_TEMPORARY_ADAPTER]):
            _, dtype = factor_device_dtype(info, [_TEMPORARY_ADAPTER])
            delta = read_factors(info, _TEMPORARY_ADAPTER, torch.float32)
            deltas.append(
                _MergedDelta(info.name, info.module, info.kind, info.layer_index, delta, dtype, {"rank": delta.rank})
            )
    plain_options = {k: v for k, v in options.items() if v is not None}
    return deltas, _plain_report(combination_type, adapters, weights, plain_options, svd_rank, "peft", deltas)


def _merged_deltas(
    target: _AdapterModel,
    adapters: list[str],
    weights: Any,
    combination_type: str | None,
    svd_rank: int | None,
    options: dict[str, Any],
) -> tuple[list[_MergedDelta], MergeReport, str | None]:
    from ..plugins.registry import PEFT_COMBINATION_TYPES, get_combination_types

    if combination_type is None:
        if options or svd_rank is not None:
            raise MergeInputError(
                f"Options {sorted(options) + (['svd_rank'] if svd_rank is not None else [])} need a combination_type."
            )
        if len(adapters) == 1:
            weight = _default_weights(weights, 1)[0]
            deltas, report = _single_deltas(target, adapters[0], weight)
            return deltas, report, None
        combination_type = "weighted"
    if combination_type in PEFT_COMBINATION_TYPES:
        deltas, report = _peft_type_deltas(target, adapters, weights, combination_type, svd_rank, options)
        return deltas, report, combination_type
    types = get_combination_types()
    if combination_type not in types:
        from ..errors import UnknownCombinationTypeError

        raise UnknownCombinationTypeError(
            f"Unknown combination_type {combination_type!r}. PEFT's types: "
            f"{', '.join(sorted(PEFT_COMBINATION_TYPES))}. Plugin types: {', '.join(sorted(types)) or 'none'}."
        )
    deltas, report = _plugin_deltas(target, adapters, weights, combination_type, svd_rank, options)
    return deltas, report, combination_type


# ---------------------------------------------------------------------------------------------------------------------
# Base tensors: in memory (with accelerate offload) or from the base checkpoint on disk
# ---------------------------------------------------------------------------------------------------------------------


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
    are seen through to their base layer, PEFT's `modules_to_save` wrappers to the original module."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    if isinstance(module, BaseTunerLayer):
        yield from _walk(module.base_layer, prefix)
        return
    original = getattr(module, "original_module", None)
    if original is not None and hasattr(module, "modules_to_save"):  # PEFT's ModulesToSaveWrapper
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
def _factors_onloaded(target: _AdapterModel, adapters: list[str], combination_type: str | None) -> Iterator[None]:
    """Onload (accelerate offload) the modules holding the LoRA factors of `adapters` while the merged factors are
    computed; they go back to their offloaded state afterwards. Factors are small: this costs the adapters' size."""
    if not _has_offloaded_module(target.base):
        yield
        return
    from peft.tuners.lora import LoraLayer

    from ..plugins.registry import PEFT_COMBINATION_TYPES

    if combination_type in PEFT_COMBINATION_TYPES:
        raise MergeInputError(
            f"combination_type={combination_type!r} (PEFT's own) needs a temporary adapter, which PEFT cannot "
            "create on a model with offloaded weights; use a plugin type (weighted, average, slerp, karcher) or load "
            "the model without offloading."
        )
    parents = {id(child): module for module in target.base.modules() for child in module.children()}
    owners: dict[int, torch.nn.Module] = {}
    for module in target.base.modules():
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


def _check_loadable(model: torch.nn.Module) -> None:
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


def _check_target_keys(keys: Sequence[str], deltas: list[_MergedDelta], where: str) -> None:
    missing = [f"{d.name}.weight" for d in deltas if f"{d.name}.weight" not in keys]
    if missing:
        raise MergeInputError(f"The {where} has no weight for LoRA module(s) {missing[:5]}; cannot merge them.")


class MergedWeightsSource:
    """The merged model's tensors, one at a time, from the in-memory model.

    Args:
        base (`torch.nn.Module`): The transformers model holding the LoRA layers.
        deltas (`list`): The merged deltas per module.
        dtype (`torch.dtype`, *optional*): Cast floating-point tensors to this dtype.
    """

    def __init__(self, base: torch.nn.Module, deltas: list[_MergedDelta], dtype: torch.dtype | None) -> None:
        self.base = base
        self.deltas = {f"{d.name}.weight": d for d in deltas}
        self.dtype = dtype
        self.entries = [_Entry(key, module, attribute) for key, module, attribute in _walk(base, "")]
        _check_target_keys([e.key for e in self.entries], deltas, "model")
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
            if any(key in self.deltas for key in keys):
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
            TensorSpec(entry.key, tuple(tensor.shape), _output_dtype(tensor.dtype, self.dtype))
            for entry in self.entries
            if entry.key not in self._skip
            for tensor in [getattr(entry.module, entry.attribute)]
        ]

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield `(key, tensor)` in model order; each merged tensor is computed just before it is yielded, offloaded
        modules are onloaded one at a time."""
        from ..lowrank.weight_merge import merge_delta_into_weight

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
                        if delta is None:
                            yield item.key, self._cast(tensor)
                        else:
                            yield item.key, merge_delta_into_weight(tensor, delta.delta, delta.transpose, self.dtype)
                group = []
            if entry is not None:
                group.append(entry)
                group_root = root


def _output_dtype(stored: torch.dtype, requested: torch.dtype | None) -> torch.dtype:
    """The dtype a tensor is written in: `requested` for floating-point tensors when given, else its own."""
    return requested if requested is not None and stored.is_floating_point else stored


def _nearest_offloaded(module: torch.nn.Module, parents: dict[int, torch.nn.Module]) -> torch.nn.Module | None:
    current: torch.nn.Module | None = module
    while current is not None:
        if _is_offloaded(current):
            return current
        current = parents.get(id(current))
    return None


class CheckpointWeightsSource:
    """The merged model's tensors read from the base checkpoint on disk (for a quantized in-memory base).

    Weights the checkpoint leaves out because they are tied (`lm_head.weight`) are read from the weight they are tied
    to when an adapter changes one side of the pair only; both are then written (and the config unties them).

    Args:
        folder (`Path`): A folder with `model.safetensors` or sharded safetensors and an index.
        deltas (`list`): The merged deltas per module.
        dtype (`torch.dtype`, *optional*): Cast floating-point tensors to this dtype.
        tied (`dict[str, str]`): Tied weights of the model, `{target: source}`.
    """

    def __init__(
        self, folder: Path, deltas: list[_MergedDelta], dtype: torch.dtype | None, tied: Mapping[str, str]
    ) -> None:
        import json

        self.folder = folder
        self.deltas = {f"{d.name}.weight": d for d in deltas}
        self.dtype = dtype
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
        elif (folder / "model.safetensors").is_file():
            from safetensors import safe_open

            with safe_open(str(folder / "model.safetensors"), framework="pt") as handle:
                weight_map = dict.fromkeys(handle.keys(), "model.safetensors")
        else:
            raise MergeInputError(
                f"The base checkpoint folder {folder.name!r} has no safetensors weights; point base_checkpoint at the "
                "folder of the full-precision base model in safetensors format."
            )
        from ..checkpoint.reader import read_tensor_specs

        # Stored tensors in storage order (file by file, each front to back), so the checkpoint is read sequentially.
        stored: dict[str, TensorSpec] = {}
        for file_name in sorted(set(weight_map.values())):
            if not (folder / file_name).is_file():
                raise MergeInputError(
                    f"The base checkpoint {folder.name!r} names {file_name} in its index, but the file is missing."
                )
            for spec in read_tensor_specs(folder / file_name):
                if weight_map.get(spec.name) == file_name:
                    stored[spec.name] = spec
        unlisted = [key for key in weight_map if key not in stored]
        if unlisted:
            raise MergeInputError(
                f"The base checkpoint {folder.name!r} lists {unlisted[:3]} in its index but its files do not hold "
                "them; the checkpoint is incomplete."
            )
        # key to write -> (file, key stored in the checkpoint)
        self.reads: dict[str, tuple[str, str]] = {key: (weight_map[key], key) for key in stored}
        self._stored = stored
        self.untied: list[str] = []
        for target, source in tied.items():
            if target in weight_map or source not in weight_map:
                continue
            if (target in self.deltas) != (source in self.deltas):
                self.reads[target] = (weight_map[source], source)
                self.untied.extend([target, source])
        _check_target_keys(list(self.reads), deltas, f"base checkpoint {folder.name!r}")

    def specs(self) -> list[TensorSpec]:
        """Name, shape and output dtype of every tensor `tensors()` yields, in the same order (from the safetensors
        headers, without reading any weight)."""
        specs = []
        for key, (_, stored_key) in self.reads.items():
            spec = self._stored[stored_key]
            specs.append(TensorSpec(key, spec.shape, _output_dtype(spec.dtype, self.dtype)))
        return specs

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield `(key, tensor)` in storage order of the checkpoint, merged where an adapter touches the weight."""
        from ..checkpoint.reader import read_tensor
        from ..lowrank.weight_merge import merge_delta_into_weight

        for key, (file_name, stored_key) in self.reads.items():
            tensor = read_tensor(self.folder / file_name, stored_key)
            delta = self.deltas.get(key)
            if delta is not None:
                yield key, merge_delta_into_weight(tensor, delta.delta, delta.transpose, self.dtype)
            elif self.dtype is not None and tensor.is_floating_point():
                yield key, tensor.to(self.dtype)
            else:
                yield key, tensor


# ---------------------------------------------------------------------------------------------------------------------
# Where the base came from
# ---------------------------------------------------------------------------------------------------------------------


def base_hub_id(name_or_path: str | None) -> str | None:
    """The base model's Hub id: the name itself when it is one, the id encoded in an HF cache folder, else `None`."""
    if not name_or_path:
        return None
    match = _CACHE_FOLDER.search(str(name_or_path))
    if match:
        return f"{match.group(1)}/{match.group(2)}"
    if os.path.exists(name_or_path) or not _HUB_ID.match(str(name_or_path)):
        return None
    return str(name_or_path)


def base_folder(name_or_path: str | None) -> Path | None:
    """The base model's local folder: the path itself, or its snapshot in the HF cache (no download)."""
    if not name_or_path:
        return None
    if os.path.isdir(name_or_path):
        return Path(name_or_path)
    hub_id = base_hub_id(name_or_path)
    if hub_id is None:
        return None
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(hub_id, local_files_only=True))
    except Exception:
        return None


def _is_quantized(base: torch.nn.Module) -> bool:
    config = getattr(base, "config", None)
    return bool(
        getattr(base, "is_quantized", False)
        or getattr(base, "hf_quantizer", None) is not None
        or getattr(config, "quantization_config", None) is not None
    )


def _checkpoint_for_quantized(base: torch.nn.Module, base_checkpoint: str | os.PathLike | None) -> Path:
    import json

    name = getattr(base, "name_or_path", None) or getattr(getattr(base, "config", None), "_name_or_path", None)
    folder = Path(base_checkpoint) if base_checkpoint is not None else base_folder(name)
    if folder is None or not folder.is_dir():
        hub_id = base_hub_id(name)
        where = f"{hub_id!r} is not in the HF cache" if hub_id else "the base has no Hub id or local folder"
        raise MergeInputError(
            "The base model is quantized: merging into dequantized-then-requantized weights would lose precision, "
            f"so the full-precision base checkpoint is needed and none was found ({where}). Download it "
            "(hf download <base-id>) or pass base_checkpoint='path/to/base-folder'."
        )
    config_file = folder / "config.json"
    if config_file.is_file() and "quantization_config" in json.loads(config_file.read_text()):
        raise MergeInputError(
            f"The base checkpoint {folder.name!r} is itself quantized (its config.json has a quantization_config). "
            "Pass base_checkpoint= the folder of the original full-precision weights."
        )
    return folder


# ---------------------------------------------------------------------------------------------------------------------
# MergeInfo
# ---------------------------------------------------------------------------------------------------------------------


def _library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    from .._version import __version__

    versions = {"peft-merge-ext": __version__}
    for name in ("torch", "transformers", "peft", "safetensors", "huggingface_hub", "accelerate"):
        with contextlib.suppress(PackageNotFoundError):
            versions[name] = version(name)
    return versions


def adapter_sha256(base: torch.nn.Module, adapter: str) -> str:
    """SHA-256 of an adapter's LoRA tensors: for each module in model order, its name, then A's and B's dtype, shape
    and bytes."""
    from ..peft_bridge.layers import find_lora_modules

    digest = hashlib.sha256()
    for info in find_lora_modules(base, [adapter]):
        module = info.module
        if adapter in getattr(module, "lora_embedding_A", {}):
            tensors = (module.lora_embedding_A[adapter], module.lora_embedding_B[adapter])
        else:
            tensors = (module.lora_A[adapter].weight, module.lora_B[adapter].weight)
        digest.update(info.name.encode())
        for tensor in tensors:
            data = tensor.detach().to("cpu").contiguous()
            digest.update(f"{data.dtype}{tuple(data.shape)}".encode())
            digest.update(data.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _adapter_info(target: _AdapterModel, adapter: str, weight: float) -> AdapterInfo:
    config = target.peft_config[adapter]
    ranks = [config.r, *(getattr(config, "rank_pattern", None) or {}).values()]
    modules = config.target_modules
    if isinstance(modules, str):
        modules = [modules]
    return AdapterInfo(
        name=adapter,
        source=None,
        weight=weight,
        rank=int(max(ranks)),
        alpha=float(config.lora_alpha),
        target_modules=sorted(modules or []),
        use_rslora=bool(getattr(config, "use_rslora", False)),
        sha256=adapter_sha256(target.base, adapter),
        sha256_of="tensors",
    )


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _parse_dtype(dtype: Any) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    value = getattr(torch, str(dtype).removeprefix("torch."), None)
    if not isinstance(value, torch.dtype) or not value.is_floating_point:
        raise MergeInputError(f"dtype must be a floating-point torch dtype or its name ('bfloat16'), got {dtype!r}.")
    return value


# ---------------------------------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------------------------------


def _write_config(base: torch.nn.Module, folder: Path, dtype: torch.dtype, untied: bool, hub_id: str | None) -> None:
    config = copy.deepcopy(base.config)
    for attribute in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(config, attribute):
            with contextlib.suppress(AttributeError):
                delattr(config, attribute)
    config.dtype = _dtype_name(dtype)
    config.architectures = [type(base).__name__]
    config._name_or_path = hub_id or ""
    if untied:
        config.tie_word_embeddings = False
        text_config = getattr(config, "get_text_config", lambda: None)()
        if text_config is not None and text_config is not config:
            text_config.tie_word_embeddings = False
    config.save_pretrained(folder)
    generation_config = getattr(base, "generation_config", None)
    can_generate = getattr(base, "can_generate", lambda: False)()
    if generation_config is not None and can_generate:
        generation_config.save_pretrained(folder)


def _copy_tokenizer(folder: Path | None, output: Path) -> list[str]:
    if folder is None:
        return []
    copied = []
    for name in TOKENIZER_FILES:
        if (folder / name).is_file():
            shutil.copyfile(folder / name, output / name)
            copied.append(name)
    return copied


def _adapter_state_dict(deltas: list[_MergedDelta], dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for d in deltas:
        target = dtype or d.dtype
        b, a = d.delta.B.to("cpu", target), d.delta.A.to("cpu", target)
        prefix = f"base_model.model.{d.name}"
        if d.kind == "embedding":
            state[f"{prefix}.lora_embedding_A"] = a.contiguous()
            state[f"{prefix}.lora_embedding_B"] = b.contiguous()
            continue
        if d.kind == "conv":
            base_shape = d.module.get_base_layer().weight.shape
            dims = len(base_shape) - 2
            a = a.reshape(d.delta.rank, *base_shape[1:])
            b = b.reshape(b.shape[0], d.delta.rank, *([1] * dims))
        state[f"{prefix}.lora_A.weight"] = a.contiguous()
        state[f"{prefix}.lora_B.weight"] = b.contiguous()
    return state


def _write_adapter(
    target: _AdapterModel,
    adapters: list[str],
    deltas: list[_MergedDelta],
    folder: Path,
    dtype: torch.dtype | None,
    hub_id: str | None,
    base_name: str | None,
) -> None:
    from safetensors.torch import save_file

    from ..engine.combine import MergedModule, _new_adapter_config
    from ..peft_bridge.layers import LoraModuleInfo

    merged = [MergedModule(LoraModuleInfo(d.name, d.module, d.kind, d.layer_index), d.delta, d.dtype) for d in deltas]
    config = _new_adapter_config(target.peft_config[adapters[0]], merged)
    config.base_model_name_or_path = hub_id or (Path(base_name).name if base_name else None)
    config.inference_mode = True
    save_file(_adapter_state_dict(deltas, dtype), str(folder / ADAPTER_WEIGHTS_NAME), metadata={"format": "pt"})
    config.save_pretrained(str(folder))


# ---------------------------------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------------------------------


def save_merged(
    model: Any,
    save_directory: str | os.PathLike,
    *,
    adapters: Sequence[str] | None = None,
    weights: Sequence[float] | None = None,
    combination_type: str | None = None,
    merge_into_base: bool = True,
    max_shard_size: int | str = "5GB",
    tags: Sequence[str] | None = None,
    dtype: torch.dtype | str | None = None,
    eval_results: list[dict[str, Any]] | None = None,
    base_model: str | None = None,
    base_checkpoint: str | os.PathLike | None = None,
    overwrite: bool = False,
    repo_id: str | None = None,
    **combination_options: Any,
) -> Path:
    """Write the model with its adapter(s) merged in (or the combined adapter alone) to `save_directory`.

    The model is not modified. Tensors are computed module by module and streamed into safetensors shards inside a
    temporary folder renamed to `save_directory` at the end, so a failure never leaves a half-written folder.

    Args:
        model (`PeftModel` or `PreTrainedModel`): A PEFT model, or a transformers model with adapters loaded by
            `model.load_adapter`.
        save_directory (`str` or `os.PathLike`): The output folder (must not exist or be empty unless `overwrite`).
        adapters (`list[str]`, *optional*): The adapters to merge; the active adapter(s) by default.
        weights (`list[float]`, *optional*): One weight per adapter, 1.0 each by default.
        combination_type (`str`, *optional*): Any registered plugin type (`weighted`, `average`, `slerp`, `karcher`,
            ...) or one of PEFT's (`svd`, `cat`, `ties`, ...). `None`: a single adapter as is, several summed.
        merge_into_base (`bool`, *optional*, defaults to `True`): `False` writes the combined adapter
            (`adapter_model.safetensors` + `adapter_config.json`, loadable by `PeftModel.from_pretrained`).
        max_shard_size (`int` or `str`, *optional*, defaults to `"5GB"`): Shard size limit.
        tags (`list[str]`, *optional*): Extra model card tags.
        dtype (`torch.dtype` or `str`, *optional*): Dtype of the written floating-point weights; the base weights'
            own dtype by default.
        eval_results (`list[dict]`, *optional*): Rows for the card's `model-index` (keys of
            `huggingface_hub.EvalResult`: `task_type`, `dataset_type`, `dataset_name`, `metric_type`,
            `metric_value`, ...).
        base_model (`str`, *optional*): The base's Hub id for the card, when the model was loaded from a local folder.
        base_checkpoint (`str` or `os.PathLike`, *optional*): Folder of the full-precision base checkpoint, used (and
            required when not found locally or in the HF cache) when the in-memory base is quantized.
        overwrite (`bool`, *optional*, defaults to `False`): Replace an existing non-empty `save_directory`.
        repo_id (`str`, *optional*): The Hub repo the folder is meant for (used in the card's usage snippet).
        combination_options: The combination type's options (`t=...` for slerp, `svd_rank`, `density`, ...).

    Returns:
        `Path`: The output folder.
    """
    destination = Path(save_directory)
    if destination.exists() and destination.is_dir() and any(destination.iterdir()) and not overwrite:
        raise MergeInputError(
            f"Output folder {destination.name!r} already exists and is not empty; choose another folder or pass "
            "overwrite=True."
        )
    _check_card_inputs(tags, eval_results)
    plan = _plan(
        model,
        adapters,
        weights,
        combination_type,
        merge_into_base,
        max_shard_size,
        dtype,
        base_model,
        base_checkpoint,
        combination_options,
    )
    with atomic_directory(destination, overwrite=overwrite) as folder:
        _write(plan, folder, max_shard_size)
        info = plan.merge_info(eval_results)
        from ..publish.card import write_model_card

        write_model_card(
            info,
            folder,
            repo_id=repo_id or destination.name,
            tags=tags,
            notes=plan.notes,
            base_card_folder=plan.base_folder,
        )
    return destination


def _check_card_inputs(tags: Any, eval_results: Any) -> None:
    if tags is not None and (isinstance(tags, str) or not all(isinstance(tag, str) for tag in tags)):
        raise MergeInputError(f"tags must be a list of strings, got {tags!r}.")
    if eval_results is not None:
        from huggingface_hub import EvalResult

        for row in eval_results:
            if isinstance(row, EvalResult):
                continue
            try:
                EvalResult(**dict(row))
            except (TypeError, ValueError) as error:
                raise MergeInputError(
                    f"Bad eval_results row {row!r}: {error}. Each row needs task_type, dataset_type, dataset_name, "
                    "metric_type and metric_value (see huggingface_hub.EvalResult)."
                ) from None


@dataclass
class _Plan:
    target: _AdapterModel
    adapters: list[str]
    combination_type: str | None
    deltas: list[_MergedDelta]
    report: MergeReport
    adapter_infos: list[AdapterInfo]
    merge_into_base: bool
    dtype: torch.dtype | None
    hub_id: str | None
    base_name: str | None
    base_folder: Path | None
    checkpoint: Path | None
    notes: list[str] = field(default_factory=list)

    def merge_info(self, eval_results: list[dict[str, Any]] | None) -> MergeInfo:
        report = self.report
        return MergeInfo(
            base_model=self.hub_id,
            adapters=list(self.adapter_infos),
            combination_type=self.combination_type,
            options=dict(report.options),
            svd_rank=report.svd_rank,
            merge_into_base=self.merge_into_base,
            dtype=_dtype_name(self.dtype) if self.dtype is not None else None,
            report=report,
            eval_results=list(eval_results) if eval_results else None,
            versions=_library_versions(),
        )


def _plan(
    model: Any,
    adapters: Sequence[str] | None,
    weights: Sequence[float] | None,
    combination_type: str | None,
    merge_into_base: bool,
    max_shard_size: int | str,
    dtype: Any,
    base_model: str | None,
    base_checkpoint: str | os.PathLike | None,
    options: dict[str, Any],
) -> _Plan:
    """Validate everything and compute the merged factors (small: rank x (in + out) per module)."""
    target = _resolve_model(model)
    try:
        parse_size(max_shard_size)
    except ValueError as error:
        raise MergeInputError(str(error)) from None
    if not isinstance(merge_into_base, bool):
        raise MergeInputError(f"merge_into_base must be True or False, got {merge_into_base!r}.")
    out_dtype = _parse_dtype(dtype)
    if adapters is None:
        adapters = list(target.active)
    elif isinstance(adapters, str):
        adapters = [adapters]
    adapters = list(adapters)
    if not adapters:
        raise MergeInputError("No adapter to merge: the model has no active adapter and none was given.")
    missing = [name for name in adapters if name not in target.peft_config]
    if missing:
        raise MergeInputError(
            f"Unknown adapter(s) {missing}; the model has: {', '.join(map(repr, target.peft_config)) or 'none'}."
        )
    options = dict(options)
    svd_rank = options.pop("svd_rank", None)
    base = target.base
    name = getattr(base, "name_or_path", None) or getattr(base.config, "_name_or_path", None)
    hub_id = base_model or base_hub_id(name)
    _check_loadable(base)
    checkpoint = None
    if merge_into_base and _is_quantized(base):
        checkpoint = _checkpoint_for_quantized(base, base_checkpoint)
    with _factors_onloaded(target, adapters, combination_type):
        deltas, report, label = _merged_deltas(target, adapters, weights, combination_type, svd_rank, options)
        adapter_infos = [_adapter_info(target, a, w) for a, w in zip(adapters, report.weights, strict=True)]
    return _Plan(
        target=target,
        adapters=adapters,
        combination_type=label,
        deltas=deltas,
        report=report,
        adapter_infos=adapter_infos,
        merge_into_base=merge_into_base,
        dtype=out_dtype,
        hub_id=hub_id,
        base_name=name,
        base_folder=base_folder(name),
        checkpoint=checkpoint,
    )


def _model_dtype(base: torch.nn.Module) -> torch.dtype:
    for parameter in base.parameters():
        if parameter.is_floating_point():
            return parameter.dtype
    return torch.float32


def _write(plan: _Plan, folder: Path, max_shard_size: int | str) -> None:
    base = plan.target.base
    if not plan.merge_into_base:
        _write_adapter(plan.target, plan.adapters, plan.deltas, folder, plan.dtype, plan.hub_id, plan.base_name)
        return
    if plan.checkpoint is not None:
        tied = dict(getattr(base, "all_tied_weights_keys", None) or {})
        source: Any = CheckpointWeightsSource(plan.checkpoint, plan.deltas, plan.dtype, tied)
        dtype = plan.dtype or _checkpoint_dtype(plan.checkpoint)
        plan.notes.append(
            "The base was quantized in memory; the adapters were merged into the full-precision weights of the base "
            "checkpoint, not into dequantized weights."
        )
    else:
        source = MergedWeightsSource(base, plan.deltas, plan.dtype)
        dtype = plan.dtype or _model_dtype(base)
    with ShardedSafetensorsWriter(folder, source.specs(), max_shard_size) as writer:
        for key, tensor in source.tensors():
            writer.write(key, tensor)
        writer.finish()
    if source.untied:
        names = ", ".join(f"`{key}`" for key in sorted(set(source.untied)))
        plan.notes.append(
            f"The base ties {names}, but an adapter changes only some of them, so the merged model stores them "
            "separately (`tie_word_embeddings: false`)."
        )
    _write_config(base, folder, dtype, bool(source.untied), plan.hub_id)
    _copy_tokenizer(plan.base_folder if plan.checkpoint is None else plan.checkpoint, folder)


def _checkpoint_dtype(folder: Path) -> torch.dtype:
    import json

    config = json.loads((folder / "config.json").read_text()) if (folder / "config.json").is_file() else {}
    value = config.get("dtype") or config.get("torch_dtype") or "float32"
    return _parse_dtype(value) or torch.float32


_FINISHED_MARKERS = ("README.md",)


def push_merged(
    model: Any,
    repo_id: str,
    *,
    adapters: Sequence[str] | None = None,
    weights: Sequence[float] | None = None,
    combination_type: str | None = None,
    merge_into_base: bool = True,
    commit_message: str | None = None,
    commit_description: str | None = None,
    private: bool | None = None,
    token: str | bool | None = None,
    revision: str | None = None,
    create_pr: bool = False,
    max_shard_size: int | str = "5GB",
    tags: Sequence[str] | None = None,
    dtype: torch.dtype | str | None = None,
    local_dir: str | os.PathLike | None = None,
    eval_results: list[dict[str, Any]] | None = None,
    base_model: str | None = None,
    base_checkpoint: str | os.PathLike | None = None,
    **combination_options: Any,
) -> str:
    """`save_merged` into a local folder, then upload that folder to the Hub in one commit.

    Args:
        repo_id (`str`): The target repo, `user/name` (created if needed).
        commit_message (`str`, *optional*): The commit message.
        commit_description (`str`, *optional*): The commit description.
        private (`bool`, *optional*): Visibility of a newly created repo.
        token (`str`, *optional*): Hub token; `HF_TOKEN` or the stored login by default. Never written anywhere.
        revision (`str`, *optional*): Branch to commit to (created when missing).
        create_pr (`bool`, *optional*, defaults to `False`): Open a pull request instead of committing directly.
        local_dir (`str` or `os.PathLike`, *optional*): Where the folder is built. If it already holds a finished
            folder (for example left by a failed push), it is uploaded as is, without recomputing. By default a
            temporary folder, deleted after a successful upload and kept (and named in the error) after a failure.
        Other arguments: as in `save_merged`.

    Returns:
        `str`: The commit URL (the pull request URL with `create_pr=True`).

    Raises:
        `HubUploadError`: When the upload fails; the message names the local folder to retry with.
    """
    from ..publish.hub import upload_folder

    keep = local_dir is not None
    folder = Path(local_dir) if local_dir is not None else None
    reuse = folder is not None and folder.is_dir() and all((folder / marker).is_file() for marker in _FINISHED_MARKERS)
    if not reuse:
        if folder is None:
            parent = Path(tempfile.mkdtemp(prefix="peft-merge-ext-push-"))
            folder = parent / repo_id.replace("/", "--")
        save_merged(
            model,
            folder,
            adapters=adapters,
            weights=weights,
            combination_type=combination_type,
            merge_into_base=merge_into_base,
            max_shard_size=max_shard_size,
            tags=tags,
            dtype=dtype,
            eval_results=eval_results,
            base_model=base_model,
            base_checkpoint=base_checkpoint,
            repo_id=repo_id,
            **combination_options,
        )
    assert folder is not None
    url = upload_folder(
        folder,
        repo_id,
        token=token,
        private=private,
        revision=revision,
        create_pr=create_pr,
        commit_message=commit_message
        or (
            "Upload merged model with peft-merge-ext" if merge_into_base else "Upload LoRA adapter with peft-merge-ext"
        ),
        commit_description=commit_description,
    )
    if not keep:
        shutil.rmtree(folder.parent, ignore_errors=True)
    return url
