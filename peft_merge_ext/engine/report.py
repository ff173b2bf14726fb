"""The merge report: what a combination did, module by module, ready for a model card."""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["MergeReport", "ModuleReport"]


@dataclass
class ModuleReport:
    """Statistics of one module: at least `rank` (output rank) and, for truncations, `energy_kept`."""

    name: str
    layer_index: int | None
    stats: dict[str, Any] = field(default_factory=dict)


@dataclass
class MergeReport:
    """What a combination did.

    Args:
        combination_type (`str`): The type used.
        adapters (`list[str]`): The input adapters, in order.
        weights (`list[float]`): Their weights.
        options (`dict`): The type's options after defaults were applied.
        svd_rank (`int`, *optional*): The output rank bound asked for.
        provider (`str`): The plugin (and distribution) that provided the type.
        seconds (`float`): Wall time of the factor computation.
        modules (`list[ModuleReport]`): One entry per module, in model order.
    """

    combination_type: str
    adapters: list[str]
    weights: list[float]
    options: dict[str, Any]
    svd_rank: int | None
    provider: str
    seconds: float
    modules: list[ModuleReport] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serializable dict."""
        return asdict(self)

    def summary(self) -> dict[str, Any]:
        """Aggregates over modules: count, rank range, lowest energy kept and, per numeric statistic, min/mean/max."""
        numeric: dict[str, list[float]] = {}
        for module in self.modules:
            for key, value in module.stats.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    numeric.setdefault(key, []).append(float(value))
        result: dict[str, Any] = {"modules": len(self.modules)}
        for key, values in sorted(numeric.items()):
            result[key] = {"min": min(values), "mean": statistics.fmean(values), "max": max(values)}
        return result

    def to_markdown(self, max_rows: int = 20) -> str:
        """A markdown table of the per-module statistics (the first `max_rows` modules) and the summary."""
        keys = sorted({key for module in self.modules for key in module.stats})
        lines = ["| module | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
        for module in self.modules[:max_rows]:
            cells = [_format(module.stats.get(key)) for key in keys]
            lines.append(f"| `{module.name}` | " + " | ".join(cells) + " |")
        if len(self.modules) > max_rows:
            lines.append(f"| ... {len(self.modules) - max_rows} more | " + " | ".join("" for _ in keys) + " |")
        return "\n".join(lines)


def _format(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)
