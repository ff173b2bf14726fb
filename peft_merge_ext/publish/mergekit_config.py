"""Reading a mergekit configuration (`mergekit-yaml` file) whose models are `base+adapter` LoRA references.

The accepted subset of mergekit 0.1.5's schema: `models` (each `{model, parameters}`), `base_model`, `merge_method`,
`parameters`, `dtype`, `out_dtype` and `tokenizer_source: base`. Parameter values may be numbers or booleans,
gradients (lists of numbers, interpolated over the layers as mergekit does: `t = layer / (layers - 1)`, 0 for tensors
outside the blocks) and filters (`[{filter: self_attn, value: 0.3}, {value: 0.7}]`: the first whose filter is a
substring of the tensor name). Every model must be the base model or `base+adapter` with a local LoRA adapter folder,
on the same base. Relative paths are taken relative to the configuration file (else to the working directory, as
mergekit does). Everything else (`slices`, `modules`, random or other methods, Hub references, other models) is refused
with one line naming what is supported, before anything is written.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..engine.mergekit_methods import METHODS, REQUIRED
from ..recipe import RecipeError

__all__ = [
    "SUPPORTED_METHODS",
    "MergekitConfig",
    "MergekitInput",
    "is_mergekit_config",
    "parse_mergekit_config",
    "refusal",
]

SUPPORTED_METHODS = tuple(METHODS)
_ACCEPTED_KEYS = ("models", "base_model", "merge_method", "parameters", "dtype", "out_dtype", "tokenizer_source")
_BOOLEAN = {"normalize", "rescale", "int8_mask"}
_INTEGER = {"max_iter"}
_SUPPORTED_TEXT = (
    f"supported: merge_method {', '.join(SUPPORTED_METHODS)} over `models` that are the base model or "
    "`base+adapter` (a local LoRA adapter folder on that base), with `base_model`, `parameters`, `dtype`, `out_dtype`"
)


def refusal(problem: str) -> RecipeError:
    """The one-line error for anything outside the supported subset, naming that subset."""
    return RecipeError(f"mergekit config: {problem}; {_SUPPORTED_TEXT}.")


def is_mergekit_config(data: Any) -> bool:
    """Whether YAML data is a mergekit configuration (it names a `merge_method`), not a peft-merge-ext recipe."""
    return isinstance(data, dict) and "merge_method" in data


@dataclass
class MergekitInput:
    """One input model: its reference as written, its adapter folder (`None` for the base itself), its parameters."""

    reference: str
    adapter: Path | None
    parameters: dict[str, Any] = field(default_factory=dict)


@dataclass
class MergekitConfig:
    """A validated mergekit configuration.

    Args:
        method (`str`): The merge method.
        base (`Path`): The base model folder every adapter applies to.
        inputs (`list[MergekitInput]`): The merge inputs in mergekit's order (`base_model` last when it is not one of
            `models`).
        base_index (`int`, *optional*): Which input is `base_model`.
        parameters (`dict`): The global `parameters`.
        dtype (`str`, *optional*): The working dtype (`dtype`).
        out_dtype (`str`, *optional*): The output dtype (`out_dtype`, else `dtype`).
        data (`dict`): The configuration as read (for the model card).
    """

    method: str
    base: Path
    inputs: list[MergekitInput]
    base_index: int | None
    parameters: dict[str, Any]
    dtype: str | None
    out_dtype: str | None
    data: dict[str, Any]

    @property
    def adapters(self) -> list[Path]:
        """The distinct adapter folders, in input order."""
        return list(dict.fromkeys(entry.adapter for entry in self.inputs if entry.adapter is not None))

    def resolve(self, tensor_name: str, t: float) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """The shared parameters and each input's parameters for one tensor (`t`: its position for gradients).

        Raises:
            `RecipeError`: When a required parameter has no value for this tensor.
        """
        spec = METHODS[self.method]
        shared = {
            name: self._value(name, default, tensor_name, t, [self.parameters])
            for name, default in spec.shared.items()
        }
        per_model = []
        for index, entry in enumerate(self.inputs):
            if index == self.base_index and not spec.per_model_includes_base:
                per_model.append({})
                continue
            sources = [entry.parameters, self.parameters]
            values = {
                name: self._value(name, default, tensor_name, t, sources, entry.reference)
                for name, default in spec.per_model.items()
            }
            per_model.append(values)
        return shared, per_model

    @staticmethod
    def _value(name: str, default: Any, tensor: str, t: float, sources: list[dict], model: str | None = None) -> Any:
        for source in sources:
            if name in source:
                value = _evaluate(source[name], tensor, t, name)
                if value is not None:
                    return value
        if default is REQUIRED:
            owner = f" of model {model!r}" if model else ""
            raise refusal(f"parameter {name!r}{owner} has no value for tensor {tensor!r}")
        return default


def _scalar(value: Any, name: str) -> Any:
    if name in _BOOLEAN:
        if not isinstance(value, bool):
            raise refusal(f"parameter {name!r} must be true or false, got {value!r}")
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise refusal(f"parameter {name!r} must be a number, got {value!r}")
    return int(value) if name in _INTEGER else float(value)


def _evaluate(setting: Any, tensor: str, t: float, name: str) -> Any:
    """mergekit's reading of a parameter setting for one tensor: filters, gradients, scalars."""
    if isinstance(setting, dict):
        setting = [setting]
    if isinstance(setting, list):
        if not setting:
            return None
        if all(isinstance(item, dict) for item in setting):
            for item in setting:
                if set(item) - {"filter", "value"} or "value" not in item:
                    raise refusal(f"parameter {name!r}: a conditional value is {{filter, value}}, got {item!r}")
                pattern = item.get("filter")
                if pattern is None or pattern == "*" or (tensor and str(pattern) in tensor):
                    return _evaluate(item["value"], tensor, t, name)
            return None
        values = [_scalar(item, name) for item in setting]
        if name in _BOOLEAN:
            return values[int(t * (len(values) - 1))]
        position = t * (len(values) - 1)
        low = int(position)
        high = min(len(values) - 1, low + 1)
        fraction = position - low
        value = (1 - fraction) * values[low] + fraction * values[high]
        return int(value) if name in _INTEGER else value
    return _scalar(setting, name)


