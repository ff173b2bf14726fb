"""Plugin isolation: no third-party plugin can break the host or the other plugins.

A plugin that ends the interpreter (`sys.exit`) or raises any other `BaseException` but `KeyboardInterrupt`, on import
or in a hook, is skipped with one warning; a combination type name registered twice keeps its built-in (or earliest
third-party) provider and only the clashing registration is skipped. Every plugin here is a real distribution
installed into the `sandbox` of `test_plugins.py`.
"""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
import warnings
from collections.abc import Callable
from typing import Any

import pytest
import test_plugins
import torch
from test_plugins import BUILTIN_TYPES, PLUGIN_WARNING, write_distribution

import peft_merge_ext
from peft_merge_ext.plugins import builtin_types
from peft_merge_ext.plugins.contract import LowRankDelta, ModuleContext
from peft_merge_ext.plugins.registry import LOAD_PLUGINS_ENV, load_plugins, run_hook

sandbox = test_plugins.sandbox  # the fixture: throwaway distributions on `sys.path`, restored afterwards

BUILTIN_PROVIDER = f"builtin (peft-merge-ext {peft_merge_ext.__version__})"

FIRST_DELTA_PLUGIN = """
    import peft_merge_ext

    @peft_merge_ext.hookimpl
    def register_combination_types(register):
        register({name!r}, lambda deltas, weights, context: deltas[0], description="the first delta")
    """


