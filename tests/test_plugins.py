"""The plugin system: discovery through entry points, the example plugin, filtering, name rules, broken plugins.

Third-party plugins used here are real distributions: the example plugin of `hooks/peft-merge-ext-example` (installed
by `.ci/run`) and tiny `*.dist-info` distributions written into `tmp_path` and put on `sys.path`.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import itertools
import json
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
from conftest import add_lora, tiny_llama

import peft_merge_ext
from peft_merge_ext.errors import (
    DuplicateCombinationTypeError,
    MergeInputError,
    PluginError,
    ReservedCombinationTypeError,
)
from peft_merge_ext.plugins.contract import LowRankDelta, ModuleContext
from peft_merge_ext.plugins.registry import LOAD_PLUGINS_ENV, Register, load_plugins

EXAMPLE_DISTRIBUTION = "peft-merge-ext-example"
BUILTIN_TYPES = {"weighted", "average", "slerp", "karcher"} | {
    "core_ties",
    "core_dare",
    "tsv",
    "iso_c",
    "iso_cts",
    "knots_ties",
    "knots_dare",
}
PLUGIN_WARNING = "peft-merge-ext plugin"


@pytest.fixture(scope="module", autouse=True)
def example_plugin_installed() -> None:
    try:
        importlib.metadata.distribution(EXAMPLE_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        pytest.fail(f"{EXAMPLE_DISTRIBUTION} is not installed: run `pip install -e hooks/peft-merge-ext-example`.")


def write_distribution(root: Path, distribution: str, source: str, entry_point: str | None = None) -> str:
    """Write a real distribution into `root`: `<module>-1.0.dist-info/` (METADATA, entry_points.txt) and `<module>.py`
    with `source`, the module being `distribution` with `_` for `-`. Returns the module name, which is also the
    entry-point name unless `entry_point` is given."""
    module = distribution.replace("-", "_")
    (root / f"{module}.py").write_text(textwrap.dedent(source))
    dist_info = root / f"{module}-1.0.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {distribution}\nVersion: 1.0\n")
    (dist_info / "entry_points.txt").write_text(f"[peft_merge_ext]\n{entry_point or module} = {module}\n")
    return module


class PluginSandbox:
    """A folder on `sys.path` to install tiny distributions into, and a way to reload the plugins."""

    def __init__(self, root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self.root = root
        self.monkeypatch = monkeypatch
        self.modules: list[str] = []

    def add_distribution(self, distribution: str, source: str, entry_point: str | None = None) -> str:
        """Install a distribution (see `write_distribution`); returns its module name."""
        module = write_distribution(self.root, distribution, source, entry_point)
        self.modules.append(module)
        return module

    def reload(self) -> None:
        importlib.invalidate_caches()
        load_plugins(reload=True)


def _reload_quietly() -> None:
    importlib.invalidate_caches()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        load_plugins(reload=True)


@pytest.fixture
def sandbox(tmp_path: Path):
    """A `PluginSandbox` on `sys.path`; afterwards `sys.path`, the environment and the registry are restored."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.syspath_prepend(str(tmp_path))
        box = PluginSandbox(tmp_path, monkeypatch)
        try:
            yield box
        finally:
            for module in box.modules:
                sys.modules.pop(module, None)
    _reload_quietly()


def _plugin_warnings(caught: list[warnings.WarningMessage]) -> list[str]:
    return [
        str(w.message) for w in caught if issubclass(w.category, RuntimeWarning) and PLUGIN_WARNING in str(w.message)
    ]


def _dense(delta: LowRankDelta) -> torch.Tensor:
    return delta.B.double() @ delta.A.double()


