"""The request resolver: every entry point turns its arguments into one validated `MergeRequest` here.

One place decides the default method (one adapter: merged as it is; several: `weighted`), the default weights (1.0
each), the options (the type's declared options only), the one error for an unknown combination type, and whether
the adapters can be represented by the combination contract. Nothing is computed or modified before this succeeds.
"""

from __future__ import annotations

import difflib
import math
from collections import Counter
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..errors import (
    AdapterCompatibilityError,
    CombinationError,
    MergeInputError,
    UnknownCombinationTypeError,
    short_repr,
)

__all__ = [
    "PEFT_ONLY_ARGUMENTS",
    "MergeRequest",
    "check_adapter_configs",
    "check_weights",
    "resolve_request",
    "short_repr",
    "unknown_type_error",
]

# PEFT keyword arguments that only PEFT's own types use, with their defaults.
PEFT_ONLY_ARGUMENTS = {
    "svd_clamp": None,
    "svd_full_matrices": True,
    "svd_driver": None,
    "density": None,
    "majority_sign_method": "total",
}


@dataclass
class MergeRequest:
    """A validated merge request.

    Args:
        adapters (`list[str]`): The input adapters, in order.
        weights (`list[float]`): One finite weight per adapter.
        method (`str`, *optional*): The combination type; `None` when one adapter is merged as it is.
        options (`dict`): The type's options with defaults filled in (PEFT's own arguments for PEFT's types).
        svd_rank (`int`, *optional*): Upper bound on the merged rank per module.
        combination (`CombinationType`, *optional*): The registered plugin type, `None` for as-is and PEFT's types.
        svd_energy (`float`, *optional*): Keep per module the smallest rank holding this fraction of the energy.
        uniform_rank (`tuple[int, ...]`, *optional*): The ranks a combined adapter may be snapped to (one for all
            modules; see `engine.serving`).
    """

    adapters: list[str]
    weights: list[float]
    method: str | None
    options: dict[str, Any] = field(default_factory=dict)
    svd_rank: int | None = None
    combination: Any = None
    svd_energy: float | None = None
    uniform_rank: tuple[int, ...] | None = None

    @property
    def serving_options(self) -> dict[str, Any]:
        """`svd_energy` / `uniform_rank` when set, as the options a recipe or lineage records them."""
        values = {"svd_energy": self.svd_energy, "uniform_rank": self.uniform_rank}
        return {key: list(value) if isinstance(value, tuple) else value for key, value in values.items() if value}

    @property
    def is_peft_type(self) -> bool:
        """Whether the method is one of PEFT's own `add_weighted_adapter` types."""
        from ..plugins.registry import PEFT_COMBINATION_TYPES

        return self.method in PEFT_COMBINATION_TYPES

    @property
    def provider(self) -> str:
        """Who computes the combination: the plugin, `"peft"` or `"peft-merge-ext"` (as-is)."""
        if self.combination is not None:
            return self.combination.provider
        return "peft" if self.is_peft_type else "peft-merge-ext"


def unknown_type_error(name: Any, *, peft_types_allowed: bool = True) -> UnknownCombinationTypeError:
    """The one error for a combination type nobody provides."""
    from ..plugins.registry import PEFT_COMBINATION_TYPES, get_combination_types

    types = sorted(get_combination_types())
    name = name if isinstance(name, str) and len(name) <= 200 else short_repr(name)
    if name in PEFT_COMBINATION_TYPES and not peft_types_allowed:
        return UnknownCombinationTypeError(
            f"combination_type={name!r} is one of PEFT's own types, which run in memory through PEFT's "
            "add_weighted_adapter (load the adapters with PEFT, or run the recipe with `peft-merge-ext run`, which "
            f"does); the streamed merge takes the registered types: {', '.join(types)}. 'weighted' is the exact "
            "equivalent of 'linear'/'cat'."
        )
    return UnknownCombinationTypeError(
        f"Unknown combination_type {name!r}. Registered types: {', '.join(types) or 'none'} (see `peft-merge-ext "
        f"plugins`); PEFT's types: {', '.join(sorted(PEFT_COMBINATION_TYPES))}."
    )


def check_weights(weights: Any, count: int) -> list[float]:
    """Validate the weights of a merge (`None`: 1.0 each) and return them as floats.

    Raises:
        `MergeInputError`: When the weights are not `count` finite numbers.
    """
    if weights is None:
        return [1.0] * count
    if isinstance(weights, (str, bytes)) or not hasattr(weights, "__len__"):
        raise MergeInputError(f"weights must be a list of numbers, one per adapter, got {short_repr(weights)}.")
    if len(weights) != count:
        raise MergeInputError(
            f"Got {len(weights)} weight(s) for {count} adapter(s): pass exactly one weight per adapter."
        )
    result = []
    for weight in weights:
        if isinstance(weight, bool):
            raise MergeInputError(f"weights must be numbers, got a bool ({weight!r}).")
        try:
            value = float(weight)
        except (TypeError, ValueError, OverflowError):
            raise MergeInputError(f"weights must be numbers, got {short_repr(weight)}.") from None
        if not math.isfinite(value):
            raise MergeInputError(f"weights must be finite, got {weight!r}.")
        result.append(value)
    return result


