"""Syncer: a server's store on a real FileStorage commits in the caller's thread (the
reactor's) and acknowledges commits only once fsynced; other storages get a writer thread."""
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

    def __init__(self, monkeypatch, inline: bool = False) -> None:
        if not inline:                  # every fsync in the syncer's thread
            monkeypatch.setattr(syncer, "INLINE_FSYNC", 0.0)
        self.real = os.fsync
        self.calls: queue.SimpleQueue = queue.SimpleQueue()
        self.go = threading.Semaphore(0)
        self.error: OSError | None = None
        self.inline = 0
        monkeypatch.setattr(os, "fsync", self.fsync)

    def fsync(self, fd: int) -> None:
        if threading.current_thread().name != "dsage-fsync":
            self.inline += 1
            if self.error is not None:
                raise self.error
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
    reactor.turn()
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
    """While one fsync runs, the next operations are committed; a second fsync then covers
    them all, and the acknowledgements keep their order."""
    store, reactor = threaded
    disk = Disk(monkeypatch)
    store.start()
    first = store.submit("a", [spec("first")])
    reactor.turn()
    disk.calls.get(timeout=10)
    more = []
    for i in range(5):                  # each in a turn of its own: a commit of its own
        more.append(store.submit("a", [spec(str(i))]))
        reactor.turn()
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


def test_with_nothing_waiting_for_the_syncer_a_commit_is_fsynced_in_the_reactors_thread(threaded, monkeypatch):
    """A quiet server fsyncs a commit in its own thread and answers in the same turn (no
    hand-off to the syncer's thread and back); a read has no fsync to wait for."""
    store, reactor = threaded
    disk = Disk(monkeypatch, inline=True)
    store.start()
    before = disk.inline                    # the root's creation, before the syncer started
    d = store.submit("a", [spec()])
    reactor.turn()
    assert d.called and value(d) == [1]
    assert disk.inline == before + 1 and disk.calls.empty()
    status = store.status()
    reactor.turn()
    assert value(status) == {"new": 1} and disk.inline == before + 1


def test_while_the_syncer_has_commits_in_hand_later_ones_wait_their_turn(threaded, monkeypatch):
    """A commit made while the syncer's thread still fsyncs an earlier one goes to it too,
    so that acknowledgements keep their order; a slow disk always gets the thread."""
    store, reactor = threaded
    disk = Disk(monkeypatch, inline=True)
    store.start()
    before = disk.inline
    store._syncer.fsync_time = 1.0          # a slow disk: the syncer's thread fsyncs
    first = store.submit("a", [spec("first")])
    reactor.turn()
    disk.calls.get(timeout=10)
    store._syncer.fsync_time = 0.0          # quick again, but the first is still in hand
    second = store.submit("a", [spec("second")])
    reactor.turn()
    assert not first.called and not second.called and disk.inline == before
    order = []
    for d in (first, second):
        d.addCallback(lambda ids: (order.append(ids[0]), ids)[1])
    disk.go.release()
    disk.go.release()
    reactor.drain(second)
    assert order == [1, 2] and disk.inline == before
    third = store.submit("a", [spec("third")])    # nothing in hand now
    reactor.turn()
    assert value(third) == [3] and disk.inline == before + 1


def test_a_commit_waits_behind_one_fsynced_but_not_yet_acknowledged(threaded, monkeypatch):
    """The syncer's thread has fsynced the first commit and handed it to the reactor, which
    has not fired it yet when it commits the next: that one is not answered first."""
    store, reactor = threaded
    disk = Disk(monkeypatch, inline=True)
    store.start()
    store._syncer.fsync_time = 1.0
    first = store.submit("a", [spec("first")])
    reactor.turn()
    disk.calls.get(timeout=10)
    disk.go.release()
    deadline = time.monotonic() + 10
    while reactor.calls.empty() and time.monotonic() < deadline:
        threading.Event().wait(0.001)       # the first's results, handed back
    store._syncer.fsync_time = 0.0
    second = store.submit("a", [spec("second")])
    store._flush()                          # the reactor commits before it runs the hand-back
    assert not first.called and not second.called
    order = []
    for d in (first, second):
        d.addCallback(lambda ids: (order.append(ids[0]), ids)[1])
    disk.go.release()
    reactor.drain(second)
    assert order == [1, 2]


def test_a_failed_fsync_in_the_reactors_thread_refuses_its_batch_and_every_request_after(threaded, monkeypatch):
    """The same promise when the commit was fsynced in the reactor's thread."""
    store, reactor = threaded
    disk = Disk(monkeypatch, inline=True)
    store.start()
    disk.error = OSError(errno.EIO, "Input/output error")
    d = store.submit("a", [spec()])
    reactor.turn()
    with pytest.raises(errors.RemoteError, match="failed to make this request durable: Input/output error"):
        value(d)
    later = store.status()
    reactor.turn()
    with pytest.raises(errors.RemoteError, match="refuses every request until restarted"):
        value(later)


def test_the_operations_of_one_turn_share_a_commit(threaded):
    """Requests that come in one turn of the reactor are committed together."""
    store, reactor = threaded
    store.start()
    before = len(list(store.db.storage.iterator()))
    ds = [store.submit("a", [spec(str(i))]) for i in range(3)]
    assert len(list(store.db.storage.iterator())) == before, "nothing committed before the turn ends"
    reactor.turn()
    reactor.drain(ds[-1])
    assert [value(d) for d in ds] == [[1], [2], [3]]
    assert len(list(store.db.storage.iterator())) == before + 1, "one transaction for the three"


def test_a_failed_fsync_refuses_what_it_covered_and_every_request_after(threaded, monkeypatch):
    """An fsync error means the commit may not be on the disk: its requester and everyone
    after are told so, nothing is acknowledged as stored."""
    store, reactor = threaded
    disk = Disk(monkeypatch)
    store.start()
    disk.error = OSError(errno.EIO, "Input/output error")
    d = store.submit("a", [spec()])
    disk.go.release()
    reactor.drain(d)
    with pytest.raises(errors.RemoteError, match="failed to make this request durable: Input/output error"):
        value(d)
    later = store.status()
    reactor.drain(later)
    with pytest.raises(errors.RemoteError, match="refuses every request until restarted"):
        value(later)


def test_an_operation_asked_for_while_one_commits_runs_after_it(threaded):
    """A lease's early hook runs before its commit; an operation it asks for (a lease for a
    slot that has gone is given back) waits for that commit and sees what it wrote."""
    store, reactor = threaded
    store.start()
    inner = []
    d = store.submit_and_claim("a", [spec("x"), spec("y")], None, None, None, [("w1", 1)], 60.0,
                               early=lambda out: inner.append(store.status()))
    reactor.turn()
    assert len(inner) == 1 and not inner[0].called
    reactor.drain(d)
    out = value(d)
    assert out["ids"] == [1, 2] and [j["job_id"] for j in out["claims"][0]] == [1]
    reactor.drain(inner[0])
    assert value(inner[0]) == {"new": 1, "processing": 1}


def test_other_storages_get_a_writer_thread(tmp_path):
    """Without a FileStorage (ZEO, RelStorage commit over the network) operations go to a
    thread of the store's, batched, and fire through the reactor."""
    from ZODB.MappingStorage import MappingStorage

    reactor = ThreadReactor()
    store = JobStore(ZODB.DB(MappingStorage()), reactor=reactor)
    store.start()
    try:
        assert store._syncer is None and store._thread is not None
        d = store.submit("a", [spec(), spec()])
        reactor.drain(d)
        assert value(d) == [1, 2]
        assert store._thread.name == "dsage-zodb"
    finally:
        store.stop()


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
