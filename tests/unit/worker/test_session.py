"""The worker session: one take waiting at a time; report batching (one request in flight,
the rest batched by count and size); heartbeats."""
from __future__ import annotations

from twisted.internet import defer
from twisted.internet.task import Clock

from dsage import errors
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


def test_heartbeats_carry_output_and_a_refused_one_is_logged():
    """A heartbeat holds the leases and the running jobs' new output (all of it on a new
    connection's first); the server refusing one is logged, a lost link is not."""
    from twisted.logger import globalLogPublisher

    class Worker(FakeWorker):
        def held(self):
            return [[1, 1, 7]]

        def live_output(self, again=False):
            return [[1, 1, 7, "all so far" if again else "more"]]

    proto = FakeProto()
    session = WorkerSession(proto, Worker(), Clock())
    logged = []
    globalLogPublisher.addObserver(logged.append)
    try:
        session.beat()
        session.beat()
        session.beat()
        [(_, first, d1), (_, second, d2), (_, _, d3)] = proto.calls
        assert first == {"held": [[1, 1, 7]], "output": [[1, 1, 7, "all so far"]]}
        assert second["output"] == [[1, 1, 7, "more"]]
        d1.callback({"lost": []})
        d2.errback(errors.ConnectionLost("gone"))
        assert not [e for e in logged if "refused a heartbeat" in e.get("log_format", "")]
        d3.errback(errors.RemoteError("output must be [[job_id, attempt, lease, text], ...]"))
        assert [e for e in logged if "refused a heartbeat" in e.get("log_format", "")]
    finally:
        globalLogPublisher.removeObserver(logged.append)


def test_one_take_waits_at_a_time_and_the_next_asks_for_all_the_room():
    """Room that opens while a take waits (jobs ending, prefetch growing) is asked for when
    that take is answered, in one take: not in a take per job, each of which the server's
    dispatcher would look at for every new job."""

    class Worker(FakeWorker):
        free = 2

        def room(self):
            return self.free

        def start_job(self, job):
            self.free -= 1

    worker = Worker()
    proto = FakeProto()
    session = WorkerSession(proto, worker, Clock())
    session.ask()
    worker.free = 130                   # short jobs ended: the automatic prefetch opened
    session.ask()
    session.ask()
    assert [(verb, args) for verb, args, _ in proto.calls] == [("take", {"n": 2})]
    proto.calls[0][2].callback([{"job_id": 1}])
    assert [(verb, args) for verb, args, _ in proto.calls[1:]] == [("take", {"n": 129})]
    proto.calls[1][2].errback(errors.ConnectionLost("gone"))
    assert session.asking == 0 and not session.taking


def test_a_refused_take_is_asked_again_after_take_retry():
    """A take the server refuses (an error, not a lost link) is logged and asked again
    TAKE_RETRY s later: it was the worker's one take, and an idle worker would wait forever."""
    from twisted.logger import globalLogPublisher

    from dsage.worker.session import TAKE_RETRY

    class Worker(FakeWorker):
        def room(self):
            return 2

    clock, proto = Clock(), FakeProto()
    session = WorkerSession(proto, Worker(), clock)
    logged = []
    globalLogPublisher.addObserver(logged.append)
    try:
        session.ask()
        proto.calls[0][2].errback(errors.RemoteError("the server had a bad moment"))
    finally:
        globalLogPublisher.removeObserver(logged.append)
    assert [e for e in logged if e.get("log_format") == "take failed"]
    assert len(proto.calls) == 1
    clock.advance(TAKE_RETRY)
    assert [(verb, args) for verb, args, _ in proto.calls[1:]] == [("take", {"n": 2})]


def test_the_servers_requests_reach_the_worker_and_nothing_else_does():
    """`unqueue` with a lease key [job id, attempt, token] asks the worker to give the job
    up; `output` with [job id, attempt] asks for the end of a running job's output; a
    malformed one, or another request, is refused as unknown."""
    import pytest

    from dsage.worker.session import WorkerProtocol

    asked = []

    class Worker:
        def unqueue(self, key):
            asked.append(key)
            return key[0] == 7

        def output_of(self, job_id, attempt):
            asked.append(("output", job_id, attempt))
            return "so far\n" if job_id == 7 else None

    proto = WorkerProtocol()
    proto.factory = type("Factory", (), {"worker": Worker()})()
    assert proto.handle_request("unqueue", {"held": [7, 1, 99]}) == {"removed": True}
    assert proto.handle_request("unqueue", {"held": [8, 1, 99]}) == {"removed": False}
    assert proto.handle_request("output", {"job": [7, 2]}) == {"output": "so far\n"}
    assert proto.handle_request("output", {"job": [8, 2]}) == {"output": None}
    for verb, args in (("unqueue", {"held": [7, 1]}), ("unqueue", {"held": [7, 1, "x"]}),
                       ("unqueue", None), ("take", {"held": [7, 1, 99]}), ("output", {"job": [7, 1, 99]}),
                       ("output", {"held": [7, 1]}), ("output", {"job": [7, None]})):
        with pytest.raises(errors.ProtocolError):
            proto.handle_request(verb, args)
    assert asked == [(7, 1, 99), (8, 1, 99), ("output", 7, 2), ("output", 8, 2)]
