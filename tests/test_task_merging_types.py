"""The task-merging types (Core Space TIES / DARE, TSV, Iso-C, Iso-CTS, KnOTS TIES / DARE) against dense float64
references written from the formulas (`dense_reference.FACTOR_REFERENCES`: dense SVDs of the dense deltas, PEFT's
own `merge_utils` for the TIES / DARE step).

Core Space merging depends on how each product is split into B and A, so the references take each adapter's
canonical factors, read here from PEFT's layers (lora_B times the layer's scaling, lora_A flattened; checked
against PEFT's own `get_delta_weight`), on every layer kind of `test_combination_types.SCENARIOS`.
"""

from __future__ import annotations

import re

import pytest
import torch
from dense_reference import FACTOR_REFERENCES
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from test_combination_types import SCENARIOS, adapter_rank, assert_same, build, error_model, has_adapter, snapshot

import peft_merge_ext
from peft_merge_ext.cli import main
from peft_merge_ext.errors import MergeInputError, PeftMergeExtError
from peft_merge_ext.lowrank.core_space import CoreSpace, ElementwiseMerge, merge_elementwise
from peft_merge_ext.plugins.contract import LowRankDelta, ModuleContext
from peft_merge_ext.plugins.registry import get_combination_types
from peft_merge_ext.publish.card import FORMULAS

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*lora_bias=True.*was passed"),
    pytest.mark.filterwarnings("ignore:Setting `save_embedding_layers` to `True`"),
]

TASK_TYPES = sorted(FACTOR_REFERENCES)
TYPES = get_combination_types()
WEIGHTS = [0.6, 0.3, 0.5]
TOLERANCE = {torch.float32: 1e-6, torch.bfloat16: 3e-2}


def options_of(name: str, **given) -> dict:
    return {**TYPES[name].options, **given}


# ----------------------------------------------------------------------------------------------------------------
# Factor level: float64 in, float64 out, to 1e-9


def random_factors(generator: torch.Generator, out_features: int, in_features: int, ranks: list[int]) -> list:
    """Random factors of the given ranks (0: an adapter absent here, zero factors of rank 1 as the engine reads)."""
    factors = []
    for rank in ranks:
        if rank == 0:
            factors.append((torch.zeros(out_features, 1, dtype=torch.float64), torch.zeros(1, in_features).double()))
        else:
            b = torch.randn(out_features, rank, generator=generator, dtype=torch.float64)
            factors.append((b, torch.randn(rank, in_features, generator=generator, dtype=torch.float64)))
    return factors


def run_type(name: str, factors: list, weights: list[float], options: dict, svd_rank=None, module="m.0.q"):
    context = ModuleContext(module, svd_rank=svd_rank)
    deltas = [LowRankDelta(b.clone(), a.clone()) for b, a in factors]
    result = TYPES[name].function(deltas, list(weights), context, **options)
    return result, context.stats


SHAPES = {
    "wide": (20, 30, [4, 6, 2]),
    "short_out": (7, 40, [4, 6]),  # out < R: the stacked B has rank out
    "short_in": (30, 5, [3, 3, 2]),  # in < R
    "absent_adapter": (12, 12, [4, 0, 3]),
}


@pytest.mark.parametrize("svd_rank", [None, 2])
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("name", TASK_TYPES)
def test_factor_level_matches_dense_reference(name, shape, svd_rank):
    out_features, in_features, ranks = SHAPES[shape]
    factors = random_factors(torch.Generator().manual_seed(len(shape)), out_features, in_features, ranks)
    weights = WEIGHTS[: len(ranks)]
    result, stats = run_type(name, factors, weights, options_of(name), svd_rank)
    expected = FACTOR_REFERENCES[name](factors, weights, options_of(name), "m.0.q", svd_rank)
    assert float((result.dense() - expected).norm()) <= 1e-9 * float(expected.norm())
    assert result.rank == stats["rank"] <= (svd_rank or result.rank)


