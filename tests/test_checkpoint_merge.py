"""Out-of-core `merge_checkpoint`: adapters read from disk, base streamed tensor by tensor, output identical to the
in-memory `save_merged` and to PEFT's `merge_and_unload`, everything validated before the output folder exists."""

from __future__ import annotations

import hashlib
import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from conftest import add_lora, tiny_gpt2, tiny_llama
from peft import IA3Config, LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

from peft_merge_ext.checkpoint.adapter_config import (
    INIT_LORA_VARIANTS,
    LORA_VARIANT_FIELDS,
    LoraAdapterConfig,
    pattern_value,
)
from peft_merge_ext.checkpoint.adapter_files import read_adapter
from peft_merge_ext.errors import AdapterCompatibilityError, MergeInputError, UnknownCombinationTypeError
from peft_merge_ext.publish.merge_checkpoint import merge_checkpoint, plan_checkpoint_merge

LLAMA_TARGETS = ["q_proj", "v_proj", "down_proj"]


def save_adapter(peft_model, name: str, folder: Path) -> Path:
    """Save one adapter of a PeftModel as an ordinary adapter folder and return that folder."""
    peft_model.save_pretrained(folder, selected_adapters=[name])
    return folder / name if name != "default" else folder


def load_weights(folder: Path) -> dict[str, torch.Tensor]:
    state = {}
    for path in sorted(Path(folder).glob("*.safetensors")):
        state.update(load_file(str(path)))
    return state


@pytest.fixture
def llama_files(tmp_path):
    """A tiny Llama base (sharded safetensors) and three adapters: 'a' (r=4, rank_pattern, alpha_pattern, embedding
    target), 'b' (r=6, rslora) and 'c' (r=2 on other modules), saved as ordinary folders."""
    base = tiny_llama()
    base.save_pretrained(tmp_path / "base", max_shard_size="20KB")
    model = add_lora(
        base,
        "a",
        seed=1,
        r=4,
        lora_alpha=8,
        target_modules=[*LLAMA_TARGETS, "embed_tokens"],
        rank_pattern={"down_proj": 2},
        alpha_pattern={r"model\.layers\.1\.self_attn\.q_proj": 3},
    )
    add_lora(model, "b", seed=2, r=6, lora_alpha=3, use_rslora=True, target_modules=["q_proj", "k_proj", "down_proj"])
    add_lora(model, "c", seed=3, r=2, lora_alpha=2, target_modules=["o_proj", "up_proj"])
    folders = {name: save_adapter(model, name, tmp_path / "adapters") for name in ("a", "b", "c")}
    return tmp_path / "base", folders, model


def test_base_is_really_sharded(llama_files):
    base, _, _ = llama_files
    assert (base / "model.safetensors.index.json").is_file()
    assert len(list(base.glob("model-*.safetensors"))) > 1


def test_adapter_factors_match_the_loaded_peft_layers(llama_files):
    _, folders, model = llama_files
    from peft_merge_ext.peft_bridge.layers import find_lora_modules, read_factors

    adapter = read_adapter(folders["a"])
    layers = {info.name: info for info in find_lora_modules(model.base_model.model, ["a"])}
    assert set(adapter.modules) == set(layers)
    assert adapter.modules["model.layers.0.mlp.down_proj"].rank == 2
    assert adapter.modules["model.layers.1.self_attn.q_proj"].scaling == 3 / 4
    assert adapter.modules["model.embed_tokens"].kind == "embedding"
    for name, module in adapter.modules.items():
        expected = read_factors(layers[name], "a", torch.float64)
        delta = module.load_delta()
        assert torch.equal(delta.B, expected.B) and torch.equal(delta.A, expected.A), name
    rslora = read_adapter(folders["b"]).modules["model.layers.0.self_attn.q_proj"]
    assert rslora.scaling == pytest.approx(3 / 6**0.5)
    assert len(adapter.sha256) == 64


