"""Lineage end to end: a combined adapter remembers how it was made, the card publishes it, and the card's recipe,
run with `peft-merge-ext run`, rebuilds the very same bytes.

Every scenario starts as a user would: a base and adapters saved on disk, loaded with `PeftModel.from_pretrained`,
combined in memory, published with `save_merged` (or `push_merged`); the test then takes the recipe out of the card,
fills in what the card says to fill in (the base folder, adapters without a Hub id), runs it from another folder,
and compares every tensor's bytes.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from conftest import add_lora, tiny_llama

from peft_merge_ext.cli import main
from peft_merge_ext.engine.merge_info import LINEAGE_FILE

INPUT = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(3))


@pytest.fixture
def workspace(tmp_path):
    """`base/` and adapters `saved/x1`, `saved/x2` (rank 4) and `saved/x3` (rank 6, rslora) on disk."""
    model = add_lora(tiny_llama(), "x1", seed=1, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
    add_lora(model, "x2", seed=2, r=4, lora_alpha=4, target_modules=["q_proj", "v_proj", "down_proj"])
    add_lora(model, "x3", seed=3, r=6, lora_alpha=3, use_rslora=True, target_modules=["q_proj", "k_proj"])
    model.save_pretrained(tmp_path / "saved")
    tiny_llama().save_pretrained(tmp_path / "base")
    return tmp_path


def _load(workspace: Path, names=("x1", "x2", "x3")):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(workspace / "base")
    model = PeftModel.from_pretrained(base, workspace / "saved" / names[0], adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(workspace / "saved" / name, adapter_name=name)
    return model


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    state = {}
    for path in sorted(folder.glob("*.safetensors")):
        state.update(load_file(path))
    return state


def _assert_same_bytes(first: Path, second: Path) -> None:
    a, b = _tensors(first), _tensors(second)
    assert a and sorted(a) == sorted(b)
    for key in a:
        assert a[key].dtype == b[key].dtype and a[key].shape == b[key].shape, key
        left = a[key].contiguous().view(-1).view(torch.uint8)
        right = b[key].contiguous().view(-1).view(torch.uint8)
        assert torch.equal(left, right), f"{key} differs"


def _recipe_of(card: str) -> tuple[dict, list[str]]:
    section = card[card.index("## Reproduce") :]
    text = re.search(r"```yaml\n(.*?)```", section, re.S).group(1)
    fill_line = next((line for line in section.splitlines() if line.startswith("Before running")), "")
    return yaml.safe_load(text), re.findall(r"`([^`]+)`", fill_line.split("names:")[-1]) if fill_line else []


def _rerun(folder: Path, workspace: Path, label: str) -> Path:
    """Run the recipe of `folder`'s card from a fresh folder, filled in as the card says; returns the output."""
    card = (folder / "README.md").read_text()
    recipe, fill_in = _recipe_of(card)
    where = workspace / f"rerun-{label}"
    where.mkdir()
    if recipe["base"] == "PATH/TO/BASE-MODEL":
        assert "Replace `PATH/TO/BASE-MODEL`" in card
        recipe["base"] = str(workspace / "base")
    for name in fill_in:
        shutil.copytree(workspace / "saved" / name, where / name)
    (where / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    assert main(["run", str(where / "recipe.yaml"), "--quiet"]) == 0
    steps = recipe.get("steps") or [recipe]
    return where / steps[-1]["output"]


def test_slerp_card_names_everything_and_its_recipe_rebuilds_the_bytes(workspace):
    model = _load(workspace)
    model.add_weighted_adapter(["x1", "x2"], [0.6, 0.4], "m", combination_type="slerp")
    model.set_adapter("m")
    folder = model.save_merged(workspace / "published")
    card = (folder / "README.md").read_text()
    # The headline flow publishes what it did: the method, both sources with weights, t and the statistics.
    assert "## Lineage" in card and "made with `slerp`" in card
    assert "**x1** (weight 0.6" in card and "**x2** (weight 0.4" in card
    assert "theta_degrees" in card and re.search(r"\bt 0\.4/0\.4/0\.4\b", card)
    assert "itself combines `x1` (0.6), `x2` (0.4) with `slerp`" in card
    assert str(workspace) not in card  # no local path anywhere
    recipe, fill_in = _recipe_of(card)
    assert [step["method"] for step in recipe["steps"]] == ["slerp", None] and fill_in == ["x1", "x2"]
    _assert_same_bytes(folder, _rerun(folder, workspace, "slerp"))


@pytest.mark.parametrize(
    ("method", "adapters", "weights", "options"),
    [
        ("karcher", ["x1", "x2", "x3"], [0.5, 0.3, 0.2], {}),
        ("weighted", ["x1", "x3"], [0.7, -0.2], {"svd_rank": 3}),
        ("ties", ["x1", "x2"], [0.7, 0.5], {"density": 0.5}),  # one of PEFT's own types: run by PEFT in memory
    ],
)
def test_combined_adapter_recipes_rebuild_the_bytes(workspace, method, adapters, weights, options):
    model = _load(workspace)
    model.add_weighted_adapter(adapters, weights, "m", combination_type=method, **options)
    folder = model.save_merged(workspace / "published", adapters=["m"])
    card = (folder / "README.md").read_text()
    assert f"made with `{method}`" in card
    for name, weight in zip(adapters, weights, strict=True):
        assert f"**{name}** (weight {weight:g}" in card
    _assert_same_bytes(folder, _rerun(folder, workspace, method))


def test_direct_merge_and_adapter_only_outputs_rerun(workspace):
    model = _load(workspace)
    merged = model.save_merged(
        workspace / "merged", adapters=["x1", "x2"], weights=[0.3, 0.9], combination_type="slerp", t=[0.2, 0.9]
    )
    _assert_same_bytes(merged, _rerun(merged, workspace, "direct"))
    adapter = model.save_merged(
        workspace / "adapter", adapters=["x1", "x3"], combination_type="karcher", merge_into_base=False
    )
    rebuilt = _rerun(adapter, workspace, "adapter-only")
    assert (rebuilt / "adapter_config.json").is_file() and (rebuilt / LINEAGE_FILE).is_file()
    _assert_same_bytes(adapter, rebuilt)


def test_two_level_lineage_shows_both_levels_and_reruns_in_three_steps(workspace):
    model = _load(workspace)
    model.add_weighted_adapter(["x1", "x2"], [0.6, 0.4], "m1", combination_type="slerp")
    model.add_weighted_adapter(["m1", "x3"], [0.5, 0.5], "m2", combination_type="weighted")
    folder = model.save_merged(workspace / "published", adapters=["m2"])
    card = (folder / "README.md").read_text()
    assert "- **m2** (weight 1" in card and "made with `weighted`" in card
    assert "  - **m1** (weight 0.5" in card and "made with `slerp`" in card
    assert "    - **x1** (weight 0.6" in card and "  - **x3** (weight 0.5" in card
    recipe, fill_in = _recipe_of(card)
    assert [step["method"] for step in recipe["steps"]] == ["slerp", "weighted", None]
    assert sorted(fill_in) == ["x1", "x2", "x3"]
    _assert_same_bytes(folder, _rerun(folder, workspace, "two-level"))


def test_searched_weights_reach_the_card_and_the_recipe(workspace):
    from peft_merge_ext import search_weights

    model = _load(workspace)

    def objective(candidate) -> float:
        with torch.no_grad():
            return float(candidate(INPUT).logits.float().pow(2).mean())

    result = search_weights(
        model, ["x1", "x2"], objective, combination_type="weighted", budget=6, optimizer="builtin", progress=False
    )
    model.set_adapter("searched")
    folder = model.save_merged(workspace / "published")
    card = (folder / "README.md").read_text()
    assert "weights found by search_weights (builtin, 6 trials" in card
    for name, weight in zip(["x1", "x2"], result.weights, strict=True):
        assert f"**{name}** (weight {weight:g}" in card
    recipe, _ = _recipe_of(card)
    assert [a["weight"] for a in recipe["steps"][0]["adapters"]] == pytest.approx(result.weights, rel=0, abs=0)
    _assert_same_bytes(folder, _rerun(folder, workspace, "searched"))


def test_lineage_survives_save_pretrained_and_from_pretrained(workspace):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from peft_merge_ext.peft_bridge.records import get_lineage
    from peft_merge_ext.publish.merge_checkpoint import merge_checkpoint

    model = _load(workspace)
    model.add_weighted_adapter(["x1", "x2"], [0.6, 0.4], "m", combination_type="slerp")
    model.save_pretrained(workspace / "combined", selected_adapters=["m"])
    saved = workspace / "combined" / "m"
    assert (saved / LINEAGE_FILE).is_file()
    reloaded = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(workspace / "base"), saved, adapter_name="m"
    )
    lineage = get_lineage(reloaded.peft_config["m"])
    assert lineage.method == "slerp" and [s.name for s in lineage.sources] == ["x1", "x2"]
    assert lineage.weights == [0.6, 0.4] and len(lineage.sources[0].sha256) == 64
    card = (reloaded.save_merged(workspace / "from-reloaded") / "README.md").read_text()
    assert "made with `slerp`" in card and "**x2** (weight 0.4" in card
    # The out-of-core merge of the saved folder reads the record too.
    result = merge_checkpoint(workspace / "base", [saved], out=workspace / "streamed", quiet=True)
    assert result.merge_info.adapters[0].lineage.method == "slerp"
    assert "made with `slerp`" in (workspace / "streamed" / "README.md").read_text()
    _assert_same_bytes(workspace / "from-reloaded", workspace / "streamed")
    with torch.no_grad():
        reloaded.set_adapter("m")
        model.set_adapter("m")
        torch.testing.assert_close(reloaded(INPUT).logits, model(INPUT).logits)


