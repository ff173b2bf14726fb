"""peft-merge-ext: exact, memory-bounded LoRA adapter merging for PEFT.

Importing this package is cheap: torch, peft, transformers and pluggy are imported only when a feature is used.
Importing it activates the PEFT patch: at once if peft's LoRA model module is already imported, otherwise as soon as
it is.
"""

from __future__ import annotations

TYPE_CHECKING = False

__version__ = "0.1.0"

__all__ = [
    "AdapterCompatibilityError",
    "CombinationError",
    "CombinationType",
    "DuplicateCombinationTypeError",
    "HubUploadError",
    "LowRankDelta",
    "MergeInputError",
    "MergeReport",
    "ModuleContext",
    "PeftMergeExtError",
    "PluginError",
    "ReservedCombinationTypeError",
    "UnknownCombinationTypeError",
    "__version__",
    "get_combination_types",
    "get_merge_report",
    "get_plugins",
    "hookimpl",
    "install",
    "load_plugins",
    "uninstall",
]

_LAZY = {
    "hookimpl": "hookspecs",
    "hookspec": "hookspecs",
    "get_combination_types": "plugins",
    "get_plugins": "plugins",
    "load_plugins": "plugins",
    "CombinationType": "plugins",
    "LowRankDelta": "contract",
    "ModuleContext": "contract",
    "MergeReport": "report",
    "get_merge_report": "report",
    "install": "peft_patch",
    "uninstall": "peft_patch",
    "is_installed": "peft_patch",
    "PeftMergeExtError": "errors",
    "PluginError": "errors",
    "DuplicateCombinationTypeError": "errors",
    "ReservedCombinationTypeError": "errors",
    "UnknownCombinationTypeError": "errors",
    "MergeInputError": "errors",
    "AdapterCompatibilityError": "errors",
    "CombinationError": "errors",
    "HubUploadError": "errors",
}

if TYPE_CHECKING:  # pragma: no cover
    from .contract import LowRankDelta, ModuleContext
    from .errors import (
        AdapterCompatibilityError,
        CombinationError,
        DuplicateCombinationTypeError,
        HubUploadError,
        MergeInputError,
        PeftMergeExtError,
        PluginError,
        ReservedCombinationTypeError,
        UnknownCombinationTypeError,
    )
    from .hookspecs import hookimpl
    from .peft_patch import install, uninstall
    from .plugins import CombinationType, get_combination_types, get_plugins, load_plugins
    from .report import MergeReport, get_merge_report


def __getattr__(name: str) -> object:
    module_name = _LAZY.get(name)
    if module_name is None:
        raise AttributeError(f"module 'peft_merge_ext' has no attribute {name!r}")
    from importlib import import_module

    value = getattr(import_module(f".{module_name}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


from ._activation import activate as _activate  # noqa: E402

_activate()
