"""YAML recipes: the documented schema, validation errors that name the field, round trips, and the recipe inside a
generated model card rerunning as-is with `peft-merge-ext run`."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import torch
from conftest import add_lora, tiny_llama
from safetensors.torch import load_file

from peft_merge_ext.cli import main
from peft_merge_ext.recipe import (
    AdapterEntry,
    PushTarget,
    Recipe,
    RecipeError,
    RecipeStep,
    load_recipe,
    recipe_from_merge_info,
)

DOCUMENTED = """
base: org/base-model            # Hub id or local folder
adapters:
  - path: org/adapter-a         # Hub id or local folder
    weight: 0.6
  - path: ./adapter-b
    weight: 0.4
method: slerp                   # any registered type or PEFT-free name; omit for a single adapter
options: {t: [0.2, 0.8]}        # the method's options
svd_rank: null
dtype: bfloat16                 # optional
merge_into_base: true
output: ./merged
push: {repo_id: user/name, private: false}   # optional
"""


def test_documented_recipe_loads():
    recipe = load_recipe(DOCUMENTED)
    step = RecipeStep(
        adapters=[AdapterEntry("org/adapter-a", 0.6), AdapterEntry("./adapter-b", 0.4)],
        method="slerp",
        options={"t": [0.2, 0.8]},
        svd_rank=None,
        dtype="bfloat16",
        merge_into_base=True,
        output="./merged",
    )
    assert recipe == Recipe(base="org/base-model", steps=[step], push=PushTarget("user/name", False))


def test_round_trip_through_yaml_and_a_file(tmp_path):
    step = RecipeStep(
        adapters=[AdapterEntry("a", 1.0), AdapterEntry("b", -0.5)],
        method="karcher",
        options={"tol": 1e-8, "max_iter": 20},
        svd_rank=8,
        dtype="float16",
        output="out",
    )
    recipe = Recipe(base="./base", steps=[step])
    assert load_recipe(recipe.to_yaml()) == recipe
    two = Recipe(base="./base", steps=[RecipeStep([AdapterEntry("x")], merge_into_base=False, output="s/x"), step])
    assert load_recipe(two.to_yaml()) == two and "steps:" in two.to_yaml()
    path = tmp_path / "recipe.yaml"
    path.write_text(recipe.to_yaml())
    loaded = load_recipe(path)
    assert loaded == recipe and loaded.source_dir == tmp_path


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ("adapters: [{path: a}]", "base"),
        ("base: b\nadapters: []", "adapters"),
        ("base: b\nadapters: [{path: a, weight: heavy}]", "adapters[0].weight"),
        ("base: b\nadapters: [{path: a}, {path: c, weight: .nan}]\nmethod: weighted", "adapters[1].weight"),
        ("base: b\nadapters: [{path: a, scale: 2}]", "adapters[0].scale"),
        ("base: b\nadapters: [{weight: 1}]", "adapters[0].path"),
        ("base: b\nadapters: [a, c]", "method"),
        ("base: b\nadapters: [a]\nsvd_rank: 0", "svd_rank"),
        ("base: b\nadapters: [a]\ndtype: int3", "dtype"),
        ("base: b\nadapters: [a]\nmerge_into_base: maybe", "merge_into_base"),
        ("base: b\nadapters: [a]\npush: {repo_id: u/n, private: sometimes}", "push.private"),
        ("base: b\nadapters: [a]\nmethods: slerp", "methods"),
        ("base: b\nadapters: [a]\noptions: [1, 2]\nmethod: slerp", "options"),
    ],
)
def test_invalid_fields_are_named(text, field):
    with pytest.raises(RecipeError, match=re.escape(f"'{field}'")):
        load_recipe(text)


def test_invalid_yaml_and_missing_file(tmp_path):
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe("base: [unclosed\nadapters: x")
    with pytest.raises(RecipeError, match="does not exist"):
        load_recipe(tmp_path / "missing.yaml")


def _cache_repo(cache: Path, repo_id: str, source: Path) -> None:
    """Put a folder into a Hugging Face cache layout, as `hf download` leaves it."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    commit = "0" * 40
    shutil.copytree(source, repo / "snapshots" / commit)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)


