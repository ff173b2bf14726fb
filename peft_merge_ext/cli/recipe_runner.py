"""Running a recipe (`peft-merge-ext run`): each step with the streamed on-disk pipeline (`merge_checkpoint`), or,
for PEFT's own types, in memory with PEFT itself (`save_merged`), in order, each reading earlier steps' outputs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import MergeInputError
from ..recipe import UNKNOWN_BASE, Recipe, RecipeError, RecipeStep

__all__ = ["run_recipe"]


def _is_peft_type(method: str | None) -> bool:
    from ..plugins.registry import PEFT_COMBINATION_TYPES

    return method in PEFT_COMBINATION_TYPES


def _check_fill_in(recipe: Recipe, step: RecipeStep, paths: list[str], produced: set[str]) -> None:
    for entry, path in zip(step.adapters, paths, strict=True):
        if path in produced or Path(path).exists():
            continue
        from ..checkpoint.side_files import hub_id_of

        if hub_id_of(entry.path) is None:
            raise RecipeError(
                f"Recipe adapter {entry.path!r} is not a folder next to the recipe (looked for {Path(path).name!r} "
                "relative to the recipe file) nor a Hub id; put the adapter folder there (model.save_pretrained) "
                "or write its path."
            )


def _run_in_memory(base: str, paths: list[str], step: RecipeStep, output: str, overwrite: bool, **extra: Any) -> Any:
    from ..peft_bridge.loading import load_peft_model
    from ..publish.save import save_merged

    model, names = load_peft_model(base, paths)
    options = dict(step.options)
    if step.svd_rank is not None:
        options["svd_rank"] = step.svd_rank
    return save_merged(
        model,
        output,
        adapters=names,
        weights=[a.weight for a in step.adapters],
        combination_type=step.method,
        merge_into_base=step.merge_into_base,
        dtype=step.dtype,
        overwrite=overwrite,
        format=step.format,
        gguf_type=step.gguf_type,
        **options,
    )


def run_recipe(
    recipe: Recipe,
    *,
    dry_run: bool = False,
    quiet: bool = False,
    overwrite: bool = False,
    allow_pickle: bool = False,
    device: Any = None,
    token: str | bool | None = None,
    recipe_file: str | Path | None = None,
) -> list[Any]:
    """Run every step of a recipe (or, with `dry_run`, plan the steps whose inputs exist).

    Security switches (`allow_pickle`, `device`, `token`) come from the caller, never from the recipe.

    Returns:
        `list`: Per step, a `CheckpointMergeResult`, the output `Path` (steps PEFT runs in memory) or, with
        `dry_run`, the `MergePlan` (`None` for a step whose inputs a previous step makes).
    """
    from ..publish.merge_checkpoint import merge_checkpoint, plan_checkpoint_merge

    if recipe.base == UNKNOWN_BASE:
        raise RecipeError(
            f"Recipe field 'base' is still the placeholder {UNKNOWN_BASE}; set it to the base model's folder or Hub "
            "id."
        )
    base = recipe.resolve_path(recipe.base)
    inputs = [recipe_file] if recipe_file is not None else []
    produced: set[str] = set()
    results: list[Any] = []
    for index, step in enumerate(recipe.steps):
        last = index == len(recipe.steps) - 1
        paths = [recipe.resolve_path(a.path) for a in step.adapters]
        output = step.output
        if recipe.source_dir is not None and not Path(output).expanduser().is_absolute():
            output = str(recipe.source_dir / output)
        common = {
            "combination_type": step.method,
            "weights": [a.weight for a in step.adapters],
            "dtype": step.dtype,
            "svd_rank": step.svd_rank,
            "allow_pickle": allow_pickle,
            "device": device,
            "merge_into_base": step.merge_into_base,
            **step.options,
        }
        if dry_run:
            if any(path in produced for path in paths) or _is_peft_type(step.method):
                results.append(None)
            else:
                _check_fill_in(recipe, step, paths, produced)
                results.append(plan_checkpoint_merge(base, paths, strict=False, **common))
            produced.add(output)
            continue
        _check_fill_in(recipe, step, paths, produced)
        push = recipe.push if last else None
        if _is_peft_type(step.method):
            if push is not None:
                raise MergeInputError(
                    "A recipe whose last step uses one of PEFT's own types cannot push; run it, then `peft-merge-ext "
                    "upload` the output."
                )
            results.append(_run_in_memory(base, paths, step, output, overwrite))
        else:
            results.append(
                merge_checkpoint(
                    base,
                    paths,
                    out=output,
                    overwrite=overwrite,
                    quiet=quiet,
                    inputs=inputs,
                    push_to=push.repo_id if push else None,
                    private=push.private if push else None,
                    token=token,
                    output_format=step.format,
                    gguf_type=step.gguf_type,
                    **common,
                )
            )
        produced.add(output)
    return results
