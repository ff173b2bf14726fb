"""How a finished result takes the place of an output folder: the marker, the temporary folder and the atomic swap.

The marker file (`MARKER_NAME`) says that peft-merge-ext wrote a folder, which is what lets `overwrite=True` replace
it. The result is built in `.<name>.tmp-<pid>-<random>` beside the output, then exchanged with the output atomically
(`renameat2(RENAME_EXCHANGE)`) where the system allows it, else with two renames through
`.<name>.old-<pid>-<random>`; the previous folder is removed once the new one is in place.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import secrets
import shutil
import tempfile
from datetime import datetime, timezone
from pathlib import Path

from .._version import __version__
from ..errors import MergeInputError
from .output_messages import error_reason, folder_label

__all__ = [
    "MARKER_NAME",
    "PACKAGE_NAME",
    "has_marker",
    "is_empty_dir",
    "make_temporary",
    "swap_into_place",
    "write_marker",
]

MARKER_NAME = ".peft-merge-ext.json"
"""The hidden file written into every output folder; its presence allows `overwrite=True` to replace the folder."""

PACKAGE_NAME = "peft-merge-ext"
_MARKER_MAX_BYTES = 1 << 16
_RENAME_EXCHANGE = 2  # linux/fs.h
_AT_FDCWD = -100


def has_marker(folder: Path) -> bool:
    """Whether `folder` holds a marker file written by this package (a regular file, not a link, naming it)."""
    marker = folder / MARKER_NAME
    try:
        if not marker.is_file() or marker.is_symlink() or marker.stat().st_size > _MARKER_MAX_BYTES:
            return False
        content = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(content, dict) and content.get("package") == PACKAGE_NAME


def write_marker(folder: Path) -> None:
    """Write the marker file, naming this package and its version, into `folder`."""
    content = {
        "package": PACKAGE_NAME,
        "version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    (folder / MARKER_NAME).write_text(json.dumps(content, indent=2) + "\n", encoding="utf-8")


def is_empty_dir(folder: Path) -> bool:
    """Whether `folder` is a folder with nothing in it (`False` when it cannot be read)."""
    try:
        with os.scandir(folder) as entries:
            return next(entries, None) is None
    except OSError:
        return False


def _current_umask() -> int:
    """The process umask, read from `/proc` where possible (setting it to read it is not thread-safe)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def make_temporary(real: Path, given: str, what: str) -> Path:
    """Create `.<name>.tmp-<pid>-<random>` next to `real`, with the mode the umask gives (not mkdtemp's 0700)."""
    try:
        temporary = Path(tempfile.mkdtemp(prefix=f".{real.name}.tmp-{os.getpid()}-", dir=real.parent))
    except OSError as error:
        raise MergeInputError(
            f"{folder_label(what, given)} cannot be written: creating a folder in '{real.parent}' failed "
            f"({error_reason(error)}); choose a writable location."
        ) from None
    os.chmod(temporary, 0o777 & ~_current_umask())
    return temporary


def _exchange(first: Path, second: Path) -> bool:
    """Swap two paths atomically with `renameat2(RENAME_EXCHANGE)`; `False` when the system cannot."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    renameat2.restype = ctypes.c_int
    if renameat2(_AT_FDCWD, os.fsencode(first), _AT_FDCWD, os.fsencode(second), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM):
        return False
    raise OSError(code, os.strerror(code), os.fspath(second))


def swap_into_place(temporary: Path, real: Path, given: str, what: str) -> None:
    """Put `temporary` at `real`; an existing folder at `real` is replaced and removed afterwards.

    Raises:
        `MergeInputError`: When the final rename fails; `temporary` is removed and `real` left as it was.
    """
    old = real.with_name(f".{real.name}.old-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        if real.is_dir() and not real.is_symlink():
            if _exchange(temporary, real):
                os.rename(temporary, old)  # `temporary` now holds the previous output
            else:
                os.rename(real, old)
                try:
                    os.rename(temporary, real)
                except OSError:
                    os.rename(old, real)
                    raise
        else:
            os.rename(temporary, real)  # fails (instead of replacing) for a file or a non-empty folder
    except OSError as error:
        shutil.rmtree(temporary, ignore_errors=True)
        raise MergeInputError(
            f"{folder_label(what, given)} could not be put in place ({error_reason(error)}): something else changed "
            "it during the run; the result was discarded, choose another folder and run again."
        ) from None
    if os.path.lexists(old):
        (old / MARKER_NAME).unlink(missing_ok=True)  # a half-removed old folder is never restored
        shutil.rmtree(old, ignore_errors=True)
