"""Hatchling build hook: ship the start-up files that activate peft-merge-ext, in regular and editable wheels."""

from __future__ import annotations

from typing import Any

from hatchling.builders.hooks.plugin.interface import BuildHookInterface

STARTUP_FILES = {
    "peft_merge_ext/_startup/peft_merge_ext_autoload.pth": "peft_merge_ext_autoload.pth",
    "peft_merge_ext/_startup/peft_merge_ext_autoload.start": "peft_merge_ext_autoload.start",
}


class CustomBuildHook(BuildHookInterface):
    """Put the `.pth` (and PEP 829 `.start`) file at the root of site-packages."""

    def initialize(self, version: str, build_data: dict[str, Any]) -> None:
        key = "force_include_editable" if version == "editable" else "force_include"
        build_data.setdefault(key, {}).update(STARTUP_FILES)
