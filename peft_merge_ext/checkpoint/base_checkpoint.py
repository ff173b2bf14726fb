"""The on-disk weight source: a base checkpoint read one tensor at a time, merged where a delta applies.

Used by the out-of-core `merge_checkpoint` and by `save_merged` for a quantized in-memory base (whose full-precision
weights are read from its checkpoint instead). Tensors are listed from the safetensors headers in storage order (file
by file, each front to back), so the base is read sequentially; untouched tensors that keep their dtype are copied
file to file without passing through this process' memory. A tied weight the checkpoint stores once
(`lm_head.weight` -> `model.embed_tokens.weight`) is written on its own when a merge changes one side of the pair.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import MergeInputError
from .writer import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME, TensorSpec

__all__ = ["BaseCheckpoint", "BaseTensor", "CopyFromFile", "architecture_of"]


@dataclass
class BaseTensor:
    """One tensor of the base checkpoint.

    Args:
        name (`str`): The key it is written under.
        file (`Path`): The file holding its bytes.
        shape (`tuple[int, ...]`): Its shape.
        dtype (`torch.dtype`): Its stored dtype.
        source (`str`, *optional*): The stored key to read, for a tied weight written on its own.
        data_offset (`int`, *optional*): Where its bytes start in a safetensors `file`.
    """

    name: str
    file: Path
    shape: tuple[int, ...]
    dtype: Any
    source: str | None = None
    data_offset: int | None = None

    @property
    def stored_name(self) -> str:
        """The key its bytes are stored under."""
        return self.source or self.name

    @property
    def nbytes(self) -> int:
        """Its size in bytes."""
        return TensorSpec(self.name, self.shape, self.dtype).nbytes


@dataclass(frozen=True)
class CopyFromFile:
    """An instruction to the writer: copy `nbytes` stored bytes from `file` at `offset` as they are."""

    file: Path
    offset: int


class BaseCheckpoint:
    """A base model folder with safetensors weights (or, opted in, pickle weights loaded with `weights_only`).

    Args:
        folder (`Path`): The folder.
        allow_pickle (`bool`, *optional*, defaults to `False`): Accept `pytorch_model*.bin`.

    Raises:
        `MergeInputError`: No weights, pickle weights without `allow_pickle`, an index naming missing files or
            tensors, damaged safetensors headers.
    """

    def __init__(self, folder: Path, allow_pickle: bool = False) -> None:
        self.folder = folder
        self.tensors = _list_tensors(folder, allow_pickle)
        self.by_name = {tensor.name: tensor for tensor in self.tensors}
        self.untied: list[str] = []

    def untie(self, tied: Mapping[str, str], touched: set[str], edits: Mapping[str, Any] | None = None) -> None:
        """Write a tied weight stored once (`{target: source}`) on its own when a merge touches either side with a
        LoRA delta (`touched`), or gives the two sides different `edits` (`lowrank.tensor_edits`)."""
        from ..lowrank.tensor_edits import same_edits

        for target, source in tied.items():
            if target in self.by_name or source not in self.by_name:
                continue
            if target in touched or source in touched or not same_edits(edits or {}, [target, source]):
                original = self.by_name[source]
                alias = BaseTensor(target, original.file, original.shape, original.dtype, source, original.data_offset)
                self.tensors.insert(self.tensors.index(original) + 1, alias)
                self.by_name[target] = alias
                self.untied.extend([target, source])

    def read(self, tensor: BaseTensor) -> Any:
        """The tensor's values (a fresh CPU tensor)."""
        if tensor.file.suffix == ".bin":
            import torch

            state = torch.load(tensor.file, map_location="cpu", weights_only=True, mmap=True)
            value = state[tensor.stored_name].clone()
            del state
            return value
        from .reader import read_tensor

        return read_tensor(tensor.file, tensor.stored_name)

    def merged_items(
        self,
        delta_for: Callable[[str], Any],
        targets: Mapping[str, bool],
        out_dtype: Any,
        device: Any = None,
        edits: Mapping[str, Any] | None = None,
    ) -> Iterator[tuple[TensorSpec, Any]]:
        """`(spec, tensor or CopyFromFile)` for every tensor in storage order.

        Args:
            delta_for (`Callable[[str], LowRankDelta]`): Weight key -> its merged delta (called once per target, in
                storage order, just before the weight is needed).
            targets (`Mapping[str, bool]`): Weight key -> whether the weight is stored `in x out`.
            out_dtype (`torch.dtype`, *optional*): Output dtype of floating-point tensors.
            device (`torch.device`, *optional*): Where the merge is computed.
            edits (`Mapping[str, TensorEdit]`, *optional*): What the adapters add beyond `B @ A`, per tensor key.
        """
        from ..lowrank.tensor_edits import apply_edit

        edits = edits or {}
        for tensor, spec in zip(self.tensors, self.specs(out_dtype), strict=True):
            changed = tensor.name in targets or tensor.name in edits
            if not changed and tensor.data_offset is not None and spec.dtype == tensor.dtype:
                yield spec, CopyFromFile(tensor.file, tensor.data_offset)
                continue
            value = self.read(tensor)
            if changed:
                delta = delta_for(tensor.name) if tensor.name in targets else None
                on_device = value.to(device) if device is not None else value
                # In place only into a copy: writing into the read tensor itself (a private memory map of the file)
                # costs a copy-on-write page fault per page, several times slower than fresh memory.
                yield (
                    spec,
                    apply_edit(
                        on_device,
                        delta,
                        targets.get(tensor.name, False),
                        edits.get(tensor.name),
                        spec.dtype,
                        inplace=on_device.data_ptr() != value.data_ptr(),
                    ),
                )
            else:
                yield spec, value.to(spec.dtype)

    def specs(self, out_dtype: Any) -> list[TensorSpec]:
        """Name, shape and output dtype of every tensor, in storage order (from the headers alone)."""
        return [
            TensorSpec(t.name, t.shape, out_dtype if out_dtype is not None and t.dtype.is_floating_point else t.dtype)
            for t in self.tensors
        ]


