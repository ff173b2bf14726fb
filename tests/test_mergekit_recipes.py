"""mergekit configurations of `base+adapter` LoRA models run by `peft-merge-ext run`, compared with mergekit's own
output (mergekit 0.1.5 run in a subprocess on the same local folders, with its LoRA cache), for every supported
method, in float32 and bfloat16; and the refusals (one line, exit 2, nothing written).

Tolerances: float32 within 1e-6 absolute (measured: at most 4.5e-8, one or two float32 units in the last place: the
dense `B @ A` product and float32 sums are rounded in a different order); bfloat16 within one bfloat16 unit in the
last place (measured: bit-identical for all five methods).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import add_lora, tiny_llama
from safetensors.torch import load_file

from peft_merge_ext.cli import main

METHODS = {
    "linear": """
models:
  - model: {base}+{a}
    parameters: {{weight: 0.7}}
  - model: {base}+{b}
    parameters: {{weight: [0.2, 0.9]}}
merge_method: linear
""",
    "task_arithmetic": """
models:
  - model: {base}+{a}
    parameters: {{weight: [0.2, 1.0]}}
  - model: {base}+{b}
    parameters:
      weight: [{{filter: self_attn, value: 0.5}}, {{value: -0.3}}]
base_model: {base}
merge_method: task_arithmetic
parameters: {{lambda: 0.8}}
""",
    "ties": """
models:
  - model: {base}+{a}
    parameters: {{weight: 0.7, density: 0.6}}
  - model: {base}+{b}
    parameters: {{weight: 0.5, density: 0.4}}
base_model: {base}
merge_method: ties
""",
    "slerp": """
models:
  - model: {base}+{a}
  - model: {base}+{b}
base_model: {base}+{a}
merge_method: slerp
parameters:
  t: [{{filter: mlp, value: 0.3}}, {{value: [0.1, 0.9]}}]
""",
    "karcher": """
models:
  - model: {base}+{a}
  - model: {base}+{b}
merge_method: karcher
parameters: {{max_iter: 20, tol: 1.0e-6}}
""",
}
DTYPES = {"float32": ("base", "adapters"), "bfloat16": ("base16", "adapters")}

MERGEKIT_SCRIPT = """
import sys
import yaml
from mergekit.config import MergeConfiguration
from mergekit.merge import run_merge
from mergekit.options import MergeOptions

options = MergeOptions(lora_merge_cache=sys.argv[1], copy_tokenizer=False, write_model_card=False, quiet=True)
for config_file, out in zip(sys.argv[2::2], sys.argv[3::2]):
    with open(config_file) as handle:
        run_merge(MergeConfiguration.model_validate(yaml.safe_load(handle)), out, options)
