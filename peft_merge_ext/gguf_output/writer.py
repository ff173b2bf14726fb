"""Writing one GGUF file tensor by tensor, through the `gguf` package (the llama.cpp project's own writer).

GGUF puts every tensor's name, shape, type and offset in the header, before any data; the merge plan knows them all
up front (`model.plan_gguf_model`), so the header is written first and each tensor's data is appended as the merge
produces it, in planned order. Each tensor is converted to the bytes llama.cpp's converter writes (float types
rounded to nearest even; other types through float32 and `gguf.quants.quantize`), in blocks of rows on two threads
with at most two blocks in flight, so the writer holds at most one tensor plus a few small blocks, whatever the model
size; a tensor stored unchanged whose bytes already are the GGUF bytes is copied file to file by the kernel.
`GGUFFileWriter` has the interface of
`checkpoint.writer.ShardedSafetensorsWriter` (`check`, `write`, `copy_from_file`, `finish`, `close`), so the merge
pipeline's `publish.output.stream_weights` drives either.
"""

from __future__ import annotations

import collections
import concurrent.futures
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ..checkpoint.writer import TensorSpec, copy_range, disk_error

__all__ = ["GGUFFileWriter", "TensorPlan"]

_CHUNK_ELEMENTS = 1 << 16  # values converted at once per thread (256 KB of float32)
_WORKERS = 2  # conversion threads


class TensorPlan:
    """One planned GGUF tensor: `name` (GGUF), `shape` (PyTorch order), `qtype`, and `prepare`, the function that
    turns the pipeline's tensor into the one stored (the rotary reordering of query/key projections)."""

    def __init__(self, name: str, shape: Sequence[int], qtype: int, prepare: Callable[[Any], Any] | None = None):
        self.name = name
        self.shape = tuple(int(size) for size in shape)
        self.qtype = qtype
        self.prepare = prepare

    @property
    def nbytes(self) -> int:
        """Its stored size in bytes."""
        import gguf

        block, size = gguf.GGML_QUANT_SIZES[self.qtype]
        count = 1
        for dim in self.shape:
            count *= dim
        return count // block * size


