"""Synthetic sequence tasks, a tiny causal LM and its LoRA adapters, all built locally for the quality benchmark.

Every example is `BOS TAG x_1 .. x_n SEP y_1 .. y_n EOS` over the digits 0-9, where `TAG` names the task and `y` is the
task's answer. Only the answer tokens (and `EOS`) carry labels, so the loss is the answer's loss and the exact-match
accuracy is "greedy decoding reproduces the whole answer" (computed in one teacher-forced pass).

The base model is pretrained on a mix of tasks with short inputs (3-4 digits), so it is a real shared base that
knows the format and the skills but fails on longer inputs (transformers do not length-generalize). Each adapter then
specializes the base on ONE task at the longer length (5 digits). The 4-way setting (and its pairs) uses the six
`BASE_TASKS` for pretraining and four adapters; the 8-way setting (more interference) a base pretrained on all ten
tasks and eight adapters. The adapters' deltas are modest refinements of shared circuitry, as with LoRA adapters of a
pretrained LLM, so merging them keeps part of each skill and the combination types differ measurably (adapters that
teach brand-new skills to a 64-dim model destroy each other in any merge, which measures nothing).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

__all__ = [
    "ADAPTER_TASKS",
    "ADAPTER_TASKS_8",
    "BASE_TASKS",
    "PRETRAIN_ONLY_TASKS",
    "TASKS",
    "ModelSize",
    "Split",
    "build_base_model",
    "encode",
    "lora_config",
    "make_splits",
    "pretraining_mix",
    "train",
]

PAD, BOS, SEP, EOS = 0, 1, 2, 3
DIGIT0 = 4  # digits 0-9 are tokens 4..13


def _rotate(digits: Sequence[int]) -> list[int]:
    return [*digits[1:], digits[0]]


def _add3(digits: Sequence[int]) -> list[int]:
    return [(d + 3) % 10 for d in digits]


def _pairsum(digits: Sequence[int]) -> list[int]:
    return [(d + digits[(i + 1) % len(digits)]) % 10 for i, d in enumerate(digits)]


def _rotr(digits: Sequence[int]) -> list[int]:
    return [digits[-1], *digits[:-1]]


def _reverse(digits: Sequence[int]) -> list[int]:
    return list(reversed(digits))


def _swap(digits: Sequence[int]) -> list[int]:
    swapped = list(digits)
    for i in range(0, len(digits) - 1, 2):
        swapped[i], swapped[i + 1] = digits[i + 1], digits[i]
    return swapped


def _mul2(digits: Sequence[int]) -> list[int]:
    return [(2 * d) % 10 for d in digits]


def _diff(digits: Sequence[int]) -> list[int]:
    return [(digits[(i + 1) % len(digits)] - d) % 10 for i, d in enumerate(digits)]


# name -> answer function; the tag token of a task is its position in this dict after the digits.
TASKS: dict[str, Callable[[Sequence[int]], list[int]]] = {
    "copy": list,
    "rotate": _rotate,
    "sort": sorted,
    "add3": _add3,
    "pairsum": _pairsum,
    "rotr": _rotr,
    "reverse": _reverse,
    "swap": _swap,
    "mul2": _mul2,
    "diff": _diff,
}
TASK_DESCRIPTIONS = {
    "copy": "repeat the digits",
    "rotate": "move the first digit to the end",
    "sort": "sort the digits",
    "add3": "modular addition: each digit + 3 (mod 10)",
    "pairsum": "modular addition: each digit plus the next one (mod 10)",
    "rotr": "move the last digit to the front",
    "reverse": "reverse the digits",
    "swap": "swap neighbouring digits pairwise (the odd last one stays)",
    "mul2": "modular multiplication: each digit times 2 (mod 10)",
    "diff": "modular subtraction: the next digit minus each digit (mod 10)",
}
PRETRAIN_ONLY_TASKS = ("copy", "rotate")
ADAPTER_TASKS = ("sort", "add3", "pairsum", "rotr")
# The base of the 4-way setting and the pairs is pretrained on these six, as in 0.2.0.
BASE_TASKS = (*PRETRAIN_ONLY_TASKS, *ADAPTER_TASKS)
# The 8-adapter setting (more interference): the four above and four more of the same kind, on a base pretrained on
# all ten tasks. Task names become adapter names: none may shadow a `torch.nn.Module` attribute (`double`, `float`).
ADAPTER_TASKS_8 = (*ADAPTER_TASKS, "reverse", "swap", "mul2", "diff")
TAG = {name: DIGIT0 + 10 + index for index, name in enumerate(TASKS)}


def vocab_size(tasks: Sequence[str]) -> int:
    """The vocabulary of a base pretrained on `tasks` (a prefix of `TASKS`): digits, specials and their tags."""
    if tuple(tasks) != tuple(TASKS)[: len(tasks)]:
        raise ValueError(f"The pretraining tasks must be a prefix of {tuple(TASKS)}, got {tuple(tasks)}.")
    return DIGIT0 + 10 + len(tasks)


def encode(task: str, digits: Sequence[int]) -> dict[str, list[int]]:
    """One tokenized example: `input_ids` and `labels` (-100 on the prompt)."""
    prompt = [BOS, TAG[task], *(DIGIT0 + d for d in digits), SEP]
    answer = [*(DIGIT0 + d for d in TASKS[task](digits)), EOS]
    return {"input_ids": prompt + answer, "labels": [-100] * len(prompt) + answer}


@dataclass
class Split:
    """Disjoint digit strings for one task: training, weight-search (validation) and held-out test examples."""

    train: list[dict[str, list[int]]]
    search: list[dict[str, list[int]]]
    test: list[dict[str, list[int]]]


def pretraining_mix(
    lengths: tuple[int, ...], per_length: int, seed: int, tasks: Sequence[str] = tuple(TASKS)
) -> list[dict[str, list[int]]]:
    """Examples of `tasks` at the short `lengths` (at most `per_length` distinct strings per task and length)."""
    mix = []
    for task in tasks:
        for length in lengths:
            mix += make_splits(task, length, min(per_length, 10**length // 2), 0, 0, seed + 1000 + length).train
    return mix


def make_splits(task: str, length: int, train: int, search: int, test: int, seed: int) -> Split:
    """Draw `train + search + test` distinct digit strings of `length` digits and encode them for `task`."""
    rng = random.Random(f"{task}-{seed}")
    seen: set[tuple[int, ...]] = set()
    total = train + search + test
    if total > 10**length:
        raise ValueError(f"Cannot draw {total} distinct strings of {length} digits.")
    while len(seen) < total:
        seen.add(tuple(rng.randrange(10) for _ in range(length)))
    strings = sorted(seen)
    rng.shuffle(strings)
    examples = [encode(task, digits) for digits in strings]
    return Split(examples[:train], examples[train : train + search], examples[train + search :])


@dataclass(frozen=True)
class ModelSize:
    """The tiny Llama's shape."""

    hidden: int = 64
    layers: int = 2
    heads: int = 4
    intermediate: int = 128


