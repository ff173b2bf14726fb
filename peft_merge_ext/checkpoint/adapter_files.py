"""Reading PEFT LoRA adapters from disk into the canonical factors of the combination contract.

A saved adapter is a folder with `adapter_config.json` and `adapter_model.safetensors` whose keys look like
`base_model.model.<module>.lora_A.weight` / `.lora_B.weight` (Linear, GPT-2 `Conv1D`, Conv) or
`base_model.model.<module>.lora_embedding_A` / `_B` (Embedding). Each module becomes a `LowRankDelta` `B @ A`
(`out x in`, conv kernels flattened) with the LoRA scaling folded into `B`, resolved per module from `r`,
`lora_alpha`, `use_rslora`, `rank_pattern` and `alpha_pattern` exactly as PEFT resolves them when it loads the
adapter. The arithmetic is the same as `lora_layers.read_factors` on a loaded model, so both give identical factors.
What an adapter stores beyond its factors (DoRA magnitudes, LoRA biases, `modules_to_save` copies, trainable token
rows, LoRA on parameters) is read by `adapter_extras`.

PEFT is not imported (with it come transformers and bitsandbytes: seconds of start-up and over 100 MB): the config is
parsed into a `LoraAdapterConfig` and pattern keys are resolved by `pattern_value`, with PEFT's documented rules, in
bounded time (a key such as `(a+)+b` against a crafted module name would otherwise backtrack for hours).
"""

from __future__ import annotations

import hashlib
import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..engine.request import short_repr
from ..errors import AdapterCompatibilityError, MergeInputError
from ..plugins.contract import LowRankDelta
from .adapter_config import (
    ADAPTER_CONFIG_NAME,
    PATTERN_BUDGET_S,
    LoraAdapterConfig,
    check_config,
    load_config,
    pattern_value,
)

__all__ = [
    "ADAPTER_CONFIG_NAME",
    "AdapterFiles",
    "AdapterModule",
    "LoraAdapterConfig",
    "pattern_value",
    "read_adapter",
    "resolve_folder",
    "sha256_of_file",
]

ADAPTER_SAFETENSORS_NAME = "adapter_model.safetensors"
ADAPTER_PICKLE_NAME = "adapter_model.bin"
PEFT_PREFIX = "base_model.model."

_FACTOR_KEY = re.compile(r"^(?P<module>.+)\.(?P<part>lora_A|lora_B)\.weight$")
_EMBEDDING_KEY = re.compile(r"^(?P<module>.+)\.(?P<part>lora_embedding_A|lora_embedding_B)$")
_BASE_LAYER_KEY = re.compile(r"^(?P<module>.+)\.base_layer\.weight$")
_LAYER_INDEX = re.compile(r"\.(\d+)(?:\.|$)")


@dataclass
class AdapterModule:
    """One module of an on-disk adapter. Its factors stay on disk until `load_delta` reads them.

    Args:
        name (`str`): The module's name in the base model, e.g. `"model.layers.0.self_attn.q_proj"`.
        kind (`str`): `"linear"` (also GPT-2 `Conv1D`), `"embedding"` or `"conv"`.
        shape (`tuple[int, int]`): The `(out, in)` shape of the canonical delta.
        rank (`int`): The rank `r` of this module.
        scaling (`float`): `alpha / r`, or `alpha / sqrt(r)` with rslora.
        storage_dtype (`torch.dtype`): The dtype the factors were saved in.
        kernel_shape (`tuple[int, ...]`): The conv kernel size, `()` for other kinds.
    """

    name: str
    kind: str
    shape: tuple[int, int]
    rank: int
    scaling: float
    storage_dtype: torch.dtype
    kernel_shape: tuple[int, ...] = ()
    keys: tuple[str, str] = ("", "")
    reader: Callable[[str], torch.Tensor] | None = field(default=None, repr=False)
    compute_dtype: torch.dtype = torch.float64
    device: torch.device | None = None

    @property
    def weight_key(self) -> str:
        """The key of the base weight this module updates."""
        return f"{self.name}.weight"

    @property
    def layer_index(self) -> int | None:
        """The first number in the dotted name (the block index), if any."""
        match = _LAYER_INDEX.search(self.name)
        return int(match.group(1)) if match else None

    @property
    def nbytes(self) -> int:
        """Bytes of the factors once loaded in the compute dtype."""
        size = torch.empty((), dtype=self.compute_dtype).element_size()
        return (self.shape[0] + self.shape[1]) * self.rank * size

    def load_delta(self, dtype: torch.dtype | None = None, device: str | torch.device | None = None) -> LowRankDelta:
        """Read the factors: `B @ A` with the scaling folded into `B` (the arithmetic of
        `lora_layers.read_factors`), in `dtype` (the compute dtype by default) on `device`."""
        dtype = dtype or self.compute_dtype
        device = device if device is not None else self.device
        a = self.reader(self.keys[0]).flatten(1)
        b = self.reader(self.keys[1]).flatten(1)
        if device is not None:
            a, b = a.to(device), b.to(device)
        return LowRankDelta(b.to(dtype) * self.scaling, a.to(dtype))


