"""Measuring merges for `benchmarks/quality.py`: accuracy and loss of a model with one adapter active, uniform-weight
merges of every method, the pairs, and searched vs uniform weights.

A method is any object with `label`, `combination_type`, `svd_rank`, `options` and `uniform(count)` (see
`benchmarks.quality.Method`).
"""

from __future__ import annotations

import itertools
import math
from typing import Any

import torch

__all__ = ["drop", "measure", "merge", "ratio", "score_merges", "score_pairs", "search_rows"]


def measure(model: Any, adapter: str | None, examples: list[dict]) -> tuple[float, float]:
    """(accuracy, loss) of `model` with only `adapter` active (`None`: the base, adapters disabled)."""
    from peft_merge_ext.search.evaluation import compute_metrics

    if adapter is None:
        with model.disable_adapter():
            metrics = compute_metrics(model, examples, batch_size=256)
    else:
        model.base_model.set_adapter(adapter)
        metrics = compute_metrics(model, examples, batch_size=256)
    return metrics.accuracy, metrics.loss


def merge(model: Any, name: str, method: Any, adapters: list[str], weights: list[float]) -> None:
    """Add the merge of `adapters` with `method` as adapter `name`."""
    options = dict(method.options)
    if method.svd_rank is not None:
        options["svd_rank"] = method.svd_rank
    torch.manual_seed(0)  # PEFT's DARE draws
    model.add_weighted_adapter(adapters, weights, name, combination_type=method.combination_type, **options)


def drop(model: Any, name: str, keep_active: str) -> None:
    model.base_model.set_adapter(keep_active)
    model.delete_adapter(name)


def ratio(value: float, reference: float) -> float:
    return value / reference if reference > 0 else math.nan


def score_merges(model, methods, adapters, test, alone, skipped) -> list[dict]:
    """Merge `adapters` with every method (uniform weights) and score the merge on each adapter's task."""
    rows = []
    for method in methods:
        try:
            merge(model, "merged", method, adapters, method.uniform(len(adapters)))
        except Exception as error:  # a plugin type that needs options this generic run cannot guess
            skipped.append({"method": method.label, "setting": f"{len(adapters)}-way", "reason": repr(error)})
            continue
        scores = {task: measure(model, "merged", test[task]) for task in adapters}
        drop(model, "merged", adapters[0])
        rows.append(
            {
                "method": method.label,
                "accuracy": {task: scores[task][0] for task in adapters},
                "loss": {task: scores[task][1] for task in adapters},
                "normalized": {task: ratio(scores[task][0], alone[task]) for task in adapters},
            }
        )
    return rows


def score_pairs(model, methods, tasks, test, alone, skipped) -> list[dict]:
    """Every method on every pair of `tasks`: the normalized accuracy of each pair's two tasks."""
    rows = []
    for method in methods:
        values: dict[str, dict[str, float]] | None = {}
        for pair in itertools.combinations(tasks, 2):
            try:
                merge(model, "pair", method, list(pair), method.uniform(2))
            except Exception as error:
                skipped.append({"method": method.label, "setting": "pairs", "reason": repr(error)})
                values = None
                break
            values["+".join(pair)] = {t: ratio(measure(model, "pair", test[t])[0], alone[t]) for t in pair}
            drop(model, "pair", tasks[0])
        if values:
            rows.append({"method": method.label, "pairs": values})
    return rows


def search_rows(model, methods, tasks, splits, test, alone, settings, seed) -> list[dict]:
    """`search_weights` (search split) vs uniform weights (held-out split) for each of `methods`."""
    from peft_merge_ext.search.weight_search import search_weights

    search_set = [example for task in tasks for example in splits[task].search]
    rows = []
    for method in methods:
        uniform = method.uniform(len(tasks))
        options = dict(method.options)
        if method.svd_rank is not None:
            options["svd_rank"] = method.svd_rank
        result = search_weights(
            model,
            tasks,
            search_set,
            combination_type=method.combination_type,
            budget=settings.search_budget,
            bounds=(0.0, 2.0 * uniform[0]),
            initial_weights=uniform,
            seed=seed,
            adapter_name="searched",
            batch_size=256,
            progress=False,
            **options,
        )
        merge(model, "uniform", method, tasks, uniform)
        row = {
            "method": method.label,
            "optimizer": result.optimizer,
            "trials": len(result.history),
            "weights": list(result.weights),
            "uniform_weights": uniform,
            "search_loss": {"uniform": result.initial_value, "searched": result.value},
        }
        for label in ("uniform", "searched"):
            scores = {task: measure(model, label, test[task]) for task in tasks}
            row[label] = {
                "normalized": {task: ratio(scores[task][0], alone[task]) for task in tasks},
                "loss_mean": sum(s[1] for s in scores.values()) / len(tasks),
            }
        drop(model, "uniform", tasks[0])
        drop(model, "searched", tasks[0])
        rows.append(row)
    return rows
