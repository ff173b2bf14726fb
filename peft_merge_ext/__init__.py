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
    "AdapterInfo",
    "CombinationError",
    "CombinationType",
    "DuplicateCombinationTypeError",
    "EvaluationInputError",
    "HubUploadError",
    "LoRAMerger",
    "LowRankDelta",
    "MergeInfo",
    "MergeInputError",
    "MergeReport",
    "ModuleContext",
    "PeftMergeExtError",
    "PluginError",
    "Recipe",
    "RecipeError",
    "ReservedCombinationTypeError",
    "SearchResult",
    "UnknownCombinationTypeError",
    "__version__",
    "build_model_card",
    "evaluate",
    "get_combination_types",
    "get_merge_report",
    "get_plugins",
    "hookimpl",
    "hookspec",
    "install",
    "is_installed",
    "load_plugins",
    "load_recipe",
    "merge_checkpoint",
    "plan_checkpoint_merge",
    "push_merged",
    "run_hook",
    "run_recipe",
    "save_merged",
    "search_weights",
    "uninstall",
    "upload_folder",
    "write_model_card",
]

_LAZY = {
    "hookimpl": "hookspecs",
    "hookspec": "hookspecs",
    "get_combination_types": "plugins",
    "get_plugins": "plugins",
    "load_plugins": "plugins",
    "run_hook": "plugins",
    "CombinationType": "plugins",
    "LowRankDelta": "contract",
    "ModuleContext": "contract",
    "MergeReport": "report",
    "get_merge_report": "report",
    "MergeInfo": "merge_info",
    "AdapterInfo": "merge_info",
    "install": "peft_patch",
    "uninstall": "peft_patch",
    "is_installed": "peft_patch",
    "save_merged": "merged_model",
    "push_merged": "merged_model",
    "build_model_card": "model_card",
    "write_model_card": "model_card",
    "upload_folder": "hub",
    "merge_checkpoint": "checkpoint_merge",
    "plan_checkpoint_merge": "checkpoint_merge",
    "Recipe": "recipe",
    "load_recipe": "recipe",
    "run_recipe": "recipe",
    "LoRAMerger": "lora_merger",
    "search_weights": "weight_search",
    "SearchResult": "weight_search",
    "evaluate": "evaluation",
    "PeftMergeExtError": "errors",
    "PluginError": "errors",
    "DuplicateCombinationTypeError": "errors",
    "ReservedCombinationTypeError": "errors",
    "UnknownCombinationTypeError": "errors",
    "MergeInputError": "errors",
    "AdapterCompatibilityError": "errors",
    "CombinationError": "errors",
    "HubUploadError": "errors",
    "EvaluationInputError": "errors",
    "RecipeError": "recipe",
}

if TYPE_CHECKING:  # pragma: no cover
    from .checkpoint_merge import merge_checkpoint, plan_checkpoint_merge
    from .contract import LowRankDelta, ModuleContext
    from .errors import (
        AdapterCompatibilityError,
        CombinationError,
        DuplicateCombinationTypeError,
        EvaluationInputError,
        HubUploadError,
        MergeInputError,
        PeftMergeExtError,
        PluginError,
        ReservedCombinationTypeError,
        UnknownCombinationTypeError,
    )
    from .evaluation import evaluate
    from .hookspecs import hookimpl, hookspec
    from .hub import upload_folder
    from .lora_merger import LoRAMerger
    from .merge_info import AdapterInfo, MergeInfo
    from .merged_model import push_merged, save_merged
    from .model_card import build_model_card, write_model_card
    from .peft_patch import install, is_installed, uninstall
    from .plugins import CombinationType, get_combination_types, get_plugins, load_plugins, run_hook
    from .recipe import Recipe, RecipeError, load_recipe, run_recipe
    from .report import MergeReport, get_merge_report
    from .weight_search import SearchResult, search_weights


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
