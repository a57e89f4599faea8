"""Syncer: a threaded store on a real FileStorage acknowledges commits only once fsynced."""
from __future__ import annotations

import errno
import os
import queue
import threading
import time

import pytest
import ZODB
from ZODB.FileStorage import FileStorage

from dsage import errors
from dsage.server import syncer
from dsage.server.store import JobStore
from tests.support.store import ThreadReactor, spec, value


class Disk:
    """os.fsync as the syncer's thread sees it: each call waits until let go (or fails)."""

    def __init__(self, monkeypatch) -> None:
        self.real = os.fsync
        self.calls: queue.SimpleQueue = queue.SimpleQueue()
        self.go = threading.Semaphore(0)
        self.error: OSError | None = None
        self.inline = 0
        monkeypatch.setattr(os, "fsync", self.fsync)

    def fsync(self, fd: int) -> None:
        if threading.current_thread().name != "dsage-fsync":
            self.inline += 1
            return self.real(fd)
        self.calls.put(fd)
        self.go.acquire()
        if self.error is not None:
            raise self.error
        self.real(fd)


@pytest.fixture
def threaded(tmp_path):
    reactor = ThreadReactor()
    store = JobStore(ZODB.DB(FileStorage(str(tmp_path / "d.fs"))), reactor=reactor)
    yield store, reactor
    store.stop()


def fired(reactor: ThreadReactor, timeout: float = 0.3) -> bool:
    """Whether the store's threads handed anything back within `timeout`."""
    try:
        f, args, kw = reactor.calls.get(timeout=timeout)
    except queue.Empty:
        return False
    f(*args, **kw)
    return True


def test_a_submission_is_acknowledged_only_after_the_fsync_of_its_commit(threaded, monkeypatch):
    """The commit is written (another connection sees it) but not acknowledged until the
    syncer's fsync returns; FileStorage no longer fsyncs inline."""
    store, reactor = threaded
    disk = Disk(monkeypatch)
    store.start()
    d = store.submit("a", [spec()])
    disk.calls.get(timeout=10)
    assert not fired(reactor) and not d.called
    conn = store.db.open()
    try:
        assert conn.root()["dsage"].jobs[1].status == "new"
    finally:
        conn.close()
    disk.go.release()
    reactor.drain(d)
    assert value(d) == [1] and disk.inline == 0


def test_one_fsync_covers_the_commits_made_while_the_disk_worked(threaded, monkeypatch):
    """While one fsync runs, the store's thread commits the next batches; a second fsync
    then covers them all, and the acknowledgements keep their order."""
    store, reactor = threaded
    disk = Disk(monkeypatch)
    store.start()
    first = store.submit("a", [spec("first")])
    disk.calls.get(timeout=10)
    more = []
    for i in range(5):
        more.append(store.submit("a", [spec(str(i))]))
        while store._queue.qsize():     # each its own batch: the writer takes it before the next
            threading.Event().wait(0.001)
    deadline = time.monotonic() + 10
    while store._syncer._queue.qsize() < 5 and time.monotonic() < deadline:
        threading.Event().wait(0.001)
    disk.go.release()
    disk.go.release()
    order = []
    for d in [first, *more]:
        d.addCallback(lambda ids: (order.append(ids[0]), ids)[1])
    reactor.drain(more[-1])
    assert order == [1, 2, 3, 4, 5, 6]
    assert disk.calls.qsize() == 1      # the second fsync, for the five later commits


def test_a_failed_fsync_refuses_what_it_covered_and_every_request_after(threaded, monkeypatch):
    """An fsync error means the commit may not be on the disk: its requester and everyone
    after are told so, nothing is acknowledged as stored."""
    store, reactor = threaded
    disk = Disk(monkeypatch)
    disk.error = OSError(errno.EIO, "Input/output error")
    store.start()
    d = store.submit("a", [spec()])
    disk.go.release()
    reactor.drain(d)
    with pytest.raises(errors.RemoteError, match="failed to make this request durable: Input/output error"):
        value(d)
    later = store.status()
    reactor.drain(later)
    with pytest.raises(errors.RemoteError, match="refuses every request until restarted"):
        value(later)


def test_only_the_syncers_storage_skips_its_inline_fsync(tmp_path, monkeypatch):
    """Another FileStorage in the process still fsyncs in its commits, and the storage
    fsyncs inline again once its syncer stopped."""
    ours, other = FileStorage(str(tmp_path / "ours.fs")), FileStorage(str(tmp_path / "other.fs"))
    synced = []
    monkeypatch.setattr(os, "fsync", synced.append)
    s = syncer.Syncer(ours, lambda item: None)
    s.start()
    try:
        syncer._fs_module.fsync(ours._file.fileno())
        syncer._fs_module.fsync(other._file.fileno())
        assert synced == [other._file.fileno()]
    finally:
        s.stop()
    syncer._fs_module.fsync(ours._file.fileno())
    assert synced == [other._file.fileno(), ours._file.fileno()]
    ours.close()
    other.close()


def test_the_filestorage_under_a_blob_storage_is_found(tmp_path):
    from ZODB.blob import BlobStorage
    from ZODB.MappingStorage import MappingStorage

    fs = FileStorage(str(tmp_path / "d.fs"))
    try:
        assert syncer.file_storage(BlobStorage(str(tmp_path / "blobs"), fs)) is fs
        assert syncer.file_storage(fs) is fs
        assert syncer.file_storage(MappingStorage()) is None
    finally:
        fs.close()
