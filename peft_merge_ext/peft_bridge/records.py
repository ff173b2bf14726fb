"""Records kept with each adapter: its lineage, its merge report, its content digest and the Hub id it came from.

They live on the adapter's own `LoraConfig` object, outside its dataclass fields: they follow the adapter (deleted
with it, copied with the model) and never reach `adapter_config.json`, which PEFT must keep reading. `persistence`
saves the lineage beside the adapter's files.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "get_hub_id",
    "get_lineage",
    "get_merge_report",
    "get_report",
    "records",
    "set_hub_id",
    "set_lineage",
    "set_report",
]

RECORDS = "_peft_merge_ext_records"


def records(config: Any) -> dict[str, Any]:
    return config.__dict__.setdefault(RECORDS, {})


def set_lineage(config: Any, lineage: Any) -> None:
    """Attach a `Lineage` to an adapter's config."""
    records(config)["lineage"] = lineage


def get_lineage(config: Any) -> Any:
    """The `Lineage` of an adapter's config, `None` when it was not made by a combination."""
    return config.__dict__.get(RECORDS, {}).get("lineage")


def set_report(config: Any, report: Any) -> None:
    """Attach a `MergeReport` to an adapter's config."""
    records(config)["report"] = report


def get_report(config: Any) -> Any:
    """The `MergeReport` of an adapter's config, `None` when there is none."""
    return config.__dict__.get(RECORDS, {}).get("report")


def set_hub_id(config: Any, hub_id: str | None) -> None:
    """Record the Hub repository an adapter was loaded from."""
    records(config)["hub_id"] = hub_id


def get_hub_id(config: Any) -> str | None:
    """The Hub repository an adapter was loaded from, if known."""
    return config.__dict__.get(RECORDS, {}).get("hub_id")


def get_merge_report(model: Any, adapter_name: str) -> Any:
    """The report of the combination that created `adapter_name` on `model` (a `PeftModel` or `LoraModel`).

    Raises:
        `KeyError`: When `adapter_name` was not made by a peft-merge-ext combination type on this model.
    """
    lora_model = getattr(model, "base_model", model)
    configs = getattr(lora_model, "peft_config", {})
    reports = {name: get_report(config) for name, config in configs.items() if get_report(config) is not None}
    if adapter_name not in reports:
        raise KeyError(
            f"No peft-merge-ext report for adapter {adapter_name!r}; reports exist for: {sorted(reports) or 'none'}."
        )
    return reports[adapter_name]
