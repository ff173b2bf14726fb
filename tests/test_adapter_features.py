"""Adapter features beyond B @ A (DoRA, lora_bias, modules_to_save, trainable tokens, target_parameters, tied
embeddings) merged into the base, against PEFT's own `merge_and_unload` and the PEFT model's outputs: in memory
(`save_merged`), from disk (`merge_checkpoint`, the CLI; bit-identical to the in-memory file) and through the
quantized-base path. Plus the combinations that are defined and the refusals of those that are not."""

from __future__ import annotations

import copy
import dataclasses
import json
import warnings

import pytest
import torch
from conftest import tiny_gpt2
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file

from peft_merge_ext import merge_checkpoint
from peft_merge_ext.errors import AdapterCompatibilityError, MergeInputError
from peft_merge_ext.publish.checkpoint_plan import plan_checkpoint_merge

pytestmark = [
    pytest.mark.filterwarnings("ignore::UserWarning"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
]

INPUT = torch.tensor([[1, 5, 3, 9, 2, 7, 3], [4, 4, 8, 1, 0, 6, 5]])
TOLERANCE = {"rtol": 1e-5, "atol": 1e-5}


def _llama(**overrides):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    values = {"vocab_size": 64, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1}
    values.update({"num_attention_heads": 2, "num_key_value_heads": 2, "max_position_embeddings": 32, **overrides})
    return LlamaForCausalLM(LlamaConfig(**values)).eval()


def _mixtral():
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    config = MixtralConfig(
        vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, num_local_experts=3, num_experts_per_tok=2, max_position_embeddings=32,
    )  # fmt: skip
    return MixtralForCausalLM(config).eval()


def _trained(model, seed: int, name: str = "default", **config):
    """A LoRA adapter with random factors, and every piece beyond them (magnitudes, biases, copies, token rows)
    moved away from its initial value, as training would."""
    from peft import PeftModel

    torch.manual_seed(seed)
    lora = LoraConfig(r=2, lora_alpha=4, init_lora_weights=False, **config)
    if isinstance(model, PeftModel):
        model.add_adapter(name, lora)
    else:
        model = get_peft_model(model, lora, adapter_name=name)
    with torch.no_grad():
        for key, parameter in model.named_parameters():
            pieces = ("lora_magnitude_vector", "lora_B.bias", "modules_to_save", "trainable_tokens_delta")
            if f".{name}" in key and any(piece in key for piece in pieces):
                parameter.add_(torch.randn_like(parameter) * 0.2)
    return model.eval()


def _state(model) -> dict[str, torch.Tensor]:
    return {key: value.detach().clone() for key, value in model.state_dict().items()}


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(INPUT).logits


def _reload(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder).eval()


def _save_base(model, folder) -> None:
    """The base checkpoint as stored tensors (fused MoE experts kept fused), with its config."""
    model.config.architectures = [type(model).__name__]
    model.config.save_pretrained(folder)
    tied = set(getattr(model, "all_tied_weights_keys", None) or {})
    tensors = {k: v.contiguous() for k, v in model.state_dict().items() if k not in tied}
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})


