"""What a saved adapter adds beyond LoRA factors on modules, read from `adapter_model.safetensors`.

PEFT saves (keys after `base_model.model.`):

| piece (config option)                 | key                                                          |
|---------------------------------------|--------------------------------------------------------------|
| DoRA magnitude (`use_dora`)           | `<module>.lora_magnitude_vector`                             |
| LoRA bias (`lora_bias`)               | `<module>.lora_B.bias`                                       |
| trained copy (`modules_to_save`)      | `<module>.<tensor>` (the copy's own tensors, no adapter name) |
| trained rows (`trainable_token_indices`) | `<module>.token_adapter.trainable_tokens_delta` (the new rows) |
| LoRA on a parameter (`target_parameters`) | `<module>[.base_layer]*.lora_A.weight` / `.lora_B.weight`  |

A module with LoRA on several of its parameters nests one PEFT `ParamWrapper` per parameter, so the keys say the
nesting depth, not the parameter; `resolve_param_wrappers` finds the parameter from the base checkpoint's tensor
shapes (and refuses when that is ambiguous). Each piece becomes part of an `AdapterExtras` whose tensors are read only
when the merge writes the tensor they change.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import AdapterCompatibilityError, MergeInputError
from ..lowrank.tensor_edits import AdapterExtras, ExpertFactors, Stored, expert_deltas
from ..plugins.contract import LowRankDelta

__all__ = ["ExtrasReader", "ParamWrapperFiles", "checkpoint_edits", "resolve_param_wrappers"]

_MAGNITUDE_KEY = re.compile(r"^(?P<module>.+)\.lora_magnitude_vector$")
_BIAS_KEY = re.compile(r"^(?P<module>.+)\.lora_B\.bias$")
_TOKENS_KEY = re.compile(r"^(?P<module>.+)\.token_adapter\.trainable_tokens_delta$")


@dataclass
class ParamWrapperFiles:
    """LoRA factors on an `nn.Parameter` of `module` (PEFT's `ParamWrapper`), before the parameter is known.

    Args:
        adapter (`str`): The adapter's name.
        module (`str`): The module holding the parameter (wrapper levels removed).
        depth (`int`): How many wrapper levels lie outside this one (0: the outermost).
        keys (`tuple[str, str]`): The stored keys of `A` and `B`.
        shapes (`tuple[tuple[int, ...], tuple[int, ...]]`): Their shapes.
        rank (`int`): The rank per expert.
        scaling (`float`): The LoRA scaling.
        reader (`Callable[[str], torch.Tensor]`): Reads one stored tensor of the adapter.
    """

    adapter: str
    module: str
    depth: int
    keys: tuple[str, str]
    shapes: tuple[tuple[int, ...], tuple[int, ...]]
    rank: int
    scaling: float
    reader: Callable[[str], torch.Tensor]


def _matches(entry: str, name: str) -> bool:
    return name == entry or name.endswith(f".{entry}")


class ExtrasReader:
    """Collects an adapter's pieces beyond LoRA factors on modules while `adapter_files.read_adapter` reads its keys.

    Args:
        name (`str`): The adapter's name (for messages).
        config (`LoraAdapterConfig`): Its parsed config.
        reader (`Callable[[str], torch.Tensor]`): Reads one stored tensor.
    """

    def __init__(self, name: str, config: Any, reader: Callable[[str], torch.Tensor]) -> None:
        self.name = name
        self.config = config
        self.reader = reader
        self.extras = AdapterExtras()
        self._bias_keys: dict[str, str] = {}
        self.param_wrappers: list[ParamWrapperFiles] = []

    @property
    def found(self) -> bool:
        """Whether any piece was found."""
        return bool(self.extras or self._bias_keys or self.param_wrappers)

    def _stored(self, key: str, scale: float = 1.0) -> Stored:
        return Stored(f"{self.name}:{key}", lambda: self.reader(key), scale)

    def _refuse(self, key: str, option: str) -> None:
        raise AdapterCompatibilityError(
            f"Adapter {self.name!r} holds {key!r}, a piece of {option}, but its adapter_config.json does not set "
            f"{option}; the config does not belong to these weights. Save the adapter again with PEFT."
        )

    def take(self, key: str, short: str, shape: tuple[int, ...]) -> bool:
        """Record `key` if it is a piece beyond LoRA factors; `False` for LoRA factors and unknown keys."""
        config = self.config
        if match := _MAGNITUDE_KEY.match(short):
            if not config.use_dora:
                self._refuse(key, "use_dora")
            self.extras.magnitudes[f"{match.group('module')}.weight"] = self._stored(key)
            return True
        if match := _BIAS_KEY.match(short):
            if not config.lora_bias:
                self._refuse(key, "lora_bias")
            self._bias_keys[match.group("module")] = key
            return True
        if match := _TOKENS_KEY.match(short):
            module = match.group("module")
            self.extras.rows[f"{module}.weight"] = (self._token_indices(module, key, shape), self._stored(key))
            return True
        for entry in config.modules_to_save or ():
            found = re.search(rf"(?:^|\.){re.escape(entry)}\.", short)
            if found is not None:
                self.extras.copies[short] = self._stored(key)
                return True
        return False

    def _token_indices(self, module: str, key: str, shape: tuple[int, ...]) -> tuple[int, ...]:
        indices = self.config.trainable_token_indices
        if isinstance(indices, dict):
            indices = next((v for entry, v in indices.items() if _matches(entry, module)), None)
        if not isinstance(indices, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in indices):
            self._refuse(key, "trainable_token_indices")
        if len(shape) != 2 or shape[0] != len(indices):
            raise MergeInputError(
                f"Adapter {self.name!r}: {key!r} holds {shape[0] if shape else 0} rows but trainable_token_indices "
                f"lists {len(indices)} for {module!r}; the config does not belong to these weights."
            )
        return tuple(indices)

    def take_param_wrapper(self, module: str, parts: Mapping[str, Any], rank_scaling: tuple[int, float]) -> bool:
        """Record LoRA factors that sit on an `nn.Parameter` (`target_parameters`); `False` for a module's LoRA."""
        targets = self.config.target_parameters or []
        unwrapped = module.replace(".base_layer", "")
        if not any(_matches(entry.rpartition(".")[0], unwrapped) for entry in targets):
            return False
        if set(parts) != {"A", "B"}:
            raise MergeInputError(f"Adapter {self.name!r} has only lora_{''.join(parts)} for {module!r}; damaged.")
        rank, scaling = rank_scaling
        (key_a, shape_a, _), (key_b, shape_b, _) = parts["A"], parts["B"]
        depth = module.count(".base_layer")
        self.param_wrappers.append(
            ParamWrapperFiles(
                self.name, unwrapped, depth, (key_a, key_b), (shape_a, shape_b), rank, scaling, self.reader
            )
        )
        return True

    def finish(self, scalings: Mapping[str, float]) -> AdapterExtras:
        """The `AdapterExtras` (biases get their module's LoRA scaling)."""
        for module, key in self._bias_keys.items():
            if module not in scalings:
                raise MergeInputError(
                    f"Adapter {self.name!r} has a LoRA bias for {module!r} but no LoRA factors there."
                )
            self.extras.biases[f"{module}.bias"] = self._stored(key, scalings[module])
        return self.extras


def _layouts(wrapper: ParamWrapperFiles, shape: tuple[int, ...]) -> list[tuple[bool, bool]]:
    """Every `(transpose, stacked)` in which a base tensor of `shape` fits the wrapper's factors."""
    (rows_a, in_a), (out_b, cols_b) = wrapper.shapes[0][:2], wrapper.shapes[1][:2]
    if len(shape) == 2:
        return [(False, False)] if rows_a == wrapper.rank and shape == (out_b, in_a) else []
    if len(shape) != 3 or rows_a != wrapper.rank * shape[0] or cols_b != rows_a:
        return []
    return [
        (transpose, True) for transpose, dims in ((False, (out_b, in_a)), (True, (in_a, out_b))) if shape[1:] == dims
    ]


def resolve_param_wrappers(
    wrappers: list[ParamWrapperFiles],
    config: Any,
    shapes: Mapping[str, tuple[int, ...]],
    compute_dtype: torch.dtype,
    stored_slices: Callable[[], Mapping[str, list[Any]]] = dict,
) -> dict[str, ExpertFactors]:
    """The base tensor each `ParamWrapper`'s factors update, as `ExpertFactors` keyed by that tensor; for a checkpoint
    storing the experts one by one, one entry per stored tensor (`stored_slices`: `expert_layout`'s map, computed
    only when needed).

    Raises:
        `MergeInputError`: When no base tensor, or more than one, fits the factors.
    """
    result: dict[str, ExpertFactors] = {}
    for wrapper in wrappers:
        candidates = [
            key
            for key in shapes
            if key.rpartition(".")[0] == wrapper.module
            and any(_matches(entry, key) for entry in config.target_parameters or [])
            and key not in result
        ]
        if not candidates and _per_expert(wrapper, config, shapes, stored_slices(), compute_dtype, result):
            continue
        if not candidates:
            raise MergeInputError(
                f"Adapter {wrapper.adapter!r} has LoRA on parameters of {wrapper.module!r} (target_parameters="
                f"{list(config.target_parameters)}) but the base checkpoint has no such tensor, and transformers' "
                "conversion mapping for this architecture does not say which stored tensors make it up (in a form "
                "this merge understands: experts stacked, projections concatenated along the rows). Merge in memory "
                "with save_merged (base loaded with transformers, adapter with PEFT), or pass a checkpoint that "
                "stores the fused tensors (as save_merged writes them)."
            )
        fitting = [(key, layout) for key in candidates for layout in _layouts(wrapper, shapes[key])]
        if len(fitting) != 1:
            raise MergeInputError(
                f"Adapter {wrapper.adapter!r}: the LoRA factors {wrapper.keys[0]!r} (target_parameters) fit "
                f"{len(fitting)} base tensors of {wrapper.module!r} ({[k for k, _ in fitting][:4]}) by shape; cannot "
                "tell which parameter they update (or whether it is stored in x out). Load the model with PEFT and "
                "use save_merged, which reads the parameter from the model."
            )
        key, (transpose, stacked) = fitting[0]
        experts = shapes[key][0] if stacked else 1
        key_a = wrapper.keys[0]

        def read(wrapper: ParamWrapperFiles = wrapper, experts: int = experts) -> list:
            a, b = (wrapper.reader(key) for key in wrapper.keys)
            return expert_deltas(a, b, experts, wrapper.scaling, compute_dtype)

        result[key] = ExpertFactors(f"{wrapper.adapter}:{key_a}", read, transpose, stacked)
    return result


def _per_expert(
    wrapper: ParamWrapperFiles,
    config: Any,
    shapes: Mapping[str, tuple[int, ...]],
    slices: Mapping[str, list[Any]],
    compute_dtype: torch.dtype,
    result: dict[str, ExpertFactors],
) -> bool:
    """Add the wrapper's per-expert row slices, for a checkpoint storing the experts one by one; `False` if none
    fits."""
    fused = [
        key
        for key in slices
        if key.rpartition(".")[0] == wrapper.module
        and any(_matches(entry, key) for entry in config.target_parameters or [])
    ]
    fitting = []
    for key in fused:
        parts = slices[key]
        experts = len({part.expert for part in parts})
        rows = sum(part.rows for part in parts if part.expert == parts[0].expert)
        shape = (experts, rows, shapes[parts[0].key][1])
        fitting += [(key, layout) for layout in _layouts(wrapper, shape) if layout == (False, True)]
    if len(fitting) != 1:
        return False
    chosen = slices[fitting[0][0]]
    experts = len({part.expert for part in chosen})
    cache: dict[str, list] = {}  # the wrapper's factors are read once for all its stored tensors

    def deltas() -> list:
        if "all" not in cache:
            a, b = (wrapper.reader(key) for key in wrapper.keys)
            cache["all"] = expert_deltas(a, b, experts, wrapper.scaling, compute_dtype)
        return cache["all"]

    for part in chosen:

        def read(part: Any = part) -> list:
            whole = deltas()[part.expert]
            return [LowRankDelta(whole.B[part.start : part.start + part.rows], whole.A)]

        result[part.key] = ExpertFactors(f"{wrapper.adapter}:{wrapper.keys[0]}:{part.key}", read, False, False)
    return True


def checkpoint_edits(
    adapters: list[Any],
    request: Any,
    shapes: Mapping[str, tuple[int, ...]],
    tied: Mapping[str, str],
    compute_dtype: torch.dtype,
    base_config: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The combined edits of adapters read from folders, against a base checkpoint's tensor `shapes`.

    LoRA on parameters is resolved to its tensor here; trained rows of a tied input embedding also apply to the output
    embedding tied to it (PEFT ties the two token adapters), so the pair keeps its tie.

    Args:
        adapters (`list[AdapterFiles]`): The adapters, in request order.
        request (`MergeRequest`): The resolved request.
        shapes (`Mapping[str, tuple[int, ...]]`): Base tensor key -> shape.
        tied (`Mapping[str, str]`): The base's tied weights, `{target: source}`.
        compute_dtype (`torch.dtype`): The dtype expert factors are read in.
        base_config (`Mapping`, *optional*): The base's `config.json`, to find experts stored one by one.

    Returns:
        `dict[str, TensorEdit]`: Base tensor key -> its edit.
    """
    from functools import cache

    from ..engine.features import combine_extras
    from .expert_layout import stored_expert_slices

    slices = cache(lambda: stored_expert_slices(base_config or {}, shapes))
    extras = {}
    for adapter in adapters:
        found = adapter.extras
        if found is None:
            continue
        if adapter.param_wrappers:
            found.experts.update(
                resolve_param_wrappers(adapter.param_wrappers, adapter.config, shapes, compute_dtype, slices)
            )
        for target, source in tied.items():
            if source in found.rows and target not in found.rows:
                found.rows[target] = found.rows[source]
        extras[adapter.name] = found
    return combine_extras(request.method, request.adapters, request.weights, extras)