def _model_stock_reference(dense: list[torch.Tensor], weights: list[float]) -> tuple[torch.Tensor, float, float]:
    """Model Stock on dense float64 matrices, written independently of the plugin: returns (merged, t, cos)."""
    total = sum(weights)
    p = [w / total for w in weights]
    mean = sum(pi * d for pi, d in zip(p, dense, strict=True))
    pairs = [
        (p[i] * p[j], float((dense[i] * dense[j]).sum() / (dense[i].norm() * dense[j].norm())))
        for i, j in itertools.combinations(range(len(dense)), 2)
        if dense[i].norm() > 0 and dense[j].norm() > 0 and p[i] * p[j] > 0
    ]
    cos = sum(w * c for w, c in pairs) / sum(w for w, _ in pairs) if pairs else 1.0
    k = 1.0 / sum(pi * pi for pi in p)
    cos_clamped = min(max(cos, 0.0), 1.0)
    t = k * cos_clamped / (1 + (k - 1) * cos_clamped)
    return t * mean, t, cos


# --- discovery -------------------------------------------------------------------------------------------------------


def test_example_plugin_is_discovered_through_its_entry_point():
    entry_points = {ep.name: ep for ep in importlib.metadata.entry_points(group="peft_merge_ext")}
    assert entry_points["example"].value == "peft_merge_ext_example"
    version = importlib.metadata.version(EXAMPLE_DISTRIBUTION)

    model_stock = peft_merge_ext.get_combination_types()["model_stock"]
    assert (model_stock.plugin, model_stock.distribution, model_stock.version) == (
        "example",
        EXAMPLE_DISTRIBUTION,
        version,
    )
    assert model_stock.provider == f"example ({EXAMPLE_DISTRIBUTION} {version})"
    assert "Model Stock" in model_stock.description

    plugins = {plugin.name: plugin for plugin in peft_merge_ext.get_plugins()}
    example = plugins["example"]
    assert (example.distribution, example.version) == (EXAMPLE_DISTRIBUTION, version)
    assert example.types == ("model_stock",)
    assert example.hooks == ("register_combination_types",)


def test_builtin_types_come_through_the_same_entry_point_path():
    entry_points = {ep.name: ep.value for ep in importlib.metadata.entry_points(group="peft_merge_ext")}
    assert entry_points["builtin"] == "peft_merge_ext.plugins.builtin_types"
    types = peft_merge_ext.get_combination_types()
    assert set(types) >= BUILTIN_TYPES
    for name in BUILTIN_TYPES:
        assert (types[name].plugin, types[name].distribution) == ("builtin", "peft-merge-ext")
        assert types[name].version == peft_merge_ext.__version__
    builtin = next(plugin for plugin in peft_merge_ext.get_plugins() if plugin.name == "builtin")
    assert set(builtin.types) == BUILTIN_TYPES


def test_registry_is_read_only():
    types = peft_merge_ext.get_combination_types()
    with pytest.raises(TypeError):
        types["mine"] = types["weighted"]  # type: ignore[index]
    with pytest.raises(TypeError):
        types["weighted"].options["new"] = 1  # type: ignore[index]


def test_hook_register_combination_types(sandbox):
    """What a plugin passes to `register(...)` is exactly what `get_combination_types()` hands out."""
    sandbox.add_distribution(
        "peft-merge-ext-scaled",
        """
        import peft_merge_ext
        from peft_merge_ext import LowRankDelta, MergeInputError

        def scaled(deltas, weights, context, factor=2.0):
            return LowRankDelta(deltas[0].B * factor * weights[0], deltas[0].A)

        def check(weights, options):
            if options["factor"] == 0:
                raise MergeInputError("factor must not be 0")

        @peft_merge_ext.hookimpl
        def register_combination_types(register):
            register("scaled", scaled, description="The first delta, scaled.", options={"factor": 2.0}, validate=check)
            register("scaled_bare", scaled)
        """,
    )
    sandbox.reload()
    module = sys.modules["peft_merge_ext_scaled"]
    types = peft_merge_ext.get_combination_types()
    scaled, bare = types["scaled"], types["scaled_bare"]
    assert scaled.function is module.scaled and scaled.validate is module.check
    assert (scaled.description, dict(scaled.options)) == ("The first delta, scaled.", {"factor": 2.0})
    # Options are declared once, by the function's signature: the bare registration gets them too.
    assert (bare.description, dict(bare.options), bare.validate) == ("", {"factor": 2.0}, None)
    assert scaled.provider == bare.provider == "peft_merge_ext_scaled (peft-merge-ext-scaled 1.0)"

    model = add_lora(tiny_llama(), "a", seed=1, r=2, target_modules=["q_proj"])
    add_lora(model, "b", seed=2, r=2, target_modules=["q_proj"])
    with pytest.raises(MergeInputError, match="factor must not be 0"):
        model.add_weighted_adapter(["a", "b"], [1.0, 1.0], "zero", combination_type="scaled", factor=0)
    model.add_weighted_adapter(["a", "b"], [0.5, 1.0], "triple", combination_type="scaled", factor=3.0)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    torch.testing.assert_close(layer.get_delta_weight("triple"), 1.5 * layer.get_delta_weight("a"))


