"""Damaged and hostile safetensors files: every reader raises one `MergeInputError` naming the file, at once, before
reading any tensor data; valid files written by `safetensors.torch.save_file` read exactly as safetensors reads
them."""

from __future__ import annotations

import json
import os
import struct
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from peft_merge_ext.checkpoint.adapter_files import read_adapter
from peft_merge_ext.checkpoint.reader import (
    MAX_HEADER_BYTES,
    data_offsets,
    read_header,
    read_tensor,
    read_tensor_specs,
)
from peft_merge_ext.errors import MergeInputError

FILE_NAME = "weights.safetensors"
MODULE = "base_model.model.layers.0.self_attn.q_proj"


def _as_bytes(tensor: torch.Tensor) -> bytes:
    return tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _write(path: Path, header: dict | bytes, data: bytes = b"", length: int | None = None) -> Path:
    """A file made of an 8-byte little-endian length (the header's own unless `length` is given), `header`
    (JSON-encoded unless it is bytes already) and `data`."""
    encoded = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(encoded) if length is None else length) + encoded + data)
    return path


def _entry(dtype: str, shape: list, begin: int, end: int) -> dict:
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


# name -> writes the damaged file at the given path
DAMAGED: dict[str, Callable[[Path], object]] = {
    "empty file": lambda path: path.write_bytes(b""),
    "shorter than 8 bytes": lambda path: path.write_bytes(b"\x10\x00\x00"),
    "header length 2**63": lambda path: _write(path, {"w": _entry("F32", [1], 0, 4)}, b"\0" * 4, length=2**63),
    "header length past the file": lambda path: _write(path, {"w": _entry("F32", [1], 0, 4)}, b"\0" * 4, length=500),
    "header length over the limit": lambda path: _write(path, b"{}", length=MAX_HEADER_BYTES + 1),
    "offsets past the end": lambda path: _write(path, {"w": _entry("F32", [2], 0, 8)}, b"\0" * 4),
    "offsets inconsistent with the shape": lambda path: _write(path, {"w": _entry("F32", [3], 0, 8)}, b"\0" * 8),
    "overlapping offsets": lambda path: _write(
        path, {"a": _entry("F32", [2], 0, 8), "b": _entry("F32", [2], 4, 12)}, b"\0" * 12
    ),
    "a gap between tensors": lambda path: _write(
        path, {"a": _entry("F32", [1], 0, 4), "b": _entry("F32", [1], 8, 12)}, b"\0" * 12
    ),
    "bytes after the last tensor": lambda path: _write(path, {"w": _entry("F32", [1], 0, 4)}, b"\0" * 8),
    "begin after end": lambda path: _write(path, {"w": _entry("F32", [0], 4, 0)}, b"\0" * 4),
    "unknown dtype": lambda path: _write(path, {"w": _entry("Q7", [1], 0, 1)}, b"\0"),
    "dtype torch cannot load": lambda path: _write(path, {"w": _entry("C64", [1], 0, 8)}, b"\0" * 8),
    "negative shape": lambda path: _write(path, {"w": _entry("F32", [-1], 0, 0)}),
    "boolean shape": lambda path: _write(path, {"w": _entry("U8", [True], 0, 1)}, b"\0"),
    "shape not a list": lambda path: _write(path, {"w": _entry("U8", "1", 0, 1)}, b"\0"),
    "missing data_offsets": lambda path: _write(path, {"w": {"dtype": "U8", "shape": [1]}}, b"\0"),
    "entry not an object": lambda path: _write(path, {"w": [1, 2]}),
    "non-object JSON": lambda path: _write(path, b"[1, 2, 3]"),
    "invalid JSON": lambda path: _write(path, b'{"w": '),
    "deeply nested JSON": lambda path: _write(path, b"[" * 200_000 + b"]" * 200_000),
    "invalid UTF-8": lambda path: _write(path, b'{"w\xff\xfe": 1}'),
    "duplicate tensor name": lambda path: _write(
        path,
        b'{"w": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}, "w": {"dtype": "U8", "shape": [1], '
        b'"data_offsets": [1, 2]}}',
        b"\0\0",
    ),
    "metadata not strings": lambda path: _write(
        path, {"__metadata__": {"format": 1}, "w": _entry("U8", [1], 0, 1)}, b"\0"
    ),
}


def _assert_one_clear_error(path: Path, call: Callable[[], object]) -> str:
    start = time.perf_counter()
    with pytest.raises(MergeInputError) as raised:
        call()
    assert time.perf_counter() - start < 0.5
    message = str(raised.value)
    assert path.name in message
    assert str(path.parent) not in message  # the file name, not the full path
    assert "\n" not in message
    return message