"""


def _build(folder: Path) -> None:
    base = tiny_llama()
    base.save_pretrained(folder / "base")
    base.to(torch.bfloat16).save_pretrained(folder / "base16")
    model = add_lora(tiny_llama(), "a", seed=1, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
    add_lora(model, "b", seed=2, r=6, lora_alpha=3, use_rslora=True, target_modules=["q_proj", "k_proj", "down_proj"])
    model.save_pretrained(folder / "adapters")


def _write_config(folder: Path, method: str, dtype: str) -> Path:
    base, adapters = DTYPES[dtype]
    text = METHODS[method].format(base=base, a=f"{adapters}/a", b=f"{adapters}/b") + f"dtype: {dtype}\n"
    path = folder / f"{method}-{dtype}.yaml"
    path.write_text(text)
    return path


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(str(file)))
    return tensors


@pytest.fixture(scope="module")
def merged(tmp_path_factory):
    """Every (method, dtype) merged by mergekit (one subprocess) and by peft-merge-ext."""
    pytest.importorskip("mergekit")
    folder = tmp_path_factory.mktemp("mergekit")
    _build(folder)
    configs = {(m, d): _write_config(folder, m, d) for m in METHODS for d in DTYPES}
    arguments = [str(folder / "lora-cache")]
    for (method, dtype), config in configs.items():
        arguments += [config.name, f"mergekit-{method}-{dtype}"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, "-c", MERGEKIT_SCRIPT, *arguments], cwd=folder, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
    before = {path.name for path in folder.iterdir()}
    for (method, dtype), config in configs.items():
        assert main(["run", str(config), "--out", str(folder / f"ours-{method}-{dtype}"), "--quiet"]) == 0
    created = {path.name for path in folder.iterdir()} - before
    assert created == {f"ours-{m}-{d}" for m, d in configs}  # nothing else: no cache
    return folder


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("method", list(METHODS))
def test_same_weights_as_mergekit(merged, method, dtype):
    expected = _weights(merged / f"mergekit-{method}-{dtype}")
    got = _weights(merged / f"ours-{method}-{dtype}")
    assert set(got) == set(expected)
    touched = 0
    for key, value in expected.items():
        assert got[key].dtype == value.dtype, key
        difference = (got[key].double() - value.double()).abs()
        if dtype == "float32":
            assert float(difference.max()) <= 1e-6, key
        else:  # one bfloat16 unit in the last place: 2^-7 relative at most
            assert bool((difference <= value.double().abs() * 2**-7).all()), key
        touched += "proj" in key and not torch.equal(value, _weights(merged / DTYPES[dtype][0])[key])
    assert touched >= 6  # the adapters' modules did change


def test_card_holds_the_config_without_local_paths(merged):
    folder = merged / "ours-slerp-float32"
    card = (folder / "README.md").read_text()
    # The configuration reruns as it is next to the folders; an absolute path would be cut to its folder name.
    assert "merge_method: slerp" in card and "model: base+adapters/a" in card and str(merged) not in card
    assert "mergekit-slerp" in card
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]


REFUSED = {
    "dare": ("models:\n  - model: base+adapters/a\nbase_model: base\nmerge_method: dare_ties\n", "samples at random"),
    "slices": ("slices:\n  - sources: [{model: base, layer_range: [0, 2]}]\nmerge_method: linear\n", "'slices'"),
    "non-lora": (
        "models:\n  - model: base+adapters/a\n    parameters: {weight: 1}\n  - model: other\n"
        "    parameters: {weight: 1}\nmerge_method: linear\n",
        "not a LoRA on the base",
    ),
    "other-base": (
        "models:\n  - model: other+adapters/a\n    parameters: {weight: 1}\nbase_model: base\nmerge_method: ties\n",
        "an adapter on another base",
    ),
    "not-an-adapter": ("models:\n  - model: base+other\nmerge_method: karcher\n", "no adapter_config.json"),
    "unknown-parameter": (
        "models:\n  - model: base+adapters/a\n    parameters: {weight: 1, t: 2}\nmerge_method: linear\n",
        "does not take here",
    ),
    "missing-weight": ("models:\n  - model: base+adapters/a\nmerge_method: linear\n", "parameter 'weight'"),
    "slerp-three": (
        "models:\n  - model: base+adapters/a\n  - model: base+adapters/b\nbase_model: base\nmerge_method: slerp\n"
        "parameters: {t: 0.5}\n",
        "exactly 2 models",
    ),
    "hub": ("models:\n  - model: org/model@main+adapters/a\nmerge_method: karcher\n", "revision"),
}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("refusals")
    base = tiny_llama()
    base.save_pretrained(folder / "base")
    tiny_llama(seed=3).save_pretrained(folder / "other")
    model = add_lora(base, "a", seed=1, r=2, target_modules=["q_proj"])
    add_lora(model, "b", seed=2, r=2, target_modules=["v_proj"])
    model.save_pretrained(folder / "adapters")
    return folder


@pytest.mark.parametrize("case", list(REFUSED))
def test_unsupported_configs_are_refused_in_one_line_before_any_output(inputs, capsys, case):
    text, message = REFUSED[case]
    config = inputs / f"{case}.yaml"
    config.write_text(text)
    assert main(["run", str(config), "--out", str(inputs / "out")]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and message in error and "supported: merge_method linear" in error
    assert not (inputs / "out").exists()


def test_out_overrides_a_recipe_output(inputs, monkeypatch):
    recipe = inputs / "recipe.yaml"
    recipe.write_text("base: base\nadapters: [{path: adapters/a, weight: 0.5}]\nmethod: weighted\noutput: here\n")
    monkeypatch.chdir(inputs / "adapters")
    assert main(["run", str(recipe), "--out", "elsewhere", "--quiet"]) == 0
    assert (inputs / "adapters" / "elsewhere" / "model.safetensors").is_file()  # relative to the working directory
    assert not (inputs / "here").exists()


def test_card_config_reruns_to_the_same_bytes(merged):
    card = (merged / "ours-ties-bfloat16" / "README.md").read_text()
    recipe = card.split("```yaml\n", 1)[1].split("```", 1)[0]
    (merged / "card-recipe.yaml").write_text(recipe)
    assert main(["run", str(merged / "card-recipe.yaml"), "--quiet"]) == 0  # no --out: `merged` next to it
    expected = (merged / "ours-ties-bfloat16" / "model.safetensors").read_bytes()
    assert (merged / "merged" / "model.safetensors").read_bytes() == expected


def test_dry_run_validates_and_writes_nothing(inputs, capsys):
    config = inputs / "dry.yaml"
    config.write_text("models:\n  - model: base+adapters/a\n  - model: base+adapters/b\nmerge_method: karcher\n")
    assert main(["run", str(config), "--dry-run", "--out", str(inputs / "dry-out")]) == 0
    assert "Validation: OK" in capsys.readouterr().out
    assert not (inputs / "dry-out").exists()


def test_an_adapter_with_more_than_lora_factors_is_refused(inputs, capsys):
    model = add_lora(tiny_llama(), "d", seed=4, r=2, target_modules=["q_proj"], use_dora=True)
    model.save_pretrained(inputs / "dora")
    config = inputs / "dora.yaml"
    config.write_text("models:\n  - model: base+dora/d\n    parameters: {weight: 1.0}\nmerge_method: linear\n")
    assert main(["run", str(config), "--out", str(inputs / "dora-out")]) == 2
    assert "DoRA" in capsys.readouterr().err
    assert not (inputs / "dora-out").exists()


@pytest.mark.parametrize("method", ["ties", "karcher"])
def test_workers_give_the_same_bytes(merged, tmp_path, method):
    # Two modules merged at a time on two threads: the same file, byte for byte, and the same per-module report.
    config = merged / f"{method}-bfloat16.yaml"
    assert main(["run", str(config), "--out", str(tmp_path / "two"), "--quiet", "--workers", "2"]) == 0
    expected = merged / f"ours-{method}-bfloat16"
    assert (tmp_path / "two" / "model.safetensors").read_bytes() == (expected / "model.safetensors").read_bytes()
    table = [line for line in (expected / "README.md").read_text().splitlines() if line.startswith("| `model.")]
    assert table and table == [
        line for line in (tmp_path / "two" / "README.md").read_text().splitlines() if line.startswith("| `model.")
    ]


@pytest.mark.parametrize(
    ("recipe", "workers", "message"),
    [
        ("mergekit", "0", "--workers must be a positive number of threads, got 0."),
        ("ours", "2", "--workers applies to mergekit configurations only"),
    ],
)
def test_bad_workers_are_refused_before_any_output(inputs, capsys, recipe, workers, message):
    config = inputs / f"workers-{recipe}.yaml"
    if recipe == "mergekit":
        config.write_text("models:\n  - model: base+adapters/a\n  - model: base+adapters/b\nmerge_method: linear\n")
    else:
        config.write_text("base: base\nadapters: [{path: adapters/a, weight: 0.5}]\nmethod: weighted\n")
    assert main(["run", str(config), "--out", str(inputs / "workers-out"), "--workers", workers]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and message in error
    assert not (inputs / "workers-out").exists()
