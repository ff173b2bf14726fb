"""Writing a combined LoRA adapter: `adapter_config.json`, `adapter_model.safetensors` and the lineage record.

Shared by the in-memory `save_merged(merge_into_base=False)`, the on-disk recipe steps that produce an adapter, and
`add_weighted_adapter` (which builds its PEFT `LoraConfig` from `combined_adapter_config`), so a combined adapter has
the same configuration whichever way it was made. The factors are stored with scaling exactly 1: `r == lora_alpha`
for every module, per-module ranks through `rank_pattern` / `alpha_pattern`.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ..plugins.contract import LowRankDelta

__all__ = [
    "ADAPTER_CONFIG_NAME",
    "ADAPTER_WEIGHTS_NAME",
    "adapter_state_dict",
    "combined_adapter_config",
    "write_adapter",
    "write_lineage",
]

ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"

# Settings of the template adapter that do not describe the combined one.
_RESET = {
    "use_rslora": False,
    "use_dora": False,
    "lora_bias": False,
    "bias": "none",
    "layers_to_transform": None,
    "layers_pattern": None,
    "exclude_modules": None,
    "modules_to_save": None,
    "init_lora_weights": True,
    "lora_dropout": 0.0,
    "trainable_token_indices": None,
    "target_parameters": None,
}


def combined_adapter_config(
    template: Mapping[str, Any], ranks: Mapping[str, int], base_model_name_or_path: str | None = None
) -> dict[str, Any]:
    """The `adapter_config.json` data of a combined adapter: effective scaling exactly 1 everywhere.

    Args:
        template (`Mapping`): The config of the first source adapter (as PEFT saves it).
        ranks (`Mapping[str, int]`): Module name -> rank of its merged factors, in model order.
        base_model_name_or_path (`str`, *optional*): The base's Hub id (never a local path).
    """
    default_rank = Counter(ranks.values()).most_common(1)[0][0]
    pattern = {re.escape(name): rank for name, rank in ranks.items() if rank != default_rank}
    config = {key: (sorted(value) if isinstance(value, set) else value) for key, value in template.items()}
    config.update({key: value for key, value in _RESET.items() if key in config})
    config.update(
        {
            "r": default_rank,
            "lora_alpha": default_rank,
            "rank_pattern": pattern,
            "alpha_pattern": dict(pattern),
            "target_modules": sorted(ranks),
            "base_model_name_or_path": base_model_name_or_path,
            "revision": None,
            "inference_mode": True,
        }
    )
    return config


def adapter_state_dict(
    modules: Sequence[tuple[str, str, tuple[int, ...], LowRankDelta, torch.dtype]],
) -> dict[str, torch.Tensor]:
    """PEFT's saved keys and tensors for `(module name, kind, conv kernel, factors, dtype)` entries."""
    state: dict[str, torch.Tensor] = {}
    for name, kind, kernel, delta, dtype in modules:
        b, a = delta.B.to("cpu", dtype), delta.A.to("cpu", dtype)
        prefix = f"base_model.model.{name}"
        if kind == "embedding":
            state[f"{prefix}.lora_embedding_A"] = a.contiguous()
            state[f"{prefix}.lora_embedding_B"] = b.contiguous()
            continue
        if kind == "conv":
            cells = 1
            for size in kernel:
                cells *= size
            a = a.reshape(delta.rank, a.shape[1] // cells, *kernel)
            b = b.reshape(b.shape[0], delta.rank, *([1] * len(kernel)))
        state[f"{prefix}.lora_A.weight"] = a.contiguous()
        state[f"{prefix}.lora_B.weight"] = b.contiguous()
    return state


def write_adapter(folder: Path, config: Mapping[str, Any], state: Mapping[str, torch.Tensor]) -> list[str]:
    """Write `adapter_config.json` and `adapter_model.safetensors` into `folder` and return their names."""
    from safetensors.torch import save_file

    save_file(dict(state), str(folder / ADAPTER_WEIGHTS_NAME), metadata={"format": "pt"})
    (folder / ADAPTER_CONFIG_NAME).write_text(json.dumps(dict(config), indent=2, sort_keys=True, default=str) + "\n")
    return [ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME]


def write_lineage(folder: Path, lineage: Any) -> str:
    """Write a `Lineage` record beside an adapter's files (PEFT ignores the file) and return its name."""
    from ..engine.merge_info import LINEAGE_FILE

    (folder / LINEAGE_FILE).write_text(json.dumps(lineage.to_dict(), indent=2, sort_keys=True) + "\n")
    return LINEAGE_FILE
