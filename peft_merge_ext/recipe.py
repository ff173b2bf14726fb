"""YAML merge recipes: a merge written down so it can be reviewed, shared and rerun with `peft-merge-ext run`.

```yaml
base: org/base-model            # Hub id (already in the HF cache) or local folder
adapters:
  - path: org/adapter-a         # Hub id or local folder
    weight: 0.6
  - path: ./adapter-b
    weight: 0.4
method: slerp                   # any registered type; omit for a single adapter
options: {t: [0.2, 0.8]}        # the method's options
svd_rank: null
dtype: bfloat16                 # optional
merge_into_base: true
output: ./merged
push: {repo_id: user/name, private: false}   # optional
```

Relative local paths are looked up next to the recipe file first, then from the working directory. The model card of
every merged model embeds the recipe that reproduces it (`recipe_from_merge_info`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import MergeInputError

__all__ = ["AdapterEntry", "PushTarget", "Recipe", "load_recipe", "recipe_from_merge_info", "run_recipe"]

_FIELDS = ("base", "adapters", "method", "options", "svd_rank", "dtype", "merge_into_base", "output", "push")
UNKNOWN_BASE = "PATH/TO/BASE-MODEL"


class RecipeError(MergeInputError):
    """A recipe field is missing or invalid; the message names the field."""


@dataclass
class AdapterEntry:
    """One adapter of a recipe: a Hub id or local folder and its weight."""

    path: str
    weight: float = 1.0


@dataclass
class PushTarget:
    """Where to upload the result."""

    repo_id: str
    private: bool = False


@dataclass
class Recipe:
    """A merge recipe (see the module docstring for the YAML form).

    Args:
        base (`str`): The base model: Hub id or local folder.
        adapters (`list[AdapterEntry]`): The adapters and their weights.
        method (`str`, *optional*): The combination type; `None` for a single adapter merged as is.
        options (`dict`): The method's options.
        svd_rank (`int`, *optional*): Rank bound of the merged delta per module.
        dtype (`str`, *optional*): Output dtype (`bfloat16`, `float16`, `float32`).
        merge_into_base (`bool`, *optional*, defaults to `True`): Write a merged full model.
        output (`str`, *optional*, defaults to `"./merged"`): Output folder.
        push (`PushTarget`, *optional*): Upload target.
        source_dir (`Path`, *optional*): The folder of the recipe file, used to resolve relative paths.
    """

    base: str
    adapters: list[AdapterEntry]
    method: str | None = None
    options: dict[str, Any] = field(default_factory=dict)
    svd_rank: int | None = None
    dtype: str | None = None
    merge_into_base: bool = True
    output: str = "./merged"
    push: PushTarget | None = None
    source_dir: Path | None = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        """The recipe as plain data, in the documented field order (`push` left out when unset)."""
        data: dict[str, Any] = {
            "base": self.base,
            "adapters": [{"path": a.path, "weight": a.weight} for a in self.adapters],
            "method": self.method,
            "options": dict(self.options),
            "svd_rank": self.svd_rank,
            "dtype": self.dtype,
            "merge_into_base": self.merge_into_base,
            "output": self.output,
        }
        if self.push is not None:
            data["push"] = {"repo_id": self.push.repo_id, "private": self.push.private}
        return data

    def to_yaml(self) -> str:
        """The recipe as YAML that `load_recipe` reads back to an equal `Recipe`."""
        import yaml

        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=None)

    def resolve_path(self, path: str) -> str:
        """A relative local path looked up next to the recipe file first; anything else unchanged."""
        if self.source_dir is not None and not Path(path).is_absolute():
            candidate = self.source_dir / path
            if candidate.exists():
                return str(candidate)
        return path


def _fail(field_name: str, problem: str) -> RecipeError:
    return RecipeError(f"Recipe field {field_name!r} {problem}")


def _string(value: Any, field_name: str, optional: bool = False) -> str | None:
    if value is None and optional:
        return None
    if not isinstance(value, str) or not value.strip():
        raise _fail(field_name, f"must be a non-empty string, got {value!r}.")
    return value


def _number(value: Any, field_name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _fail(field_name, f"must be a finite number, got {value!r}.")
    return float(value)


def _parse(data: Any, source_dir: Path | None) -> Recipe:
    if not isinstance(data, dict):
        raise RecipeError(f"A recipe must be a YAML mapping with the fields {', '.join(_FIELDS)}; got {data!r}.")
    unknown = sorted(set(data) - set(_FIELDS))
    if unknown:
        raise _fail(unknown[0], f"is not a recipe field; the fields are: {', '.join(_FIELDS)}.")
    if "base" not in data:
        raise _fail("base", "is required (a Hub id or a local folder).")
    base = _string(data["base"], "base")
    adapters_data = data.get("adapters")
    if not isinstance(adapters_data, list) or not adapters_data:
        raise _fail("adapters", f"must be a non-empty list of {{path, weight}} entries, got {adapters_data!r}.")
    adapters = []
    for position, entry in enumerate(adapters_data):
        where = f"adapters[{position}]"
        if isinstance(entry, str):
            entry = {"path": entry}
        if not isinstance(entry, dict):
            raise _fail(where, f"must be a mapping with 'path' and 'weight', got {entry!r}.")
        extra = sorted(set(entry) - {"path", "weight"})
        if extra:
            raise _fail(f"{where}.{extra[0]}", "is not an adapter field; use 'path' and 'weight'.")
        path = _string(entry.get("path"), f"{where}.path")
        weight = _number(entry.get("weight", 1.0), f"{where}.weight")
        adapters.append(AdapterEntry(path, weight))
    method = _string(data.get("method"), "method", optional=True)
    options = data.get("options") or {}
    if not isinstance(options, dict):
        raise _fail("options", f"must be a mapping of the method's options, got {options!r}.")
    if options and method is None:
        raise _fail("options", "needs a 'method' to apply to.")
    svd_rank = data.get("svd_rank")
    if svd_rank is not None and (isinstance(svd_rank, bool) or not isinstance(svd_rank, int) or svd_rank < 1):
        raise _fail("svd_rank", f"must be a positive integer or null, got {svd_rank!r}.")
    dtype = _string(data.get("dtype"), "dtype", optional=True)
    if dtype is not None:
        from .publish.merge_checkpoint import parse_dtype

        try:
            parse_dtype(dtype)
        except MergeInputError as error:
            raise _fail("dtype", str(error)) from None
    merge_into_base = data.get("merge_into_base", True)
    if not isinstance(merge_into_base, bool):
        raise _fail("merge_into_base", f"must be true or false, got {merge_into_base!r}.")
    output = _string(data.get("output", "./merged"), "output")
    push = data.get("push")
    if push is not None:
        if isinstance(push, str):
            push = {"repo_id": push}
        if not isinstance(push, dict):
            raise _fail("push", f"must be a mapping {{repo_id, private}}, got {push!r}.")
        extra = sorted(set(push) - {"repo_id", "private"})
        if extra:
            raise _fail(f"push.{extra[0]}", "is not a push field; use 'repo_id' and 'private'.")
        private = push.get("private", False)
        if not isinstance(private, bool):
            raise _fail("push.private", f"must be true or false, got {private!r}.")
        push = PushTarget(_string(push.get("repo_id"), "push.repo_id"), private)
    if len(adapters) > 1 and method is None:
        raise _fail("method", f"is required to combine {len(adapters)} adapters (e.g. weighted, average, slerp).")
    return Recipe(base, adapters, method, dict(options), svd_rank, dtype, merge_into_base, output, push, source_dir)


def load_recipe(path_or_text: str | Path) -> Recipe:
    """Read a recipe from a YAML file or from YAML text.

    Raises:
        `RecipeError` (a `MergeInputError`): For invalid YAML or any invalid field; the message names the field.
    """
    import yaml

    source_dir = None
    text = str(path_or_text)
    path = Path(text).expanduser()
    is_file = isinstance(path_or_text, Path) or ("\n" not in text and text.endswith((".yaml", ".yml")))
    if is_file:
        if not path.is_file():
            raise RecipeError(f"Recipe file {text} does not exist.")
        text = path.read_text()
        source_dir = path.absolute().parent
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise RecipeError(f"The recipe is not valid YAML: {' '.join(str(error).split())}") from None
    return _parse(data, source_dir)


def recipe_from_merge_info(info: Any, output: str = "./merged") -> Recipe:
    """The recipe that reproduces a merge described by a `MergeInfo`.

    Adapters are named by their Hub id or folder name (never a full local path). A base known only as a local folder
    is written as `PATH/TO/BASE-MODEL`: replace it before running.
    """
    adapters = [AdapterEntry(a.source or a.name, float(a.weight)) for a in info.adapters]
    return Recipe(
        base=info.base_model or UNKNOWN_BASE,
        adapters=adapters,
        method=info.combination_type,
        options=dict(info.options or {}),
        svd_rank=info.svd_rank,
        dtype=info.dtype,
        merge_into_base=bool(info.merge_into_base),
        output=output,
    )


def run_recipe(recipe: Recipe, *, dry_run: bool = False, quiet: bool = False, overwrite: bool = False) -> Any:
    """Run a recipe with `merge_checkpoint` (or describe it with `dry_run=True`).

    Returns:
        `CheckpointMergeResult` or, with `dry_run`, the `MergePlan`.
    """
    from .publish.merge_checkpoint import merge_checkpoint, plan_checkpoint_merge

    if not recipe.merge_into_base:
        raise _fail(
            "merge_into_base",
            "false (write a combined adapter) runs in memory: load the adapters with PEFT and call "
            "add_weighted_adapter; `run` writes merged models (merge_into_base: true).",
        )
    if recipe.base == UNKNOWN_BASE:
        raise _fail("base", f"is still the placeholder {UNKNOWN_BASE}; set it to the base model's folder or Hub id.")
    base = recipe.resolve_path(recipe.base)
    paths = [recipe.resolve_path(a.path) for a in recipe.adapters]
    weights = [a.weight for a in recipe.adapters]
    if dry_run:
        return plan_checkpoint_merge(
            base,
            paths,
            combination_type=recipe.method,
            weights=weights,
            dtype=recipe.dtype,
            svd_rank=recipe.svd_rank,
            strict=False,
            **recipe.options,
        )
    return merge_checkpoint(
        base,
        paths,
        out=recipe.output,
        combination_type=recipe.method,
        weights=weights,
        dtype=recipe.dtype,
        svd_rank=recipe.svd_rank,
        push_to=recipe.push.repo_id if recipe.push else None,
        private=recipe.push.private if recipe.push else None,
        quiet=quiet,
        overwrite=overwrite,
        **recipe.options,
    )
