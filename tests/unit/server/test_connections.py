"""The Hub's timers and the per-connection role checks, on a Clock and in-memory parts."""
from __future__ import annotations

import pytest
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from dsage import errors
from dsage.server.connections import HANDLERS, ServerProtocol
from dsage.server.hub import Hub
from tests.support.store import FakeTime, memory_store, reported, spec, value


@pytest.fixture
def parts(tmp_path):
    clock, now = Clock(), FakeTime(0.0)
    store = memory_store(tmp_path, now)
    hub = Hub(store, clock, lease_seconds=10.0, heartbeat_seconds=1.0)
    yield clock, now, store, hub
    store.stop()


def connect(hub, identity, role):
    proto = ServerProtocol(hub)
    proto.makeConnection(StringTransport())
    proto.identity, proto.role = identity, role
    proto.info = {"name": identity, "slots": 1}
    hub.attach(proto)
    return proto


def test_reaper_requeues_expired_leases_and_wakes_the_dispatcher(parts):
    """An expired lease sends the job back to the queue, where a waiting slot gets it."""
    clock, now, store, hub = parts
    value(store.submit("alice", [spec()]))
    value(store.claim([("w1", 1)], 10.0))
    waiting = connect(hub, "w2", "worker")
    got = []
    waiting.take({"n": 1}).addCallback(got.append)
    now.now = clock.seconds() + 11
    hub.reap()
    assert got and got[0][0]["job_id"] == 1 and got[0][0]["attempt"] == 2


def test_the_dispatch_watchdog_serves_slots_left_waiting_beside_runnable_jobs(parts):
    """A missed wake-up (jobs stored with no dispatch round after them) leaves a slot
    waiting beside runnable jobs: the watchdog sees it twice, a moment apart, counts it and
    starts a round; a round that serves the slot in between is no stall, nor is a queue of
    jobs still backing off."""
    clock, now, store, hub = parts
    slot = connect(hub, "w1", "worker")
    got = []
    slot.take({"n": 1}).addCallback(got.append)
    assert not got and value(hub.watch_dispatch()) is False      # nothing runnable: no stall
    value(store.submit("alice", [spec("first")]))                # the dispatcher is not told
    seen = []
    hub.watch_dispatch().addCallback(seen.append)
    assert not got and not seen
    clock.advance(1.0)
    assert seen == [True] and hub.dispatch_restarts == 1
    assert got and got[0][0]["name"] == "first"
    assert value(hub.status())["dispatch_restarts"] == 1

    slot.take({"n": 1}).addCallback(got.append)
    value(store.submit("alice", [spec("second")]))
    seen = []
    hub.watch_dispatch().addCallback(seen.append)
    hub.dispatcher.work_arrived()                                # served before the second look
    clock.advance(1.0)
    assert seen == [False] and hub.dispatch_restarts == 1 and got[1][0]["name"] == "second"


def test_a_job_waiting_for_more_memory_than_any_worker_gives_is_told_once_in_a_while(parts):
    """The owner's clients hear (a job_waits event) that a job waits for more memory than
    any connected worker gives; once in WAITS_EVERY s, a large map's jobs would each say it."""
    from dsage.server.hub import WAITS_EVERY

    clock, now, store, hub = parts
    connect(hub, "small", "worker").info["job_memory"] = 1000
    hub._note_capacity("small")
    alice = connect(hub, "alice", "client")
    assert hub.check_fit({"job_id": 1, "owner": "alice", "memory": 900}) is False
    assert alice.transport.value() == b""
    assert hub.check_fit({"job_id": 2, "owner": "alice", "memory": 2000}, asked=True) is True
    assert b"job_waits" in alice.transport.value() and b"job 2 asks for 2000 MiB" in alice.transport.value()
    alice.transport.clear()
    assert hub.check_fit({"job_id": 3, "owner": "alice", "memory": 2000}) is True
    assert alice.transport.value() == b""
    clock.advance(WAITS_EVERY)
    hub.check_fit({"job_id": 4, "owner": "alice", "memory": 2000})
    assert b"job 4 ran out of memory and needs 2000 MiB" in alice.transport.value()


