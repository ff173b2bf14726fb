"""peft-merge-ext: exact, memory-bounded LoRA adapter merging for PEFT.

Importing this package is cheap: torch, peft, transformers and pluggy are imported only when a feature is used.
Importing it activates the PEFT patch: at once if peft's LoRA model module is already imported, otherwise as soon as
it is.
"""

from __future__ import annotations

from ._version import __version__

TYPE_CHECKING = False

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
    "hookimpl": "plugins.hookspecs",
    "hookspec": "plugins.hookspecs",
    "get_combination_types": "plugins.registry",
    "get_plugins": "plugins.registry",
    "load_plugins": "plugins.registry",
    "run_hook": "plugins.registry",
    "CombinationType": "plugins.registry",
    "LowRankDelta": "plugins.contract",
    "ModuleContext": "plugins.contract",
    "MergeReport": "engine.report",
    "get_merge_report": "peft_bridge.records",
    "MergeInfo": "engine.merge_info",
    "AdapterInfo": "engine.merge_info",
    "install": "peft_bridge.patch",
    "uninstall": "peft_bridge.patch",
    "is_installed": "peft_bridge.patch",
    "save_merged": "publish.save",
    "push_merged": "publish.push",
    "build_model_card": "publish.card",
    "write_model_card": "publish.card",
    "upload_folder": "publish.hub",
    "merge_checkpoint": "publish.merge_checkpoint",
    "plan_checkpoint_merge": "publish.merge_checkpoint",
    "Recipe": "recipe",
    "load_recipe": "recipe",
    "run_recipe": "cli.recipe_runner",
    "LoRAMerger": "lora_merger",
    "search_weights": "search.weight_search",
    "SearchResult": "search.weight_search",
    "evaluate": "search.evaluation",
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
    from .cli.recipe_runner import run_recipe
    from .engine.merge_info import AdapterInfo, MergeInfo
    from .engine.report import MergeReport
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
    from .lora_merger import LoRAMerger
    from .peft_bridge.patch import install, is_installed, uninstall
    from .peft_bridge.records import get_merge_report
    from .plugins.contract import LowRankDelta, ModuleContext
    from .plugins.hookspecs import hookimpl, hookspec
    from .plugins.registry import CombinationType, get_combination_types, get_plugins, load_plugins, run_hook
    from .publish.card import build_model_card, write_model_card
    from .publish.hub import upload_folder
    from .publish.merge_checkpoint import merge_checkpoint, plan_checkpoint_merge
    from .publish.push import push_merged
    from .publish.save import save_merged
    from .recipe import Recipe, RecipeError, load_recipe
    from .search.evaluation import evaluate
    from .search.weight_search import SearchResult, search_weights


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