def _weights(folder) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def _check_against_peft(peft_model, tmp_path, *, untied: bool = False, compare_merge_and_unload: bool = True) -> dict:
    """save_merged and merge_checkpoint of `peft_model`'s active adapter against PEFT; returns the merged weights."""
    expected_logits = _logits(peft_model)
    before = _state(peft_model)
    folder = peft_model.save_merged(tmp_path / "memory")
    assert all(torch.equal(before[k], v) for k, v in _state(peft_model).items())  # the model is not modified
    torch.testing.assert_close(_logits(peft_model), expected_logits, rtol=0, atol=0)
    reloaded = _reload(folder)
    torch.testing.assert_close(_logits(reloaded), expected_logits, **TOLERANCE)
    card = (folder / "README.md").read_text()
    if untied:
        assert reloaded.config.tie_word_embeddings is False
        assert "tie_word_embeddings: false" in card
    if compare_merge_and_unload:
        merged = copy.deepcopy(peft_model).merge_and_unload()
        reference = merged.state_dict()
        for key, tensor in reloaded.state_dict().items():
            torch.testing.assert_close(tensor, reference[key], **TOLERANCE, msg=key)
        torch.testing.assert_close(_logits(merged), expected_logits, **TOLERANCE)
    # From disk: the same adapter folder merged into the base checkpoint gives the same bytes.
    peft_model.save_pretrained(tmp_path / "adapter")
    result = merge_checkpoint(tmp_path / "base", [tmp_path / "adapter"], out=tmp_path / "disk", quiet=True)
    memory, disk = _weights(folder), _weights(result.path)
    assert memory.keys() == disk.keys()
    assert all(torch.equal(memory[key], disk[key]) for key in memory)
    assert result.merge_info.extras == json.loads(json.dumps(result.merge_info.extras))  # JSON-ready lineage
    return {"weights": memory, "card": card, "extras": result.merge_info.extras}


def test_dora_linear_and_embedding(tmp_path):
    base = _llama()
    _save_base(base, tmp_path / "base")
    model = _trained(base, 1, use_dora=True, target_modules=["q_proj", "v_proj", "embed_tokens"])
    found = _check_against_peft(model, tmp_path)
    assert found["extras"]["dora_magnitudes"] == [
        "model.embed_tokens.weight",
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.0.self_attn.v_proj.weight",
    ]
    assert "DoRA" in found["card"]


def test_dora_fan_in_fan_out_gpt2(tmp_path):
    base = tiny_gpt2(num_layers=1)
    base.save_pretrained(tmp_path / "base")
    model = _trained(base, 2, use_dora=True, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True)
    _check_against_peft(model, tmp_path)


def test_dora_conv_matches_peft_merge():
    from peft_merge_ext.lowrank.tensor_edits import apply_edit
    from peft_merge_ext.peft_bridge.extras import live_extras
    from peft_merge_ext.peft_bridge.layers import find_lora_modules, read_factors

    class Convs(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 5, 3)

    torch.manual_seed(0)
    model = _trained(Convs(), 3, use_dora=True, target_modules=["conv"])
    info = find_lora_modules(model.base_model.model, ["default"])[0]
    delta = read_factors(info, "default", torch.float64)
    extras = live_extras(model.base_model.model, "default")
    from peft_merge_ext.lowrank.tensor_edits import TensorEdit

    edit = TensorEdit("conv.weight", magnitude=extras.magnitudes["conv.weight"])
    ours = apply_edit(info.module.get_base_layer().weight.detach(), delta, False, edit)
    merged = copy.deepcopy(model).merge_and_unload()
    torch.testing.assert_close(ours, merged.conv.weight, **TOLERANCE)


def test_lora_bias(tmp_path):
    base = _llama(attention_bias=True)
    _save_base(base, tmp_path / "base")
    model = _trained(base, 4, lora_bias=True, target_modules=["q_proj", "v_proj"])
    found = _check_against_peft(model, tmp_path)
    assert found["extras"]["lora_biases"] == [
        "model.layers.0.self_attn.q_proj.bias",
        "model.layers.0.self_attn.v_proj.bias",
    ]


def test_modules_to_save(tmp_path):
    base = _llama()
    _save_base(base, tmp_path / "base")
    model = _trained(base, 5, target_modules=["q_proj"], modules_to_save=["lm_head", "model.norm"])
    found = _check_against_peft(model, tmp_path)
    assert found["extras"]["replaced_tensors"] == ["lm_head.weight", "model.norm.weight"]
    trained = model.base_model.model.lm_head.modules_to_save["default"].weight
    assert torch.equal(found["weights"]["lm_head.weight"], trained)  # the trained copy, exactly


def test_trainable_tokens(tmp_path):
    base = _llama()
    _save_base(base, tmp_path / "base")
    model = _trained(base, 6, target_modules=["q_proj"], trainable_token_indices={"embed_tokens": [3, 5, 60]})
    found = _check_against_peft(model, tmp_path)
    assert found["extras"]["replaced_rows"] == {"model.embed_tokens.weight": [3, 5, 60]}


