"""Weight search: finds the weights an objective favours, leaves the model as it was plus one adapter, reproducible."""

from __future__ import annotations

import argparse
import json
import sys

import pytest
import torch
from conftest import add_lora, tiny_llama

from peft_merge_ext.errors import EvaluationInputError, MergeInputError, UnknownCombinationTypeError
from peft_merge_ext.search.evaluation import compute_metrics
from peft_merge_ext.search.search_cli import run_search_cli
from peft_merge_ext.search.weight_search import SCRATCH_ADAPTER, search_weights

TARGETS = ["q_proj", "v_proj", "down_proj"]


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny models run fastest on one thread, and do not fight other processes for the cores.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def three_adapters():
    """'good', 'bad' and 'other' (same rank and targets), with 'good' active and a trainable-looking state."""
    model = add_lora(tiny_llama(), "good", seed=1, r=4, lora_alpha=8, target_modules=TARGETS)
    add_lora(model, "bad", seed=2, r=4, lora_alpha=8, target_modules=TARGETS)
    add_lora(model, "other", seed=3, r=4, lora_alpha=8, target_modules=TARGETS)
    model.set_adapter("good")
    return model


INPUTS = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))


def logits(model, adapter=None):
    if adapter is not None:
        model.base_model.set_adapter(adapter)
    with torch.no_grad():
        return model(input_ids=INPUTS).logits


def matching(model, adapter="good"):
    """An objective whose minimum (0) is reached exactly by `adapter` alone: the MSE to its logits."""
    active = list(model.active_adapters)
    target = logits(model, adapter)
    model.base_model.set_adapter(active)

    def objective(candidate):
        with torch.no_grad():
            return float(((candidate(input_ids=INPUTS).logits - target) ** 2).mean())

    return objective


def snapshot(model):
    return {
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "grad": {k: p.requires_grad for k, p in model.named_parameters()},
        "active": list(model.active_adapters),
        "peft_active": model.active_adapter,
        "adapters": list(model.peft_config),
        "training": model.training,
    }


def assert_unchanged_but(model, before, new_adapter):
    after = snapshot(model)
    assert after["adapters"] == [*before["adapters"], new_adapter]
    assert after["active"] == before["active"]
    assert after["peft_active"] == before["peft_active"]
    assert after["training"] == before["training"]
    new_keys = {k for k in after["state"] if f".{new_adapter}." in k}
    assert new_keys, "the searched adapter has no weights"
    assert set(after["state"]) - new_keys == set(before["state"])
    for key, value in before["state"].items():
        assert torch.equal(after["state"][key], value), key
    for key, flag in before["grad"].items():
        assert after["grad"][key] == flag, key
    assert not any(after["grad"][k] for k in after["grad"] if f".{new_adapter}." in k)
    assert not any(SCRATCH_ADAPTER in k for k in after["state"])


def assert_adapter_is_merge(model, adapter_name, adapters, weights, combination_type="weighted", **options):
    """The searched adapter computes exactly the merge of `adapters` with `weights`."""
    model.add_weighted_adapter(adapters, weights, "check", combination_type=combination_type, **options)
    torch.testing.assert_close(logits(model, adapter_name), logits(model, "check"), rtol=1e-5, atol=1e-5)
    model.base_model.set_adapter(adapter_name)
    model.delete_adapter("check")


@pytest.mark.parametrize("optimizer", ["builtin", "optuna"])
def test_two_adapters_finds_the_better_one_and_leaves_model_unchanged(optimizer):
    if optimizer == "optuna":
        pytest.importorskip("optuna")
    model = three_adapters()
    model.train()
    objective = matching(model)
    before = snapshot(model)
    result = search_weights(model, ["good", "bad"], objective, budget=16, optimizer=optimizer, progress=False)
    assert result.optimizer == optimizer
    assert result.history[0].weights == [0.5, 0.5]  # equal weights first
    assert result.initial_value == result.history[0].value
    assert len(result.history) <= 16
    assert [t.number for t in result.history] == list(range(len(result.history)))
    assert result.value == min(t.value for t in result.history)
    assert result.value < 0.05 * result.initial_value
    good, bad = result.weights
    assert good > 0.8 and bad < 0.15, result.weights
    assert_unchanged_but(model, before, "searched")
    assert_adapter_is_merge(model, "searched", ["good", "bad"], result.weights)