def test_single_adapter_matches_peft_merge_and_unload(llama_files, tmp_path):
    base, folders, _ = llama_files
    result = merge_checkpoint(base, [folders["a"]], out=tmp_path / "merged", quiet=True)
    reference = PeftModel.from_pretrained(_load(base), folders["a"]).merge_and_unload().state_dict()
    merged = load_weights(result.path)
    assert set(merged) == set(reference)
    for key, tensor in reference.items():
        torch.testing.assert_close(merged[key], tensor, rtol=0, atol=1e-6)
    changed = {k for k in merged if not torch.equal(merged[k], load_weights(base)[k])}
    assert "model.embed_tokens.weight" in changed and "model.layers.1.mlp.down_proj.weight" in changed


def _load(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder)


@pytest.mark.parametrize(
    ("names", "combination_type", "weights", "options", "dtype"),
    [
        (["a"], None, None, {}, None),
        (["a", "b"], "weighted", [0.7, -0.3], {}, None),
        (["a", "b", "c"], "average", [1.0, 2.0, 1.0], {"svd_rank": 5}, "bfloat16"),
        (["a", "b"], "slerp", [0.5, 0.5], {"t": [0.2, 0.9]}, None),
        (["a", "b"], None, None, {}, "float16"),
    ],
)
def test_identical_to_the_in_memory_save_merged(
    llama_files, tmp_path, names, combination_type, weights, options, dtype
):
    from peft_merge_ext.publish.save import save_merged

    base, folders, _ = llama_files
    model = PeftModel.from_pretrained(_load(base), folders[names[0]], adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(folders[name], adapter_name=name)
    in_memory = save_merged(
        model,
        tmp_path / "in-memory",
        adapters=names,
        weights=weights,
        combination_type=combination_type,
        dtype=dtype,
        **options,
    )
    streamed = merge_checkpoint(
        base,
        [folders[name] for name in names],
        out=tmp_path / "streamed",
        combination_type=combination_type,
        weights=weights,
        dtype=dtype,
        quiet=True,
        **options,
    )
    expected, got = load_weights(in_memory), load_weights(streamed.path)
    assert set(got) == set(expected)
    for key in expected:
        assert got[key].dtype == expected[key].dtype, key
        assert torch.equal(got[key], expected[key]), key


def test_gpt2_conv1d_layout(tmp_path):
    base = tiny_gpt2()
    base.save_pretrained(tmp_path / "base")
    model = add_lora(base, "g", seed=4, r=3, lora_alpha=6, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True)
    folder = save_adapter(model, "g", tmp_path / "adapters")
    result = merge_checkpoint(tmp_path / "base", [folder], out=tmp_path / "merged", quiet=True)
    reference = PeftModel.from_pretrained(_load(tmp_path / "base"), folder).merge_and_unload().state_dict()
    merged = load_weights(result.path)
    square = "transformer.h.0.attn.c_proj.weight"  # 32 x 32: only the module type tells the layout
    assert merged[square].shape[0] == merged[square].shape[1]
    for key in merged:
        torch.testing.assert_close(merged[key], reference[key], rtol=0, atol=1e-6)


def test_bf16_output_loads_and_predicts_like_peft(llama_files, tmp_path):
    base, folders, _ = llama_files
    result = merge_checkpoint(
        base,
        [folders["a"], folders["b"]],
        out=tmp_path / "merged",
        combination_type="weighted",
        weights=[1.0, 1.0],
        dtype="bf16",
        max_shard_size="30KB",
        quiet=True,
    )
    assert (result.path / "model.safetensors.index.json").is_file()
    assert all(t.dtype == torch.bfloat16 for t in load_weights(result.path).values())
    config = json.loads((result.path / "config.json").read_text())
    assert config["dtype"] == "bfloat16" and "quantization_config" not in config
    assert (result.path / "generation_config.json").is_file() and (result.path / "README.md").is_file()
    merged = _load(result.path).float()
    peft_model = PeftModel.from_pretrained(_load(base), folders["a"], adapter_name="a")
    peft_model.load_adapter(folders["b"], adapter_name="b")
    peft_model.base_model.set_adapter(["a", "b"])  # several active adapters: their sum
    inputs = torch.arange(12).reshape(2, 6)
    with torch.no_grad():
        torch.testing.assert_close(merged(inputs).logits, peft_model(inputs).logits, rtol=0.05, atol=0.05)


def test_quantization_config_dropped_and_tokenizer_files_copied(llama_files, tmp_path):
    base, folders, _ = llama_files
    config = json.loads((base / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (base / "config.json").write_text(json.dumps(config))
    (base / "tokenizer_config.json").write_text("{}")
    (folders["a"] / "tokenizer.json").write_text('{"version": "1.0"}')
    result = merge_checkpoint(base, [folders["a"]], out=tmp_path / "merged", quiet=True)
    assert "quantization_config" not in json.loads((result.path / "config.json").read_text())
    assert (result.path / "tokenizer_config.json").read_text() == "{}"
    assert (result.path / "tokenizer.json").read_text() == '{"version": "1.0"}'


def _assert_nothing_written(parent: Path, name: str = "merged") -> None:
    assert not (parent / name).exists()
    assert not [p for p in parent.iterdir() if p.name.startswith(f".{name}.tmp")]


def test_shape_mismatch_is_an_error_before_anything_is_written(llama_files, tmp_path):
    base, _, _ = llama_files
    wider = add_lora(tiny_llama(hidden_size=64), "w", seed=5, r=2, target_modules=["q_proj"])
    folder = save_adapter(wider, "w", tmp_path / "other")
    with pytest.raises(MergeInputError, match="shape"):
        merge_checkpoint(base, [folder], out=tmp_path / "merged", quiet=True)
    _assert_nothing_written(tmp_path)
    plan = plan_checkpoint_merge(base, [folder], strict=False)
    assert plan.problems and "Validation: 2 problem(s)" in plan.describe()


def test_missing_target_and_other_architecture_are_errors(llama_files, tmp_path):
    base, _, _ = llama_files
    gpt2 = add_lora(tiny_gpt2(), "g", seed=4, r=2, target_modules=["c_attn"], fan_in_fan_out=True)
    folder = save_adapter(gpt2, "g", tmp_path / "gpt2")
    with pytest.raises(MergeInputError, match=r"GPT2LMHeadModel|no 'transformer"):
        merge_checkpoint(base, [folder], out=tmp_path / "merged", quiet=True)
    _assert_nothing_written(tmp_path)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"combination_type": "nope"}, UnknownCombinationTypeError, "Registered types"),
        ({"combination_type": "ties"}, UnknownCombinationTypeError, "PEFT's own types"),
        ({"combination_type": "slerp", "bogus": 1}, MergeInputError, "Unknown option"),
        ({"combination_type": "weighted", "weights": [1.0]}, MergeInputError, "weight"),
        ({"combination_type": "slerp", "t": 3.0}, MergeInputError, "between 0 and 1"),
        ({"combination_type": "weighted", "dtype": "int4"}, MergeInputError, "dtype"),
        ({"combination_type": "weighted", "max_shard_size": "lots"}, MergeInputError, "max_shard_size"),
    ],
)
def test_bad_arguments_fail_before_writing(llama_files, tmp_path, kwargs, error, match):
    base, folders, _ = llama_files
    with pytest.raises(error, match=match):
        merge_checkpoint(base, [folders["a"], folders["b"]], out=tmp_path / "merged", quiet=True, **kwargs)
    _assert_nothing_written(tmp_path)


