"""Every built-in combination type against a dense float64 reference, through PEFT's own `add_weighted_adapter`.

The reference is written here, independently of the implementation: it starts from PEFT's own per-adapter
`get_delta_weight` (which applies the scaling, rslora, `rank_pattern`/`alpha_pattern`, `fan_in_fan_out`, the conv
kernel layout and the embedding transpose), and combines those dense deltas with plain float64 formulas (a weighted
sum, a normalized average, SLERP with the model-merging convention, a dense Riemannian iteration for the Karcher
mean). The merged adapter is read back with PEFT's own `get_delta_weight` too.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from conftest import add_lora, tiny_gpt2, tiny_llama
from dense_reference import FACTOR_REFERENCES, dense_karcher, dense_slerp
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from torch import nn

import peft_merge_ext
from peft_merge_ext.errors import AdapterCompatibilityError, CombinationError, MergeInputError, PeftMergeExtError
from peft_merge_ext.plugins.registry import get_combination_types

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*lora_bias=True.*was passed"),  # the lora_bias input of the error cases
    pytest.mark.filterwarnings("ignore:Setting `save_embedding_layers` to `True`"),
]

# ----------------------------------------------------------------------------------------------------------------
# Dense float64 references


@dataclass(frozen=True)
class Where:
    """Where a module sits: its name in the base model, its block index and the number of blocks."""

    name: str
    layer_index: int | None
    num_layers: int | None


def weighted_reference(deltas: list[torch.Tensor], weights: list[float], where: Where, options: dict) -> torch.Tensor:
    return sum(w * d for w, d in zip(weights, deltas, strict=True))


def average_reference(deltas: list[torch.Tensor], weights: list[float], where: Where, options: dict) -> torch.Tensor:
    total = sum(weights)
    return sum(w / total * d for w, d in zip(weights, deltas, strict=True))


def reference_t(t: Any, weights: list[float], where: Where) -> float:
    """The SLERP factor: from the weights, a float, anchors over depth, or a dict of name substrings."""
    if t is None:
        return weights[1] / (weights[0] + weights[1])
    if isinstance(t, dict):
        for key, value in t.items():
            if key != "default" and key in where.name:
                return reference_t(value, weights, where)
        return reference_t(t["default"], weights, where)
    if isinstance(t, list):
        if len(t) == 1 or where.layer_index is None:  # outside numbered blocks: the first anchor
            return t[0]
        position = where.layer_index / (where.num_layers - 1)
        segment = position * (len(t) - 1)
        low = min(int(segment), len(t) - 2)
        return t[low] + (t[low + 1] - t[low]) * (segment - low)
    return t


def slerp_reference(deltas: list[torch.Tensor], weights: list[float], where: Where, options: dict) -> torch.Tensor:
    return dense_slerp(deltas[0], deltas[1], reference_t(options.get("t"), weights, where))


def karcher_reference(deltas: list[torch.Tensor], weights: list[float], where: Where, options: dict) -> torch.Tensor:
    """Dense Riemannian iteration on the flattened unit vectors, rescaled by the weighted mean of the norms."""
    return dense_karcher(deltas, weights)


REFERENCES: dict[str, Callable[[list[torch.Tensor], list[float], Where, dict], torch.Tensor]] = {
    "weighted": weighted_reference,
    "average": average_reference,
    "slerp": slerp_reference,
    "karcher": karcher_reference,
}
# Weights used for each type (the first two when a model has two adapters); slerp takes exactly two adapters.
TYPE_WEIGHTS = {
    "weighted": [0.7, -0.4, 0.5],
    "average": [2.0, 1.0, 1.0],
    "slerp": [0.3, 0.7],
    "karcher": [0.5, 0.3, 0.2],
}
BUILTIN_TYPES = sorted(name for name, kind in get_combination_types().items() if kind.plugin == "builtin")
# The types whose reference needs each adapter's factors, not only its dense delta (Core Space merging depends on
# the B/A split): their references are `dense_reference.FACTOR_REFERENCES`, checked in test_task_merging_types.py.
DELTA_TYPES = [name for name in BUILTIN_TYPES if name not in FACTOR_REFERENCES]


def truncated(matrix: torch.Tensor, rank: int) -> torch.Tensor:
    """The best rank-`rank` approximation of a delta in PEFT's layout (conv kernels flattened), densely."""
    flat = matrix.reshape(matrix.shape[0], -1)
    u, s, vh = torch.linalg.svd(flat, full_matrices=False)
    return ((u[:, :rank] * s[:rank]) @ vh[:rank]).reshape(matrix.shape)


