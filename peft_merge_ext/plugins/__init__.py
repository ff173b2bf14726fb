"""The public plugin API: everything a third-party combination type may import.

```python
from peft_merge_ext.plugins import LowRankDelta, ModuleContext, hookimpl


def my_type(deltas, weights, context, *, strength: float = 1.0):
    ...


@hookimpl
def register_combination_types(register):
    register("my_type", my_type, description="One line.")
```

A combination type's options are its function's keyword parameters with defaults (after `deltas, weights,
context`): declared once, in the signature. Names here are stable; anything else in `peft_merge_ext` (its
subpackages `engine`, `peft_bridge`, `checkpoint`, `publish`, ...) is internal and may change without notice.

| name | what it is |
|---|---|
| `hookimpl`, `hookspec` | pluggy markers of the `peft_merge_ext` project |
| `LowRankDelta`, `ModuleContext` | the combination contract (`peft_merge_ext.plugins.contract`) |
| `MergeInputError`, `CombinationError` | errors a combination function or its `validate` may raise |
| `gram_matrix`, `linear_combination`, `compress`, `FactoredSpan`, `CompressionStats` | exact factor-space maths |

Importing this module is cheap: torch and pluggy are imported when a name needing them is first used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

__all__ = [
    "CombinationError",
    "CompressionStats",
    "FactoredSpan",
    "LowRankDelta",
    "MergeInputError",
    "ModuleContext",
    "compress",
    "gram_matrix",
    "hookimpl",
    "hookspec",
    "linear_combination",
]

_LAZY = {
    "hookimpl": ".hookspecs",
    "hookspec": ".hookspecs",
    "LowRankDelta": ".contract",
    "ModuleContext": ".contract",
    "MergeInputError": "..errors",
    "CombinationError": "..errors",
    "gram_matrix": "..lowrank.factor_math",
    "linear_combination": "..lowrank.factor_math",
    "compress": "..lowrank.factor_math",
    "FactoredSpan": "..lowrank.factor_math",
    "CompressionStats": "..lowrank.factor_math",
}

if TYPE_CHECKING:  # pragma: no cover
    from ..errors import CombinationError, MergeInputError
    from ..lowrank.factor_math import CompressionStats, FactoredSpan, compress, gram_matrix, linear_combination
    from .contract import LowRankDelta, ModuleContext
    from .hookspecs import hookimpl, hookspec


def __getattr__(name: str) -> object:
    module_name = _LAZY.get(name)
    if module_name is None:
        raise AttributeError(f"module 'peft_merge_ext.plugins' has no attribute {name!r}")
    from importlib import import_module

    value = getattr(import_module(module_name, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
