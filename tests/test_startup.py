"""Drop-in activation: the `.pth` start-up file, its cost, and unmodified PEFT scripts getting the plugin types.

Everything runs in fresh interpreters (subprocesses of this venv's python), as a user's script would.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import sysconfig
import textwrap
import zipfile
from pathlib import Path

import pytest

import peft_merge_ext

PTH_NAME = "peft_merge_ext_autoload.pth"
START_NAME = "peft_merge_ext_autoload.start"
REPO_ROOT = Path(__file__).resolve().parents[1]
STARTUP_BUDGET_MS = 50.0  # generous against noisy CI machines; measured about 2-3 ms (see README)

# An unmodified PEFT script: it never imports peft_merge_ext, yet asks for a built-in type and a plugin type.
PEFT_SCRIPT = """
import json
import torch
from torch import nn
from peft import LoraConfig, get_peft_model


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(8, 16)
        self.down = nn.Linear(16, 8)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


torch.manual_seed(0)
model = get_peft_model(Tiny(), LoraConfig(target_modules=["up", "down"], r=2, init_lora_weights=False), "a")
model.add_adapter("b", LoraConfig(target_modules=["up", "down"], r=3, init_lora_weights=False))
model.add_weighted_adapter(["a", "b"], [0.7, 0.3], "ab", combination_type="slerp", t=0.3)
model.add_weighted_adapter(["a", "b"], [1.0, 1.0], "stock", combination_type="model_stock")
print(json.dumps(sorted(model.peft_config)))
"""
MERGED_ADAPTERS = ["a", "ab", "b", "stock"]


def _run(code: str, *, env: dict[str, str] | None = None, flags: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("PEFT_MERGE_EXT_")}
    environment.update(env or {})
    return subprocess.run(
        [sys.executable, *flags, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        env=environment,
        timeout=180,
        check=False,
    )


def _last_json(result: subprocess.CompletedProcess) -> object:
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def _no_site_environment() -> dict[str, str]:
    """For `python -S`: the venv's packages on PYTHONPATH, so that no `.pth` file runs at start-up."""
    example = Path(importlib.import_module("peft_merge_ext_example").__file__).resolve().parents[1]
    paths = [str(REPO_ROOT), str(example), sysconfig.get_paths()["purelib"]]
    return {"PYTHONPATH": os.pathsep.join(paths)}


def test_pth_file_is_installed_and_start_up_imports_nothing_heavy():
    pth = Path(sysconfig.get_paths()["purelib"]) / PTH_NAME
    assert pth.is_file(), f"{pth} is missing: reinstall with `pip install -e .`"
    assert pth.read_text().strip() == "import peft_merge_ext"
    result = _run(
        """
        import json, sys
        assert 'torch' not in sys.modules
        heavy = {'torch', 'peft', 'transformers', 'pluggy', 'safetensors', 'huggingface_hub'}
        heavy = sorted(heavy & set(sys.modules))
        watchers = [type(f).__name__ for f in sys.meta_path if type(f).__name__ == 'PeftImportWatcher']
        ours = sorted(m for m in sys.modules if m.startswith('peft_merge_ext'))
        print(json.dumps({'heavy': heavy, 'watchers': watchers, 'ours': ours}))
        """
    )
    outcome = _last_json(result)
    assert outcome == {
        "heavy": [],
        "watchers": ["PeftImportWatcher"],
        "ours": ["peft_merge_ext", "peft_merge_ext._activation", "peft_merge_ext._version"],
    }


def _startup_cost_ms() -> float:
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", "pass"], capture_output=True, text=True, timeout=60, check=True
    )
    for line in result.stderr.splitlines():
        fields = line.removeprefix("import time:").split("|")
        if len(fields) == 3 and fields[2].strip() == "peft_merge_ext":
            return int(fields[1]) / 1000.0
    raise AssertionError(f"peft_merge_ext is not imported at start-up:\n{result.stderr[-2000:]}")


def test_start_up_overhead_is_small():
    cost = min(_startup_cost_ms() for _ in range(3))
    print(f"peft_merge_ext start-up cost (python -X importtime, cumulative, best of 3): {cost:.2f} ms")
    assert 0 < cost < STARTUP_BUDGET_MS


def test_unmodified_peft_script_gets_plugin_types():
    assert "peft_merge_ext" not in PEFT_SCRIPT
    assert _last_json(_run(PEFT_SCRIPT)) == MERGED_ADAPTERS


