"""Reading safetensors files one tensor at a time, for checkpoints larger than memory.

`read_tensor_specs` lists a file's tensors (name, shape, dtype) from its header alone, in the order their bytes are
stored, so reading them in that order reads the file front to back. `read_tensor` opens the file, copies one tensor
out and closes it again, so the pages of the memory map do not pile up in the process' resident memory as they do
when one `safe_open` handle reads a whole multi-GB file.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from ..checkpoint.writer import DTYPE_CODES, TensorSpec

if TYPE_CHECKING:
    import torch

__all__ = ["read_tensor", "read_tensor_specs"]


def read_tensor_specs(path: str | Path) -> list[TensorSpec]:
    """The name, shape and dtype of every tensor of a safetensors file, from its header only, in storage order.

    Args:
        path (`str` or `Path`): A `.safetensors` file.

    Returns:
        `list[TensorSpec]`: One per tensor, ordered by where its bytes are in the file.

    Raises:
        `TypeError`: For a tensor whose dtype torch cannot represent.
    """
    import torch
    from safetensors import safe_open

    dtypes = {code: getattr(torch, name) for name, code in DTYPE_CODES.items() if hasattr(torch, name)}
    specs = []
    with safe_open(str(path), framework="pt") as handle:
        names = handle.offset_keys() if hasattr(handle, "offset_keys") else handle.keys()
        for name in names:
            tensor_slice = handle.get_slice(name)
            code = tensor_slice.get_dtype()
            if code not in dtypes:
                raise TypeError(f"{Path(path).name}: tensor {name!r} has dtype {code}, which torch cannot load.")
            specs.append(TensorSpec(name, tuple(tensor_slice.get_shape()), dtypes[code]))
    return specs


def read_tensor(path: str | Path, name: str) -> torch.Tensor:
    """Copy one tensor out of a safetensors file (opened and closed for just this tensor).

    Args:
        path (`str` or `Path`): A `.safetensors` file.
        name (`str`): The tensor's name.

    Returns:
        `torch.Tensor`: The tensor, on the CPU.
    """
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return handle.get_tensor(name)
