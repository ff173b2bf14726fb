"""No local path in any output: configs, tokenizer configs, adapter configs, lineage records and cards name a base or
an adapter by its Hub id when known, otherwise not at all (or by its folder name)."""

from __future__ import annotations

import json
from pathlib import Path

from conftest import add_lora, tiny_llama

PRIVATE = "/home/alice/private/base-ckpt"


def _assert_no_paths(folder: Path, *paths: Path | str) -> None:
    needles = [str(path).encode() for path in paths] + [PRIVATE.encode(), b"/home/alice"]
    for file in folder.rglob("*"):
        if file.is_file():
            data = file.read_bytes()
            leaked = [needle.decode() for needle in needles if needle in data]
            assert not leaked, f"{file.name} holds {leaked}"


def _base_with_private_paths(folder: Path) -> None:
    tiny_llama().save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    config["_name_or_path"] = PRIVATE
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "tokenizer_config.json").write_text(json.dumps({"name_or_path": PRIVATE, "model_max_length": 64}))


def test_streamed_merge_and_adapter_outputs_hold_no_local_path(tmp_path):
    from peft_merge_ext import merge_checkpoint

    _base_with_private_paths(tmp_path / "base")
    model = add_lora(tiny_llama(), "a", seed=1, r=2, target_modules=["q_proj"])
    add_lora(model, "b", seed=2, r=3, target_modules=["q_proj", "v_proj"])
    model.peft_config["a"].base_model_name_or_path = PRIVATE
    model.save_pretrained(tmp_path / "adapters")
    adapters = [tmp_path / "adapters" / "a", tmp_path / "adapters" / "b"]
    merge_checkpoint(tmp_path / "base", adapters, out=tmp_path / "merged", combination_type="slerp", quiet=True)
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert "_name_or_path" not in config
    tokenizer = json.loads((tmp_path / "merged" / "tokenizer_config.json").read_text())
    assert "name_or_path" not in tokenizer and tokenizer["model_max_length"] == 64
    _assert_no_paths(tmp_path / "merged", tmp_path)
    merge_checkpoint(
        tmp_path / "base", adapters, out=tmp_path / "adapter", combination_type="weighted", merge_into_base=False
    )
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"] is None
    _assert_no_paths(tmp_path / "adapter", tmp_path)


def test_in_memory_outputs_hold_no_local_path(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    _base_with_private_paths(tmp_path / "base")
    add_lora(tiny_llama(), "a", seed=1, r=2, target_modules=["q_proj"]).save_pretrained(tmp_path / "adapters")
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    model = PeftModel.from_pretrained(base, tmp_path / "adapters" / "a", adapter_name="a")
    model.save_merged(tmp_path / "merged")
    _assert_no_paths(tmp_path / "merged", tmp_path)
    model.save_merged(tmp_path / "adapter", merge_into_base=False)
    _assert_no_paths(tmp_path / "adapter", tmp_path)


def test_a_hub_id_replaces_the_path(tmp_path):
    from peft_merge_ext import merge_checkpoint

    _base_with_private_paths(tmp_path / "base")
    add_lora(tiny_llama(), "a", seed=1, r=2, target_modules=["q_proj"]).save_pretrained(tmp_path / "adapters")
    config = json.loads((tmp_path / "adapters" / "a" / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "org/base-model"
    (tmp_path / "adapters" / "a" / "adapter_config.json").write_text(json.dumps(config))
    merge_checkpoint(tmp_path / "base", [tmp_path / "adapters" / "a"], out=tmp_path / "merged", quiet=True)
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["_name_or_path"] == "org/base-model"
    assert "base_model: org/base-model" in (tmp_path / "merged" / "README.md").read_text()