@pytest.mark.parametrize("peft_first", [True, False], ids=["peft-imported-first", "peft-imported-after"])
def test_explicit_import_works_whether_peft_was_imported_before_or_after(peft_first):
    """Without the `.pth` (python -S), `import peft_merge_ext` activates the patch in either import order."""
    imports = "import peft\nimport peft_merge_ext" if peft_first else "import peft_merge_ext\nimport peft"
    check = "import sys\nassert 'peft_merge_ext' not in sys.modules and 'peft' not in sys.modules\n"
    result = _run(check + imports + "\n" + PEFT_SCRIPT, env=_no_site_environment(), flags=("-S",))
    assert _last_json(result) == MERGED_ADAPTERS


def test_disable_env_turns_automatic_activation_off_but_install_still_works():
    setup, _ = PEFT_SCRIPT.split('model.add_weighted_adapter(["a", "b"], [0.7, 0.3]', 1)
    script = (
        setup
        + """
from peft.tuners.lora.model import LoraModel
original = LoraModel.__dict__["add_weighted_adapter"]
try:
    model.add_weighted_adapter(["a", "b"], [0.7, 0.3], "ab", combination_type="slerp")
    peft_error = None
except ValueError as error:
    peft_error = f"{type(error).__module__}.{type(error).__name__}: {error}"
import peft_merge_ext
installed_by_import = peft_merge_ext.is_installed()
peft_merge_ext.install()
wrapper = LoraModel.__dict__["add_weighted_adapter"]
peft_merge_ext.install()
same_wrapper = LoraModel.__dict__["add_weighted_adapter"] is wrapper
model.add_weighted_adapter(["a", "b"], [0.7, 0.3], "ab", combination_type="slerp")
peft_merge_ext.uninstall()
peft_merge_ext.uninstall()
restored = LoraModel.__dict__["add_weighted_adapter"] is original
print(json.dumps([peft_error, installed_by_import, same_wrapper, restored, sorted(model.peft_config)]))
"""
    )
    peft_error, installed_by_import, same_wrapper, restored, adapters = _last_json(
        _run(script, env={"PEFT_MERGE_EXT_DISABLE": "1"})
    )
    assert peft_error.startswith("builtins.ValueError: ") and "slerp" in peft_error  # PEFT's own error
    assert not installed_by_import
    assert same_wrapper and restored
    assert adapters == ["a", "ab", "b"]


def test_start_file_names_the_activation_function():
    entry = (REPO_ROOT / "peft_merge_ext" / "_startup" / START_NAME).read_text().strip()
    module_name, _, function_name = entry.partition(":")
    assert callable(getattr(importlib.import_module(module_name), function_name))


def test_wheel_ships_the_start_up_files_and_works_when_installed(tmp_path):
    """Build the wheel, check the `.pth` and `.start` files sit at its root, install it (non-editable) into a fresh
    venv that borrows this venv's other packages, and run the unmodified PEFT script there."""
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(REPO_ROOT), "--no-deps", "-q", "-w", str(tmp_path / "dist")],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert build.returncode == 0, build.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("peft_merge_ext-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        assert {PTH_NAME, START_NAME} <= names
        assert archive.read(PTH_NAME).decode().strip() == "import peft_merge_ext"
        assert archive.read(START_NAME).decode().strip() == "peft_merge_ext._activation:activate"
    assert "peft_merge_ext/__init__.py" in names and "peft_merge_ext/plugins/builtin_types.py" in names

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    site_packages = Path(
        subprocess.run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    )
    install = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "-q", str(wheel)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert install.returncode == 0, install.stderr[-3000:]
    assert (site_packages / PTH_NAME).is_file()
    # Borrow torch, peft and the example plugin from this venv, after the fresh venv's own packages.
    borrowed = f"import site; site.addsitedir({sysconfig.get_paths()['purelib']!r})\n"
    (site_packages / "zz_borrow_test_venv.pth").write_text(borrowed)
    script = PEFT_SCRIPT.replace(
        "print(json.dumps(sorted(model.peft_config)))",
        "import sys\nprint(json.dumps([sorted(model.peft_config), sys.modules['peft_merge_ext'].__file__]))",
    )
    result = subprocess.run([str(python), "-c", script], capture_output=True, text=True, timeout=180, check=False)
    adapters, location = _last_json(result)
    assert adapters == MERGED_ADAPTERS
    assert Path(location).is_relative_to(site_packages)  # the wheel's copy, not the editable source tree
    assert peft_merge_ext.__file__ != location