# ----------------------------------------------------------------------------------------------------------------
# Models


LLAMA_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class TinyConvNet(nn.Module):
    """A 3x3 convolution, a 1x1 convolution and a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv3 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv1 = nn.Conv2d(8, 6, 1)
        self.head = nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.conv1(self.conv3(x)).mean((2, 3)))


def tiny_conv_net(seed: int = 0) -> TinyConvNet:
    torch.manual_seed(seed)
    return TinyConvNet()


def llama_adapters(base: nn.Module) -> PeftModel:
    """3 adapters of different ranks on a 3-block Llama: rank/alpha patterns, rslora, the embedding, lm_head.

    `o_proj` carries only 'a'; `k_proj` and `embed_tokens` carry 'a' and 'c'; `lm_head` carries only 'b'.
    """
    model = add_lora(
        base,
        "a",
        seed=1,
        r=4,
        lora_alpha=8,
        target_modules=[*LLAMA_LINEAR, "embed_tokens"],
        rank_pattern={"down_proj": 2},
        alpha_pattern={"o_proj": 3},
    )
    add_lora(
        model,
        "b",
        seed=2,
        r=6,
        lora_alpha=3,
        use_rslora=True,
        target_modules=["q_proj", "v_proj", "gate_proj", "up_proj", "down_proj", "lm_head"],
        rank_pattern={"layers.1.self_attn.v_proj": 3},
    )
    add_lora(model, "c", seed=3, r=2, lora_alpha=5, target_modules=["q_proj", "k_proj", "embed_tokens"])
    return model


def gpt2_adapters(base: nn.Module) -> PeftModel:
    """GPT-2 `Conv1D` layers (fan_in_fan_out) with two adapters of different ranks."""
    model = add_lora(
        base, "a", seed=1, r=4, lora_alpha=4, fan_in_fan_out=True, target_modules=["c_attn", "c_proj", "c_fc"]
    )
    add_lora(
        model,
        "b",
        seed=2,
        r=2,
        lora_alpha=6,
        fan_in_fan_out=True,
        target_modules=["c_attn", "mlp.c_proj"],
        alpha_pattern={"c_attn": 1},
    )
    return model


def conv_adapters(base: nn.Module) -> PeftModel:
    """Conv2d 3x3 and 1x1 plus a Linear: 'a' everywhere, 'b' (rslora) on the convolutions only."""
    model = add_lora(base, "a", seed=1, r=3, lora_alpha=6, target_modules=["conv3", "conv1", "head"])
    add_lora(model, "b", seed=2, r=2, lora_alpha=2, use_rslora=True, target_modules=["conv3", "conv1"])
    return model


def bf16_adapters(base: nn.Module) -> PeftModel:
    """A bfloat16 Llama whose adapters are stored in bfloat16 too."""
    model = add_lora(base, "a", seed=1, r=4, lora_alpha=8, target_modules=LLAMA_LINEAR)
    add_lora(model, "b", seed=2, r=8, lora_alpha=4, target_modules=["q_proj", "v_proj", "down_proj"])
    return model.to(torch.bfloat16)


@dataclass(frozen=True)
class Scenario:
    base: Callable[[], nn.Module]
    adapters: Callable[[nn.Module], PeftModel]
    names: tuple[str, ...]


SCENARIOS = {
    "llama": Scenario(lambda: tiny_llama(num_layers=3), llama_adapters, ("a", "b", "c")),
    "gpt2_conv1d": Scenario(tiny_gpt2, gpt2_adapters, ("a", "b")),
    "conv2d": Scenario(tiny_conv_net, conv_adapters, ("a", "b")),
    "llama_bf16": Scenario(lambda: tiny_llama().to(torch.bfloat16), bf16_adapters, ("a", "b")),
}
# Relative tolerance of the merged delta by storage dtype (the merged factors are stored in the adapters' dtype).
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 3e-2}


def build(scenario: str) -> PeftModel:
    spec = SCENARIOS[scenario]
    return spec.adapters(spec.base())


def has_adapter(module: nn.Module, adapter: str) -> bool:
    return adapter in module.lora_A or adapter in module.lora_embedding_A


def lora_modules(model: PeftModel, adapters: list[str]) -> dict[str, LoraLayer]:
    """Name (in the base model) -> LoRA layer, for the layers carrying at least one of `adapters`."""
    return {
        name: module
        for name, module in model.base_model.model.named_modules()
        if isinstance(module, LoraLayer) and any(has_adapter(module, a) for a in adapters)
    }


def where(model: PeftModel, name: str) -> Where:
    config = getattr(model.base_model.model, "config", None)
    num_layers = getattr(config, "num_hidden_layers", None) if config is not None else None
    match = re.search(r"\.(\d+)\.", name)
    return Where(name, int(match.group(1)) if match else None, num_layers)


def input_deltas(module: LoraLayer, adapters: list[str]) -> list[torch.Tensor]:
    """PEFT's own delta of each adapter at this module in float64; zeros where an adapter does not target it."""
    present = {a: module.get_delta_weight(a).detach().double() for a in adapters if has_adapter(module, a)}
    shape = next(iter(present.values())).shape
    return [present.get(a, torch.zeros(shape, dtype=torch.float64)) for a in adapters]