@pytest.fixture
def valid_tensors() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {
        "layer.weight": torch.randn(5, 3),
        "layer.bias": torch.randn(5, dtype=torch.float64),
        "half": torch.randn(2, 2).bfloat16(),
        "f16": torch.randn(4).half(),
        "scalar": torch.tensor(1.5),
        "empty": torch.empty(0, 4),
        "empty.int": torch.empty(0, dtype=torch.int8),
        "ids": torch.arange(7),
        "small.ints": torch.arange(-3, 3, dtype=torch.int16),
        "mask": torch.tensor([True, False, True]),
        "bytes": torch.arange(6, dtype=torch.uint8).reshape(2, 3),
        "fp8": torch.randn(5).to(torch.float8_e4m3fn),
    }


def test_valid_file_reads_as_safetensors_reads_it(tmp_path, valid_tensors):
    path = tmp_path / FILE_NAME
    save_file(valid_tensors, str(path), metadata={"format": "pt", "note": "héllo"})
    header = read_header(path)
    with safe_open(str(path), framework="pt") as handle:
        assert list(header.tensors) == list(handle.offset_keys())  # storage order
        assert header.metadata == handle.metadata() == {"format": "pt", "note": "héllo"}
    assert [(spec.name, spec.shape, spec.dtype) for spec in read_tensor_specs(path)] == [
        (name, entry.shape, entry.dtype) for name, entry in header.tensors.items()
    ]
    expected = load_file(str(path))
    raw = path.read_bytes()
    assert data_offsets(path) == {name: entry.offset for name, entry in header.tensors.items()}
    for name, entry in header.tensors.items():
        assert (entry.name, entry.shape, entry.dtype) == (
            name,
            tuple(valid_tensors[name].shape),
            valid_tensors[name].dtype,
        )
        assert entry.nbytes == valid_tensors[name].numel() * valid_tensors[name].element_size()
        assert raw[entry.offset : entry.offset + entry.nbytes] == _as_bytes(expected[name])
        tensor = read_tensor(path, name)
        assert (tensor.shape, tensor.dtype) == (expected[name].shape, expected[name].dtype)
        assert _as_bytes(tensor) == _as_bytes(expected[name])
    tensor = read_tensor(path, "layer.weight")
    tensor += 1  # an ordinary writable tensor that owns its memory
    assert torch.equal(read_tensor(path, "layer.weight"), valid_tensors["layer.weight"])


def test_file_without_metadata_or_tensors(tmp_path):
    save_file({}, str(tmp_path / "none.safetensors"))
    assert read_header(tmp_path / "none.safetensors").tensors == {}
    save_file({"w": torch.ones(2)}, str(tmp_path / "plain.safetensors"))
    header = read_header(tmp_path / "plain.safetensors")
    assert header.metadata == {}
    assert list(header.tensors) == ["w"]
    header.tensors.clear()  # a copy: the cached header is untouched
    assert list(read_header(tmp_path / "plain.safetensors").tensors) == ["w"]


@pytest.mark.parametrize("damage", list(DAMAGED))
def test_damaged_file_raises_one_clear_error(tmp_path, damage):
    path = tmp_path / FILE_NAME
    DAMAGED[damage](path)
    message = _assert_one_clear_error(path, lambda: read_header(path))
    if damage != "dtype torch cannot load":
        assert "is not a valid safetensors file" in message
        assert "download or save it again" in message
    for reader in (read_tensor_specs, data_offsets, lambda file: read_tensor(file, "w")):
        assert _assert_one_clear_error(path, lambda reader=reader: reader(path)) == message


def test_messages_say_what_is_wrong(tmp_path):
    path = tmp_path / FILE_NAME
    DAMAGED["header length 2**63"](path)
    message = _assert_one_clear_error(path, lambda: read_header(path))
    assert f"header length {2**63} exceeds the file size {path.stat().st_size}" in message
    DAMAGED["offsets inconsistent with the shape"](path)
    assert "needs 12 bytes" in _assert_one_clear_error(path, lambda: read_header(path))
    DAMAGED["overlapping offsets"](path)
    assert "overlaps" in _assert_one_clear_error(path, lambda: read_header(path))
    DAMAGED["unknown dtype"](path)
    assert "unknown dtype 'Q7'" in _assert_one_clear_error(path, lambda: read_header(path))