def test_builtin_two_adapters_is_golden_section_on_the_mix():
    model = three_adapters()
    result = search_weights(
        model,
        ["good", "bad"],
        matching(model),
        combination_type="average",
        budget=30,
        optimizer="builtin",
        progress=False,
    )
    # Scale-invariant type: every trial lies on the segment w_1 + w_2 = 1, converging to the pure 'good' corner.
    assert all(sum(t.weights) == pytest.approx(1.0) for t in result.history)
    assert result.weights[0] > 0.99
    assert result.value < 1e-6 * result.initial_value


@pytest.mark.parametrize("optimizer", ["builtin", "optuna"])
def test_three_adapters_reproducible_with_seed(optimizer):
    if optimizer == "optuna":
        pytest.importorskip("optuna")
    runs = []
    for seed in (0, 0, 1):
        model = three_adapters()
        result = search_weights(
            model, ["bad", "good", "other"], matching(model), budget=14, seed=seed, optimizer=optimizer, progress=False
        )
        runs.append(result)
    first, again, other_seed = runs
    assert [t.weights for t in first.history] == [t.weights for t in again.history]
    assert [t.value for t in first.history] == [t.value for t in again.history]
    assert [t.weights for t in first.history] != [t.weights for t in other_seed.history]
    for result in (first, other_seed):
        bad, good, other = result.weights
        assert good > bad and good > other, result.weights
        assert result.value < result.initial_value


def test_dataset_objective_minimizes_loss():
    model = three_adapters()
    # Targets are what 'good' alone predicts greedily, so 'good' has the lowest loss on them.
    model.base_model.set_adapter("good")
    with torch.no_grad():
        predicted = model(input_ids=INPUTS).logits.argmax(-1)
    dataset = [
        {"input_ids": [*row[:6].tolist(), *next_row.tolist()], "labels": [-100] * 6 + next_row.tolist()}
        for row, next_row in zip(INPUTS, predicted[:, 5:11], strict=True)
    ]
    result = search_weights(model, ["good", "bad"], dataset, budget=10, optimizer="builtin", progress=False)
    model.base_model.set_adapter("searched")
    assert compute_metrics(model, dataset).loss == pytest.approx(result.value, rel=1e-5)
    assert result.weights[0] > result.weights[1]
    assert result.value < result.initial_value


def test_peft_own_type_goes_through_peft():
    model = three_adapters()
    before = snapshot(model)
    result = search_weights(model, ["good", "bad"], matching(model), combination_type="cat", budget=8, progress=False)
    assert result.weights[0] > result.weights[1]
    assert_unchanged_but(model, before, "searched")
    assert model.peft_config["searched"].r == 8  # PEFT's cat: ranks add up
    assert_adapter_is_merge(model, "searched", ["good", "bad"], result.weights, combination_type="cat")


def test_slerp_options_pass_through_and_svd_rank_bounds_the_rank():
    model = three_adapters()
    result = search_weights(
        model, ["good", "bad"], matching(model), combination_type="slerp", budget=6, svd_rank=3, progress=False
    )
    assert result.combination_type == "slerp"
    assert model.base_model.model.model.layers[0].self_attn.q_proj.r["searched"] <= 3
    assert_adapter_is_merge(model, "searched", ["good", "bad"], result.weights, combination_type="slerp", svd_rank=3)


def test_every_trial_value_is_the_objective_of_a_fresh_merge():
    # The scratch adapter is reused across trials (zero-padded factors) and rebuilt when a trial needs a higher rank
    # (the first trial has one weight 0, so rank 4; later trials need 8): every recorded value must still be exactly
    # what a freshly added adapter gives.
    model = three_adapters()
    objective = matching(model)
    result = search_weights(
        model, ["good", "bad"], objective, budget=6, initial_weights=[1.0, 0.0], optimizer="builtin", progress=False
    )
    for trial in result.history:
        model.add_weighted_adapter(["good", "bad"], trial.weights, "fresh", combination_type="weighted")
        model.base_model.set_adapter("fresh")
        assert objective(model) == pytest.approx(trial.value, rel=1e-4, abs=1e-9)
        model.base_model.set_adapter("good")
        model.delete_adapter("fresh")


def test_rejected_weights_are_failed_trials_not_crashes():
    model = three_adapters()
    # 'average' refuses weights summing to 0: the point (-1, 1) fails, the search carries on.
    result = search_weights(
        model,
        ["good", "bad"],
        matching(model),
        combination_type="average",
        bounds=[(-1.0, 1.0), (-1.0, 1.0)],
        initial_weights=[-1.0, 1.0],
        budget=5,
        optimizer="builtin",
        progress=False,
    )
    assert result.history[0].value == float("inf")
    assert result.value < float("inf")


