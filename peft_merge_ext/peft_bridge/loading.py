"""Loading a base model and adapter folders into one PEFT model (for PEFT's own types, search and `LoRAMerger`)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["adapter_names", "load_peft_model"]


def adapter_names(paths: Sequence[str | Path]) -> list[str]:
    """Adapter names from folder names (characters PEFT cannot take in a name replaced by `_`), made unique (`a`,
    `a_2`, ...): the rule of every on-disk entry point."""
    import re

    names: list[str] = []
    for path in paths:
        base = re.sub(r"[^A-Za-z0-9_-]+", "_", Path(str(path).rstrip("/")).name) or "adapter"
        name, number = base, 2
        while name in names:
            name, number = f"{base}_{number}", number + 1
        names.append(name)
    return names


def load_peft_model(
    base: str | Path, adapters: Sequence[str | Path], *, device_map: Any = None, dtype: Any = None
) -> tuple[Any, list[str]]:
    """Load the base model with the class its config names, then every adapter with PEFT.

    Returns:
        `tuple[PeftModel, list[str]]`: The model and the adapters' names (`adapter_names(adapters)`).
    """
    import transformers
    from peft import PeftModel

    from ..checkpoint.side_files import parse_dtype

    config = transformers.AutoConfig.from_pretrained(str(base))
    architectures = getattr(config, "architectures", None) or []
    model_class = getattr(transformers, architectures[0], None) if architectures else None
    model_class = model_class or transformers.AutoModelForCausalLM
    kwargs: dict[str, Any] = {}
    if device_map is not None:
        kwargs["device_map"] = device_map
    if dtype is not None:
        kwargs["dtype"] = parse_dtype(dtype)
    model = model_class.from_pretrained(str(base), **kwargs)
    names = adapter_names(adapters)
    peft_model = PeftModel.from_pretrained(model, str(adapters[0]), adapter_name=names[0])
    for name, adapter in zip(names[1:], adapters[1:], strict=True):
        peft_model.load_adapter(str(adapter), adapter_name=name)
    return peft_model, names