def test_trainable_tokens_on_tied_embeddings_keep_the_tie(tmp_path):
    base = _llama(tie_word_embeddings=True)
    _save_base(base, tmp_path / "base")
    model = _trained(base, 7, target_modules=["q_proj"], trainable_token_indices=[2, 9])
    found = _check_against_peft(model, tmp_path)
    assert "lm_head.weight" not in found["weights"]  # written once: input and output embedding are still equal
    assert _reload(tmp_path / "memory").config.tie_word_embeddings is True
    assert "untied" not in found["extras"]


@pytest.mark.parametrize(
    "config",
    [
        {"target_modules": ["q_proj"], "modules_to_save": ["embed_tokens"]},
        {"target_modules": ["q_proj", "lm_head"]},
    ],
    ids=["modules_to_save-embedding", "lora-lm_head"],
)
def test_tied_embeddings_changed_on_one_side_are_untied(tmp_path, config):
    base = _llama(tie_word_embeddings=True)
    _save_base(base, tmp_path / "base")
    model = _trained(base, 8, **config)
    # LoRA on a tied lm_head: PEFT's merge_and_unload changes the shared tensor, so the input embedding changes too
    # and its outputs differ from the adapter's; the merge reproduces the adapter's outputs instead.
    found = _check_against_peft(model, tmp_path, untied=True, compare_merge_and_unload="lm_head" not in str(config))
    assert found["extras"]["untied"] == ["lm_head.weight", "model.embed_tokens.weight"]
    assert not torch.equal(found["weights"]["lm_head.weight"], found["weights"]["model.embed_tokens.weight"])


def test_target_parameters_moe_experts(tmp_path):
    base = _mixtral()
    _save_base(base, tmp_path / "base")  # fused expert tensors, as transformers holds them
    targets = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
    model = _trained(base, 9, target_modules=["q_proj"], target_parameters=targets)
    found = _check_against_peft(model, tmp_path)
    plan = plan_checkpoint_merge(tmp_path / "base", [tmp_path / "adapter"])
    assert "Beyond B @ A: expert_tensors 2" in plan.describe()  # what --dry-run prints
    assert found["extras"]["expert_tensors"] == [
        "model.layers.0.mlp.experts.down_proj",
        "model.layers.0.mlp.experts.gate_up_proj",
    ]


def test_target_parameters_on_a_2d_weight(tmp_path):
    base = _llama()
    _save_base(base, tmp_path / "base")
    model = _trained(base, 16, target_modules=[], target_parameters=["self_attn.o_proj.weight"])
    found = _check_against_peft(model, tmp_path)
    assert found["extras"]["expert_tensors"] == ["model.layers.0.self_attn.o_proj.weight"]


def test_weighted_expert_deltas_of_two_adapters(tmp_path):
    base = _mixtral()
    _save_base(base, tmp_path / "base")
    targets = ["mlp.experts.gate_up_proj"]
    model = _trained(base, 17, "x", target_modules=[], target_parameters=targets)
    _trained(model, 18, "y", target_modules=[], target_parameters=targets)
    weights = [0.6, -0.3]
    folder = model.save_merged(tmp_path / "memory", adapters=["x", "y"], weights=weights, combination_type="weighted")
    wrapper = model.base_model.model.model.layers[0].mlp.experts
    expected = wrapper.get_param().double() + sum(
        w * wrapper.get_delta_weight(name).double() for w, name in zip(weights, ["x", "y"], strict=True)
    )  # PEFT's own per-adapter delta of the whole expert stack
    merged = _weights(folder)
    key = "model.layers.0.mlp.experts.gate_up_proj"
    torch.testing.assert_close(merged[key].double(), expected, rtol=0, atol=1e-6)
    model.save_pretrained(tmp_path / "adapters")
    disk = merge_checkpoint(
        tmp_path / "base", [tmp_path / "adapters" / n for n in ("x", "y")], out=tmp_path / "disk", weights=weights,
        combination_type="weighted", quiet=True,
    )  # fmt: skip
    assert torch.equal(_weights(disk.path)[key], merged[key])
    with pytest.raises(AdapterCompatibilityError, match="'weighted' or 'average'"):
        model.save_merged(tmp_path / "slerp", adapters=["x", "y"], combination_type="slerp")