def _split_reference(reference: Any, where: str) -> tuple[str, str | None]:
    if not isinstance(reference, str) or not reference.strip():
        raise refusal(f"{where} must be a model reference string, got {reference!r}")
    if "@" in reference:
        raise refusal(f"{where} {reference!r} names a revision (Hub reference); models must be local folders")
    parts = reference.split("+")
    if len(parts) > 2 or not all(parts):
        raise refusal(f"{where} {reference!r} is not `model` or `model+lora`")
    return parts[0], (parts[1] if len(parts) == 2 else None)


def _local(path: str, source_dir: Path | None, where: str) -> Path:
    candidate = Path(path).expanduser()
    if not candidate.is_absolute() and source_dir is not None and (source_dir / candidate).exists():
        candidate = source_dir / candidate
    if not candidate.is_dir():
        raise refusal(f"{where} {path!r} is not a local folder (mergekit recipes run here on local folders only)")
    return candidate.absolute()


def _same(first: Path, second: Path) -> bool:
    try:
        return os.path.samefile(first, second)
    except OSError:
        return False


def _check_parameters(values: Any, allowed: set[str], where: str, method: str) -> dict[str, Any]:
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise refusal(f"{where} must be a mapping, got {values!r}")
    unknown = sorted(str(key) for key in set(values) - allowed)
    if unknown:
        raise refusal(
            f"{where} has {', '.join(map(repr, unknown))}, which merge_method {method!r} does not take here (it takes "
            f"{', '.join(sorted(allowed)) or 'none'})"
        )
    for name, setting in values.items():
        _evaluate(setting, "", 0.0, name)  # the structure and types, checked once up front
    return dict(values)


