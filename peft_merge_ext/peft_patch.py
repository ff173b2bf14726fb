"""The drop-in patch of PEFT's `LoraModel.add_weighted_adapter`.

Registered plugin types go to `peft_merge_ext.combine`; PEFT's own types (and anything else PEFT knows) go to the
original method untouched, with the exact same arguments.
"""

from __future__ import annotations

import functools
import typing
from typing import Any

from .errors import UnknownCombinationTypeError

__all__ = ["install", "is_installed", "uninstall"]

_MARKER = "__peft_merge_ext_patch__"


def _lora_model_class() -> type:
    # Import the defining module only: this runs inside the post-import hook of that very module.
    from peft.tuners.lora.model import LoraModel

    return LoraModel


def _peft_types(original: Any) -> set[str]:
    from .plugins import PEFT_COMBINATION_TYPES

    names = set(PEFT_COMBINATION_TYPES)
    annotation = getattr(original, "__annotations__", {}).get("combination_type")
    if annotation is not None and not isinstance(annotation, str):
        names.update(arg for arg in typing.get_args(annotation) if isinstance(arg, str))
    return names


def _make_wrapper(original: Any) -> Any:
    peft_types = _peft_types(original)

    @functools.wraps(original)
    def add_weighted_adapter(self: Any, *args: Any, **kwargs: Any) -> None:
        combination_type = args[3] if len(args) > 3 else kwargs.get("combination_type", "svd")
        if isinstance(combination_type, str) and combination_type in peft_types:
            return original(self, *args, **kwargs)  # PEFT's own path, arguments untouched
        return _plugin_weighted_adapter(self, *args, **kwargs)

    setattr(add_weighted_adapter, _MARKER, True)
    add_weighted_adapter.__doc__ = (original.__doc__ or "") + (
        "\n\n        peft-merge-ext: `combination_type` also accepts every registered plugin type (`weighted`, "
        "`average`, `slerp`, `karcher`, ...); extra keyword options go to that type."
    )
    return add_weighted_adapter


def _plugin_weighted_adapter(
    self: Any,
    adapters: list[str],
    weights: list[float],
    adapter_name: str,
    combination_type: str = "svd",
    svd_rank: int | None = None,
    svd_clamp: int | None = None,
    svd_full_matrices: bool = True,
    svd_driver: str | None = None,
    density: float | None = None,
    majority_sign_method: str = "total",
    **options: Any,
) -> None:
    from .combine import add_combined_adapter, prepare_request
    from .plugins import PEFT_COMBINATION_TYPES, get_combination_types

    types = get_combination_types()
    if combination_type not in types:
        raise UnknownCombinationTypeError(
            f"Unknown combination_type {combination_type!r}. "
            f"PEFT's types: {', '.join(sorted(PEFT_COMBINATION_TYPES))}."
            f" Plugin types: {', '.join(sorted(types)) or 'none'} (see `peft-merge-ext plugins`)."
        )
    peft_arguments = {
        "svd_clamp": svd_clamp,
        "svd_full_matrices": svd_full_matrices,
        "svd_driver": svd_driver,
        "density": density,
        "majority_sign_method": majority_sign_method,
    }
    request = prepare_request(self.peft_config, adapters, weights, combination_type, svd_rank, options, peft_arguments)
    add_combined_adapter(self, adapter_name, request)


def is_installed() -> bool:
    """Whether PEFT's `LoraModel.add_weighted_adapter` is currently patched (imports peft)."""
    return getattr(_lora_model_class().__dict__.get("add_weighted_adapter"), _MARKER, False)


def install() -> None:
    """Patch `LoraModel.add_weighted_adapter` (idempotent) and add `save_merged` / `push_merged` where available."""
    cls = _lora_model_class()
    current = cls.__dict__["add_weighted_adapter"]
    if not getattr(current, _MARKER, False):
        cls.add_weighted_adapter = _make_wrapper(current)


def uninstall() -> None:
    """Restore PEFT's original `LoraModel.add_weighted_adapter` (idempotent)."""
    cls = _lora_model_class()
    current = cls.__dict__["add_weighted_adapter"]
    if getattr(current, _MARKER, False):
        cls.add_weighted_adapter = current.__wrapped__