def test_existing_output_folder_is_kept(llama_files, tmp_path):
    base, folders, _ = llama_files
    (tmp_path / "merged").mkdir()
    (tmp_path / "merged" / "keep.txt").write_text("mine")
    with pytest.raises(MergeInputError, match="already exists"):
        merge_checkpoint(base, [folders["a"]], out=tmp_path / "merged", quiet=True)
    assert (tmp_path / "merged" / "keep.txt").read_text() == "mine"
    # --overwrite replaces only what peft-merge-ext wrote: a folder of the user's is never deleted.
    with pytest.raises(MergeInputError, match="not written by peft-merge-ext"):
        merge_checkpoint(base, [folders["a"]], out=tmp_path / "merged", quiet=True, overwrite=True)
    assert (tmp_path / "merged" / "keep.txt").read_text() == "mine"
    merge_checkpoint(base, [folders["a"]], out=tmp_path / "ours", quiet=True)
    first = (tmp_path / "ours" / "model.safetensors").read_bytes()
    merge_checkpoint(base, [folders["a"]], out=tmp_path / "ours", quiet=True, overwrite=True, weights=[0.5])
    assert (tmp_path / "ours" / "model.safetensors").read_bytes() != first


def test_failure_while_streaming_leaves_no_output(llama_files, tmp_path, monkeypatch):
    import peft_merge_ext.checkpoint.reader as reader

    base, folders, _ = llama_files
    original, calls = reader.read_tensor, []

    def failing_read(path, name):
        calls.append(name)
        if len(calls) == 5:
            raise OSError("disk went away")
        return original(path, name)

    monkeypatch.setattr(reader, "read_tensor", failing_read)
    with pytest.raises(OSError, match="disk went away"):
        merge_checkpoint(base, [folders["a"]], out=tmp_path / "merged", quiet=True)
    _assert_nothing_written(tmp_path)