def test_silent_worker_connections_are_dropped(parts):
    """A worker that says nothing for longer than a lease is disconnected; a chatty one is not."""
    clock, now, store, hub = parts
    silent, chatty = connect(hub, "w1", "worker"), connect(hub, "w2", "worker")
    client = connect(hub, "alice", "client")
    clock.advance(6)
    chatty.heard()
    clock.advance(6)
    hub.drop_silent_workers()
    assert silent.transport.disconnecting is True
    assert not chatty.transport.disconnecting and not client.transport.disconnecting


def test_hello_timeout_drops_a_mute_connection(parts):
    """A connection that never says hello is closed."""
    clock, now, store, hub = parts
    proto = ServerProtocol(hub)
    proto.makeConnection(StringTransport())
    clock.advance(16)
    assert proto.transport.disconnecting


@pytest.mark.parametrize("verb", sorted(HANDLERS))
@pytest.mark.parametrize("role", ["client", "admin", "worker"])
def test_every_request_checks_the_callers_role(parts, verb, role):
    """Each request is refused (AuthError) for the roles it is not meant for."""
    clock, now, store, hub = parts
    proto = connect(hub, "someone", role)
    allowed, _ = HANDLERS[verb]
    try:
        proto.handle_request(verb, {})
    except errors.AuthError:
        assert role not in allowed
    except (ValueError, errors.DsageError, KeyError):
        assert role in allowed
    else:
        assert role in allowed


def outcome(d):
    """'ok', or the name of the error a Deferred (or value) ended with."""
    out = []
    if not hasattr(d, "addBoth"):
        return "ok"
    d.addBoth(out.append)
    if not out:
        return "pending"
    return type(out[0].value).__name__ if hasattr(out[0], "value") and hasattr(out[0], "check") else "ok"


def test_owner_matrix(parts):
    """Requests on another user's job or function are refused; the owner and admins may."""
    clock, now, store, hub = parts
    alice, bob, root = connect(hub, "alice", "client"), connect(hub, "bob", "client"), connect(hub, "root", "admin")
    for verb in ("get_job", "kill", "rerun"):
        job_id = value(store.submit("alice", [spec()]))[0]
        value(store.claim([("w1", 5)], 10.0))
        if verb == "rerun":
            value(store.kill("alice", "client", job_id))
        assert outcome(bob.handle_request(verb, {"job_id": job_id})) == "AuthError", verb
        assert outcome(alice.handle_request(verb, {"job_id": job_id})) == "ok", verb
        assert outcome(root.handle_request(verb, {"job_id": job_id})) in ("ok", "RemoteError"), verb
    value(store.function_start("alice", "fn", b"state", "s1"))
    assert outcome(bob.handle_request("function_get", {"name": "fn"})) == "AuthError"
    assert outcome(bob.handle_request("function_get", {"name": "fn", "session": "x"})) == "AuthError"
    assert outcome(bob.handle_request("function_step", {"name": "fn", "session": "s1", "step": 1,
                                                        "state": b"", "jobs": []})) == "AuthError"
    assert outcome(alice.handle_request("function_get", {"name": "fn"})) == "ok"
    assert outcome(root.handle_request("function_get", {"name": "fn"})) == "ok"


def test_workers_report_only_on_their_own_attempts(parts):
    """A worker's report or heartbeat on another worker's attempt changes nothing."""
    clock, now, store, hub = parts
    value(store.submit("alice", [spec()]))
    value(store.claim([("w1", 1)], 10.0))
    intruder = connect(hub, "w2", "worker")
    d = intruder.handle_request("report", {"job_id": 1, "attempt": 1, "outcome": "completed", "result": b"x",
                                           "output": "", "error": None, "cpu_time": None, "wall_time": None})
    assert value(d) == {"applied": False, "jobs": []}
    assert value(intruder.handle_request("heartbeat", {"held": [[1, 1]]})) == {"lost": [[1, 1]]}
    assert value(store.get("alice", "client", 1))["status"] == "processing"