def adapter_dtype(module: LoraLayer, adapter: str) -> torch.dtype:
    if adapter in module.lora_embedding_A:
        return module.lora_embedding_A[adapter].dtype
    return module.lora_A[adapter].weight.dtype


def relative_error(actual: torch.Tensor, expected: torch.Tensor, deltas: list[torch.Tensor], weights: list[float]):
    """`|actual - expected|` over the size of the inputs (so that cancellations do not inflate it)."""
    scale = float(expected.norm()) + sum(abs(w) * float(d.norm()) for w, d in zip(weights, deltas, strict=True))
    return float((actual.to(torch.float64) - expected).norm()) / scale


def assert_matches_reference(
    model: PeftModel,
    combination_type: str,
    adapters: list[str],
    weights: list[float],
    options: dict | None = None,
    svd_rank: int | None = None,
    merged_name: str = "merged",
) -> dict[str, torch.Tensor]:
    """Merge, then compare every merged module with the dense reference; returns the references by module name."""
    options = options or {}
    if combination_type not in REFERENCES:
        pytest.fail(f"No dense reference for the built-in type {combination_type!r}: add one to REFERENCES.")
    model.add_weighted_adapter(
        adapters, weights, merged_name, combination_type=combination_type, svd_rank=svd_rank, **options
    )
    inputs = lora_modules(model, adapters)
    merged = lora_modules(model, [merged_name])
    assert set(merged) == set(inputs), "the merged adapter must cover exactly the modules of its inputs"
    references = {}
    for name, module in merged.items():
        deltas = input_deltas(module, adapters)
        expected = REFERENCES[combination_type](deltas, weights, where(model, name), options)
        if svd_rank is not None:
            expected = truncated(expected, svd_rank)
        actual = module.get_delta_weight(merged_name).detach()
        assert actual.shape == expected.shape, name
        dtype = adapter_dtype(module, merged_name)
        assert dtype == adapter_dtype(module, next(a for a in adapters if has_adapter(module, a)))
        error = relative_error(actual, expected, deltas, weights)
        assert error < TOLERANCE[dtype], f"{combination_type} at {name}: relative error {error:.2e}"
        references[name] = expected
    return references


def test_every_builtin_type_has_a_dense_reference():
    assert {"weighted", "average", "slerp", "karcher"} <= set(BUILTIN_TYPES)
    missing = sorted(set(BUILTIN_TYPES) - set(REFERENCES) - set(FACTOR_REFERENCES))
    assert not missing, f"built-in types without a dense reference in this file: {missing}"


# ----------------------------------------------------------------------------------------------------------------
# Correctness against the reference