@dataclass
class AdapterFiles:
    """A LoRA adapter read from disk.

    Args:
        name (`str`): A short name (the folder name unless given).
        folder (`Path`): The resolved local folder.
        source (`str`): What the user passed (a local path or a Hub id).
        config (`LoraAdapterConfig`): The parsed configuration.
        modules (`dict[str, AdapterModule]`): Module name -> canonical factors, in file order.
        weights_file (`Path`): The weights file that was read.
        sha256 (`str`): SHA-256 of that file.
        saved_base_layers (`dict[str, tuple[int, ...]]`): Base weights PEFT saved alongside (embeddings with
            `save_embedding_layers`), weight key -> shape; they must match the base checkpoint.
        extras (`AdapterExtras`): What it adds beyond LoRA factors on modules (`adapter_extras.read_extras`).
        param_wrappers (`list[ParamWrapperFiles]`): LoRA on `nn.Parameter`s, resolved against the base checkpoint's
            tensors by `adapter_extras.resolve_param_wrappers`.
    """

    name: str
    folder: Path
    source: str
    config: LoraAdapterConfig
    modules: dict[str, AdapterModule]
    weights_file: Path
    sha256: str
    saved_base_layers: dict[str, tuple[int, ...]] = field(default_factory=dict)
    extras: Any = None
    param_wrappers: list[Any] = field(default_factory=list)

    @property
    def base_model_name_or_path(self) -> str | None:
        """The base model recorded in `adapter_config.json`."""
        return getattr(self.config, "base_model_name_or_path", None)

    @property
    def max_rank(self) -> int:
        """The largest per-module rank (LoRA on parameters included)."""
        return max([*(module.rank for module in self.modules.values()), *(w.rank for w in self.param_wrappers)])

    def check_finite(self) -> None:
        """Read every factor once (one tensor in memory at a time) and refuse NaN and Inf, so that a damaged adapter
        is reported before any output exists.

        Raises:
            `MergeInputError`: Naming the adapter, the module and the factor.
        """
        for module in self.modules.values():
            for key, part in zip(module.keys, ("lora_A", "lora_B"), strict=True):
                tensor = module.reader(key)
                # A float64 sum is finite exactly when every entry is (NaN and Inf propagate).
                if tensor.is_floating_point() and not math.isfinite(float(tensor.sum(dtype=torch.float64))):
                    raise MergeInputError(
                        f"Adapter {self.name!r} has non-finite values (NaN or Inf) in {part} of {module.name!r} "
                        f"({self.weights_file.name}); retrain or repair that adapter. Nothing was written."
                    )


