"""Gradient-free search of the merge weights that minimize an objective (LoraHub-style).

Each trial builds the candidate merge in factor space into one scratch adapter, evaluates the objective with it
active, and moves on; nothing else in the model changes. When the search ends the scratch adapter is gone and the
model holds exactly one new adapter, `adapter_name`, with the best combination found.

The optimizer is optuna's TPE sampler when optuna is installed (`pip install "peft-merge-ext[search]"`), otherwise a
small built-in one: golden-section search for one adapter, or for two (the mix `(1 - t, t)`, then the overall scale
for types that do not normalize the weights) when the bounds contain `[0, 1]`; otherwise a seeded random search
followed by a shrinking coordinate search.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import re
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from ..errors import CombinationError, EvaluationInputError, MergeInputError
from ..peft_bridge.adapter_state import AdapterState, activate, delete_adapter, lora_model_of

__all__ = ["SearchResult", "Trial", "run_search_cli", "search_weights"]

OPTIMIZERS = ("auto", "optuna", "builtin")
# Types whose result depends only on the ratios of the weights: searching their overall scale is pointless.
SCALE_INVARIANT_TYPES = frozenset({"average", "slerp", "karcher"})
GOLDEN = (math.sqrt(5.0) - 1.0) / 2.0
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


# ----------------------------------------------------------------------------------------------------------------
# Validation


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


def _optuna_or_none() -> Any:
    try:
        import optuna
    except ImportError:
        return None
    return optuna


# ----------------------------------------------------------------------------------------------------------------
# Building candidates


class _PluginCandidates:
    """Candidates of a registered (factor-space) type, written into one scratch adapter that is reused."""

    def __init__(self, lora_model: Any, adapters: list[str], combination_type: str, svd_rank: Any, options: dict):
        self.lora_model, self.adapters, self.combination_type = lora_model, adapters, combination_type
        self.svd_rank, self.options = svd_rank, options
        self.created = False
        # Validates adapters, options and svd_rank before anything is modified.
        self.request([1.0] * len(adapters))

    def request(self, weights: list[float]) -> Any:
        from ..engine.request import resolve_request

        return resolve_request(
            self.lora_model.peft_config, self.adapters, weights, self.combination_type, self.svd_rank, self.options
        )

    def build(self, weights: list[float], name: str) -> None:
        from ..peft_bridge.adapters import add_combined_adapter
        from ..peft_bridge.layers import slot_rank, write_factors
        from ..peft_bridge.source import LiveFactorSource, merge_live

        request = self.request(weights)
        if self.created:
            model = self.lora_model
            source = LiveFactorSource(model.model, model.peft_config, list(model.active_adapters), model)
            merged, _ = merge_live(source, request)
            slots = [slot_rank(m.module.handle, name) for m in merged]
            if all(slot >= m.delta.rank for slot, m in zip(slots, merged, strict=True)):
                for slot, m in zip(slots, merged, strict=True):
                    write_factors(m.module.handle, name, _pad(m.delta, slot), m.module.storage_dtype)
                return
            self.remove(name)
        add_combined_adapter(self.lora_model, name, request)
        self.created = True

    def remove(self, name: str) -> None:
        if self.created:
            delete_adapter(self.lora_model, name)
            self.created = False

    def add_final(self, weights: list[float], name: str, search: dict[str, Any]) -> None:
        from ..peft_bridge.adapters import add_combined_adapter

        add_combined_adapter(self.lora_model, name, self.request(weights), search=search)


class _PeftCandidates:
    """Candidates of one of PEFT's own types, through PEFT's `add_weighted_adapter` (re-seeded for DARE)."""

    def __init__(self, lora_model: Any, adapters: list[str], combination_type: str, svd_rank: Any, options: dict):
        from ..engine.request import resolve_request

        resolve_request(lora_model.peft_config, adapters, [1.0] * len(adapters), combination_type, svd_rank, options)
        self.lora_model, self.adapters, self.combination_type = lora_model, adapters, combination_type
        self.arguments = {"svd_rank": svd_rank, **options}
        self.created = False
        self.seed = 0

    def _add(self, weights: list[float], name: str) -> None:
        import torch

        devices = sorted({p.device.index or 0 for p in self.lora_model.parameters() if p.device.type == "cuda"})
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(self.seed)
            self.lora_model.add_weighted_adapter(
                self.adapters, weights, name, combination_type=self.combination_type, **self.arguments
            )

    def build(self, weights: list[float], name: str) -> None:
        self.remove(name)
        self.created = True
        self._add(weights, name)

    def remove(self, name: str) -> None:
        if self.created:
            delete_adapter(self.lora_model, name)
            self.created = False

    def add_final(self, weights: list[float], name: str, search: dict[str, Any]) -> None:
        from ..peft_bridge.adapters import get_lineage

        self._add(weights, name)
        for parameter_name, parameter in self.lora_model.model.named_parameters():
            if f".{name}." in parameter_name or parameter_name.endswith(f".{name}"):
                parameter.requires_grad_(False)
        lineage = get_lineage(self.lora_model.peft_config[name])
        if lineage is not None:
            lineage.search = search


def _pad(delta: Any, rank: int) -> Any:
    """The same product `B @ A` with zero columns / rows appended up to `rank`."""
    import torch

    from ..plugins.contract import LowRankDelta

    extra = rank - delta.rank
    if extra == 0:
        return delta
    b = torch.cat([delta.B, delta.B.new_zeros(delta.B.shape[0], extra)], dim=1)
    a = torch.cat([delta.A, delta.A.new_zeros(extra, delta.A.shape[1])], dim=0)
    return LowRankDelta(b, a)


# ----------------------------------------------------------------------------------------------------------------
# Optimizers: each calls `evaluate(weights) -> float` at most `budget` times (the caller counts and stops).


class _BudgetSpent(Exception):
    pass


def _golden_section(evaluate: Callable[[float], float], low: float, high: float, tolerance: float) -> None:
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


def _run_builtin(
    evaluate: Callable[[list[float]], float],
    bounds: list[tuple[float, float]],
    best: Callable[[], tuple[list[float], float]],
    remaining: Callable[[], int],
    combination_type: str,
    seed: int,
) -> None:
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
                raise _BudgetSpent
            calls += 1
            return evaluate(along(t))

        with contextlib.suppress(_BudgetSpent):
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


def _run_optuna(
    optuna: Any,
    evaluate: Callable[[list[float]], float],
    bounds: list[tuple[float, float]],
    initial: list[float],
    initial_value: float,
    budget: int,
    seed: int,
) -> None:
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


# ----------------------------------------------------------------------------------------------------------------
# The search


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
    if not isinstance(adapter_name, str) or not re.fullmatch(r"[^.\s]+", adapter_name):
        raise MergeInputError(f"adapter_name must be a non-empty string without '.' or spaces, got {adapter_name!r}.")
    if adapter_name in lora_model.peft_config:
        raise MergeInputError(
            f"An adapter named {adapter_name!r} already exists; pick a free adapter_name or delete it first with "
            f"model.delete_adapter({adapter_name!r})."
        )
    if SCRATCH_ADAPTER in lora_model.peft_config or adapter_name == SCRATCH_ADAPTER:
        raise MergeInputError(f"The adapter name {SCRATCH_ADAPTER!r} is reserved for the search's scratch adapter.")
    if optimizer not in OPTIMIZERS:
        raise MergeInputError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}.")
    optuna = _optuna_or_none() if optimizer != "builtin" else None
    if optimizer == "optuna" and optuna is None:
        raise MergeInputError(
            'optimizer="optuna" needs optuna: pip install "peft-merge-ext[search]" (or optimizer="builtin").'
        )
    box = _check_bounds(bounds, len(adapters))
    initial = _check_initial(initial_weights, box)
    types = get_combination_types()
    if combination_type in types:
        candidates: Any = _PluginCandidates(lora_model, adapters, combination_type, svd_rank, options)
    elif combination_type in PEFT_COMBINATION_TYPES:
        candidates = _PeftCandidates(lora_model, adapters, combination_type, svd_rank, options)
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
            raise _BudgetSpent
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
                _run_optuna(optuna, evaluate, box, initial, history[0].value, budget - 1, seed)
            else:
                _run_builtin(evaluate, box, best, lambda: budget - len(history), combination_type, seed)
        except _BudgetSpent:
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


# ----------------------------------------------------------------------------------------------------------------
# CLI


def _read_eval_file(path: str) -> list[Any]:
    examples = []
    with open(path, encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise EvaluationInputError(f"{path}:{line_number} is not valid JSON: {error}.") from None
            if not isinstance(record, dict):
                raise EvaluationInputError(f'{path}:{line_number} must be a JSON object like {{"text": "..."}}.')
            examples.append(record)
    if not examples:
        raise EvaluationInputError(f'{path} holds no examples; write one {{"text": "..."}} object per line.')
    return examples


def run_search_cli(args: Any) -> int:
    """Run `peft-merge-ext search`: load a base and adapters from local folders, search, print, optionally save.

    Args:
        args (`argparse.Namespace`): `base`, `adapter` (list of folders), `eval_file` (JSONL, one `{"text": ...}`
            per line; `{"prompt", "completion"}` also works), and optionally `method` (default `"weighted"`),
            `budget` (40), `seed` (0), `out` (a folder for the searched adapter plus `search.json`), `svd_rank`,
            `device`, `batch_size`.

    Returns:
        `int`: The exit code (0).
    """
    from pathlib import Path

    import torch
    from transformers import AutoTokenizer

    adapters = list(getattr(args, "adapter", None) or [])
    if not adapters:
        raise MergeInputError("Give the adapters to combine with --adapter PATH (once per adapter).")
    out = getattr(args, "out", None)
    if out is not None and Path(out).exists() and any(Path(out).iterdir()):
        raise MergeInputError(f"Output folder {out} already exists and is not empty; choose another --out.")
    examples = _read_eval_file(args.eval_file)
    needs_tokenizer = any("input_ids" not in example for example in examples)
    tokenizer = None
    if needs_tokenizer:
        for source in (args.base, adapters[0]):
            try:
                tokenizer = AutoTokenizer.from_pretrained(source)
                break
            except Exception:  # a folder without tokenizer files; try the next one
                continue
        if tokenizer is None:
            raise EvaluationInputError(
                f"The eval file holds text, but neither {args.base} nor {adapters[0]} has tokenizer files; save the "
                "tokenizer next to the base model (tokenizer.save_pretrained(base_folder))."
            )
    device = getattr(args, "device", None) or ("cuda" if torch.cuda.is_available() else "cpu")
    from ..peft_bridge.loading import load_peft_model

    model, names = load_peft_model(args.base, adapters)
    model.to(device)
    result = search_weights(
        model,
        names,
        examples,
        combination_type=getattr(args, "method", None) or "weighted",
        budget=getattr(args, "budget", None) or 40,
        seed=getattr(args, "seed", None) or 0,
        svd_rank=getattr(args, "svd_rank", None),
        tokenizer=tokenizer,
        batch_size=getattr(args, "batch_size", None) or 8,
    )
    print(f"combination_type: {result.combination_type} (optimizer: {result.optimizer}, {len(result.history)} trials)")
    for path, name, weight in zip(adapters, names, result.weights, strict=True):
        print(f"  {name}: {weight:.6g}  ({path})")
    print(f"eval loss: {result.value:.6g} (initial weights {result.history[0].weights}: {result.initial_value:.6g})")
    if out is not None:
        import shutil
        import tempfile

        from ..checkpoint.output_folder import output_folder

        with (
            output_folder(out, inputs=[args.base, *adapters]) as folder,
            tempfile.TemporaryDirectory(dir=folder) as scratch,
        ):
            model.save_pretrained(scratch, selected_adapters=[result.adapter_name])
            saved = Path(scratch) / result.adapter_name
            saved = saved if saved.is_dir() else Path(scratch)
            for item in saved.iterdir():
                shutil.move(str(item), folder / item.name)
            (folder / "search.json").write_text(json.dumps(result.to_dict(), indent=2) + "\n")
        print(f"searched adapter saved to {out}")
    return 0