def test_pickle_files_are_refused_unless_allowed(llama_files, tmp_path):
    base, folders, _ = llama_files
    pickled_base = tmp_path / "pickled-base"
    pickled_base.mkdir()
    (pickled_base / "config.json").write_text((base / "config.json").read_text())
    torch.save(load_weights(base), pickled_base / "pytorch_model.bin")
    pickled_adapter = tmp_path / "pickled-adapter"
    pickled_adapter.mkdir()
    (pickled_adapter / "adapter_config.json").write_text((folders["b"] / "adapter_config.json").read_text())
    torch.save(load_file(str(folders["b"] / "adapter_model.safetensors")), pickled_adapter / "adapter_model.bin")
    with pytest.raises(MergeInputError, match="pickle"):
        merge_checkpoint(pickled_base, [folders["b"]], out=tmp_path / "merged", quiet=True)
    with pytest.raises(MergeInputError, match="pickle"):
        merge_checkpoint(base, [pickled_adapter], out=tmp_path / "merged", quiet=True)
    _assert_nothing_written(tmp_path)
    allowed = merge_checkpoint(pickled_base, [pickled_adapter], out=tmp_path / "merged", allow_pickle=True, quiet=True)
    safe = merge_checkpoint(base, [folders["b"]], out=tmp_path / "safe", quiet=True)
    expected = load_weights(safe.path)
    assert all(torch.equal(t, expected[k]) for k, t in load_weights(allowed.path).items())


def _rewrite_adapter(folder: Path, destination: Path, config_changes=None, extra_tensors=None) -> Path:
    destination.mkdir()
    config = json.loads((folder / "adapter_config.json").read_text())
    config.update(config_changes or {})
    (destination / "adapter_config.json").write_text(json.dumps(config))
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    tensors.update(extra_tensors or {})
    save_file(tensors, str(destination / "adapter_model.safetensors"))
    return destination