def test_header_over_the_limit_is_refused_without_reading_it(tmp_path):
    """A file really larger than the limit (sparse): the declared length fits in the file, the limit refuses it."""
    path = tmp_path / FILE_NAME
    with open(path, "wb") as handle:
        handle.write(struct.pack("<Q", MAX_HEADER_BYTES + 1) + b"{")
        handle.truncate(MAX_HEADER_BYTES + 1024)
    message = _assert_one_clear_error(path, lambda: read_header(path))
    assert f"exceeds the limit of {MAX_HEADER_BYTES} bytes" in message


def test_hostile_names_are_quoted_short_on_one_line(tmp_path):
    path = _write(tmp_path / FILE_NAME, {"evil\nname" + "x" * 10_000: _entry("Q7", [1], 0, 1)}, b"\0")
    message = _assert_one_clear_error(path, lambda: read_header(path))
    assert len(message) < 400


def test_file_changed_after_its_header_was_read(tmp_path):
    path = tmp_path / FILE_NAME
    save_file({"a": torch.ones(4), "b": torch.zeros(4)}, str(path))
    assert torch.equal(read_tensor(path, "b"), torch.zeros(4))
    with open(path, "r+b") as handle:  # cut the last tensor off: checked again, not read from the old header
        handle.truncate(path.stat().st_size - 8)
    _assert_one_clear_error(path, lambda: read_tensor(path, "a"))


def test_unknown_tensor_name_and_files_that_are_not_files(tmp_path):
    path = tmp_path / FILE_NAME
    save_file({"w": torch.ones(1)}, str(path))
    assert "no tensor named 'nope'" in _assert_one_clear_error(path, lambda: read_tensor(path, "nope"))
    missing = tmp_path / "missing.safetensors"
    _assert_one_clear_error(missing, lambda: read_header(missing))
    folder = tmp_path / "folder.safetensors"
    folder.mkdir()
    _assert_one_clear_error(folder, lambda: read_header(folder))


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs named pipes")
def test_named_pipe_does_not_hang(tmp_path):
    pipe = tmp_path / "pipe.safetensors"
    os.mkfifo(pipe)
    _assert_one_clear_error(pipe, lambda: read_header(pipe))


def _adapter_folder(folder: Path) -> Path:
    """A minimal LoRA adapter folder (r=2 on one module), as PEFT's save_pretrained lays it out."""
    folder.mkdir()
    config = {
        "peft_type": "LORA",
        "r": 2,
        "lora_alpha": 4,
        "target_modules": ["q_proj"],
        "base_model_name_or_path": "x",
    }
    (folder / "adapter_config.json").write_text(json.dumps(config))
    torch.manual_seed(0)
    save_file(
        {f"{MODULE}.lora_A.weight": torch.randn(2, 6), f"{MODULE}.lora_B.weight": torch.randn(5, 2)},
        str(folder / "adapter_model.safetensors"),
    )
    return folder


def test_valid_adapter_folder_reads(tmp_path):
    folder = _adapter_folder(tmp_path / "adapter")
    adapter = read_adapter(folder)
    module = adapter.modules["layers.0.self_attn.q_proj"]
    assert (module.shape, module.rank) == ((5, 6), 2)
    weights = load_file(str(folder / "adapter_model.safetensors"))
    delta = module.load_delta(torch.float32)
    assert torch.equal(delta.B, weights[f"{MODULE}.lora_B.weight"] * 2.0)
    assert torch.equal(delta.A, weights[f"{MODULE}.lora_A.weight"])


@pytest.mark.parametrize("damage", list(DAMAGED))
def test_damaged_adapter_weights_raise_one_clear_error(tmp_path, damage):
    folder = _adapter_folder(tmp_path / "adapter")
    path = folder / "adapter_model.safetensors"
    DAMAGED[damage](path)
    _assert_one_clear_error(path, lambda: read_adapter(folder))


def test_adapter_weights_damaged_inside_a_factor(tmp_path):
    """Shape and offsets disagree for one factor only, with the rest of the file intact."""
    folder = _adapter_folder(tmp_path / "adapter")
    path = folder / "adapter_model.safetensors"
    header = read_header(path)
    a, b = (header.tensors[f"{MODULE}.lora_{part}.weight"] for part in "AB")
    length = struct.unpack("<Q", path.read_bytes()[:8])[0]
    data = path.read_bytes()[8 + length :]
    begin_a, begin_b = a.offset - 8 - length, b.offset - 8 - length
    damaged = {
        a.name: _entry("F32", [3, 6], begin_a, begin_a + a.nbytes),
        b.name: _entry("F32", [5, 2], begin_b, begin_b + b.nbytes),
    }
    _write(path, damaged, data)
    message = _assert_one_clear_error(path, lambda: read_adapter(folder))
    assert "lora_A" in message