@pytest.mark.parametrize("scenario", list(SCENARIOS))
@pytest.mark.parametrize("combination_type", DELTA_TYPES)
def test_merged_delta_matches_dense_reference(combination_type, scenario):
    model = build(scenario)
    names = list(SCENARIOS[scenario].names)
    weights = TYPE_WEIGHTS.get(combination_type, [0.5, 0.3, 0.2])
    adapters = names[: min(len(names), len(weights))]
    active_before = list(model.active_adapters)
    inputs_before = {name: input_deltas(module, adapters) for name, module in lora_modules(model, adapters).items()}
    assert_matches_reference(model, combination_type, adapters, weights[: len(adapters)])
    assert list(model.active_adapters) == active_before
    for name, module in lora_modules(model, adapters).items():  # the inputs are untouched
        assert all(map(torch.equal, input_deltas(module, adapters), inputs_before[name])), name


@pytest.mark.parametrize(
    "t",
    [
        None,
        0.25,
        [0.1, 0.9],
        [0.2, 0.8, 0.3],
        {"self_attn": 0.3, "mlp": [0.1, 0.9], "default": 0.6},
    ],
    ids=["from_weights", "float", "two_anchors", "three_anchors", "dict"],
)
def test_slerp_t_forms(t):
    model = build("llama")
    options = {} if t is None else {"t": t}
    weights = [0.2, 0.6]
    assert_matches_reference(model, "slerp", ["a", "b"], weights, options)
    report = peft_merge_ext.get_merge_report(model, "merged")
    for module in report.modules:
        assert module.stats["t"] == pytest.approx(reference_t(t, weights, where(model, module.name)), abs=1e-12)


def test_slerp_depth_schedule_values():
    """Anchors [0.1, 0.9] over 3 blocks give t = 0.1, 0.5, 0.9; a dict routes by module name."""
    model = build("llama")
    model.add_weighted_adapter(["a", "b"], [1.0, 1.0], "ramp", combination_type="slerp", t=[0.1, 0.9])
    schedule = {"self_attn": 0.3, "mlp": [0.0, 1.0], "default": 0.75}
    model.add_weighted_adapter(["a", "b"], [1.0, 1.0], "routed", combination_type="slerp", t=schedule)
    ramp = {m.name: m.stats["t"] for m in peft_merge_ext.get_merge_report(model, "ramp").modules}
    routed = {m.name: m.stats["t"] for m in peft_merge_ext.get_merge_report(model, "routed").modules}
    for index, expected in enumerate([0.1, 0.5, 0.9]):
        assert ramp[f"model.layers.{index}.self_attn.q_proj"] == pytest.approx(expected)
        assert ramp[f"model.layers.{index}.mlp.down_proj"] == pytest.approx(expected)
        assert routed[f"model.layers.{index}.self_attn.v_proj"] == pytest.approx(0.3)
        assert routed[f"model.layers.{index}.mlp.up_proj"] == pytest.approx(index / 2)
    assert ramp["model.embed_tokens"] == pytest.approx(0.1)  # outside the blocks: the first anchor
    assert routed["model.embed_tokens"] == pytest.approx(0.75)
    assert routed["lm_head"] == pytest.approx(0.75)


def test_slerp_colinear_and_zero_fallbacks():
    """Colinear (cos = 1), opposite (cos = -1) and one-sided (zero) deltas interpolate linearly."""
    model = add_lora(
        tiny_llama(), "a", seed=1, r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]
    )
    add_lora(model, "b", seed=2, r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "gate_proj"])
    with torch.no_grad():
        for name, module in lora_modules(model, ["a"]).items():
            factor = {"q_proj": 2.0, "k_proj": -1.0}.get(name.rsplit(".", 1)[-1])
            if factor is not None:
                module.lora_A["b"].weight.copy_(module.lora_A["a"].weight)
                module.lora_B["b"].weight.copy_(factor * module.lora_B["a"].weight)
    assert_matches_reference(model, "slerp", ["a", "b"], [1.0, 1.0], {"t": 0.3})
    stats = {m.name: m.stats for m in peft_merge_ext.get_merge_report(model, "merged").modules}
    for name, module in lora_modules(model, ["merged"]).items():
        kind = name.rsplit(".", 1)[-1]
        merged = module.get_delta_weight("merged").detach().double()
        if kind in ("q_proj", "k_proj", "o_proj"):
            own = module.get_delta_weight("a").detach().double()
            expected = {"q_proj": 1.3, "k_proj": 0.4, "o_proj": 0.7}[kind] * own  # 0.7 a + 0.3 (factor * a)
            assert float((merged - expected).norm()) < 1e-5 * float(own.norm())
        if kind == "gate_proj":
            other = module.get_delta_weight("b").detach().double()
            assert float((merged - 0.3 * other).norm()) < 1e-5 * float(other.norm())
        theta = stats[name]["theta_degrees"]
        if kind == "q_proj":
            assert theta == pytest.approx(0.0, abs=1e-3)
            assert stats[name]["rank"] == 4  # the colinear stack has the rank of one input
        elif kind == "k_proj":
            assert theta == pytest.approx(180.0, abs=1e-3)
        elif kind in ("o_proj", "gate_proj"):
            assert theta is None
        else:
            assert 30.0 < theta < 150.0