def test_unsupported_adapters_are_refused(llama_files, tmp_path):
    base, folders, _ = llama_files
    # Configs and files that disagree (DoRA, modules_to_save and the rest are merged: tests/test_adapter_features.py).
    cases = {
        "dora": ({"use_dora": True}, None, MergeInputError, "no lora_magnitude_vector"),
        "magnitude": (
            None,
            {"base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector": torch.ones(32)},
            AdapterCompatibilityError,
            "does not set use_dora",
        ),
        "stray": (
            None,
            {"base_model.model.lm_head.weight": torch.ones(64, 32)},
            AdapterCompatibilityError,
            "neither a LoRA factor nor",
        ),
    }
    for name, (changes, extra, error, match) in cases.items():
        folder = _rewrite_adapter(folders["b"], tmp_path / name, changes, extra)
        with pytest.raises(error, match=match):
            merge_checkpoint(base, [folder], out=tmp_path / "merged", quiet=True)
    # Options whose tensors are absent change nothing: the same bytes as the plain adapter.
    plain = load_weights(merge_checkpoint(base, [folders["b"]], out=tmp_path / "plain", quiet=True).path)
    for name, changes in (("bias", {"lora_bias": True}), ("modules", {"modules_to_save": ["lm_head"]})):
        folder = _rewrite_adapter(folders["b"], tmp_path / name, changes)
        merged = load_weights(merge_checkpoint(base, [folder], out=tmp_path / f"{name}-out", quiet=True).path)
        assert merged.keys() == plain.keys() and all(torch.equal(merged[k], plain[k]) for k in plain)
        shutil.rmtree(tmp_path / f"{name}-out")
    shutil.rmtree(tmp_path / "plain")
    ia3 = get_peft_model(tiny_llama(), IA3Config(target_modules=["q_proj"], feedforward_modules=[]))
    ia3.save_pretrained(tmp_path / "ia3")
    with pytest.raises(AdapterCompatibilityError, match="only LoRA"):
        merge_checkpoint(base, [tmp_path / "ia3"], out=tmp_path / "merged", quiet=True)
    inconsistent = _rewrite_adapter(folders["b"], tmp_path / "rank", {"r": 5})
    with pytest.raises(MergeInputError, match="rank"):
        merge_checkpoint(base, [inconsistent], out=tmp_path / "merged", quiet=True)
    _assert_nothing_written(tmp_path)


def test_different_recorded_base_models_only_warn(llama_files, tmp_path):
    base, folders, _ = llama_files
    first = _rewrite_adapter(folders["a"], tmp_path / "first", {"base_model_name_or_path": "org/base-one"})
    second = _rewrite_adapter(folders["b"], tmp_path / "second", {"base_model_name_or_path": "org/base-two"})
    with pytest.warns(UserWarning, match="different base models"):
        result = merge_checkpoint(
            base, [first, second], out=tmp_path / "merged", combination_type="weighted", quiet=True
        )
    assert result.report.combination_type == "weighted"


def test_embedding_adapter_uses_the_transposed_layout(tmp_path):
    base = tiny_llama()
    base.save_pretrained(tmp_path / "base")
    model = get_peft_model(
        base, LoraConfig(r=3, lora_alpha=5, target_modules=["embed_tokens", "lm_head"], init_lora_weights=False)
    )
    model.save_pretrained(tmp_path / "adapter")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = merge_checkpoint(tmp_path / "base", [tmp_path / "adapter"], out=tmp_path / "merged", quiet=True)
    reference = PeftModel.from_pretrained(_load(tmp_path / "base"), tmp_path / "adapter").merge_and_unload()
    merged = load_weights(result.path)
    for key in ("model.embed_tokens.weight", "lm_head.weight"):
        torch.testing.assert_close(merged[key], reference.state_dict()[key], rtol=0, atol=1e-6)


def test_merge_info_and_report(llama_files, tmp_path):
    base, folders, _ = llama_files
    result = merge_checkpoint(
        base, [folders["a"], folders["b"]], out=tmp_path / "merged", combination_type="slerp", t=0.25, quiet=True
    )
    info = result.merge_info
    assert info.combination_type == "slerp" and info.options == {"t": 0.25} and info.dtype == "float32"
    assert [a.source for a in info.adapters] == ["a", "b"]  # folder names, never full paths
    assert info.adapters[1].use_rslora and info.adapters[0].rank == 4
    assert info.adapters[0].sha256 == read_adapter(folders["a"]).sha256
    # The card's digest is the plain sha256 of the adapter file, as the Hub shows it for LFS files, and says so.
    digest = hashlib.sha256((folders["b"] / "adapter_model.safetensors").read_bytes()).hexdigest()
    card = (result.path / "README.md").read_text()
    assert f"`{digest}`" in card and "sha256 is that of each adapter's `adapter_model.safetensors` file" in card
    modules = {m.name for m in result.report.modules}
    assert "model.layers.0.self_attn.k_proj" in modules and "model.embed_tokens" in modules
    assert all(m.stats["t"] == 0.25 for m in result.report.modules)
    assert str(tmp_path) not in (result.path / "README.md").read_text()


