"""What interrupted runs leave beside an output folder: an interrupted replacement restored, the rest removed.

A run killed while it built or replaced a folder leaves its `.<name>.tmp-*` or `.<name>.old-*` folder beside the
output. Only the folders of processes no longer alive on this host are ever touched: when the output is missing, the
newest `.old-*` folder holding the marker is moved back (a run died between the two renames of a replacement), and
every other one is removed.
"""

from __future__ import annotations

import os
import re
import shutil
import warnings
from pathlib import Path

from ..errors import MergeInputError
from .output_messages import error_reason
from .output_swap import MARKER_NAME, has_marker, is_empty_dir

__all__ = ["find_leftovers", "recover_and_clean", "restorable"]


def _pattern(name: str) -> re.Pattern[str]:
    """The names of the temporary and replaced folders of the output called `name`."""
    return re.compile(rf"\.{re.escape(name)}\.(tmp|old)-(\d+)-[A-Za-z0-9_]+")


def _pid_alive(pid: int) -> bool:
    """Whether a process with this PID exists on this host (ours included)."""
    if pid <= 0:
        return True  # not a process we could have been: never treat it as dead
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def find_leftovers(real: Path) -> list[tuple[Path, str, int]]:
    """The `.tmp-*` / `.old-*` folders of dead processes next to `real`: `(path, kind, pid)`, oldest first.

    Only real folders (not links or files) whose name matches this destination's pattern and whose PID is not alive
    on this host (and is not ours) are listed: nothing else can be established as ours to remove.
    """
    pattern = _pattern(real.name)
    found = []
    try:
        entries = list(os.scandir(real.parent))
    except OSError:
        return []
    for entry in entries:
        match = pattern.fullmatch(entry.name)
        if match is None:
            continue
        pid = int(match.group(2))
        try:
            is_dir = entry.is_dir(follow_symlinks=False)
            mtime = entry.stat(follow_symlinks=False).st_mtime
        except OSError:
            continue
        if is_dir and pid != os.getpid() and not _pid_alive(pid):
            found.append((mtime, Path(entry.path), match.group(1), pid))
    found.sort(key=lambda item: (item[0], item[1].name))
    return [(path, kind, pid) for _, path, kind, pid in found]


def restorable(real: Path, leftovers: list[tuple[Path, str, int]]) -> Path | None:
    """The `.old-*` folder to move back to `real` when a run died between the two renames of a replacement: only when
    `real` is missing, the newest dead `.old-*` that holds the marker (or is empty, a replaced empty folder)."""
    if os.path.lexists(real):
        return None
    olds = [path for path, kind, _ in leftovers if kind == "old" and (has_marker(path) or is_empty_dir(path))]
    return olds[-1] if olds else None


def recover_and_clean(real: Path, given: str, stacklevel: int = 3) -> list[str]:
    """Restore an interrupted replacement, then remove the other leftovers (the caller holds the lock).

    Returns:
        `list[str]`: The paths of the leftover folders removed.
    """
    leftovers = find_leftovers(real)
    restore = restorable(real, leftovers)
    if restore is not None:
        try:
            os.rename(restore, real)
        except OSError as error:
            raise MergeInputError(
                f"Output folder '{given}' is missing and its previous version '{restore}' could not be moved back "
                f"({error_reason(error)}); move it back to '{given}' yourself."
            ) from None
        warnings.warn(
            f"Output folder '{given}' was missing after an interrupted peft-merge-ext run; restored its previous "
            f"version from '{restore.name}'.",
            stacklevel=stacklevel,
        )
    removed = []
    for path, _, _ in leftovers:
        if path == restore:
            continue
        (path / MARKER_NAME).unlink(missing_ok=True)
        shutil.rmtree(path, ignore_errors=True)
        if not os.path.lexists(path):
            removed.append(str(path))
    return removed
