"""Gradient-free search of the merge weights that minimize an objective (LoraHub-style).

Each trial builds the candidate merge in factor space into one scratch adapter, evaluates the objective with it
active, and moves on; nothing else in the model changes. When the search ends the scratch adapter is gone and the
model holds exactly one new adapter, `adapter_name`, with the best combination found.

The optimizer is optuna's TPE sampler when optuna is installed (`pip install "peft-merge-ext[search]"`), otherwise a
small built-in one (both in `search.optimizers`). The candidates are built by `search.candidates`; this module checks
the arguments, runs the trials and keeps their history. `peft-merge-ext search` is `search.search_cli`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from ..errors import CombinationError, EvaluationInputError, MergeInputError
from ..peft_bridge.adapter_state import AdapterState, activate, lora_model_of
from ..peft_bridge.adapters import check_new_adapter_name
from .candidates import PeftCandidates, PluginCandidates
from .optimizers import BudgetSpent, optuna_or_none, run_builtin, run_optuna

__all__ = ["SearchResult", "Trial", "search_weights"]

OPTIMIZERS = ("auto", "optuna", "builtin")
SCRATCH_ADAPTER = "peft_merge_ext_search_trial"


@dataclass
class Trial:
    """One evaluated candidate.

    Args:
        number (`int`): Its position in the search (0 is the initial weights).
        weights (`list[float]`): The weights tried, one per adapter.
        value (`float`): The objective (lower is better; `inf` when it was not finite).
        seconds (`float`): Time spent building and evaluating it.
    """

    number: int
    weights: list[float]
    value: float
    seconds: float


@dataclass
class SearchResult:
    """The outcome of `search_weights`.

    Args:
        weights (`list[float]`): The best weights found, one per adapter.
        value (`float`): Their objective value.
        initial_value (`float`): The objective of the initial weights (trial 0), for comparison.
        history (`list[Trial]`): Every trial, in order.
        adapters (`list[str]`): The adapters combined.
        combination_type (`str`): The combination type.
        adapter_name (`str`): The adapter added to the model with the best weights.
        optimizer (`str`): `"optuna"` or `"builtin"`.
        seed (`int`): The seed used.
    """

    weights: list[float]
    value: float
    initial_value: float
    history: list[Trial]
    adapters: list[str]
    combination_type: str
    adapter_name: str
    optimizer: str
    seed: int
    options: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serializable dict."""
        return asdict(self)


def _check_bounds(bounds: Any, count: int) -> list[tuple[float, float]]:
    if bounds is None:
        return [(0.0, 1.0)] * count
    pairs = bounds
    if (
        isinstance(bounds, Sequence)
        and len(bounds) == 2
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in bounds)
    ):
        pairs = [tuple(bounds)] * count
    if isinstance(pairs, (str, bytes)) or not isinstance(pairs, Sequence) or len(pairs) != count:
        raise MergeInputError(
            f"bounds must be one (low, high) pair or one pair per adapter ({count}), got {bounds!r}."
        )
    result = []
    for pair in pairs:
        if isinstance(pair, (str, bytes)) or not isinstance(pair, Sequence) or len(pair) != 2:
            raise MergeInputError(f"Each bound must be a (low, high) pair, got {pair!r}.")
        try:
            low, high = float(pair[0]), float(pair[1])
        except (TypeError, ValueError):
            raise MergeInputError(f"Bounds must be numbers, got {pair!r}.") from None
        if not (math.isfinite(low) and math.isfinite(high) and low < high):
            raise MergeInputError(f"Each bound needs finite low < high, got {pair!r}.")
        result.append((low, high))
    return result


def _check_initial(initial: Any, bounds: list[tuple[float, float]]) -> list[float]:
    count = len(bounds)
    if initial is None:
        return [min(max(1.0 / count, low), high) for low, high in bounds]
    from ..engine.request import check_weights

    values = check_weights(initial, count)
    for value, (low, high) in zip(values, bounds, strict=True):
        if not low <= value <= high:
            raise MergeInputError(f"initial_weights {values} must lie within the bounds {bounds}.")
    return values


def _check_positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise MergeInputError(f"{name} must be a positive integer, got {value!r}.")
    return value


