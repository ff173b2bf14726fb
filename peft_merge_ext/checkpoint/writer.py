"""Writing a sharded safetensors checkpoint one tensor at a time, each byte written once, straight to its place.

`ShardedSafetensorsWriter` is told every tensor's name, shape and dtype up front (`TensorSpec`), so it plans the shards
and computes every shard's header at construction. `write` then accepts the planned tensors in any order and writes
each one's bytes at its final offset in its shard file (`os.pwrite`): the writer holds no tensor, needs no spool or
temporary file and never copies bytes it already wrote, whatever `max_shard_size` is. `finish` checks that every
planned tensor arrived and writes the index (`model-0000x-of-0000N.safetensors` + `model.safetensors.index.json`, or a
single `model.safetensors`), the layout transformers' `save_pretrained` produces and `from_pretrained` loads.

A failing disk (full, file too large, read-only) raises one `MergeInputError` naming the file. `BackgroundWriter`
(writing in a thread while the next tensors are computed) lives in `background_writer.py`, output folders
(`output_folder`, `atomic_directory`) in `output_folder.py`; both are re-exported here for current callers. Reading
tensors back one at a time is `checkpoint_reader`'s job.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import MergeInputError
from .output_folder import atomic_directory  # moved there; re-exported for current callers

if TYPE_CHECKING:
    import torch

__all__ = [
    "ShardedSafetensorsWriter",
    "TensorSpec",
    "atomic_directory",
    "copy_range",
    "parse_size",
    "plan_shards",
]

SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
# torch dtype name -> safetensors dtype code
DTYPE_CODES = {
    "float64": "F64",
    "float32": "F32",
    "float16": "F16",
    "bfloat16": "BF16",
    "float8_e4m3fn": "F8_E4M3",
    "float8_e5m2": "F8_E5M2",
    "int64": "I64",
    "int32": "I32",
    "int16": "I16",
    "int8": "I8",
    "uint64": "U64",
    "uint32": "U32",
    "uint16": "U16",
    "uint8": "U8",
    "bool": "BOOL",
}
_MAX_WRITE = 1 << 30  # bytes per system call (Linux writes at most about 2 GiB at once)


def parse_size(size: int | str) -> int:
    """Bytes from `"5GB"`, `"500MB"`, `"2GiB"` or an int (transformers' `max_shard_size` convention)."""
    if isinstance(size, int) and not isinstance(size, bool):
        if size <= 0:
            raise ValueError(f"max_shard_size must be positive, got {size}.")
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B)\s*", str(size).upper())
    if not match:
        raise ValueError(f"max_shard_size must look like '5GB', '500MB' or an int, got {size!r}.")
    return int(float(match.group(1)) * _UNITS[match.group(2)])


def dtype_code(dtype: torch.dtype) -> str:
    """The safetensors code of a torch dtype (`torch.bfloat16` -> `"BF16"`).

    Raises:
        `TypeError`: For a dtype safetensors cannot store (complex, quantized...).
    """
    code = DTYPE_CODES.get(str(dtype).removeprefix("torch."))
    if code is None:
        raise TypeError(f"Cannot write a tensor of dtype {dtype} to safetensors.")
    return code


@dataclass(frozen=True)
class TensorSpec:
    """A tensor of a checkpoint: its name, shape and dtype.

    Args:
        name (`str`): The state-dict key.
        shape (`tuple[int, ...]`): Its shape.
        dtype (`torch.dtype`): Its dtype.
    """

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", tuple(int(size) for size in self.shape))

    @property
    def nbytes(self) -> int:
        """Its size in bytes."""
        count = 1
        for size in self.shape:
            count *= size
        return count * self.dtype.itemsize


def plan_shards(specs: Sequence[TensorSpec], max_shard_size: int | str = "5GB") -> list[list[TensorSpec]]:
    """Group tensors into shards: consecutive in `specs` order, a new shard when the next tensor would overflow the
    current one; a tensor larger than the limit gets a shard of its own.

    Args:
        specs (`Sequence[TensorSpec]`): The tensors, in grouping order.
        max_shard_size (`int` or `str`, *optional*, defaults to `"5GB"`): Shard size limit.

    Returns:
        `list[list[TensorSpec]]`: The shards, each in `specs` order.
    """
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


