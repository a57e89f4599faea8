"""Maintenance: old finished jobs expire, the FileStorage is packed when it has grown, and its
index is saved as it grows."""
from __future__ import annotations

import shutil

import ZODB
from twisted.internet import defer
from twisted.internet.task import Clock
from ZODB.FileStorage import FileStorage
from ZODB.fsIndex import fsIndex

from dsage.server.maintenance import Maintenance
from dsage.server.store import JobStore
from tests.support.store import FakeTime, reported, spec, value


def run(maintenance: Maintenance) -> dict:
    return value(defer.Deferred.fromCoroutine(maintenance.run_once()))


def cycle(store: JobStore, n: int = 100) -> None:
    """A day's load: n jobs submitted, run and finished with a result and output."""
    value(store.submit("a", [spec(f"x = {i}", max_failures=1) for i in range(n)]))
    for job in value(store.claim([("w1", n)], 60.0))[0]:
        value(store.report("w1", reported(job, result=b"R" * 1000, output="o" * 1000)))


def test_expiry_and_pack_keep_the_file_bounded_under_steady_load(tmp_path):
    """Day after day of load: old jobs expire, the file is packed when it has doubled, and
    its size stays flat; without maintenance it grows every day."""
    sizes = {}
    for keep in (1.0, 0.0):
        now = FakeTime()
        store = JobStore(ZODB.DB(FileStorage(str(tmp_path / f"d{keep}.fs"))), threaded=False, now=now)
        maintenance = Maintenance(store, Clock(), keep_days=keep, pack_growth=2.0 if keep else 0.0,
                                  pack_min_mb=0.0, interval=60.0)
        maintenance.running = True
        sizes[keep], packs, expired = [], 0, 0
        try:
            for day in range(12):
                cycle(store)
                out = run(maintenance)
                packs += out["packed"] is not None
                expired += out["expired"]
                sizes[keep].append(store.size())
                now.now += 86400 * 1.01
            assert value(store.status())["completed"] == (100 if keep else 1200)
        finally:
            store.stop()
        if keep:
            assert expired == 1100 and packs >= 3
    bounded, unbounded = sizes[1.0], sizes[0.0]
    assert max(bounded[4:]) <= 1.1 * max(bounded[:4]), bounded
    assert unbounded[-1] > 2.5 * max(bounded), (bounded, unbounded)


def test_no_expiry_when_keep_days_is_zero(tmp_path):
    """keep_days = 0 keeps finished jobs forever."""
    now = FakeTime()
    store = JobStore(ZODB.DB(FileStorage(str(tmp_path / "d.fs"))), threaded=False, now=now)
    maintenance = Maintenance(store, Clock(), keep_days=0.0, pack_growth=0.0, pack_min_mb=0.0, interval=60.0)
    maintenance.running = True
    try:
        value(store.submit("a", [spec(max_failures=1)]))
        job = value(store.claim([("w1", 1)], 60.0))[0][0]
        value(store.report("w1", reported(job, result=b"")))
        now.now += 1000 * 86400
        assert run(maintenance) == {"expired": 0, "packed": None}
        assert value(store.status())["completed"] == 1
    finally:
        store.stop()


def saved_index_pos(fs_path) -> int:
    """The file position FileStorage's index file covers: a start reads the records after it."""
    return int(fsIndex.load(str(fs_path) + ".index")["pos"])


def test_index_is_saved_as_the_file_grows_so_a_start_after_a_crash_reads_little(tmp_path):
    """FileStorage saves its index only when it closes: after a crash, a start reads every
    record since.  The maintenance saves it once the file has grown, and a copy of the files
    taken without closing (a crash) opens from that index with every job in it."""
    path = tmp_path / "d.fs"
    store = JobStore(ZODB.DB(FileStorage(str(path))), threaded=False, now=FakeTime())
    maintenance = Maintenance(store, Clock(), keep_days=0.0, pack_growth=0.0, pack_min_mb=0.0, interval=60.0)
    try:
        at_open = saved_index_pos(path)
        assert maintenance.save_index()                     # the first tick saves
        cycle(store, 300)
        assert saved_index_pos(path) < store.size()
        assert maintenance.save_index()
        assert saved_index_pos(path) == store.size()
        assert not maintenance.save_index()                 # has not grown since
        crashed = tmp_path / "crashed"
        crashed.mkdir()
        for name in ("d.fs", "d.fs.index"):
            shutil.copy(tmp_path / name, crashed / name)
    finally:
        store.stop()
    fs = FileStorage(str(crashed / "d.fs"))
    assert fs._used_index and at_open < fs._pos == saved_index_pos(crashed / "d.fs")
    reopened = JobStore(ZODB.DB(fs), threaded=False)
    try:
        assert value(reopened.status())["completed"] == 300
    finally:
        reopened.stop()


def test_index_is_not_saved_for_other_storages():
    """A storage without an index file of ours (here a MappingStorage) is left alone."""
    store = JobStore(ZODB.DB(None), threaded=False)
    maintenance = Maintenance(store, Clock(), keep_days=0.0, pack_growth=0.0, pack_min_mb=0.0, interval=60.0)
    try:
        cycle(store, 10)
        assert not maintenance.save_index()
    finally:
        store.stop()
