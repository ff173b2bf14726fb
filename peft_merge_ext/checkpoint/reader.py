"""Reading safetensors files one tensor at a time, for checkpoints larger than memory, with every header checked.

`read_header` reads and validates a file's header before any tensor data is touched: the length prefix is bounded by
`MAX_HEADER_BYTES` and by the file size (a hostile length of `2**63` allocates nothing), the header must be UTF-8 JSON
holding an object, every entry needs a dtype torch can load, a shape of non-negative ints and `data_offsets` that
match the shape and tile the data section exactly (no overlaps, no holes, nothing past the end), as the safetensors
library itself requires. Any problem raises one `MergeInputError` naming the file, what is wrong and what to do.

`read_tensor_specs` lists a file's tensors (name, shape, dtype) from that header, in the order their bytes are
stored, so reading them in that order reads the file front to back. `read_tensor` opens the file, copies one tensor's
bytes out with positioned reads and closes it again: nothing is memory-mapped, so pages do not pile up in the
process' resident memory as they do when one `safe_open` handle reads a whole multi-GB file. `data_offsets` gives the
absolute offset of every tensor's bytes, for byte-for-byte copies into another safetensors file.

Checked headers are cached under the file size and a digest of the header bytes, so the per-tensor `read_tensor`
calls of a merge read each header's bytes again but parse and check them once; a rewritten file is checked again.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import stat
import struct
import sys
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..checkpoint.writer import DTYPE_CODES, TensorSpec
from ..errors import MergeInputError

if TYPE_CHECKING:
    import torch

__all__ = [
    "MAX_HEADER_BYTES",
    "SafetensorsHeader",
    "TensorEntry",
    "data_offsets",
    "read_header",
    "read_tensor",
    "read_tensor_specs",
]

MAX_HEADER_BYTES = 100_000_000  # the safetensors library's own limit on the JSON header
_DAMAGED = "the file is truncated or damaged: download or save it again"
# Every dtype code of the safetensors format, to tell a dtype torch cannot load from a damaged header.
_SAFETENSORS_CODES = frozenset(
    [
        "BOOL",
        "F4",
        "F6_E2M3",
        "F6_E3M2",
        "U8",
        "I8",
        "F8_E5M2",
        "F8_E4M3",
        "F8_E8M0",
        "I16",
        "U16",
        "F16",
        "BF16",
        "I32",
        "U32",
        "F32",
        "C64",
        "F64",
        "I64",
        "U64",
    ]
)
_MAX_DIM = 2**63 - 1  # torch sizes are int64
_MAX_READ = 1 << 30  # bytes per read call (Linux reads at most about 2 GiB at once)
_CACHE_SIZE = 16
_cache: OrderedDict[tuple[Any, ...], SafetensorsHeader] = OrderedDict()
_cache_lock = threading.Lock()


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a safetensors header, checked against the file.

    Args:
        name (`str`): The tensor's key.
        dtype (`torch.dtype`): Its dtype.
        shape (`tuple[int, ...]`): Its shape (`()` for a scalar).
        offset (`int`): The absolute byte offset of its data in the file.
        nbytes (`int`): The byte length of its data (`numel * element size`).
    """

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int
    nbytes: int


@dataclass
class SafetensorsHeader:
    """The checked header of a safetensors file.

    Args:
        tensors (`dict[str, TensorEntry]`): Name -> entry, in the order the tensors' bytes are stored in the file.
        metadata (`dict[str, str]`): The `__metadata__` of the header (empty when absent).
    """

    tensors: dict[str, TensorEntry] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)


