"""Stores for tests: in memory (with blob support) or a real FileStorage file."""
from __future__ import annotations

import queue

import ZODB
from ZODB.blob import BlobStorage
from ZODB.MappingStorage import MappingStorage

from dsage.server.store import JobStore


class FakeTime:
    """A settable clock for the store."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def memory_store(tmp_path, now: FakeTime | None = None, ticks: FakeTime | None = None) -> JobStore:
    """A synchronous JobStore on MappingStorage with blobs in `tmp_path`; its leases' clock
    (`ticks`) is its wall clock (`now`) unless a test gives it one of its own."""
    db = ZODB.DB(BlobStorage(str(tmp_path / "blobs"), MappingStorage()))
    now = now or FakeTime()
    return JobStore(db, threaded=False, now=now, ticks=ticks or now)


def value(d):
    """The result of an already-fired Deferred (raising its failure)."""
    out = []
    d.addBoth(out.append)
    assert out, "the Deferred has not fired"
    if hasattr(out[0], "raiseException"):
        out[0].raiseException()
    return out[0]


def spec(code: str = "1 + 1", **kw) -> dict:
    """A submission as a client sends it."""
    base = {"kind": "code", "payload": code.encode(), "name": code, "timeout": 600.0, "priority": 5,
            "max_failures": 3, "files": {}}
    base.update(kw)
    return base


def reported(job: dict, outcome: str = "completed", **fields) -> dict:
    """A worker's report on a leased job (its id, attempt and lease token) and its outcome."""
    return {"job_id": job["job_id"], "attempt": job["attempt"], "lease": job["lease"], "outcome": outcome, **fields}


class ThreadReactor:
    """Enough of a reactor for a server's store: calls from its threads, and its calls for
    the next turn, wait in a queue that the test runs."""

    def __init__(self) -> None:
        self.calls = queue.SimpleQueue()

    def callFromThread(self, f, *args, **kw) -> None:
        self.calls.put((f, args, kw))

    def callLater(self, delay: float, f, *args, **kw) -> None:
        self.calls.put((f, args, kw))

    def turn(self) -> None:
        """Run what waits now (the end of a turn of the reactor: the store commits)."""
        for _ in range(self.calls.qsize()):
            f, args, kw = self.calls.get_nowait()
            f(*args, **kw)

    def drain(self, d) -> None:
        """Run what the store's threads hand back until `d` has a result."""
        done: list = []
        d.addBoth(lambda r: (done.append(r), r)[1])
        while not done:
            f, args, kw = self.calls.get(timeout=10)
            f(*args, **kw)
