"""Constant-memory safetensors I/O for checkpoints larger than memory.

`StreamingSafetensorsWriter` is told every tensor's name, shape and dtype up front, so it can write each shard's
header first and then append each tensor's bytes the moment it is computed: it holds no tensor, whatever the shard
size (`checkpoint_writer.ShardedSafetensorsWriter` keeps a shard's worth in memory, fine for the in-memory path but
not for out-of-core merges). Shard grouping, file names and the index follow `ShardedSafetensorsWriter` exactly.

`read_tensor` opens a file, copies one tensor out and closes it again, so the pages of the memory map do not pile up
in the process' resident memory as they do when one `safe_open` handle reads a whole multi-GB file.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .checkpoint_writer import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME, parse_size

__all__ = ["StreamingSafetensorsWriter", "TensorSpec", "plan_shards", "read_tensor", "read_tensor_specs"]

_DTYPE_NAMES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
for _name, _code in (("float8_e4m3fn", "F8_E4M3"), ("float8_e5m2", "F8_E5M2"), ("uint16", "U16"), ("uint32", "U32")):
    if hasattr(torch, _name):
        _DTYPE_NAMES[getattr(torch, _name)] = _code
_DTYPES = {code: dtype for dtype, code in _DTYPE_NAMES.items()}


@dataclass(frozen=True)
class TensorSpec:
    """A tensor to write: its name, shape and dtype."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        """Its size in bytes."""
        count = 1
        for size in self.shape:
            count *= size
        return count * torch.empty((), dtype=self.dtype).element_size()


def read_tensor_specs(path: str | Path) -> list[TensorSpec]:
    """The name, shape and dtype of every tensor of a safetensors file, from its header only, in file order."""
    from safetensors import safe_open

    specs = []
    with safe_open(str(path), framework="pt") as handle:
        for name in handle.keys():  # noqa: SIM118 (a safe_open handle is not a dict)
            tensor_slice = handle.get_slice(name)
            specs.append(TensorSpec(name, tuple(tensor_slice.get_shape()), _DTYPES[tensor_slice.get_dtype()]))
    return specs


def read_tensor(path: str | Path, name: str) -> torch.Tensor:
    """Copy one tensor out of a safetensors file (opened and closed for just this tensor)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return handle.get_tensor(name)


def plan_shards(specs: Sequence[TensorSpec], max_shard_size: int | str = "5GB") -> list[list[TensorSpec]]:
    """Group tensors into shards in order, starting a new shard when the next tensor would overflow the current one
    (the rule of `ShardedSafetensorsWriter`); a tensor larger than the limit gets a shard of its own."""
    limit = parse_size(max_shard_size)
    shards: list[list[TensorSpec]] = []
    current: list[TensorSpec] = []
    current_bytes = 0
    for spec in specs:
        if current and current_bytes + spec.nbytes > limit:
            shards.append(current)
            current, current_bytes = [], 0
        current.append(spec)
        current_bytes += spec.nbytes
    if current:
        shards.append(current)
    return shards


def _file_order(shard: list[TensorSpec]) -> list[TensorSpec]:
    # Larger elements first keeps every tensor's offset aligned to its element size.
    return sorted(shard, key=lambda spec: (-torch.empty((), dtype=spec.dtype).element_size(), spec.name))


class StreamingSafetensorsWriter:
    """Write planned tensors straight to their shard files, one at a time, holding none of them.

    Args:
        directory (`str` or `os.PathLike`): Where the shards go (usually the temporary folder of
            `checkpoint_writer.atomic_directory`).
        specs (`Sequence[TensorSpec]`): Every tensor that will be written, in shard-grouping order.
        max_shard_size (`int` or `str`, *optional*, defaults to `"5GB"`): Shard size limit.
        metadata (`dict[str, str]`, *optional*): safetensors metadata, `{"format": "pt"}` by default.

    Tensors must then be given to `write` in the order of `order` (shard by shard, larger dtypes first, then by name).
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        specs: Sequence[TensorSpec],
        max_shard_size: int | str = "5GB",
        metadata: dict[str, str] | None = None,
    ) -> None:
        if not specs:
            raise ValueError("No tensors to write.")
        names = [spec.name for spec in specs]
        if len(set(names)) != len(names):
            raise ValueError("Tensor names must be unique.")
        self.directory = Path(directory)
        self.metadata = {"format": "pt", **(metadata or {})}
        self.shards = [_file_order(shard) for shard in plan_shards(specs, max_shard_size)]
        count = len(self.shards)
        self.file_names = (
            [SAFE_WEIGHTS_NAME]
            if count == 1
            else [f"model-{number:05d}-of-{count:05d}.safetensors" for number in range(1, count + 1)]
        )
        self.order = [spec for shard in self.shards for spec in shard]
        self.total_size = sum(spec.nbytes for spec in self.order)
        self._position = 0
        self._shard_index = -1
        self._shard_position = 0
        self._handle: Any = None

    def _open_next_shard(self) -> None:
        if self._handle is not None:
            self._handle.close()
        self._shard_index += 1
        self._shard_position = 0
        shard = self.shards[self._shard_index]
        header: dict[str, Any] = {"__metadata__": self.metadata}
        offset = 0
        for spec in shard:
            header[spec.name] = {
                "dtype": _DTYPE_NAMES[spec.dtype],
                "shape": list(spec.shape),
                "data_offsets": [offset, offset + spec.nbytes],
            }
            offset += spec.nbytes
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)
        self._handle = open(self.directory / self.file_names[self._shard_index], "wb")  # noqa: SIM115
        self._handle.write(struct.pack("<Q", len(encoded)))
        self._handle.write(encoded)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Append the next planned tensor to its shard file.

        Raises:
            `ValueError`: When `name`, shape or dtype differ from the plan.
        """
        if self._position >= len(self.order):
            raise ValueError(f"All planned tensors were written; {name!r} is one too many.")
        spec = self.order[self._position]
        if name != spec.name or tuple(tensor.shape) != spec.shape or tensor.dtype != spec.dtype:
            raise ValueError(
                f"Expected tensor {spec.name!r} {spec.shape} {spec.dtype}, got {name!r} {tuple(tensor.shape)} "
                f"{tensor.dtype}."
            )
        if self._shard_position == 0:
            self._open_next_shard()
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
        self._handle.write(memoryview(data.numpy()))
        self._position += 1
        self._shard_position += 1
        if self._shard_position == len(self.shards[self._shard_index]):
            self._handle.close()
            self._handle = None
            self._shard_position = 0

    def close(self) -> None:
        """Close the open shard file, if any (after an error)."""
        if self._handle is not None:
            self._handle.close()
            self._handle = None

    def finish(self) -> list[str]:
        """Check every planned tensor was written and write the index when there are several shards.

        Returns:
            `list[str]`: The file names written, in order.
        """
        self.close()
        if self._position != len(self.order):
            missing = [spec.name for spec in self.order[self._position :]]
            raise ValueError(f"{len(missing)} planned tensor(s) were not written, starting with {missing[0]!r}.")
        if len(self.file_names) == 1:
            return list(self.file_names)
        weight_map = {
            spec.name: file for file, shard in zip(self.file_names, self.shards, strict=True) for spec in shard
        }
        index = {"metadata": {"total_size": self.total_size}, "weight_map": dict(sorted(weight_map.items()))}
        (self.directory / SAFE_WEIGHTS_INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        return [*self.file_names, SAFE_WEIGHTS_INDEX_NAME]
