"""Maintenance: old finished jobs expire and the FileStorage is packed when it has grown."""
from __future__ import annotations

import ZODB
from twisted.internet import defer
from twisted.internet.task import Clock
from ZODB.FileStorage import FileStorage

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
