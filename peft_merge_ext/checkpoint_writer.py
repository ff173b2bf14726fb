"""Streaming, sharded safetensors output written into an atomic output folder.

`ShardedSafetensorsWriter` keeps at most one shard's worth of tensors in memory: tensors are added one at a time and
a shard file is written as soon as the next tensor would overflow it. `atomic_directory` builds a folder under a
temporary name next to its destination and renames it into place only when the block finishes without error.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
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
        self._pending: dict[str, Any] = {}
        self._pending_bytes = 0
        self._shards: list[tuple[str, list[str]]] = []
        self._names: set[str] = set()
        self.total_size = 0
        self._finished = False

    def add(self, name: str, tensor: Any) -> None:
        """Queue one tensor; flushes the current shard first when this tensor would overflow it."""
        if self._finished:
            raise RuntimeError("This writer is finished.")
        if name in self._names:
            raise ValueError(f"Tensor {name!r} was added twice.")
        size = tensor.numel() * tensor.element_size()
        if self._pending and self._pending_bytes + size > self.max_shard_size:
            self._flush()
        self._names.add(name)
        self._pending[name] = tensor.detach().contiguous()
        self._pending_bytes += size
        self.total_size += size

    def _flush(self) -> None:
        from safetensors.torch import save_file

        if not self._pending:
            return
        temporary_name = f"shard-{len(self._shards) + 1:05d}.safetensors"
        save_file(self._pending, str(self.directory / temporary_name), metadata=self.metadata)
        self._shards.append((temporary_name, list(self._pending)))
        self._pending, self._pending_bytes = {}, 0

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
