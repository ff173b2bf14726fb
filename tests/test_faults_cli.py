"""Faults at the command line: every failure is ONE line on stderr with exit code 2, naming the file or argument and
the fix, and nothing the user owns is touched (inputs, unrelated folders, the output of another run).

Runs the real `peft-merge-ext` console script in subprocesses where the process itself matters (working directory,
file size limits, signals, a concurrent run), `cli.main` in this process elsewhere.
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import shutil
import signal
import struct
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from conftest import add_lora, tiny_llama
from safetensors.torch import load_file

from peft_merge_ext.cli import main

SCRIPT = shutil.which("peft-merge-ext") or str(Path(sys.executable).parent / "peft-merge-ext")
HUGE = 2**63


@pytest.fixture
def work(tmp_path):
    """A user's working folder: `base/`, `adapters/fr` (r=4) and `adapters/de` (r=2), `notes/` (their own files)."""
    folder = tmp_path / "work"
    model = tiny_llama()
    model.save_pretrained(folder / "base")
    model = add_lora(model, "fr", seed=1, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    add_lora(model, "de", seed=2, r=2, lora_alpha=2, target_modules=["q_proj", "down_proj"])
    model.save_pretrained(folder / "adapters")
    (folder / "notes").mkdir()
    (folder / "notes" / "todo.txt").write_text("my notes\n")
    return folder


def _tree(folder: Path) -> dict[str, str]:
    """Every file under `folder` (hidden ones too) with its SHA-256."""
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def _cli(*args: str, cwd: Path, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([SCRIPT, *args], cwd=cwd, capture_output=True, text=True, timeout=300, **kwargs)


def _one_line(stderr: str, *needles: str) -> str:
    """Check that `stderr` is exactly one `peft-merge-ext: error:` line holding `needles`; return it."""
    assert "Traceback" not in stderr and stderr.count("\n") == 1, stderr
    assert stderr.startswith("peft-merge-ext: error: "), stderr
    for needle in needles:
        assert needle in stderr, (needle, stderr)
    return stderr


def _run_main(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _merge(capsys, work: Path, *extra: str, adapter: str = "adapters/fr", out: str | Path = "merged"):
    """`peft-merge-ext merge --base work/base --adapter work/<adapter> --out work/<out> <extra>`, in this process."""
    argv = ["merge", "--base", str(work / "base"), "--adapter", str(work / adapter), "--out", str(work / out)]
    return _run_main(capsys, *argv, *extra)


# 1. Inputs are never deleted


@pytest.mark.parametrize(
    ("out", "needle"),
    [
        (".", "is the current working directory"),
        ("base", "is the input 'base'"),
        ("adapters/fr", "is the input 'adapters/fr'"),
        ("adapters", "contains the input"),
    ],
)
def test_overwrite_never_deletes_an_input(work, out, needle):
    before = _tree(work)
    result = _cli("merge", "--base", "base", "--adapter", "adapters/fr", "--out", out, "--overwrite", cwd=work)
    assert result.returncode == 2
    _one_line(result.stderr, f"Output folder '{out}'", needle, "choose")
    assert _tree(work) == before


def test_recipe_output_onto_a_folder_of_the_user_is_refused(work, capsys):
    recipe = work / "recipe.yaml"
    recipe.write_text("base: base\nadapters: [{path: adapters/fr}]\noutput: notes\n")
    before = _tree(work)
    code, _, err = _run_main(capsys, "run", str(recipe), "--overwrite")
    assert code == 2
    _one_line(err, "Output folder", "notes", "was not written by peft-merge-ext")
    assert _tree(work) == before


def test_a_second_run_onto_the_same_output_fails_at_once_naming_the_first(work, capsys):
    """A real run holds the output (the `output_folder` a merge writes into); a second merge is refused at once."""
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys\nfrom peft_merge_ext.checkpoint.output_folder import output_folder\n"
            "with output_folder(sys.argv[1]):\n    print('holding', flush=True)\n    sys.stdin.readline()\n",
            str(work / "merged"),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "holding"
        started = time.monotonic()
        code, _, err = _merge(capsys, work, "--quiet")
        assert code == 2 and time.monotonic() - started < 30
        _one_line(err, "is being written by another peft-merge-ext run", f"PID {holder.pid}")
    finally:
        holder.communicate("\n", timeout=60)
    assert holder.returncode == 0
    # The first run's (empty) result is in place; no lock file, no temporary folder is left.
    assert sorted(p.name for p in work.iterdir()) == ["adapters", "base", "merged", "notes"]


# 4. Recipes


def _recipe(folder: Path, text: str) -> Path:
    path = folder / "recipe.yaml"
    path.write_text(textwrap.dedent(text))
    return path


@pytest.mark.parametrize("option", ["allow_pickle: true", "token: hf_secret", "device: cuda", "max_shard_size: 1KB"])
def test_recipe_options_cannot_carry_switches(work, capsys, option):
    recipe = _recipe(
        work, f"base: base\nadapters: [adapters/fr, adapters/de]\nmethod: weighted\noptions: {{{option}}}\n"
    )
    code, _, err = _run_main(capsys, "run", str(recipe))
    assert code == 2
    _one_line(err, f"options.{option.split(':')[0]}", "command line")
    assert not (work / "merged").exists()


def test_recipe_option_the_method_does_not_declare_is_refused(work, capsys):
    recipe = _recipe(work, "base: base\nadapters: [adapters/fr, adapters/de]\nmethod: slerp\noptions: {colour: 3}\n")
    code, _, err = _run_main(capsys, "run", str(recipe))
    assert code == 2
    _one_line(err, "Unknown option(s) 'colour' for combination_type='slerp'", "it accepts: t")


def _alias_bomb() -> str:
    """Nine levels of nine aliases (9**9 strings once expanded), in the recipe's own fields."""
    levels = ["&a [" + ",".join(["lol"] * 9) + "]"]
    levels += [f"&{b} [" + ",".join([f"*{a}"] * 9) + "]" for a, b in zip("abcdefgh", "bcdefghi", strict=True)]
    return "options: [" + ", ".join(levels) + "]\nbase: *i\nadapters: [*i]\nmethod: weighted\n"


def test_recipe_alias_bomb_is_refused_quickly(work):
    bomb = work / "bomb.yaml"
    bomb.write_text(_alias_bomb())
    assert len(bomb.read_bytes()) <= 406
    code = (
        "import sys, time\nfrom peft_merge_ext.cli import main\n"
        "started = time.perf_counter()\ncode = main(['run', sys.argv[1]])\n"
        "print(code, time.perf_counter() - started)\n"
    )

    def limit_memory() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (8 << 30, 8 << 30))

    result = subprocess.run(
        [sys.executable, "-c", code, str(bomb)], capture_output=True, text=True, timeout=120, preexec_fn=limit_memory
    )
    exit_code, seconds = result.stdout.split()
    assert exit_code == "2" and float(seconds) < 1.0, result.stdout
    _one_line(result.stderr, "bomb.yaml", "YAML aliases")


def test_recipe_over_the_size_limit_is_refused(work, capsys):
    recipe = work / "big.yaml"
    recipe.write_text("base: base\nadapters: [adapters/fr]\n" + "# padding\n" * 200_000)
    assert recipe.stat().st_size > 2_000_000
    code, _, err = _run_main(capsys, "run", str(recipe))
    assert code == 2
    _one_line(err, "big.yaml", "bytes")


@pytest.mark.parametrize(
    "text",
    [
        "base: {long}\nadapters: [adapters/fr]\n",
        "base: base\nadapters: [adapters/fr, adapters/de]\nmethod: {long}\n",
        "base: base\nadapters: [adapters/fr, adapters/de]\nmethod: weighted\noptions:\n  ? {long}\n  : 1\n",
        "base: base\nadapters: [{long}]\n",
        "base: base\nadapters: [adapters/fr]\noutput: {long}/x\n",
    ],
    ids=["base", "method", "option", "adapter", "output"],
)
def test_error_messages_quote_user_input_briefly(work, capsys, text):
    recipe = _recipe(work, text.format(long="x" * 5000))
    code, _, err = _run_main(capsys, "run", str(recipe))
    assert code == 2
    _one_line(err)
    assert "x" * 210 not in err and len(err) < 1000, err


# 5. One-line errors for damaged inputs


def _damage(path: Path, how: str) -> None:
    data = path.read_bytes()
    path.write_bytes(struct.pack("<Q", HUGE) + data[8:] if how == "header" else data[: len(data) * 3 // 4])


@pytest.mark.parametrize("how", ["header", "truncated"])
@pytest.mark.parametrize("which", ["base", "adapter"])
def test_damaged_safetensors_is_one_line(work, capsys, which, how):
    folder = work / ("base" if which == "base" else "adapters/fr")
    _damage(folder / ("model.safetensors" if which == "base" else "adapter_model.safetensors"), how)
    code, _, err = _merge(capsys, work, "--quiet")
    assert code == 2
    _one_line(err, "is not a valid safetensors file", "truncated or damaged")
    assert not (work / "merged").exists()


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        ({"rank_pattern": {"q_proj[": 2}}, "rank_pattern key 'q_proj[' is not a valid regular expression"),
        ({"auto_mapping": "LlamaForCausalLM"}, "auto_mapping='LlamaForCausalLM' is not valid"),
        ({"auto_mapping": {"base_model_class": 7}}, "auto_mapping={'base_model_class': 7} is not valid"),
    ],
)
def test_bad_adapter_config_is_one_line(work, capsys, change, needle):
    config = work / "adapters" / "fr" / "adapter_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), **change}))
    code, _, err = _merge(capsys, work, "--quiet")
    assert code == 2
    _one_line(err, needle, "adapter_config.json")


def test_file_too_large_is_one_line_and_leaves_nothing(work):
    def limit_file_size() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # write() then fails with EFBIG instead of killing us
        resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))

    before = _tree(work)
    argv = ["merge", "--base", "base", "--adapter", "adapters/fr", "--out", "merged", "--quiet"]
    result = _cli(*argv, cwd=work, preexec_fn=limit_file_size)
    assert result.returncode == 2
    _one_line(result.stderr, "model.safetensors", "File too large", "ulimit")
    assert _tree(work) == before and sorted(p.name for p in work.iterdir()) == ["adapters", "base", "notes"]


