"""The generated model card: front matter, tables, recipe, plugin hook, and no local paths or tokens."""

from __future__ import annotations

import os

import pytest
from conftest import add_lora, tiny_llama

from peft_merge_ext.engine.merge_info import AdapterInfo, MergeInfo
from peft_merge_ext.publish.card import TEMPLATE_PATH, build_model_card, public_name


def _info(**overrides):
    values = {
        "base_model": "org/base",
        "adapters": [
            AdapterInfo("a", "org/adapter-a", 0.6, 4, 8.0, ["q_proj", "v_proj"], sha256="ab" * 32),
            AdapterInfo("b", "/home/alice/adapters/adapter-b", 0.4, 6, 3.0, ["q_proj"], use_rslora=True),
        ],
        "combination_type": "slerp",
        "options": {"t": [0.2, 0.8]},
        "versions": {"peft": "0.21.2"},
    }
    values.update(overrides)
    return MergeInfo(**values)


def test_front_matter_and_body():
    card = build_model_card(
        _info(
            eval_results=[
                {
                    "task_type": "text-generation",
                    "dataset_type": "tiny",
                    "dataset_name": "Tiny",
                    "metric_type": "accuracy",
                    "metric_value": 0.5,
                }
            ]
        ),
        base_card_data={"license": "apache-2.0"},
        repo_id="user/merged",
        tags=["extra"],
    )
    data = card.data.to_dict()
    assert data["base_model"] == "org/base" and data["base_model_relation"] == "merge"
    assert data["library_name"] == "transformers" and data["license"] == "apache-2.0"
    assert {"merge", "lora", "peft", "peft-merge-ext", "slerp", "extra"} <= set(data["tags"])
    assert data["model-index"][0]["results"][0]["metrics"][0]["value"] == 0.5
    text = card.text
    assert "| a | 0.6 | 4 | 8.0 | q_proj, v_proj | `" + "ab" * 32 + "` |" in text
    assert "sin((1−t)θ)" in text and "`t`: `[0.2, 0.8]`" in text
    assert 'AutoModelForCausalLM.from_pretrained("user/merged")' in text
    assert "| peft | 0.21.2 |" in text


def test_adapter_card_and_single_adapter_relation():
    adapter_card = build_model_card(_info(merge_into_base=False), repo_id="user/adapter")
    assert adapter_card.data.library_name == "peft" and adapter_card.data.base_model_relation == "adapter"
    assert 'PeftModel.from_pretrained(base, "user/adapter")' in adapter_card.text
    single = build_model_card(_info(adapters=_info().adapters[:1], combination_type=None))
    assert single.data.base_model_relation == "finetune" and "single-adapter" in single.data.tags


def test_no_local_paths_user_names_or_tokens(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_secret_token_value")
    base_dir = tmp_path / "alice-private" / "my-base"
    tiny_llama().save_pretrained(base_dir)
    (base_dir / "README.md").write_text("---\nlicense: mit\n---\n# base\n")
    from transformers import AutoModelForCausalLM

    model = add_lora(AutoModelForCausalLM.from_pretrained(base_dir), "a", seed=1, r=4, target_modules=["q_proj"])
    folder = model.save_merged(tmp_path / "out")
    for path in folder.iterdir():
        if path.suffix in {".md", ".json"}:
            text = path.read_text()
            assert str(tmp_path) not in text and "alice-private" not in text, path.name
            assert "hf_secret_token_value" not in text and os.path.expanduser("~") + "/" not in text
    card = (folder / "README.md").read_text()
    assert "license: mit" in card  # inherited from the base folder's card
    assert "base_model:" not in card  # a local folder is not a Hub id
    assert public_name("/home/alice/adapters/adapter-b") == "adapter-b" and public_name("org/x") == "org/x"
    assert "/home/alice" not in build_model_card(_info()).text


def test_recipe_embedded():
    pytest.importorskip("peft_merge_ext.recipe")
    text = build_model_card(_info()).text
    assert "```yaml" in text and "method: slerp" in text and "adapter-b" in text


def test_plugin_hook_extends_card():
    from peft_merge_ext import hookimpl
    from peft_merge_ext.plugins.registry import get_plugin_manager

    class Extra:
        @hookimpl
        def extend_model_card(self, card, merge_info):
            card.text += f"\n## Extra\n{len(merge_info.adapters)} adapters seen by a plugin.\n"

    manager = get_plugin_manager()
    plugin = Extra()
    manager.register(plugin, name="test-card-extra")
    try:
        assert "2 adapters seen by a plugin." in build_model_card(_info()).text
    finally:
        manager.unregister(plugin)
    assert "seen by a plugin" not in build_model_card(_info()).text


def test_raising_card_hook_warns_and_the_card_is_still_built():
    from peft_merge_ext import hookimpl
    from peft_merge_ext.plugins.registry import get_plugin_manager

    class Broken:
        @hookimpl
        def extend_model_card(self, card, merge_info):
            raise RuntimeError("plugin bug")

    manager = get_plugin_manager()
    plugin = Broken()
    manager.register(plugin, name="test-card-broken")
    try:
        with pytest.warns(RuntimeWarning, match="test-card-broken.*plugin bug"):
            card = build_model_card(_info())
    finally:
        manager.unregister(plugin)
    assert "## Merged adapters" in card.text


def test_template_is_package_data():
    assert TEMPLATE_PATH.is_file() and TEMPLATE_PATH.parent.name == "templates"
    assert TEMPLATE_PATH.is_relative_to(__import__("peft_merge_ext").__path__[0])