@pytest.mark.parametrize("name", TASK_TYPES)
def test_degenerate_inputs_match_dense_reference(name):
    """A duplicated adapter (repeated columns: polar factors on the range only, projections that leave pure noise)
    and untrained adapters (B = 0: a zero delta of rank 1)."""
    generator = torch.Generator().manual_seed(8)
    b, a = random_factors(generator, 10, 12, [3])[0]
    factors = [(b, a), (b.clone(), a.clone()), *random_factors(generator, 10, 12, [2])]
    for options in [{}, {"common_space_fraction": 0.0}, {"common_space_fraction": 0.3}] if name == "iso_cts" else [{}]:
        result, _ = run_type(name, factors, [1.0, 0.5, 1.0], options_of(name, **options))
        expected = FACTOR_REFERENCES[name](factors, [1.0, 0.5, 1.0], options_of(name, **options), "m.0.q")
        assert float((result.dense() - expected).norm()) <= 1e-9 * float(expected.norm()), options
    untrained = [(torch.zeros(10, 4, dtype=torch.float64), a[:1].repeat(4, 1)) for _ in range(3)]
    result, stats = run_type(name, untrained, [1.0, 1.0, 1.0], options_of(name))
    assert result.shape == (10, 12) and result.rank == stats["rank"] == 1 and not result.dense().any()


# ----------------------------------------------------------------------------------------------------------------
# Model level: every layer kind, through PEFT's drop-in add_weighted_adapter


def canonical(module: LoraLayer, delta: torch.Tensor) -> torch.Tensor:
    """A delta in PEFT's layout (`get_delta_weight`) as the contract's `out x in` matrix."""
    transposed = bool(module.lora_embedding_A) or getattr(module, "fan_in_fan_out", False)
    return delta.T if transposed else delta.reshape(delta.shape[0], -1)