def test_push_merged_publishes_the_lineage(workspace, hub_server):
    model = _load(workspace, ("x1", "x2"))
    model.add_weighted_adapter(["x1", "x2"], [0.6, 0.4], "m", combination_type="slerp")
    model.set_adapter("m")
    model.push_merged("test-user/merged", token=hub_server.token)
    files = hub_server.state.repo("test-user/merged").files("main")
    card = files["README.md"].decode()
    assert "made with `slerp`" in card and "**x1** (weight 0.6" in card and "method: slerp" in card
    assert not any(name.startswith(".peft-merge-ext") for name in files)


def test_sources_on_the_hub_are_named_by_their_hub_ids(workspace, hub_server, monkeypatch):
    """Adapters loaded from the Hub are named by their Hub ids in the lineage and the recipe (nothing to fill in),
    and a combined adapter published to the Hub brings its lineage back when it is loaded from there."""
    from huggingface_hub import constants
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from peft_merge_ext.peft_bridge.records import get_hub_id, get_lineage
    from peft_merge_ext.publish.hub import upload_folder

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(workspace / "hf-cache"))
    for name in ("x1", "x2"):
        upload_folder(workspace / "saved" / name, f"test-user/{name}", token=hub_server.token)
    base = AutoModelForCausalLM.from_pretrained(workspace / "base")
    model = PeftModel.from_pretrained(base, "test-user/x1", adapter_name="x1")
    model.load_adapter("test-user/x2", adapter_name="x2")
    assert get_hub_id(model.peft_config["x1"]) == "test-user/x1"
    model.add_weighted_adapter(["x1", "x2"], [0.6, 0.4], "m", combination_type="slerp")
    model.push_merged("test-user/m", adapters=["m"], merge_into_base=False, token=hub_server.token)
    folder = model.save_merged(workspace / "published", adapters=["m"])
    recipe, fill_in = _recipe_of((folder / "README.md").read_text())
    assert [a["path"] for a in recipe["steps"][0]["adapters"]] == ["test-user/x1", "test-user/x2"] and not fill_in

    fresh = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(workspace / "base"), "test-user/m", adapter_name="m"
    )
    lineage = get_lineage(fresh.peft_config["m"])
    assert lineage is not None and lineage.method == "slerp"
    assert [s.hub_id for s in lineage.sources] == ["test-user/x1", "test-user/x2"]
    again = fresh.save_merged(workspace / "from-hub")
    recipe, fill_in = _recipe_of((again / "README.md").read_text())
    assert recipe["adapters"] == [{"path": "test-user/m", "weight": 1.0}] and not fill_in  # named, not rebuilt
    _assert_same_bytes(folder, again)


def test_source_digests_are_taken_when_needed_and_never_from_a_changed_adapter(workspace):
    """`add_weighted_adapter` leaves hashing its sources for later; the digest later equals the one taken at once, and
    an adapter modified in between gets no digest (the card says it is unknown) rather than a wrong one."""
    from peft_merge_ext.peft_bridge.records import get_lineage
    from peft_merge_ext.peft_bridge.source import adapter_sha256

    model = _load(workspace)
    model.add_weighted_adapter(["x1", "x2"], [0.6, 0.4], "m", combination_type="slerp")
    expected = adapter_sha256(model.base_model.model, "x1")
    with torch.no_grad():  # x2 trained further after the combination
        next(p for n, p in model.named_parameters() if "lora_B.x2" in n).add_(1.0)
    lineage = get_lineage(model.peft_config["m"])
    first, second = (source.resolve() for source in lineage.sources)
    assert first.sha256 == expected and second.sha256 is None and "changed after" in second.sha256_of
