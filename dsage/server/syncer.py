"""FileStorage commits made durable by a thread of their own (group commit across transactions).

FileStorage fsyncs its file inside each commit, holding its locks, so the store's thread
could apply nothing else meanwhile (an fsync is 0.15 ms of this VM's disk, and in the latency
loop the report of a job often waited behind its submission's fsync).  With a `Syncer`, a
commit returns once its transaction is written to the file (flushed to the operating system,
not yet on the disk); the syncer's thread then fsyncs the file and only after that hands
over the batches committed before it, in their order.  Nothing is acknowledged before it is
on the disk, one fsync may cover several commits, and the store's thread goes on with the
next batch while the disk works.  A read answered meanwhile waits for the same fsync (it may
have seen a commit not yet durable).

While no earlier commit waits for its acknowledgement, a commit is fsynced in the
committer's own thread instead, as long as the disk's fsyncs stay short (`quick`,
`INLINE_FSYNC`): waking the syncer's thread and then the reactor's cost this VM more than a
quiet fsync blocks the reactor (same-process A/B, the latency loop: 4.16/4.23 -> 3.91 ms;
throughput and payload unchanged), and a read with nothing to wait for is answered at once.
"""
from __future__ import annotations

import importlib
import os
import queue
import threading
import time
from typing import Any, Callable

from twisted.logger import Logger

_fs_module = importlib.import_module("ZODB.FileStorage.FileStorage")
#: the storages whose fsyncs a running Syncer does, by id (a plain dict: `_fsync` runs at
#: every commit, and a WeakSet's iteration was 2% of the server's time in the latency loop).
_deferred: dict[int, Any] = {}
_STOP = object()
#: fsyncs are done in the committer's thread when nothing waits for the syncer's and they
#: take less than this (seconds, a moving average); a slower disk always gets the thread.
INLINE_FSYNC = 0.002


def _fsync(fd: int) -> None:
    """FileStorage's fsync: left to the Syncer of a storage that has one."""
    for storage in _deferred.values():
        file = getattr(storage, "_file", None)
        if file is not None and not file.closed and file.fileno() == fd:
            return
    os.fsync(fd)


def file_storage(storage: Any) -> Any | None:
    """The FileStorage under `storage` (itself, or the one a BlobStorage wraps), else None."""
    inner = vars(storage).get("_BlobStorage__storage", storage)    # ZODB.blob.BlobStorage
    return inner if isinstance(inner, _fs_module.FileStorage) else None


class Syncer:
    """Fsyncs a FileStorage after its commits, then calls `done(item)` for each item put
    before that fsync (in the syncer's thread)."""

    log = Logger()

    def __init__(self, storage: Any, done: Callable[[Any], None]) -> None:
        self.storage = storage
        self.done = done
        self.failed: OSError | None = None
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self.fsync_time = 0.0           # moving average of an fsync's duration

    def start(self) -> None:
        """Take over the storage's fsyncs."""
        _fs_module.fsync = _fsync
        _deferred[id(self.storage)] = self.storage
        self._thread = threading.Thread(target=self._loop, name="dsage-fsync", daemon=True)
        self._thread.start()

    def put(self, item: Any, wrote: bool) -> None:
        """Hand over `item` once everything committed so far is on the disk (`wrote`: this
        item's own batch committed something)."""
        self._queue.put((item, wrote))

    @property
    def quick(self) -> bool:
        """Whether the disk's fsyncs are short enough to make in the committer's thread."""
        return self.fsync_time < INLINE_FSYNC

    def stop(self) -> None:
        """Sync and hand over what is queued, then give the fsyncs back to the storage."""
        if self._thread is not None:
            self._queue.put(_STOP)
            self._thread.join()
            self._thread = None
        _deferred.pop(id(self.storage), None)

    def _loop(self) -> None:
        while True:
            entries = [self._queue.get()]
            while True:
                try:
                    entries.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            stop = _STOP in entries
            entries = [e for e in entries if e is not _STOP]
            if any(wrote for _, wrote in entries):
                self.sync()
            for item, _ in entries:
                self.done(item)
            if stop:
                return

    def sync(self) -> None:
        """One fsync of the storage's file (the file it has now: a pack may have replaced it),
        in the syncer's thread or, while no commit waits for it, the committer's (see
        `JobStore._flush`); a failure is kept in `failed`."""
        try:
            with self.storage._lock:
                fd = os.dup(self.storage._file.fileno())
            start = time.monotonic()
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
                self.fsync_time += (time.monotonic() - start - self.fsync_time) / 8
        except OSError as e:
            # What was written may not be on the disk: nothing more is acknowledged.
            self.log.critical("fsync of the database failed: {error}; restart the server", error=e)
            self.failed = e