def _card_recipe(folder: Path) -> str:
    card = (folder / "README.md").read_text()
    return card.split("```yaml\n", 1)[1].split("```", 1)[0]


def test_recipe_in_a_model_card_reruns_as_is(tmp_path, monkeypatch):
    import huggingface_hub.constants

    from peft_merge_ext.publish.merge_checkpoint import merge_checkpoint

    staging = tmp_path / "staging"
    base = tiny_llama()
    base.save_pretrained(staging / "base")
    model = add_lora(base, "a", seed=1, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    add_lora(model, "b", seed=2, r=2, lora_alpha=2, use_rslora=True, target_modules=["q_proj", "o_proj"])
    model.save_pretrained(staging / "adapters")
    cache = tmp_path / "hf-cache"
    _cache_repo(cache, "test-org/tiny-base", staging / "base")
    _cache_repo(cache, "test-org/adapter-a", staging / "adapters" / "a")
    _cache_repo(cache, "test-org/adapter-b", staging / "adapters" / "b")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))

    first = merge_checkpoint(
        "test-org/tiny-base",
        ["test-org/adapter-a", "test-org/adapter-b"],
        out=tmp_path / "first",
        combination_type="slerp",
        weights=[0.7, 0.3],
        t=[0.1, 0.6],
        dtype="bfloat16",
        quiet=True,
    )
    recipe_text = _card_recipe(first.path)
    recipe = load_recipe(recipe_text)
    assert recipe == recipe_from_merge_info(first.merge_info)
    assert recipe.base == "test-org/tiny-base" and [a.path for a in recipe.adapters] == [
        "test-org/adapter-a",
        "test-org/adapter-b",
    ]
    rerun = tmp_path / "rerun"
    rerun.mkdir()
    (rerun / "recipe.yaml").write_text(recipe_text)
    monkeypatch.chdir(rerun)
    assert main(["run", "recipe.yaml", "--quiet"]) == 0
    expected = load_file(str(first.path / "model.safetensors"))
    got = load_file(str(rerun / "merged" / "model.safetensors"))
    assert set(got) == set(expected)
    assert all(torch.equal(got[key], expected[key]) for key in expected)
    assert _card_recipe(rerun / "merged") == recipe_text


def test_local_folders_are_resolved_next_to_the_recipe(tmp_path, monkeypatch):
    base = tiny_llama()
    base.save_pretrained(tmp_path / "project" / "base")
    model = add_lora(base, "a", seed=1, r=2, target_modules=["q_proj"])
    model.save_pretrained(tmp_path / "project" / "adapters")
    (tmp_path / "project" / "recipe.yaml").write_text(
        "base: base\nadapters:\n  - path: adapters/a\n    weight: 0.5\nmethod: weighted\noutput: out\n"
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert main(["run", str(tmp_path / "project" / "recipe.yaml"), "--quiet"]) == 0
    # Every relative path, the output included, is relative to the recipe file, wherever the command runs.
    assert (tmp_path / "project" / "out" / "model.safetensors").is_file()
    assert not (elsewhere / "out").exists()


def test_placeholder_base_is_refused_with_a_clear_message(capsys, tmp_path):
    (tmp_path / "recipe.yaml").write_text("base: PATH/TO/BASE-MODEL\nadapters: [a]\n")
    assert main(["run", str(tmp_path / "recipe.yaml")]) == 2
    assert "placeholder" in capsys.readouterr().err


def test_run_dry_run_prints_the_plan(tmp_path, capsys, monkeypatch):
    base = tiny_llama()
    base.save_pretrained(tmp_path / "base")
    model = add_lora(base, "a", seed=1, r=2, target_modules=["q_proj", "v_proj"])
    model.save_pretrained(tmp_path / "adapters")
    (tmp_path / "recipe.yaml").write_text(
        Recipe(
            base="base", steps=[RecipeStep([AdapterEntry("adapters/a", 0.5)], method="weighted", dtype="bf16")]
        ).to_yaml()
    )
    monkeypatch.chdir(tmp_path)
    assert main(["run", "recipe.yaml", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "Tensors touched: 4 of 21" in out and "dtype bfloat16" in out and "Validation: OK" in out
    assert not (tmp_path / "merged").exists()