def test_target_parameters_on_a_per_expert_checkpoint(tmp_path):
    base = _mixtral()
    base.save_pretrained(tmp_path / "base")  # transformers writes Mixtral's experts one by one (w1/w2/w3)
    targets = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
    model = _trained(base, 19, target_modules=["q_proj"], target_parameters=targets)
    model.save_pretrained(tmp_path / "adapter")
    result = merge_checkpoint(tmp_path / "base", [tmp_path / "adapter"], out=tmp_path / "out", quiet=True)
    stored = _weights(result.path)
    assert "model.layers.0.block_sparse_moe.experts.2.w3.weight" in stored  # the base's own layout
    reloaded = _reload(result.path)
    torch.testing.assert_close(_logits(reloaded), _logits(model), **TOLERANCE)
    reference = copy.deepcopy(model).merge_and_unload().state_dict()
    for key, tensor in reloaded.state_dict().items():
        torch.testing.assert_close(tensor, reference[key], rtol=0, atol=1e-6, msg=key)
    # Without an architecture transformers can map, the stored tensors cannot be found: refused, with the fix.
    config = json.loads((tmp_path / "base" / "config.json").read_text())
    config["architectures"] = ["NoSuchMoeForCausalLM"]
    (tmp_path / "base" / "config.json").write_text(json.dumps(config))
    with pytest.raises(MergeInputError, match="save_merged"):
        merge_checkpoint(tmp_path / "base", [tmp_path / "adapter"], out=tmp_path / "refused", quiet=True)
    assert not (tmp_path / "refused").exists()


def test_cli_merge_of_dora_and_modules_to_save(tmp_path):
    from peft_merge_ext.cli import main

    base = _llama()
    _save_base(base, tmp_path / "base")
    model = _trained(base, 10, use_dora=True, target_modules=["q_proj"], modules_to_save=["lm_head"])
    model.save_pretrained(tmp_path / "adapter")
    expected = _logits(model)
    assert main(["merge", "--base", str(tmp_path / "base"), "--adapter", str(tmp_path / "adapter"),
                 "--out", str(tmp_path / "cli"), "--quiet"]) == 0  # fmt: skip
    torch.testing.assert_close(_logits(_reload(tmp_path / "cli")), expected, **TOLERANCE)


@pytest.mark.parametrize(
    "config",
    [
        {"use_dora": True, "modules_to_save": ["lm_head"], "trainable_token_indices": [4, 6]},
        {"lora_bias": True},  # PEFT refuses lora_bias with DoRA
    ],
    ids=["dora-copies-rows", "bias"],
)
def test_quantized_base_path(tmp_path, config):
    base = _llama(attention_bias=True)
    _save_base(base, tmp_path / "base")
    model = _trained(base, 11, target_modules=["q_proj"], **config)
    expected = _logits(model)
    plain = model.save_merged(tmp_path / "plain")
    model.base_model.model.config.quantization_config = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    try:
        folder = model.save_merged(tmp_path / "quantized", base_checkpoint=tmp_path / "base")
    finally:
        del model.base_model.model.config.quantization_config
    assert "full-precision" in (folder / "README.md").read_text()
    torch.testing.assert_close(_logits(_reload(folder)), expected, **TOLERANCE)
    memory, checkpoint = _weights(plain), _weights(folder)
    assert memory.keys() == checkpoint.keys() and all(torch.equal(memory[k], checkpoint[k]) for k in memory)


# ----------------------------------------------------------------------------------------------------------------
# Several adapters into the base: `weighted` / `average` define every piece but DoRA by the same linear rule.


