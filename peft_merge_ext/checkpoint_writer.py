"""Streaming, sharded safetensors output written into an atomic output folder.

`ShardedSafetensorsWriter` streams: each tensor's bytes go to disk as soon as it is added (into a spool file beside
the shard), so the writer holds no tensor in memory whatever `max_shard_size` is; a shard file (safetensors header,
then the spooled bytes, copied by the kernel) is finished as soon as the next tensor would overflow it.
`atomic_directory` builds a folder under a temporary name next to its destination and renames it into place only when
the block finishes without error.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import struct
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = ["ShardedSafetensorsWriter", "atomic_directory", "parse_size"]

SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


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


class ShardedSafetensorsWriter:
    """Write tensors one by one into `model-0000x-of-0000N.safetensors` shards plus an index (or one file).

    Memory stays bounded by one tensor: `add` writes the tensor's bytes to a spool file at once and keeps only its
    header entry (name, dtype, shape, offsets).

    Args:
        directory (`str` or `os.PathLike`): Where the shards go (usually the temporary folder of
            `atomic_directory`).
        max_shard_size (`int` or `str`, *optional*, defaults to `"5GB"`): Shard size limit; a single larger tensor
            gets a shard of its own.
        metadata (`dict[str, str]`, *optional*): safetensors metadata, `{"format": "pt"}` by default.
    """

    def __init__(
        self, directory: str | os.PathLike, max_shard_size: int | str = "5GB", metadata: dict[str, str] | None = None
    ) -> None:
        self.directory = Path(directory)
        self.max_shard_size = parse_size(max_shard_size)
        self.metadata = {"format": "pt", **(metadata or {})}
        self._entries: dict[str, dict[str, Any]] = {}
        self._pending_bytes = 0
        self._spool: Any = None
        self._shards: list[tuple[str, list[str]]] = []
        self._names: set[str] = set()
        self.total_size = 0
        self._finished = False

    def add(self, name: str, tensor: Any) -> None:
        """Write one tensor's bytes to disk now; first finishes the current shard if this tensor would overflow it."""
        if self._finished:
            raise RuntimeError("This writer is finished.")
        if name in self._names:
            raise ValueError(f"Tensor {name!r} was added twice.")
        dtype = _safetensors_dtype(tensor)
        size = tensor.numel() * tensor.element_size()
        if self._entries and self._pending_bytes + size > self.max_shard_size:
            self._flush()
        if self._spool is None:
            self._spool = open(self.directory / f".shard-{len(self._shards) + 1:05d}.spool", "wb")  # noqa: SIM115
        data = tensor.detach().to("cpu").contiguous()
        self._spool.write(data.reshape(-1).view(_uint8()).numpy().data)
        self._names.add(name)
        self._entries[name] = {
            "dtype": dtype,
            "shape": list(tensor.shape),
            "data_offsets": [self._pending_bytes, self._pending_bytes + size],
        }
        self._pending_bytes += size
        self.total_size += size

    def _flush(self) -> None:
        if not self._entries:
            return
        spool_path = Path(self._spool.name)
        self._spool.close()
        self._spool = None
        header = json.dumps({"__metadata__": self.metadata, **self._entries}, separators=(",", ":")).encode()
        header += b" " * (-len(header) % 8)
        temporary_name = f"shard-{len(self._shards) + 1:05d}.safetensors"
        with open(self.directory / temporary_name, "wb") as shard, open(spool_path, "rb") as spool:
            shard.write(struct.pack("<Q", len(header)))
            shard.write(header)
            shard.flush()
            _copy_file(spool, shard, self._pending_bytes)
        spool_path.unlink()
        self._shards.append((temporary_name, list(self._entries)))
        self._entries, self._pending_bytes = {}, 0

    def finish(self) -> list[str]:
        """Write the last shard, give the shards their final names and write the index when there are several.

        Returns:
            `list[str]`: The file names written, in order.
        """
        self._flush()
        self._finished = True
        if not self._shards:
            raise ValueError("No tensors were written.")
        if len(self._shards) == 1:
            os.replace(self.directory / self._shards[0][0], self.directory / SAFE_WEIGHTS_NAME)
            return [SAFE_WEIGHTS_NAME]
        count = len(self._shards)
        weight_map: dict[str, str] = {}
        files = []
        for number, (temporary_name, names) in enumerate(self._shards, start=1):
            final_name = f"model-{number:05d}-of-{count:05d}.safetensors"
            os.replace(self.directory / temporary_name, self.directory / final_name)
            files.append(final_name)
            weight_map.update(dict.fromkeys(names, final_name))
        index = {"metadata": {"total_size": self.total_size}, "weight_map": dict(sorted(weight_map.items()))}
        (self.directory / SAFE_WEIGHTS_INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        return [*files, SAFE_WEIGHTS_INDEX_NAME]

    def close(self) -> None:
        """Drop an unfinished spool file (after an error); the folder itself is cleaned by `atomic_directory`."""
        if self._spool is not None:
            self._spool.close()
            Path(self._spool.name).unlink(missing_ok=True)
            self._spool = None


def _uint8() -> Any:
    import torch

    return torch.uint8


def _safetensors_dtype(tensor: Any) -> str:
    import torch

    names = {
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
    code = names.get(str(tensor.dtype).removeprefix("torch."))
    if code is None or not isinstance(tensor, torch.Tensor):
        raise TypeError(f"Cannot write a tensor of dtype {tensor.dtype} to safetensors.")
    if tensor.is_sparse or tensor.device.type == "meta":
        raise ValueError(f"Cannot write a {tensor.layout} tensor on device {tensor.device} (no data) to safetensors.")
    return code


def _copy_file(source: Any, target: Any, length: int) -> None:
    """Append `length` bytes of `source` to `target` without holding them in memory (kernel copy when possible)."""
    copied = 0
    copy_file_range = getattr(os, "copy_file_range", None)
    if copy_file_range is not None:
        with contextlib.suppress(OSError):
            while copied < length:
                step = copy_file_range(source.fileno(), target.fileno(), length - copied)
                if step == 0:
                    break
                copied += step
    if copied < length:
        source.seek(copied)
        target.seek(0, os.SEEK_END)
        shutil.copyfileobj(source, target, 16 * 2**20)


@contextlib.contextmanager
def atomic_directory(destination: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside `destination` and rename it to `destination` when the block succeeds.

    On error the temporary folder is removed and `destination` is left as it was. With `overwrite=True` an existing
    `destination` is replaced (moved aside first, deleted only after the new folder is in place).

    Raises:
        `FileExistsError`: When `destination` exists, is not empty and `overwrite` is `False`.
    """
    destination = Path(destination).absolute()
    if destination.exists() and any(destination.iterdir()) and not overwrite:
        raise FileExistsError(
            f"Output folder {destination} already exists and is not empty; choose another folder or pass "
            "overwrite=True."
        )
    destination.parent.mkdir(parents=True, exist_ok=True)
    temporary = Path(tempfile.mkdtemp(prefix=f".{destination.name}.tmp-", dir=destination.parent))
    try:
        yield temporary
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    old = None
    if destination.exists():
        old = destination.with_name(f".{destination.name}.old-{os.getpid()}")
        os.replace(destination, old)
    os.replace(temporary, destination)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
