"""Adapter features beyond `B @ A`: which merges define them, and their combined `TensorEdit`s.

PEFT's LoRA adapters can carry DoRA magnitudes (`use_dora`), LoRA biases (`lora_bias`), trained copies of whole
modules (`modules_to_save`), trained embedding rows (`trainable_token_indices`) and LoRA on `nn.Parameter`s
(`target_parameters`, e.g. MoE expert stacks). The rules (`lowrank.tensor_edits` does the arithmetic):

- Merged into the base, one adapter: all of them, as PEFT's `merge_and_unload` (a weight other than 1 scales the
  linear pieces; DoRA needs weight 1).
- Merged into the base, several adapters with `weighted` / `average`: everything but DoRA, by the type's own linear
  rule on the task vectors: `W + sum_i w_i (X_i - W)` for copies and rows (weights normalized for `average`), biases
  and expert deltas summed with the weights. Two adapters replacing the same module are combined by that rule.
- Anything else is refused with the reason: DoRA is not linear in its factors, so it cannot be combined or weighted;
  the other types (slerp, karcher, PEFT's, plugins) are defined on low-rank factors only; a combined adapter
  (`add_weighted_adapter`, `merge_into_base=False`) holds LoRA factors only, so these pieces would be lost.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from ..errors import AdapterCompatibilityError
from ..lowrank.tensor_edits import AdapterExtras, TensorEdit

__all__ = ["LINEAR_TYPES", "adapter_features", "card_notes", "check_features", "combine_extras", "describe_edits"]

LINEAR_TYPES = ("weighted", "average")

_LABELS = {
    "use_dora": "DoRA (use_dora=True)",
    "lora_bias": "lora_bias=True",
    "modules_to_save": "modules_to_save",
    "trainable_token_indices": "trainable_token_indices",
    "target_parameters": "target_parameters",
}


def adapter_features(config: Any) -> list[str]:
    """The config options of `config` that add something beyond `B @ A` (names as in `LoraConfig`)."""
    return [name for name in _LABELS if getattr(config, name, None)]


def check_features(
    configs: Mapping[str, Any],
    adapters: Sequence[str],
    method: str | None,
    weights: Sequence[float],
    merge_into_base: bool,
) -> None:
    """Refuse a merge that cannot represent what the adapters add beyond `B @ A` (see the module docstring).

    Raises:
        `AdapterCompatibilityError`: Naming the adapter, the feature, why, and what to do instead.
    """
    for adapter, weight in zip(adapters, weights, strict=True):
        features = adapter_features(configs[adapter])
        if not features:
            continue
        labels = ", ".join(_LABELS[name] for name in features)
        if not merge_into_base:
            raise AdapterCompatibilityError(
                f"Adapter {adapter!r} has {labels}: a combined adapter (add_weighted_adapter, merge_into_base=False) "
                "holds LoRA factors only, so these would be lost. Merge into the base instead (save_merged / "
                "push_merged / merge_checkpoint / `peft-merge-ext merge`), which merges them exactly."
            )
        if "use_dora" in features and (method is not None or len(adapters) > 1 or weight != 1.0):
            raise AdapterCompatibilityError(
                f"Adapter {adapter!r} uses DoRA: each output feature of W + s*BA is rescaled to a trained magnitude, "
                "which is not linear in the factors, so a DoRA adapter cannot be combined with others or weighted "
                f"(got combination_type={method!r}, weight {weight:g}). Merge it into the base on its own with weight "
                f"1 (save_merged(adapters=[{adapter!r}]) or merge_checkpoint(base, [folder]))."
            )
        if method is not None and method not in LINEAR_TYPES:
            raise AdapterCompatibilityError(
                f"Adapter {adapter!r} has {labels}: dense tensors or biases beyond B @ A, which "
                f"combination_type={method!r} (defined on low-rank factors) cannot combine. Use 'weighted' or "
                "'average' (linear: base + sum of w_i * (trained_i - base)), or merge adapters without them."
            )


def _coefficients(method: str | None, weights: Sequence[float]) -> list[float]:
    if method == "average":
        total = sum(weights)
        return [w / total for w in weights]
    return [float(w) for w in weights]


def combine_extras(
    method: str | None, adapters: Sequence[str], weights: Sequence[float], extras: Mapping[str, AdapterExtras]
) -> dict[str, TensorEdit]:
    """The combined edit of every base tensor the adapters change beyond `B @ A` (request already checked by
    `check_features`).

    Raises:
        `AdapterCompatibilityError`: When one adapter replaces a tensor that another changes in a different way.
    """
    edits: dict[str, TensorEdit] = {}
    kinds: dict[str, set[str]] = {}
    for adapter, coefficient in zip(adapters, _coefficients(method, weights), strict=True):
        found = extras.get(adapter)
        if not found:
            continue
        for key, stored in found.magnitudes.items():
            edits.setdefault(key, TensorEdit(key)).magnitude = stored
            kinds.setdefault(key, set()).add("DoRA")
        for key, stored in found.biases.items():
            edits.setdefault(key, TensorEdit(key)).add.append((coefficient, stored))
            kinds.setdefault(key, set()).add("bias")
        for key, stored in found.copies.items():
            edits.setdefault(key, TensorEdit(key)).copies.append((coefficient, stored))
            kinds.setdefault(key, set()).add("copy")
        for key, (indices, stored) in found.rows.items():
            edits.setdefault(key, TensorEdit(key)).rows.append((coefficient, indices, stored))
            kinds.setdefault(key, set()).add("rows")
        for key, factors in found.experts.items():
            edits.setdefault(key, TensorEdit(key)).experts.append((coefficient, factors))
            kinds.setdefault(key, set()).add("experts")
    for key, found_kinds in kinds.items():
        if len(found_kinds & {"copy", "rows", "experts"}) > 1 or ("experts" in found_kinds and len(found_kinds) > 1):
            raise AdapterCompatibilityError(
                f"The adapters change {key!r} in incompatible ways ({', '.join(sorted(found_kinds))}); merge them "
                "one at a time into separate models."
            )
        layouts = {(f.transpose, f.stacked) for _, f in edits[key].experts}
        if len(layouts) > 1:
            raise AdapterCompatibilityError(f"The adapters disagree on the layout of the expert tensor {key!r}.")
    return edits


def describe_edits(edits: Mapping[str, TensorEdit], untied: Sequence[str] = ()) -> dict[str, Any]:
    """What was merged beyond `B @ A`, for the lineage and the model card (empty when nothing was)."""
    described: dict[str, Any] = {}
    groups = {
        "dora_magnitudes": sorted(k for k, e in edits.items() if e.magnitude is not None),
        "lora_biases": sorted(k for k, e in edits.items() if e.add),
        "replaced_tensors": sorted(k for k, e in edits.items() if e.copies),
        "expert_tensors": sorted(k for k, e in edits.items() if e.experts),
    }
    described.update({name: keys for name, keys in groups.items() if keys})
    rows = {k: sorted({i for _, indices, _ in e.rows for i in indices}) for k, e in edits.items() if e.rows}
    if rows:
        described["replaced_rows"] = rows
    if untied:
        described["untied"] = sorted(set(untied))
    return described


def card_notes(described: Mapping[str, Any]) -> list[str]:
    """Model card sentences for `describe_edits`' result."""
    notes = []

    def names(keys: Sequence[str]) -> str:
        shown = ", ".join(f"`{key}`" for key in list(keys)[:8])
        return shown + (f" and {len(keys) - 8} more" if len(keys) > 8 else "")

    if described.get("dora_magnitudes"):
        notes.append(
            "DoRA: each output feature of `W + s·BA` was rescaled to the adapter's trained magnitude "
            f"(`m / ||W + s·BA||`) in {names(described['dora_magnitudes'])}."
        )
    if described.get("lora_biases"):
        notes.append(f"LoRA biases (`lora_bias`) were added to {names(described['lora_biases'])}.")
    if described.get("replaced_tensors"):
        notes.append(
            "Trained copies (`modules_to_save`) replace the base tensors "
            f"{names(described['replaced_tensors'])} (several adapters: `W + Σ w_i (copy_i − W)`)."
        )
    for key, rows in (described.get("replaced_rows") or {}).items():
        notes.append(f"Trained token rows (`trainable_token_indices`) replace rows {rows[:20]} of `{key}`.")
    if described.get("expert_tensors"):
        notes.append(
            f"LoRA on parameters (`target_parameters`) was merged expert by expert into "
            f"{names(described['expert_tensors'])}."
        )
    return notes