def test_cuda_request_without_cuda_falls_back_to_cpu(llama_files, tmp_path):
    base, folders, _ = llama_files
    if torch.cuda.is_available():
        result = merge_checkpoint(base, [folders["a"]], out=tmp_path / "merged", device="cuda", quiet=True)
        cpu = merge_checkpoint(base, [folders["a"]], out=tmp_path / "cpu", quiet=True)
        expected = load_weights(cpu.path)
        for key, tensor in load_weights(result.path).items():
            torch.testing.assert_close(tensor, expected[key], rtol=0, atol=1e-6)
        return
    with pytest.warns(UserWarning, match="CUDA is not available"):
        merge_checkpoint(base, [folders["a"]], out=tmp_path / "merged", device="cuda", quiet=True)


@pytest.mark.parametrize("target", ["embed_tokens", "lm_head"])
def test_tied_embeddings_are_untied_like_save_merged(tmp_path, target):
    from peft_merge_ext.publish.save import save_merged

    base = tiny_llama(tie_word_embeddings=True)
    base.save_pretrained(tmp_path / "base")
    model = add_lora(base, "t", seed=6, r=2, lora_alpha=4, target_modules=[target, "q_proj"])
    folder = save_adapter(model, "t", tmp_path / "adapters")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = PeftModel.from_pretrained(_load(tmp_path / "base"), folder, adapter_name="t")
        in_memory = save_merged(loaded, tmp_path / "in-memory")
    streamed = merge_checkpoint(tmp_path / "base", [folder], out=tmp_path / "streamed", quiet=True)
    expected, got = load_weights(in_memory), load_weights(streamed.path)
    assert set(got) == set(expected) and "lm_head.weight" in got
    assert all(torch.equal(got[key], expected[key]) for key in expected)
    assert not torch.equal(got["lm_head.weight"], got["model.embed_tokens.weight"])
    assert json.loads((streamed.path / "config.json").read_text())["tie_word_embeddings"] is False


def test_pattern_keys_resolve_like_peft():
    from peft.utils.other import get_pattern_key

    pattern = {
        r"model\.layers\.1\.self_attn\.q_proj": 1,
        "q_proj": 2,
        "proj": 3,  # only a whole dotted component or the whole name: never matches "q_proj"
        r"layers\.0\.mlp\..*": 4,
        "down_proj": 5,  # after the regex above: layer 0's down_proj takes 4
        "layers.1.mlp.up_proj": 6,  # "." is a regex wildcard, as in PEFT
        "lm_head": 7,
    }
    modules = [
        "model.layers.0.self_attn.q_proj",
        "model.layers.1.self_attn.q_proj",
        "model.layers.0.mlp.down_proj",
        "model.layers.1.mlp.down_proj",
        "model.layers.1.mlp.up_proj",
        "model.layers.0.mlp.up_proj",
        "model.layers.1.self_attn.k_proj",
        "proj",
        "lm_head",
        "model.lm_head_extra",
    ]
    expected = [2, 1, 4, 5, 6, 4, "default", 3, 7, "default"]
    for module, value in zip(modules, expected, strict=True):
        assert pattern_value(pattern, module, "default") == value, module
        assert pattern.get(get_pattern_key(list(pattern), module), "default") == value, module


def test_light_config_knows_peft_lora_variants_and_defaults():
    import dataclasses

    fields = {field.name: field for field in dataclasses.fields(LoraConfig)}
    assert set(LORA_VARIANT_FIELDS) == {name for name, f in fields.items() if f.metadata.get("is_lora_variant")}
    assert set(INIT_LORA_VARIANTS) == set(fields["init_lora_weights"].metadata.get("lora_variants", ()))
    peft_defaults, light = LoraConfig(), LoraAdapterConfig()
    for name in (
        "r",
        "lora_alpha",
        "use_rslora",
        "fan_in_fan_out",
        "rank_pattern",
        "alpha_pattern",
        "init_lora_weights",
    ):
        assert getattr(light, name) == getattr(peft_defaults, name), name
    assert light.peft_type == peft_defaults.peft_type == "LORA"


