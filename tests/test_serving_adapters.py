"""Serving-ready combined adapters: `svd_energy` (rank by energy, checked against a dense float64 SVD) and
`uniform_rank` (one rank for every module, vLLM's allowed values by default), through `add_weighted_adapter`,
`save_merged`, `merge_checkpoint`, the CLI and recipes; the saved adapter reloads in PEFT with the in-memory outputs.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import add_lora, tiny_llama
from safetensors.torch import load_file

from peft_merge_ext.cli import main
from peft_merge_ext.engine.serving import VLLM_MAX_LORA_RANKS
from peft_merge_ext.errors import MergeInputError

TARGETS_A = ["q_proj", "v_proj", "down_proj"]
TARGETS_B = ["q_proj", "k_proj", "down_proj"]
WEIGHTS = [0.7, -0.4]


def _model():
    model = add_lora(tiny_llama(), "a", seed=1, r=4, lora_alpha=8, target_modules=TARGETS_A)
    return add_lora(model, "b", seed=2, r=6, lora_alpha=3, use_rslora=True, target_modules=TARGETS_B)


def _dense_delta(model, module_name: str) -> torch.Tensor:
    """The weighted sum of the adapters' dense deltas, in float64, written independently of the library."""
    layer = model.get_submodule(f"base_model.model.{module_name}")
    total = None
    for adapter, weight in zip(["a", "b"], WEIGHTS, strict=True):
        if adapter not in layer.lora_A:
            continue
        b = layer.lora_B[adapter].weight.detach().double()
        a = layer.lora_A[adapter].weight.detach().double()
        term = weight * layer.scaling[adapter] * (b @ a)
        total = term if total is None else total + term
    return total


def _energy_rank(delta: torch.Tensor, fraction: float) -> tuple[int, float]:
    s = torch.linalg.svdvals(delta)
    energies = s**2
    total = float(energies.sum())
    for k in range(1, len(s) + 1):
        if float(energies[:k].sum()) >= fraction * total:
            return k, float(energies[:k].sum()) / total
    raise AssertionError("unreachable")


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.arange(12).reshape(2, 6)).logits


def test_svd_energy_keeps_the_smallest_rank_holding_the_energy():
    from peft_merge_ext import get_merge_report

    model = _model()
    model.add_weighted_adapter(["a", "b"], WEIGHTS, "e", combination_type="weighted", svd_energy=0.9)
    report = get_merge_report(model, "e")
    assert report.options["svd_energy"] == 0.9
    for module in report.modules:
        dense = _dense_delta(model, module.name)
        rank, kept = _energy_rank(dense, 0.9)
        assert module.stats["rank"] == rank, module.name
        assert module.stats["energy_kept"] == pytest.approx(kept, rel=1e-9)
        layer = model.get_submodule(f"base_model.model.{module.name}")
        merged = layer.lora_B["e"].weight.detach().double() @ layer.lora_A["e"].weight.detach().double()
        # Eckart-Young: the rank-k truncation error is the energy left out.
        residual = torch.linalg.matrix_norm(merged - dense) ** 2 / torch.linalg.matrix_norm(dense) ** 2
        assert float(residual) == pytest.approx(1 - kept, abs=1e-6)


def test_svd_energy_and_svd_rank_take_the_smaller_rank():
    from peft_merge_ext import get_merge_report

    model = _model()
    model.add_weighted_adapter(["a", "b"], WEIGHTS, "e", combination_type="weighted", svd_energy=0.999, svd_rank=3)
    for module in get_merge_report(model, "e").modules:
        rank, _ = _energy_rank(_dense_delta(model, module.name), 0.999)
        assert module.stats["rank"] == min(rank, 3)


def test_uniform_rank_saved_adapter_loads_in_peft_with_identical_outputs(tmp_path):
    from peft import PeftModel

    model = _model()
    model.add_weighted_adapter(["a", "b"], WEIGHTS, "u", combination_type="weighted", uniform_rank=True)
    config = model.peft_config["u"]
    assert config.r in VLLM_MAX_LORA_RANKS and config.r >= 10 and config.rank_pattern == {}
    model.set_adapter("u")
    in_memory = _logits(model)
    folder = model.save_merged(
        tmp_path / "served", adapters=["a", "b"], weights=WEIGHTS, combination_type="weighted", merge_into_base=False,
        uniform_rank=True,
    )  # fmt: skip
    data = json.loads((folder / "adapter_config.json").read_text())
    assert data["r"] == data["lora_alpha"] == config.r
    assert data["rank_pattern"] == {} and data["alpha_pattern"] == {}
    assert data["bias"] == "none" and not data["modules_to_save"] and not data["use_dora"]
    state = load_file(str(folder / "adapter_model.safetensors"))
    assert {tensor.shape[0] for key, tensor in state.items() if "lora_A" in key} == {config.r}
    reloaded = PeftModel.from_pretrained(tiny_llama(), folder)
    assert torch.equal(_logits(reloaded), in_memory)
    # Zero padding changes nothing: the same as the exact weighted adapter without uniform_rank.
    model.add_weighted_adapter(["a", "b"], WEIGHTS, "exact", combination_type="weighted")
    model.set_adapter("exact")
    torch.testing.assert_close(_logits(model), in_memory, rtol=1e-5, atol=1e-5)
    card = (folder / "README.md").read_text()
    assert f"--max-lora-rank {config.r}" in card and "content_rank" in card