def _two_adapters(base):
    # Both adapters train token rows: PEFT cannot save a model where only one of them does.
    model = _trained(base, 12, "x", lora_bias=True, target_modules=["q_proj"], modules_to_save=["lm_head"],
                     trainable_token_indices={"embed_tokens": [2, 3]})  # fmt: skip
    _trained(model, 13, "y", lora_bias=True, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"],
             trainable_token_indices={"embed_tokens": [1, 2]})  # fmt: skip
    return model


@pytest.mark.parametrize("method", ["weighted", "average"])
def test_weighted_and_average_combine_copies_biases_and_rows(tmp_path, method):
    base = _llama(attention_bias=True)
    _save_base(base, tmp_path / "base")
    model = _two_adapters(base)
    weights = [0.7, 0.5]
    folder = model.save_merged(tmp_path / "memory", adapters=["x", "y"], weights=weights, combination_type=method)
    merged = _weights(folder)
    coefficients = [w / sum(weights) for w in weights] if method == "average" else weights
    inner = model.base_model.model
    # Dense float64 reference, written from the adapters' own tensors: base + sum c_i (trained_i - base).
    head = base_head = inner.lm_head.original_module.weight.double()
    for c, name in zip(coefficients, ["x", "y"], strict=True):
        head = head + c * (inner.lm_head.modules_to_save[name].weight.double() - base_head)
    torch.testing.assert_close(merged["lm_head.weight"].double(), head, rtol=0, atol=1e-6)
    q_proj = inner.model.layers[0].self_attn.q_proj
    bias = q_proj.base_layer.bias.double() + sum(
        c * q_proj.lora_B[n].bias.double() * q_proj.scaling[n] for c, n in zip(coefficients, ["x", "y"], strict=True)
    )
    torch.testing.assert_close(merged["model.layers.0.self_attn.q_proj.bias"].double(), bias, rtol=0, atol=1e-6)
    tokens = inner.model.embed_tokens.token_adapter.trainable_tokens_delta
    base_rows = inner.model.embed_tokens.original_module.weight.double()
    rows = base_rows.clone()
    for c, name, indices in ((coefficients[0], "x", [2, 3]), (coefficients[1], "y", [1, 2])):
        rows[indices] += c * (tokens[name].double() - base_rows[indices])  # row 2: trained by both adapters
    torch.testing.assert_close(merged["model.embed_tokens.weight"].double(), rows, rtol=0, atol=1e-6)
    model.save_pretrained(tmp_path / "adapters")
    disk = merge_checkpoint(
        tmp_path / "base", [tmp_path / "adapters" / "x", tmp_path / "adapters" / "y"], out=tmp_path / "disk",
        weights=weights, combination_type=method, quiet=True,
    )  # fmt: skip
    on_disk = _weights(disk.path)
    assert all(torch.equal(merged[key], on_disk[key]) for key in merged)
    # The card's recipe, run again, gives the same bytes (its base and adapters are local folders here).
    from peft_merge_ext.cli import main
    from peft_merge_ext.recipe import recipe_from_merge_info

    recipe = dataclasses.replace(recipe_from_merge_info(disk.merge_info), base="../base")
    (tmp_path / "adapters" / "recipe.yaml").write_text(recipe.to_yaml())
    assert main(["run", str(tmp_path / "adapters" / "recipe.yaml"), "--quiet"]) == 0
    rerun = _weights(tmp_path / "adapters" / "merged")
    assert all(torch.equal(merged[key], rerun[key]) for key in merged)


def test_weighted_with_unit_weights_is_peft_merging_both_adapters(tmp_path):
    base = _llama(attention_bias=True)
    # (PEFT itself cannot merge two adapters of which only one trains token rows: that case is checked above.)
    model = _trained(base, 14, "x", lora_bias=True, target_modules=["q_proj"])
    _trained(model, 15, "y", lora_bias=True, target_modules=["q_proj", "v_proj"])
    model.base_model.set_adapter(["x", "y"])
    found = model.save_merged(tmp_path / "both")  # default for several adapters: weighted, weights 1
    reference = copy.deepcopy(model).merge_and_unload(adapter_names=["x", "y"]).state_dict()
    for key, tensor in _reload(found).state_dict().items():
        torch.testing.assert_close(tensor, reference[key], **TOLERANCE, msg=key)