def canonical_factors(module: LoraLayer, adapter: str, shape: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The adapter's (B * scaling, A) from PEFT's layer, zeros of rank 1 where it is absent."""
    if not has_adapter(module, adapter):
        return torch.zeros(shape[0], 1, dtype=torch.float64), torch.zeros(1, shape[1], dtype=torch.float64)
    if adapter in module.lora_embedding_A:
        a, b = module.lora_embedding_A[adapter], module.lora_embedding_B[adapter]
    else:
        a, b = module.lora_A[adapter].weight, module.lora_B[adapter].weight
    tolerance = TOLERANCE[a.dtype]  # PEFT's get_delta_weight multiplies in the adapter's dtype
    a = a.detach().double().reshape(a.shape[0], -1)
    b = b.detach().double().reshape(b.shape[0], -1) * module.scaling[adapter]
    own = canonical(module, module.get_delta_weight(adapter).detach().double())
    assert float((b @ a - own).norm()) <= tolerance * float(own.norm()), "factor extraction"
    return b, a


def merged_modules(model: PeftModel, adapter: str) -> dict[str, LoraLayer]:
    return {
        name: module
        for name, module in model.base_model.model.named_modules()
        if isinstance(module, LoraLayer) and has_adapter(module, adapter)
    }


def assert_model_matches(model, name, adapters, weights, options=None, svd_rank=None, merged="merged", **kwargs):
    """Merge through PEFT's `add_weighted_adapter`, then compare every merged module with the reference."""
    options = dict(options or {})
    model.add_weighted_adapter(adapters, weights, merged, combination_type=name, svd_rank=svd_rank, **options)
    resolved = options_of(name, **options, **kwargs)
    modules = merged_modules(model, merged)
    assert modules
    for module_name, module in modules.items():
        actual = canonical(module, module.get_delta_weight(merged).detach().double())
        factors = [canonical_factors(module, adapter, tuple(actual.shape)) for adapter in adapters]
        expected = FACTOR_REFERENCES[name](factors, weights, resolved, module_name, svd_rank)
        dtype = module.lora_A[merged].weight.dtype if merged in module.lora_A else torch.float32
        error = float((actual - expected).norm()) / float(expected.norm())
        assert error < TOLERANCE[dtype], f"{name} at {module_name}: relative error {error:.2e}"
    model.delete_adapter(merged)


@pytest.fixture(scope="module")
def models():
    """One model per scenario, shared (each test adds, checks and deletes its own merged adapter)."""
    return {scenario: build(scenario) for scenario in SCENARIOS}


# Every type on every float32 layer kind; bfloat16 storage for one type of each family (the tests stay fast).
MODEL_CASES = [(name, scenario) for scenario in SCENARIOS if scenario != "llama_bf16" for name in TASK_TYPES] + [
    (name, "llama_bf16") for name in ("core_dare", "knots_ties", "tsv", "iso_cts")
]


@pytest.mark.parametrize(("name", "scenario"), MODEL_CASES)
def test_model_matches_dense_reference_on_every_layer_kind(models, name, scenario):
    adapters = list(SCENARIOS[scenario].names)
    assert_model_matches(models[scenario], name, adapters, WEIGHTS[: len(adapters)])


CUSTOM_OPTIONS = {
    "core_ties": {"density": 0.3, "majority_sign_method": "frequency"},
    "core_dare": {"density": 0.7, "elect_sign": False, "seed": 7},
    "knots_ties": {"density": 0.8, "majority_sign_method": "frequency"},
    "knots_dare": {"density": 0.4, "majority_sign_method": "frequency", "seed": -3},
    "tsv": {"keep": 0.5},
    "iso_c": {},
    "iso_cts": {"common_space_fraction": 0.5},
}


@pytest.mark.parametrize("name", TASK_TYPES)
def test_options_and_svd_rank_match_dense_reference(models, name):
    assert_model_matches(models["llama"], name, ["a", "b", "c"], [1.0, 0.5, 2.0], CUSTOM_OPTIONS[name])
    assert_model_matches(models["conv2d"], name, ["a", "b"], [0.7, 0.4], CUSTOM_OPTIONS[name], svd_rank=2)


def test_density_reaches_the_type_through_peft_add_weighted_adapter(models):
    """PEFT's own `density=` / `majority_sign_method=` arguments are passed on to the types that declare them."""
    model = models["llama"]
    model.add_weighted_adapter(
        ["a", "b"], [1, 1], "kw", combination_type="core_ties", density=0.3, majority_sign_method="frequency"
    )
    model.add_weighted_adapter(["a", "b"], [1, 1], "opt", combination_type="core_ties", density=0.3)
    report = peft_merge_ext.get_merge_report(model, "kw")
    assert report.options == {"density": 0.3, "majority_sign_method": "frequency"}
    assert all(m.stats["kept_fraction"] <= 0.3 for m in report.modules)
    changed = 0
    for module in merged_modules(model, "kw").values():
        changed += not torch.equal(module.get_delta_weight("kw"), module.get_delta_weight("opt"))
    assert changed  # the sign method reached the type
    model.delete_adapter("kw")
    model.delete_adapter("opt")


# ----------------------------------------------------------------------------------------------------------------
# Properties


@st.composite
def same_direction(draw: st.DrawFn) -> tuple[list, list[float], torch.Tensor]:
    """k adapters D_i = c_i D (c_i > 0), each split differently into B_i G_i, G_i^-1 A_i: their cores agree in sign."""
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    out_features, in_features = draw(st.integers(3, 12)), draw(st.integers(3, 12))
    rank, count = draw(st.integers(1, min(out_features, in_features, 4))), draw(st.integers(2, 4))
    b, a = random_factors(generator, out_features, in_features, [rank])[0]
    factors = []
    for _ in range(count):
        scale = draw(st.floats(0.2, 3.0))
        mix = torch.randn(rank, rank, generator=generator, dtype=torch.float64) + 3 * torch.eye(rank).double()
        factors.append((scale * b @ mix, torch.linalg.solve(mix, a)))
    weights = [draw(st.floats(0.1, 2.0)) for _ in range(count)]
    total = sum(w * (fb @ fa) for w, (fb, fa) in zip(weights, factors, strict=True))
    return factors, weights, total


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=same_direction())
def test_density_one_with_agreeing_signs_is_the_disjoint_mean(case):
    """TIES-like types at density 1 with agreeing signs give PEFT's disjoint mean, sum(w_i D_i) / k."""
    factors, weights, total = case
    for name, options in [
        ("core_ties", {"density": 1.0}),
        ("knots_ties", {"density": 1.0, "majority_sign_method": "frequency"}),
        ("core_dare", {"density": 1.0, "seed": 3}),
        ("knots_dare", {"density": 1.0}),
    ]:
        result, stats = run_type(name, factors, weights, options_of(name, **options))
        expected = total / len(factors)
        assert float((result.dense() - expected).norm()) <= 1e-9 * float(expected.norm()), name
        assert stats["kept_fraction"] == 1.0 and stats["sign_conflict_rate"] == 0.0


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**31), count=st.integers(2, 4), signs=st.lists(st.sampled_from([-1.0, 1.0]), min_size=4))
def test_dare_linear_at_density_one_is_the_weighted_sum(seed, count, signs):
    """The core space is lossless: `dare_linear` at density 1 is exactly sum(w_i D_i), for any adapters and signs."""
    generator = torch.Generator().manual_seed(seed)
    factors = random_factors(generator, 9, 11, [int(r) for r in torch.randint(1, 5, (count,), generator=generator)])
    weights = [s * (0.5 + i) for i, s in enumerate(signs[:count])]
    total = sum(w * (b @ a) for w, (b, a) in zip(weights, factors, strict=True))
    for name in ("core_dare", "knots_dare"):
        result, _ = run_type(name, factors, weights, options_of(name, density=1.0, elect_sign=False))
        assert float((result.dense() - total).norm()) <= 1e-9 * float(total.norm()), name