def test_karcher_with_two_adapters_on_every_layer_kind():
    model = build("conv2d")
    assert_matches_reference(model, "karcher", ["a", "b"], [0.25, 0.75], {"tol": 1e-12, "max_iter": 200})


# ----------------------------------------------------------------------------------------------------------------
# svd_rank


@pytest.mark.parametrize("scenario", ["llama", "conv2d"])
@pytest.mark.parametrize("combination_type", DELTA_TYPES)
def test_svd_rank_gives_the_optimal_truncation(combination_type, scenario):
    model = build(scenario)
    names = list(SCENARIOS[scenario].names)
    weights = TYPE_WEIGHTS.get(combination_type, [0.5, 0.3, 0.2])
    adapters = names[: min(len(names), len(weights))]
    svd_rank = 2
    assert_matches_reference(model, combination_type, adapters, weights[: len(adapters)], svd_rank=svd_rank)
    stats = {m.name: m.stats for m in peft_merge_ext.get_merge_report(model, "merged").modules}
    for name, module in lora_modules(model, ["merged"]).items():
        deltas = input_deltas(module, adapters)
        full = REFERENCES[combination_type](deltas, weights[: len(adapters)], where(model, name), {})
        s = torch.linalg.svdvals(full.reshape(full.shape[0], -1))
        rank = adapter_rank(module, "merged")
        assert rank == stats[name]["rank"] == min(svd_rank, int((s > s[0] * 1e-10).sum()))
        energy = float((s[:svd_rank] ** 2).sum() / (s**2).sum())
        assert stats[name]["energy_kept"] == pytest.approx(energy, rel=1e-6)


def adapter_rank(module: LoraLayer, adapter: str) -> int:
    if adapter in module.lora_embedding_A:
        return module.lora_embedding_A[adapter].shape[0]
    return module.lora_A[adapter].weight.shape[0]


def test_weighted_svd_rank_equals_peft_svd():
    """`weighted` with svd_rank=k gives PEFT's own `svd` result (which builds dense deltas and runs a full SVD)."""
    targets = ["q_proj", "v_proj", "down_proj", "embed_tokens"]
    model = add_lora(tiny_llama(), "a", seed=1, r=4, lora_alpha=8, target_modules=targets)
    add_lora(model, "b", seed=2, r=6, lora_alpha=3, target_modules=targets)
    weights = [0.6, -0.3]
    model.add_weighted_adapter(["a", "b"], weights, "peft_svd", combination_type="svd", svd_rank=3)
    model.add_weighted_adapter(["a", "b"], weights, "ours", combination_type="weighted", svd_rank=3)
    modules = lora_modules(model, ["ours"])
    assert set(modules) == set(lora_modules(model, ["peft_svd"]))
    for name, module in modules.items():
        theirs = module.get_delta_weight("peft_svd").detach().double()
        ours = module.get_delta_weight("ours").detach().double()
        assert adapter_rank(module, "ours") == 3
        assert float((ours - theirs).norm()) < 1e-5 * float(theirs.norm()), name


# ----------------------------------------------------------------------------------------------------------------
# save_pretrained / from_pretrained


