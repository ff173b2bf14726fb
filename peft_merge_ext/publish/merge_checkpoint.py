"""Out-of-core merge: base checkpoint on disk + LoRA adapter folders -> merged checkpoint on disk.

The base model is never loaded: its safetensors files are read one tensor at a time (`checkpoint_reader`), in the
order their bytes are stored, so the base is read front to back. Each targeted weight gets the combined delta added
(`weight_merge.merge_delta_into_weight`, the same function the in-memory `save_merged` uses, so both give
bit-identical tensors), and the result is handed to a background thread that writes it straight to its place in the
output shards (`checkpoint_writer.BackgroundWriter` + `ShardedSafetensorsWriter`, planned up front, each byte written
once) while the next weight is computed. Tensors the merge leaves as they are (untouched, same dtype) are copied file
to file by the kernel (`os.copy_file_range`), never through this process' memory. Peak memory is about the largest
merged tensor twice (its memory-mapped input and its output) plus what the writer thread may hold (at most
max(64 MB, one output tensor)) plus the adapters' factors for one module, whatever the model size.

Reading adapters needs neither PEFT nor transformers (`adapter_files` parses `adapter_config.json` itself); only
adapters whose weight layout or tied weights depend on the architecture (GPT-2 `Conv1D` with `fan_in_fan_out`,
embeddings, targets missing from the checkpoint) build it with transformers, on the meta device.

Everything is validated (`plan_checkpoint_merge`: files, configs, targets, shapes, architecture, method and options)
before the output folder is created. The combined factors of a module are computed just before its weight is written
(the first one before anything is written), so only one module's factors are in memory at a time; the output folder
appears atomically when its last file is written, and never half-written.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import struct
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import MergeInputError, UnknownCombinationTypeError

__all__ = ["CheckpointMergeResult", "MergePlan", "merge_checkpoint", "parse_dtype", "plan_checkpoint_merge"]

COPIED_FILES = (
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "spiece.model",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)
TOKENIZER_FILES = COPIED_FILES[1:]
_DTYPE_ALIASES = {
    "bf16": "bfloat16",
    "bfloat16": "bfloat16",
    "fp16": "float16",
    "float16": "float16",
    "half": "float16",
    "fp32": "float32",
    "float32": "float32",
    "float": "float32",
    "fp64": "float64",
    "float64": "float64",
}


def parse_dtype(dtype: Any) -> Any:
    """A `torch.dtype` from `None`, a `torch.dtype` or a name (`"bf16"`, `"bfloat16"`, `"fp16"`, `"float32"`, ...).

    Raises:
        `MergeInputError`: For anything else.
    """
    import torch

    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    name = _DTYPE_ALIASES.get(str(dtype).lower().removeprefix("torch."))
    if name is None:
        raise MergeInputError(f"Unknown dtype {dtype!r}; use one of bf16, fp16, fp32 (or bfloat16, float16, float32).")
    return getattr(torch, name)


def _dtype_name(dtype: Any) -> str:
    return str(dtype).removeprefix("torch.")


@dataclass
class _BaseTensor:
    name: str
    file: Path
    shape: tuple[int, ...]
    dtype: Any
    source: str | None = None  # the stored tensor to read, for a tied weight written on its own
    data_offset: int | None = None  # where its bytes start in a safetensors `file`

    @property
    def stored_name(self) -> str:
        return self.source or self.name


@dataclass
class MergePlan:
    """What a checkpoint merge will do, computed without touching the base weights.

    Args:
        base (`str`): The base as given.
        base_folder (`Path`): Its local folder.
        adapters (`list`): The adapters (`adapter_files.AdapterFiles`), factors included.
        tensors (`list`): Every base tensor, in read order.
        targets (`dict[str, str]`): Weight key -> module name of every weight that gets a delta.
        transpose (`dict[str, bool]`): Weight key -> whether the weight is stored `in x out`.
        out_dtype (`torch.dtype`, *optional*): The requested output dtype.
        output_bytes (`int`): Size of the merged weights.
        estimated_peak_bytes (`int`): Estimated memory the work needs on top of the Python/torch baseline.
        problems (`list[str]`): Validation errors; the merge refuses to run while there are any.
        warnings (`list[str]`): Things worth knowing that do not stop the merge.
    """

    base: str
    base_folder: Path
    base_config: dict[str, Any]
    adapters: list[Any]
    weights: list[float]
    combination_type: str | None
    options: dict[str, Any]
    svd_rank: int | None
    request: Any
    tensors: list[_BaseTensor]
    targets: dict[str, str]
    transpose: dict[str, bool]
    out_dtype: Any
    output_bytes: int = 0
    estimated_peak_bytes: int = 0
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    module_order: list[str] = field(default_factory=list)
    untied: list[str] = field(default_factory=list)

    def output_dtype_of(self, tensor: _BaseTensor) -> Any:
        """The dtype `tensor` is written in: the requested dtype for floating tensors, else its own."""
        if self.out_dtype is not None and tensor.dtype.is_floating_point:
            return self.out_dtype
        return tensor.dtype

    def describe(self) -> str:
        """A human-readable summary of the plan (what `--dry-run` prints)."""
        lines = [f"Base: {self.base} ({len(self.tensors)} tensors)"]
        for adapter, weight in zip(self.adapters, self.weights, strict=True):
            ranks = sorted({m.rank for m in adapter.modules.values()})
            rank_text = str(ranks[0]) if len(ranks) == 1 else f"{ranks[0]}-{ranks[-1]}"
            lines.append(
                f"Adapter: {adapter.source} (weight {weight:g}, rank {rank_text}, {len(adapter.modules)} modules, "
                f"rslora={bool(adapter.config.use_rslora)})"
            )
        method = self.combination_type or "single adapter, merged as is"
        lines.append(f"Method: {method}" + (f" options {self.options}" if self.options else ""))
        if self.svd_rank is not None:
            lines.append(f"Rank bound (svd_rank): {self.svd_rank}")
        touched_bytes = sum(_nbytes(t.shape, t.dtype) for t in self.tensors if t.name in self.targets)
        lines.append(f"Tensors touched: {len(self.targets)} of {len(self.tensors)} ({_human(touched_bytes)})")
        dtype = _dtype_name(self.out_dtype) if self.out_dtype is not None else "unchanged"
        lines.append(f"Output: {_human(self.output_bytes)} of weights, dtype {dtype}")
        lines.append(
            f"Estimated peak memory for the work: {_human(self.estimated_peak_bytes)} "
            "(plus the Python and torch baseline)"
        )
        lines.extend(f"Warning: {text}" for text in self.warnings)
        lines.extend(f"Problem: {text}" for text in self.problems)
        lines.append("Validation: OK" if not self.problems else f"Validation: {len(self.problems)} problem(s)")
        return "\n".join(lines)


@dataclass
class CheckpointMergeResult:
    """The result of `merge_checkpoint`.

    Args:
        path (`Path`): The merged model folder.
        files (`list[str]`): The weight files written.
        merge_info (`MergeInfo`): The merge, as described in the model card.
        url (`str`, *optional*): The commit URL when the folder was uploaded.
        seconds (`float`): Wall time.
    """

    path: Path
    files: list[str]
    merge_info: Any
    url: str | None = None
    seconds: float = 0.0

    @property
    def report(self) -> Any:
        """The `MergeReport` of the combination (`None` for a single adapter merged as is)."""
        return self.merge_info.report


def _nbytes(shape: tuple[int, ...], dtype: Any) -> int:
    import torch

    count = 1
    for size in shape:
        count *= size
    return count * torch.empty((), dtype=dtype).element_size()


def _human(size: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(size) < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size:.1f} TB"  # pragma: no cover


def _is_hub_id(text: str) -> bool:
    return re.fullmatch(r"[\w.\-]+/[\w.\-]+", text) is not None and not Path(text).expanduser().exists()


def _base_tensors(folder: Path, allow_pickle: bool) -> list[_BaseTensor]:
    from ..checkpoint.reader import read_tensor_specs
    from ..checkpoint.writer import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME

    index = folder / SAFE_WEIGHTS_INDEX_NAME
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = sorted(set(weight_map.values()))  # shard 1, 2, ... each read front to back by the merge
    elif (folder / SAFE_WEIGHTS_NAME).is_file():
        files = [SAFE_WEIGHTS_NAME]
    else:
        pickles = sorted(folder.glob("pytorch_model*.bin"))
        if not pickles:
            raise MergeInputError(f"The base folder {folder} has no model.safetensors (nor a sharded index).")
        if not allow_pickle:
            raise MergeInputError(
                f"The base folder {folder} only has pickle weights ({pickles[0].name}), which can run code when "
                "loaded. Convert them to safetensors, or opt in with allow_pickle=True (CLI: --allow-pickle) to load "
                "them with torch.load(weights_only=True)."
            )
        return _pickle_tensors(pickles)
    tensors = []
    for name in files:
        path = folder / name
        if not path.is_file():
            raise MergeInputError(f"The base checkpoint's index names {name}, which is missing from {folder}.")
        offsets = _data_offsets(path)
        tensors.extend(
            _BaseTensor(spec.name, path, spec.shape, spec.dtype, data_offset=offsets.get(spec.name))
            for spec in read_tensor_specs(path)
        )
    return tensors


def _data_offsets(path: Path) -> dict[str, int]:
    """Name -> absolute offset of the tensor's bytes in a safetensors file, from its header (an 8-byte little-endian
    length, then that many bytes of JSON whose `data_offsets` count from the header's end)."""
    with open(path, "rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(length))
    return {
        name: 8 + length + entry["data_offsets"][0]
        for name, entry in header.items()
        if name != "__metadata__" and isinstance(entry, dict) and "data_offsets" in entry
    }


def _pickle_tensors(paths: list[Path]) -> list[_BaseTensor]:
    import torch

    tensors = []
    for path in paths:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        tensors.extend(
            _BaseTensor(key, path, tuple(value.shape), value.dtype)
            for key, value in state.items()
            if isinstance(value, torch.Tensor)
        )
        del state
    return tensors


def _read_base_tensor(tensor: _BaseTensor) -> Any:
    if tensor.file.suffix == ".bin":
        import torch

        state = torch.load(tensor.file, map_location="cpu", weights_only=True, mmap=True)
        value = state[tensor.stored_name].clone()
        del state
        return value
    from ..checkpoint.reader import read_tensor

    return read_tensor(tensor.file, tensor.stored_name)


def _architecture(config: dict[str, Any]) -> tuple[dict[str, str], dict[str, str]] | None:
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


def _num_layers(config: dict[str, Any], modules: Sequence[str]) -> int | None:
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        value = config.get(key)
        if isinstance(value, int) and value > 0:
            return value
    text_config = config.get("text_config")
    if isinstance(text_config, dict):
        return _num_layers(text_config, modules)
    indices = [int(m.group(1)) for name in modules if (m := re.search(r"\.(\d+)(?:\.|$)", name))]
    return max(indices) + 1 if indices else None


def _check_combination(
    combination_type: str | None, names: list[str], configs: dict[str, Any], weights: Any, svd_rank: Any, options: dict
) -> tuple[Any, list[float]]:
    from ..engine.combine import prepare_request
    from ..plugins.registry import PEFT_COMBINATION_TYPES, check_weights, get_combination_types

    if combination_type is None:
        if options or svd_rank is not None:
            raise MergeInputError(
                "Options and svd_rank belong to a combination type; pass combination_type= (e.g. 'weighted') to use "
                "them."
            )
        return None, check_weights([1.0] if weights is None else weights, 1)
    types = get_combination_types()
    if combination_type not in types:
        hint = (
            " It is one of PEFT's own types, which only run in memory through add_weighted_adapter; 'weighted' is "
            "the exact equivalent of 'linear'/'cat'."
            if combination_type in PEFT_COMBINATION_TYPES
            else ""
        )
        raise UnknownCombinationTypeError(
            f"Unknown combination type {combination_type!r} for a checkpoint merge; registered types: "
            f"{', '.join(sorted(types))}.{hint}"
        )
    if weights is None:
        weights = [1.0] * len(names)
    request = prepare_request(configs, names, weights, combination_type, svd_rank, options)
    return request, request.weights


def plan_checkpoint_merge(
    base: str | Path,
    adapters: Sequence[str | Path],
    *,
    combination_type: str | None = None,
    weights: Sequence[float] | None = None,
    dtype: Any = None,
    svd_rank: int | None = None,
    allow_pickle: bool = False,
    device: Any = None,
    strict: bool = True,
    **combination_options: Any,
) -> MergePlan:
    """Validate a checkpoint merge and describe it, without reading any base weight.

    Args:
        base, adapters, combination_type, weights, dtype, svd_rank, allow_pickle, device, combination_options: As in
            `merge_checkpoint`.
        strict (`bool`, *optional*, defaults to `True`): Raise on the first problem. With `False`, shape and target
            problems are collected in `MergePlan.problems` (for `--dry-run`); unreadable inputs still raise.

    Returns:
        `MergePlan`: The plan, with the combined factors ready in `request` / the adapters.

    Raises:
        `MergeInputError`: Any invalid input (subclasses for incompatible adapters and unknown types).
    """
    import torch

    from ..checkpoint.adapter_files import read_adapter, resolve_folder
    from ..lowrank.factor_math import compute_dtype_for

    if isinstance(adapters, (str, Path)) or not adapters:
        raise MergeInputError(f"adapters must be a non-empty list of adapter folders, got {adapters!r}.")
    out_dtype = parse_dtype(dtype)
    base_folder = resolve_folder(base, "base model", "config.json")
    config_path = base_folder / "config.json"
    if not config_path.is_file():
        raise MergeInputError(f"The base folder {base_folder} has no config.json; pass a transformers model folder.")
    base_config = json.loads(config_path.read_text())
    tensors = _base_tensors(base_folder, allow_pickle)
    target_device = _resolve_device(device)
    if combination_type is None and len(adapters) > 1:
        combination_type = "weighted"  # what PEFT computes with several active adapters
    # A single adapter merged as is reads its factors in float32, like the in-memory `save_merged`.
    compute_dtype = compute_dtype_for(target_device) if combination_type is not None else torch.float32
    loaded = []
    used_names: set[str] = set()
    for path in adapters:
        folder_name = Path(str(path).rstrip("/")).name or "adapter"
        name = folder_name
        suffix = 2
        while name in used_names:
            name, suffix = f"{folder_name}_{suffix}", suffix + 1
        used_names.add(name)
        loaded.append(
            read_adapter(path, name=name, allow_pickle=allow_pickle, compute_dtype=compute_dtype, device=target_device)
        )
    names = [adapter.name for adapter in loaded]
    request, resolved_weights = _check_combination(
        combination_type, names, {a.name: a.config for a in loaded}, weights, svd_rank, dict(combination_options)
    )
    plan = MergePlan(
        base=str(base),
        base_folder=base_folder,
        base_config=base_config,
        adapters=loaded,
        weights=list(resolved_weights),
        combination_type=combination_type,
        options=dict(request.options) if request is not None else {},
        svd_rank=svd_rank,
        request=request,
        tensors=tensors,
        targets={},
        transpose={},
        out_dtype=out_dtype,
    )
    _validate_targets(plan)
    plan.output_bytes = sum(_nbytes(t.shape, plan.output_dtype_of(t)) for t in tensors)
    from ..checkpoint.writer import DEFAULT_MAX_PENDING_BYTES
    from ..lowrank.weight_merge import DEFAULT_BLOCK_ELEMENTS

    # Tensors that go through memory: the targets and those changing dtype (the others are copied file to file). Each
    # is its input (memory-mapped) plus its output; the writer thread holds at most max(64 MB, one output) more.
    read = [t for t in plan.tensors if not _copied_as_is(plan, t)]
    largest = max((_nbytes(t.shape, t.dtype) + _nbytes(t.shape, plan.output_dtype_of(t)) for t in read), default=0)
    largest_output = max((_nbytes(t.shape, plan.output_dtype_of(t)) for t in read), default=0)
    block = DEFAULT_BLOCK_ELEMENTS * 8 if plan.targets else 0  # float32 (float64 for a float64 weight) block
    # One module's factors per adapter at a time, plus the combined factors (at most their concatenation).
    factor_bytes = sum(max((m.nbytes for m in adapter.modules.values()), default=0) for adapter in loaded)
    plan.estimated_peak_bytes = largest + max(DEFAULT_MAX_PENDING_BYTES, largest_output) + block + 2 * factor_bytes
    if strict and plan.problems:
        raise MergeInputError(
            plan.problems[0] + (f" ({len(plan.problems) - 1} more problem(s))" if len(plan.problems) > 1 else "")
        )
    for text in plan.warnings:
        warnings.warn(text, UserWarning, stacklevel=3)
    return plan


def _copied_as_is(plan: MergePlan, tensor: _BaseTensor) -> bool:
    """Whether `tensor` is written as its stored bytes, copied file to file (untouched, same dtype, safetensors)."""
    return (
        tensor.name not in plan.targets
        and tensor.data_offset is not None
        and plan.output_dtype_of(tensor) == tensor.dtype
    )


def _resolve_device(device: Any) -> Any:
    import torch

    if device is None:
        return torch.device("cpu")
    target = torch.device(device)
    if target.type == "cuda" and not torch.cuda.is_available():
        warnings.warn("device='cuda' was asked for but CUDA is not available; computing on the CPU.", stacklevel=4)
        return torch.device("cpu")
    return target


def _natural_order(names: list[str]) -> list[str]:
    """Module names sorted with numbers compared as numbers (`layers.2` before `layers.10`)."""
    modules = {name.rsplit(".", 1)[0] for name in names}
    return sorted(modules, key=lambda name: [(0, int(p), "") if p.isdigit() else (1, 0, p) for p in name.split(".")])


def _validate_targets(plan: MergePlan) -> None:
    by_name = {tensor.name: tensor for tensor in plan.tensors}
    # Only GPT-2 style `Conv1D` weights are stored `in x out`; PEFT records fan_in_fan_out=True in the config of any
    # adapter targeting one, so the architecture is only built (on the meta device) for those adapters.
    # Embeddings and missing weights may involve tied weights, which only the architecture knows.
    needs_architecture = any(
        getattr(a.config, "fan_in_fan_out", False)
        or any(m.kind == "embedding" or m.weight_key not in by_name for m in a.modules.values())
        for a in plan.adapters
    )
    architecture = _architecture(plan.base_config) if needs_architecture else None
    classes, tied = architecture if architecture is not None else (None, {})
    plan.module_order = list(classes) if classes else _natural_order(list(dict.fromkeys(by_name)))
    # A tied weight stored once (`lm_head.weight` -> `model.embed_tokens.weight`): when an adapter touches either,
    # both are written on their own, each with its own delta (as the unmerged model computes), and untied.
    stored_tied = {t: s for t, s in tied.items() if t not in by_name and s in by_name}
    touched = {m.weight_key for a in plan.adapters for m in a.modules.values()}
    for target, source in stored_tied.items():
        if target in touched or source in touched:
            original = by_name[source]
            alias = _BaseTensor(
                target, original.file, original.shape, original.dtype, source=source, data_offset=original.data_offset
            )
            plan.tensors.insert(plan.tensors.index(original) + 1, alias)
            by_name[target] = alias
            plan.untied.append(target)
    architectures = plan.base_config.get("architectures") or []
    hub_base = str(plan.base) if _is_hub_id(str(plan.base)) else None
    recorded = {a.base_model_name_or_path for a in plan.adapters if a.base_model_name_or_path}
    if hub_base is not None and recorded - {hub_base}:
        plan.warnings.append(
            f"The adapters were trained on {', '.join(sorted(recorded))} (base_model_name_or_path), not {hub_base}."
        )
    elif len(recorded) > 1:
        plan.warnings.append(f"The adapters record different base models: {', '.join(sorted(recorded))}.")
    for adapter in plan.adapters:
        trained_on = ((getattr(adapter.config, "auto_mapping", None) or {}) or {}).get("base_model_class")
        if trained_on and architectures and trained_on != architectures[0]:
            plan.problems.append(
                f"Adapter {adapter.name!r} was trained on a {trained_on} but the base is a {architectures[0]}; use "
                "the base model the adapter was trained on."
            )
        for key, shape in adapter.saved_base_layers.items():
            base_tensor = by_name.get(key)
            if base_tensor is not None and base_tensor.shape != shape:
                plan.problems.append(
                    f"Adapter {adapter.name!r} was trained with {key} of shape {shape} (resized embeddings?) but the "
                    f"base has {base_tensor.shape}."
                )
        for module in adapter.modules.values():
            key = module.weight_key
            tensor = by_name.get(key)
            if tensor is None:
                tied = plan.base_config.get("tie_word_embeddings") and "lm_head" in key
                plan.problems.append(
                    f"Adapter {adapter.name!r} targets {module.name!r} but the base checkpoint has no {key!r}"
                    + (" (its weights are tied to the input embeddings)." if tied else "; wrong base model?")
                )
                continue
            out_features, in_features = module.shape
            class_name = classes.get(module.name) if classes else None
            if module.kind == "embedding":
                transpose = True
            elif class_name is not None:
                transpose = class_name == "Conv1D"
            else:
                transpose = bool(adapter.config.fan_in_fan_out) and len(tensor.shape) == 2
                if tensor.shape == (in_features, out_features) and tensor.shape != (out_features, in_features):
                    transpose = True
            expected = (in_features, out_features) if transpose else (out_features, in_features)
            numel = 1
            for size in tensor.shape:
                numel *= size
            matches = tensor.shape == expected or (
                module.kind == "conv" and tensor.shape[0] == out_features and numel == out_features * in_features
            )
            if not matches:
                plan.problems.append(
                    f"Adapter {adapter.name!r}: {module.name!r} has a delta of shape {expected} but the base weight "
                    f"{key!r} is {tensor.shape}; the adapter was trained on a different model."
                )
                continue
            if plan.transpose.get(key, transpose) != transpose:
                plan.problems.append(f"Adapters disagree on the layout of {key!r}.")
            plan.targets[key] = module.name
            plan.transpose[key] = transpose


class _DeltaSource:
    """The merged delta of each targeted weight, computed when that weight is written (so only one module's factors
    are in memory at a time), and the merge report gathered on the way."""

    def __init__(self, plan: MergePlan) -> None:
        self.plan = plan
        modules = list(dict.fromkeys(plan.targets.values()))
        self.num_layers = _num_layers(plan.base_config, modules)
        self.stats: dict[str, tuple[int | None, dict[str, Any]]] = {}
        self.seconds = 0.0
        self._cache: dict[str, Any] = {}

    def delta(self, key: str) -> Any:
        """The merged `LowRankDelta` for weight `key` (computed once)."""
        if key in self._cache:
            return self._cache.pop(key)
        import torch

        from ..engine.combine import _plain, combine_factors
        from ..plugins.contract import LowRankDelta

        plan = self.plan
        module = plan.targets[key]
        if plan.request is None:
            delta = plan.adapters[0].modules[module].load_delta()
            weight = plan.weights[0]
            return delta if weight == 1.0 else LowRankDelta(delta.B * weight, delta.A)
        started = time.perf_counter()
        present = next(a.modules[module] for a in plan.adapters if module in a.modules)
        inputs = []
        for adapter in plan.adapters:
            entry = adapter.modules.get(module)
            if entry is None:
                out_features, in_features = present.shape
                device = present.device or torch.device("cpu")
                zeros_b = torch.zeros(out_features, 1, dtype=present.compute_dtype, device=device)
                zeros_a = torch.zeros(1, in_features, dtype=present.compute_dtype, device=device)
                inputs.append(LowRankDelta(zeros_b, zeros_a))
            else:
                inputs.append(entry.load_delta())
        delta, stats = combine_factors(plan.request, inputs, module, present.layer_index, self.num_layers)
        self.stats[module] = (present.layer_index, _plain(stats))
        self.seconds += time.perf_counter() - started
        return delta

    def probe(self) -> None:
        """Compute the first targeted weight's delta now, so a failing combination stops before any output."""
        first = next((t.name for t in self.plan.tensors if t.name in self.plan.targets), None)
        if first is not None and self.plan.request is not None:
            self._cache[first] = self.delta(first)

    def report(self) -> Any:
        """The `MergeReport` of the combination (modules in model order), `None` for a single adapter as is."""
        from ..engine.combine import _plain
        from ..engine.report import MergeReport, ModuleReport

        plan = self.plan
        if plan.request is None:
            return None
        order = {name: index for index, name in enumerate(plan.module_order)}
        names = sorted(self.stats, key=lambda name: (order.get(name, len(order)), name))
        combination = plan.request.combination
        return MergeReport(
            combination_type=combination.name,
            adapters=[a.name for a in plan.adapters],
            weights=list(plan.weights),
            options=_plain(plan.request.options),
            svd_rank=plan.svd_rank,
            provider=combination.provider,
            seconds=self.seconds,
            modules=[ModuleReport(name, self.stats[name][0], self.stats[name][1]) for name in names],
        )


def build_merge_info(plan: MergePlan, report: Any) -> Any:
    """The `MergeInfo` of a planned merge (for the model card and the recipe)."""
    from collections import Counter

    from ..engine.merge_info import AdapterInfo, MergeInfo

    infos = []
    for adapter, weight in zip(plan.adapters, plan.weights, strict=True):
        source = adapter.source if _is_hub_id(adapter.source) else Path(adapter.source.rstrip("/")).name
        infos.append(
            AdapterInfo(
                name=adapter.name,
                source=source,
                weight=float(weight),
                rank=adapter.max_rank,
                alpha=float(adapter.config.lora_alpha),
                target_modules=sorted(adapter.config.target_modules)
                if isinstance(adapter.config.target_modules, (set, list, tuple))
                else [str(adapter.config.target_modules)],
                use_rslora=bool(adapter.config.use_rslora),
                sha256=adapter.sha256,
                sha256_of="adapter_model.safetensors",
            )
        )
    if plan.out_dtype is not None:
        dtype = _dtype_name(plan.out_dtype)
    else:
        counts = Counter(_dtype_name(t.dtype) for t in plan.tensors if t.dtype.is_floating_point)
        dtype = counts.most_common(1)[0][0] if counts else None
    base_model = plan.base if _is_hub_id(plan.base) else None
    if base_model is None:
        recorded = {a.base_model_name_or_path for a in plan.adapters if a.base_model_name_or_path}
        if len(recorded) == 1 and _is_hub_id(next(iter(recorded))):
            base_model = next(iter(recorded))
    return MergeInfo(
        base_model=base_model,
        adapters=infos,
        combination_type=plan.combination_type,
        options=dict(report.options) if report is not None else {},
        svd_rank=plan.svd_rank,
        merge_into_base=True,
        dtype=dtype,
        report=report,
        versions=_versions(),
    )


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    from .._version import __version__

    found = {"peft-merge-ext": __version__}
    for package in ("peft", "transformers", "torch", "safetensors"):
        with contextlib.suppress(PackageNotFoundError):
            found[package] = version(package)
    return found


def _write_side_files(plan: MergePlan, directory: Path, dtype_name: str | None) -> None:
    config = dict(plan.base_config)
    config.pop("quantization_config", None)
    if plan.untied:
        config["tie_word_embeddings"] = False
        if isinstance(config.get("text_config"), dict):
            config["text_config"] = {**config["text_config"], "tie_word_embeddings": False}
    if dtype_name is not None:
        present = [key for key in ("dtype", "torch_dtype") if key in config]
        for key in present or ["dtype"]:
            config[key] = dtype_name
    (directory / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    sources = [plan.base_folder] + [adapter.folder for adapter in plan.adapters]
    for file_name in COPIED_FILES:
        for folder in sources if file_name in TOKENIZER_FILES else sources[:1]:
            if (folder / file_name).is_file():
                shutil.copyfile(folder / file_name, directory / file_name)
                break


def _write_card(info: Any, directory: Path, plan: MergePlan, repo_id: str | None) -> None:
    from ..publish.card import write_model_card

    write_model_card(info, directory, repo_id=repo_id or directory.name, base_card_folder=plan.base_folder)


def _upload(folder: Path, repo_id: str, *, token: str | None, private: bool | None, quiet: bool) -> str:
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    from ..publish.hub import upload_folder

    silence = quiet and not are_progress_bars_disabled()
    if silence:
        disable_progress_bars()
    try:
        return upload_folder(folder, repo_id, token=token, private=private)
    finally:
        if silence:
            enable_progress_bars()


def merge_checkpoint(
    base: str | Path,
    adapters: Sequence[str | Path],
    *,
    out: str | Path,
    combination_type: str | None = None,
    weights: Sequence[float] | None = None,
    dtype: Any = None,
    max_shard_size: int | str = "5GB",
    device: Any = None,
    push_to: str | None = None,
    svd_rank: int | None = None,
    allow_pickle: bool = False,
    overwrite: bool = False,
    quiet: bool = False,
    private: bool | None = None,
    token: str | None = None,
    **combination_options: Any,
) -> CheckpointMergeResult:
    """Merge LoRA adapters into a base checkpoint on disk, streaming, without loading the model.

    Args:
        base (`str` or `Path`): The base model folder, or a Hub id already in the Hugging Face cache.
        adapters (`Sequence[str | Path]`): PEFT adapter folders (or cached Hub ids).
        out (`str` or `Path`): The output folder (must not exist or be empty unless `overwrite=True`).
        combination_type (`str`, *optional*): A registered combination type (`weighted`, `average`, `slerp`,
            `karcher` or a plugin's). `None`: a single adapter is merged as is, several are summed (`weighted`), as
            PEFT does with several active adapters and as `save_merged` does.
        weights (`Sequence[float]`, *optional*): One weight per adapter; defaults to equal weights summing to 1
            (1.0 each by default).
        dtype (`str` or `torch.dtype`, *optional*): Output dtype of floating tensors (`"bf16"`, `"fp16"`, `"fp32"`);
            the base's dtypes by default.
        max_shard_size (`int` or `str`, *optional*, defaults to `"5GB"`): Output shard size limit.
        device (`str` or `torch.device`, *optional*): Where deltas are computed (`"cuda"` when available).
        push_to (`str`, *optional*): A Hub repo id to upload the finished folder to.
        svd_rank (`int`, *optional*): Upper bound on the merged rank per module.
        allow_pickle (`bool`, *optional*, defaults to `False`): Accept `.bin` pickle weights
            (`torch.load(weights_only=True)`).
        overwrite (`bool`, *optional*, defaults to `False`): Replace an existing output folder.
        quiet (`bool`, *optional*, defaults to `False`): No progress bar.
        private (`bool`, *optional*): Visibility of a repo created by `push_to`.
        token (`str`, *optional*): Hub token for `push_to`.
        combination_options: The combination type's options (e.g. `t=0.3` for `slerp`).

    Returns:
        `CheckpointMergeResult`: The folder, files, `MergeInfo` (with the merge report) and upload URL.

    Raises:
        `MergeInputError`: Any invalid input, before the output folder is created.
        `HubUploadError`: When `push_to` fails (the merged folder stays in place for `peft-merge-ext upload`).
    """
    from tqdm.auto import tqdm

    from ..checkpoint.writer import (
        BackgroundWriter,
        ShardedSafetensorsWriter,
        TensorSpec,
        atomic_directory,
        parse_size,
    )
    from ..lowrank.weight_merge import merge_delta_into_weight

    started = time.perf_counter()
    try:
        parse_size(max_shard_size)
    except ValueError as error:
        raise MergeInputError(str(error)) from None
    destination = Path(out)
    if destination.exists() and (not destination.is_dir() or any(destination.iterdir())) and not overwrite:
        raise MergeInputError(
            f"Output folder {destination} already exists and is not empty; choose another folder or pass "
            "overwrite=True (CLI: --overwrite)."
        )
    plan = plan_checkpoint_merge(
        base,
        adapters,
        combination_type=combination_type,
        weights=weights,
        dtype=dtype,
        svd_rank=svd_rank,
        allow_pickle=allow_pickle,
        device=device,
        **combination_options,
    )
    deltas = _DeltaSource(plan)
    deltas.probe()
    target_device = _resolve_device(device)
    # Tensors are read in the base's storage order (file by file, each front to back: sequential disk reads) and the
    # output shards are grouped in that same order, so the writes move forward through the output files as well.
    specs = [TensorSpec(t.name, t.shape, plan.output_dtype_of(t)) for t in plan.tensors]
    with atomic_directory(destination, overwrite=overwrite) as temporary:
        writer = BackgroundWriter(ShardedSafetensorsWriter(temporary, specs, max_shard_size))
        progress = tqdm(total=writer.total_size, unit="B", unit_scale=True, desc="Merging", disable=quiet, leave=False)
        try:
            for base_tensor, spec in zip(plan.tensors, specs, strict=True):
                if _copied_as_is(plan, base_tensor):
                    # Unchanged bytes: copied file to file by the kernel, never through this process' memory.
                    writer.copy_from_file(spec.name, base_tensor.file, base_tensor.data_offset)
                    progress.update(spec.nbytes)
                    continue
                tensor = _read_base_tensor(base_tensor)
                if spec.name in plan.targets:
                    delta = deltas.delta(spec.name)
                    on_device = tensor.to(target_device)
                    # In place only into a copy: writing into the read tensor itself (a private memory map of the
                    # file) costs a copy-on-write page fault per page, several times slower than fresh memory.
                    merged = merge_delta_into_weight(
                        on_device,
                        delta,
                        plan.transpose[spec.name],
                        spec.dtype,
                        inplace=on_device.data_ptr() != tensor.data_ptr(),
                    )
                    del on_device
                    del delta
                else:
                    merged = tensor.to(spec.dtype)
                writer.write(spec.name, merged)
                progress.update(spec.nbytes)
                del tensor, merged
            files = writer.finish()
        finally:
            writer.close()
            progress.close()
        info = build_merge_info(plan, deltas.report())
        _write_side_files(plan, temporary, info.dtype if plan.out_dtype is not None else None)
        _write_card(info, temporary, plan, push_to or destination.name)
    url = None
    if push_to is not None:
        url = _upload(destination, push_to, token=token, private=private, quiet=quiet)
    return CheckpointMergeResult(destination, files, info, url, time.perf_counter() - started)
