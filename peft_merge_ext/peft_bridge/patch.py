"""The drop-in patch of PEFT's `LoraModel.add_weighted_adapter`.

Registered plugin types go to `peft_merge_ext.engine.combine`; PEFT's own types (and anything else PEFT knows) go to
the original method untouched, with the exact same arguments.

It also adds `save_merged` / `push_merged` to PEFT's `PeftModel` and transformers' `PreTrainedModel` (thin methods
that import `peft_merge_ext.publish.save` only when called).
"""

from __future__ import annotations

import functools
import sys
import typing
from typing import Any

__all__ = ["attach_methods", "detach_methods", "install", "install_loaded", "is_installed", "uninstall"]

_MARKER = "__peft_merge_ext_patch__"


def _lora_model_class() -> type:
    # Import the defining module only: this runs inside the post-import hook of that very module.
    from peft.tuners.lora.model import LoraModel

    return LoraModel


def _peft_types(original: Any) -> set[str]:
    from ..plugins.registry import PEFT_COMBINATION_TYPES

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
            _refuse_serving_options(combination_type, kwargs)
            result = original(self, *args, **kwargs)  # PEFT's own path, arguments untouched
            _record_peft_lineage(original, self, args, kwargs)
            return result
        return _plugin_weighted_adapter(self, *args, **kwargs)

    setattr(add_weighted_adapter, _MARKER, True)
    add_weighted_adapter.__doc__ = (original.__doc__ or "") + (
        "\n\n        peft-merge-ext: `combination_type` also accepts every registered plugin type (`weighted`, "
        "`average`, `slerp`, `karcher`, ...); extra keyword options go to that type."
    )
    return add_weighted_adapter


def _refuse_serving_options(combination_type: str, kwargs: dict[str, Any]) -> None:
    """Our serving options given to one of PEFT's types: our clear error rather than PEFT's TypeError."""
    from ..engine.serving import SERVING_OPTIONS

    given = [name for name in SERVING_OPTIONS if name in kwargs]
    if given:
        from ..errors import MergeInputError

        raise MergeInputError(
            f"{' / '.join(given)} apply to the registered combination types, not to PEFT's "
            f"combination_type={combination_type!r}; use 'weighted' (the exact equivalent of 'linear'/'cat') or "
            "another registered type."
        )


def _record_peft_lineage(original: Any, lora_model: Any, args: tuple, kwargs: dict[str, Any]) -> None:
    """Attach the lineage of an adapter PEFT's own type just created; never fails PEFT's call."""
    import inspect
    import warnings

    try:
        from ..engine.request import PEFT_ONLY_ARGUMENTS, MergeRequest
        from .adapters import record_peft_lineage

        bound = inspect.signature(original).bind(lora_model, *args, **kwargs)
        bound.apply_defaults()
        arguments = bound.arguments
        options = {name: arguments[name] for name in PEFT_ONLY_ARGUMENTS if name in arguments}
        request = MergeRequest(
            list(arguments["adapters"]),
            [float(w) for w in arguments["weights"]],
            arguments["combination_type"],
            options,
            arguments.get("svd_rank"),
        )
        record_peft_lineage(lora_model, arguments["adapter_name"], request)
    except Exception as error:  # the adapter PEFT made is fine; only its record is missing
        warnings.warn(f"peft-merge-ext could not record how the adapter was made: {error}", stacklevel=3)


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
    from ..engine.request import resolve_request, unknown_type_error
    from ..plugins.registry import get_combination_types
    from .adapters import add_combined_adapter, check_new_adapter_name

    if combination_type not in get_combination_types():
        raise unknown_type_error(combination_type)
    check_new_adapter_name(self, adapter_name)
    peft_arguments = {
        "svd_clamp": svd_clamp,
        "svd_full_matrices": svd_full_matrices,
        "svd_driver": svd_driver,
        "density": density,
        "majority_sign_method": majority_sign_method,
    }
    request = resolve_request(
        self.peft_config, adapters, weights, combination_type, svd_rank, options, peft_arguments=peft_arguments
    )
    add_combined_adapter(self, adapter_name, request)


def is_installed() -> bool:
    """Whether PEFT's `LoraModel.add_weighted_adapter` is currently patched (imports peft)."""
    return getattr(_lora_model_class().__dict__.get("add_weighted_adapter"), _MARKER, False)