def parse_mergekit_config(data: dict[str, Any], source_dir: Path | None) -> MergekitConfig:
    """Validate a mergekit configuration and resolve its model references to local folders.

    Raises:
        `RecipeError`: For anything outside the supported subset, in one line naming the supported subset.
    """
    from ..checkpoint.side_files import parse_dtype

    unsupported = sorted(str(key) for key in set(data) - set(_ACCEPTED_KEYS))
    if unsupported:
        raise refusal(f"{', '.join(map(repr, unsupported))} is not supported")
    method = data.get("merge_method")
    if not isinstance(method, str) or method not in METHODS:
        random = str(method).startswith(("dare", "della"))
        why = ": it samples at random, so its output cannot be reproduced" if random else ""
        raise refusal(f"merge_method {method!r} is not supported{why}")
    spec = METHODS[method]
    if data.get("tokenizer_source") not in (None, "base"):
        raise refusal(f"tokenizer_source {data.get('tokenizer_source')!r} is not supported (the base's is copied)")
    for key in ("dtype", "out_dtype"):
        if data.get(key) is not None:
            try:
                parse_dtype(data[key])
            except Exception as error:
                raise refusal(f"{key}: {error}") from None
    models = data.get("models")
    if not isinstance(models, list) or not models:
        raise refusal("`models` must be a non-empty list of {model, parameters}")
    base_reference = data.get("base_model")
    if spec.base == "required" and base_reference is None:
        raise refusal(f"merge_method {method!r} needs base_model")
    references: list[tuple[str, dict[str, Any]]] = []
    for index, entry in enumerate(models):
        entry = {"model": entry} if isinstance(entry, str) else entry
        if not isinstance(entry, dict) or set(entry) - {"model", "parameters"}:
            raise refusal(f"models[{index}] must be {{model, parameters}}, got {entry!r}")
        allowed = set(spec.per_model)
        references.append(
            (entry.get("model"), _check_parameters(entry.get("parameters"), allowed, f"models[{index}]", method))
        )
    parameters = _check_parameters(
        data.get("parameters"), set(spec.shared) | set(spec.per_model), "parameters", method
    )
    reference_list = [reference for reference, _ in references]
    if base_reference is not None and base_reference not in reference_list:
        references.append((base_reference, {}))
    split = [(_split_reference(ref, "model"), ref, params) for ref, params in references]
    first_base = split[0][0][0] if base_reference is None else _split_reference(base_reference, "base_model")[0]
    base = _local(first_base, source_dir, "base model")
    if not (base / "config.json").is_file():
        raise refusal(f"base model {first_base!r} has no config.json")
    inputs: list[MergekitInput] = []
    for (model_part, lora_part), reference, params in split:
        folder = _local(model_part, source_dir, "model")
        if not _same(folder, base):
            what = "an adapter on another base" if lora_part else "a model that is not a LoRA on the base"
            raise refusal(f"{reference!r} is {what} (base_model: {first_base!r})")
        adapter = None
        if lora_part is not None:
            adapter = _local(lora_part, source_dir, "LoRA adapter")
            if not (adapter / "adapter_config.json").is_file():
                raise refusal(f"{lora_part!r} in {reference!r} has no adapter_config.json (not a PEFT LoRA adapter)")
        inputs.append(MergekitInput(reference, adapter, params))
    base_index = None
    if base_reference is not None:
        base_index = [entry.reference for entry in inputs].index(base_reference)
    if spec.max_inputs is not None and len(inputs) != spec.max_inputs:
        raise refusal(f"merge_method {method!r} takes exactly {spec.max_inputs} models (base_model included)")
    if not any(entry.adapter is not None for entry in inputs):
        raise refusal("no model is a `base+adapter` LoRA reference; there is nothing to merge")
    return MergekitConfig(
        method, base, inputs, base_index, parameters, data.get("dtype"), data.get("out_dtype"), dict(data)
    )