def _short(value: Any, limit: int = 80) -> str:
    """`repr(value)` on one line and cut to `limit` characters, for names and values quoted from a hostile file."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _invalid(path: Path, problem: str, fix: str = _DAMAGED) -> MergeInputError:
    return MergeInputError(f"{path.name} is not a valid safetensors file ({problem}); {fix}.")


def _torch_dtypes() -> dict[str, torch.dtype]:
    import torch

    return {code: getattr(torch, name) for name, code in DTYPE_CODES.items() if hasattr(torch, name)}


def _is_int(value: Any) -> bool:
    return type(value) is int  # JSON true/false parse to bool, a subclass of int


class _DuplicateKeyError(Exception):
    """A JSON object of the header names a key twice (`json` would silently keep the last one)."""


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = dict(pairs)
    if len(result) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise _DuplicateKeyError(key)
            seen.add(key)
    return result


def _open(path: Path) -> int:
    """A read-only descriptor of a regular file (opened without blocking, so a FIFO cannot hang the caller)."""
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)
    try:
        fd = os.open(path, flags)
    except OSError as error:
        raise MergeInputError(
            f"{path.name} cannot be opened ({error.strerror or error}); check that the file exists and is readable."
        ) from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        kind = "a folder" if stat.S_ISDIR(mode) else "not a regular file"
        raise MergeInputError(f"{path.name} is {kind}, not a safetensors file; pass the .safetensors file itself.")
    return fd


def _pread_exact(fd: int, buffer: memoryview, offset: int) -> int:
    """Fill `buffer` with the bytes of `fd` from `offset` on; the number of bytes read (less than asked only when the
    file ends first)."""
    done = 0
    while done < len(buffer):
        part = buffer[done : done + _MAX_READ]
        if hasattr(os, "preadv"):
            count = os.preadv(fd, [part], offset + done)
        else:  # pragma: no cover - Windows
            os.lseek(fd, offset + done, os.SEEK_SET)
            data = os.read(fd, len(part))
            count = len(data)
            part[:count] = data
        if count == 0:
            break
        done += count
    return done


def _raw_header(path: Path, fd: int) -> tuple[bytearray, int]:
    """The header bytes of the open file `fd` and its size, after checking the length prefix against both."""
    file_size = os.fstat(fd).st_size
    if file_size < 8:
        raise _invalid(path, f"it is {file_size} bytes long, shorter than the 8-byte header length")
    prefix = bytearray(8)
    if _pread_exact(fd, memoryview(prefix), 0) != 8:
        raise _invalid(path, "the header length could not be read")
    (length,) = struct.unpack("<Q", prefix)
    if length > file_size - 8:
        raise _invalid(path, f"header length {length} exceeds the file size {file_size}")
    if length > MAX_HEADER_BYTES:
        raise _invalid(path, f"header length {length} exceeds the limit of {MAX_HEADER_BYTES} bytes")
    raw = bytearray(length)
    if _pread_exact(fd, memoryview(raw), 8) != length:
        raise _invalid(path, "the file ended while its header was read")
    return raw, file_size


def _parse_header(path: Path, raw: bytearray, file_size: int) -> SafetensorsHeader:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise _invalid(path, f"the header is not valid UTF-8: byte {error.start} is {raw[error.start]:#04x}") from None
    try:
        header = json.loads(text, object_pairs_hook=_reject_duplicates)
    except _DuplicateKeyError as duplicate:
        raise _invalid(path, f"the header names {_short(duplicate.args[0])} twice") from None
    except ValueError as error:  # json.JSONDecodeError, and ints too long to convert
        raise _invalid(path, f"the header is not valid JSON: {str(error).splitlines()[0]}") from None
    except RecursionError:
        raise _invalid(path, "the header is not valid JSON: it is nested too deeply") from None
    del text
    if not isinstance(header, dict):
        raise _invalid(path, f"the header is a JSON {type(header).__name__}, not an object")
    return _check_entries(path, header, data_size=file_size - 8 - len(raw), data_start=8 + len(raw))


def _check_entries(path: Path, header: dict[str, Any], data_size: int, data_start: int) -> SafetensorsHeader:
    metadata = header.pop("__metadata__", None)
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict) or not all(isinstance(value, str) for value in metadata.values()):
        raise _invalid(path, "its __metadata__ is not a mapping of strings to strings")
    dtypes = _torch_dtypes()
    entries: list[tuple[str, torch.dtype, tuple[int, ...], int, int]] = []
    for name, entry in header.items():
        tensor = f"tensor {_short(name)}"
        if not isinstance(entry, dict):
            raise _invalid(path, f"{tensor} is described by a JSON {type(entry).__name__}, not an object")
        missing = [key for key in ("dtype", "shape", "data_offsets") if key not in entry]
        if missing:
            raise _invalid(path, f"{tensor} has no {missing[0]!r}")
        code, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if not isinstance(code, str) or code not in _SAFETENSORS_CODES:
            raise _invalid(path, f"{tensor} has the unknown dtype {_short(code)}")
        if code not in dtypes:
            raise MergeInputError(
                f"{path.name}: {tensor} has the dtype {code}, which this torch version cannot load (supported: "
                f"{', '.join(sorted(dtypes))}); convert the file to a supported dtype or upgrade torch."
            )
        if not isinstance(shape, list) or not all(_is_int(size) and 0 <= size <= _MAX_DIM for size in shape):
            raise _invalid(path, f"{tensor} has the shape {_short(shape)}, not a list of non-negative integers")
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(_is_int(value) and value >= 0 for value in offsets)
            or offsets[0] > offsets[1]
        ):
            raise _invalid(
                path, f"{tensor} has the data_offsets {_short(offsets)}, not [begin, end] with begin <= end"
            )
        begin, end = offsets
        if end > data_size:
            raise _invalid(
                path, f"{tensor} ends at byte {end} of the data, past its end (the file holds {data_size} data bytes)"
            )
        dtype = dtypes[code]
        nbytes = math.prod(shape) * dtype.itemsize
        if end - begin != nbytes:
            raise _invalid(
                path,
                f"{tensor} of shape {tuple(shape)} and dtype {code} needs {nbytes} bytes but its data_offsets "
                f"[{begin}, {end}] hold {end - begin}",
            )
        entries.append((name, dtype, tuple(shape), begin, end))
    entries.sort(key=lambda item: (item[3], item[4]))  # storage order (stable: header order for empty tensors)
    position, previous = 0, None
    for name, _, _, begin, end in entries:
        if begin != position:
            if previous is None:
                problem = f"the first tensor, {_short(name)}, starts at byte {begin} of the data instead of 0"
            else:
                what = "overlaps it" if begin < position else "leaves a gap of unused bytes"
                problem = (
                    f"tensor {_short(name)} starts at byte {begin} of the data but the tensor before it, "
                    f"{_short(previous)}, ends at byte {position}: it {what}"
                )
            raise _invalid(path, problem)
        position, previous = end, name
    if position != data_size:
        raise _invalid(path, f"its tensors hold {position} bytes but the file has {data_size} bytes of data")
    return SafetensorsHeader(
        tensors={
            name: TensorEntry(name, dtype, shape, data_start + begin, end - begin)
            for name, dtype, shape, begin, end in entries
        },
        metadata=dict(metadata),
    )


def _checked_header(path: Path, fd: int) -> SafetensorsHeader:
    """The checked header of the open file `fd`. What the checks find depends only on the header's bytes and the file
    size, so the result is cached under those (a digest of the bytes): reading the bytes again costs far less than
    parsing them, and a file rewritten since is never judged by its old header."""
    raw, file_size = _raw_header(path, fd)
    key = (file_size, hashlib.blake2b(raw, digest_size=20).digest())
    with _cache_lock:
        header = _cache.get(key)
        if header is not None:
            _cache.move_to_end(key)
            return header
    header = _parse_header(path, raw, file_size)
    with _cache_lock:
        _cache[key] = header
        while len(_cache) > _CACHE_SIZE:
            _cache.popitem(last=False)
    return header


def read_header(path: str | Path) -> SafetensorsHeader:
    """Read and check the header of a safetensors file, without reading any tensor data.

    Args:
        path (`str` or `Path`): A `.safetensors` file.

    Returns:
        `SafetensorsHeader`: Every tensor (name, dtype, shape, absolute offset and byte length) in storage order, and
        the file's metadata.

    Raises:
        `MergeInputError`: When the file cannot be opened, is not a regular file, or is not a valid safetensors file
            (too short, a header length past the file or over `MAX_HEADER_BYTES`, a header that is not UTF-8 JSON
            holding an object, an unknown dtype or one torch cannot load, a bad shape, data offsets that do not match
            the shape or overlap, leave gaps or run past the end). The message names the file and says what to do.
    """
    path = Path(path)
    fd = _open(path)
    try:
        header = _checked_header(path, fd)
    finally:
        os.close(fd)
    return SafetensorsHeader(dict(header.tensors), dict(header.metadata))


def data_offsets(path: str | Path) -> dict[str, int]:
    """Name -> absolute byte offset of each tensor's data in a safetensors file, from its checked header.

    Args:
        path (`str` or `Path`): A `.safetensors` file.

    Returns:
        `dict[str, int]`: The offsets, in storage order.

    Raises:
        `MergeInputError`: When the file is not a valid safetensors file (see `read_header`).
    """
    return {name: entry.offset for name, entry in read_header(path).tensors.items()}


def read_tensor_specs(path: str | Path) -> list[TensorSpec]:
    """The name, shape and dtype of every tensor of a safetensors file, from its header only, in storage order.

    Args:
        path (`str` or `Path`): A `.safetensors` file.

    Returns:
        `list[TensorSpec]`: One per tensor, ordered by where its bytes are in the file.

    Raises:
        `MergeInputError`: When the file is not a valid safetensors file or holds a dtype torch cannot load (see
            `read_header`).
    """
    return [TensorSpec(entry.name, entry.shape, entry.dtype) for entry in read_header(path).tensors.values()]


def read_tensor(path: str | Path, name: str) -> torch.Tensor:
    """Copy one tensor out of a safetensors file (opened and closed for just this tensor, only its bytes read).

    Args:
        path (`str` or `Path`): A `.safetensors` file.
        name (`str`): The tensor's name.

    Returns:
        `torch.Tensor`: The tensor, on the CPU.

    Raises:
        `MergeInputError`: When the file is not a valid safetensors file (see `read_header`), does not hold `name`,
            or was cut short since its header was read.
    """
    import torch

    path = Path(path)
    fd = _open(path)
    try:
        entry = _checked_header(path, fd).tensors.get(name)
        if entry is None:
            raise MergeInputError(f"{path.name} holds no tensor named {_short(name)}; check the tensor name.")
        if entry.nbytes == 0:
            return torch.empty(entry.shape, dtype=entry.dtype)
        buffer = bytearray(entry.nbytes)
        if _pread_exact(fd, memoryview(buffer), entry.offset) != entry.nbytes:
            raise _invalid(path, f"the file ended inside tensor {_short(name)}")
    finally:
        os.close(fd)
    if sys.byteorder != "little" and entry.dtype.itemsize > 1:  # pragma: no cover - safetensors data is little-endian
        swapped = torch.frombuffer(buffer, dtype=torch.uint8).view(-1, entry.dtype.itemsize).flip(-1).contiguous()
        return swapped.view(entry.dtype).reshape(entry.shape)
    return torch.frombuffer(buffer, dtype=entry.dtype).reshape(entry.shape)