def check_adapter_configs(
    configs: Mapping[str, Any],
    adapters: Sequence[str],
    method: str | None = None,
    weights: Sequence[float] | None = None,
    *,
    merge_into_base: bool = False,
) -> None:
    """Refuse adapters whose config has features the merge cannot represent (`engine.features.check_features`:
    `method`, `weights` and `merge_into_base` decide), or non-finite scaling.

    A LoRA config is recognised by `peft_type == "LORA"` (PEFT's `PeftType` is a `str` enum), which holds for
    `peft.LoraConfig` and for the configs `checkpoint.adapter_files` parses without importing PEFT, and not for
    AdaLoRA and the other PEFT types.
    """
    for adapter in adapters:
        config = configs[adapter]
        if getattr(config, "peft_type", None) != "LORA":
            raise AdapterCompatibilityError(
                f"Adapter {adapter!r} is a {type(config).__name__}, not a plain LoraConfig adapter; only "
                "LoRA adapters can be combined."
            )
        alphas = [getattr(config, "lora_alpha", 1), *(getattr(config, "alpha_pattern", None) or {}).values()]
        for alpha in alphas:
            if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
                raise MergeInputError(
                    f"Adapter {adapter!r} has lora_alpha {short_repr(alpha)} (in lora_alpha or alpha_pattern); it "
                    "must be a finite number. Fix adapter_config.json."
                )
    from .features import check_features

    check_features(configs, adapters, method, list(weights or [1.0] * len(adapters)), merge_into_base)


