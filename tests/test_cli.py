"""The `peft-merge-ext` command line: plugins, demo, merge (and --dry-run), run, upload, search; one-line errors with
exit code 2 for bad input; no torch import for --help."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import add_lora, tiny_llama
from safetensors.torch import load_file

from peft_merge_ext.cli import build_parser, main

SCRIPT = shutil.which("peft-merge-ext") or str(Path(sys.executable).parent / "peft-merge-ext")


@pytest.fixture
def files(tmp_path):
    """A tiny base and two adapters (ranks 4 and 2, the second with rslora) saved as ordinary folders."""
    base = tiny_llama()
    base.save_pretrained(tmp_path / "base")
    model = add_lora(base, "a", seed=1, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    add_lora(model, "b", seed=2, r=2, lora_alpha=2, use_rslora=True, target_modules=["q_proj", "down_proj"])
    model.save_pretrained(tmp_path / "adapters")
    return tmp_path / "base", tmp_path / "adapters" / "a", tmp_path / "adapters" / "b"


def test_help_does_not_import_torch():
    code = (
        "import sys\nfrom peft_merge_ext.cli import main\n"
        "for argv in (['--help'], ['merge', '--help'], ['search', '--help']):\n"
        "    try:\n        main(argv)\n    except SystemExit as e:\n        assert e.code == 0\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
    )
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert completed.returncode == 0, completed.stderr
    assert "--eval-file" in completed.stdout and "--dry-run" in completed.stdout


def test_console_script_reports_bad_input_in_one_line_with_exit_code_2(tmp_path):
    completed = subprocess.run(
        [SCRIPT, "merge", "--base", str(tmp_path / "nowhere"), "--adapter", "x", "--out", str(tmp_path / "o")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert completed.returncode == 2
    assert "Traceback" not in completed.stderr
    assert completed.stderr.count("\n") == 1 and "'x'" in completed.stderr


def test_plugins_text_and_json(capsys):
    assert main(["plugins"]) == 0
    text = capsys.readouterr().out
    assert "builtin (peft-merge-ext" in text and "slerp:" in text and "register_combination_types" in text
    assert main(["plugins", "--json"]) == 0
    plugins = {p["name"]: p for p in json.loads(capsys.readouterr().out)}
    builtin = plugins["builtin"]
    assert builtin["distribution"] == "peft-merge-ext"
    assert {t["name"] for t in builtin["types"]} >= {"weighted", "average", "slerp", "karcher"}
    assert next(t for t in builtin["types"] if t["name"] == "slerp")["options"] == {"t": None}


def test_merge_writes_the_model_and_prints_the_report(files, tmp_path, capsys):
    base, a, b = files
    argv = ["merge", "--base", str(base), "--adapter", str(a), "--adapter", str(b), "--weights", "0.6", "0.4"]
    argv += ["--method", "slerp", "--t", "0.2", "0.8", "--dtype", "bf16", "--out", str(tmp_path / "out"), "--quiet"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "Merged model written to" in out and "Method slerp: 6 modules" in out
    weights = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert weights["model.layers.0.self_attn.q_proj.weight"].dtype == torch.bfloat16
    assert "t: [0.2, 0.8]" in (tmp_path / "out" / "README.md").read_text()


def test_option_flag_reaches_the_method(files, tmp_path, capsys):
    base, a, b = files
    argv = ["merge", "--base", str(base), "--adapter", str(a), "--adapter", str(b), "--method", "karcher"]
    argv += ["--option", "max_iter=3", "--option", "tol=1e-4", "--out", str(tmp_path / "out"), "--quiet"]
    assert main(argv) == 0
    card = (tmp_path / "out" / "README.md").read_text()
    assert "max_iter" in card and "`3`" in card


def test_dry_run_prints_the_plan_and_writes_nothing(files, tmp_path, capsys):
    base, a, b = files
    argv = ["merge", "--base", str(base), "--adapter", str(a), "--adapter", str(b), "--method", "average"]
    argv += ["--svd-rank", "3", "--dtype", "bf16", "--out", str(tmp_path / "out"), "--dry-run"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "Tensors touched: 6 of 21" in out
    assert "rank 4" in out and "rank 2" in out and "Rank bound (svd_rank): 3" in out
    assert "Estimated peak memory" in out and "dtype bfloat16" in out and "Validation: OK" in out
    assert not (tmp_path / "out").exists()


def test_dry_run_lists_validation_problems_with_exit_code_2(files, tmp_path, capsys):
    base, a, _ = files
    wide = add_lora(tiny_llama(hidden_size=64), "w", seed=3, r=2, target_modules=["q_proj"])
    wide.save_pretrained(tmp_path / "wide")
    argv = ["merge", "--base", str(base), "--adapter", str(a), "--adapter", str(tmp_path / "wide" / "w")]
    argv += ["--method", "weighted", "--out", str(tmp_path / "out"), "--dry-run"]
    assert main(argv) == 2
    out = capsys.readouterr().out
    assert out.count("Problem:") == 2 and "Validation: 2 problem(s)" in out
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--method", "nope"], "Unknown combination_type 'nope'"),
        (["--method", "weighted", "--weights", "1"], "1 weight(s) for 2 adapter(s)"),
        (["--method", "slerp", "--option", "t"], "KEY=VALUE"),
        (["--method", "slerp", "--option", "colour=3"], "Unknown option"),
        (["--method", "weighted", "--dtype", "int2"], "Unknown dtype"),
    ],
)
def test_bad_input_exit_code_2_one_line(files, tmp_path, capsys, extra, message):
    base, a, b = files
    argv = ["merge", "--base", str(base), "--adapter", str(a), "--adapter", str(b), "--out", str(tmp_path / "out")]
    assert main([*argv, *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("peft-merge-ext: error:") and message in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_usage_errors_exit_2():
    with pytest.raises(SystemExit) as raised:
        main(["merge", "--base", "x"])
    assert raised.value.code == 2
    with pytest.raises(SystemExit) as raised:
        main(["no-such-command"])
    assert raised.value.code == 2


def test_merge_with_push_and_upload(files, tmp_path, hub_server, capsys, monkeypatch):
    base, a, _ = files
    monkeypatch.setenv("HF_TOKEN", hub_server.token)
    argv = ["merge", "--base", str(base), "--adapter", str(a), "--out", str(tmp_path / "out"), "--quiet"]
    assert main([*argv, "--push", "test-user/merged", "--private"]) == 0
    assert "Uploaded:" in capsys.readouterr().out
    repo = hub_server.repo("test-user/merged")
    assert repo.private is True
    assert repo.files()["model.safetensors"] == (tmp_path / "out" / "model.safetensors").read_bytes()
    assert main(["upload", str(tmp_path / "out"), "test-user/again", "--message", "retry"]) == 0
    assert hub_server.repo("test-user/again").head().message == "retry"


def test_failed_push_keeps_the_folder_and_says_how_to_retry(files, tmp_path, hub_server, capsys, monkeypatch):
    base, a, _ = files
    monkeypatch.setenv("HF_TOKEN", hub_server.token)
    hub_server.fail("commit", 500)
    argv = ["merge", "--base", str(base), "--adapter", str(a), "--out", str(tmp_path / "out"), "--quiet"]
    assert main([*argv, "--push", "test-user/merged"]) == 1
    err = capsys.readouterr().err
    assert "upload failed" in err and "peft-merge-ext upload" in err and err.count("\n") == 1
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_search_arguments_reach_weight_search():
    args = build_parser().parse_args(
        ["search", "--base", "b", "--adapter", "x", "--adapter", "y", "--eval-file", "e.jsonl", "--budget", "5"]
    )
    assert (args.base, args.adapter, args.eval_file, args.budget, args.method, args.seed) == (
        "b",
        ["x", "y"],
        "e.jsonl",
        5,
        None,
        None,
    )


def test_search_bad_eval_file_is_a_one_line_error(files, tmp_path, capsys):
    base, a, b = files
    argv = ["search", "--base", str(base), "--adapter", str(a), "--adapter", str(b)]
    assert main([*argv, "--eval-file", str(tmp_path / "missing.jsonl")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("peft-merge-ext: error:") and err.count("\n") == 1


def test_demo_runs_locally_and_reports_a_bit_identical_streamed_merge(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path / "demo")]) == 0
    out = capsys.readouterr().out
    assert "slerp" in out and "bit-identical" in out
    assert (tmp_path / "demo" / "merged" / "model.safetensors").is_file()
    assert (tmp_path / "demo" / "combined-adapter" / "ab" / "adapter_config.json").is_file()