def _make_objective(objective: Any, tokenizer: Any, batch_size: int) -> Callable[[Any], float]:
    if callable(objective):
        return lambda model: float(objective(model))
    if isinstance(objective, (str, bytes, Mapping)) or not isinstance(objective, Iterable):
        raise EvaluationInputError(
            "objective must be a callable (model -> float, lower is better) or an eval dataset (a list of texts or "
            f"tokenized examples), got {type(objective).__name__}."
        )
    from ..search.evaluation import compute_metrics, prepare_examples

    examples = prepare_examples(objective, tokenizer)
    return lambda model: compute_metrics(model, examples, tokenizer=tokenizer, batch_size=batch_size).loss


def search_weights(
    model: Any,
    adapters: Sequence[str],
    objective: Callable[[Any], float] | Iterable[Any],
    *,
    combination_type: str = "weighted",
    budget: int = 40,
    bounds: Sequence[float] | Sequence[Sequence[float]] | None = None,
    seed: int = 0,
    adapter_name: str = "searched",
    svd_rank: int | None = None,
    initial_weights: Sequence[float] | None = None,
    optimizer: str = "auto",
    tokenizer: Any = None,
    batch_size: int = 8,
    progress: bool = True,
    **options: Any,
) -> SearchResult:
    """Search the merge weights that minimize `objective`, and add the best merge to the model as `adapter_name`.

    Every trial builds the candidate adapter in factor space (the registered types) or through PEFT's
    `add_weighted_adapter` (PEFT's own types) into a scratch adapter, evaluates `objective` with it as the only
    active adapter, and discards it. Afterwards the model is exactly as it was (adapters, active adapters,
    `requires_grad`, train mode) plus one adapter, `adapter_name`, holding the best combination.

    Args:
        model (`PeftModel` or `LoraModel`): The model holding the adapters.
        adapters (`Sequence[str]`): The adapters to combine.
        objective (`Callable` or `Iterable`): `objective(model) -> float`, lower is better (the model has the
            candidate active and is in eval mode), or a small eval dataset (texts, `{"prompt", "completion"}` or
            tokenized examples, see `peft_merge_ext.search.evaluation`) whose mean token loss is minimized.
        combination_type (`str`, *optional*, defaults to `"weighted"`): Any registered type or one of PEFT's own.
        budget (`int`, *optional*, defaults to 40): The number of trials, the initial weights included.
        bounds (`(low, high)` or a list of pairs, *optional*): The search box of the weights; `(0, 1)` for every
            adapter by default.
        seed (`int`, *optional*, defaults to 0): Seeds the optimizer (and PEFT's DARE sampling); the same seed and
            objective give the same trials.
        adapter_name (`str`, *optional*, defaults to `"searched"`): The adapter that receives the best combination.
        svd_rank (`int`, *optional*): Output rank bound of the combination.
        initial_weights (`Sequence[float]`, *optional*): The first trial; equal weights `1 / len(adapters)` (clipped
            to the bounds) by default. The result is never worse than it on the objective.
        optimizer (`str`, *optional*, defaults to `"auto"`): `"optuna"` (TPE; needs
            `pip install "peft-merge-ext[search]"`), `"builtin"` (golden-section for one or two adapters, random then
            coordinate search for more or for bounds not containing `[0, 1]`) or `"auto"` (optuna when installed).
        tokenizer (`PreTrainedTokenizerBase`, *optional*): Needed when `objective` is a dataset of texts.
        batch_size (`int`, *optional*, defaults to 8): Batch size of the dataset objective.
        progress (`bool`, *optional*, defaults to `True`): Show a tqdm progress bar.
        options: Options of the combination type (e.g. `t=` for slerp, `density=` for PEFT's `ties`).

    Returns:
        `SearchResult`: Best weights and value, the initial value and the history of trials.

    Raises:
        `MergeInputError`: For bad adapters, bounds, budget, names or options (before the model is modified).
        `UnknownCombinationTypeError`: For a type that is neither registered nor PEFT's.
        `EvaluationInputError`: For an unusable objective.
    """
    from ..plugins.registry import PEFT_COMBINATION_TYPES, get_combination_types

    lora_model = lora_model_of(model)
    if isinstance(adapters, str) or not isinstance(adapters, Sequence) or not adapters:
        raise MergeInputError(f"adapters must be a non-empty list of adapter names, got {adapters!r}.")
    adapters = list(adapters)
    budget = _check_positive_int("budget", budget)
    batch_size = _check_positive_int("batch_size", batch_size)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise MergeInputError(f"seed must be an integer, got {seed!r}.")
    check_new_adapter_name(lora_model, adapter_name)
    if SCRATCH_ADAPTER in lora_model.peft_config or adapter_name == SCRATCH_ADAPTER:
        raise MergeInputError(f"The adapter name {SCRATCH_ADAPTER!r} is reserved for the search's scratch adapter.")
    if optimizer not in OPTIMIZERS:
        raise MergeInputError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}.")
    optuna = optuna_or_none() if optimizer != "builtin" else None
    if optimizer == "optuna" and optuna is None:
        raise MergeInputError(
            'optimizer="optuna" needs optuna: pip install "peft-merge-ext[search]" (or optimizer="builtin").'
        )
    box = _check_bounds(bounds, len(adapters))
    initial = _check_initial(initial_weights, box)
    types = get_combination_types()
    if combination_type in types:
        candidates: Any = PluginCandidates(lora_model, adapters, combination_type, svd_rank, options)
    elif combination_type in PEFT_COMBINATION_TYPES:
        candidates = PeftCandidates(lora_model, adapters, combination_type, svd_rank, options)
        candidates.seed = seed
    else:
        from ..engine.request import unknown_type_error

        raise unknown_type_error(combination_type)
    score = _make_objective(objective, tokenizer, batch_size)

    from tqdm.auto import tqdm

    history: list[Trial] = []
    cache: dict[tuple[float, ...], float] = {}
    failures: list[str] = []
    state = AdapterState.capture(model)
    bar = tqdm(total=budget, desc=f"search {combination_type}", disable=not progress, leave=False)

    def best() -> tuple[list[float], float]:
        trial = min(history, key=lambda item: item.value)
        return list(trial.weights), trial.value

    def evaluate(weights: list[float]) -> float:
        key = tuple(round(w, 12) for w in weights)
        if key in cache:
            return cache[key]
        if len(history) >= budget:
            raise BudgetSpent
        started = time.perf_counter()
        try:
            candidates.build(weights, SCRATCH_ADAPTER)
        except (MergeInputError, CombinationError) as error:  # weights this type rejects: a failed trial
            failures.append(f"{weights}: {error}")
            value = math.inf
        else:
            activate(model, SCRATCH_ADAPTER)
            model.eval()
            value = score(model)
            value = value if math.isfinite(value) else math.inf
        cache[key] = value
        history.append(Trial(len(history), [float(w) for w in weights], value, time.perf_counter() - started))
        bar.update(1)
        bar.set_postfix(best=f"{min(t.value for t in history):.4g}")
        return value

    try:
        try:
            evaluate(initial)
            if optuna is not None:
                run_optuna(optuna, evaluate, box, initial, history[0].value, budget - 1, seed)
            else:
                run_builtin(evaluate, box, best, lambda: budget - len(history), combination_type, seed)
        except BudgetSpent:
            pass
    finally:
        bar.close()
        state.restore()  # first, so the scratch adapter is inactive when it is deleted
        candidates.remove(SCRATCH_ADAPTER)
        state.restore()
    weights, value = best()
    if not math.isfinite(value):
        detail = f" The combination failed for: {failures[0]}" if failures else ""
        raise EvaluationInputError(
            "The objective was not finite for any trial; check the objective, the adapters and the bounds." + detail
        )
    search = {
        "optimizer": "optuna" if optuna is not None else "builtin",
        "budget": budget,
        "trials": len(history),
        "seed": seed,
        "bounds": [list(pair) for pair in box],
        "best_value": value,
        "initial_weights": list(history[0].weights),
        "initial_value": history[0].value,
    }
    try:
        candidates.add_final(weights, adapter_name, search)
    finally:
        state.restore(keep=[adapter_name])
    return SearchResult(
        weights=weights,
        value=value,
        initial_value=history[0].value,
        history=history,
        adapters=adapters,
        combination_type=combination_type,
        adapter_name=adapter_name,
        optimizer="optuna" if optuna is not None else "builtin",
        seed=seed,
        options=dict(options),
    )
