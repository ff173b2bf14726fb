"""Reading and writing LoRA factors of PEFT layers in the canonical orientation of the combination contract.

| layer                          | canonical `B` (`out x r`)      | canonical `A` (`r x in`)                    |
|--------------------------------|--------------------------------|---------------------------------------------|
| `Linear` (also GPT-2 `Conv1D`) | `lora_B.weight * scaling`      | `lora_A.weight`                             |
| `Embedding`                    | `lora_embedding_B * scaling`   | `lora_embedding_A` (`r x num_embeddings`)   |
| `Conv1d/2d/3d`                 | `lora_B.weight.flatten(1) * s` | `lora_A.weight.flatten(1)` (kernel folded)  |

`fan_in_fan_out` only changes how PEFT lays the delta onto the base weight (`transpose(B @ A)`); the factors are the
same, so the canonical delta is always `B @ A`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import AdapterCompatibilityError
from ..plugins.contract import LowRankDelta

__all__ = [
    "LoraModuleInfo",
    "factor_tensors",
    "find_lora_modules",
    "has_adapter",
    "read_factors",
    "slot_rank",
    "write_factors",
]

_LAYER_INDEX = re.compile(r"\.(\d+)(?:\.|$)")


@dataclass(frozen=True)
class LoraModuleInfo:
    """A module carrying LoRA layers.

    Args:
        name (`str`): Its name in the base model.
        module (`nn.Module`): The PEFT `LoraLayer`.
        kind (`str`): `"linear"`, `"embedding"` or `"conv"`.
        layer_index (`int`, *optional*): The first number in its dotted name (the block index), if any.
    """

    name: str
    module: nn.Module
    kind: str
    layer_index: int | None


def _kind(module: nn.Module) -> str:
    from peft.tuners.lora import layer as lora_layer

    conv_class = getattr(lora_layer, "_ConvNd", None) or lora_layer.Conv2d
    if isinstance(module, lora_layer.Embedding):
        return "embedding"
    if isinstance(module, conv_class):
        return "conv"
    return "linear"


def find_lora_modules(model: nn.Module, adapters: list[str]) -> list[LoraModuleInfo]:
    """The modules of `model` holding a LoRA layer for at least one of `adapters`, in model order."""
    from peft.tuners.lora import LoraLayer

    found = []
    for name, module in model.named_modules():
        if not isinstance(module, LoraLayer) or hasattr(module, "parameter_name"):
            continue  # LoRA on an nn.Parameter (PEFT's ParamWrapper) is read by `peft_bridge.extras`
        holders = set(getattr(module, "lora_A", {})) | set(getattr(module, "lora_embedding_A", {}))
        if not holders.intersection(adapters):
            continue
        match = _LAYER_INDEX.search(name)
        found.append(LoraModuleInfo(name, module, _kind(module), int(match.group(1)) if match else None))
    return found


def check_supported(info: LoraModuleInfo, adapter: str) -> None:
    """Raise `AdapterCompatibilityError` when `adapter` at this module is not LoRA whose factors give `s * B @ A`."""
    module = info.module
    if adapter not in getattr(module, "lora_A", {}) and adapter not in getattr(module, "lora_embedding_A", {}):
        return
    variant = getattr(module, "lora_variant", {}).get(adapter)
    if variant is not None and "Dora" not in type(variant).__name__:
        raise AdapterCompatibilityError(
            f"Adapter {adapter!r} uses a LoRA variant ({type(variant).__name__}) at {info.name!r}: its update is not "
            "B @ A, so it cannot be merged exactly. Use PEFT's merge_and_unload for it."
        )
    # DoRA magnitudes and lora_bias are merged into the base (`engine.features` decides when; `peft_bridge.extras`
    # reads them); the factors read here are the `s * B @ A` both build on.
    if adapter in getattr(module, "lora_A", {}) and not isinstance(
        module.lora_A[adapter], (nn.Linear, nn.modules.conv._ConvNd)
    ):
        raise AdapterCompatibilityError(
            f"Adapter {adapter!r} at {info.name!r} has an unsupported LoRA layer "
            f"({type(module.lora_A[adapter]).__name__})."
        )
    if info.kind == "conv" and module.get_base_layer().groups > 1:
        raise AdapterCompatibilityError(
            f"{info.name!r} is a grouped convolution (groups={module.get_base_layer().groups}); its LoRA delta is "
            "not a single low-rank product and cannot be combined."
        )


def read_factors(info: LoraModuleInfo, adapter: str, dtype: torch.dtype) -> LowRankDelta | None:
    """The canonical factors of `adapter` here, scaling folded into `B`, cast to `dtype`; `None` if absent."""
    module = info.module
    if adapter in getattr(module, "lora_embedding_A", {}):
        a = module.lora_embedding_A[adapter]
        b = module.lora_embedding_B[adapter]
    elif adapter in getattr(module, "lora_A", {}):
        a = module.lora_A[adapter].weight.flatten(1)
        b = module.lora_B[adapter].weight.flatten(1)
    else:
        return None
    scaling = float(module.scaling[adapter])
    # Fresh tensors: a combination function may work in place without touching the user's adapter.
    return LowRankDelta(b.detach().to(dtype) * scaling, a.detach().to(dtype, copy=True))


def factor_device_dtype(info: LoraModuleInfo, adapters: list[str]) -> tuple[torch.device, torch.dtype]:
    """Device and storage dtype of the first of `adapters` present at this module."""
    module = info.module
    for adapter in adapters:
        if adapter in getattr(module, "lora_embedding_A", {}):
            tensor = module.lora_embedding_A[adapter]
            return tensor.device, tensor.dtype
        if adapter in getattr(module, "lora_A", {}):
            tensor = module.lora_A[adapter].weight
            return tensor.device, tensor.dtype
    raise KeyError(f"None of {adapters} is present at {info.name}")


def in_out_features(info: LoraModuleInfo, adapter: str) -> tuple[int, int]:
    """`(out, in)` of the canonical delta of this module, read from an adapter present there."""
    module = info.module
    if adapter in getattr(module, "lora_embedding_A", {}):
        return module.lora_embedding_B[adapter].shape[0], module.lora_embedding_A[adapter].shape[1]
    weight_a = module.lora_A[adapter].weight
    return module.lora_B[adapter].weight.shape[0], weight_a[0].numel()


def write_factors(module: nn.Module, adapter: str, delta: LowRankDelta, dtype: torch.dtype) -> None:
    """Store `delta` as the factors of `adapter` in the PEFT LoRA layer `module` (scaling 1 assumed)."""
    b = delta.B.to(dtype)
    a = delta.A.to(dtype)
    if adapter in getattr(module, "lora_embedding_A", {}):
        module.lora_embedding_A[adapter] = nn.Parameter(a.contiguous(), requires_grad=False)
        module.lora_embedding_B[adapter] = nn.Parameter(b.contiguous(), requires_grad=False)
        return
    layer_a, layer_b = module.lora_A[adapter], module.lora_B[adapter]
    shape_a = (delta.rank, *layer_a.weight.shape[1:])
    shape_b = (b.shape[0], delta.rank, *layer_b.weight.shape[2:])
    layer_a.weight = nn.Parameter(a.reshape(shape_a).contiguous(), requires_grad=False)
    layer_b.weight = nn.Parameter(b.reshape(shape_b).contiguous(), requires_grad=False)


def slot_rank(module: nn.Module, adapter: str) -> int:
    """The rank of `adapter`'s factors in the LoRA layer `module`."""
    if adapter in getattr(module, "lora_embedding_A", {}):
        return module.lora_embedding_A[adapter].shape[0]
    return module.lora_A[adapter].weight.shape[0]


def factor_tensors(module: nn.Module, adapter: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The stored `(A, B)` tensors of `adapter` in the LoRA layer `module` (for digests)."""
    if adapter in getattr(module, "lora_embedding_A", {}):
        return module.lora_embedding_A[adapter], module.lora_embedding_B[adapter]
    return module.lora_A[adapter].weight, module.lora_B[adapter].weight


def has_adapter(module: nn.Module, adapter: str) -> bool:
    """Whether the LoRA layer `module` holds factors of `adapter`."""
    return adapter in getattr(module, "lora_A", {}) or adapter in getattr(module, "lora_embedding_A", {})