class GGUFFileWriter:
    """Write a GGUF file: metadata and tensor infos first, then each planned tensor's data in order.

    Args:
        path (`Path`): The file to write (inside the output folder's temporary directory).
        arch (`str`): The GGUF architecture (`llama`, `qwen2`).
        metadata (`Callable[[gguf.GGUFWriter], None]`): Adds the key/value metadata.
        specs (`Sequence[TensorSpec]`): The pipeline's tensors (Hugging Face names), in the order they arrive.
        plans (`dict[str, TensorPlan | None]`): For each spec name, its GGUF tensor (`None`: not stored).
        computed (`Sequence[tuple[TensorPlan, torch.Tensor]]`, *optional*): Tensors computed from the config
            (`rope_freqs.weight`), stored first.
    """

    def __init__(
        self,
        path: Path,
        arch: str,
        metadata: Callable[[Any], None],
        specs: Sequence[TensorSpec],
        plans: dict[str, TensorPlan | None],
        computed: Sequence[tuple[TensorPlan, Any]] = (),
    ) -> None:
        import gguf
        import numpy as np

        self.path = path
        self.specs = {spec.name: spec for spec in specs}
        self.order = [spec.name for spec in specs]
        self.plans = plans
        self.total_size = sum(spec.nbytes for spec in specs)
        self.computed = list(computed)
        self._writer = gguf.GGUFWriter(path=None, arch=arch)
        metadata(self._writer)
        stored = [plan for plan, _ in self.computed] + [p for p in (plans[name] for name in self.order) if p]
        for plan in stored:
            # A non-byte dtype with `raw_dtype` keeps the logical shape (a uint8 one would be read as a byte shape).
            self._writer.add_tensor_info(plan.name, plan.shape, np.float32, plan.nbytes, raw_dtype=plan.qtype)
        self._next = 0
        self._pool = concurrent.futures.ThreadPoolExecutor(_WORKERS, thread_name_prefix="gguf-convert")
        self._opened = False
        self._created = False  # this writer created `path` (so it may delete it on failure)
        self._finished = False

    def check_name(self, name: str) -> TensorSpec:
        """The planned spec of `name`; `ValueError` when the writer is finished or `name` is not planned. (The order
        is checked when the tensor is written: a background writer checks tensors before earlier ones are written.)"""
        if self._finished:
            raise ValueError(f"This writer is finished; cannot write {name!r}.")
        spec = self.specs.get(name)
        if spec is None:
            raise ValueError(f"Tensor {name!r} is not in the writer's plan; plan every tensor up front.")
        return spec

    def _advance(self, name: str) -> None:
        if self._next >= len(self.order) or self.order[self._next] != name:
            expected = self.order[self._next] if self._next < len(self.order) else "nothing more"
            raise ValueError(f"GGUF tensors are written in planned order: expected {expected!r}, got {name!r}.")
        self._next += 1

    def check(self, name: str, tensor: Any) -> TensorSpec:
        """Raise the `ValueError` that `write(name, tensor)` would raise; write nothing."""
        spec = self.check_name(name)
        if tuple(tensor.shape) != spec.shape:
            raise ValueError(f"Tensor {name!r} is {tuple(tensor.shape)}, but the plan says {spec.shape}.")
        return spec

    def _open(self) -> None:
        if self._opened:
            return
        try:
            self._created = True
            self._writer.write_header_to_file(path=self.path)
            self._writer.write_kv_data_to_file()
            self._writer.write_ti_data_to_file()
        except OSError as error:
            raise disk_error(error, f"Writing '{self.path}'") from None
        self._opened = True
        for plan, value in self.computed:
            self._append(plan, value)

    def write(self, name: str, tensor: Any) -> None:
        """Convert and append the next planned tensor."""
        self.check(name, tensor)
        self._advance(name)
        self._open()
        plan = self.plans[name]
        if plan is not None:
            self._append(plan, plan.prepare(tensor) if plan.prepare else tensor)

    def copy_from_file(self, name: str, source: str | os.PathLike, offset: int) -> None:
        """Append a tensor stored unchanged in a safetensors file (`source`, data at `offset`), read a block of rows
        at a time (all at once only when it needs reordering)."""
        spec = self.check_name(name)
        plan = self.plans[name]
        self._advance(name)
        if plan is None:
            return
        self._open()
        if plan.prepare is None and _float_qtype(plan.qtype) == spec.dtype:
            self._copy_bytes(plan, source, offset)  # the stored bytes are the GGUF bytes: copied by the kernel
            return
        with open(source, "rb") as handle:
            if plan.prepare is not None:
                self._append(plan, plan.prepare(_read_tensor(handle, offset, spec.nbytes, spec.dtype, spec.shape)))
                return
            width = spec.shape[-1] if spec.shape else 1
            row_bytes = width * spec.dtype.itemsize
            step = max(1, _CHUNK_ELEMENTS // width)
            rows = spec.nbytes // row_bytes if row_bytes else 0

            def blocks() -> Any:
                for start in range(0, rows, step):
                    count = min(step, rows - start)
                    yield _read_tensor(
                        handle, offset + start * row_bytes, count * row_bytes, spec.dtype, (count, width)
                    )

            self._append(plan, None, blocks=blocks())

    def _copy_bytes(self, plan: TensorPlan, source: str | os.PathLike, offset: int) -> None:
        fout = self._writer.fout[0]
        try:
            self._writer.write_padding(fout, fout.tell())
            fout.flush()
            start = fout.tell()
            with open(source, "rb") as handle:
                copy_range(handle.fileno(), offset, fout.fileno(), start, plan.nbytes)
            fout.seek(start + plan.nbytes)
            self._writer.write_padding(fout, plan.nbytes)
        except OSError as error:
            raise disk_error(error, f"Copying {plan.name!r} from '{source}' to '{self.path}'") from None

    def _append(self, plan: TensorPlan, tensor: Any, blocks: Any = None) -> None:
        """Convert and write one tensor (or its `blocks` of rows), a block of rows at a time (`_convert_block`)."""
        if blocks is None:
            tensor = tensor.detach()
            if tuple(tensor.shape) != plan.shape:
                raise ValueError(f"GGUF tensor {plan.name!r} is {tuple(tensor.shape)}, planned {plan.shape}.")
            rows = tensor.reshape(-1, plan.shape[-1]) if plan.shape else tensor.reshape(1, 1)
            step = max(1, _CHUNK_ELEMENTS // max(1, rows.shape[1]))
            blocks = (rows[start : start + step] for start in range(0, rows.shape[0], step))
        fout = self._writer.fout[0]
        try:
            self._writer.write_padding(fout, fout.tell())
            written = 0
            # Blocks are converted by two threads (numpy and torch release the GIL) and written in order; at most
            # two blocks are in flight, so memory stays at a few blocks.
            pending: collections.deque[Any] = collections.deque()
            for block in blocks:
                pending.append(self._pool.submit(_convert_block, block, plan.qtype))
                if len(pending) >= _WORKERS:
                    written += _write_array(fout, pending.popleft().result())
            while pending:
                written += _write_array(fout, pending.popleft().result())
            if written != plan.nbytes:
                raise ValueError(f"GGUF tensor {plan.name!r} took {written} bytes, planned {plan.nbytes}.")
            self._writer.write_padding(fout, written)
        except OSError as error:
            raise disk_error(error, f"Writing {plan.name!r} to '{self.path}'") from None

    def finish(self) -> list[str]:
        """Check that every planned tensor arrived and close the file; returns its name."""
        if self._finished:
            raise ValueError("This writer is already finished.")
        if self._next != len(self.order):
            raise ValueError(
                f"{len(self.order) - self._next} planned tensor(s) were not written, starting with "
                f"{self.order[self._next]!r}."
            )
        self._open()
        try:
            self._writer.close()
        except OSError as error:
            raise disk_error(error, f"Writing '{self.path}'") from None
        self._finished = True
        return [self.path.name]

    def close(self) -> None:
        """Close the file; before a successful `finish`, also delete it if this writer created it. Safe to call more
        than once."""
        self._pool.shutdown(wait=True)
        self._writer.close()
        if self._created and not self._finished:
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> GGUFFileWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _read_tensor(handle: Any, offset: int, nbytes: int, dtype: Any, shape: tuple[int, ...]) -> Any:
    """`nbytes` bytes of `handle` at `offset` as a tensor of `dtype` and `shape`."""
    import torch

    handle.seek(offset)
    data = bytearray(handle.read(nbytes))
    if len(data) != nbytes:
        raise ValueError(f"{handle.name} is too short to hold {nbytes} bytes at {offset}.")
    return torch.frombuffer(data, dtype=dtype).reshape(shape) if nbytes else torch.empty(shape, dtype=dtype)


def _float_qtype(qtype: int) -> Any:
    """The torch dtype whose bytes a float GGML type stores (`None` for block-quantized types)."""
    import gguf
    import torch

    types = gguf.GGMLQuantizationType
    return {types.F32: torch.float32, types.F16: torch.float16, types.BF16: torch.bfloat16}.get(qtype)


def _convert_block(block: Any, qtype: int) -> Any:
    """The GGUF bytes of a block of rows, converted as llama.cpp's converter does: float types rounded to nearest
    even (in torch; `gguf.quants` for NaN, whose payloads it sets its own way), other types through float32 and
    `gguf.quants.quantize`."""
    import gguf
    import torch

    block = block.to("cpu")
    target = _float_qtype(qtype)
    if target is not None and not block.isnan().any():
        return block.to(target).contiguous().view(torch.uint8).numpy()
    if block.dtype not in (torch.float16, torch.float32):
        block = block.to(torch.float32)
    return gguf.quants.quantize(block.contiguous().numpy(), qtype)


def _write_array(fout: Any, data: Any) -> int:
    import numpy as np

    np.ascontiguousarray(data).tofile(fout)
    return data.nbytes