# ----------------------------------------------------------------------------------------------------------------
# Refusals: a clear reason and what to do, before anything is written; the model unchanged.

REFUSED = {
    "dora-weighted": ({"adapters": ["dora", "plain"], "combination_type": "weighted"}, "not linear"),
    "dora-two-adapters": ({"adapters": ["dora", "plain"]}, "on its own with weight"),
    "dora-weight": ({"adapters": ["dora"], "weights": [0.5]}, "weight 0.5"),
    "copies-slerp": ({"adapters": ["saver", "plain"], "combination_type": "slerp"}, "'weighted' or"),
    "copies-peft-type": ({"adapters": ["saver", "plain"], "combination_type": "cat"}, "'weighted' or"),
    "adapter-output": ({"adapters": ["saver"], "merge_into_base": False}, "LoRA factors only"),
}


@pytest.fixture(scope="module")
def crowded():
    model = _trained(_llama(attention_bias=True), 20, "plain", target_modules=["q_proj"])
    _trained(model, 21, "dora", use_dora=True, target_modules=["q_proj"])
    _trained(model, 22, "saver", target_modules=["q_proj"], modules_to_save=["lm_head"])
    _trained(model, 23, "biased", lora_bias=True, target_modules=["q_proj"])
    return model


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_undefined_merges_are_refused_before_anything_is_written(crowded, tmp_path, case):
    arguments, message = REFUSED[case]
    before = _state(crowded)
    with pytest.raises(AdapterCompatibilityError, match=message):
        crowded.save_merged(tmp_path / "out", **arguments)
    assert not (tmp_path / "out").exists()
    assert all(torch.equal(before[k], v) for k, v in _state(crowded).items())


@pytest.mark.parametrize("adapter", ["dora", "saver", "biased"])
def test_add_weighted_adapter_refuses_features_it_would_drop(crowded, adapter):
    before = _state(crowded)
    with pytest.raises(AdapterCompatibilityError, match="holds LoRA factors only"):
        crowded.add_weighted_adapter([adapter, "plain"], [0.5, 0.5], "mixed", combination_type="weighted")
    assert "mixed" not in crowded.peft_config
    assert all(torch.equal(before[k], v) for k, v in _state(crowded).items())


def test_weights_without_their_config_option_are_refused(tmp_path):
    base = _llama()
    _save_base(base, tmp_path / "base")
    model = _trained(base, 24, use_dora=True, target_modules=["q_proj"])
    model.save_pretrained(tmp_path / "adapter")
    config_path = tmp_path / "adapter" / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["use_dora"] = False
    config_path.write_text(json.dumps(config))
    with warnings.catch_warnings(), pytest.raises(AdapterCompatibilityError, match="does not set use_dora"):
        merge_checkpoint(tmp_path / "base", [tmp_path / "adapter"], out=tmp_path / "out", quiet=True)
    assert not (tmp_path / "out").exists()


def test_digest_covers_what_the_adapter_stores_beyond_its_factors():
    from peft_merge_ext.peft_bridge.source import adapter_sha256

    model = _trained(_llama(), 30, use_dora=True, target_modules=["q_proj"], modules_to_save=["lm_head"])
    inner = model.base_model.model
    digests = [adapter_sha256(inner, "default")]
    with torch.no_grad():
        inner.model.layers[0].self_attn.q_proj.lora_magnitude_vector["default"].weight.add_(1.0)
        digests.append(adapter_sha256(inner, "default"))
        inner.lm_head.modules_to_save["default"].weight.add_(1.0)
        digests.append(adapter_sha256(inner, "default"))
    assert len(set(digests)) == 3