def test_batched_reports_apply_each_and_tell_the_owner_once_per_turn(parts):
    """A worker's batch of reports: each applied or refused on its own, the next jobs leased
    in the same transaction, and the owner's client told of all finished jobs in one event."""
    from dsage.protocol import EVENT, decode

    clock, now, store, hub = parts
    value(store.submit("alice", [spec(str(i), max_failures=1) for i in range(4)]))
    [one, two] = value(store.claim([("w1", 2)], 10.0))[0]
    alice, worker = connect(hub, "alice", "client"), connect(hub, "w1", "worker")
    done = {"outcome": "completed", "result": b"R", "output": "", "error": None, "cpu_time": None, "wall_time": 0.1}
    reply = value(worker.handle_request("reports", {"reports": [dict(done, **reported(one)),
                                                                dict(done, **dict(reported(two), attempt=7)),
                                                                dict(done, **reported(two))], "take": 2}))
    assert reply["applied"] == [True, False, True]
    assert [j["job_id"] for j in reply["jobs"]] == [3, 4]
    assert alice.transport.value() == b"", "events wait for the end of the reactor's turn"
    clock.advance(0)
    frames = alice.transport.value()
    assert len(frames) == 4 + int.from_bytes(frames[:4], "big"), "one event"
    kind, event, data = decode(frames[4:])
    assert (kind, event) == (EVENT, "jobs_done") and [s["job_id"] for s in data["jobs"]] == [1, 2]
    bad_peaks = [{"reports": [dict(done, **reported(two), peak_memory=peak)]} for peak in (-1, True, 1.5, "1")]
    for bad in ({"reports": []}, {"reports": "x"}, {"reports": [{"job_id": 1}]}, {"reports": [done], "take": -1},
                *bad_peaks):
        with pytest.raises(ValueError):
            value(worker.handle_request("reports", bad))


def test_large_results_of_one_turn_are_told_in_several_events(parts, monkeypatch):
    """The jobs that finish in one turn go to their owner in as few `jobs_done` events as
    keep each event's results within EVENT_BYTES (one message holds at most 256 MiB)."""
    from dsage.protocol import decode
    from dsage.server import connections

    monkeypatch.setattr(connections, "EVENT_BYTES", 10)
    clock, now, store, hub = parts
    value(store.submit("alice", [spec(str(i)) for i in range(4)]))
    jobs = value(store.claim([("w1", 4)], 10.0))[0]
    alice, worker = connect(hub, "alice", "client"), connect(hub, "w1", "worker")
    reports = [dict(reported(j), outcome="completed", result=b"R" * size, output="", cpu_time=None, wall_time=0.1)
               for j, size in zip(jobs, (4, 4, 20, 1))]
    assert value(worker.handle_request("reports", {"reports": reports}))["applied"] == [True] * 4
    clock.advance(0)
    frames, events = alice.transport.value(), []
    while frames:
        n = int.from_bytes(frames[:4], "big")
        events.append([s["job_id"] for s in decode(frames[4:4 + n])[2]["jobs"]])
        frames = frames[4 + n:]
    assert events == [[1, 2], [3], [4]]


def requests_sent(proto) -> list[list]:
    """The messages a connection has sent since the last call (its transport emptied)."""
    from dsage.protocol import decode

    frames, out = proto.transport.value(), []
    proto.transport.clear()
    while frames:
        n = int.from_bytes(frames[:4], "big")
        out.append(decode(frames[4:4 + n]))
        frames = frames[4 + n:]
    return out