def test_core_ties_does_not_depend_on_singular_vector_signs_but_on_the_split():
    factors = random_factors(torch.Generator().manual_seed(5), 10, 14, [3, 4, 2])
    deltas = [LowRankDelta(b, a) for b, a in factors]
    weights = [0.8, 0.5, 1.2]
    how = ElementwiseMerge(0.4, "total")
    space = CoreSpace.from_deltas(deltas)

    def merged_delta(space: CoreSpace) -> torch.Tensor:
        left, core, right = space.expand(merge_elementwise(space.cores(), weights, how)[0])
        return left @ core @ right.T

    reference = merged_delta(space)
    flips = torch.Generator().manual_seed(6)
    for _ in range(3):
        flip_left = torch.randint(0, 2, (space.left.shape[1],), generator=flips).double() * 2 - 1
        flip_right = torch.randint(0, 2, (space.right.shape[1],), generator=flips).double() * 2 - 1
        flipped = CoreSpace(space.span, space.left * flip_left, space.right * flip_right)
        assert torch.allclose(merged_delta(flipped), reference, rtol=0, atol=1e-12)
    # Another split of the same products (B G, G^-1 A) gives other bases: core_ties changes, the deltas do not.
    mix = torch.randn(4, 4, generator=flips, dtype=torch.float64) + 2 * torch.eye(4, dtype=torch.float64)
    resplit = [factors[0], (factors[1][0] @ mix, torch.linalg.solve(mix, factors[1][1])), factors[2]]
    options = options_of("core_ties", density=0.4)
    first, _ = run_type("core_ties", factors, weights, options)
    second, _ = run_type("core_ties", resplit, weights, options)
    assert torch.allclose(resplit[1][0] @ resplit[1][1], factors[1][0] @ factors[1][1])
    assert not torch.allclose(first.dense(), second.dense(), atol=1e-6)


@pytest.mark.parametrize("name", ["core_dare", "knots_dare"])
def test_dare_seed_is_reproducible_and_different_seeds_differ(models, name):
    model = models["gpt2_conv1d"]
    for merged, seed in [("s1", 11), ("s1_again", 11), ("s2", 12)]:
        model.add_weighted_adapter(["a", "b"], [1.0, 1.0], merged, combination_type=name, seed=seed)
    assert peft_merge_ext.get_merge_report(model, "s2").options["seed"] == 12
    differ = 0
    for module in merged_modules(model, "s1").values():
        first = module.get_delta_weight("s1")
        assert torch.equal(first, module.get_delta_weight("s1_again"))
        differ += not torch.allclose(first, module.get_delta_weight("s2"))
    assert differ == len(merged_modules(model, "s1"))
    for merged in ("s1", "s1_again", "s2"):
        model.delete_adapter(merged)


