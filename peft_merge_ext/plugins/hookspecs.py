"""Hook specifications of peft-merge-ext.

Plugins implement these hooks with the `hookimpl` marker re-exported by the package:

```python
import peft_merge_ext


@peft_merge_ext.hookimpl
def register_combination_types(register):
    register("my_type", my_function, description="One line.", options={"alpha": 0.5})
```
"""

from __future__ import annotations

from typing import Any

import pluggy

PROJECT_NAME = "peft_merge_ext"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


@hookspec
def register_combination_types(register: Any) -> None:
    """Register new combination types by calling `register(name, function, description, options, validate)`.

    :param register: callback taking the type's name (lowercase snake_case, not one of PEFT's), its combination
        function `function(deltas, weights, context, **options)` (see `peft_merge_ext.plugins.contract`), a one-line
        description, the mapping of the options it accepts to their defaults, and an optional
        `validate(weights, options)` run before anything is modified; see `peft_merge_ext.plugins.registry.Register`.
    """


@hookspec
def extend_model_card(card: Any, merge_info: Any) -> None:
    """Add sections to a generated model card before it is written.

    :param card: the `huggingface_hub.ModelCard` being generated; append to `card.text` or edit `card.data`.
    :param merge_info: the `MergeInfo` describing the merge (adapters, weights, method, options, report).
    """