@pytest.fixture
def read_only(work):
    """`work/locked`, a folder nobody may write into (immutable for root, mode 0555 otherwise)."""
    folder = work / "locked"
    folder.mkdir()
    if os.geteuid() == 0:
        if shutil.which("chattr") is None or subprocess.run(["chattr", "+i", str(folder)]).returncode:
            pytest.skip("chattr +i is not available here")
    else:
        folder.chmod(0o555)
    try:
        yield folder
    finally:
        if os.geteuid() == 0:
            subprocess.run(["chattr", "-i", str(folder)], check=False)
        folder.chmod(0o755)


def test_read_only_output_location_is_refused_and_dry_run_reports_it(work, read_only, capsys):
    code, _, err = _merge(capsys, work, "--quiet", out=read_only / "merged")
    assert code == 2
    _one_line(err, "locked", "read-only or not writable")
    code, out, _ = _merge(capsys, work, "--dry-run", out=read_only / "merged")
    assert code == 2 and "Validation: OK" not in out
    assert "Problem: Output folder" in out and "read-only or not writable" in out
    recipe = _recipe(work, f"base: base\nadapters: [adapters/fr]\noutput: {read_only / 'merged'}\n")
    code, out, _ = _run_main(capsys, "run", str(recipe), "--dry-run")
    assert code == 2 and "read-only or not writable" in out and "Validation: 1 problem(s)" in out
    assert list(read_only.iterdir()) == []


