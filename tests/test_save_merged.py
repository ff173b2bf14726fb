"""save_merged: merged weights reproduce the PEFT model, the model is never modified, output folders are atomic."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import add_lora, tiny_gpt2, tiny_llama

from peft_merge_ext.checkpoint.writer import ShardedSafetensorsWriter
from peft_merge_ext.errors import MergeInputError, PeftMergeExtError

INPUT = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(0))


def _snapshot(model):
    """Everything a save must leave alone: adapters, active adapters, grads, modes, every tensor, the outputs."""
    with torch.no_grad():
        logits = model(INPUT).logits.clone()
    return {
        "adapters": sorted(model.peft_config),
        "active": list(model.active_adapters),
        "grads": {n: p.requires_grad for n, p in model.named_parameters()},
        "training": model.training,
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "logits": logits,
    }


def _assert_unchanged(model, before):
    after = _snapshot(model)
    assert after["adapters"] == before["adapters"]
    assert after["active"] == before["active"]
    assert after["grads"] == before["grads"]
    assert after["training"] == before["training"]
    assert after["state"].keys() == before["state"].keys()
    for key, value in before["state"].items():
        assert torch.equal(after["state"][key], value), key
    assert torch.equal(after["logits"], before["logits"])


def _reload_logits(folder):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        return model(INPUT).logits, model


def _peft_logits(model):
    with torch.no_grad():
        return model(INPUT).logits


@pytest.fixture
def llama_peft(llama_two_adapters):
    return llama_two_adapters


def test_default_merges_active_adapter_and_reloads(llama_peft, tmp_path):
    before = _snapshot(llama_peft)
    folder = llama_peft.save_merged(tmp_path / "out")
    _assert_unchanged(llama_peft, before)
    logits, reloaded = _reload_logits(folder)
    torch.testing.assert_close(logits, before["logits"], rtol=1e-5, atol=1e-5)
    from safetensors import safe_open

    with safe_open(str(folder / "model.safetensors"), framework="pt") as handle:
        keys = set(handle.keys())
    assert not reloaded.config.tie_word_embeddings
    assert keys == set(tiny_llama().state_dict())  # exactly the plain base model's keys
    assert not any("lora_" in key or "base_layer" in key for key in keys)
    config = json.loads((folder / "config.json").read_text())
    assert config["dtype"] == "float32" and "quantization_config" not in config
    assert (folder / "generation_config.json").is_file() and (folder / "README.md").is_file()


def test_sharding_with_small_max_shard_size(llama_peft, tmp_path):
    folder = llama_peft.save_merged(tmp_path / "out", max_shard_size="20KB")
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert set(index["weight_map"]) == set(tiny_llama().state_dict())
    logits, _ = _reload_logits(folder)
    torch.testing.assert_close(logits, _peft_logits(llama_peft), rtol=1e-5, atol=1e-5)


def test_several_active_adapters_are_summed(llama_peft, tmp_path):
    llama_peft.base_model.set_adapter(["a", "b"])
    expected = _peft_logits(llama_peft)
    folder = llama_peft.save_merged(tmp_path / "out")
    assert list(llama_peft.active_adapters) == ["a", "b"]
    logits, _ = _reload_logits(folder)
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)


def test_plugin_combination_matches_add_weighted_adapter(llama_peft, tmp_path):
    before = _snapshot(llama_peft)
    folder = llama_peft.save_merged(
        tmp_path / "out", adapters=["a", "b"], weights=[0.7, 0.3], combination_type="slerp", t=[0.2, 0.8]
    )
    _assert_unchanged(llama_peft, before)
    reference = copy.deepcopy(llama_peft)
    reference.add_weighted_adapter(["a", "b"], [0.7, 0.3], "m", combination_type="slerp", t=[0.2, 0.8])
    reference.set_adapter("m")
    logits, _ = _reload_logits(folder)
    torch.testing.assert_close(logits, _peft_logits(reference), rtol=1e-5, atol=1e-5)
    card = (folder / "README.md").read_text()
    assert "slerp" in card and "| a | 0.7 | 4 | 8.0 |" in card
    assert "sha256 is computed over each adapter's LoRA tensors" in card  # in memory there is no adapter file


@pytest.mark.parametrize("combination_type", ["cat", "svd"])
def test_peft_combination_type_leaves_model_unchanged(llama_peft, tmp_path, combination_type):
    llama_peft.train()
    before = _snapshot(llama_peft)
    folder = llama_peft.save_merged(
        tmp_path / "out", adapters=["a", "b"], weights=[1.0, 0.5], combination_type=combination_type
    )
    _assert_unchanged(llama_peft, before)
    llama_peft.eval()
    reference = copy.deepcopy(llama_peft)
    reference.add_weighted_adapter(["a", "b"], [1.0, 0.5], "m", combination_type=combination_type)
    reference.set_adapter("m")
    logits, _ = _reload_logits(folder)
    torch.testing.assert_close(logits, _peft_logits(reference), rtol=1e-4, atol=1e-4)


def test_adapter_only_mode_reloads_with_peft(llama_peft, tmp_path):
    from peft import PeftModel

    llama_peft.base_model.set_adapter(["a", "b"])
    expected = _peft_logits(llama_peft)
    folder = llama_peft.save_merged(
        tmp_path / "adapter", adapters=["a", "b"], combination_type="weighted", merge_into_base=False
    )
    assert {p.name for p in folder.iterdir()} == {
        "adapter_model.safetensors",
        "adapter_config.json",
        "README.md",
        "peft_merge_ext_lineage.json",  # how it was made (PEFT ignores it)
        ".peft-merge-ext.json",  # the marker: written by peft-merge-ext
        ".peft-merge-ext-files.json",  # what the merge wrote (what an upload sends)
    }
    reloaded = PeftModel.from_pretrained(tiny_llama(), folder).eval()
    torch.testing.assert_close(_peft_logits(reloaded), expected, rtol=1e-5, atol=1e-5)
    assert "library_name: peft" in (folder / "README.md").read_text()


def test_gpt2_conv1d_and_tied_embeddings(tmp_path):
    model = add_lora(
        tiny_gpt2(), "a", seed=3, r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True
    )
    expected = _peft_logits(model)
    folder = model.save_merged(tmp_path / "out")
    logits, reloaded = _reload_logits(folder)
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
    from safetensors import safe_open

    with safe_open(str(folder / "model.safetensors"), framework="pt") as handle:
        keys = set(handle.keys())
    assert "lm_head.weight" not in keys and "transformer.wte.weight" in keys  # tied: written once
    assert reloaded.config.tie_word_embeddings


def test_lora_on_tied_embedding_unties_and_says_so(tmp_path):
    model = add_lora(
        tiny_gpt2(), "a", seed=4, r=4, lora_alpha=8, target_modules=["wte", "c_attn"], fan_in_fan_out=True
    )
    expected = _peft_logits(model)
    folder = model.save_merged(tmp_path / "out")
    logits, reloaded = _reload_logits(folder)
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
    assert reloaded.config.tie_word_embeddings is False
    assert not torch.equal(reloaded.lm_head.weight, reloaded.transformer.wte.weight)
    assert "tie_word_embeddings: false" in (folder / "README.md").read_text()


def test_transformers_load_adapter_integration(llama_peft, tmp_path):
    llama_peft.save_pretrained(tmp_path / "adapters")
    base = tiny_llama()
    try:
        base.load_adapter(str(tmp_path / "adapters" / "a"), adapter_name="a")
    except ValueError as error:  # transformers 5.x wants a newer PEFT: do the same steps with PEFT's public API
        if "version of PEFT" not in str(error):
            raise
        from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict
        from safetensors.torch import load_file

        config = LoraConfig.from_pretrained(tmp_path / "adapters" / "a")
        inject_adapter_in_model(config, base, adapter_name="a")
        state = load_file(tmp_path / "adapters" / "a" / "adapter_model.safetensors")
        set_peft_model_state_dict(base, {k.removeprefix("base_model.model."): v for k, v in state.items()}, "a")
        base._hf_peft_config_loaded = True
        base.peft_config = {"a": config}
    expected = _peft_logits(base)
    folder = base.save_merged(tmp_path / "out")
    assert base._hf_peft_config_loaded and list(base.peft_config) == ["a"]
    logits, _ = _reload_logits(folder)
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)


def test_bfloat16_output_records_dtype(llama_peft, tmp_path):
    folder = llama_peft.save_merged(tmp_path / "out", dtype="bfloat16")
    assert json.loads((folder / "config.json").read_text())["dtype"] == "bfloat16"
    logits, reloaded = _reload_logits(folder)
    assert reloaded.dtype == torch.bfloat16
    torch.testing.assert_close(logits.float(), _peft_logits(llama_peft), rtol=0.05, atol=0.05)


def test_offloaded_model_is_onloaded_module_by_module(tmp_path):
    from accelerate import dispatch_model

    model = add_lora(tiny_llama(), "a", seed=5, r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"])
    add_lora(model, "b", seed=6, r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"])
    model.base_model.set_adapter(["a", "b"])
    expected = _peft_logits(model)
    average = copy.deepcopy(model)
    average.add_weighted_adapter(["a", "b"], [1.0, 1.0], "m", combination_type="average")
    average.set_adapter("m")
    expected_average = _peft_logits(average)
    prefix = "base_model.model."
    device_map = {f"{prefix}model.embed_tokens": "cpu", f"{prefix}model.layers.0": "cpu",
                  f"{prefix}model.layers.1": "disk", f"{prefix}model.norm": "cpu", f"{prefix}model.rotary_emb": "cpu",
                  f"{prefix}lm_head": "cpu"}  # fmt: skip
    model = dispatch_model(model, device_map=device_map, offload_dir=str(tmp_path / "offload"))
    offloaded = {n for n, p in model.named_parameters() if p.device.type == "meta"}
    assert any("lora_A" in n for n in offloaded) and any("base_layer" in n for n in offloaded)
    folder = model.save_merged(tmp_path / "out", combination_type="average", weights=[1.0, 1.0])
    assert {n for n, p in model.named_parameters() if p.device.type == "meta"} == offloaded  # still offloaded
    torch.testing.assert_close(_reload_logits(folder)[0], expected_average, rtol=1e-5, atol=1e-5)
    summed = model.save_merged(tmp_path / "sum")  # default: the active adapters, summed
    torch.testing.assert_close(_reload_logits(summed)[0], expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(MergeInputError, match="offloaded"):
        model.save_merged(tmp_path / "peft_type", combination_type="cat")


def test_quantized_base_needs_full_precision_checkpoint(tmp_path):
    tiny_llama().save_pretrained(tmp_path / "base")  # the same weights (same seed), kept on disk
    model = add_lora(tiny_llama(), "a", seed=6, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    expected = _peft_logits(model)
    # A quantization_config on the config: the in-memory weights count as quantized and are never merged into.
    model.base_model.model.config.quantization_config = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    with pytest.raises(MergeInputError, match="base_checkpoint"):
        model.save_merged(tmp_path / "fails")
    assert not (tmp_path / "fails").exists()
    folder = model.save_merged(tmp_path / "out", base_checkpoint=tmp_path / "base")
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config
    assert "full-precision" in (folder / "README.md").read_text()
    logits, _ = _reload_logits(folder)
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
    # The in-memory weights were not read: poisoning them does not change the output.
    with torch.no_grad():
        model.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight.add_(1.0)
    again = model.save_merged(tmp_path / "again", base_checkpoint=tmp_path / "base")
    torch.testing.assert_close(_reload_logits(again)[0], expected, rtol=1e-5, atol=1e-5)


def test_checkpoint_path_unties_embedding_changed_by_an_adapter(tmp_path):
    tiny_gpt2().save_pretrained(tmp_path / "base")  # tied: the checkpoint has no lm_head.weight
    model = add_lora(tiny_gpt2(), "a", seed=8, r=4, target_modules=["wte", "c_attn"], fan_in_fan_out=True)
    expected = _peft_logits(model)
    model.base_model.model.config.quantization_config = {"quant_method": "bitsandbytes", "load_in_8bit": True}
    folder = model.save_merged(tmp_path / "out", base_checkpoint=tmp_path / "base")
    logits, reloaded = _reload_logits(folder)
    assert reloaded.config.tie_word_embeddings is False
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)


def test_bitsandbytes_base_merges_into_checkpoint_weights(tmp_path):
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    tiny_llama(hidden_size=64, intermediate_size=128).save_pretrained(tmp_path / "base")
    (tmp_path / "base" / "tokenizer_config.json").write_text("{}")
    full = add_lora(
        AutoModelForCausalLM.from_pretrained(tmp_path / "base"), "a", seed=7, r=4, target_modules=["q_proj"]
    )
    quantized = AutoModelForCausalLM.from_pretrained(
        tmp_path / "base", quantization_config=BitsAndBytesConfig(load_in_8bit=True), device_map="cpu"
    )
    model = add_lora(quantized, "a", seed=7, r=4, target_modules=["q_proj"])
    folder = model.save_merged(tmp_path / "out")  # the base folder is found from the model's name_or_path
    assert "quantization_config" not in json.loads((folder / "config.json").read_text())
    assert (folder / "tokenizer_config.json").is_file()
    logits, _ = _reload_logits(folder)
    torch.testing.assert_close(logits, _peft_logits(full), rtol=1e-5, atol=1e-5)  # exact, not the int8 weights


def test_failure_midway_leaves_no_folder_and_model_unchanged(llama_peft, tmp_path, monkeypatch):
    before = _snapshot(llama_peft)
    calls = []
    original_write = ShardedSafetensorsWriter.write

    def failing_write(self, name, tensor):
        calls.append(name)
        if len(calls) == 5:
            raise OSError("disk full (simulated)")
        return original_write(self, name, tensor)

    monkeypatch.setattr(ShardedSafetensorsWriter, "write", failing_write)
    with pytest.raises(OSError, match="disk full"):
        llama_peft.save_merged(tmp_path / "out", max_shard_size="10KB")
    assert not (tmp_path / "out").exists()
    assert list(tmp_path.iterdir()) == []
    _assert_unchanged(llama_peft, before)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"adapters": ["nope"]}, "Unknown adapter"),
        ({"adapters": ["a", "b"], "combination_type": "no_such_type"}, "Unknown combination_type"),
        ({"adapters": ["a", "b"], "combination_type": "slerp", "bogus": 1}, "Unknown option"),
        ({"dtype": "int8"}, "dtype"),
        ({"max_shard_size": "lots"}, "max_shard_size"),
        ({"t": 0.3}, "belong to a combination type"),
        ({"tags": "merge"}, "tags"),
        ({"eval_results": [{"metric_value": 1.0}]}, "eval_results"),
        ({"adapters": ["a", "b"], "combination_type": "ties", "t": 0.3}, "Unknown option"),
        ({"adapters": ["a", "b"], "combination_type": "ties"}, "refused"),  # PEFT's ties needs a density
    ],
)
def test_bad_input_raises_before_anything(llama_peft, tmp_path, kwargs, match):
    before = _snapshot(llama_peft)
    with pytest.raises(PeftMergeExtError, match=match):
        llama_peft.save_merged(tmp_path / "out", **kwargs)
    assert not (tmp_path / "out").exists()
    _assert_unchanged(llama_peft, before)


def test_existing_folder_needs_overwrite(llama_peft, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    with pytest.raises(MergeInputError, match="overwrite=True"):
        llama_peft.save_merged(tmp_path / "out")
    assert (tmp_path / "out" / "keep.txt").is_file()
    with pytest.raises(MergeInputError, match="not written by peft-merge-ext"):  # overwrite never deletes user files
        llama_peft.save_merged(tmp_path / "out", overwrite=True)
    assert (tmp_path / "out" / "keep.txt").is_file()
    llama_peft.save_merged(tmp_path / "ours")
    llama_peft.save_merged(tmp_path / "ours", overwrite=True, dtype="bf16")  # dtype names work in memory too
    assert json.loads((tmp_path / "ours" / "config.json").read_text())["dtype"] == "bfloat16"


def test_meta_weights_without_offload_hook_are_refused(tmp_path):
    with torch.device("meta"):
        base = tiny_llama()
    model = add_lora(base, "a", seed=1, r=4, target_modules=["q_proj"])
    with pytest.raises(MergeInputError, match="meta device"):
        model.save_merged(tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_plain_model_without_adapters_is_refused(tmp_path):
    with pytest.raises(MergeInputError, match="no LoRA adapters"):
        tiny_llama().save_merged(tmp_path / "out")


def test_methods_follow_install_and_uninstall():
    from peft import PeftModel
    from transformers import PreTrainedModel

    import peft_merge_ext

    assert callable(PeftModel.save_merged) and callable(PreTrainedModel.push_merged)
    peft_merge_ext.uninstall()
    try:
        assert not hasattr(PeftModel, "save_merged") and not hasattr(PreTrainedModel, "push_merged")
    finally:
        peft_merge_ext.install()
    assert "save_merged" in PeftModel.__dict__ and "push_merged" in PreTrainedModel.__dict__