def test_report_records_the_per_module_statistics(models):
    model = models["llama"]
    expected = {
        "core_ties": {"kept_fraction", "sign_conflict_rate", "core_shape", "energy_kept"},
        "knots_dare": {"kept_fraction", "sign_conflict_rate", "aligned_rank"},
        "tsv": {"kept_triplets", "energy_kept"},
        "iso_c": {"common_rank", "mean_singular_value"},
        "iso_cts": {"common_rank", "task_rank", "mean_singular_value"},
    }
    for name, keys in expected.items():
        model.add_weighted_adapter(["a", "b", "c"], [1, 1, 1], "stats", combination_type=name)
        report = peft_merge_ext.get_merge_report(model, "stats")
        for entry in report.modules:
            assert keys <= set(entry.stats), (name, entry.name)
            assert entry.stats["rank"] >= 1
        if name == "core_ties":
            assert all(0 < m.stats["kept_fraction"] <= 0.5 for m in report.modules)
            assert any(m.stats["sign_conflict_rate"] > 0 for m in report.modules)
        if name == "tsv":  # keep = 1/3 of each adapter's rank, rounded up
            kept = {m.name: m.stats["kept_triplets"] for m in report.modules}
            assert kept["model.layers.0.self_attn.q_proj"] == 2 + 2 + 1  # ranks 4, 6, 2
            assert kept["model.embed_tokens"] == 2 + 1  # ranks 4, 2 (b is absent)
        model.delete_adapter("stats")


# ----------------------------------------------------------------------------------------------------------------
# Bad input: a clear error before anything changes


ERROR_CASES = [
    ("density_zero", "core_ties", ["a", "b"], [1, 1], {"density": 0.0}, "density must be a number in (0, 1]"),
    ("density_big", "knots_ties", ["a", "b"], [1, 1], {"density": 1.5}, "density must be a number in (0, 1]"),
    ("density_bool", "core_dare", ["a", "b"], [1, 1], {"density": True}, "density must be a number"),
    ("keep_zero", "tsv", ["a", "b"], [1, 1], {"keep": 0}, "keep must be a number in (0, 1]"),
    ("keep_big", "tsv", ["a", "b"], [1, 1], {"keep": 1.01}, "keep must be a number in (0, 1]"),
    ("seed_str", "core_dare", ["a", "b"], [1, 1], {"seed": "1"}, "seed must be an integer"),
    ("seed_bool", "knots_dare", ["a", "b"], [1, 1], {"seed": True}, "seed must be an integer"),
    ("seed_float", "core_dare", ["a", "b"], [1, 1], {"seed": 1.0}, "seed must be an integer"),
    ("elect_sign", "core_dare", ["a", "b"], [1, 1], {"elect_sign": "no"}, "elect_sign must be True"),
    ("sign_method", "core_ties", ["a", "b"], [1, 1], {"majority_sign_method": "max"}, "'total' or 'frequency'"),
    ("one_adapter", "iso_c", ["a"], [1], {}, "at least 2 adapters"),
    ("one_adapter_ties", "core_ties", ["a"], [1], {}, "at least 2 adapters"),
    ("negative", "core_ties", ["a", "b"], [1, -1], {}, "non-negative weights"),
    ("negative_knots", "knots_dare", ["a", "b"], [0.5, -0.5], {}, "non-negative weights"),
    ("all_zero", "iso_cts", ["a", "b"], [0, 0], {}, "all 0"),
    ("fraction", "iso_cts", ["a", "b"], [1, 1], {"common_space_fraction": 1.5}, "in [0, 1]"),
    ("undeclared_density", "tsv", ["a", "b"], [1, 1], {"density": 0.5}, "'tsv' does not take it"),
    ("unknown", "iso_c", ["a", "b"], [1, 1], {"keep": 0.5}, "Unknown option"),
]