def test_a_running_jobs_output_shows_what_its_worker_sent_last(parts):
    """A heartbeat's output is what get_job shows for a running job (its owner's record),
    only from the worker that holds it, until the report brings the whole output."""
    clock, now, store, hub = parts
    value(store.submit("alice", [spec(), spec()]))
    [[one, two]] = value(store.claim([("w1", 2)], 10.0))
    worker, intruder = connect(hub, "w1", "worker"), connect(hub, "w2", "worker")
    alice = connect(hub, "alice", "client")
    beat = {"held": [[1, one["attempt"], one["lease"]], [2, two["attempt"], two["lease"]]],
            "output": [[1, one["attempt"], one["lease"], "step 1\nstep 2\n"]]}
    assert value(worker.handle_request("heartbeat", beat)) == {"lost": []}
    value(intruder.handle_request("heartbeat", {"held": [], "output": [[2, two["attempt"], 0, "forged"]]}))
    shown = lambda job_id: value(alice.handle_request("get_job", {"job_id": job_id}))["output"]
    assert (shown(1), shown(2)) == ("step 1\nstep 2\n", "")
    with pytest.raises(ValueError, match="output must be"):
        worker.handle_request("heartbeat", {"held": [], "output": [[1, 1, 0, b"bytes"]]})
    value(worker.handle_request("report", reported(one, output="step 1\nstep 2\ndone\n")))
    assert shown(1) == "step 1\nstep 2\ndone\n" and 1 not in hub.live_output
    value(worker.handle_request("heartbeat", {**beat, "output": [[2, two["attempt"], two["lease"], "x"]]}))
    assert shown(2) == "x"
    worker.connectionLost(None)
    assert shown(2) == "" and not hub.live_output
    value(store.submit("alice", [spec()]))
    [[three]] = value(store.claim([("w1", 1)], 10.0))
    worker = connect(hub, "w1", "worker")
    value(worker.handle_request("heartbeat", {"held": [[3, three["attempt"], three["lease"]]],
                                              "output": [[3, three["attempt"], three["lease"], "y"]]}))
    assert shown(3) == "y"
    value(alice.handle_request("kill", {"job_id": 3}))     # a killed attempt is not reported
    assert not hub.live_output


def test_a_running_jobs_output_is_asked_of_its_worker_when_read(parts):
    """get_job of a running job with `output` asks the worker that holds it for the end of
    its output and shows that (without, the heartbeat's copy: the worker is not asked); a
    refusal shows the heartbeat's copy at once, and so does no answer within OUTPUT_WAIT;
    an answer that comes after the job's report is not kept, a long one only its end."""
    from dsage.server.hub import LIVE_OUTPUT_CHARS, OUTPUT_WAIT
    from dsage.protocol import REPLY, REQUEST, encode

    clock, now, store, hub = parts
    value(store.submit("alice", [spec(), spec()]))
    [[one, two]] = value(store.claim([("w1", 2)], 10.0))
    worker, alice = connect(hub, "w1", "worker"), connect(hub, "alice", "client")
    beat = {"held": [[1, one["attempt"], one["lease"]], [2, two["attempt"], two["lease"]]],
            "output": [[1, one["attempt"], one["lease"], "old\n"]]}
    value(worker.handle_request("heartbeat", beat))
    worker.transport.clear()

    def reply(msg_id: int, ok: bool, answer: object) -> None:
        message = encode([REPLY, msg_id, ok, answer])
        worker.dataReceived(len(message).to_bytes(4, "big") + message)

    def read(job_id: int, answer: tuple[bool, object]) -> dict:
        d = alice.handle_request("get_job", {"job_id": job_id, "output": True})
        [[kind, msg_id, verb, args]] = requests_sent(worker)
        assert (kind, verb, args) == (REQUEST, "output", {"job": [job_id, 1]})
        reply(msg_id, *answer)
        return value(d)

    assert read(1, (True, {"output": "old\nnew\n"}))["output"] == "old\nnew\n"
    assert read(2, (True, {"output": None}))["output"] == ""
    shown = read(2, (True, {"output": "x" * LIVE_OUTPUT_CHARS + "end"}))["output"]       # a worker's own limit
    assert len(shown) == LIVE_OUTPUT_CHARS and shown.endswith("xend")
    hub.live_output.pop(2)
    assert read(1, (False, {"type": "ProtocolError", "message": "unknown request 'output'"}))["output"] \
        == "old\nnew\n"
    assert value(alice.handle_request("get_job", {"job_id": 1}))["output"] == "old\nnew\n"
    assert requests_sent(worker) == []
    d = alice.handle_request("get_job", {"job_id": 1, "output": True})
    assert len(requests_sent(worker)) == 1
    clock.advance(OUTPUT_WAIT)
    assert value(d)["output"] == "old\nnew\n"
    d = alice.handle_request("get_job", {"job_id": 2, "output": True})
    [[_, msg_id, _, _]] = requests_sent(worker)
    value(worker.handle_request("report", reported(two, output="all\n")))
    reply(msg_id, True, {"output": "late\n"})
    assert value(d)["status"] == "processing" and 2 not in hub.live_output
    assert value(alice.handle_request("get_job", {"job_id": 2, "output": True}))["output"] == "all\n"
    assert requests_sent(worker) == []          # a finished job's output is not asked for