def test_falls_back_to_builtin_without_optuna(monkeypatch):
    monkeypatch.setitem(sys.modules, "optuna", None)  # import optuna -> ImportError
    model = three_adapters()
    result = search_weights(model, ["good", "bad"], matching(model), budget=4, progress=False)
    assert result.optimizer == "builtin"
    with pytest.raises(MergeInputError, match=r"peft-merge-ext\[search\]"):
        search_weights(model, ["good", "bad"], matching(model), budget=4, optimizer="optuna", adapter_name="x")


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"adapter_name": "bad"}, MergeInputError, "already exists"),
        ({"adapters": ["good", "nope"]}, MergeInputError, "nope"),
        ({"bounds": (1.0, 0.0)}, MergeInputError, "low < high"),
        ({"bounds": [(0, 1)] * 3}, MergeInputError, "one pair per adapter"),
        ({"budget": 0}, MergeInputError, "budget"),
        ({"combination_type": "nonsense"}, UnknownCombinationTypeError, "nonsense"),
        ({"combination_type": "slerp", "adapters": ["good", "bad", "other"]}, MergeInputError, "exactly 2"),
        ({"t": 0.3}, MergeInputError, "Unknown option"),
        ({"initial_weights": [2.0, 0.0]}, MergeInputError, "within the bounds"),
        ({"objective": "text"}, EvaluationInputError, "objective"),
        ({"objective": ["a text"]}, EvaluationInputError, "tokenizer"),
    ],
)
def test_bad_input_raises_before_anything_changes(kwargs, error, message):
    model = three_adapters()
    before = snapshot(model)
    arguments = {"adapters": ["good", "bad"], "objective": matching(model), "budget": 3, "progress": False}
    arguments.update(kwargs)
    with pytest.raises(error, match=message):
        search_weights(model, arguments.pop("adapters"), arguments.pop("objective"), **arguments)
    after = snapshot(model)
    assert after["adapters"] == before["adapters"] and after["active"] == before["active"]
    assert all(torch.equal(after["state"][k], v) for k, v in before["state"].items())


def test_cli_searches_local_folders_and_saves_the_adapter(tmp_path, capsys):
    from peft import PeftModel
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "<pad>", *(f"w{i}" for i in range(2, 64))]  # one word per token id of the tiny model
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>")
    tiny_llama().save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    model = three_adapters()
    for name in ("good", "bad"):
        model.save_pretrained(tmp_path / "saved", selected_adapters=[name])
    folders = [tmp_path / "saved" / name for name in ("good", "bad")]
    model.base_model.set_adapter("good")
    with torch.no_grad():
        continuation = model(input_ids=INPUTS).logits.argmax(-1)
    lines = [
        json.dumps(
            {"prompt": " ".join(words[i] for i in row[:6]), "completion": " " + " ".join(words[i] for i in nxt)}
        )
        for row, nxt in zip(INPUTS.tolist(), continuation[:, 5:11].tolist(), strict=True)
    ]
    lines.append(json.dumps({"text": " ".join(words[i] for i in INPUTS[0].tolist())}))
    (tmp_path / "eval.jsonl").write_text("\n".join(lines) + "\n")
    args = argparse.Namespace(
        base=str(tmp_path / "base"),
        adapter=[str(f) for f in folders],
        eval_file=str(tmp_path / "eval.jsonl"),
        method="weighted",
        budget=5,
        seed=0,
        out=str(tmp_path / "out"),
    )
    assert run_search_cli(args) == 0
    printed = capsys.readouterr().out
    assert "good:" in printed and "bad:" in printed
    record = json.loads((tmp_path / "out" / "search.json").read_text())
    assert len(record["history"]) == 5 and record["adapters"] == ["good", "bad"]
    # The saved folder is a standard adapter that reproduces the searched merge.
    from transformers import AutoModelForCausalLM

    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "base"), tmp_path / "out")
    model.add_weighted_adapter(["good", "bad"], record["weights"], "check", combination_type="weighted")
    torch.testing.assert_close(logits(reloaded), logits(model, "check"), rtol=1e-5, atol=1e-5)


def test_cli_refuses_a_non_empty_output_folder(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    args = argparse.Namespace(base="b", adapter=["a"], eval_file="e", out=str(tmp_path / "out"))
    with pytest.raises(MergeInputError, match="not empty"):
        run_search_cli(args)
