"""The worker's side of its job processes: output capping, the processes and their pipes."""
from __future__ import annotations

from dsage.worker.runner import OUTPUT_MARKER, OutputBuffer


def test_output_keeps_head_and_tail():
    """Past the limit the middle is dropped and marked."""
    buf = OutputBuffer(100)
    buf.write(b"H" * 60)
    for _ in range(100):
        buf.write(b"m" * 10)
    buf.write(b"T" * 50)
    text = buf.text()
    assert text.startswith("H" * 50) and text.endswith("T" * 50)
    assert OUTPUT_MARKER.decode() in text and buf.dropped > 0


def test_small_output_is_kept_whole():
    """Under the limit nothing is dropped or marked."""
    buf = OutputBuffer(100)
    buf.write("héllo\n".encode())
    assert buf.text() == "héllo\n"


def test_recent_output_is_the_end_with_a_marker_when_cut():
    """What a heartbeat shows of a running job: its output so far, or the end of it."""
    from dsage.worker.runner import LIVE_MARKER

    buf = OutputBuffer(1000)
    buf.write(b"line 1\n")
    assert buf.recent(100) == "line 1\n"
    for i in range(2, 200):
        buf.write(f"line {i}\n".encode())
    assert buf.recent(30) == LIVE_MARKER.decode() + buf.text()[-30:] and buf.text().endswith("line 199\n")
    assert buf.total == 7 * 9 + 8 * 90 + 9 * 100


class FakeProcess:
    """The transport of a child process that never starts."""

    pid = None
    pipes: dict = {}

    def __init__(self) -> None:
        self.written: list[bytes] = []
        self.stdin_closed = False

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def writeSequence(self, parts: list[bytes]) -> None:
        self.written.append(b"".join(parts))

    def closeStdin(self) -> None:
        self.stdin_closed = True


class FakeTimer:
    def active(self) -> bool:
        return True

    def cancel(self) -> None:
        pass


class SpawningReactor:
    """Records the children a JobRunner starts."""

    def __init__(self) -> None:
        self.spawned: list = []
        self.now = 0.0

    def seconds(self) -> float:
        self.now += 1.0
        return self.now

    def spawnProcess(self, proto, *args, **kw):
        process = FakeProcess()
        proto.makeConnection(process)
        self.spawned.append(proto)
        return process

    def callLater(self, *args, **kw) -> FakeTimer:
        return FakeTimer()


def finish(child, attempt) -> None:
    """Play the child's end of a successful job."""
    import struct

    import msgpack

    frame = msgpack.packb({"ok": True, "result": b"r", "clean": True, "cpu_time": 0.0})
    child.childDataReceived(1, attempt.sentinel)
    child.childDataReceived(2, attempt.sentinel)
    child.childDataReceived(3, struct.pack("!I", len(frame)) + frame)


def test_a_retiring_child_has_a_successor_ready(monkeypatch):
    """A child is replaced after JOBS_PER_CHILD jobs; its successor starts WARM_AHEAD jobs
    earlier, so the job after the last one goes to a child already running."""
    from dsage.worker import runner as runner_module

    monkeypatch.setattr(runner_module, "JOBS_PER_CHILD", 6)
    monkeypatch.setattr(runner_module, "WARM_AHEAD", 2)
    reactor = SpawningReactor()
    runner = runner_module.JobRunner(reactor)
    reports = []
    for n in range(1, 8):
        job = {"job_id": n, "attempt": 1, "timeout": 60.0, "kind": "code", "payload": b"1", "name": "j"}
        runner.run(job).addCallback(reports.append)
        attempt, child = runner.running[(n, 1, 0)]
        finish(child, attempt)
        if n == 4:
            assert len(reactor.spawned) == 2, "the successor starts two jobs before the end"
        if n == 6:
            assert child.transport.stdin_closed, "retired after six jobs"
            assert child is reactor.spawned[0]
    assert [r["outcome"] for r in reports] == ["completed"] * 7
    assert len(reactor.spawned) == 2, "job 7 ran in the successor, started in advance"
    assert runner.running == {} and reactor.spawned[1] in runner.idle


def test_two_leases_of_one_attempt_are_kept_apart_by_their_tokens():
    """A lease delivered before a commit that failed, and the new lease of the same attempt:
    both run, are held and reported under their own tokens, and a lost one is stopped alone."""
    from dsage.worker.runner import JobRunner

    runner = JobRunner(SpawningReactor())
    reports = []
    for token in (11, 22):
        job = {"job_id": 5, "attempt": 1, "lease": token, "timeout": 60.0, "kind": "code", "payload": b"1",
               "name": "j"}
        runner.run(job).addCallback(reports.append)
    assert sorted(runner.held()) == [[5, 1, 11], [5, 1, 22]]
    assert runner.kill(5, 1, 33) is False
    assert runner.kill(5, 1, 11) is True
    void, _ = runner.running[(5, 1, 11)]
    assert void.reason == "killed" and runner.running[(5, 1, 22)][0].reason is None
    attempt, child = runner.running[(5, 1, 22)]
    finish(child, attempt)
    assert [(r["lease"], r["outcome"]) for r in reports] == [(22, "completed")]


def test_live_output_is_sent_when_it_grew():
    """Each running job's output goes with the next heartbeat once it has grown; a new
    connection's first heartbeat carries every job's again."""
    from dsage.worker.runner import JobRunner

    runner = JobRunner(SpawningReactor())
    for job_id in (1, 2):
        runner.run({"job_id": job_id, "attempt": 1, "lease": 7, "timeout": 60.0, "kind": "code",
                    "payload": b"1", "name": "j"})
    one, child = runner.running[(1, 1, 7)]
    assert runner.live_output() == []
    child.childDataReceived(1, b"working\n")
    assert runner.live_output() == [[1, 1, 7, "working\n"]]
    assert runner.live_output() == []
    child.childDataReceived(2, b"warning\n")
    assert runner.live_output() == [[1, 1, 7, "working\nwarning\n"]]
    assert runner.live_output(again=True) == [[1, 1, 7, "working\nwarning\n"]]
    finish(child, one)
    assert runner.live_output(again=True) == []


