"""The single authority over the folders peft-merge-ext writes its results into.

`output_folder` yields a temporary folder next to the destination and puts it in place only when the block succeeds;
`check_output` runs the same checks alone (for `--dry-run`, or before a long merge) and `cleanup_stale` removes what
interrupted runs left behind. Every check raises `MergeInputError` with a one-line message naming the folder as the
user gave it and the fix, before anything is touched:

- The output may not be, contain or lie inside one of the `inputs`, nor be the current working directory, one of its
  ancestors, the home folder or `/` (real paths are compared: symlinks resolved, `..` normalized). A dangling
  symbolic link is refused.
- An existing file is refused, and so is a location whose parent cannot be written.
- A non-empty existing folder is replaced only with `overwrite=True`, and only when it holds the marker file
  (`.peft-merge-ext.json`) that this module writes into every folder it produces.
- One run at a time per output: an exclusive `fcntl.flock` on `.<name>.lock` in the parent folder; a second run fails
  at once, naming the PID and host of the first.

Layout next to `destination` (all in its parent folder, so every rename stays on one file system):

- `.<name>.tmp-<pid>-<random>`: the folder being built;
- `.<name>.old-<pid>-<random>`: the previous output while it is being replaced;
- `.<name>.lock`: the lock file, removed at the end of the run.

The replacement exchanges both folders atomically (`renameat2(RENAME_EXCHANGE)`) where the system allows it, so
`destination` holds the old or the new result at every instant; elsewhere two renames are used and a run killed
between them is repaired by the next run, which moves the `.old-*` folder back before anything else. `.tmp-*` and
`.old-*` folders of processes that are no longer alive are reported and removed by the next run on the same output;
nothing else is ever removed.

This module holds the checks and the order of the steps; the steps themselves are in `output_lock` (the lock and the
signal handling), `output_swap` (the marker, the temporary folder and the swap) and `output_leftovers` (what
interrupted runs left behind).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path

from ..errors import MergeInputError
from .output_leftovers import find_leftovers, recover_and_clean, restorable
from .output_lock import OutputLock, SignalGuard, probe_lock
from .output_messages import error_reason, folder_label
from .output_swap import MARKER_NAME, has_marker, is_empty_dir, make_temporary, swap_into_place, write_marker

__all__ = ["MARKER_NAME", "atomic_directory", "check_output", "cleanup_stale", "output_folder", "push_folder"]

PathLike = str | os.PathLike


def _given(path: PathLike) -> str:
    """The path as the user wrote it, for messages."""
    return os.fspath(path)


def _real(path: PathLike) -> Path:
    """The real absolute path: symlinks resolved, `..` normalized (`os.path.realpath`, not strict)."""
    return Path(os.path.realpath(os.path.abspath(os.fspath(path))))


def _check_location(real: Path, given: str, inputs: list[PathLike | None], what: str) -> None:
    """Refuse protected folders, inputs, dangling links, files and parents that cannot be written."""
    label = folder_label(what, given)
    if os.path.islink(given) and not os.path.exists(given):
        raise MergeInputError(
            f"{label} is a symbolic link to '{os.readlink(given)}', which does not exist; remove the link or choose "
            "another folder."
        )
    if real == Path(real.anchor) or not real.name:
        raise MergeInputError(f"{label} is the root folder '/'; choose a new, dedicated folder.")
    with contextlib.suppress(RuntimeError, KeyError, OSError):
        if real == _real(Path.home()):
            raise MergeInputError(f"{label} is your home folder; choose a new, dedicated folder inside it.")
    with contextlib.suppress(OSError):
        cwd = _real(os.getcwd())
        if real == cwd:
            raise MergeInputError(
                f"{label} is the current working directory; choose a new, dedicated folder (e.g. a subfolder)."
            )
        if cwd.is_relative_to(real):
            raise MergeInputError(f"{label} contains the current working directory; choose a new, dedicated folder.")
    for item in inputs:
        if item is None or not os.path.lexists(item):
            continue  # not on disk (e.g. a Hub repository id): nothing of it can be overwritten
        source = _real(item)
        if real == source:
            relation = "is"
        elif real.is_relative_to(source):
            relation = "lies inside"
        elif source.is_relative_to(real):
            relation = "contains"
        else:
            continue
        raise MergeInputError(
            f"{label} {relation} the input '{_given(item)}'; choose a new folder outside the inputs."
        )
    if os.path.lexists(real) and not real.is_dir():
        kind = "a file" if real.is_file() else "not a folder"
        raise MergeInputError(f"{label} exists and is {kind}; remove it or choose another folder.")
    ancestor = real.parent
    while not os.path.lexists(ancestor) and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise MergeInputError(
            f"{label} cannot be created: '{ancestor}' is a file, not a folder; choose another folder."
        )
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise MergeInputError(
            f"{label} cannot be written: '{ancestor}' is read-only or not writable by you; choose a writable location."
        )


def _check_contents(real: Path, given: str, overwrite: bool, what: str) -> None:
    """Refuse a non-empty folder without `overwrite`, or with it when peft-merge-ext did not write it. A missing
    folder that the next run will restore from an interrupted replacement is checked as that previous version."""
    label = folder_label(what, given)
    if real.is_dir():
        current: Path | None = real
    elif os.path.lexists(real):
        return  # a file or a link: refused by `_check_location`, or by the final rename
    else:
        current = restorable(real, find_leftovers(real))
    if current is None or is_empty_dir(current):
        return
    if not overwrite:
        raise MergeInputError(
            f"{label} already exists and is not empty; choose another folder or pass overwrite=True (CLI: "
            "--overwrite)."
        )
    if not has_marker(current):
        raise MergeInputError(
            f"{label} was not written by peft-merge-ext; remove it yourself or choose another folder."
        )


def check_output(
    destination: PathLike,
    *,
    overwrite: bool,
    inputs: Iterable[PathLike | None],
    what: str = "output",
) -> None:
    """Run every check of `output_folder` without touching anything (for `--dry-run`, or before a long merge).

    Besides the rules listed in the module docstring, it also refuses an output that another run is writing now. A
    folder missing because a run died while replacing it is checked as the previous version the next run will
    restore.

    Args:
        destination (`str` or `os.PathLike`): The output folder, as the user gave it.
        overwrite (`bool`): Whether an existing, non-empty folder written by peft-merge-ext may be replaced.
        inputs (`Iterable[str | os.PathLike | None]`): The local inputs of the run (base model folder, adapter
            folders, recipe file...); `None` entries and paths that do not exist (Hub ids) are ignored.
        what (`str`, *optional*, defaults to `"output"`): How messages name the folder (`"Output folder 'x'"`).

    Raises:
        `MergeInputError`: A one-line message naming the folder and the fix.
    """
    given = _given(destination)
    real = _real(destination)
    _check_location(real, given, list(inputs), what)
    _check_contents(real, given, overwrite, what)
    probe_lock(real, given, what)


@contextlib.contextmanager
def output_folder(
    destination: PathLike,
    *,
    overwrite: bool = False,
    inputs: Iterable[PathLike | None] = (),
    what: str = "output",
) -> Iterator[Path]:
    """Yield a new temporary folder next to `destination` and put it in place when the block succeeds.

    In order: `check_output`'s checks (nothing touched when they fail), missing parent folders created, the lock
    taken, an interrupted replacement restored and leftovers of dead runs removed (reported with a warning), the
    checks again, then the temporary folder created and yielded. On success the marker file `.peft-merge-ext.json` is
    written into it and it replaces `destination` (the previous folder is removed afterwards); on any error,
    `KeyboardInterrupt` and SIGTERM included, it is removed and `destination` is left as it was. The lock file is
    removed at the end.

    `destination` is resolved to its real path: through a symbolic link to a folder, the linked folder is replaced.
    The folder gets mode `0o777 & ~umask`, like folders `save_pretrained` creates.

    Args:
        destination (`str` or `os.PathLike`): The output folder, as the user gave it.
        overwrite (`bool`, *optional*, defaults to `False`): Replace an existing, non-empty folder written by
            peft-merge-ext.
        inputs (`Iterable[str | os.PathLike | None]`, *optional*): The local inputs of the run (base model folder,
            adapter folders, recipe file...), which the output must not be, contain or lie inside.
        what (`str`, *optional*, defaults to `"output"`): How messages name the folder.

    Yields:
        `Path`: The temporary folder to write the result into (its parent is `destination`'s real parent).

    Raises:
        `MergeInputError`: When a check fails, another run holds the lock, or the final rename fails.
    """
    given = _given(destination)
    real = _real(destination)
    inputs = list(inputs)
    _check_location(real, given, inputs, what)
    _check_contents(real, given, overwrite, what)
    try:
        real.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise MergeInputError(
            f"{folder_label(what, given)} cannot be created: making '{real.parent}' failed ({error_reason(error)}); "
            "choose a writable location."
        ) from None
    lock = OutputLock(real, given, what)
    with SignalGuard() as signals:
        lock.acquire()
        try:
            removed = recover_and_clean(real, given, stacklevel=4)
            if removed:
                warnings.warn(
                    f"Removed {len(removed)} leftover folder(s) of interrupted peft-merge-ext runs next to output "
                    f"folder '{given}': {', '.join(Path(path).name for path in removed)}.",
                    stacklevel=3,
                )
            _check_location(real, given, inputs, what)
            _check_contents(real, given, overwrite, what)
            temporary = make_temporary(real, given, what)
            try:
                yield temporary
                with signals.critical():
                    _check_contents(real, given, overwrite, what)  # the destination may have changed meanwhile
                    write_marker(temporary)
                    swap_into_place(temporary, real, given, what)
            except BaseException:
                shutil.rmtree(temporary, ignore_errors=True)
                raise
        finally:
            lock.release()


def cleanup_stale(destination: PathLike) -> list[str]:
    """Repair and clean what interrupted runs left next to `destination`, under its lock.

    When `destination` is missing and a dead run's `.old-*` folder holds its previous version, that folder is moved
    back (with a warning). Then the `.tmp-*` and `.old-*` folders of `destination` whose process is no longer alive
    on this host are removed; nothing else is touched.

    Args:
        destination (`str` or `os.PathLike`): The output folder, as the user gave it.

    Returns:
        `list[str]`: The paths of the leftover folders removed.

    Raises:
        `MergeInputError`: When another run holds the lock (naming its PID), or a restore fails.
    """
    given = _given(destination)
    real = _real(destination)
    if not real.name or not real.parent.is_dir():
        return []
    lock = OutputLock(real, given, "output")
    lock.acquire()
    try:
        return recover_and_clean(real, given)
    finally:
        lock.release()


@contextlib.contextmanager
def atomic_directory(destination: PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside `destination` and rename it to `destination` when the block succeeds.

    The behaviour callers had before `output_folder`, kept until they move to it: no input checks, no marker, no lock.
    On error the temporary folder is removed and `destination` is left as it was. With `overwrite=True` an existing
    `destination` is replaced (exchanged, or moved aside first; deleted only after the new folder is in place).

    Raises:
        `FileExistsError`: When `destination` exists, is not empty and `overwrite` is `False`.
        `MergeInputError`: When the temporary folder cannot be created or the final rename fails.
    """
    given = _given(destination)
    destination = Path(destination).absolute()
    if destination.exists() and any(destination.iterdir()) and not overwrite:
        raise FileExistsError(
            f"Output folder {destination} already exists and is not empty; choose another folder or pass "
            "overwrite=True."
        )
    destination.parent.mkdir(parents=True, exist_ok=True)
    temporary = make_temporary(destination, given, "output")
    try:
        yield temporary
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    swap_into_place(temporary, destination, given, "output")


@contextlib.contextmanager
def push_folder(
    local_dir: PathLike | None, name: str, keep_on: tuple[type[BaseException], ...] = ()
) -> Iterator[Path]:
    """Where a push builds the output it uploads: `local_dir` when given (the caller's, never removed here), else
    `name` inside a new private temporary folder, which is removed when the block ends, unless it raises one of
    `keep_on` (a failed upload keeps the merged folder for the retry its error names)."""
    if local_dir is not None:
        yield Path(local_dir)
        return
    parent = Path(tempfile.mkdtemp(prefix="peft-merge-ext-push-"))
    try:
        yield parent / name
    except keep_on:
        raise
    except BaseException:
        shutil.rmtree(parent, ignore_errors=True)
        raise
    shutil.rmtree(parent, ignore_errors=True)