def test_uniform_rank_list_with_energy_picks_the_smallest_fitting_rank(tmp_path):
    from peft_merge_ext import get_merge_report

    model = _model()
    model.add_weighted_adapter(
        ["a", "b"], WEIGHTS, "u", combination_type="weighted", svd_energy=0.8, uniform_rank=[2, 5, 12]
    )
    report = get_merge_report(model, "u")
    needed = max(module.stats["content_rank"] for module in report.modules)
    expected = min(rank for rank in (2, 5, 12) if rank >= needed)
    assert {module.stats["rank"] for module in report.modules} == {expected}
    assert model.peft_config["u"].r == expected


def test_checkpoint_merge_cli_and_recipe_round_trip(tmp_path, monkeypatch):
    from peft_merge_ext.publish.merge_checkpoint import merge_checkpoint
    from peft_merge_ext.recipe import recipe_from_merge_info

    base = tiny_llama()
    base.save_pretrained(tmp_path / "base")
    _model().save_pretrained(tmp_path / "adapters")
    adapters = [tmp_path / "adapters" / "a", tmp_path / "adapters" / "b"]
    first = merge_checkpoint(
        tmp_path / "base", adapters, out=tmp_path / "first", combination_type="weighted", weights=WEIGHTS,
        merge_into_base=False, svd_energy=0.95, uniform_rank=[8, 16], quiet=True,
    )  # fmt: skip
    lineage = json.loads((first.path / "peft_merge_ext_lineage.json").read_text())
    assert lineage["options"] == {"svd_energy": 0.95, "uniform_rank": [8, 16]}
    assert json.loads((first.path / "adapter_config.json").read_text())["r"] in (8, 16)
    assert "energy_kept" in (first.path / "README.md").read_text()

    recipe = recipe_from_merge_info(first.merge_info, output="rerun")
    recipe.base = str(tmp_path / "base")
    for entry, path in zip(recipe.steps[-1].adapters, adapters, strict=True):
        entry.path = str(path)
    (tmp_path / "recipe.yaml").write_text(recipe.to_yaml())
    assert main(["run", str(tmp_path / "recipe.yaml"), "--quiet"]) == 0
    assert (tmp_path / "rerun" / "adapter_model.safetensors").read_bytes() == (
        first.path / "adapter_model.safetensors"
    ).read_bytes()

    code = main(
        ["merge", "--base", str(tmp_path / "base"), "--adapter", str(adapters[0]), "--adapter", str(adapters[1]),
         "--weights", "0.7", "-0.4", "--method", "weighted", "--adapter-only", "--svd-energy", "0.95",
         "--uniform-rank", "8", "16", "--out", str(tmp_path / "cli"), "--quiet"]
    )  # fmt: skip
    assert code == 0
    assert (tmp_path / "cli" / "adapter_model.safetensors").read_bytes() == (
        first.path / "adapter_model.safetensors"
    ).read_bytes()


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"svd_energy": 0.0}, "svd_energy must be in (0, 1]"),
        ({"svd_energy": 1.5}, "svd_energy must be in (0, 1]"),
        ({"svd_energy": "high"}, "svd_energy must be a number"),
        ({"uniform_rank": [0, 8]}, "uniform_rank must list positive integers"),
        ({"uniform_rank": "many"}, "uniform_rank must be true"),
        ({"uniform_rank": [4, 8], "svd_rank": 9}, "svd_rank=9 is above the largest uniform rank 8"),
        ({"uniform_rank": [2]}, "needs rank"),
    ],
)
def test_bad_serving_options_are_refused_before_anything_is_written(tmp_path, options, message):
    model = _model()
    with pytest.raises(MergeInputError, match=message.replace("(", r"\(").replace(")", r"\)")):
        model.save_merged(
            tmp_path / "out", adapters=["a", "b"], combination_type="weighted", merge_into_base=False, **options
        )
    assert not (tmp_path / "out").exists()


def test_serving_options_need_an_adapter_output_and_a_registered_type(tmp_path, capsys):
    model = _model()
    with pytest.raises(MergeInputError, match="merge_into_base=False"):
        model.save_merged(tmp_path / "out", adapters=["a", "b"], combination_type="weighted", uniform_rank=True)
    with pytest.raises(MergeInputError, match="not to PEFT's"):
        model.add_weighted_adapter(["a", "b"], [1.0, 1.0], "x", combination_type="cat", svd_energy=0.9)
    with pytest.raises(MergeInputError, match="belong to a combination type"):
        model.save_merged(tmp_path / "out", adapters=["a"], merge_into_base=False, svd_energy=0.9)
    assert not (tmp_path / "out").exists()
    tiny_llama().save_pretrained(tmp_path / "base")
    model.save_pretrained(tmp_path / "adapters")
    adapter = str(tmp_path / "adapters" / "b")
    out = str(tmp_path / "out")
    code = main(["merge", "--base", str(tmp_path / "base"), "--adapter", adapter, "--svd-energy", "2", "--out", out])
    assert code == 2 and "svd_energy must be in (0, 1]" in capsys.readouterr().err
    code = main(["merge", "--base", str(tmp_path / "base"), "--adapter", adapter, "--method", "weighted",
                 "--uniform-rank", "--out", out])  # fmt: skip
    assert code == 2 and "--adapter-only" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
