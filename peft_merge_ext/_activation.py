"""Automatic activation: install the PEFT patch as soon as peft's LoRA model module is imported, and add
`save_merged` / `push_merged` as soon as `peft.peft_model` or `transformers.modeling_utils` is.

This module runs at interpreter start-up (through the `.pth` file the wheel ships), so it imports nothing but `os`
and `sys`: no torch, no peft, no pluggy. Set `PEFT_MERGE_EXT_DISABLE=1` to turn automatic activation off; an
explicit `peft_merge_ext.install()` still works.
"""

from __future__ import annotations

import os
import sys

TARGET_MODULE = "peft.tuners.lora.model"
# Modules after whose import the patch (re)runs: it patches whatever of them is loaded by then.
TARGET_MODULES = (TARGET_MODULE, "peft.peft_model", "transformers.modeling_utils")
DISABLE_ENV = "PEFT_MERGE_EXT_DISABLE"
_TRUE = {"1", "true", "yes", "on"}


def is_disabled() -> bool:
    """Whether `PEFT_MERGE_EXT_DISABLE` turns automatic activation off."""
    return os.environ.get(DISABLE_ENV, "").strip().lower() in _TRUE


def _install_quietly() -> None:
    try:
        from .peft_bridge.patch import install_loaded

        install_loaded()
    except Exception as error:  # a broken patch must never break `import peft`
        import warnings

        warnings.warn(
            f"peft-merge-ext could not patch PEFT ({type(error).__name__}: {error}); PEFT works as usual without its "
            f"combination types. Set {DISABLE_ENV}=1 to silence this.",
            RuntimeWarning,
            stacklevel=2,
        )


class _InstallAfterExec:
    """Wraps the real loader of the target module; runs the install right after the module has executed."""

    def __init__(self, loader: object) -> None:
        self._loader = loader

    def create_module(self, spec: object) -> object:
        return self._loader.create_module(spec)  # type: ignore[attr-defined]

    def exec_module(self, module: object) -> None:
        module.__loader__ = self._loader  # type: ignore[attr-defined]
        module.__spec__.loader = self._loader  # type: ignore[attr-defined]
        self._loader.exec_module(module)  # type: ignore[attr-defined]
        _install_quietly()

    def __getattr__(self, name: str) -> object:
        return getattr(self._loader, name)


class PeftImportWatcher:
    """A `sys.meta_path` finder that only reacts to the `TARGET_MODULES` and defers to the other finders."""

    def find_spec(self, fullname: str, path: object = None, target: object = None) -> object:
        if fullname not in TARGET_MODULES:
            return None
        for finder in sys.meta_path:
            if finder is self or isinstance(finder, PeftImportWatcher):
                continue
            find_spec = getattr(finder, "find_spec", None)
            spec = find_spec(fullname, path, target) if find_spec is not None else None
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _InstallAfterExec(spec.loader)
                return spec
        return None


def register_watcher() -> None:
    """Patch what is loaded now and watch for the import of the rest of the `TARGET_MODULES` (idempotent)."""
    if any(name in sys.modules for name in TARGET_MODULES):
        _install_quietly()
    if all(name in sys.modules for name in TARGET_MODULES):
        return
    if not any(isinstance(finder, PeftImportWatcher) for finder in sys.meta_path):
        sys.meta_path.insert(0, PeftImportWatcher())


def activate() -> None:
    """Automatic activation, unless `PEFT_MERGE_EXT_DISABLE` is set. Used by the `.pth` / `.start` files."""
    if not is_disabled():
        register_watcher()
