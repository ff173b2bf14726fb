"""The optimizers of `search_weights`: optuna's TPE sampler, or a small built-in gradient-free search.

Each calls `evaluate(weights) -> float` at most `budget` times (the caller counts, and raises `BudgetSpent` to stop).
The built-in one uses golden-section search for one adapter, or for two (the mix `(1 - t, t)`, then the overall scale
for types that do not normalize the weights) when the bounds contain `[0, 1]`; otherwise a seeded random search
followed by a shrinking coordinate search.
"""

from __future__ import annotations

import contextlib
import math
import random
from collections.abc import Callable
from typing import Any

__all__ = ["SCALE_INVARIANT_TYPES", "BudgetSpent", "optuna_or_none", "run_builtin", "run_optuna"]

# Types whose result depends only on the ratios of the weights: searching their overall scale is pointless.
SCALE_INVARIANT_TYPES = frozenset({"average", "slerp", "karcher"})
GOLDEN = (math.sqrt(5.0) - 1.0) / 2.0


def optuna_or_none() -> Any:
    """The `optuna` module, or `None` when it is not installed."""
    try:
        import optuna
    except ImportError:
        return None
    return optuna


class BudgetSpent(Exception):
    """Raised by `evaluate` when the budget of trials is spent, to stop an optimizer."""


def _golden_section(evaluate: Callable[[float], float], low: float, high: float, tolerance: float) -> None:
    """Minimize `evaluate` on `[low, high]` by golden-section search, down to an interval of `tolerance`."""
    a, b = low, high
    c, d = b - GOLDEN * (b - a), a + GOLDEN * (b - a)
    fc, fd = evaluate(c), evaluate(d)
    while b - a > tolerance:
        if fc <= fd:
            b, d, fd = d, c, fc
            c = b - GOLDEN * (b - a)
            fc = evaluate(c)
        else:
            a, c, fc = c, d, fd
            d = a + GOLDEN * (b - a)
            fd = evaluate(d)


def run_builtin(
    evaluate: Callable[[list[float]], float],
    bounds: list[tuple[float, float]],
    best: Callable[[], tuple[list[float], float]],
    remaining: Callable[[], int],
    combination_type: str,
    seed: int,
) -> None:
    """The built-in search: golden-section for one or two adapters when possible, else random then coordinate."""
    count = len(bounds)
    if count == 1:
        (low, high) = bounds[0]
        _golden_section(lambda w: evaluate([w]), low, high, 1e-3 * (high - low))
        return
    if count == 2 and all(low <= 0.0 and high >= 1.0 for low, high in bounds):
        # Golden-section search of the mix (1 - t, t), then of the overall scale for types where it matters.
        def along(t: float) -> list[float]:
            return [1.0 - t, t]

        if combination_type in SCALE_INVARIANT_TYPES:
            _golden_section(lambda t: evaluate(along(t)), 0.0, 1.0, 1e-3)
            return
        limit = remaining() - max(1, remaining() // 3)
        calls = 0

        def mix(t: float) -> float:
            nonlocal calls
            if calls >= limit:
                raise BudgetSpent
            calls += 1
            return evaluate(along(t))

        with contextlib.suppress(BudgetSpent):
            _golden_section(mix, 0.0, 1.0, 1e-3)
        direction, _ = best()
        largest = min(
            (high / weight for weight, (_, high) in zip(direction, bounds, strict=True) if weight > 0), default=0.0
        )
        if largest > 0.0 and all(weight >= 0 for weight in direction):
            _golden_section(lambda s: evaluate([s * w for w in direction]), 0.0, largest, 1e-3 * largest)
        return
    generator = random.Random(seed)
    for _ in range(max(1, remaining() // 2)):
        evaluate([generator.uniform(low, high) for low, high in bounds])
    point, value = best()
    steps = [0.25 * (high - low) for low, high in bounds]
    order = list(range(count))
    while max(step / (high - low) for step, (low, high) in zip(steps, bounds, strict=True)) > 1e-3:
        generator.shuffle(order)
        improved = False
        for index in order:
            for sign in (1.0, -1.0):
                low, high = bounds[index]
                candidate = list(point)
                candidate[index] = min(max(point[index] + sign * steps[index], low), high)
                if candidate[index] == point[index]:
                    continue
                candidate_value = evaluate(candidate)
                if candidate_value < value:
                    point, value, improved = candidate, candidate_value, True
                    break
        if not improved:
            steps = [step / 2 for step in steps]


def run_optuna(
    optuna: Any,
    evaluate: Callable[[list[float]], float],
    bounds: list[tuple[float, float]],
    initial: list[float],
    initial_value: float,
    budget: int,
    seed: int,
) -> None:
    """optuna's TPE sampler, seeded and told the initial trial when finite; non-finite values are failed trials."""
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        study = optuna.create_study(direction="minimize", sampler=optuna.samplers.TPESampler(seed=seed))
        distributions = {
            f"w{index}": optuna.distributions.FloatDistribution(low, high) for index, (low, high) in enumerate(bounds)
        }
        if math.isfinite(initial_value):
            study.add_trial(
                optuna.trial.create_trial(
                    params={f"w{index}": value for index, value in enumerate(initial)},
                    distributions=distributions,
                    value=initial_value,
                )
            )
        for _ in range(budget):
            trial = study.ask()
            weights = [trial.suggest_float(f"w{index}", low, high) for index, (low, high) in enumerate(bounds)]
            value = evaluate(weights)
            if math.isfinite(value):
                study.tell(trial, value)
            else:
                study.tell(trial, state=optuna.trial.TrialState.FAIL)
    finally:
        optuna.logging.set_verbosity(verbosity)
