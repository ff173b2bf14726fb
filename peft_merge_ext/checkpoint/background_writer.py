"""Writing planned tensors in a background thread, so that writing overlaps with computing the next tensors.

`BackgroundWriter` wraps a `writer.ShardedSafetensorsWriter` (which it alone uses until `finish`); `writer.py`
re-exports it for current callers.
"""

from __future__ import annotations

import collections
import os
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from .writer import ShardedSafetensorsWriter

__all__ = ["DEFAULT_MAX_PENDING_BYTES", "BackgroundWriter"]

DEFAULT_MAX_PENDING_BYTES = 64 * 10**6  # tensors a `BackgroundWriter` holds, not yet written


@dataclass(eq=False)
class _Pending:
    """One queued request: a tensor to write, or `(source, offset)` to copy from a file (compared by identity)."""

    name: str
    item: Any
    nbytes: int


class BackgroundWriter:
    """Hand tensors (or byte copies from other files) to a `ShardedSafetensorsWriter` running in one background
    thread, so writing (`os.pwrite` and `os.copy_file_range` release the GIL) overlaps with computing the next
    tensors. Everything is written in the order it was handed over.

    Memory bound: the tensors handed over and not yet written total at most `max(max_pending_bytes, the largest
    single tensor)`; `write` waits while adding a tensor would go over `max_pending_bytes` (a larger tensor waits
    until nothing is pending, then goes alone). The thread drops each tensor once its bytes are written. Pending
    `copy_from_file` requests hold no tensor and do not count.

    `write` checks the name, shape and dtype at once (`ShardedSafetensorsWriter.check`). An error in the thread is
    raised again by the next `write` or by `finish`; `close` (always call it, e.g. in a `finally`, also after
    `KeyboardInterrupt`) stops the thread, drops what is still pending and, before a successful `finish`, removes the
    incomplete shard files.

    Args:
        writer (`ShardedSafetensorsWriter`): The planned writer; only the thread uses it until `finish`.
        max_pending_bytes (`int`, *optional*, defaults to 64 MB): The bound on pending bytes described above.
    """

    def __init__(self, writer: ShardedSafetensorsWriter, max_pending_bytes: int = DEFAULT_MAX_PENDING_BYTES) -> None:
        self.writer = writer
        self.max_pending_bytes = max_pending_bytes
        self._queue: collections.deque[_Pending] = collections.deque()
        self._pending_bytes = 0
        self._submitted: set[str] = set()
        self._error: BaseException | None = None
        self._stopping = False
        self._condition = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="peft-merge-ext-writer", daemon=True)
        self._thread.start()

    @property
    def total_size(self) -> int:
        """Bytes of all planned tensors."""
        return self.writer.total_size

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Queue one planned tensor for writing; the caller must not modify it afterwards.

        Raises:
            `ValueError`: As `ShardedSafetensorsWriter.write`, for this call.
            `BaseException`: The error that stopped the background thread, if any.
        """
        if name in self._submitted:
            raise ValueError(f"Tensor {name!r} was already written.")
        self._enqueue(_Pending(name, tensor, self.writer.check(name, tensor).nbytes))

    def copy_from_file(self, name: str, source: str | os.PathLike, offset: int) -> None:
        """Queue `ShardedSafetensorsWriter.copy_from_file(name, source, offset)` (holds no memory while pending).

        Raises:
            `ValueError`: When `name` is not planned or already written.
            `BaseException`: The error that stopped the background thread, if any.
        """
        if name in self._submitted:
            raise ValueError(f"Tensor {name!r} was already written.")
        self.writer.check_name(name)
        self._enqueue(_Pending(name, (source, offset), 0))

    def _enqueue(self, pending: _Pending) -> None:
        with self._condition:
            while (
                self._error is None
                and self._pending_bytes
                and self._pending_bytes + pending.nbytes > self.max_pending_bytes
            ):
                self._condition.wait()
            self._raise_error()
            if self._stopping:
                raise ValueError(f"This writer is closed; cannot write {pending.name!r}.")
            self._queue.append(pending)
            self._pending_bytes += pending.nbytes
            self._submitted.add(pending.name)
            self._condition.notify_all()

    def _raise_error(self) -> None:
        if self._error is not None:
            raise self._error

    def _run(self) -> None:
        while True:
            with self._condition:
                while not self._queue and not self._stopping:
                    self._condition.wait()
                if not self._queue:
                    return
                pending = self._queue[0]  # stays queued (and counted) while it is written
            try:
                if isinstance(pending.item, tuple):
                    self.writer.copy_from_file(pending.name, *pending.item)
                else:
                    self.writer.write(pending.name, pending.item)
            except BaseException as error:  # handed to the caller's thread
                with self._condition:
                    self._error = error
                    self._queue.clear()
                    self._pending_bytes = 0
                    self._condition.notify_all()
                return
            with self._condition:
                # `close` may have dropped the queue (and its byte count) while this item was written.
                if self._queue and self._queue[0] is pending:
                    self._queue.popleft()
                    self._pending_bytes -= pending.nbytes
                pending.item = None  # the tensor is freed once written
                self._condition.notify_all()

    def _stop(self, drop_pending: bool) -> None:
        with self._condition:
            if drop_pending:
                self._queue.clear()
                self._pending_bytes = 0
            self._stopping = True
            self._condition.notify_all()
        self._thread.join()

    def finish(self) -> list[str]:
        """Wait until every queued tensor is written, then `ShardedSafetensorsWriter.finish`.

        Returns:
            `list[str]`: The file names written.

        Raises:
            `BaseException`: The error that stopped the background thread, or `finish`'s own `ValueError`.
        """
        self._stop(drop_pending=False)
        self._raise_error()
        return self.writer.finish()

    def close(self) -> None:
        """Stop the thread (dropping pending tensors) and close the writer. Safe to call more than once."""
        self._stop(drop_pending=True)
        self.writer.close()

    def __enter__(self) -> BackgroundWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
