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
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import json
import os
import re
import secrets
import shutil
import signal
import socket
import tempfile
import threading
import time
import warnings
from collections.abc import Iterable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from types import FrameType
from typing import Any

from .._version import __version__
from ..errors import MergeInputError

__all__ = ["MARKER_NAME", "atomic_directory", "check_output", "cleanup_stale", "output_folder"]

MARKER_NAME = ".peft-merge-ext.json"
"""The hidden file written into every output folder; its presence allows `overwrite=True` to replace the folder."""

PACKAGE_NAME = "peft-merge-ext"
_MARKER_MAX_BYTES = 1 << 16
_LOCK_RETRY_S = 0.2  # a `check_output` probe holds the lock for an instant; wait that long before giving up
_RENAME_EXCHANGE = 2  # linux/fs.h
_AT_FDCWD = -100

PathLike = str | os.PathLike


# Paths and messages


def _given(path: PathLike) -> str:
    """The path as the user wrote it, for messages."""
    return os.fspath(path)


def _label(what: str, given: str) -> str:
    """`"Output folder 'merged'"` for `what="output"`."""
    return f"{what[:1].upper()}{what[1:]} folder '{given}'"


def _reason(error: OSError) -> str:
    """A one-line reason from an `OSError`."""
    return (error.strerror or str(error) or type(error).__name__).replace("\n", " ")


def _real(path: PathLike) -> Path:
    """The real absolute path: symlinks resolved, `..` normalized (`os.path.realpath`, not strict)."""
    return Path(os.path.realpath(os.path.abspath(os.fspath(path))))


def _pattern(name: str) -> re.Pattern[str]:
    """The names of the temporary and replaced folders of the output called `name`."""
    return re.compile(rf"\.{re.escape(name)}\.(tmp|old)-(\d+)-[A-Za-z0-9_]+")


def _lock_path(real: Path) -> Path:
    return real.parent / f".{real.name}.lock"


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


def _current_umask() -> int:
    """The process umask, read from `/proc` where possible (setting it to read it is not thread-safe)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _has_marker(folder: Path) -> bool:
    """Whether `folder` holds a marker file written by this package (a regular file, not a link, naming it)."""
    marker = folder / MARKER_NAME
    try:
        if not marker.is_file() or marker.is_symlink() or marker.stat().st_size > _MARKER_MAX_BYTES:
            return False
        content = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(content, dict) and content.get("package") == PACKAGE_NAME


def _write_marker(folder: Path) -> None:
    content = {
        "package": PACKAGE_NAME,
        "version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    (folder / MARKER_NAME).write_text(json.dumps(content, indent=2) + "\n", encoding="utf-8")


def _is_empty_dir(folder: Path) -> bool:
    try:
        with os.scandir(folder) as entries:
            return next(entries, None) is None
    except OSError:
        return False


# Leftovers of interrupted runs


def _leftovers(real: Path) -> list[tuple[Path, str, int]]:
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


def _restorable(real: Path, leftovers: list[tuple[Path, str, int]]) -> Path | None:
    """The `.old-*` folder to move back to `real` when a run died between the two renames of a replacement: only when
    `real` is missing, the newest dead `.old-*` that holds the marker (or is empty, a replaced empty folder)."""
    if os.path.lexists(real):
        return None
    olds = [path for path, kind, _ in leftovers if kind == "old" and (_has_marker(path) or _is_empty_dir(path))]
    return olds[-1] if olds else None


def _recover_and_clean(real: Path, given: str, stacklevel: int = 3) -> list[str]:
    """Restore an interrupted replacement, then remove the other leftovers (the caller holds the lock).

    Returns:
        `list[str]`: The paths of the leftover folders removed.
    """
    leftovers = _leftovers(real)
    restore = _restorable(real, leftovers)
    if restore is not None:
        try:
            os.rename(restore, real)
        except OSError as error:
            raise MergeInputError(
                f"Output folder '{given}' is missing and its previous version '{restore}' could not be moved back "
                f"({_reason(error)}); move it back to '{given}' yourself."
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


# Locking


def _read_holder(path: Path) -> str:
    """`"PID 123 on host h"` from a lock file, or a vaguer text when it cannot be read."""
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
        return f"PID {int(content['pid'])} on host {content.get('host', '?')}"
    except (OSError, ValueError, KeyError, TypeError):
        return "PID unknown"


def _in_use(given: str, what: str, holder: str) -> MergeInputError:
    return MergeInputError(
        f"{_label(what, given)} is being written by another peft-merge-ext run ({holder}); wait for it to finish or "
        "choose another folder."
    )


class _Lock:
    """An exclusive `flock` on `.<name>.lock` next to the output, recording the holder's PID and host."""

    def __init__(self, real: Path, given: str, what: str) -> None:
        self.path = _lock_path(real)
        self.given, self.what = given, what
        self.fd: int | None = None

    def acquire(self) -> None:
        deadline = time.monotonic() + _LOCK_RETRY_S
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
            except OSError as error:
                raise MergeInputError(
                    f"{_label(self.what, self.given)} cannot be written: creating the lock file '{self.path}' failed "
                    f"({_reason(error)}); choose a writable location."
                ) from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                if time.monotonic() < deadline:
                    time.sleep(0.02)
                    continue
                raise _in_use(self.given, self.what, _read_holder(self.path)) from None
            except OSError as error:
                os.close(fd)
                raise MergeInputError(
                    f"{_label(self.what, self.given)} cannot be locked: flock on '{self.path}' failed "
                    f"({_reason(error)}); choose a folder on a local file system."
                ) from None
            # The previous holder may have removed the file between our open and our lock: lock the current file.
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            self.fd = fd
            break
        record = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}).encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, record + b"\n", 0)

    def release(self) -> None:
        if self.fd is None:
            return
        with contextlib.suppress(OSError):
            self.path.unlink()  # while still locked, so nobody holds a lock on a file we remove
        os.close(self.fd)
        self.fd = None