@pytest.mark.parametrize("dry_run", [False, True], ids=["run", "dry-run"])
def test_output_path_that_is_a_file_is_refused(work, capsys, dry_run):
    target = work / "notes" / "todo.txt"
    code, out, err = _merge(capsys, work, *(["--dry-run"] if dry_run else []), "--overwrite", out=target)
    assert code == 2
    if dry_run:
        assert "exists and is a file" in out and "Validation: OK" not in out
    else:
        _one_line(err, "todo.txt", "exists and is a file")
    assert target.read_text() == "my notes\n"


def test_pickle_refused_under_allow_pickle_is_one_line(work, capsys):
    import argparse

    folder = work / "adapters" / "fr"
    state = load_file(str(folder / "adapter_model.safetensors"))
    torch.save({**state, "note": argparse.Namespace(a=1)}, folder / "adapter_model.bin")
    (folder / "adapter_model.safetensors").unlink()
    code, _, err = _merge(capsys, work, "--allow-pickle")
    assert code == 2
    _one_line(err, "adapter_model.bin", "could not be loaded safely", "argparse.Namespace", "safetensors")


# 6. An interrupted merge


def test_interrupted_merge_leaves_nothing_and_the_writer_thread_stays_quiet(tmp_path):
    """SIGINT while the background writer is busy: exit 130 with one line, no thread error, no leftovers."""
    model = tiny_llama(hidden_size=256, intermediate_size=512, vocab_size=32000)
    model.save_pretrained(tmp_path / "base")
    model = add_lora(model, "big", seed=1, r=8, target_modules=["q_proj", "v_proj", "down_proj", "embed_tokens"])
    model.save_pretrained(tmp_path / "adapters")
    before = _tree(tmp_path)
    merge = subprocess.Popen(
        [SCRIPT, "merge", "--base", "base", "--adapter", "adapters/big", "--out", "merged", "--quiet"],
        cwd=tmp_path,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 120
    # The writer thread has just started on its first item when the shard file appears: interrupt right then.
    while (
        merge.poll() is None and not list(tmp_path.glob(".merged.tmp-*/*.safetensors")) and time.monotonic() < deadline
    ):
        time.sleep(0.001)
    assert merge.poll() is None, f"the merge ended before it could be interrupted: {merge.communicate()[1]}"
    merge.send_signal(signal.SIGINT)
    _, stderr = merge.communicate(timeout=120)
    assert merge.returncode == 130 and stderr == "peft-merge-ext: interrupted\n", stderr
    assert _tree(tmp_path) == before and sorted(p.name for p in tmp_path.iterdir()) == ["adapters", "base"]


# 7. Smaller things


@pytest.mark.parametrize("again", ["adapters/fr", "adapters/fr/", "link", "adapters/de/../fr"])
def test_the_same_adapter_twice_is_refused(work, capsys, monkeypatch, again):
    (work / "link").symlink_to(work / "adapters" / "fr")
    monkeypatch.chdir(work)
    code, _, err = _merge(capsys, Path("."), "--adapter", again, "--method", "weighted")
    assert code == 2
    _one_line(err, f"The adapter folder '{again}' is given twice", "same folder as 'adapters/fr'")


def test_slerp_t_dict_without_default_is_refused_before_merging(work, capsys):
    code, _, err = _merge(
        capsys, work, "--adapter", str(work / "adapters/de"), "--method", "slerp", "--option", 't={"q_proj": 0.3}'
    )
    assert code == 2
    _one_line(err, "no 'default' entry")


def test_upload_takes_public_and_description(work, hub_server, capsys, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", hub_server.token)
    code, out, _ = _merge(capsys, work, "--quiet")
    assert code == 0, out
    code, out, err = _run_main(
        capsys,
        "upload",
        str(work / "merged"),
        "test-user/public",
        "--public",
        "--description",
        "Merged fr into the base.",
        "--message",
        "first",
    )
    assert code == 0, err
    repo = hub_server.repo("test-user/public")
    assert repo.private is False
    assert (repo.head().message, repo.head().description) == ("first", "Merged fr into the base.")
    with pytest.raises(SystemExit) as exited:
        main(["upload", str(work / "merged"), "test-user/x", "--public", "--private"])
    assert exited.value.code == 2
