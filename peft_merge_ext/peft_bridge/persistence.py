"""Lineage records that survive `save_pretrained` / `from_pretrained`.

PEFT saves an adapter as `adapter_config.json` + `adapter_model.safetensors`; the lineage of a combined adapter is
saved beside them as `peft_merge_ext_lineage.json`, a file PEFT ignores. `PeftModel.save_pretrained` is wrapped to
write it for each saved adapter that has one, and `PeftModel.load_adapter` (which `PeftModel.from_pretrained` calls)
to read it back, and to remember the Hub id an adapter was loaded from. PEFT's own behaviour and arguments are
untouched; a failure to read or write the record only warns.
"""

from __future__ import annotations

import functools
import os
import warnings
from pathlib import Path
from typing import Any

__all__ = ["unwrap_peft_model", "wrap_peft_model"]

_MARKER = "__peft_merge_ext_persistence__"


def _save_lineages(model: Any, save_directory: Any, selected: Any) -> None:
    from ..checkpoint.adapter_output import write_lineage
    from .records import get_lineage

    names = list(selected) if selected else list(model.peft_config)
    for name in names:
        config = model.peft_config.get(name)
        lineage = get_lineage(config) if config is not None else None
        if lineage is None:
            continue
        folder = Path(save_directory) if name == "default" else Path(save_directory) / name
        if folder.is_dir():
            write_lineage(folder, lineage)


def _load_lineage(model: Any, model_id: Any, adapter_name: str, kwargs: dict[str, Any]) -> None:
    from ..checkpoint.folder_source import read_lineage
    from ..checkpoint.side_files import hub_id_of
    from ..engine.merge_info import LINEAGE_FILE
    from .records import set_hub_id, set_lineage

    config = model.peft_config.get(adapter_name)
    if config is None:
        return
    subfolder = kwargs.get("subfolder") or ""
    local = Path(os.fspath(model_id)) / subfolder
    if local.is_dir():
        folder = local
    else:
        hub_id = hub_id_of(model_id)
        if hub_id is None:
            return
        set_hub_id(config, hub_id)
        try:
            from huggingface_hub import hf_hub_download

            path = hf_hub_download(
                hub_id,
                LINEAGE_FILE,
                subfolder=subfolder or None,
                revision=kwargs.get("revision"),
                token=kwargs.get("token"),
            )
        except Exception:  # most adapters have no lineage record
            return
        folder = Path(path).parent
    lineage = read_lineage(folder)
    if lineage is not None:
        set_lineage(config, lineage)


def _wrap_save(original: Any) -> Any:
    @functools.wraps(original)
    def save_pretrained(self: Any, save_directory: Any, *args: Any, **kwargs: Any) -> Any:
        result = original(self, save_directory, *args, **kwargs)
        try:
            _save_lineages(self, save_directory, kwargs.get("selected_adapters"))
        except Exception as error:
            warnings.warn(f"peft-merge-ext could not save the adapters' lineage records: {error}", stacklevel=2)
        return result

    setattr(save_pretrained, _MARKER, True)
    return save_pretrained


def _wrap_load(original: Any) -> Any:
    @functools.wraps(original)
    def load_adapter(self: Any, model_id: Any, adapter_name: str = "default", *args: Any, **kwargs: Any) -> Any:
        result = original(self, model_id, adapter_name, *args, **kwargs)
        try:
            _load_lineage(self, model_id, adapter_name, kwargs)
        except Exception as error:
            warnings.warn(
                f"peft-merge-ext could not read the lineage record of {adapter_name!r}: {error}", stacklevel=2
            )
        return result

    setattr(load_adapter, _MARKER, True)
    return load_adapter


def wrap_peft_model(cls: type) -> None:
    """Wrap `cls.save_pretrained` and `cls.load_adapter` (PEFT's `PeftModel`), idempotently."""
    for name, wrap in (("save_pretrained", _wrap_save), ("load_adapter", _wrap_load)):
        current = cls.__dict__.get(name)
        if current is not None and not getattr(current, _MARKER, False):
            setattr(cls, name, wrap(current))


def unwrap_peft_model(cls: type) -> None:
    """Undo `wrap_peft_model` (idempotent)."""
    for name in ("save_pretrained", "load_adapter"):
        current = cls.__dict__.get(name)
        if current is not None and getattr(current, _MARKER, False):
            setattr(cls, name, current.__wrapped__)
