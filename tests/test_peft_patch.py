"""The drop-in patch of `LoraModel.add_weighted_adapter`: PEFT's own types untouched, plugin types validated before
anything is modified, install/uninstall."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import add_lora, tiny_llama
from peft import AdaLoraConfig, get_peft_model
from peft.tuners.lora.model import LoraModel

import peft_merge_ext
from peft_merge_ext.errors import (
    AdapterCompatibilityError,
    MergeInputError,
    PeftMergeExtError,
    UnknownCombinationTypeError,
)
from peft_merge_ext.peft_bridge.patch import is_installed
from peft_merge_ext.plugins.registry import PEFT_COMBINATION_TYPES

TARGETS = ["q_proj", "v_proj", "embed_tokens"]

# Every combination type of PEFT's own add_weighted_adapter, with the arguments it needs.
PEFT_TYPES = {
    "svd": {},
    "linear": {},
    "cat": {},
    "ties": {"density": 0.5},
    "ties_svd": {"density": 0.5, "svd_rank": 3},
    "dare_ties": {"density": 0.6},
    "dare_linear": {"density": 0.6},
    "dare_ties_svd": {"density": 0.6, "majority_sign_method": "frequency"},
    "dare_linear_svd": {"density": 0.6},
    "magnitude_prune": {"density": 0.4},
    "magnitude_prune_svd": {"density": 0.4},
}


@pytest.fixture(autouse=True)
def patch_installed():
    """Every test starts and ends with the patch installed, as after `pip install`."""
    peft_merge_ext.install()
    yield
    peft_merge_ext.install()


def _model():
    """A PeftModel over a tiny Llama with adapters 'a' and 'b' of equal rank (as PEFT's linear types need)."""
    model = add_lora(tiny_llama(), "a", seed=1, r=4, lora_alpha=8, target_modules=TARGETS)
    return add_lora(model, "b", seed=2, r=4, lora_alpha=4, use_rslora=True, target_modules=TARGETS)


def _snapshot(model) -> tuple[dict[str, torch.Tensor], list[str], list[str]]:
    tensors = {name: value.detach().clone() for name, value in model.state_dict().items()}
    return tensors, list(model.peft_config), list(model.base_model.active_adapters)


def _assert_same(before, after) -> None:
    assert after[1] == before[1] and after[2] == before[2]
    assert after[0].keys() == before[0].keys()
    for name, tensor in before[0].items():
        assert torch.equal(after[0][name], tensor), name


def test_patch_is_installed_on_lora_model_only():
    assert is_installed()
    assert getattr(LoraModel.__dict__["add_weighted_adapter"], "__peft_merge_ext_patch__", False)
    assert set(PEFT_TYPES) == set(PEFT_COMBINATION_TYPES)


@pytest.mark.parametrize("combination_type", sorted(PEFT_TYPES))
def test_peft_types_give_exactly_what_unpatched_peft_gives(combination_type):
    arguments = PEFT_TYPES[combination_type]
    results = {}
    try:
        for patched in (False, True):
            peft_merge_ext.install() if patched else peft_merge_ext.uninstall()
            assert is_installed() == patched
            model = _model()
            torch.manual_seed(1234)  # the dare_* types draw random masks
            model.add_weighted_adapter(["a", "b"], [0.7, 0.5], "m", combination_type=combination_type, **arguments)
            results[patched] = model.state_dict()
    finally:
        peft_merge_ext.install()
    unpatched, patched = results[False], results[True]
    assert patched.keys() == unpatched.keys()
    assert any(".lora_A.m." in name or "lora_embedding_A.m" in name for name in patched)
    for name, tensor in unpatched.items():
        assert torch.equal(patched[name], tensor), name


def test_plugin_types_work_through_peft_model_attribute_forwarding():
    through_peft_model = _model()
    through_peft_model.add_weighted_adapter(["a", "b"], [0.6, 0.4], "m", combination_type="slerp")
    through_lora_model = _model()
    assert isinstance(through_lora_model.base_model, LoraModel)
    through_lora_model.base_model.add_weighted_adapter(["a", "b"], [0.6, 0.4], "m", combination_type="slerp")

    first, second = through_peft_model.state_dict(), through_lora_model.state_dict()
    assert any(".m." in name or name.endswith(".m") for name in first)
    assert first.keys() == second.keys()
    for name, tensor in first.items():
        assert torch.equal(second[name], tensor), name
    assert peft_merge_ext.get_merge_report(through_peft_model, "m").combination_type == "slerp"


def test_adalora_is_left_alone():
    config = AdaLoraConfig(total_step=10, init_r=4, target_r=2, target_modules=["q_proj"], init_lora_weights=False)
    model = get_peft_model(tiny_llama(), config)
    adalora_method = type(model.base_model).__dict__["add_weighted_adapter"]
    assert not getattr(adalora_method, "__peft_merge_ext_patch__", False)
    for combination_type in ("slerp", "svd"):
        with pytest.raises(TypeError, match="does not support add_weighted_adapter") as raised:
            model.add_weighted_adapter(["default"], [1.0], "m", combination_type=combination_type)
        assert not isinstance(raised.value, PeftMergeExtError)


def test_install_and_uninstall_are_idempotent_and_restore_the_original():
    peft_merge_ext.uninstall()
    original = LoraModel.__dict__["add_weighted_adapter"]
    assert not is_installed() and original.__module__ == "peft.tuners.lora.model"
    peft_merge_ext.uninstall()
    assert LoraModel.__dict__["add_weighted_adapter"] is original

    peft_merge_ext.install()
    wrapper = LoraModel.__dict__["add_weighted_adapter"]
    assert wrapper is not original and wrapper.__wrapped__ is original
    peft_merge_ext.install()
    assert LoraModel.__dict__["add_weighted_adapter"] is wrapper

    peft_merge_ext.uninstall()
    assert LoraModel.__dict__["add_weighted_adapter"] is original
    model = _model()
    with pytest.raises(ValueError, match="slerp") as raised:  # PEFT's own error, no plugin path
        model.add_weighted_adapter(["a", "b"], [0.5, 0.5], "m", combination_type="slerp")
    assert not isinstance(raised.value, PeftMergeExtError)
    peft_merge_ext.install()
    model.add_weighted_adapter(["a", "b"], [0.5, 0.5], "m", combination_type="slerp")
    assert "m" in model.peft_config


def _add_adapter_with(model, name: str, **config):
    add_lora(model, name, seed=5, r=4, target_modules=["q_proj"], **config)
    model.set_adapter("a")


INVALID_CALLS = {
    "unknown adapter": ({"adapters": ["a", "zzz"]}, MergeInputError, "Unknown adapter"),
    "adapter twice": ({"adapters": ["a", "a"]}, MergeInputError, "more than once"),
    "no adapters": ({"adapters": [], "weights": []}, MergeInputError, "non-empty"),
    "too few weights": ({"weights": [1.0]}, MergeInputError, "1 weight"),
    "too many weights": ({"weights": [1.0, 1.0, 1.0]}, MergeInputError, "3 weight"),
    "nan weight": ({"weights": [1.0, math.nan]}, MergeInputError, "finite"),
    "inf weight": ({"weights": [math.inf, 1.0]}, MergeInputError, "finite"),
    "string weight": ({"weights": [1.0, "x"]}, MergeInputError, "numbers"),
    "name taken": ({"adapter_name": "b"}, MergeInputError, "already exists"),
    "dotted name": ({"adapter_name": "m.x"}, MergeInputError, "without '.'"),
    "unknown option": ({"tee": 0.3}, MergeInputError, "tee"),
    "bad option value": ({"t": 1.5}, MergeInputError, "between 0 and 1"),
    "density for a plugin type": ({"density": 0.5}, MergeInputError, "density"),
    "svd_clamp for a plugin type": ({"svd_clamp": 0.9}, MergeInputError, "svd_clamp"),
    "bad svd_rank": ({"svd_rank": 0}, MergeInputError, "svd_rank"),
    "three adapters for slerp": (
        {"adapters": ["a", "b", "a2"], "weights": [1.0, 1.0, 1.0]},
        MergeInputError,
        "exactly 2",
    ),
    "dora adapter": ({"adapters": ["a", "dora"]}, AdapterCompatibilityError, "DoRA"),
    "lora_bias adapter": ({"adapters": ["a", "biased"]}, AdapterCompatibilityError, "lora_bias"),
    "modules_to_save adapter": ({"adapters": ["a", "saver"]}, AdapterCompatibilityError, "modules_to_save"),
}


@pytest.fixture(scope="module")
def crowded_model():
    """Adapters a, b, a2 (plain LoRA), dora (DoRA), biased (lora_bias) and saver (modules_to_save)."""
    model = _model()
    _add_adapter_with(model, "a2")
    _add_adapter_with(model, "dora", use_dora=True)
    _add_adapter_with(model, "biased", lora_bias=True)
    _add_adapter_with(model, "saver", modules_to_save=["lm_head"])
    return model


@pytest.mark.parametrize("case", sorted(INVALID_CALLS))
def test_invalid_calls_raise_before_the_model_is_modified(crowded_model, case):
    overrides, error, message = INVALID_CALLS[case]
    arguments = {"adapters": ["a", "b"], "weights": [0.5, 0.5], "adapter_name": "m", "combination_type": "slerp"}
    arguments.update(overrides)
    before = _snapshot(crowded_model)
    with pytest.raises(error, match=message):
        crowded_model.add_weighted_adapter(**arguments)
    _assert_same(before, _snapshot(crowded_model))


def test_unknown_combination_type_lists_every_type(crowded_model):
    before = _snapshot(crowded_model)
    with pytest.raises(ValueError) as raised:
        crowded_model.add_weighted_adapter(["a", "b"], [0.5, 0.5], "m", combination_type="sleerp")
    assert isinstance(raised.value, UnknownCombinationTypeError)
    message = str(raised.value)
    assert "'sleerp'" in message
    for name in [*PEFT_COMBINATION_TYPES, *peft_merge_ext.get_combination_types()]:
        assert name in message, name
    assert "model_stock" in message  # the example plugin's type, from its entry point
    _assert_same(before, _snapshot(crowded_model))


def test_taken_name_still_returns_silently_for_peft_types(crowded_model):
    """PEFT's own types keep PEFT's behaviour, silent return included; only plugin types raise."""
    before = _snapshot(crowded_model)
    assert crowded_model.add_weighted_adapter(["a", "b"], [0.5, 0.5], "b", combination_type="linear") is None
    _assert_same(before, _snapshot(crowded_model))


def test_extra_options_reach_the_plugin():
    model = _model()
    model.add_weighted_adapter(["a", "b"], [0.5, 0.5], "t0", combination_type="slerp", t=0.0)
    model.add_weighted_adapter(["a", "b"], [0.5, 0.5], "t1", combination_type="slerp", t=1.0)
    model.add_weighted_adapter(["a", "b"], [0.5, 0.5], "sched", combination_type="slerp", t=[0.2, 0.8])
    report = peft_merge_ext.get_merge_report(model, "sched")
    assert report.options == {"t": [0.2, 0.8]}
    by_layer = {module.layer_index: module.stats["t"] for module in report.modules}
    assert by_layer[0] == pytest.approx(0.2) and by_layer[1] == pytest.approx(0.8) and by_layer[None] == 0.2

    # t = 0 gives adapter a's update, t = 1 adapter b's, in every module.
    checked = 0
    for name, layer in model.base_model.model.named_modules():
        if not hasattr(layer, "lora_A") or "t0" not in {*layer.lora_A, *layer.lora_embedding_A}:
            continue
        for merged, source in (("t0", "a"), ("t1", "b")):
            torch.testing.assert_close(
                layer.get_delta_weight(merged), layer.get_delta_weight(source), rtol=1e-5, atol=1e-6, msg=name
            )
        checked += 1
    assert checked == 5  # q_proj and v_proj of 2 layers, and embed_tokens