def sha256_of_file(path: str | Path, chunk_size: int = 1 << 22) -> str:
    """The hex SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def resolve_folder(path_or_id: str | Path, what: str = "folder", required_file: str | None = None) -> Path:
    """A local folder for `path_or_id`: the folder itself, or a Hub id's snapshot already in the Hugging Face cache.

    Nothing is downloaded: a Hub id must have been fetched before (`hf download REPO_ID`).

    Raises:
        `MergeInputError`: When it is neither an existing folder nor a cached Hub repository.
    """
    path = Path(path_or_id).expanduser()
    if path.is_dir():
        return path
    text = str(path_or_id)
    if path.exists():
        raise MergeInputError(f"The {what} {short_repr(text)} is a file; pass the folder that holds it.")
    from .side_files import hub_id_of

    looks_like_repo = hub_id_of(text, require_namespace=False) is not None
    if looks_like_repo:
        from huggingface_hub import snapshot_download

        try:
            folder = Path(snapshot_download(text, local_files_only=True))
        except Exception:
            folder = None
        if folder is not None and (required_file is None or (folder / required_file).exists()):
            return folder
    if looks_like_repo:
        raise MergeInputError(
            f"The {what} {short_repr(text)} is not a local folder and not in the Hugging Face cache. Pass an existing "
            f"folder, or download the repository first with `hf download {text[:200]}`."
        )
    raise MergeInputError(f"The {what} {short_repr(text)} is not an existing folder.")


def _weights_path(folder: Path, source: str, allow_pickle: bool) -> Path:
    safetensors_path = folder / ADAPTER_SAFETENSORS_NAME
    if safetensors_path.is_file():
        return safetensors_path
    pickle_path = folder / ADAPTER_PICKLE_NAME
    if pickle_path.is_file():
        if not allow_pickle:
            raise MergeInputError(
                f"Adapter {source!r} only has {ADAPTER_PICKLE_NAME} (a pickle file, which can run code when loaded). "
                "Convert it to safetensors, or opt in with allow_pickle=True (CLI: --allow-pickle) to load it with "
                "torch.load(weights_only=True)."
            )
        return pickle_path
    raise MergeInputError(f"Adapter {source!r} has no {ADAPTER_SAFETENSORS_NAME} (nor {ADAPTER_PICKLE_NAME}).")


def _tensor_source(path: Path) -> tuple[dict[str, tuple[tuple[int, ...], torch.dtype]], Callable[[str], torch.Tensor]]:
    """Name -> (shape, dtype) of every tensor, and a function reading one tensor (safetensors: on demand).

    A safetensors file goes through `reader.read_header`, which checks the whole header against the file before any
    tensor is read and raises one `MergeInputError` naming the file when it is damaged or hostile.
    """
    if path.suffix == ".bin":
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # UnpicklingError, EOFError, RuntimeError...: all mean "not a plain state dict"
            # torch's message is long; the line after "WeightsUnpickler error:" says what was refused.
            reason = " ".join(str(error).partition("WeightsUnpickler error:")[2].split() or str(error).split())
            reason = re.split(r" (?:Please use `torch\.serialization|Check the documentation)", reason)[0][:200]
            raise MergeInputError(
                f"{path.name} in {short_repr(path.parent.name)} could not be loaded safely ({type(error).__name__}: "
                f"{reason}); weights_only loading refuses anything but plain tensors. Convert it to safetensors."
            ) from None
        if not isinstance(state, dict):
            raise MergeInputError(f"{path} holds a {type(state).__name__}, not a state dict of tensors.")
        tensors = {key: value for key, value in state.items() if isinstance(value, torch.Tensor)}
        # A fresh copy on each read, like a safetensors read: a combination working in place changes nothing here.
        return {key: (tuple(t.shape), t.dtype) for key, t in tensors.items()}, lambda key: tensors[key].clone()
    from ..checkpoint.reader import read_header, read_tensor

    specs = {name: (entry.shape, entry.dtype) for name, entry in read_header(path).tensors.items()}
    return specs, lambda key: read_tensor(path, key)


def _scaling(config: Any, module: str, deadline: float) -> tuple[int, float]:
    rank = int(pattern_value(config.rank_pattern or {}, module, config.r, deadline))
    alpha = pattern_value(config.alpha_pattern or {}, module, config.lora_alpha, deadline)
    scaling = alpha / math.sqrt(rank) if config.use_rslora else alpha / rank
    return rank, scaling


def read_adapter(
    path_or_id: str | Path,
    *,
    name: str | None = None,
    allow_pickle: bool = False,
    compute_dtype: torch.dtype = torch.float64,
    device: str | torch.device | None = None,
) -> AdapterFiles:
    """Read an adapter folder into canonical factors, one `LowRankDelta` per target module.

    Args:
        path_or_id (`str` or `Path`): The adapter folder, or a Hub id already in the Hugging Face cache.
        name (`str`, *optional*): The adapter's name in reports; the folder name by default.
        allow_pickle (`bool`, *optional*, defaults to `False`): Accept `adapter_model.bin` (loaded with
            `torch.load(weights_only=True)`) when there is no safetensors file.
        compute_dtype (`torch.dtype`, *optional*, defaults to `torch.float64`): The dtype of the returned factors.
        device (`str` or `torch.device`, *optional*): Where the factors go (CPU by default).

    Returns:
        `AdapterFiles`: The configuration, the factors and the SHA-256 of the weights file.

    Raises:
        `MergeInputError`: Missing files, pickle refused, unexpected tensors, ranks inconsistent with the config.
        `AdapterCompatibilityError`: Non-LoRA adapters, LoRA variants other than DoRA, tensors the config does not
            declare.
    """
    source = str(path_or_id)
    folder = resolve_folder(path_or_id, "adapter", ADAPTER_CONFIG_NAME)
    name = name or folder.name
    config = load_config(folder, source)
    check_config(config, name)
    weights_file = _weights_path(folder, source, allow_pickle)
    specs, reader = _tensor_source(weights_file)
    from .adapter_extras import ExtrasReader

    factors: dict[str, dict[str, tuple[str, tuple[int, ...], torch.dtype]]] = {}
    kinds: dict[str, str] = {}
    saved_base_layers: dict[str, tuple[int, ...]] = {}
    extras = ExtrasReader(name, config, reader)
    for key, (shape, dtype) in specs.items():
        short = key[len(PEFT_PREFIX) :] if key.startswith(PEFT_PREFIX) else key
        if match := _FACTOR_KEY.match(short):
            module, part = match.group("module"), match.group("part")[-1]
            kinds.setdefault(module, "linear" if len(shape) == 2 else "conv")
        elif match := _EMBEDDING_KEY.match(short):
            module, part = match.group("module"), match.group("part")[-1]
            kinds.setdefault(module, "embedding")
        elif extras.take(key, short, shape):  # DoRA, lora_bias, modules_to_save, trainable tokens
            continue
        elif match := _BASE_LAYER_KEY.match(short):
            saved_base_layers[f"{match.group('module')}.weight"] = shape
            continue
        else:
            raise AdapterCompatibilityError(
                f"Adapter {name!r} has a tensor that is neither a LoRA factor nor a piece its adapter_config.json "
                f"declares (use_dora, lora_bias, modules_to_save, trainable_token_indices, target_parameters): "
                f"{key!r}. The config does not belong to these weights; save the adapter again with PEFT."
            )
        factors.setdefault(module, {})[part] = (key, shape, dtype)
    if not factors and not extras.found:
        raise MergeInputError(f"Adapter {name!r} ({weights_file}) holds no LoRA factors.")
    target_device = torch.device(device) if device is not None else None
    deadline = time.monotonic() + PATTERN_BUDGET_S
    modules: dict[str, AdapterModule] = {}
    for module, parts in factors.items():
        if extras.take_param_wrapper(module, parts, _scaling(config, _unwrapped(module), deadline)):
            continue
        if set(parts) != {"A", "B"}:
            raise MergeInputError(
                f"Adapter {name!r} has only lora_{''.join(parts)} for {module!r}; the file is damaged."
            )
        kind = kinds[module]
        (key_a, shape_a, dtype_a), (key_b, shape_b, _) = parts["A"], parts["B"]
        rank, scaling = _scaling(config, module, deadline)
        if shape_a[0] != rank or shape_b[1] != rank:
            raise MergeInputError(
                f"Adapter {name!r}: {ADAPTER_CONFIG_NAME} gives {module!r} rank {rank} (r / rank_pattern) but its "
                f"weights have rank {shape_a[0]}; the config does not belong to these weights."
            )
        in_features = math.prod(shape_a[1:])
        out_features = math.prod(shape_b) // rank
        modules[module] = AdapterModule(
            name=module,
            kind=kind,
            shape=(out_features, in_features),
            rank=rank,
            scaling=scaling,
            storage_dtype=dtype_a,
            kernel_shape=tuple(shape_a[2:]) if kind == "conv" else (),
            keys=(key_a, key_b),
            reader=reader,
            compute_dtype=compute_dtype,
            device=target_device,
        )
    extras_found = extras.finish({module: m.scaling for module, m in modules.items()})
    undressed = [m.name for m in modules.values() if config.use_dora and m.weight_key not in extras_found.magnitudes]
    if undressed:
        raise MergeInputError(
            f"Adapter {name!r} sets use_dora=True but {weights_file.name} has no lora_magnitude_vector for "
            f"{undressed[:3]}; the file is damaged or the config does not belong to it. Save the adapter again "
            "with PEFT."
        )
    return AdapterFiles(
        name=name,
        folder=folder,
        source=source,
        config=config,
        modules=modules,
        weights_file=weights_file,
        sha256=sha256_of_file(weights_file),
        saved_base_layers=saved_base_layers,
        extras=extras_found,
        param_wrappers=extras.param_wrappers,
    )


def _unwrapped(module: str) -> str:
    return module.replace(".base_layer", "")