def _list_tensors(folder: Path, allow_pickle: bool) -> list[BaseTensor]:
    from .reader import data_offsets, read_tensor_specs

    index = folder / SAFE_WEIGHTS_INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise TypeError
        except (ValueError, KeyError, TypeError):
            raise MergeInputError(
                f"{SAFE_WEIGHTS_INDEX_NAME} in {folder.name!r} is not a valid index (a JSON object with a "
                "'weight_map' of tensor name -> file name); save the checkpoint again."
            ) from None
        files = sorted(set(weight_map.values()))  # shard 1, 2, ... each read front to back
        for name in files:
            if Path(name).name != name or name in ("", ".", ".."):
                raise MergeInputError(
                    f"{SAFE_WEIGHTS_INDEX_NAME} in {folder.name!r} names {name[:80]!r}, which is not a file in that "
                    "folder; an index may only name shard files next to it."
                )
    elif (folder / SAFE_WEIGHTS_NAME).is_file():
        weight_map, files = None, [SAFE_WEIGHTS_NAME]
    else:
        pickles = sorted(folder.glob("pytorch_model*.bin"))
        if not pickles:
            raise MergeInputError(f"The base folder {folder.name!r} has no model.safetensors (nor a sharded index).")
        if not allow_pickle:
            raise MergeInputError(
                f"The base folder {folder.name!r} only has pickle weights ({pickles[0].name}), which can run code "
                "when loaded. Convert them to safetensors, or opt in with allow_pickle=True (CLI: --allow-pickle) to "
                "load them with torch.load(weights_only=True)."
            )
        return _pickle_tensors(pickles)
    tensors = []
    for name in files:
        path = folder / name
        if not path.is_file():
            raise MergeInputError(f"The base checkpoint's index names {name}, which is missing from {folder.name!r}.")
        offsets = data_offsets(path)
        tensors.extend(
            BaseTensor(spec.name, path, spec.shape, spec.dtype, data_offset=offsets.get(spec.name))
            for spec in read_tensor_specs(path)
            if weight_map is None or weight_map.get(spec.name) == name
        )
    if weight_map is not None:
        listed = {t.name for t in tensors}
        unlisted = [key for key in weight_map if key not in listed]
        if unlisted:
            raise MergeInputError(
                f"The base checkpoint {folder.name!r} lists {unlisted[:3]} in its index but its files do not hold "
                "them; the checkpoint is incomplete."
            )
    return tensors


def _pickle_tensors(paths: list[Path]) -> list[BaseTensor]:
    import pickle

    import torch

    tensors = []
    for path in paths:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except (pickle.UnpicklingError, RuntimeError, ValueError, EOFError) as error:
            raise MergeInputError(
                f"{path.name} could not be loaded safely ({type(error).__name__}: "
                f"{' '.join(str(error).split())[:200]}); weights_only loading refuses anything but plain tensors. "
                "Convert the checkpoint to safetensors."
            ) from None
        tensors.extend(
            BaseTensor(key, path, tuple(value.shape), value.dtype)
            for key, value in state.items()
            if isinstance(value, torch.Tensor)
        )
        del state
    return tensors


def architecture_of(config: Mapping[str, Any]) -> tuple[dict[str, str], dict[str, str]] | None:
    """Module name -> class name, and the tied weights `{target: source}`, of the base architecture, built on the meta
    device (no memory); `None` if the architecture cannot be built here."""
    architectures = config.get("architectures") or []
    if not architectures:
        return None
    try:
        import torch
        import transformers

        model_class = getattr(transformers, architectures[0])
        model_config = transformers.AutoConfig.for_model(**config)
        with warnings.catch_warnings(), torch.device("meta"):
            warnings.simplefilter("ignore")
            model = model_class(model_config)
    except Exception:
        return None
    classes = {name: type(module).__name__ for name, module in model.named_modules()}
    tied = dict(getattr(model, "all_tied_weights_keys", None) or {})
    return classes, tied