ROUND_TRIPS = [(name, "llama") for name in DELTA_TYPES] + [
    ("weighted", "gpt2_conv1d"),
    ("slerp", "conv2d"),
    ("karcher", "llama_bf16"),
]


@pytest.mark.parametrize(("combination_type", "scenario"), ROUND_TRIPS)
def test_round_trip_through_save_pretrained(combination_type, scenario, tmp_path):
    model = build(scenario)
    names = list(SCENARIOS[scenario].names)
    weights = TYPE_WEIGHTS.get(combination_type, [0.5, 0.3, 0.2])
    adapters = names[: min(len(names), len(weights))]
    model.add_weighted_adapter(adapters, weights[: len(adapters)], "merged", combination_type=combination_type)
    model.save_pretrained(tmp_path, selected_adapters=["merged"])
    loaded = PeftModel.from_pretrained(
        SCENARIOS[scenario].base(), tmp_path / "merged", adapter_name="merged", autocast_adapter_dtype=False
    )
    original = lora_modules(model, ["merged"])
    reloaded = lora_modules(loaded, ["merged"])
    assert set(reloaded) == set(original)
    for name, module in reloaded.items():
        assert module.scaling["merged"] == 1.0
        assert adapter_rank(module, "merged") == adapter_rank(original[name], "merged")
        assert torch.equal(module.get_delta_weight("merged"), original[name].get_delta_weight("merged")), name


# ----------------------------------------------------------------------------------------------------------------
# Errors: raised before anything is modified


def error_model() -> PeftModel:
    model = add_lora(tiny_llama(), "a", seed=1, r=4, target_modules=["q_proj", "v_proj"])
    add_lora(model, "b", seed=2, r=6, use_rslora=True, target_modules=["q_proj", "k_proj"])
    add_lora(model, "c", seed=3, r=2, target_modules=["q_proj"])
    add_lora(model, "dora", seed=4, r=4, use_dora=True, target_modules=["q_proj"])
    add_lora(model, "biased", seed=5, r=4, lora_bias=True, target_modules=["q_proj"])
    return model


def snapshot(model: PeftModel) -> tuple:
    layers = {
        name: (sorted(module.lora_A), sorted(module.lora_embedding_A), dict(module.scaling))
        for name, module in model.named_modules()
        if isinstance(module, LoraLayer)
    }
    state = {key: value.clone() for key, value in model.state_dict().items()}
    return layers, sorted(model.peft_config), list(model.active_adapters), state


def assert_same(before: tuple, after: tuple) -> None:
    assert before[:3] == after[:3]
    assert before[3].keys() == after[3].keys()
    assert all(torch.equal(before[3][key], after[3][key]) for key in before[3])


ERROR_CASES = [
    ("slerp_three", (["a", "b", "c"], [1, 1, 1], "m", "slerp"), {}, MergeInputError, "exactly 2 adapters"),
    ("slerp_one", (["a"], [1], "m", "slerp"), {}, MergeInputError, "exactly 2 adapters"),
    ("slerp_negative", (["a", "b"], [0.5, -0.5], "m", "slerp"), {}, MergeInputError, "non-negative"),
    ("karcher_negative", (["a", "b"], [1.0, -0.1], "m", "karcher"), {}, MergeInputError, "non-negative"),
    ("slerp_all_zero", (["a", "b"], [0, 0], "m", "slerp"), {}, MergeInputError, "positive weight"),
    ("karcher_all_zero", (["a", "b"], [0.0, 0.0], "m", "karcher"), {}, MergeInputError, "positive weight"),
    ("weighted_all_zero", (["a", "b"], [0.0, 0.0], "m", "weighted"), {}, MergeInputError, "all 0"),
    ("average_all_zero", (["a", "b"], [0.0, 0.0], "m", "average"), {}, MergeInputError, "sum to 0"),
    ("average_sum_zero", (["a", "b"], [1.0, -1.0], "m", "average"), {}, MergeInputError, "sum to 0"),
    ("unknown_option", (["a", "b"], [1, 1], "m", "weighted"), {"foo": 1}, MergeInputError, "Unknown option"),
    ("slerp_bad_t", (["a", "b"], [1, 1], "m", "slerp"), {"t": 1.5}, MergeInputError, "between 0 and 1"),
    ("karcher_bad_tol", (["a", "b"], [1, 1], "m", "karcher"), {"tol": -1.0}, MergeInputError, "tol"),
    ("peft_only_argument", (["a", "b"], [1, 1], "m", "weighted"), {"density": 0.5}, MergeInputError, "density"),
    ("dora", (["a", "dora"], [1, 1], "m", "weighted"), {}, AdapterCompatibilityError, "DoRA"),
    ("lora_bias", (["a", "biased"], [1, 1], "m", "average"), {}, AdapterCompatibilityError, "lora_bias"),
    ("name_taken", (["a", "b"], [1, 1], "b", "weighted"), {}, MergeInputError, "already exists"),
    ("unknown_adapter", (["a", "nope"], [1, 1], "m", "weighted"), {}, MergeInputError, "nope"),
    ("weight_count", (["a", "b"], [1.0], "m", "weighted"), {}, MergeInputError, "one weight per adapter"),
    ("nan_weight", (["a", "b"], [math.nan, 1.0], "m", "weighted"), {}, MergeInputError, "finite"),
    ("inf_weight", (["a", "b"], [1.0, math.inf], "m", "slerp"), {}, MergeInputError, "finite"),
    ("t_dict_no_match", (["a", "b"], [1, 1], "m", "slerp"), {"t": {"mlp": 0.5}}, CombinationError, "'default'"),
]


