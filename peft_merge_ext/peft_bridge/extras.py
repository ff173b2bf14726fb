"""What an adapter in a live PEFT model adds beyond its LoRA factors on modules (`lowrank.tensor_edits.AdapterExtras`).

Read from PEFT's layers without modifying them: DoRA magnitudes (`lora_magnitude_vector`), LoRA biases
(`lora_B.bias`, scaled), LoRA on `nn.Parameter`s (`ParamWrapper`, one delta per expert), `modules_to_save` copies and
trainable token rows (a tied output embedding shares its rows with the input embedding, as PEFT ties them). Keys are
those of the plain base model, as `peft_bridge.weights` writes them.
"""

from __future__ import annotations

from typing import Any

import torch

from ..lowrank.tensor_edits import AdapterExtras, ExpertFactors, Stored, expert_deltas

__all__ = ["extra_tensors", "live_extras", "plain_name"]

_WRAPPER_PARTS = ("base_layer", "original_module", "token_adapter")


def plain_name(name: str) -> str:
    """The module's name in the plain base model (PEFT's wrapper levels removed)."""
    return ".".join(part for part in name.split(".") if part not in _WRAPPER_PARTS)


def _detached(tensor: torch.Tensor) -> Any:
    return lambda: tensor.detach()


def _experts(module: Any, adapter: str) -> ExpertFactors:
    from ..lowrank.factor_math import compute_dtype_for

    a = module.lora_A[adapter].weight
    b = module.lora_B[adapter].weight
    experts = int(module.num_experts)
    scaling = float(module.scaling[adapter])
    dtype = compute_dtype_for(a.device)
    return ExpertFactors(
        tag=f"experts:{adapter}:{id(a)}",
        read=lambda: expert_deltas(a.detach(), b.detach(), experts, scaling, dtype),
        transpose=experts > 1 and not module._did_swap_in_out_features,
        stacked=experts > 1,
    )


def live_extras(base: torch.nn.Module, adapter: str) -> AdapterExtras:
    """Everything `adapter` adds beyond LoRA factors on modules, in `base` (the model holding PEFT's layers)."""
    from peft.tuners.lora import LoraLayer
    from peft.tuners.trainable_tokens.layer import TrainableTokensLayer
    from peft.utils.other import ModulesToSaveWrapper

    extras = AdapterExtras()
    for name, module in base.named_modules():
        plain = plain_name(name)
        if isinstance(module, LoraLayer) and adapter in getattr(module, "lora_A", {}):
            if hasattr(module, "parameter_name"):
                extras.experts[f"{plain}.{module.parameter_name}"] = _experts(module, adapter)
                continue
            if module.lora_bias.get(adapter, False):
                bias = module.lora_B[adapter].bias
                scale = float(module.scaling[adapter])
                extras.biases[f"{plain}.bias"] = Stored(f"bias:{adapter}:{id(bias)}", _detached(bias), scale)
        if isinstance(module, LoraLayer) and adapter in getattr(module, "lora_magnitude_vector", {}):
            magnitude = module.lora_magnitude_vector[adapter].weight
            extras.magnitudes[f"{plain}.weight"] = Stored(f"dora:{adapter}:{id(magnitude)}", _detached(magnitude))
        elif isinstance(module, ModulesToSaveWrapper) and adapter in module.modules_to_save:
            copy = module.modules_to_save[adapter]
            for key, tensor in copy.state_dict(keep_vars=True).items():
                extras.copies[f"{plain}.{key}"] = Stored(f"copy:{adapter}:{id(tensor)}", _detached(tensor))
        elif isinstance(module, TrainableTokensLayer):
            source = module.tied_adapter or module
            if adapter in source.trainable_tokens_delta:
                rows = source.trainable_tokens_delta[adapter]
                indices = tuple(int(i) for i in source.token_indices[adapter])
                extras.rows[f"{plain}.weight"] = (indices, Stored(f"rows:{adapter}:{id(rows)}", _detached(rows)))
    return extras


def extra_tensors(base: torch.nn.Module, adapter: str) -> list[tuple[str, torch.Tensor]]:
    """`adapter`'s stored tensors beyond LoRA factors on modules, named, in model order (for its content digest)."""
    from peft.tuners.lora import LoraLayer
    from peft.tuners.trainable_tokens.layer import TrainableTokensLayer
    from peft.utils.other import ModulesToSaveWrapper

    found = []
    for name, module in base.named_modules():
        if isinstance(module, LoraLayer) and adapter in getattr(module, "lora_A", {}):
            if hasattr(module, "parameter_name"):
                found += [
                    (f"{name}.lora_A", module.lora_A[adapter].weight),
                    (f"{name}.lora_B", module.lora_B[adapter].weight),
                ]
            elif module.lora_bias.get(adapter, False):
                found.append((f"{name}.lora_B.bias", module.lora_B[adapter].bias))
        if isinstance(module, LoraLayer) and adapter in getattr(module, "lora_magnitude_vector", {}):
            found.append((f"{name}.lora_magnitude_vector", module.lora_magnitude_vector[adapter].weight))
        elif isinstance(module, ModulesToSaveWrapper) and adapter in module.modules_to_save:
            copy = module.modules_to_save[adapter].state_dict(keep_vars=True)
            found += [(f"{name}.{key}", tensor) for key, tensor in copy.items()]
        elif (
            isinstance(module, TrainableTokensLayer)
            and module.tied_adapter is None  # a tied layer shares the rows of the one it is tied to
            and adapter in module.trainable_tokens_delta
        ):
            found.append((f"{name}.trainable_tokens_delta", module.trainable_tokens_delta[adapter]))
    return found
