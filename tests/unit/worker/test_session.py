"""The worker session's report batching: one request in flight, the rest batched by count
and size."""
from __future__ import annotations

from twisted.internet import defer
from twisted.internet.task import Clock

from dsage.worker.session import REPORTS_BYTES, WorkerSession


class FakeProto:
    closed = False

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict, defer.Deferred]] = []

    def call(self, verb: str, **args) -> defer.Deferred:
        d = defer.Deferred()
        self.calls.append((verb, args, d))
        return d


class FakeWorker:
    def room(self) -> int:
        return 0

    def start_job(self, job: dict) -> None:
        raise AssertionError("no jobs expected")


def report(job_id: int, size: int) -> dict:
    return {"job_id": job_id, "attempt": 1, "outcome": "completed", "result": bytes(size), "output": ""}


def test_reports_wait_for_the_one_in_flight_then_go_together_within_the_size_limit():
    """While a report request is answered, finished jobs queue; then they go in as few
    requests as the byte limit allows (one oversized report still goes alone)."""
    proto = FakeProto()
    session = WorkerSession(proto, FakeWorker(), Clock())
    session.send_report(report(1, 10))
    big = REPORTS_BYTES // 2 + 1
    for job_id, size in ((2, 10), (3, 10), (4, big), (5, big), (6, 3 * REPORTS_BYTES)):
        session.send_report(report(job_id, size))
    sent = []
    while len(sent) < len(proto.calls):
        verb, args, d = proto.calls[len(sent)]
        sent.append([r["job_id"] for r in args["reports"]])
        d.callback({"applied": [True] * len(args["reports"]), "jobs": []})
    assert sent == [[1], [2, 3, 4], [5], [6]]
    assert not session.reporting and session.outbox == []