CARD_PLUGIN = """
    import peft_merge_ext

    @peft_merge_ext.hookimpl
    def extend_model_card(card, merge_info):
        card.text += f"\\n## Safety notes\\n\\nMerged with {merge_info.combination_type}.\\n"
    """
BROKEN_CARD_PLUGIN = """
    import peft_merge_ext

    @peft_merge_ext.hookimpl
    def extend_model_card(card):
        raise KeyError("template_section")
    """


def _merge_info():
    from peft_merge_ext.engine.merge_info import AdapterInfo, MergeInfo

    adapters = [AdapterInfo(name, None, 0.5, 4, 8.0, ["q_proj"]) for name in ("a", "b")]
    return MergeInfo(base_model=None, adapters=adapters, combination_type="model_stock")


def test_hook_extend_model_card(sandbox):
    from peft_merge_ext.publish.card import build_model_card

    sandbox.add_distribution("peft-merge-ext-card", CARD_PLUGIN)
    sandbox.reload()
    card = build_model_card(_merge_info())
    assert card.text.rstrip().endswith("## Safety notes\n\nMerged with model_stock.")
    assert "peft_merge_ext_card" in {plugin.name for plugin in peft_merge_ext.get_plugins()}


def test_run_hook_survives_an_implementation_that_raises(sandbox):
    from huggingface_hub import ModelCard

    from peft_merge_ext.plugins.registry import run_hook

    sandbox.add_distribution("peft-merge-ext-card", CARD_PLUGIN)
    sandbox.add_distribution("peft-merge-ext-card-broken", BROKEN_CARD_PLUGIN)
    sandbox.reload()
    card = ModelCard("---\nlicense: mit\n---\n# Title\n")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert run_hook("extend_model_card", card=card, merge_info=_merge_info()) == []
    messages = _plugin_warnings(caught)
    assert len(messages) == 1
    assert "'peft_merge_ext_card_broken' from peft-merge-ext-card-broken" in messages[0] and "KeyError" in messages[0]
    assert "Merged with model_stock." in card.text


# --- the example plugin's maths --------------------------------------------------------------------------------------


def _random_delta(generator: torch.Generator, rank: int, out_features: int = 7, in_features: int = 5) -> LowRankDelta:
    return LowRankDelta(
        torch.randn(out_features, rank, generator=generator, dtype=torch.float64),
        torch.randn(rank, in_features, generator=generator, dtype=torch.float64),
    )


@pytest.mark.parametrize("weights", [[1.0, 1.0, 1.0], [0.5, 2.0, 1.5], [3.0, 0.0, 1.0]])
def test_model_stock_matches_a_dense_reference(weights):
    model_stock = peft_merge_ext.get_combination_types()["model_stock"]
    generator = torch.Generator().manual_seed(0)
    common = _random_delta(generator, 2)
    # A shared component makes the deltas positively correlated, as fine-tuned task vectors are.
    deltas = [
        LowRankDelta(torch.cat([common.B, d.B], 1), torch.cat([common.A, d.A]))
        for d in (_random_delta(generator, r) for r in (1, 2, 3))
    ]
    context = ModuleContext("layers.0.q_proj", 0, 2)

    merged = model_stock.function(deltas, weights, context)

    expected, t, cos = _model_stock_reference([_dense(d) for d in deltas], weights)
    assert 0 < cos < 1 and 0 < t < 1
    torch.testing.assert_close(_dense(merged), expected, rtol=1e-12, atol=1e-12)
    assert context.stats["t"] == pytest.approx(t, rel=1e-12)
    assert context.stats["cos_theta"] == pytest.approx(cos, rel=1e-12)