@pytest.mark.parametrize(
    ("arguments", "options", "error", "message"),
    [case[1:] for case in ERROR_CASES],
    ids=[case[0] for case in ERROR_CASES],
)
def test_clear_error_and_model_unchanged(arguments, options, error, message):
    model = error_model()
    before = snapshot(model)
    with pytest.raises(error, match=re.escape(message)) as raised:
        model.add_weighted_adapter(*arguments, **options)
    assert isinstance(raised.value, PeftMergeExtError)
    assert_same(before, snapshot(model))


# ----------------------------------------------------------------------------------------------------------------
# The merge report


def test_merge_report_has_rank_energy_and_theta_per_module():
    model = build("llama")
    weights = [0.4, 0.6]
    model.add_weighted_adapter(["a", "b"], weights, "merged", combination_type="slerp", svd_rank=5)
    report = peft_merge_ext.get_merge_report(model, "merged")
    assert (report.combination_type, report.adapters, report.weights, report.svd_rank) == (
        "slerp",
        ["a", "b"],
        weights,
        5,
    )
    assert report.provider.startswith("builtin")
    modules = lora_modules(model, ["merged"])
    assert [m.name for m in report.modules] == list(modules)
    for entry in report.modules:
        module = modules[entry.name]
        deltas = input_deltas(module, ["a", "b"])
        assert entry.layer_index == where(model, entry.name).layer_index
        assert entry.stats["rank"] == adapter_rank(module, "merged") <= 5
        full = slerp_reference(deltas, weights, where(model, entry.name), {})
        s = torch.linalg.svdvals(full.reshape(full.shape[0], -1))
        assert entry.stats["energy_kept"] == pytest.approx(float((s[:5] ** 2).sum() / (s**2).sum()), rel=1e-6)
        first, second = (d.flatten() for d in deltas)
        if first.norm() == 0 or second.norm() == 0:
            assert entry.stats["theta_degrees"] is None
        else:
            cosine = float(first @ second / (first.norm() * second.norm()))
            assert entry.stats["theta_degrees"] == pytest.approx(math.degrees(math.acos(cosine)), abs=1e-3)
    summary = report.summary()
    assert summary["modules"] == len(modules)
    assert summary["rank"]["max"] <= 5
    json.dumps(report.to_dict())
    assert "theta_degrees" in report.to_markdown()


def test_karcher_report_records_convergence():
    model = build("llama")
    model.add_weighted_adapter(["a", "b", "c"], [1, 1, 1], "merged", combination_type="karcher")
    for entry in peft_merge_ext.get_merge_report(model, "merged").modules:
        assert entry.stats["converged"] is True
        assert entry.stats["iterations"] >= 1
        assert entry.stats["energy_kept"] == 1.0