@pytest.mark.parametrize(
    ("name", "adapters", "weights", "options", "message"),
    [case[1:] for case in ERROR_CASES],
    ids=[case[0] for case in ERROR_CASES],
)
def test_invalid_options_give_a_clear_error_and_leave_the_model_unchanged(name, adapters, weights, options, message):
    model = error_model()
    before = snapshot(model)
    with pytest.raises(MergeInputError, match=re.escape(message)) as raised:
        model.add_weighted_adapter(adapters, weights, "m", combination_type=name, **options)
    assert isinstance(raised.value, PeftMergeExtError)
    assert_same(before, snapshot(model))


# ----------------------------------------------------------------------------------------------------------------
# Round trip, CLI listing, model card


@pytest.mark.parametrize(("name", "scenario"), [("core_ties", "llama"), ("iso_cts", "gpt2_conv1d")])
def test_round_trip_through_save_pretrained(name, scenario, tmp_path):
    model = build(scenario)
    adapters = list(SCENARIOS[scenario].names)
    model.add_weighted_adapter(adapters, WEIGHTS[: len(adapters)], "merged", combination_type=name)
    model.save_pretrained(tmp_path, selected_adapters=["merged"])
    loaded = PeftModel.from_pretrained(
        SCENARIOS[scenario].base(), tmp_path / "merged", adapter_name="merged", autocast_adapter_dtype=False
    )
    original, reloaded = merged_modules(model, "merged"), merged_modules(loaded, "merged")
    assert set(reloaded) == set(original)
    for module_name, module in reloaded.items():
        assert adapter_rank(module, "merged") == adapter_rank(original[module_name], "merged")
        assert torch.equal(module.get_delta_weight("merged"), original[module_name].get_delta_weight("merged"))


def test_cli_lists_the_types_with_their_formulas_and_the_card_has_them(capsys):
    assert main(["plugins"]) == 0
    text = capsys.readouterr().out
    for name in TASK_TYPES:
        assert f"{name}:" in text
        assert TYPES[name].plugin == "builtin"
        assert "arxiv.org" in TYPES[name].description
        assert name in FORMULAS and "arxiv.org" in FORMULAS[name]
    assert "U M V^T" in text and "mean(S) U V^T" in text


def test_card_formula_and_recipe_rerun_give_the_same_bytes(tmp_path, monkeypatch):
    """A streamed merge with core_dare: the card names the formula, and its recipe (seed, elect_sign, density)
    reruns with `peft-merge-ext run` to the same bytes."""
    import huggingface_hub.constants
    from conftest import add_lora, tiny_llama
    from safetensors.torch import load_file
    from test_recipe import _cache_repo, _card_recipe

    from peft_merge_ext.publish.merge_checkpoint import merge_checkpoint

    staging = tmp_path / "staging"
    base = tiny_llama()
    base.save_pretrained(staging / "base")
    model = add_lora(base, "a", seed=1, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    add_lora(model, "b", seed=2, r=2, lora_alpha=2, use_rslora=True, target_modules=["q_proj", "o_proj"])
    model.save_pretrained(staging / "adapters")
    cache = tmp_path / "hf-cache"
    for repo_id, folder in [("org/base", "base"), ("org/a", "adapters/a"), ("org/b", "adapters/b")]:
        _cache_repo(cache, repo_id, staging / folder)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    first = merge_checkpoint(
        "org/base",
        ["org/a", "org/b"],
        out=tmp_path / "first",
        combination_type="core_dare",
        weights=[0.7, 0.3],
        density=0.6,
        elect_sign=False,
        seed=5,
        quiet=True,
    )
    card = (first.path / "README.md").read_text()
    assert FORMULAS["core_dare"] in card
    recipe_text = _card_recipe(first.path)
    assert "seed: 5" in recipe_text and "elect_sign: false" in recipe_text and "density: 0.6" in recipe_text
    rerun = tmp_path / "rerun"
    rerun.mkdir()
    (rerun / "recipe.yaml").write_text(recipe_text)
    monkeypatch.chdir(rerun)
    assert main(["run", "recipe.yaml", "--quiet"]) == 0
    expected = load_file(str(first.path / "model.safetensors"))
    got = load_file(str(rerun / "merged" / "model.safetensors"))
    assert set(got) == set(expected) and all(torch.equal(got[key], expected[key]) for key in expected)