def _reload_recording(reload: Callable[[], None]) -> list[str]:
    """Run `reload()` and list the plugin `RuntimeWarning`s it gave."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        reload()
        peft_merge_ext.get_combination_types()
        peft_merge_ext.get_plugins()
    return [
        str(w.message) for w in caught if issubclass(w.category, RuntimeWarning) and PLUGIN_WARNING in str(w.message)
    ]


def _plugin_names() -> set[str]:
    return {plugin.name for plugin in peft_merge_ext.get_plugins()}


def _random_delta(generator: torch.Generator, rank: int) -> LowRankDelta:
    return LowRankDelta(
        torch.randn(7, rank, generator=generator, dtype=torch.float64),
        torch.randn(rank, 5, generator=generator, dtype=torch.float64),
    )


def _assert_builtins_work() -> None:
    """The built-in types are registered by the built-in plugin and combine real deltas exactly.

    The registered functions are called as the merge engine calls them, so this checks the registry alone.
    """
    types = peft_merge_ext.get_combination_types()
    assert set(types) >= BUILTIN_TYPES | {"model_stock"}
    assert all(types[name].provider == BUILTIN_PROVIDER for name in BUILTIN_TYPES)
    generator = torch.Generator().manual_seed(0)
    deltas = [_random_delta(generator, 2), _random_delta(generator, 3)]
    merged = types["weighted"].function(deltas, [0.5, -2.0], ModuleContext("q_proj"))
    expected = 0.5 * (deltas[0].B @ deltas[0].A) - 2.0 * (deltas[1].B @ deltas[1].A)
    torch.testing.assert_close(merged.B @ merged.A, expected, rtol=1e-10, atol=1e-10)


# --- a plugin that raises a BaseException on import ------------------------------------------------------------------

IMPORT_ESCAPES = {
    "sys_exit_3": ("import sys\nsys.exit(3)\n", "SystemExit: 3"),
    "sys_exit_bare": ("import sys\nsys.exit()\n", "SystemExit"),
    "generator_exit": ("raise GeneratorExit('closed')\n", "GeneratorExit: closed"),
    "base_exception_subclass": (
        "class Abort(BaseException):\n    pass\n\nraise Abort('stop everything')\n",
        "Abort: stop everything",
    ),
    "unprintable": (
        "class Weird(Exception):\n    def __str__(self):\n        raise SystemExit(5)\n\nraise Weird()\n",
        "Weird: <unprintable message>",
    ),
}


@pytest.mark.parametrize("kind", sorted(IMPORT_ESCAPES))
def test_plugin_raising_a_base_exception_on_import_is_skipped(sandbox, kind):
    source, described = IMPORT_ESCAPES[kind]
    distribution = f"peft-merge-ext-escape-{kind.replace('_', '-')}"
    module = sandbox.add_distribution(distribution, source)
    neighbour = sandbox.add_distribution("peft-merge-ext-neighbour", FIRST_DELTA_PLUGIN.format(name="neighbour"))

    messages = _reload_recording(sandbox.reload)

    assert len(messages) == 1, messages
    assert f"plugin {module!r} from {distribution} failed to load" in messages[0]
    assert described in messages[0]
    assert module not in _plugin_names() and neighbour in _plugin_names()
    assert peft_merge_ext.get_combination_types()["neighbour"].plugin == neighbour
    _assert_builtins_work()


def test_sys_exit_on_import_does_not_end_a_fresh_interpreter(tmp_path):
    """The first use of the plugins in a fresh interpreter survives a plugin calling `sys.exit(3)` on import."""
    module = write_distribution(tmp_path, "peft-merge-ext-exits", "import sys\nsys.exit(3)\n")
    env = {key: value for key, value in os.environ.items() if key != LOAD_PLUGINS_ENV}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(tmp_path), env.get("PYTHONPATH")]))
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            "import peft_merge_ext, peft; import peft_merge_ext as p; print(sorted(p.get_combination_types()))",
        ],
        capture_output=True,
        text=True,
        timeout=180,
        env=env,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    types = ast.literal_eval(result.stdout.strip().splitlines()[-1])
    assert set(types) >= BUILTIN_TYPES | {"model_stock"}
    assert result.stderr.count(f"plugin {module!r} from peft-merge-ext-exits failed to load") == 1, result.stderr
    assert "SystemExit: 3" in result.stderr


def test_keyboard_interrupt_on_import_still_interrupts(sandbox):
    module = sandbox.add_distribution("peft-merge-ext-interrupt", "raise KeyboardInterrupt\n")
    with pytest.raises(KeyboardInterrupt):
        sandbox.reload()
    # Nothing stale is left behind: once the plugin is gone, the next use loads everything again.
    (sandbox.root / f"{module}.py").unlink()
    shutil.rmtree(sandbox.root / f"{module}-1.0.dist-info")
    sandbox.modules.remove(module)
    sys.modules.pop(module, None)
    assert _reload_recording(sandbox.reload) == []
    _assert_builtins_work()


# --- a plugin that raises a BaseException in a hook ------------------------------------------------------------------

HOOK_ESCAPES = {
    "system_exit": "sys.exit(3)",
    "generator_exit": "raise GeneratorExit",
}


@pytest.mark.parametrize("kind", sorted(HOOK_ESCAPES))
def test_plugin_raising_a_base_exception_in_its_register_hook_is_skipped(sandbox, kind):
    distribution = f"peft-merge-ext-hook-{kind.replace('_', '-')}"
    module = sandbox.add_distribution(
        distribution,
        f"""
        import sys

        import peft_merge_ext

        @peft_merge_ext.hookimpl
        def register_combination_types(register):
            register("half_registered", lambda deltas, weights, context: deltas[0])
            {HOOK_ESCAPES[kind]}
        """,
    )

    messages = _reload_recording(sandbox.reload)

    assert len(messages) == 1, messages
    assert f"plugin {module!r} from {distribution} failed to register its combination types" in messages[0]
    assert ("SystemExit: 3" if kind == "system_exit" else "GeneratorExit") in messages[0]
    assert "half_registered" not in peft_merge_ext.get_combination_types()
    assert module not in _plugin_names()
    _assert_builtins_work()


def test_run_hook_contains_system_exit(sandbox):
    from huggingface_hub import ModelCard

    from peft_merge_ext.engine.merge_info import AdapterInfo, MergeInfo

    sandbox.add_distribution(
        "peft-merge-ext-card-exit",
        """
        import peft_merge_ext

        @peft_merge_ext.hookimpl
        def extend_model_card(card):
            raise SystemExit(4)
        """,
    )
    sandbox.add_distribution("peft-merge-ext-card-fine", test_plugins.CARD_PLUGIN)
    sandbox.reload()
    card = ModelCard("---\nlicense: mit\n---\n# Title\n")
    adapters = [AdapterInfo(name, None, 0.5, 4, 8.0, ["q_proj"]) for name in ("a", "b")]
    merge_info = MergeInfo(base_model=None, adapters=adapters, combination_type="weighted")

    messages = _reload_recording(lambda: run_hook("extend_model_card", card=card, merge_info=merge_info))

    assert len(messages) == 1, messages
    assert (
        "'peft_merge_ext_card_exit' from peft-merge-ext-card-exit failed to run its extend_model_card hook"
        in (messages[0])
    )
    assert "SystemExit: 4" in messages[0]
    assert "Merged with weighted." in card.text


# --- name clashes ----------------------------------------------------------------------------------------------------

SHADOW_PLUGIN = """
    import peft_merge_ext

    def shadow(deltas, weights, context):
        return deltas[0]

    @peft_merge_ext.hookimpl
    def register_combination_types(register):
        register("shadow_extra", shadow, description="kept")
        register("weighted", shadow, description="clashes with the built-in")
        register("shadow_more", shadow, description="kept too")
    """


def test_plugin_registering_a_builtin_name_leaves_the_builtin_and_keeps_its_other_types(sandbox):
    # "aaa-..." sorts before "peft-merge-ext": the built-in wins whatever the third-party order.
    module = sandbox.add_distribution("aaa-weighted-shadow", SHADOW_PLUGIN)

    messages = _reload_recording(sandbox.reload)

    assert len(messages) == 1, messages
    assert "'weighted'" in messages[0]
    assert BUILTIN_PROVIDER in messages[0] and f"{module} (aaa-weighted-shadow 1.0)" in messages[0]
    types = peft_merge_ext.get_combination_types()
    assert types["weighted"].function is builtin_types.weighted
    assert types["weighted"].provider == BUILTIN_PROVIDER
    shadow = sys.modules[module].shadow
    assert types["shadow_extra"].function is types["shadow_more"].function is shadow
    assert types["shadow_extra"].plugin == module
    plugins = {plugin.name: plugin for plugin in peft_merge_ext.get_plugins()}
    assert plugins[module].types == ("shadow_extra", "shadow_more")
    assert set(plugins["builtin"].types) == BUILTIN_TYPES
    _assert_builtins_work()


def _clash_plugin(own: str) -> str:
    return f"""
    import peft_merge_ext

    def combine(deltas, weights, context):
        return deltas[0]

    @peft_merge_ext.hookimpl
    def register_combination_types(register):
        register("clash_type", combine)
        register({own!r}, combine)
    """


def test_two_plugins_registering_one_name_the_first_in_load_order_wins(sandbox):
    # `-b` is installed first and sits earlier on `sys.path`; the load order is by distribution all the same.
    earlier_on_path = sandbox.root / "earlier"
    earlier_on_path.mkdir()
    module_b = write_distribution(earlier_on_path, "peft-merge-ext-clash-b", _clash_plugin("b_only"))
    sandbox.modules.append(module_b)
    sandbox.monkeypatch.syspath_prepend(str(earlier_on_path))
    module_a = sandbox.add_distribution("peft-merge-ext-clash-a", _clash_plugin("a_only"))

    for _ in range(2):  # the same outcome on every load
        messages = _reload_recording(sandbox.reload)

        assert len(messages) == 1, messages
        assert "'clash_type'" in messages[0]
        provider_a, provider_b = (f"{m} (peft-merge-ext-clash-{m[-1]} 1.0)" for m in (module_a, module_b))
        assert provider_a in messages[0] and provider_b in messages[0]
        assert messages[0].index(provider_b) < messages[0].index(provider_a)  # the skipped one is named first
        types = peft_merge_ext.get_combination_types()
        assert types["clash_type"].plugin == module_a
        assert types["clash_type"].function is sys.modules[module_a].combine
        assert (types["a_only"].plugin, types["b_only"].plugin) == (module_a, module_b)
        plugins = {plugin.name: plugin for plugin in peft_merge_ext.get_plugins()}
        assert plugins[module_a].types == ("clash_type", "a_only")
        assert plugins[module_b].types == ("b_only",)
        _assert_builtins_work()

    # Leaving the winner out hands the name to the other plugin, without any warning.
    sandbox.monkeypatch.setenv(LOAD_PLUGINS_ENV, module_b)
    assert _reload_recording(sandbox.reload) == []
    assert peft_merge_ext.get_combination_types()["clash_type"].plugin == module_b


def test_two_distributions_with_one_entry_point_name_the_first_distribution_wins(sandbox):
    earlier_on_path = sandbox.root / "earlier"
    earlier_on_path.mkdir()
    sandbox.modules.append(
        write_distribution(earlier_on_path, "zz-dup", FIRST_DELTA_PLUGIN.format(name="from_zz"), entry_point="dup")
    )
    sandbox.monkeypatch.syspath_prepend(str(earlier_on_path))
    sandbox.add_distribution("aa-dup", FIRST_DELTA_PLUGIN.format(name="from_aa"), entry_point="dup")

    messages = _reload_recording(sandbox.reload)

    assert len(messages) == 1, messages
    assert "plugin 'dup' from zz-dup failed to load" in messages[0] and "already taken by aa-dup" in messages[0]
    types = peft_merge_ext.get_combination_types()
    assert "from_aa" in types and "from_zz" not in types
    plugins: dict[str, Any] = {plugin.name: plugin for plugin in peft_merge_ext.get_plugins()}
    assert plugins["dup"].distribution == "aa-dup"


def test_clashes_are_decided_once_per_load(sandbox):
    """Lazy loading still happens once: the clash warning is not repeated on later uses."""
    sandbox.add_distribution("aaa-weighted-shadow", SHADOW_PLUGIN)
    assert len(_reload_recording(sandbox.reload)) == 1
    assert _reload_recording(load_plugins) == []
    assert _reload_recording(lambda: None) == []