def resolve_request(
    configs: Mapping[str, Any],
    adapters: Any,
    weights: Any = None,
    method: str | None = None,
    svd_rank: Any = None,
    options: Mapping[str, Any] | None = None,
    *,
    peft_types_allowed: bool = True,
    peft_arguments: Mapping[str, Any] | None = None,
    parameters: tuple[str, Collection[str]] | None = None,
    merge_into_base: bool = False,
) -> MergeRequest:
    """Validate a merge request and fill in its defaults.

    Args:
        configs (`Mapping[str, Any]`): Adapter name -> its LoRA config (`peft.LoraConfig` or a parsed file config).
        adapters (`Sequence[str]`): The adapters to merge.
        weights (`Sequence[float]`, *optional*): One weight per adapter, 1.0 each by default.
        method (`str`, *optional*): A registered type, one of PEFT's, or `None` (one adapter as it is; several
            combined with `weighted`).
        svd_rank (`int`, *optional*): Upper bound on the merged rank per module.
        options (`Mapping`, *optional*): The type's options; `svd_energy` and `uniform_rank` (serving-ready
            adapters, `engine.serving`) are taken out of them here and validated for every type.
        peft_types_allowed (`bool`, *optional*, defaults to `True`): Whether PEFT's own types can run here (they need
            a live PEFT model).
        peft_arguments (`Mapping`, *optional*): PEFT-only keyword arguments given to a plugin type through the
            drop-in `add_weighted_adapter`; passed on as options when the type declares them (`density`,
            `majority_sign_method`), else refused unless they keep PEFT's defaults.
        parameters (`tuple[str, Collection[str]]`, *optional*): The calling function's name and its own parameters,
            when its `**options` catch every other keyword: an option the type does not take that looks like one of
            them is reported as a typo of that parameter (`save_merged(adapter=...)`: "did you mean 'adapters'?").
        merge_into_base (`bool`, *optional*, defaults to `False`): Whether the result is merged into the base, which
            defines more adapter features than a combined adapter does (`engine.features`).

    Raises:
        `MergeInputError`: Unknown adapters, bad weights, unknown options or PEFT-only arguments.
        `UnknownCombinationTypeError`: For a type nobody provides.
        `AdapterCompatibilityError`: For adapters the contract cannot represent.
    """
    from ..plugins.registry import PEFT_COMBINATION_TYPES, get_combination_types

    if isinstance(adapters, str) or not isinstance(adapters, Sequence) or not adapters:
        raise MergeInputError(f"adapters must be a non-empty list of adapter names, got {short_repr(adapters)}.")
    adapters = list(adapters)
    duplicates = [name for name, count in Counter(adapters).items() if count > 1]
    if duplicates:
        raise MergeInputError(
            f"Adapter(s) {short_repr(duplicates)} appear more than once; give each adapter once with its weight."
        )
    missing = [name for name in adapters if name not in configs]
    if missing:
        raise MergeInputError(
            f"Unknown adapter(s) {short_repr(missing)}; the model has: {', '.join(map(repr, configs)) or 'none'}."
        )
    weights = check_weights(weights, len(adapters))
    options = dict(options or {})
    if svd_rank is not None and (isinstance(svd_rank, bool) or not isinstance(svd_rank, int) or svd_rank < 1):
        raise MergeInputError(f"svd_rank must be a positive integer or None, got {short_repr(svd_rank)}.")
    from .serving import pop_serving_options

    svd_energy, uniform_rank = pop_serving_options(options, svd_rank)
    serving = {"svd_energy": svd_energy, "uniform_rank": uniform_rank}
    if method is None:
        if len(adapters) == 1:
            _check_typos(options, (), parameters)
            if options or svd_rank is not None or svd_energy is not None or uniform_rank is not None:
                given = sorted(options) + (["svd_rank"] if svd_rank is not None else [])
                given += [key for key, value in serving.items() if value is not None]
                raise MergeInputError(
                    f"Options {short_repr(given)} belong to a combination type; pass combination_type= (e.g. "
                    "'weighted') to use them."
                )
            check_adapter_configs(configs, adapters, None, weights, merge_into_base=merge_into_base)
            return MergeRequest(adapters, weights, None)
        method = "weighted"
    if not isinstance(method, str):
        raise unknown_type_error(method, peft_types_allowed=peft_types_allowed)
    types = get_combination_types()
    if method in PEFT_COMBINATION_TYPES:
        if not peft_types_allowed:
            raise unknown_type_error(method, peft_types_allowed=False)
        _check_options(
            options, PEFT_ONLY_ARGUMENTS, f"PEFT's combination_type={method!r} (besides svd_rank)", parameters
        )
        if svd_energy is not None or uniform_rank is not None:
            raise MergeInputError(
                f"svd_energy / uniform_rank apply to the registered combination types, not to PEFT's "
                f"combination_type={method!r}; use 'weighted' (the exact equivalent of 'linear'/'cat') or another "
                "registered type."
            )
        check_adapter_configs(configs, adapters, method, weights, merge_into_base=merge_into_base)
        return MergeRequest(adapters, weights, method, options, svd_rank)
    combination = types.get(method)
    if combination is None:
        raise unknown_type_error(method, peft_types_allowed=peft_types_allowed)
    for name, value in (peft_arguments or {}).items():
        if name in combination.options:  # an argument the type declares with PEFT's meaning (`density`, ...)
            if value != PEFT_ONLY_ARGUMENTS[name]:
                options[name] = value
            continue
        if value != PEFT_ONLY_ARGUMENTS[name]:
            raise MergeInputError(
                f"{name}={value!r} is only used by PEFT's own combination types; combination_type={method!r} does "
                "not take it."
            )
    _check_options(options, combination.options, f"combination_type={method!r}", parameters)
    resolved = combination.resolve_options(options)
    try:
        combination.check_weights(weights, resolved)
    except (MergeInputError, CombinationError):
        raise
    except Exception as error:
        raise CombinationError(
            f"The validate function of combination_type={method!r} (from {combination.provider}) failed: "
            f"{type(error).__name__}: {short_repr(error)}"
        ) from error
    check_adapter_configs(configs, adapters, method, weights, merge_into_base=merge_into_base)
    return MergeRequest(adapters, weights, method, resolved, svd_rank, combination, **serving)


def _check_typos(options: Mapping[str, Any], accepted: Collection[str], parameters: Any) -> None:
    """Refuse an option the type does not take that looks like a parameter of the calling function."""
    if parameters is None:
        return
    function, names = parameters
    for key in options:
        if key in accepted:
            continue
        close = difflib.get_close_matches(str(key), list(names), n=1, cutoff=0.75)
        if close:
            raise MergeInputError(
                f"{function}() got an unexpected argument {short_repr(key)}; did you mean {close[0]!r}?"
            )


def _check_options(options: Mapping[str, Any], accepted: Collection[str], owner: str, parameters: Any) -> None:
    """Refuse options `owner` does not declare, suggesting the closest parameter of the caller or declared option."""
    _check_typos(options, accepted, parameters)
    unknown = sorted(set(options) - set(accepted))
    if not unknown:
        return
    close = difflib.get_close_matches(str(unknown[0]), [str(name) for name in accepted], n=1, cutoff=0.6)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise MergeInputError(
        f"Unknown option(s) {', '.join(short_repr(key) for key in unknown[:5])} for {owner}; it accepts: "
        f"{', '.join(sorted(accepted)) or 'none'}.{hint}"
    )