def test_check_adapter_configs_tests_the_peft_type():
    from peft import AdaLoraConfig

    from peft_merge_ext.engine.request import check_adapter_configs

    configs = {
        "peft": LoraConfig(r=2, target_modules=["q_proj"]),
        "light": LoraAdapterConfig.from_dict({"peft_type": "LORA", "r": 2}, "light"),
        "adalora": AdaLoraConfig(total_step=10, target_modules=["q_proj"]),
        "ia3": IA3Config(target_modules=["q_proj"], feedforward_modules=[]),
        "light-dora": LoraAdapterConfig.from_dict({"peft_type": "LORA", "use_dora": True}, "light-dora"),
    }
    check_adapter_configs(configs, ["peft", "light"])
    for name, match in (("adalora", "AdaLoraConfig, not a plain"), ("ia3", "IA3Config"), ("light-dora", "DoRA")):
        with pytest.raises(AdapterCompatibilityError, match=match):
            check_adapter_configs(configs, [name])


def test_lora_variants_and_bad_config_values_are_refused(llama_files, tmp_path):
    base, folders, _ = llama_files
    for name, changes, error, match in (
        ("velora", {"velora_config": {"a": 1}}, AdapterCompatibilityError, "velora_config"),
        ("mica", {"init_lora_weights": "mica"}, AdapterCompatibilityError, "init_lora_weights='mica'"),
        ("bad-r", {"r": "six"}, MergeInputError, "r='six'"),
        ("bad-alpha", {"alpha_pattern": {"q_proj": "x"}}, MergeInputError, "alpha_pattern"),
    ):
        folder = _rewrite_adapter(folders["b"], tmp_path / name, changes)
        with pytest.raises(error, match=match):
            merge_checkpoint(base, [folder], out=tmp_path / "merged", quiet=True)
    _assert_nothing_written(tmp_path)


def test_plain_merge_imports_neither_peft_nor_transformers(llama_files, tmp_path):
    import subprocess
    import sys

    base, folders, _ = llama_files
    code = (
        "import sys\n"
        "from peft_merge_ext.publish.merge_checkpoint import merge_checkpoint\n"
        "merge_checkpoint(sys.argv[1], sys.argv[2:-1], out=sys.argv[-1], combination_type='weighted', quiet=True)\n"
        "print(sorted(m for m in ('peft', 'transformers', 'bitsandbytes') if m in sys.modules))\n"
    )
    plain = [str(folders["b"]), str(folders["c"])]  # Linear targets only: no architecture needed
    run = subprocess.run(
        [sys.executable, "-c", code, str(base), *plain, str(tmp_path / "plain")], capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip().splitlines()[-1] == "[]"


def test_an_index_naming_files_outside_the_base_folder_is_refused(llama_files, tmp_path):
    """An index may only name shard files next to it, never `../elsewhere` or an absolute path."""
    import shutil

    base, folders, _ = llama_files
    copy = tmp_path / "base-copy"
    shutil.copytree(base, copy)
    index = json.loads((copy / "model.safetensors.index.json").read_text())
    for target in ("../{}", str(tmp_path / "{}")):
        weight_map = {key: target.format(name) for key, name in index["weight_map"].items()}
        for name in set(index["weight_map"].values()):
            shutil.copyfile(copy / name, tmp_path / name)
        (copy / "model.safetensors.index.json").write_text(json.dumps({**index, "weight_map": weight_map}))
        with pytest.raises(MergeInputError, match="only name shard files next to it"):
            merge_checkpoint(copy, [folders["a"]], out=tmp_path / "merged", quiet=True)
        assert not (tmp_path / "merged").exists()