def test_model_stock_edge_cases():
    model_stock = peft_merge_ext.get_combination_types()["model_stock"]
    generator = torch.Generator().manual_seed(1)
    delta = _random_delta(generator, 3)
    zero = LowRankDelta(torch.zeros(7, 1, dtype=torch.float64), torch.zeros(1, 5, dtype=torch.float64))

    # k = 1: the delta itself (t = 1).
    context = ModuleContext("single")
    torch.testing.assert_close(_dense(model_stock.function([delta], [2.0], context)), _dense(delta))
    assert context.stats["t"] == 1.0

    # Opposite deltas (cos = -1 <= 0): nothing in common, back to the base model (t = 0).
    opposite = LowRankDelta(-delta.B, delta.A)
    context = ModuleContext("opposite")
    assert torch.count_nonzero(_dense(model_stock.function([delta, opposite], [1.0, 1.0], context))) == 0
    assert (context.stats["t"], context.stats["cos_theta"]) == (0.0, pytest.approx(-1.0))

    # A module only one adapter touches: the others are zero deltas, left out of the angle (t = 1, plain mean).
    context = ModuleContext("partial")
    merged = model_stock.function([delta, zero], [1.0, 3.0], context)
    torch.testing.assert_close(_dense(merged), 0.25 * _dense(delta), rtol=1e-12, atol=1e-12)
    assert context.stats["cos_theta"] is None and context.stats["t"] == 1.0


@pytest.mark.parametrize("weights", [[1.0, -1.0], [0.0, 0.0]])
def test_model_stock_refuses_weights_that_are_not_a_mean(weights):
    model = add_lora(tiny_llama(), "a", seed=1, r=2, target_modules=["q_proj"])
    add_lora(model, "b", seed=2, r=2, target_modules=["q_proj"])
    with pytest.raises(MergeInputError, match="non-negative"):
        model.add_weighted_adapter(["a", "b"], weights, "stock", combination_type="model_stock")
    assert "stock" not in model.peft_config


