"""Parsing a saved `adapter_config.json` without importing PEFT, and resolving its per-module patterns.

`LoraAdapterConfig` holds the fields a merge needs, type-checked; `pattern_value` resolves `rank_pattern` /
`alpha_pattern` keys with PEFT's documented rules, in bounded time (a key such as `(a+)+b` against a crafted module
name would otherwise backtrack for hours); `load_config` refuses configs of other PEFT types and LoRA variants whose
update is not `B @ A`.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..engine.request import short_repr
from ..errors import AdapterCompatibilityError, MergeInputError

__all__ = [
    "ADAPTER_CONFIG_NAME",
    "PATTERN_BUDGET_S",
    "LoraAdapterConfig",
    "check_config",
    "load_config",
    "pattern_value",
]

ADAPTER_CONFIG_NAME = "adapter_config.json"
PATTERN_BUDGET_S = 2.0  # seconds all the rank_pattern / alpha_pattern matching of one adapter may take


# PEFT's LoRA variants whose update is not `B @ A` (the `LoraConfig` fields with `is_lora_variant` metadata, and the
# `init_lora_weights` values or prefixes listed in that field's `lora_variants` metadata); a test checks these against
# the installed PEFT.
LORA_VARIANT_FIELDS = (
    "use_dora",
    "velora_config",
    "alora_invocation_tokens",
    "monteclora_config",
    "use_bdlora",
    "arrow_config",
    "kasa_config",
)
INIT_LORA_VARIANTS = ("mica",)


@dataclass
class LoraAdapterConfig:
    """The fields of a saved `adapter_config.json` a merge needs, parsed without importing PEFT (importing it also
    imports transformers and bitsandbytes: seconds of start-up and over 100 MB of memory).

    Defaults are `peft.LoraConfig`'s. `peft_type` is `"LORA"`, so `combine.check_adapter_configs` treats it like a
    loaded `LoraConfig`; the other fields it checks are read with `getattr` from `raw`.

    Args:
        peft_type (`str`): `"LORA"` (other types are refused while parsing).
        r (`int`): The default rank.
        lora_alpha (`float`): The default alpha.
        use_rslora (`bool`): Scaling `alpha / sqrt(r)` instead of `alpha / r`.
        fan_in_fan_out (`bool`): Whether the targeted weights are stored `in x out` (GPT-2 `Conv1D`).
        rank_pattern (`dict[str, int]`): Per-module ranks, keys matched as by `pattern_value`.
        alpha_pattern (`dict[str, float]`): Per-module alphas.
        target_modules (`list[str]` or `str`, *optional*): As saved.
        base_model_name_or_path (`str`, *optional*): The base model the adapter was trained on.
        auto_mapping (`dict`, *optional*): PEFT's record of the model class.
        init_lora_weights (`bool` or `str`): As saved.
        raw (`dict[str, Any]`): The whole parsed JSON.
    """

    peft_type: str = "LORA"
    r: int = 8
    lora_alpha: float = 8
    use_rslora: bool = False
    fan_in_fan_out: bool = False
    rank_pattern: dict[str, Any] = field(default_factory=dict)
    alpha_pattern: dict[str, Any] = field(default_factory=dict)
    target_modules: Any = None
    base_model_name_or_path: str | None = None
    auto_mapping: dict[str, Any] | None = None
    init_lora_weights: Any = True
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    def __getattr__(self, name: str) -> Any:
        # Only called for names that are not fields: the other saved settings (use_dora, lora_bias,
        # modules_to_save, ...), `None` when absent.
        if name.startswith("__"):
            raise AttributeError(name)
        return self.__dict__.get("raw", {}).get(name)

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str) -> LoraAdapterConfig:
        """Parse and type-check the saved configuration.

        Raises:
            `MergeInputError`: When a field has the wrong type.
        """
        defaults = cls()
        values: dict[str, Any] = {}
        for name in (
            "r",
            "lora_alpha",
            "use_rslora",
            "fan_in_fan_out",
            "rank_pattern",
            "alpha_pattern",
            "target_modules",
            "base_model_name_or_path",
            "auto_mapping",
            "init_lora_weights",
        ):
            value = raw.get(name)
            values[name] = getattr(defaults, name) if value is None else value
        number = (int, float)
        auto_mapping = values["auto_mapping"]
        checks = {
            "r": isinstance(values["r"], int) and not isinstance(values["r"], bool) and values["r"] > 0,
            "lora_alpha": isinstance(values["lora_alpha"], number) and not isinstance(values["lora_alpha"], bool),
            "use_rslora": isinstance(values["use_rslora"], bool),
            "fan_in_fan_out": isinstance(values["fan_in_fan_out"], bool),
            "rank_pattern": isinstance(values["rank_pattern"], dict)
            and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in values["rank_pattern"].values()),
            "alpha_pattern": isinstance(values["alpha_pattern"], dict)
            and all(isinstance(v, number) and not isinstance(v, bool) for v in values["alpha_pattern"].values()),
            "auto_mapping": auto_mapping is None
            or (isinstance(auto_mapping, dict) and isinstance(auto_mapping.get("base_model_class", ""), str)),
            "base_model_name_or_path": isinstance(values["base_model_name_or_path"], (str, type(None))),
        }
        wrong = [name for name, ok in checks.items() if not ok]
        if wrong:
            raise MergeInputError(
                f"Could not parse the {ADAPTER_CONFIG_NAME} of {short_repr(source)}: {wrong[0]}="
                f"{short_repr(values[wrong[0]])} is not valid (r and rank_pattern values: positive integers; "
                "lora_alpha and alpha_pattern values: numbers; use_rslora and fan_in_fan_out: booleans; auto_mapping: "
                "an object whose base_model_class is a string; base_model_name_or_path: a string)."
            )
        for name in ("rank_pattern", "alpha_pattern"):
            for key in values[name]:
                _check_pattern_key(key, name, source)
        return cls(peft_type="LORA", raw=dict(raw), **values)


def _check_pattern_key(key: str, field_name: str, source: str) -> None:
    """Refuse a `rank_pattern` / `alpha_pattern` key that is not a regular expression PEFT can use.

    Raises:
        `MergeInputError`: Naming the key, the field and the adapter.
    """
    try:
        re.compile(rf"(.*\.)?({key})$")
    except (re.error, RecursionError, OverflowError) as error:
        raise MergeInputError(
            f"Could not parse the {ADAPTER_CONFIG_NAME} of {short_repr(source)}: the {field_name} key "
            f"{short_repr(key)} is not a valid regular expression ({error}); fix or remove it."
        ) from None


def pattern_value(pattern: dict[str, Any], module: str, default: Any, deadline: float | None = None) -> Any:
    """The value of the first key of `pattern` (in its order) that matches `module`, else `default`.

    A key is a regular expression that matches when it matches the whole module name or its end after a dot (`"q_proj"`
    matches `"model.layers.0.self_attn.q_proj"`, `"layers.0.self_attn.q_proj"` only layer 0's): PEFT's rule for
    `rank_pattern` / `alpha_pattern` (`peft.utils.other.get_pattern_key`).

    Matching takes bounded time: it runs with the `regex` engine (installed with transformers; it reads Python's
    regular expressions the same way), which stops at `deadline`, so a key with nested repeats such as `(a+)+b`
    cannot hang on a crafted module name.

    Args:
        pattern (`dict[str, Any]`): Regular expression -> value.
        module (`str`): The module name.
        default (`Any`): The value when no key matches.
        deadline (`float`, *optional*): `time.monotonic()` time by which matching must end; `PATTERN_BUDGET_S`
            from now by default.

    Raises:
        `MergeInputError`: When matching a key does not finish by the deadline (naming the key and the module).
    """
    if deadline is None:
        deadline = time.monotonic() + PATTERN_BUDGET_S
    for key in pattern:
        if _key_matches(key, module, deadline):
            return pattern[key]
    return default


def _key_matches(key: str, module: str, deadline: float) -> bool:
    expression = rf"(.*\.)?({key})$"
    try:
        import regex
    except ImportError:  # pragma: no cover - regex is a dependency of transformers
        return re.match(expression, module) is not None
    try:
        compiled = regex.compile(expression, flags=regex.VERSION0)
    except regex.error:  # pragma: no cover - a key only Python's own engine reads
        return re.match(expression, module) is not None
    try:
        return compiled.match(module, timeout=max(deadline - time.monotonic(), 1e-3)) is not None
    except TimeoutError:
        raise MergeInputError(
            f"The rank_pattern / alpha_pattern key {short_repr(key)} takes too long to match module "
            f"{short_repr(module)} (a regular expression with nested or ambiguous repeats, such as (a+)+b); "
            "simplify the key in adapter_config.json."
        ) from None


def load_config(folder: Path, source: str) -> LoraAdapterConfig:
    config_path = folder / ADAPTER_CONFIG_NAME
    if not config_path.is_file():
        raise MergeInputError(
            f"{source!r} has no {ADAPTER_CONFIG_NAME}; pass the folder written by PEFT's save_pretrained (for a "
            "non-default adapter name PEFT writes it in a subfolder named after the adapter)."
        )
    try:
        raw = json.loads(config_path.read_text())
    except json.JSONDecodeError as error:
        raise MergeInputError(f"{config_path} is not valid JSON: {error}.") from None
    if not isinstance(raw, dict):
        raise MergeInputError(f"{config_path} is not a JSON object.")
    peft_type = str(raw.get("peft_type", "")).upper()
    if peft_type != "LORA":
        raise AdapterCompatibilityError(
            f"Adapter {source!r} is a {raw.get('peft_type')!r} adapter; only LoRA adapters (peft_type 'LORA') can be "
            "merged."
        )
    return LoraAdapterConfig.from_dict(raw, source)


def check_config(config: LoraAdapterConfig, name: str) -> None:
    from ..engine.request import check_adapter_configs

    check_adapter_configs({name: config}, [name], merge_into_base=True)  # features: checked per request
    for variant in LORA_VARIANT_FIELDS:
        if variant != "use_dora" and getattr(config, variant, None):  # DoRA: `engine.features` decides
            raise AdapterCompatibilityError(
                f"Adapter {name!r} uses the LoRA variant {variant}={getattr(config, variant)!r}: its update is not "
                "B @ A and cannot be merged exactly from its factors."
            )
    init = config.init_lora_weights
    if isinstance(init, str) and init.startswith(INIT_LORA_VARIANTS):
        raise AdapterCompatibilityError(
            f"Adapter {name!r} uses the LoRA variant init_lora_weights={init!r}, whose update is not B @ A; it cannot "
            "be merged exactly from its factors."
        )