@dataclass(frozen=True)
class _Slot:
    """Where a planned tensor goes: its spec, its shard and the absolute byte offset of its data in that file."""

    spec: TensorSpec
    shard: int
    offset: int


def _shard_header(shard: list[TensorSpec], metadata: dict[str, str]) -> tuple[bytes, list[TensorSpec]]:
    """The encoded header (length prefix included) of one shard and its tensors in data order.

    Larger elements come first (stable, so `specs` order otherwise): with the header padded to a multiple of 8 bytes,
    every tensor then starts at a multiple of its element size, as safetensors' own writer arranges it.
    """
    ordered = sorted(shard, key=lambda spec: -spec.dtype.itemsize)
    header: dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    for spec in ordered:
        header[spec.name] = {
            "dtype": dtype_code(spec.dtype),
            "shape": list(spec.shape),
            "data_offsets": [offset, offset + spec.nbytes],
        }
        offset += spec.nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    return struct.pack("<Q", len(encoded)) + encoded, ordered


class ShardedSafetensorsWriter:
    """Write planned tensors, in any order, straight to their final place in `model-0000x-of-0000N.safetensors`
    shards plus an index (or one `model.safetensors`).

    Memory: no tensor is kept (each one's bytes are written during `write`), and at most one shard file is open.

    Args:
        directory (`str` or `os.PathLike`): An existing folder for the shards (usually the temporary folder of
            `atomic_directory`).
        specs (`Sequence[TensorSpec]`): Every tensor that will be written, in shard-grouping order.
        max_shard_size (`int` or `str`, *optional*, defaults to `"5GB"`): Shard size limit; a single larger tensor
            gets a shard of its own.
        metadata (`dict[str, str]`, *optional*): safetensors metadata, `{"format": "pt"}` by default.

    Raises:
        `ValueError`: When `specs` is empty, names repeat or `max_shard_size` is invalid.
        `TypeError`: When a dtype cannot be stored in safetensors.
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        specs: Sequence[TensorSpec],
        max_shard_size: int | str = "5GB",
        metadata: dict[str, str] | None = None,
    ) -> None:
        specs = list(specs)
        if not specs:
            raise ValueError("No tensors to write: pass the TensorSpec of every tensor.")
        names = [spec.name for spec in specs]
        if len(set(names)) != len(names):
            repeated = next(name for name in names if names.count(name) > 1)
            raise ValueError(f"Tensor names must be unique; {repeated!r} is planned twice.")
        self.directory = Path(directory)
        self.metadata = {"format": "pt", **(metadata or {})}
        self.specs = specs
        self.total_size = sum(spec.nbytes for spec in specs)
        grouped = plan_shards(specs, max_shard_size)
        count = len(grouped)
        self.file_names = (
            [SAFE_WEIGHTS_NAME]
            if count == 1
            else [f"model-{number:05d}-of-{count:05d}.safetensors" for number in range(1, count + 1)]
        )
        self._headers: list[bytes] = []
        self.shards: list[list[TensorSpec]] = []
        self._slots: dict[str, _Slot] = {}
        for index, shard in enumerate(grouped):
            header, ordered = _shard_header(shard, self.metadata)
            self._headers.append(header)
            self.shards.append(ordered)
            offset = len(header)
            for spec in ordered:
                self._slots[spec.name] = _Slot(spec, index, offset)
                offset += spec.nbytes
        self._written: set[str] = set()
        self._created: set[int] = set()
        self._fd: int | None = None
        self._fd_shard = -1
        self._finished = False

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Write one planned tensor's bytes at its offset in its shard file (created on first use).

        Args:
            name (`str`): A planned tensor name not written yet.
            tensor (`torch.Tensor`): Its value, of the planned shape and dtype, on any device.

        Raises:
            `ValueError`: When `name` is not planned or already written, the shape or dtype differ from the plan, or
                the tensor has no data (meta device).
            `MergeInputError`: When the disk refuses the bytes (full, file too large, read-only).
        """
        self.check(name, tensor)
        slot = self._slots[name]
        with self._disk_errors(f"Writing {name!r} to", slot.shard):
            fd = self._shard_fd(slot.shard)
            if slot.spec.nbytes:
                import torch

                data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
                _write_at(fd, memoryview(data), slot.offset)
                del data
        self._written.add(name)

    def check(self, name: str, tensor: torch.Tensor) -> TensorSpec:
        """Raise the `ValueError` that `write(name, tensor)` would raise for a bad call; write nothing.

        Returns:
            `TensorSpec`: The planned spec of `name`.
        """
        spec = self.check_name(name)
        if tuple(tensor.shape) != spec.shape or tensor.dtype != spec.dtype:
            raise ValueError(
                f"Tensor {name!r} is {tuple(tensor.shape)} {tensor.dtype}, but the plan says {spec.shape} "
                f"{spec.dtype}."
            )
        if tensor.is_sparse or tensor.device.type == "meta":
            raise ValueError(f"Tensor {name!r} ({tensor.layout} on {tensor.device}) has no data to write.")
        return spec

    def check_name(self, name: str) -> TensorSpec:
        """The planned spec of `name`; `ValueError` when the writer is finished, `name` is not planned or is already
        written."""
        if self._finished:
            raise ValueError(f"This writer is finished; cannot write {name!r}.")
        slot = self._slots.get(name)
        if slot is None:
            raise ValueError(f"Tensor {name!r} is not in the writer's plan; plan every tensor up front.")
        if name in self._written:
            raise ValueError(f"Tensor {name!r} was already written.")
        return slot.spec

    def copy_from_file(self, name: str, source: str | os.PathLike, offset: int) -> None:
        """Write a planned tensor by copying its bytes from another file, e.g. the unchanged tensor of a base
        safetensors file (same dtype: safetensors stores every tensor as its contiguous little-endian bytes).

        The copy happens inside the kernel (`os.copy_file_range`) where the system allows it, so the bytes never enter
        the process' memory; otherwise it goes through one buffer of at most 16 MB.

        Args:
            name (`str`): A planned tensor name not written yet.
            source (`str` or `os.PathLike`): The file that holds its bytes.
            offset (`int`): Where its `spec.nbytes` bytes start in `source`.

        Raises:
            `ValueError`: When `name` is not planned or already written, or `source` is too short.
            `MergeInputError`: When reading `source` or writing the shard fails (disk full, file too large...).
        """
        spec = self.check_name(name)
        slot = self._slots[name]
        with self._disk_errors(f"Copying {name!r} from '{source}' to", slot.shard):
            fd = self._shard_fd(slot.shard)
            if spec.nbytes:
                with open(source, "rb") as handle:
                    if os.fstat(handle.fileno()).st_size < offset + spec.nbytes:
                        raise ValueError(
                            f"{source} is too short to hold the {spec.nbytes} bytes of {name!r} at {offset}."
                        )
                    copy_range(handle.fileno(), offset, fd, slot.offset, spec.nbytes)
        self._written.add(name)

    @contextlib.contextmanager
    def _disk_errors(self, action: str, shard: int | None) -> Iterator[None]:
        """Turn an `OSError` (disk full, file too large, read-only...) into one `MergeInputError` naming the file."""
        path = self.directory / (self.file_names[shard] if shard is not None else SAFE_WEIGHTS_INDEX_NAME)
        try:
            yield
        except OSError as error:
            raise disk_error(error, f"{action} '{path}'") from None

    def _shard_fd(self, shard: int) -> int:
        """The open file of `shard`: created with its header on first use; at most one shard file is open."""
        if self._fd_shard == shard and self._fd is not None:
            return self._fd
        self._close_fd()
        path = self.directory / self.file_names[shard]
        if shard in self._created:
            self._fd = os.open(path, os.O_WRONLY | getattr(os, "O_BINARY", 0))
        else:
            self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_BINARY", 0), 0o644)
            self._created.add(shard)
            _write_at(self._fd, memoryview(self._headers[shard]), 0)
        self._fd_shard = shard
        return self._fd

    def _close_fd(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd, self._fd_shard = None, -1

    @property
    def missing(self) -> list[str]:
        """Planned tensors not written yet, in plan order."""
        return [spec.name for spec in self.specs if spec.name not in self._written]

    def finish(self) -> list[str]:
        """Check that every planned tensor was written, close the files and write the index when there are several
        shards.

        Returns:
            `list[str]`: The file names written (shards, then the index), in order.

        Raises:
            `ValueError`: When a planned tensor was not written (the message names the first one).
        """
        if self._finished:
            raise ValueError("This writer is already finished.")
        missing = self.missing
        if missing:
            raise ValueError(
                f"{len(missing)} planned tensor(s) were not written, starting with {missing[0]!r}; write every "
                "planned tensor before finish()."
            )
        self._close_fd()
        self._finished = True
        if len(self.file_names) == 1:
            return list(self.file_names)
        weight_map = {
            spec.name: file_name
            for file_name, shard in zip(self.file_names, self.shards, strict=True)
            for spec in shard
        }
        index = {"metadata": {"total_size": self.total_size}, "weight_map": dict(sorted(weight_map.items()))}
        with self._disk_errors("Writing the index", None):
            (self.directory / SAFE_WEIGHTS_INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        return [*self.file_names, SAFE_WEIGHTS_INDEX_NAME]

    def close(self) -> None:
        """Close the open shard file; before a successful `finish` (an error path), also delete the incomplete shard
        files this writer created. Safe to call more than once."""
        self._close_fd()
        if not self._finished:
            for shard in sorted(self._created):
                (self.directory / self.file_names[shard]).unlink(missing_ok=True)
            self._created.clear()
            self._written.clear()

    def __enter__(self) -> ShardedSafetensorsWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


_DISK_HINTS = {
    errno.ENOSPC: "free disk space",
    errno.EDQUOT: "free space in your disk quota",
    errno.EFBIG: "raise the file size limit (ulimit -f) or pass a smaller max_shard_size",
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "the location is not writable by you",
    errno.EPERM: "the location is not writable (permissions or an immutable attribute)",
}


def disk_error(error: OSError, action: str) -> MergeInputError:
    """A one-line `MergeInputError` for an `OSError` met while `action` (e.g. `"Writing 'x' to '/out/f'"`), with the
    usual fix for the common causes (disk full, file too large, read-only)."""
    reason = error.strerror or str(error) or type(error).__name__
    hint = _DISK_HINTS.get(error.errno, "check the output location")
    return MergeInputError(f"{action} failed ({reason}): {hint}, or choose another output location.")


def copy_range(source_fd: int, source_offset: int, fd: int, offset: int, count: int) -> None:
    """Copy `count` bytes from `source_fd` at `source_offset` to `fd` at `offset`: in the kernel with
    `os.copy_file_range` when available, else (or when the system refuses it) through a buffer of at most 16 MB."""
    done = 0
    copy_file_range = getattr(os, "copy_file_range", None)
    if copy_file_range is not None:
        try:
            while done < count:
                step = copy_file_range(
                    source_fd, fd, min(count - done, _MAX_WRITE), source_offset + done, offset + done
                )
                if step <= 0:
                    break
                done += step
        except OSError:  # e.g. EXDEV, EINVAL or ENOSYS on some file systems: copy through memory instead
            pass
    while done < count:
        chunk = os.pread(source_fd, min(count - done, 1 << 24), source_offset + done)
        if not chunk:
            raise OSError(f"Unexpected end of file while copying {count} bytes from offset {source_offset}.")
        _write_at(fd, memoryview(chunk), offset + done)
        done += len(chunk)


def _write_at(fd: int, data: memoryview, offset: int) -> None:
    """Write all of `data` at `offset` of `fd` (several calls when the system writes less at once)."""
    data = data.cast("B")
    pwrite = getattr(os, "pwrite", None)
    written = 0
    while written < len(data):
        chunk = data[written : written + _MAX_WRITE]
        if pwrite is not None:
            step = pwrite(fd, chunk, offset + written)
        else:  # pragma: no cover (Windows has no pwrite)
            os.lseek(fd, offset + written, os.SEEK_SET)
            step = os.write(fd, chunk)
        if step <= 0:
            raise OSError(f"Could not write at offset {offset + written} (wrote {step} bytes).")
        written += step