def test_model_stock_merges_real_adapters_through_add_weighted_adapter():
    model = add_lora(tiny_llama(), "a", seed=1, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    add_lora(model, "b", seed=2, r=2, lora_alpha=2, use_rslora=True, target_modules=["q_proj", "v_proj"])
    add_lora(model, "c", seed=3, r=3, lora_alpha=6, target_modules=["q_proj"])  # v_proj: a zero delta
    weights = [0.5, 0.3, 0.2]

    model.add_weighted_adapter(["a", "b", "c"], weights, "stock", combination_type="model_stock")

    report = peft_merge_ext.get_merge_report(model, "stock")
    assert report.provider.startswith("example (peft-merge-ext-example")
    stats = {module.name: module.stats for module in report.modules}
    layers = {name: module for name, module in model.base_model.model.named_modules() if hasattr(module, "lora_A")}
    checked = 0
    for name, layer in layers.items():
        inputs = [
            (layer.lora_B[a].weight.detach().double() @ layer.lora_A[a].weight.detach().double()) * layer.scaling[a]
            if a in layer.lora_A
            else torch.zeros_like(layer.base_layer.weight, dtype=torch.float64)
            for a in ("a", "b", "c")
        ]
        expected, t, _ = _model_stock_reference(inputs, weights)
        merged = layer.lora_B["stock"].weight.detach().double() @ layer.lora_A["stock"].weight.detach().double()
        merged = merged * layer.scaling["stock"]
        torch.testing.assert_close(merged, expected, rtol=1e-5, atol=1e-6)
        assert stats[name]["t"] == pytest.approx(t, rel=1e-9)
        checked += 1
    assert checked == 4  # q_proj and v_proj of 2 layers


# --- filtering -------------------------------------------------------------------------------------------------------


def test_load_plugins_env_filters_third_party_plugins(sandbox):
    sandbox.add_distribution(
        "peft-merge-ext-filtered",
        """
        import peft_merge_ext

        @peft_merge_ext.hookimpl
        def register_combination_types(register):
            register("filtered_sum", lambda deltas, weights, context: deltas[0], description="first delta")
        """,
    )
    sandbox.reload()
    assert {"model_stock", "filtered_sum"} <= set(peft_merge_ext.get_combination_types())

    sandbox.monkeypatch.setenv(LOAD_PLUGINS_ENV, "example")
    sandbox.reload()
    types = set(peft_merge_ext.get_combination_types())
    assert "model_stock" in types and "filtered_sum" not in types and types >= BUILTIN_TYPES

    sandbox.monkeypatch.setenv(LOAD_PLUGINS_ENV, " peft_merge_ext_filtered , ")
    sandbox.reload()
    types = set(peft_merge_ext.get_combination_types())
    assert "filtered_sum" in types and "model_stock" not in types and types >= BUILTIN_TYPES

    sandbox.monkeypatch.setenv(LOAD_PLUGINS_ENV, "")
    sandbox.reload()
    assert set(peft_merge_ext.get_combination_types()) == BUILTIN_TYPES
    assert [plugin.name for plugin in peft_merge_ext.get_plugins()] == ["builtin"]

    sandbox.monkeypatch.setenv(LOAD_PLUGINS_ENV, "example,exmaple")
    with pytest.warns(RuntimeWarning, match=r"not installed: exmaple\. Installed: .*example"):
        sandbox.reload()
    assert "model_stock" in peft_merge_ext.get_combination_types()


# --- names -----------------------------------------------------------------------------------------------------------


def _first(deltas, weights, context):
    return deltas[0]


@pytest.mark.parametrize(
    "name",
    [
        "svd",
        "linear",
        "cat",
        "ties",
        "ties_svd",
        "dare_ties",
        "dare_linear",
        "dare_anything",
        "magnitude_prune",
        "magnitude_prune_svd",
        "dare_linear_svd",
        "slerp_svd",
    ],
)
def test_reserved_names_are_refused(name):
    register = Register("mine", "peft-merge-ext-mine", "1.0")
    with pytest.raises(ReservedCombinationTypeError, match=name):
        register(name, _first)
    assert register.registered == []


@pytest.mark.parametrize("name", ["Slerp", "my-type", "1st", "", "with space", "_private", None, 3])
def test_bad_names_are_refused(name):
    register = Register("mine", None, None)
    with pytest.raises(PluginError, match="snake_case"):
        register(name, _first)


def test_bad_functions_and_validators_are_refused():
    register = Register("mine", None, None)
    with pytest.raises(PluginError, match="not callable"):
        register("mine", "not a function")
    with pytest.raises(PluginError, match="validate"):
        register("mine", _first, validate=42)
    with pytest.raises(PluginError, match=r"svd_clamp.*argument of PEFT"):
        register("mine", _first, options={"svd_clamp": 0.5})
    register("shared", _first, options={"density": 0.5, "majority_sign_method": "total"})  # PEFT's meaning: allowed
    with pytest.raises(PluginError, match="identifier"):
        register("mine", _first, options={"not valid": 1})
    register("mine", _first, description="  two\n  lines  ", options={"alpha": 0.5})
    assert register.registered[1].description == "two lines"
    with pytest.raises(PluginError, match="twice by the same plugin") as raised:
        register("mine", _first)
    assert not isinstance(raised.value, DuplicateCombinationTypeError)  # a broken plugin, not a conflict


def test_duplicate_name_warns_naming_both_providers(sandbox):
    sandbox.add_distribution(
        "peft-merge-ext-copycat",
        """
        import peft_merge_ext

        @peft_merge_ext.hookimpl
        def register_combination_types(register):
            register("model_stock", lambda deltas, weights, context: deltas[0], description="copy")
        """,
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sandbox.reload()
    messages = _plugin_warnings(caught)
    assert len(messages) == 1, messages
    message = messages[0]
    assert "'model_stock'" in message
    assert (
        "example (peft-merge-ext-example" in message
        and "peft_merge_ext_copycat (peft-merge-ext-copycat 1.0)" in message
    )
    # Third-party plugins load sorted by distribution: peft-merge-ext-copycat before peft-merge-ext-example.
    assert peft_merge_ext.get_combination_types()["model_stock"].plugin == "peft_merge_ext_copycat"

    # PEFT's own combination types do not need the plugins and keep working.
    model = add_lora(tiny_llama(), "a", seed=1, r=2, target_modules=["q_proj"])
    add_lora(model, "b", seed=2, r=2, target_modules=["q_proj"])
    model.add_weighted_adapter(["a", "b"], [0.5, 0.5], "lin", combination_type="linear")
    assert "lin" in model.peft_config


def test_duplicate_of_a_builtin_type_is_refused(sandbox):
    sandbox.add_distribution(
        "peft-merge-ext-myslerp",
        """
        import peft_merge_ext

        @peft_merge_ext.hookimpl
        def register_combination_types(register):
            register("slerp", lambda deltas, weights, context: deltas[0])
        """,
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sandbox.reload()
    messages = _plugin_warnings(caught)
    assert len(messages) == 1, messages
    message = messages[0]
    assert peft_merge_ext.get_combination_types()["slerp"].plugin == "builtin"
    assert f"builtin (peft-merge-ext {peft_merge_ext.__version__})" in message
    assert "peft_merge_ext_myslerp (peft-merge-ext-myslerp 1.0)" in message


def test_entry_point_named_like_the_builtin_plugin_cannot_replace_it(sandbox):
    sandbox.add_distribution(
        "peft-merge-ext-impostor",
        """
        import peft_merge_ext

        @peft_merge_ext.hookimpl
        def register_combination_types(register):
            register("impostor", lambda deltas, weights, context: deltas[0])
        """,
        entry_point="builtin",
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sandbox.reload()
    messages = _plugin_warnings(caught)
    assert len(messages) == 1 and "peft-merge-ext-impostor" in messages[0] and "already taken" in messages[0]
    types = peft_merge_ext.get_combination_types()
    assert "impostor" not in types and types["slerp"].distribution == "peft-merge-ext"


# --- broken plugins --------------------------------------------------------------------------------------------------

BROKEN_PLUGINS = {
    "import_error": """
        import peft_merge_ext_no_such_backend  # noqa: F401
        """,
    "raising_hook": """
        import peft_merge_ext

        @peft_merge_ext.hookimpl
        def register_combination_types(register):
            raise RuntimeError("cannot find my CUDA kernels")
        """,
    "unknown_hook": """
        import peft_merge_ext

        @peft_merge_ext.hookimpl
        def register_combination_typo(register):
            register("typo", lambda deltas, weights, context: deltas[0])
        """,
    "misspelled_card_hook": """
        import peft_merge_ext

        @peft_merge_ext.hookimpl
        def extend_modelcard(card, merge_info):
            pass
        """,
    "same_name_twice": """
        import peft_merge_ext

        @peft_merge_ext.hookimpl
        def register_combination_types(register):
            register("twice", lambda deltas, weights, context: deltas[0])
            register("twice", lambda deltas, weights, context: deltas[1])
        """,
    "reserved_name": """
        import peft_merge_ext

        @peft_merge_ext.hookimpl
        def register_combination_types(register):
            register("dare_fancy", lambda deltas, weights, context: deltas[0])
        """,
    "extra_hook_argument": """
        import peft_merge_ext

        @peft_merge_ext.hookimpl
        def register_combination_types(register, model):
            register("needs_model", lambda deltas, weights, context: deltas[0])
        """,
}


@pytest.mark.parametrize("kind", sorted(BROKEN_PLUGINS))
def test_broken_plugin_gives_one_warning_and_everything_else_works(sandbox, kind):
    module = sandbox.add_distribution(f"peft-merge-ext-broken-{kind.replace('_', '-')}", BROKEN_PLUGINS[kind])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sandbox.reload()
        types = peft_merge_ext.get_combination_types()
        peft_merge_ext.get_plugins()
    messages = _plugin_warnings(caught)
    assert len(messages) == 1, messages
    assert f"plugin {module!r} from peft-merge-ext-broken-{kind.replace('_', '-')}" in messages[0]
    assert {"model_stock", *BUILTIN_TYPES} <= set(types)
    assert not {"typo", "dare_fancy", "needs_model", "twice"} & set(types)
    assert module not in {plugin.name for plugin in peft_merge_ext.get_plugins()}

    model = add_lora(tiny_llama(), "a", seed=1, r=2, target_modules=["q_proj"])
    add_lora(model, "b", seed=2, r=2, target_modules=["q_proj"])
    model.add_weighted_adapter(["a", "b"], [1.0, 1.0], "stock", combination_type="model_stock")
    assert "stock" in model.peft_config


def test_plugins_load_once_and_report_every_hook_they_implement(sandbox):
    sandbox.add_distribution(
        "peft-merge-ext-counter",
        """
        import peft_merge_ext

        CALLS = []

        @peft_merge_ext.hookimpl
        def register_combination_types(register):
            CALLS.append("register")
            register("counted", lambda deltas, weights, context: deltas[0])

        @peft_merge_ext.hookimpl
        def extend_model_card(card):
            pass
        """,
    )
    sandbox.reload()
    counter = sys.modules["peft_merge_ext_counter"]
    for _ in range(3):
        assert "counted" in peft_merge_ext.get_combination_types()
        peft_merge_ext.get_plugins()
    load_plugins()
    assert counter.CALLS == ["register"]
    info = next(plugin for plugin in peft_merge_ext.get_plugins() if plugin.name == "peft_merge_ext_counter")
    assert info.hooks == ("extend_model_card", "register_combination_types")
    assert (info.distribution, info.version, info.types) == ("peft-merge-ext-counter", "1.0", ("counted",))


def test_import_peft_neither_loads_plugins_nor_breaks_with_broken_ones(tmp_path):
    """In a fresh interpreter with every kind of broken plugin installed: `import peft_merge_ext` and `import peft`
    load no plugin; the first use loads them all once, with exactly one warning per broken plugin."""
    broken = [
        write_distribution(tmp_path, f"peft-merge-ext-sub-{kind.replace('_', '-')}", BROKEN_PLUGINS[kind])
        for kind in sorted(BROKEN_PLUGINS)
    ]
    script = f"""
        import json, sys, warnings
        sys.path.insert(0, {str(tmp_path)!r})
        warnings.simplefilter("always")
        OURS = ("peft_merge_ext_", "peft_merge_ext.plugins.builtin")
        with warnings.catch_warnings(record=True) as caught:
            import peft_merge_ext
            import peft
            from peft.tuners.lora.model import LoraModel
            from peft_merge_ext.peft_bridge.patch import is_installed
            before = sorted(m for m in sys.modules if m.startswith(OURS))
            installed = is_installed()
            # Third-party libraries may warn on import (bitsandbytes does); none of the warnings may be ours.
            at_import = sum("peft-merge-ext" in str(w.message) or "peft_merge_ext" in str(w.message) for w in caught)
            types = sorted(peft_merge_ext.get_combination_types())
            peft_merge_ext.get_combination_types()
            after = sorted(m for m in sys.modules if m.startswith(OURS))
        messages = [str(w.message) for w in caught if {PLUGIN_WARNING!r} in str(w.message)]
        print(json.dumps(dict(before=before, installed=installed, at_import=at_import, types=types, after=after,
                              messages=messages)))
    """
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr
    outcome = json.loads(result.stdout.strip().splitlines()[-1])
    assert outcome["before"] == [] and outcome["at_import"] == 0 and outcome["installed"]
    assert {"model_stock", *BUILTIN_TYPES} <= set(outcome["types"])
    assert {"peft_merge_ext_example", "peft_merge_ext.plugins.builtin_types"} <= set(outcome["after"])
    assert len(outcome["messages"]) == len(broken)
    for module in broken:
        assert sum(repr(module) in message for message in outcome["messages"]) == 1, outcome["messages"]