def test_a_job_and_its_outcome_cross_the_pipes_as_frames():
    """The payload follows the job's description as a frame of its own; an outcome that
    comes back in 8 KiB reads (Twisted's), its frame split anywhere, is whole once its last
    byte is there, also when it is 16 MiB."""
    import struct

    import msgpack

    from dsage.worker.runner import JobRunner

    runner = JobRunner(SpawningReactor())
    reports = []
    payload = bytes(range(256)) * 4096
    runner.run({"job_id": 7, "attempt": 1, "lease": 3, "timeout": 60.0, "kind": "callable",
                "payload": payload, "name": "j"}).addCallback(reports.append)
    attempt, child = runner.running[(7, 1, 3)]
    sent = child.transport.written[-1]
    (n,) = struct.unpack_from("!I", sent)
    described = msgpack.unpackb(sent[4:4 + n])
    assert described["job_id"] == 7 and "payload" not in described
    assert sent[4 + n:] == struct.pack("!I", len(payload)) + payload

    result = b"x" * (16 << 20)
    frame = msgpack.packb({"ok": True, "result": result, "clean": True, "cpu_time": 0.5})
    stream = struct.pack("!I", len(frame)) + frame
    child.childDataReceived(1, attempt.sentinel)
    child.childDataReceived(2, attempt.sentinel)
    for start in range(0, len(stream) - 1, 8192):
        child.childDataReceived(3, stream[start:min(start + 8192, len(stream) - 1)])
    assert attempt.outcome is None and reports == []
    child.childDataReceived(3, stream[-1:])
    assert [(r["job_id"], r["outcome"], len(r["result"])) for r in reports] == [(7, "completed", 16 << 20)]
    assert reports[0]["result"] == result and len(child.frames) == 0


def test_output_ends_at_the_sentinel_however_the_pipe_splits_it():
    """Output (NUL bytes too) is kept exactly, up to the job's sentinel, whatever the reads."""
    import random

    from dsage.worker.runner import JobRunner

    rng = random.Random(5)
    for trial in range(30):
        runner = JobRunner(SpawningReactor())
        reports = []
        runner.run({"job_id": 1, "attempt": 1, "lease": 1, "timeout": 60.0, "kind": "code", "payload": b"1",
                    "name": "j"}).addCallback(reports.append)
        attempt, child = runner.running[(1, 1, 1)]
        text = bytes(rng.choice(b"ab\n\x00d") for _ in range(rng.randrange(0, 200)))
        stream, at = text + attempt.sentinel, 0
        while at < len(stream):
            step = rng.randrange(1, 12)
            child.childDataReceived(1, stream[at:at + step])
            at += step
        finish(child, attempt)
        assert reports[0]["output"] == text.decode(), trial


def test_a_job_process_runs_one_users_jobs_only():
    """An idle job process is reused for its user's next job only; another user's job gets
    a process of its own; beyond `keep_idle` idle processes the least recently used retire."""
    from dsage.worker.runner import JobRunner

    reactor = SpawningReactor()
    runner = JobRunner(reactor, keep_idle=2)
    used = []
    for n, owner in enumerate(["alice", "alice", "bob", "bob", "alice", "carol", "bob"], 1):
        runner.run({"job_id": n, "attempt": 1, "lease": 1, "owner": owner, "timeout": 60.0, "kind": "code",
                    "payload": b"1", "name": "j"})
        attempt, child = runner.running[(n, 1, 1)]
        used.append(reactor.spawned.index(child))
        finish(child, attempt)
    assert used == [0, 0, 1, 1, 0, 2, 3]
    alice, bob, carol, bob_again = reactor.spawned
    assert bob.transport.stdin_closed and alice.transport.stdin_closed and not carol.transport.stdin_closed
    assert runner.idle == [carol, bob_again] and (carol.owner, bob_again.owner) == ("carol", "bob")


def test_an_idle_process_that_exited_is_not_given_a_job():
    """A job process that exited while idle (its end not yet seen whole) is passed over."""
    from dsage.worker.runner import JobRunner

    reactor = SpawningReactor()
    runner = JobRunner(reactor)
    job = {"job_id": 1, "attempt": 1, "lease": 1, "owner": "alice", "timeout": 60.0, "kind": "code",
           "payload": b"1", "name": "j"}
    runner.run(job)
    attempt, first = runner.running[(1, 1, 1)]
    finish(first, attempt)
    first.processExited(None)
    runner.run(dict(job, job_id=2))
    assert runner.running[(2, 1, 1)][1] is not first and len(reactor.spawned) == 2


def test_a_running_jobs_output_is_read_by_job_and_attempt():
    """output_of gives the end of what a running attempt printed so far; None for an attempt
    that does not run here."""
    from dsage.worker.runner import JobRunner

    runner = JobRunner(SpawningReactor())
    runner.run({"job_id": 4, "attempt": 2, "lease": 9, "timeout": 60.0, "kind": "code", "payload": b"1",
                "name": "j"})
    attempt, child = runner.running[(4, 2, 9)]
    child.childDataReceived(1, b"so far\n")
    assert runner.output_of(4, 2) == "so far\n"
    assert runner.output_of(4, 1) is None and runner.output_of(5, 2) is None
    finish(child, attempt)
    assert runner.output_of(4, 2) is None


