"""Evaluation helpers: loss and greedy exact-match accuracy on eval sets, retention rows, state left as it was."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import add_lora, tiny_llama

from peft_merge_ext.errors import EvaluationInputError, MergeInputError
from peft_merge_ext.search.evaluation import compute_metrics, evaluate, prepare_examples, rows_to_markdown

TARGETS = ["q_proj", "v_proj", "down_proj"]


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def greedy(model, prompt, steps):
    """Greedy continuation of `prompt`, token by token (no KV cache, no generate() configuration involved)."""
    tokens = list(prompt)
    with torch.no_grad():
        for _ in range(steps):
            tokens.append(int(model(input_ids=torch.tensor([tokens])).logits[0, -1].argmax()))
    return tokens[len(prompt) :]


def prompts(count, seed=0, low=3, high=8):
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(low, high, (count,), generator=generator).tolist()
    return [torch.randint(2, 64, (n,), generator=generator).tolist() for n in lengths]


def completion_set(model, count=6, steps=3, seed=0, corrupt=()):
    """Prompt + greedy completion of `model`; examples whose index is in `corrupt` get a wrong last token."""
    examples = []
    for index, prompt in enumerate(prompts(count, seed)):
        answer = greedy(model, prompt, steps)
        if index in corrupt:
            answer[-1] = (answer[-1] + 1) % 64
        examples.append({"input_ids": prompt + answer, "labels": [-100] * len(prompt) + answer})
    return examples


def two_adapters():
    model = add_lora(tiny_llama(), "one", seed=1, r=4, lora_alpha=8, target_modules=TARGETS)
    add_lora(model, "two", seed=2, r=4, lora_alpha=8, target_modules=TARGETS)
    model.set_adapter("one")
    return model


def test_accuracy_is_greedy_exact_match_and_loss_is_token_nll():
    model = tiny_llama()
    examples = completion_set(model, count=6, corrupt={1, 4})
    metrics = compute_metrics(model, examples, batch_size=4)
    assert metrics.accuracy == pytest.approx(4 / 6)
    assert metrics.examples == 6 and metrics.tokens == 18
    assert metrics.token_accuracy == pytest.approx(16 / 18)
    # Loss: mean NLL over the scored tokens, as transformers computes it per example.
    total = 0.0
    with torch.no_grad():
        for example in examples:
            out = model(input_ids=torch.tensor([example["input_ids"]]), labels=torch.tensor([example["labels"]]))
            total += float(out.loss) * 3
    assert metrics.loss == pytest.approx(total / 18, rel=1e-5)


def test_padding_and_batch_size_do_not_change_the_metrics():
    model = tiny_llama()
    examples = completion_set(model, count=7, corrupt={2})
    one = compute_metrics(model, examples, batch_size=1)
    many = compute_metrics(model, examples, batch_size=7, pad_token_id=5)
    assert one.accuracy == many.accuracy == pytest.approx(6 / 7)
    assert one.loss == pytest.approx(many.loss, rel=1e-5)


def test_evaluate_rows_with_retention_and_state_restored():
    model = two_adapters()
    model.base_model.set_adapter("one")
    set_a = completion_set(model, count=5, corrupt=())
    model.base_model.set_adapter("two")
    set_b = completion_set(model, count=5, seed=1)
    model.add_weighted_adapter(["one", "two"], [0.5, 0.5], "merged", combination_type="weighted")
    model.base_model.set_adapter("one")
    model.train()
    flags = {name: p.requires_grad for name, p in model.named_parameters()}

    rows = evaluate(
        model,
        {"task_a": set_a, "task_b": set_b},
        adapter="merged",
        reference_adapters={"task_a": "one", "task_b": "two"},
        dataset_names={"task_a": "org/task-a"},
    )

    assert model.active_adapters == ["one"] and model.active_adapter == "one" and model.training
    assert {name: p.requires_grad for name, p in model.named_parameters()} == flags
    assert [(r["task_name"], r["metric_type"]) for r in rows] == [
        ("task_a", "loss"),
        ("task_a", "accuracy"),
        ("task_a", "retention"),
        ("task_b", "loss"),
        ("task_b", "accuracy"),
        ("task_b", "retention"),
    ]
    assert rows[0]["dataset_type"] == rows[0]["dataset_name"] == "org/task-a" and rows[3]["dataset_type"] == "task_b"
    assert all(r["task_type"] == "text-generation" and r["metric_args"]["adapter"] == "merged" for r in rows)
    assert rows[0]["metric_args"]["examples"] == 5
    model.base_model.set_adapter("merged")
    expected = compute_metrics(model, set_a)
    assert rows[0]["metric_value"] == pytest.approx(expected.loss)
    assert rows[1]["metric_value"] == pytest.approx(expected.accuracy)
    retention = rows[2]
    assert retention["metric_args"]["reference"] == "one"
    assert retention["metric_args"]["reference_accuracy"] == 1.0  # 'one' reproduces its own greedy outputs
    assert retention["metric_value"] == pytest.approx(expected.accuracy)
    assert "| task_a | org/task-a | Accuracy retention vs one |" in rows_to_markdown(rows)


def test_rows_are_model_card_eval_results():
    from huggingface_hub import EvalResult, ModelCardData

    model = two_adapters()
    rows = evaluate(model, {"copy": completion_set(model, count=2)}, adapter="two", reference_adapters="one")
    results = [EvalResult(**row) for row in rows]
    data = ModelCardData(model_name="merged", eval_results=results).to_dict()
    metrics = data["model-index"][0]["results"][0]["metrics"]
    assert [m["type"] for m in metrics] == ["loss", "accuracy", "retention"]
    assert metrics[2]["args"]["reference"] == "one"


def test_reference_adapter_alone_has_retention_one():
    model = two_adapters()
    examples = completion_set(model, count=4, corrupt={0})
    rows = evaluate(model, examples, adapter="one", reference_adapters="one", metrics=("accuracy", "token_accuracy"))
    assert [r["metric_type"] for r in rows] == ["accuracy", "token_accuracy", "retention"]
    assert rows[0]["metric_value"] == pytest.approx(0.75) and rows[2]["metric_value"] == 1.0
    assert rows[0]["task_name"] == "eval"


def test_zero_reference_accuracy_warns_and_skips_retention():
    model = two_adapters()
    examples = completion_set(model, count=3, corrupt={0, 1, 2})
    with pytest.warns(UserWarning, match="retention is undefined"):
        rows = evaluate(model, {"t": examples}, reference_adapters={"t": "one"})
    assert [r["metric_type"] for r in rows] == ["loss", "accuracy"]


def test_plain_model_and_text_examples_with_a_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "<pad>", *(f"w{i}" for i in range(2, 64))]  # one word per token id of the tiny model
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>")
    model = tiny_llama()
    prepared = prepare_examples(["w3 w4 w5", {"text": "w6 w7"}, {"prompt": "w8 w9", "completion": " w10"}], tokenizer)
    assert [e.input_ids for e in prepared] == [(3, 4, 5), (6, 7), (8, 9, 10)]
    assert prepared[2].labels == (-100, -100, 10)
    padded = prepare_examples([{"input_ids": torch.tensor([1, 2, 3, 0]), "attention_mask": [1, 1, 1, 0]}])
    assert padded[0].input_ids == (1, 2, 3) and padded[0].labels == (1, 2, 3)
    rows = evaluate(model, {"text": ["w3 w4 w5", "w6 w7"]}, tokenizer=tokenizer)
    assert rows[0]["metric_type"] == "loss" and math.isfinite(rows[0]["metric_value"])
    assert "adapter" not in rows[0]["metric_args"]


@pytest.mark.parametrize(
    ("eval_sets", "kwargs", "error", "message"),
    [
        ({"t": ["some text"]}, {}, EvaluationInputError, "tokenizer"),
        ({"t": [{"input_ids": [1, 2], "labels": [5, -100]}]}, {}, EvaluationInputError, "no scored token"),
        ({"t": [{"input_ids": [1, 2, 3], "labels": [1, 2]}]}, {}, EvaluationInputError, "one label per"),
        ({"t": []}, {}, EvaluationInputError, "empty"),
        ({"t": [42]}, {}, EvaluationInputError, "not understood"),
        ({}, {}, EvaluationInputError, "empty"),
        ({"t": [[1, 2, 3]]}, {"metrics": ("perplexity",)}, EvaluationInputError, "metrics"),
        ({"t": [{"input_ids": [1, 2, 3]}]}, {"adapter": "nope"}, MergeInputError, "nope"),
        ({"t": [{"input_ids": [1, 2, 3]}]}, {"reference_adapters": {"other": "one"}}, MergeInputError, "other"),
    ],
)
def test_bad_eval_input_is_a_clear_error(eval_sets, kwargs, error, message):
    model = two_adapters()
    with pytest.raises(error, match=message):
        evaluate(model, eval_sets, **kwargs)
    assert model.active_adapters == ["one"]