def build_base_model(size: ModelSize, seed: int, tasks: Sequence[str] = tuple(TASKS)) -> torch.nn.Module:
    """A randomly initialized tiny Llama causal LM over the vocabulary of `tasks` (a prefix of `TASKS`)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size(tasks),
        hidden_size=size.hidden,
        intermediate_size=size.intermediate,
        num_hidden_layers=size.layers,
        num_attention_heads=size.heads,
        num_key_value_heads=size.heads,
        max_position_embeddings=64,
        pad_token_id=PAD,
        bos_token_id=BOS,
        eos_token_id=EOS,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config)


def lora_config(rank: int) -> object:
    """The LoRA config shared by every task adapter (same rank and targets, so PEFT's own types apply)."""
    from peft import LoraConfig

    return LoraConfig(
        r=rank,
        lora_alpha=2 * rank,
        lora_dropout=0.0,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    )


def _batch(examples: Sequence[dict[str, list[int]]], device: torch.device) -> dict[str, torch.Tensor]:
    width = max(len(example["input_ids"]) for example in examples)
    input_ids = torch.full((len(examples), width), PAD, dtype=torch.long)
    labels = torch.full((len(examples), width), -100, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, example in enumerate(examples):
        size = len(example["input_ids"])
        input_ids[row, :size] = torch.tensor(example["input_ids"])
        labels[row, :size] = torch.tensor(example["labels"])
        mask[row, :size] = 1
    return {"input_ids": input_ids.to(device), "labels": labels.to(device), "attention_mask": mask.to(device)}


def train(
    model: torch.nn.Module,
    examples: Sequence[dict[str, list[int]]],
    *,
    steps: int,
    lr: float,
    batch_size: int,
    seed: int,
) -> float:
    """Train the parameters of `model` that require grad with AdamW (cosine schedule); returns the last loss."""
    generator = random.Random(seed)
    pool = list(examples)
    torch.manual_seed(seed)
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.1)
    device = next(model.parameters()).device
    model.train()
    loss = torch.tensor(float("nan"))
    for _ in range(steps):
        batch = _batch(generator.sample(pool, min(batch_size, len(pool))), device)
        loss = model(**batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        schedule.step()
    model.eval()
    return float(loss.detach())
