"""Output folders: refusals before anything is touched, the marker, the lock, kills, recovery, umask.

Everything runs on the real file system under `tmp_path`; kills and locks use real subprocesses.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from peft_merge_ext import __version__
from peft_merge_ext.checkpoint import output_folder as output_folder_module
from peft_merge_ext.checkpoint import writer
from peft_merge_ext.checkpoint.output_folder import (
    MARKER_NAME,
    atomic_directory,
    check_output,
    cleanup_stale,
    output_folder,
)
from peft_merge_ext.errors import MergeInputError

REPO = Path(__file__).resolve().parents[1]

CHILD = """
import pathlib, sys, time
from peft_merge_ext.checkpoint.output_folder import output_folder

destination, ready, overwrite = sys.argv[1], pathlib.Path(sys.argv[2]), sys.argv[3] == "1"
with output_folder(destination, overwrite=overwrite) as folder:
    (folder / "weights.bin").write_bytes(b"new, incomplete")
    ready.with_suffix(".part").write_text(str(folder))
    ready.with_suffix(".part").rename(ready)  # complete when it appears
    time.sleep(120)
"""


def _tree(root: Path) -> list[str]:
    """Every path under `root` (hidden ones included), relative, sorted."""
    found = []
    for folder, folders, files in os.walk(root):
        for name in folders + files:
            found.append(os.path.relpath(os.path.join(folder, name), root))
    return sorted(found)


def _refused(destination, match: str, *, overwrite: bool = False, inputs=(), root: Path | None = None) -> str:
    """Assert that `check_output` and `output_folder` both refuse `destination` with a one-line `MergeInputError`
    matching `match`, and that nothing under `root` changed; return the message."""
    before = _tree(root) if root is not None else None
    with pytest.raises(MergeInputError, match=match) as checked:
        check_output(destination, overwrite=overwrite, inputs=inputs)
    with (
        pytest.raises(MergeInputError, match=match) as entered,
        output_folder(destination, overwrite=overwrite, inputs=inputs),
    ):
        pytest.fail("the body must not run")
    message = str(entered.value)
    assert message == str(checked.value)
    assert "\n" not in message
    assert f"'{os.fspath(destination)}'" in message  # named as the user gave it
    if root is not None:
        assert _tree(root) == before
    return message


def _produce(destination: Path, content: str = "old", **kwargs) -> None:
    with output_folder(destination, **kwargs) as folder:
        (folder / "weights.bin").write_text(content)


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", ""])
    process.wait()
    return process.pid


def _start_child(tmp_path: Path, destination: Path, overwrite: bool) -> tuple[subprocess.Popen, Path]:
    """A subprocess inside `output_folder(destination)`, sleeping; returns it with its temporary folder."""
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    ready = tmp_path / f"ready-{time.monotonic_ns()}"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    process = subprocess.Popen(
        [sys.executable, str(script), str(destination), str(ready), "1" if overwrite else "0"],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 60
    while not ready.exists():
        if process.poll() is not None:
            pytest.fail(f"the child exited early: {process.communicate()[1]}")
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail("the child did not get inside output_folder within 60 s")
        time.sleep(0.02)
    return process, Path(ready.read_text())


# Refusals, each before anything is touched


def test_refuses_the_working_directory_its_ancestors_home_and_root(tmp_path, monkeypatch):
    work = tmp_path / "projects" / "work"
    work.mkdir(parents=True)
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)
    _refused(".", "is the current working directory", root=tmp_path)
    _refused(work, "is the current working directory", root=tmp_path)
    _refused("sub/..", "is the current working directory", root=tmp_path)
    _refused("..", "contains the current working directory", root=tmp_path)
    _refused(tmp_path, "contains the current working directory", root=tmp_path)
    _refused(home, "is your home folder", root=tmp_path)
    _refused("/", "is the root folder", root=tmp_path)
    (tmp_path / "link-to-work").symlink_to(work)
    _refused(tmp_path / "link-to-work", "is the current working directory", root=tmp_path)
    check_output("merged", overwrite=False, inputs=())  # a new subfolder is fine
    assert not (work / "merged").exists()


def test_refuses_inputs_folders_inside_them_and_folders_containing_them(tmp_path, monkeypatch):
    base = tmp_path / "models" / "base"
    adapter = tmp_path / "adapters" / "a"
    recipe = tmp_path / "recipes" / "merge.yaml"
    for folder in (base, adapter, recipe.parent, tmp_path / "work"):
        folder.mkdir(parents=True)
    (base / "model.safetensors").write_text("weights")
    (adapter / "adapter_model.safetensors").write_text("lora")
    recipe.write_text("adapters: []\n")
    (tmp_path / "link-to-base").symlink_to(base)
    monkeypatch.chdir(tmp_path / "work")
    inputs = [base, "../adapters/a", recipe, None, "org/hub-model"]

    _refused(base, "is the input", inputs=inputs, root=tmp_path)
    _refused(base / "merged", "lies inside the input", inputs=inputs, root=tmp_path)
    _refused(tmp_path / "models", "contains the input", inputs=inputs, root=tmp_path)
    _refused(tmp_path / "link-to-base", "is the input", inputs=inputs, root=tmp_path)
    _refused(f"{base}/../base", "is the input", inputs=inputs, root=tmp_path)
    message = _refused("../adapters/a/merged", "lies inside the input '../adapters/a'", inputs=inputs, root=tmp_path)
    assert "outside the inputs" in message
    _refused(recipe, "is the input", inputs=inputs, root=tmp_path)
    _refused(recipe.parent, "contains the input", inputs=inputs, root=tmp_path)
    # The recipe's folder is not an input: an output next to the recipe is fine, and so is a Hub id as input.
    check_output(recipe.parent / "merged", overwrite=False, inputs=inputs)
    _produce(recipe.parent / "merged", inputs=inputs)
    assert (recipe.parent / "merged" / "weights.bin").read_text() == "old"


def test_refuses_a_dangling_symlink_a_file_and_a_parent_that_is_a_file(tmp_path):
    (tmp_path / "dangling").symlink_to(tmp_path / "missing")
    _refused(tmp_path / "dangling", "symbolic link to .* which does not exist", root=tmp_path)
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    _refused(tmp_path / "loop", "symbolic link", root=tmp_path)
    (tmp_path / "notes.txt").write_text("keep me")
    _refused(tmp_path / "notes.txt", "exists and is a file; remove it or choose another folder", root=tmp_path)
    _refused(tmp_path / "notes.txt" / "merged", "is a file, not a folder", root=tmp_path)
    _refused(tmp_path / "notes.txt" / "deeper" / "merged", "is a file, not a folder", root=tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "keep me"


def test_refuses_a_read_only_parent(tmp_path):
    parent = tmp_path / "read-only"
    parent.mkdir()
    (parent / "existing").mkdir()
    parent.chmod(0o555)
    immutable = False
    try:
        if os.access(parent, os.W_OK):  # root: permissions do not stop it; an immutable folder does
            if shutil.which("chattr") is None:
                pytest.skip("running as root, os.access cannot see mode 0o555 and chattr is not available")
            immutable = subprocess.run(["chattr", "+i", str(parent)], capture_output=True).returncode == 0
            if not immutable or os.access(parent, os.W_OK):
                pytest.skip("running as root and this file system cannot make a folder immutable")
        _refused(parent / "merged", "read-only or not writable by you; choose a writable location", root=tmp_path)
        _refused(parent / "sub" / "merged", "read-only or not writable", root=tmp_path)
        _refused(parent / "existing", "read-only or not writable", overwrite=True, root=tmp_path)
    finally:
        if immutable:
            subprocess.run(["chattr", "-i", str(parent)], check=True)
        parent.chmod(0o755)


def test_check_output_creates_nothing_when_the_output_is_fine(tmp_path):
    check_output(tmp_path / "new" / "deeper" / "merged", overwrite=False, inputs=[tmp_path / "missing-input"])
    (tmp_path / "empty").mkdir()
    check_output(tmp_path / "empty", overwrite=False, inputs=())
    assert _tree(tmp_path) == ["empty"]


# Overwrite and the marker


def test_output_gets_the_marker_and_nothing_is_left_beside_it(tmp_path):
    destination = tmp_path / "out" / "merged"
    _produce(destination)
    assert sorted(os.listdir(destination)) == [MARKER_NAME, "weights.bin"]
    marker = json.loads((destination / MARKER_NAME).read_text())
    assert marker["package"] == "peft-merge-ext" and marker["version"] == __version__
    assert marker["created"].endswith("+00:00")
    assert os.listdir(tmp_path / "out") == ["merged"]  # no temporary folder, no lock file


def test_overwrite_replaces_only_a_folder_peft_merge_ext_wrote(tmp_path):
    destination = tmp_path / "merged"
    _produce(destination, "first")
    _refused(
        destination, r"already exists and is not empty; choose another folder or pass overwrite=True", root=tmp_path
    )
    _produce(destination, "second", overwrite=True)
    assert (destination / "weights.bin").read_text() == "second"
    assert os.listdir(tmp_path) == ["merged"]

    mine = tmp_path / "my-results"
    mine.mkdir()
    (mine / "notes.txt").write_text("precious")
    message = _refused(
        mine, "was not written by peft-merge-ext; remove it yourself or choose another folder", overwrite=True
    )
    assert message.startswith(f"Output folder '{mine}'")
    for bogus in ("not json", json.dumps({"package": "someone-else"}), json.dumps(["peft-merge-ext"])):
        (mine / MARKER_NAME).write_text(bogus)
        _refused(mine, "was not written by peft-merge-ext", overwrite=True, root=tmp_path)
    (mine / MARKER_NAME).unlink()
    (mine / MARKER_NAME).symlink_to(destination / MARKER_NAME)  # a borrowed marker does not count
    _refused(mine, "was not written by peft-merge-ext", overwrite=True, root=tmp_path)
    assert (mine / "notes.txt").read_text() == "precious"

    empty = tmp_path / "empty"
    empty.mkdir()
    _produce(empty)  # an empty folder needs no overwrite
    assert (empty / "weights.bin").read_text() == "old"


def test_an_error_in_the_block_leaves_the_previous_output(tmp_path):
    destination = tmp_path / "merged"
    _produce(destination, "old")
    with pytest.raises(RuntimeError, match="boom"), output_folder(destination, overwrite=True) as folder:
        (folder / "weights.bin").write_text("half")
        raise RuntimeError("boom")
    assert (destination / "weights.bin").read_text() == "old"
    assert os.listdir(tmp_path) == ["merged"]


def test_a_failed_final_rename_removes_the_temporary_folder(tmp_path):
    destination = tmp_path / "merged"
    with (
        pytest.raises(MergeInputError, match="could not be put in place") as error,
        output_folder(destination) as folder,
    ):
        (folder / "weights.bin").write_text("new")
        destination.write_text("a file appeared meanwhile")
    assert "\n" not in str(error.value) and f"'{destination}'" in str(error.value)
    assert destination.read_text() == "a file appeared meanwhile"
    assert sorted(os.listdir(tmp_path)) == ["merged"]

    other = tmp_path / "other"
    with pytest.raises(MergeInputError, match="already exists and is not empty"), output_folder(other) as folder:
        (folder / "weights.bin").write_text("new")
        other.mkdir()
        (other / "theirs.txt").write_text("someone else's")
    assert os.listdir(other) == ["theirs.txt"]
    assert sorted(os.listdir(tmp_path)) == ["merged", "other"]


@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o755), (0o077, 0o700), (0o002, 0o775)])
def test_folders_and_files_follow_the_umask(tmp_path, umask, mode):
    previous = os.umask(umask)
    try:
        with output_folder(tmp_path / "new" / "merged") as folder:
            (folder / "weights.bin").write_text("w")
        with atomic_directory(tmp_path / "legacy") as folder:
            (folder / "weights.bin").write_text("w")
    finally:
        os.umask(previous)
    assert (tmp_path / "new" / "merged").stat().st_mode & 0o7777 == mode
    assert (tmp_path / "new").stat().st_mode & 0o7777 == mode
    assert (tmp_path / "new" / "merged" / MARKER_NAME).stat().st_mode & 0o777 == 0o666 & ~umask
    assert (tmp_path / "legacy").stat().st_mode & 0o7777 == mode


# The lock


def test_a_second_run_on_the_same_output_fails_at_once_naming_the_holder(tmp_path):
    out = tmp_path / "out"
    destination = out / "merged"
    _produce(destination, "old")
    holder, temporary = _start_child(tmp_path, destination, overwrite=True)
    try:
        lock = json.loads((out / ".merged.lock").read_text())
        assert lock["pid"] == holder.pid and lock["host"]
        started = time.monotonic()
        in_use = rf"is being written by another peft-merge-ext run \(PID {holder.pid} on host "
        with pytest.raises(MergeInputError, match=in_use), output_folder(destination, overwrite=True):
            pytest.fail("the body must not run")
        assert time.monotonic() - started < 5
        with pytest.raises(MergeInputError, match=rf"PID {holder.pid} "):
            check_output(destination, overwrite=True, inputs=())
        with pytest.raises(MergeInputError, match=rf"PID {holder.pid} "):
            cleanup_stale(destination)
        assert temporary.is_dir()  # the holder's folder was not touched
        _produce(out / "another", "other")  # other outputs in the same parent are not locked
    finally:
        holder.terminate()
        holder.wait(30)
    _produce(destination, "after", overwrite=True)
    assert (destination / "weights.bin").read_text() == "after"
    assert sorted(os.listdir(out)) == ["another", "merged"]


# Kills and recovery


@pytest.mark.parametrize("previous", [True, False], ids=["overwrite", "new"])
def test_sigterm_inside_the_block_removes_the_temporary_folder(tmp_path, previous):
    out = tmp_path / "out"
    destination = out / "merged"
    out.mkdir()
    if previous:
        _produce(destination, "old")
    child, temporary = _start_child(tmp_path, destination, overwrite=previous)
    assert temporary.is_dir() and temporary.parent == out
    child.send_signal(signal.SIGTERM)
    _, stderr = child.communicate(timeout=60)
    assert child.returncode != 0 and "KeyboardInterrupt" in stderr
    assert not temporary.exists()
    assert sorted(os.listdir(out)) == (["merged"] if previous else [])
    if previous:
        assert (destination / "weights.bin").read_text() == "old"
    assert cleanup_stale(destination) == []


@pytest.mark.parametrize("previous", [True, False], ids=["overwrite", "new"])
def test_sigkill_leftovers_are_reported_and_removed_by_the_next_run(tmp_path, previous):
    out = tmp_path / "out"
    destination = out / "merged"
    out.mkdir()
    if previous:
        _produce(destination, "old")
    child, temporary = _start_child(tmp_path, destination, overwrite=previous)
    child.kill()
    child.communicate(timeout=60)
    assert temporary.is_dir() and temporary.name.startswith(f".merged.tmp-{child.pid}-")
    if previous:
        assert (destination / "weights.bin").read_text() == "old"  # the previous complete output
        assert sorted(os.listdir(destination)) == [MARKER_NAME, "weights.bin"]
    else:
        assert not destination.exists()
    check_output(destination, overwrite=previous, inputs=())  # a dry run touches nothing
    assert temporary.is_dir()
    with pytest.warns(
        UserWarning, match=rf"Removed 1 leftover folder.*'{re.escape(str(destination))}': {re.escape(temporary.name)}"
    ):
        _produce(destination, "new", overwrite=previous)
    assert (destination / "weights.bin").read_text() == "new"
    assert sorted(os.listdir(out)) == ["merged"]


def test_a_kill_between_the_two_renames_is_recovered_before_anything_else(tmp_path):
    destination = tmp_path / "merged"
    _produce(destination, "old")
    dead = _dead_pid()
    os.rename(destination, tmp_path / f".merged.old-{dead}-x")
    (tmp_path / f".merged.tmp-{dead}-y").mkdir()
    (tmp_path / f".merged.tmp-{dead}-y" / "weights.bin").write_text("new")
    before = _tree(tmp_path)
    # A dry run checks the previous output that the next run will restore.
    _refused(destination, "already exists and is not empty", root=tmp_path)
    check_output(destination, overwrite=True, inputs=())
    assert _tree(tmp_path) == before
    with (
        pytest.warns(UserWarning, match=rf"restored its previous version from '.merged.old-{dead}-x'"),
        pytest.warns(UserWarning, match=rf"Removed 1 leftover folder.*\.merged\.tmp-{dead}-y"),
        pytest.raises(RuntimeError, match="boom"),
        output_folder(destination, overwrite=True),
    ):
        assert (destination / "weights.bin").read_text() == "old"  # restored before the block ran
        raise RuntimeError("boom")
    assert (destination / "weights.bin").read_text() == "old"
    assert sorted(os.listdir(tmp_path)) == ["merged"]


def test_cleanup_stale_restores_and_removes_only_what_it_owns(tmp_path):
    destination = tmp_path / "merged"
    _produce(destination, "old")
    dead = _dead_pid()
    os.rename(destination, tmp_path / f".merged.old-{dead}-a1")
    (tmp_path / f".merged.old-{dead}-b2").mkdir()  # a half-removed old folder: no marker, not restored
    (tmp_path / f".merged.old-{dead}-b2" / "weights.bin").write_text("partial")
    (tmp_path / f".merged.tmp-{dead}-c3").mkdir()
    kept = [
        f".merged.tmp-{os.getpid()}-d4",  # alive: this process
        f".merged.old-{os.getppid()}-e5",  # alive: the parent process
        f".other.tmp-{dead}-f6",  # another output's
        f".merged.tmp-{dead}",  # not the pattern
        f"merged.tmp-{dead}-g7",  # not hidden: not ours
        f".merged.tmp-{dead}-h8.bak",  # not the pattern
    ]
    for name in kept:
        (tmp_path / name).mkdir()
        (tmp_path / name / "keep").write_text("keep")
    (tmp_path / f".merged.tmp-{dead}-i9").write_text("a file, not a folder we made")
    kept.append(f".merged.tmp-{dead}-i9")
    with pytest.warns(UserWarning, match="restored its previous version"):
        removed = cleanup_stale(destination)
    assert sorted(removed) == sorted(
        str(tmp_path / f".merged.{kind}-{dead}-{key}") for kind, key in [("old", "b2"), ("tmp", "c3")]
    )
    assert (destination / "weights.bin").read_text() == "old"
    assert sorted(os.listdir(tmp_path)) == sorted([*kept, "merged"])
    assert cleanup_stale(destination) == []
    assert cleanup_stale(tmp_path / "missing-parent" / "merged") == []


# Signals, threads and the re-export


def test_the_sigterm_handler_is_installed_in_the_main_thread_only_and_restored(tmp_path):
    before = signal.getsignal(signal.SIGTERM)
    with output_folder(tmp_path / "a"):
        assert signal.getsignal(signal.SIGTERM) is not before
    assert signal.getsignal(signal.SIGTERM) is before
    errors = []

    def run() -> None:
        try:
            with output_folder(tmp_path / "b") as folder:
                assert signal.getsignal(signal.SIGTERM) is before
                (folder / "weights.bin").write_text("w")
        except BaseException as error:  # reported to the main thread
            errors.append(error)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    assert errors == [] and (tmp_path / "b" / "weights.bin").is_file()


def test_atomic_directory_is_re_exported_with_its_old_behaviour(tmp_path):
    assert writer.atomic_directory is atomic_directory is output_folder_module.atomic_directory
    destination = tmp_path / "out"
    with atomic_directory(destination) as folder:
        (folder / "a.txt").write_text("a")
    assert os.listdir(destination) == ["a.txt"]  # no marker: current callers list their files
    with pytest.raises(FileExistsError, match="already exists and is not empty"), atomic_directory(destination):
        pass
    with atomic_directory(destination, overwrite=True) as folder:
        (folder / "b.txt").write_text("b")
    assert os.listdir(destination) == ["b.txt"]
    assert os.listdir(tmp_path) == ["out"]


def test_a_disk_that_cannot_take_the_lock_record_leaves_no_lock_behind(tmp_path):
    """With a file-size limit of 0 (what a completely full disk does too), taking the lock fails with one clear
    error and the lock file is removed (the fault benchmark found it left behind)."""
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent(
        f"""
        import resource, signal, sys
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (0, 0))
        from peft_merge_ext.checkpoint.output_folder import output_folder
        from peft_merge_ext.errors import MergeInputError
        try:
            with output_folder({str(tmp_path / "out")!r}):
                pass
        except MergeInputError as error:
            print(error)
            sys.exit(2)
        """
    )
    completed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert completed.returncode == 2, completed.stderr
    assert "free disk space" in completed.stdout and ".out.lock" in completed.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == []
