"""Meta-tests keeping the docs honest: every hook in `hookspecs.py` is documented in README.md and has a test."""

from __future__ import annotations

import ast
from pathlib import Path

import pluggy
import pytest

from peft_merge_ext.plugins import hookspecs

REPO_ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent


def _hook_signatures() -> dict[str, str]:
    """`{hook name: "name(arg, ...)"}`, built from the hook callers' specs."""
    manager = pluggy.PluginManager(hookspecs.PROJECT_NAME)
    manager.add_hookspecs(hookspecs)
    callers = {name: caller for name, caller in vars(manager.hook).items() if isinstance(caller, pluggy.HookCaller)}
    return {name: f"{name}({', '.join(caller.spec.argnames)})" for name, caller in callers.items() if caller.spec}


HOOKS = _hook_signatures()


def _test_function_names() -> set[str]:
    names = set()
    for path in TESTS.glob("test_*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name.startswith("test_"):
                names.add(node.name)
    return names


def test_hookspecs_are_found():
    assert set(HOOKS) >= {"register_combination_types", "extend_model_card"}


@pytest.mark.parametrize("hook", sorted(HOOKS))
def test_every_hook_is_documented_in_the_readme(hook):
    readme = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    assert HOOKS[hook] in readme, f"README.md does not document the hook: add its signature `{HOOKS[hook]}`."


@pytest.mark.parametrize("hook", sorted(HOOKS))
def test_every_hook_has_a_test(hook):
    tests = _test_function_names()
    assert any(name.startswith(f"test_hook_{hook}") for name in tests), (
        f"No test for the hook {hook!r}: add a test function named `test_hook_{hook}...` in tests/test_*.py."
    )
