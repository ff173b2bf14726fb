"""Evaluate a model, an adapter or a merge on the user's eval sets: loss, exact-match accuracy and accuracy retention.

An eval set is a list of examples, each one of:

- a string, or `{"text": ...}`: every token after the first is scored (needs a tokenizer);
- `{"prompt": ..., "completion": ...}`: only the completion's tokens are scored (needs a tokenizer);
- `{"input_ids": [...], "labels": [...]}` (already tokenized; `labels` optional, `-100` marks unscored tokens; an
  `attention_mask` drops the padding it masks).

`loss` is the mean token negative log-likelihood of the scored tokens. `accuracy` is exact match: the fraction of
examples whose scored tokens are *all* the model's argmax prediction, which is exactly "greedy decoding reproduces the
completion", computed in one teacher-forced forward pass. `retention` is accuracy divided by a reference adapter's
accuracy on the same task (how much of a skill survives a merge).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import EvaluationInputError, MergeInputError
from ..peft_bridge.adapter_state import lora_model_of, using_adapter

__all__ = [
    "METRICS",
    "METRIC_NAMES",
    "EvalMetrics",
    "TokenizedExample",
    "compute_metrics",
    "evaluate",
    "prepare_examples",
    "rows_to_markdown",
]

METRICS = ("loss", "accuracy", "token_accuracy")
METRIC_NAMES = {"loss": "Loss", "accuracy": "Exact match", "token_accuracy": "Token accuracy"}
IGNORE_INDEX = -100


@dataclass(frozen=True)
class TokenizedExample:
    """One example ready for scoring.

    Args:
        input_ids (`tuple[int, ...]`): The tokens.
        labels (`tuple[int, ...]`): The target of each position (`-100`: not scored); position 0 is never scored.
    """

    input_ids: tuple[int, ...]
    labels: tuple[int, ...]


@dataclass(frozen=True)
class EvalMetrics:
    """The metrics of one eval set.

    Args:
        loss (`float`): Mean negative log-likelihood per scored token.
        accuracy (`float`): Fraction of examples whose scored tokens are all predicted exactly (greedy exact match).
        token_accuracy (`float`): Fraction of scored tokens predicted exactly.
        examples (`int`): Number of examples.
        tokens (`int`): Number of scored tokens.
    """

    loss: float
    accuracy: float
    token_accuracy: float
    examples: int
    tokens: int


def _as_int_list(value: Any, what: str, index: int) -> list[int]:
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise EvaluationInputError(f"Example {index}: {what} must be a list of token ids, got {type(value).__name__}.")
    if value and isinstance(value[0], list):
        if len(value) != 1:
            raise EvaluationInputError(f"Example {index}: {what} holds a batch; give one example per entry.")
        value = value[0]
    try:
        return [int(token) for token in value]
    except (TypeError, ValueError):
        raise EvaluationInputError(f"Example {index}: {what} must contain integers only.") from None


def _tokenize(tokenizer: Any, text: Any, index: int, add_special_tokens: bool = True) -> list[int]:
    if tokenizer is None:
        raise EvaluationInputError(
            f"Example {index} is text, so a tokenizer is needed: pass tokenizer=AutoTokenizer.from_pretrained(...), "
            "or give pre-tokenized examples ({'input_ids': [...], 'labels': [...]})."
        )
    if not isinstance(text, str):
        raise EvaluationInputError(f"Example {index}: text must be a string, got {type(text).__name__}.")
    return list(tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])


def _prepare_one(example: Any, tokenizer: Any, index: int) -> TokenizedExample:
    if isinstance(example, TokenizedExample):
        prepared = example
    elif isinstance(example, str):
        ids = _tokenize(tokenizer, example, index)
        prepared = TokenizedExample(tuple(ids), tuple(ids))
    elif isinstance(example, Mapping) and "input_ids" in example:
        ids = _as_int_list(example["input_ids"], "input_ids", index)
        labels = _as_int_list(example["labels"], "labels", index) if example.get("labels") is not None else ids
        if len(labels) != len(ids):
            raise EvaluationInputError(
                f"Example {index}: labels has {len(labels)} entries for {len(ids)} input_ids; give one label per "
                "token (-100 for tokens that are not scored)."
            )
        if example.get("attention_mask") is not None:
            mask = _as_int_list(example["attention_mask"], "attention_mask", index)
            if len(mask) != len(ids):
                raise EvaluationInputError(f"Example {index}: attention_mask and input_ids differ in length.")
            ids = [token for token, keep in zip(ids, mask, strict=True) if keep]
            labels = [label for label, keep in zip(labels, mask, strict=True) if keep]
        prepared = TokenizedExample(tuple(ids), tuple(labels))
    elif isinstance(example, Mapping) and "prompt" in example and "completion" in example:
        prompt = _tokenize(tokenizer, example["prompt"], index)
        completion = _tokenize(tokenizer, example["completion"], index, add_special_tokens=False)
        prepared = TokenizedExample(tuple(prompt + completion), (IGNORE_INDEX,) * len(prompt) + tuple(completion))
    elif isinstance(example, Mapping) and "text" in example:
        ids = _tokenize(tokenizer, example["text"], index)
        prepared = TokenizedExample(tuple(ids), tuple(ids))
    else:
        raise EvaluationInputError(
            f"Example {index} is not understood ({type(example).__name__}); give a string, {{'text': ...}}, "
            "{'prompt': ..., 'completion': ...} or {'input_ids': [...], 'labels': [...]}."
        )
    if all(label == IGNORE_INDEX for label in prepared.labels[1:]):
        raise EvaluationInputError(
            f"Example {index} has no scored token (labels are all -100 after the first position, or the text is a "
            "single token); give it a completion or drop it."
        )
    return prepared


def prepare_examples(dataset: Iterable[Any], tokenizer: Any = None) -> list[TokenizedExample]:
    """Tokenize and validate an eval set once, so it can be scored many times.

    Args:
        dataset (`Iterable`): The examples (see the module docstring for the accepted forms).
        tokenizer (`PreTrainedTokenizerBase`, *optional*): Needed when examples are text.

    Returns:
        `list[TokenizedExample]`: The prepared examples.

    Raises:
        `EvaluationInputError`: For an empty set, an unknown example form, text without a tokenizer or an example
            without scored tokens.
    """
    if isinstance(dataset, (str, bytes, Mapping)):
        raise EvaluationInputError(
            f"An eval set must be a list of examples, got a {type(dataset).__name__}; wrap a single example in a list."
        )
    prepared = [_prepare_one(example, tokenizer, index) for index, example in enumerate(dataset)]
    if not prepared:
        raise EvaluationInputError("The eval set is empty; give at least one example.")
    return prepared


def _input_device(model: Any) -> Any:
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if embeddings is not None and getattr(embeddings, "weight", None) is not None:
        return embeddings.weight.device
    return next(model.parameters()).device


def compute_metrics(
    model: Any, dataset: Iterable[Any], *, tokenizer: Any = None, batch_size: int = 8, pad_token_id: int | None = None
) -> EvalMetrics:
    """Score a causal LM on one eval set with whatever adapters are active (in eval mode, without gradients).

    Args:
        model (`torch.nn.Module`): A causal LM (a `PeftModel`, or any model returning `.logits`).
        dataset (`Iterable`): The examples, raw or from `prepare_examples`.
        tokenizer (`PreTrainedTokenizerBase`, *optional*): Needed when examples are text.
        batch_size (`int`, *optional*, defaults to 8): Examples per forward pass.
        pad_token_id (`int`, *optional*): Padding id (masked out anyway); the tokenizer's, or 0.

    Returns:
        `EvalMetrics`: Loss, exact-match accuracy, token accuracy and counts.
    """
    import torch
    import torch.nn.functional as F

    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise EvaluationInputError(f"batch_size must be a positive integer, got {batch_size!r}.")
    examples = prepare_examples(dataset, tokenizer)
    if pad_token_id is None:
        pad_token_id = getattr(tokenizer, "pad_token_id", None) or 0
    device = _input_device(model)
    training = model.training
    loss_sum, tokens, correct_tokens, exact = 0.0, 0, 0, 0
    model.eval()
    try:
        with torch.no_grad():
            for start in range(0, len(examples), batch_size):
                batch = examples[start : start + batch_size]
                width = max(len(example.input_ids) for example in batch)
                input_ids = torch.full((len(batch), width), pad_token_id, dtype=torch.long)
                labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
                mask = torch.zeros((len(batch), width), dtype=torch.long)
                for row, example in enumerate(batch):
                    size = len(example.input_ids)
                    input_ids[row, :size] = torch.tensor(example.input_ids)
                    labels[row, :size] = torch.tensor(example.labels)
                    mask[row, :size] = 1
                input_ids, labels, mask = input_ids.to(device), labels.to(device), mask.to(device)
                logits = model(input_ids=input_ids, attention_mask=mask).logits[:, :-1].float()
                targets = labels[:, 1:].to(logits.device)
                scored = targets != IGNORE_INDEX
                loss_sum += float(
                    F.cross_entropy(
                        logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
                    )
                )
                hits = (logits.argmax(-1) == targets) & scored
                tokens += int(scored.sum())
                correct_tokens += int(hits.sum())
                exact += int((hits | ~scored).all(-1).sum())
    finally:
        model.train(training)
    return EvalMetrics(
        loss=loss_sum / tokens,
        accuracy=exact / len(examples),
        token_accuracy=correct_tokens / tokens,
        examples=len(examples),
        tokens=tokens,
    )


def _as_eval_sets(eval_sets: Any) -> dict[str, Any]:
    if isinstance(eval_sets, Mapping):
        if not eval_sets:
            raise EvaluationInputError("eval_sets is empty; give {task_name: examples, ...}.")
        for task in eval_sets:
            if not isinstance(task, str) or not task:
                raise EvaluationInputError(f"eval_sets keys must be non-empty task names, got {task!r}.")
        return dict(eval_sets)
    if isinstance(eval_sets, (str, bytes)) or not isinstance(eval_sets, Iterable):
        raise EvaluationInputError(
            f"eval_sets must map task names to lists of examples (or be one list), got {type(eval_sets).__name__}."
        )
    return {"eval": eval_sets}


def _reference_map(reference_adapters: Any, tasks: Sequence[str]) -> dict[str, str]:
    if reference_adapters is None:
        return {}
    if isinstance(reference_adapters, str):
        return dict.fromkeys(tasks, reference_adapters)
    if not isinstance(reference_adapters, Mapping):
        raise MergeInputError(
            "reference_adapters must map task names to adapter names (or be one adapter name), got "
            f"{type(reference_adapters).__name__}."
        )
    unknown = sorted(set(reference_adapters) - set(tasks))
    if unknown:
        raise MergeInputError(f"reference_adapters names task(s) {unknown} that are not in eval_sets ({list(tasks)}).")
    return dict(reference_adapters)


def evaluate(
    model: Any,
    eval_sets: Mapping[str, Iterable[Any]] | Iterable[Any],
    *,
    adapter: str | None = None,
    reference_adapters: Mapping[str, str] | str | None = None,
    tokenizer: Any = None,
    metrics: Sequence[str] = ("loss", "accuracy"),
    batch_size: int = 8,
    dataset_names: Mapping[str, str] | None = None,
    task_type: str = "text-generation",
) -> list[dict[str, Any]]:
    """Per-task loss / accuracy of a model, an adapter or a merge, and its accuracy retention against references.

    The rows plug into `push_merged(..., eval_results=rows)` / `MergeInfo.eval_results`, which turn them into the
    model card's `model-index` (`EvalResult(**row)`). The model is left exactly as it was (active adapters,
    `requires_grad`, train mode).

    Args:
        model (`torch.nn.Module`): A causal LM: a `PeftModel`, or a plain model (a merged checkpoint) with `adapter`
            and `reference_adapters` left unset.
        eval_sets (`Mapping[str, list]` or `list`): Task name -> examples (see the module docstring); a single list
            is task `"eval"`.
        adapter (`str`, *optional*): The adapter to evaluate (made the only active one for the evaluation);
            `None` evaluates the model with its currently active adapters.
        reference_adapters (`Mapping[str, str]` or `str`, *optional*): Task name -> the adapter to compare with
            (typically the adapter trained for that task, alone); one name applies to every task. Adds a
            `"retention"` row (accuracy / reference accuracy) per task that has one.
        tokenizer (`PreTrainedTokenizerBase`, *optional*): Needed when examples are text.
        metrics (`Sequence[str]`, *optional*, defaults to `("loss", "accuracy")`): Which of `"loss"`,
            `"accuracy"`, `"token_accuracy"` to report.
        batch_size (`int`, *optional*, defaults to 8): Examples per forward pass.
        dataset_names (`Mapping[str, str]`, *optional*): Task name -> dataset id shown in the card (default: the task
            name).
        task_type (`str`, *optional*, defaults to `"text-generation"`): The card's task type.

    Returns:
        `list[dict]`: One row per task and metric, each the keyword arguments of a `huggingface_hub.EvalResult`:
        `task_type`, `task_name` (the eval-set name), `dataset_type` / `dataset_name` (`dataset_names[task]`, or
        the task name), `metric_type` (`"loss"`, `"accuracy"`, `"token_accuracy"` or `"retention"`), `metric_name`,
        `metric_value` and `metric_args` (`examples`, the evaluated `adapter`, and for retention the `reference`
        adapter and its `reference_accuracy`).

    Raises:
        `EvaluationInputError`: For malformed eval sets or metrics.
        `MergeInputError`: For unknown adapters or reference tasks (raised before anything is evaluated).
    """
    sets = _as_eval_sets(eval_sets)
    if isinstance(metrics, str):
        metrics = (metrics,)
    unknown = [metric for metric in metrics if metric not in METRICS]
    if unknown or not metrics:
        raise EvaluationInputError(f"metrics must be a non-empty subset of {METRICS}, got {list(metrics)!r}.")
    references = _reference_map(reference_adapters, list(sets))
    if adapter is not None or references:
        known = lora_model_of(model).peft_config
        missing = sorted({name for name in [adapter, *references.values()] if name is not None} - set(known))
        if missing:
            raise MergeInputError(f"Unknown adapter(s) {missing}; the model has: {', '.join(map(repr, known))}.")
    prepared = {task: prepare_examples(examples, tokenizer) for task, examples in sets.items()}
    names = dict(dataset_names or {})

    def score(task: str, name: str | None) -> EvalMetrics:
        with using_adapter(model, name):
            return compute_metrics(model, prepared[task], tokenizer=tokenizer, batch_size=batch_size)

    rows: list[dict[str, Any]] = []
    for task in prepared:
        result = score(task, adapter)
        dataset = names.get(task, task)
        common = {"task_type": task_type, "task_name": task, "dataset_type": dataset, "dataset_name": dataset}
        arguments = {"examples": result.examples, **({"adapter": adapter} if adapter is not None else {})}
        for metric in metrics:
            rows.append(
                {
                    **common,
                    "metric_type": metric,
                    "metric_name": METRIC_NAMES[metric],
                    "metric_value": getattr(result, metric),
                    "metric_args": dict(arguments),
                }
            )
        reference = references.get(task)
        if reference is None:
            continue
        reference_accuracy = score(task, reference).accuracy
        if reference_accuracy == 0 or not math.isfinite(reference_accuracy):
            warnings.warn(
                f"Reference adapter {reference!r} has accuracy 0 on task {task!r}, so retention is undefined there; "
                "no retention row was added for it.",
                stacklevel=2,
            )
            continue
        rows.append(
            {
                **common,
                "metric_type": "retention",
                "metric_name": f"Accuracy retention vs {reference}",
                "metric_value": result.accuracy / reference_accuracy,
                "metric_args": {**arguments, "reference": reference, "reference_accuracy": reference_accuracy},
            }
        )
    return rows


def rows_to_markdown(rows: Sequence[Mapping[str, Any]]) -> str:
    """A markdown table of evaluation rows (task, dataset, metric, value), for logs and reports."""
    lines = ["| task | dataset | metric | value |", "|---|---|---|---:|"]
    for row in rows:
        value = row["metric_value"]
        shown = f"{value:.4f}" if isinstance(value, float) else str(value)
        lines.append(f"| {row['task_name']} | {row['dataset_name']} | {row['metric_name']} | {shown} |")
    return "\n".join(lines)