_METHOD_MARKER = "__peft_merge_ext_method__"
_METHOD_OWNERS = (("peft.peft_model", "PeftModel"), ("transformers.modeling_utils", "PreTrainedModel"))


def save_merged(self: Any, save_directory: Any, **kwargs: Any) -> Any:
    """Write this model with its LoRA adapter(s) merged in (or the combined adapter) to `save_directory`, without
    modifying the model. See `peft_merge_ext.publish.save.save_merged` for the arguments.

    Returns:
        `Path`: The output folder.
    """
    from ..publish.save import save_merged as implementation

    return implementation(self, save_directory, **kwargs)


def push_merged(self: Any, repo_id: str, **kwargs: Any) -> str:
    """Merge this model's LoRA adapter(s) (see `save_merged`) and upload the folder to the Hub in one commit. See
    `peft_merge_ext.publish.push.push_merged` for the arguments.

    Returns:
        `str`: The commit URL (the pull request URL with `create_pr=True`).
    """
    from ..publish.push import push_merged as implementation

    return implementation(self, repo_id, **kwargs)


setattr(save_merged, _METHOD_MARKER, True)
setattr(push_merged, _METHOD_MARKER, True)
_METHODS = {"save_merged": save_merged, "push_merged": push_merged}


def _loaded_class(module_name: str, class_name: str) -> type | None:
    """The class if its module is fully imported (a module still executing may not define it yet)."""
    module = sys.modules.get(module_name)
    value = getattr(module, class_name, None) if module is not None else None
    return value if isinstance(value, type) else None


def _loaded_owners(on_peft_model: Any) -> list[type]:
    """The imported classes that get `save_merged` / `push_merged`; `on_peft_model` is applied to `PeftModel`."""
    peft_model = _loaded_class("peft.peft_model", "PeftModel")
    if peft_model is not None:
        on_peft_model(peft_model)
    owners = [_loaded_class(module_name, class_name) for module_name, class_name in _METHOD_OWNERS]
    return [cls for cls in owners if cls is not None]


def attach_methods() -> None:
    """Add `save_merged` / `push_merged` to PEFT's `PeftModel` and transformers' `PreTrainedModel`, for each class
    whose module is already imported, and make `PeftModel` keep lineage records across `save_pretrained` /
    `from_pretrained`. A method a library defines itself is never replaced (idempotent)."""
    from .persistence import wrap_peft_model

    for cls in _loaded_owners(wrap_peft_model):
        for name, method in _METHODS.items():
            current = cls.__dict__.get(name)
            if current is None or getattr(current, _METHOD_MARKER, False):
                setattr(cls, name, method)


def detach_methods() -> None:
    """Remove the methods added by `attach_methods` (idempotent)."""
    from .persistence import unwrap_peft_model

    for cls in _loaded_owners(unwrap_peft_model):
        for name in _METHODS:
            if getattr(cls.__dict__.get(name), _METHOD_MARKER, False):
                delattr(cls, name)


def install_loaded() -> None:
    """What the post-import hook runs: patch whatever of PEFT / transformers is imported by now, importing nothing."""
    lora_model = _loaded_class("peft.tuners.lora.model", "LoraModel")
    if lora_model is not None:
        _patch_add_weighted_adapter(lora_model)
    attach_methods()


def _patch_add_weighted_adapter(cls: type) -> None:
    current = cls.__dict__["add_weighted_adapter"]
    if not getattr(current, _MARKER, False):
        cls.add_weighted_adapter = _make_wrapper(current)


def install() -> None:
    """Patch `LoraModel.add_weighted_adapter` (idempotent) and add `save_merged` / `push_merged` to `PeftModel` and
    `PreTrainedModel`."""
    _patch_add_weighted_adapter(_lora_model_class())
    import peft.peft_model  # noqa: F401
    import transformers.modeling_utils  # noqa: F401

    attach_methods()


def uninstall() -> None:
    """Restore PEFT's `LoraModel.add_weighted_adapter` and remove `save_merged` / `push_merged` (idempotent)."""
    cls = _lora_model_class()
    current = cls.__dict__["add_weighted_adapter"]
    if getattr(current, _MARKER, False):
        cls.add_weighted_adapter = current.__wrapped__
    detach_methods()