def _probe_lock(real: Path, given: str, what: str) -> None:
    """Refuse when another run holds the lock, without creating anything (a shared lock for an instant)."""
    path = _lock_path(real)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        raise _in_use(given, what, _read_holder(path)) from None
    except OSError:
        pass
    finally:
        os.close(fd)


# Signals


class _Signals:
    """During the context: SIGTERM raises `KeyboardInterrupt` like SIGINT (main thread only), and `critical()`
    defers SIGINT/SIGTERM until the folders are swapped, then delivers them to the previous handlers."""

    def __init__(self) -> None:
        self.active = threading.current_thread() is threading.main_thread()
        self.previous: dict[int, Any] = {}
        self.deferring = False
        self.pending: int | None = None

    def _handler(self, signum: int, frame: FrameType | None) -> None:
        if self.deferring:
            self.pending = signum
            return
        raise KeyboardInterrupt(f"Received signal {signal.Signals(signum).name}.")

    def _install(self, signum: int) -> None:
        if self.active and signum not in self.previous:
            self.previous[signum] = signal.getsignal(signum)
            signal.signal(signum, self._handler)

    def __enter__(self) -> _Signals:
        self._install(signal.SIGTERM)
        return self

    @contextlib.contextmanager
    def critical(self) -> Iterator[None]:
        self._install(signal.SIGINT)
        self.deferring = True
        try:
            yield
        finally:
            self.deferring = False

    def __exit__(self, *exc_info: object) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)
        self.previous.clear()
        if self.pending is not None:
            pending, self.pending = self.pending, None
            signal.raise_signal(pending)


# The swap


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


def _swap_into_place(temporary: Path, real: Path, given: str, what: str) -> None:
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
            f"{_label(what, given)} could not be put in place ({_reason(error)}): something else changed it during "
            "the run; the result was discarded, choose another folder and run again."
        ) from None
    if os.path.lexists(old):
        (old / MARKER_NAME).unlink(missing_ok=True)  # a half-removed old folder is never restored
        shutil.rmtree(old, ignore_errors=True)


def _make_temporary(real: Path, given: str, what: str) -> Path:
    """Create `.<name>.tmp-<pid>-<random>` next to `real`, with the mode the umask gives (not mkdtemp's 0700)."""
    try:
        temporary = Path(tempfile.mkdtemp(prefix=f".{real.name}.tmp-{os.getpid()}-", dir=real.parent))
    except OSError as error:
        raise MergeInputError(
            f"{_label(what, given)} cannot be written: creating a folder in '{real.parent}' failed "
            f"({_reason(error)}); choose a writable location."
        ) from None
    os.chmod(temporary, 0o777 & ~_current_umask())
    return temporary


# Checks


def _check_location(real: Path, given: str, inputs: list[PathLike | None], what: str) -> None:
    """Refuse protected folders, inputs, dangling links, files and parents that cannot be written."""
    label = _label(what, given)
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
    label = _label(what, given)
    if real.is_dir():
        current: Path | None = real
    elif os.path.lexists(real):
        return  # a file or a link: refused by `_check_location`, or by the final rename
    else:
        current = _restorable(real, _leftovers(real))
    if current is None or _is_empty_dir(current):
        return
    if not overwrite:
        raise MergeInputError(
            f"{label} already exists and is not empty; choose another folder or pass overwrite=True (CLI: "
            "--overwrite)."
        )
    if not _has_marker(current):
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
    _probe_lock(real, given, what)


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
            f"{_label(what, given)} cannot be created: making '{real.parent}' failed ({_reason(error)}); choose a "
            "writable location."
        ) from None
    lock = _Lock(real, given, what)
    with _Signals() as signals:
        lock.acquire()
        try:
            removed = _recover_and_clean(real, given, stacklevel=4)
            if removed:
                warnings.warn(
                    f"Removed {len(removed)} leftover folder(s) of interrupted peft-merge-ext runs next to output "
                    f"folder '{given}': {', '.join(Path(path).name for path in removed)}.",
                    stacklevel=3,
                )
            _check_location(real, given, inputs, what)
            _check_contents(real, given, overwrite, what)
            temporary = _make_temporary(real, given, what)
            try:
                yield temporary
                with signals.critical():
                    _check_contents(real, given, overwrite, what)  # the destination may have changed meanwhile
                    _write_marker(temporary)
                    _swap_into_place(temporary, real, given, what)
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
    lock = _Lock(real, given, "output")
    lock.acquire()
    try:
        return _recover_and_clean(real, given)
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
    temporary = _make_temporary(destination, given, "output")
    try:
        yield temporary
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    _swap_into_place(temporary, destination, given, "output")