def test_a_refused_submission_leaves_the_waiting_slots_free(parts):
    """A submission refused for a bad job description must not keep the slots that were
    waiting reserved: the next good submission goes to them (it used to wait forever)."""
    clock, now, store, hub = parts
    worker, alice = connect(hub, "w1", "worker"), connect(hub, "alice", "client")
    got = []
    worker.take({"n": 1}).addCallback(got.append)
    bad = dict(spec(), timeout=float("nan"))
    with pytest.raises(ValueError, match="timeout must be"):
        alice.handle_request("submit", {"jobs": [bad]})
    assert hub.dispatcher.claiming == set()
    assert value(alice.handle_request("submit", {"jobs": [spec()]})) == {"job_ids": [1]}
    assert got and [j["job_id"] for j in got[0]] == [1]


def test_a_worker_connection_has_at_most_max_takes_waiting(parts):
    """Takes beyond MAX_TAKES waiting on one connection are refused with a message saying
    so (each waiting take costs every submission a look); answered ones make room again."""
    from dsage.server.connections import MAX_TAKES

    clock, now, store, hub = parts
    worker, alice = connect(hub, "w1", "worker"), connect(hub, "alice", "client")
    got = []
    for _ in range(MAX_TAKES):
        worker.handle_request("take", {"n": 1}).addCallback(got.append)
    with pytest.raises(ValueError, match=f"has {MAX_TAKES} takes waiting already"):
        worker.handle_request("take", {"n": 1})
    assert len(hub.dispatcher.waiting) == MAX_TAKES
    value(alice.handle_request("submit", {"jobs": [spec()]}))
    assert [[j["job_id"] for j in jobs] for jobs in got] == [[1]]
    worker.handle_request("take", {"n": 1})
    assert len(hub.dispatcher.waiting) == MAX_TAKES


def test_a_submission_that_leaves_jobs_queued_wakes_the_slots_it_did_not_reserve(parts):
    """A submission reserves only the waiting slots its own jobs need; when older jobs are
    still queued after its claim, the other waiting slots are given them."""
    clock, now, store, hub = parts
    alice = connect(hub, "alice", "client")
    got = []
    for _ in range(3):
        hub.dispatcher.take("w1", 1).addCallback(got.append)
    assert len(hub.dispatcher.waiting) == 3, "the queue is empty: all three wait"
    value(store.submit("alice", [spec("old1"), spec("old2")]))   # queued behind the dispatcher's back
    value(alice.handle_request("submit", {"jobs": [spec("new")]}))
    assert sorted(j["name"] for jobs in got for j in jobs) == ["new", "old1", "old2"]
    assert not hub.dispatcher.waiting and not hub.dispatcher.claiming
