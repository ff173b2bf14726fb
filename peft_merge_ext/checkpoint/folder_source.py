"""The on-disk factor source: LoRA adapters read from their folders (`adapter_files`), one module at a time."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..engine.combine import FactorModule
from ..engine.merge_info import LINEAGE_FILE, AdapterInfo, Lineage
from ..engine.request import short_repr
from ..errors import MergeInputError
from .adapter_files import AdapterFiles, read_adapter
from .side_files import hub_id_of

__all__ = ["FolderFactorSource", "read_lineage"]

MAX_LINEAGE_BYTES = 16_000_000


def read_lineage(folder: Path) -> Lineage | None:
    """The lineage record saved in an adapter folder, `None` when there is none.

    Raises:
        `MergeInputError`: For a record that is too large, not JSON, or of an unknown format.
    """
    path = folder / LINEAGE_FILE
    if not path.is_file():
        return None
    if path.stat().st_size > MAX_LINEAGE_BYTES:
        raise MergeInputError(f"{LINEAGE_FILE} in {folder.name!r} is over {MAX_LINEAGE_BYTES} bytes; it is not ours.")
    try:
        data = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError):
        raise MergeInputError(f"{LINEAGE_FILE} in {folder.name!r} is not valid JSON; delete or restore it.") from None
    return Lineage.from_dict(data)


class FolderFactorSource:
    """Adapters on disk, named by their folder names (made unique). The same folder given twice (also through a
    symbolic link, a trailing `/` or `..`) is refused, and so are factors holding NaN or Inf, before anything is
    computed.

    Args:
        paths (`Sequence[str | Path]`): Adapter folders, or Hub ids already in the Hugging Face cache.
        allow_pickle (`bool`, *optional*, defaults to `False`): Accept `adapter_model.bin`.
        device (`torch.device`): Where factors are read to and combined.

    Raises:
        `MergeInputError`: For an unreadable or invalid adapter, a folder given twice, or non-finite factors.
    """

    def __init__(self, paths: Sequence[str | Path], *, allow_pickle: bool = False, device: Any = None) -> None:
        import torch

        from ..lowrank.factor_math import compute_dtype_for

        if isinstance(paths, (str, Path)) or not paths:
            raise MergeInputError(f"adapters must be a non-empty list of adapter folders, got {short_repr(paths)}.")
        self.device = device if device is not None else torch.device("cpu")
        compute_dtype = compute_dtype_for(self.device)
        from ..peft_bridge.loading import adapter_names

        self.adapters: list[AdapterFiles] = []
        seen: dict[Path, str] = {}
        for path, name in zip(paths, adapter_names(paths), strict=True):
            adapter = read_adapter(
                path, name=name, allow_pickle=allow_pickle, compute_dtype=compute_dtype, device=self.device
            )
            folder = adapter.folder.resolve()
            if folder in seen:
                raise MergeInputError(
                    f"The adapter folder {short_repr(str(path))} is given twice (it is the same folder as "
                    f"{short_repr(seen[folder])}); give each adapter once, with its weight."
                )
            seen[folder] = str(path)
            adapter.check_finite()
            self.adapters.append(adapter)
        self.lineages = {adapter.name: read_lineage(adapter.folder) for adapter in self.adapters}

    @property
    def names(self) -> list[str]:
        """The adapters' names, in order."""
        return [adapter.name for adapter in self.adapters]

    @property
    def configs(self) -> dict[str, Any]:
        """Adapter name -> its parsed config."""
        return {adapter.name: adapter.config for adapter in self.adapters}

    def module_names(self) -> list[str]:
        """Every module any adapter targets, in first-seen order."""
        return list(dict.fromkeys(name for adapter in self.adapters for name in adapter.modules))

    def module(self, name: str, transpose: bool = False) -> FactorModule:
        """The `FactorModule` of module `name` (present in at least one adapter)."""
        entries = {adapter.name: adapter.modules[name] for adapter in self.adapters if name in adapter.modules}
        present = next(iter(entries.values()))

        def read(adapter: str) -> Any:
            entry = entries.get(adapter)
            return entry.load_delta() if entry is not None else None

        return FactorModule(
            name=name,
            kind=present.kind,
            shape=present.shape,
            read=read,
            device=self.device,
            storage_dtype=present.storage_dtype,
            transpose=transpose,
            kernel=present.kernel_shape,
        )

    def describe(self, adapter: AdapterFiles, weight: float) -> AdapterInfo:
        """The card's description of an adapter: config, file digest, Hub id and lineage when known."""
        hub_id = hub_id_of(adapter.source)
        modules = adapter.config.target_modules
        return AdapterInfo(
            name=adapter.name,
            source=hub_id or Path(adapter.source.rstrip("/")).name,
            weight=float(weight),
            rank=adapter.max_rank,
            alpha=float(adapter.config.lora_alpha),
            target_modules=sorted(modules) if isinstance(modules, (set, list, tuple)) else [str(modules)],
            use_rslora=bool(adapter.config.use_rslora),
            sha256=adapter.sha256,
            sha256_of="adapter_model.safetensors",
            hub_id=hub_id,
            lineage=self.lineages.get(adapter.name),
        )
