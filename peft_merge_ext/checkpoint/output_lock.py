"""One run at a time per output folder, and no half-swapped folder when SIGINT or SIGTERM arrives.

`OutputLock` holds an exclusive `fcntl.flock` on `.<name>.lock` in the output's parent folder and records the PID and
host of its holder, which a second run names when it fails at once; `probe_lock` makes the same check without creating
anything. `SignalGuard` turns SIGTERM into `KeyboardInterrupt` while a folder is built and defers SIGINT / SIGTERM
while it is swapped into place.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import Any

from ..errors import MergeInputError
from .output_messages import error_reason, folder_label

__all__ = ["OutputLock", "SignalGuard", "probe_lock"]

_LOCK_RETRY_S = 0.2  # a `check_output` probe holds the lock for an instant; wait that long before giving up


def _lock_path(real: Path) -> Path:
    """The lock file of the output `real`: `.<name>.lock` in its parent folder."""
    return real.parent / f".{real.name}.lock"


def _read_holder(path: Path) -> str:
    """`"PID 123 on host h"` from a lock file, or a vaguer text when it cannot be read."""
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
        return f"PID {int(content['pid'])} on host {content.get('host', '?')}"
    except (OSError, ValueError, KeyError, TypeError):
        return "PID unknown"


def _in_use(given: str, what: str, holder: str) -> MergeInputError:
    return MergeInputError(
        f"{folder_label(what, given)} is being written by another peft-merge-ext run ({holder}); wait for it to "
        "finish or choose another folder."
    )


class OutputLock:
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
                    f"{folder_label(self.what, self.given)} cannot be written: creating the lock file '{self.path}' "
                    f"failed ({error_reason(error)}); choose a writable location."
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
                    f"{folder_label(self.what, self.given)} cannot be locked: flock on '{self.path}' failed "
                    f"({error_reason(error)}); choose a folder on a local file system."
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
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, record + b"\n", 0)
        except OSError as error:  # a full disk or a file-size limit: nothing may stay behind
            self.release()
            raise MergeInputError(
                f"{folder_label(self.what, self.given)} cannot be written: recording the lock in '{self.path}' "
                f"failed ({error_reason(error)}); free disk space (or raise the file-size limit) and run again."
            ) from None

    def release(self) -> None:
        if self.fd is None:
            return
        with contextlib.suppress(OSError):
            self.path.unlink()  # while still locked, so nobody holds a lock on a file we remove
        os.close(self.fd)
        self.fd = None


def probe_lock(real: Path, given: str, what: str) -> None:
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


class SignalGuard:
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

    def __enter__(self) -> SignalGuard:
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
