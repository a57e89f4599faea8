"""JobStore: submission, leasing, reports, failures, kills, ownership and durability."""
from __future__ import annotations

import pytest
import ZODB
from ZODB.FileStorage import FileStorage

from dsage import errors
from dsage.server.leases import FREE_INTERRUPTIONS, TOKEN_TTL
from dsage.server.store import MAX_OUTPUT, OUTPUT_MARKER, JobStore
from tests.support.store import FakeTime, ThreadReactor, memory_store, reported, spec, value


@pytest.fixture
def clock():
    return FakeTime()


@pytest.fixture
def store(tmp_path, clock):
    s = memory_store(tmp_path, clock)
    yield s
    s.stop()


def claim_one(store, worker="w1", lease=60.0):
    """Lease the next job to `worker`; its dict, or None."""
    got = value(store.claim([(worker, 1)], lease))[0]
    return got[0] if got else None


def test_submit_returns_increasing_ids_and_counts(store):
    """Submitted jobs get consecutive ids and are counted as new."""
    ids = value(store.submit("alice", [spec(), spec("2")]))
    assert ids == [1, 2]
    assert value(store.status()) == {"new": 2}
    rec = value(store.get("alice", "client", 2))
    assert rec["status"] == "new" and rec["owner"] == "alice" and rec["name"] == "2"


def test_claim_in_priority_then_fifo_order(store):
    """Lower priority values run first; within a priority, first in first out."""
    value(store.submit("a", [spec("p5a"), spec("p1", priority=1), spec("p5b")]))
    got = value(store.claim([("w", 3)], 60.0))[0]
    assert [j["name"] for j in got] == ["p1", "p5a", "p5b"]
    assert all(j["attempt"] == 1 for j in got)
    assert value(store.claim([("w", 1)], 60.0)) == [[]]


def test_users_take_turns_within_a_priority_each_first_in_first_out(store):
    """Within a priority, users take turns: bob's jobs queued behind 50 of alice's wait for
    one of hers each, not 50; each user's jobs keep their order; a rerun goes to its owner's
    next turn; a lower priority value still goes first."""
    value(store.submit("alice", [spec(f"a{i}") for i in range(1, 51)]))
    assert claim_one(store)["name"] == "a1"
    value(store.submit("bob", [spec("b1"), spec("b2")]))
    value(store.submit("carol", [spec("c1", priority=1)]))
    got = [j["name"] for j in value(store.claim([("w1", 7)], 60.0))[0]]
    assert got == ["c1", "a2", "b1", "a3", "b2", "a4", "a5"]
    b1 = value(store.list("bob", "client"))[-1]
    assert b1["name"] == "b1"
    value(store.kill("bob", "client", b1["job_id"]))
    value(store.rerun("bob", "client", b1["job_id"]))
    assert [claim_one(store)["name"] for _ in range(3)] == ["a6", "b1", "a7"]


def test_turns_go_on_after_a_restart(tmp_path):
    """The queue's turns are stored: after a restart a user's new job still waits for one
    job of a user with many queued, not for all of them."""
    path = str(tmp_path / "d.fs")
    s = JobStore(ZODB.DB(FileStorage(path)), threaded=False)
    value(s.submit("alice", [spec(f"a{i}") for i in range(1, 21)]))
    assert [claim_one(s)["name"] for _ in range(5)] == ["a1", "a2", "a3", "a4", "a5"]
    s.stop()
    s = JobStore(ZODB.DB(FileStorage(path)), threaded=False)
    try:
        value(s.submit("bob", [spec("b1")]))
        assert [claim_one(s)["name"] for _ in range(3)] == ["a6", "b1", "a7"]
    finally:
        s.stop()


def test_claim_serves_several_waiting_workers_in_order(store):
    """One claim round pairs each waiting slot with the next job."""
    value(store.submit("a", [spec("x"), spec("y"), spec("z")]))
    out = value(store.claim([("w1", 1), ("w2", 5)], 60.0))
    assert [j["name"] for j in out[0]] == ["x"]
    assert [j["name"] for j in out[1]] == ["y", "z"]


def test_completed_report_stores_result_and_output(store):
    """A completed report records result, output and times; the job is final."""
    value(store.submit("a", [spec()]))
    job = claim_one(store)
    out = value(store.report("w1", reported(job, result=b"R", output="hello\n", error=None,
                                            cpu_time=0.5, wall_time=0.7)))
    assert out["applied"] and out["final"]
    rec = value(store.get("a", "client", 1))
    assert (rec["status"], rec["result"], rec["output"], rec["cpu_time"]) == ("completed", b"R", "hello\n", 0.5)
    assert rec["attempts"][0]["outcome"] == "completed"


def test_failure_requeues_until_max_failures(store, clock):
    """Each failure counts; the job returns to the queue until max_failures, then fails."""
    value(store.submit("a", [spec(max_failures=2)]))
    job = claim_one(store)
    out = value(store.report("w1", reported(job, "failed", error="Traceback\nValueError: boom", output="partial")))
    assert out["applied"] and not out["final"]
    rec = value(store.get("a", "client", 1))
    assert rec["status"] == "new" and rec["failures"] == 1 and "boom" in rec["error"]
    job = claim_one(store)
    assert job["attempt"] == 2
    value(store.report("w1", reported(job, "failed", error="again")))
    rec = value(store.get("a", "client", 1))
    assert rec["status"] == "failed" and rec["failures"] == 2 and rec["error"] == "again"
    assert [a["outcome"] for a in rec["attempts"]] == ["failed", "failed"]


def test_retries_back_off(store, clock):
    """After a second failure the job waits before it can be claimed again."""
    value(store.submit("a", [spec(max_failures=5)]))
    for _ in (1, 2):
        value(store.report("w1", reported(claim_one(store), "failed", error="x")))
    assert value(store.claim([("w1", 1)], 60.0)) == [[]]
    when = store.next_retry()
    assert when is not None and when > clock.now
    clock.now = when + 0.001
    assert claim_one(store)["attempt"] == 3


def test_a_back_off_ends_in_its_time_when_the_clock_steps_back(store, clock):
    """A back-off is timed on the wall clock (it outlives a restart); if that clock steps
    back by hours, the job waits no longer than a back-off can last."""
    value(store.submit("a", [spec(max_failures=5)]))
    for _ in (1, 2):
        value(store.report("w1", reported(claim_one(store), "failed", error="x")))
    clock.now -= 4 * 3600
    assert claim_one(store)["attempt"] == 3


def test_stale_report_is_refused(store):
    """A report for an attempt that is not current changes nothing."""
    value(store.submit("a", [spec()]))
    job = claim_one(store)
    bad = [dict(reported(job, result=b"x"), attempt=7), dict(reported(job, result=b"x"), job_id=99),
           dict(reported(job, result=b"x"), lease=job["lease"] + 1), {"job_id": 1, "attempt": 1, "outcome": "completed"}]
    for rep in bad:
        assert value(store.report("w1", rep))["applied"] is False
    assert value(store.report("w2", reported(job, result=b"x")))["applied"] is False
    assert value(store.get("a", "client", 1))["status"] == "processing"
    assert value(store.report("w1", reported(job, result=b"ok")))["applied"]
    # A second report for the same attempt is refused: a result is never applied twice.
    assert value(store.report("w1", reported(job, "failed", error="late")))["applied"] is False
    assert value(store.get("a", "client", 1))["result"] == b"ok"


def test_kill_new_and_running_jobs(store):
    """Killing a queued job takes it out of the queue; a running one names its worker."""
    value(store.submit("a", [spec("queued"), spec("running")]))
    value(store.claim([("w1", 0)], 60.0))
    out = value(store.kill("a", "client", 1))
    assert out["job"]["status"] == "killed" and out["worker"] is None
    job = claim_one(store)
    assert job["name"] == "running"
    out = value(store.kill("a", "client", 2))
    assert out["worker"] == {"worker": "w1", "job_id": 2, "attempt": 1}
    assert value(store.report("w1", reported(job, result=b"")))["applied"] is False
    assert value(store.status()) == {"new": 0, "processing": 0, "killed": 2}
    assert value(store.claim([("w1", 5)], 60.0)) == [[]]


def test_a_queued_only_kill_of_a_leased_job_names_its_lease_then_kills_it_given_up(store):
    """`queued_only` leaves a leased job alone and says whose lease it is; once its worker
    has given it up unstarted, the kill with that lease kills it (attempt "undelivered"),
    and a lease that has changed meanwhile is left alone."""
    value(store.submit("a", [spec("ahead"), spec("other")]))
    job = claim_one(store)
    out = value(store.kill("a", "client", 1, True))
    assert out["job"]["status"] == "processing" and out["worker"] is None
    assert out["held"] == [1, 1, job["lease"], "w1"]
    stale = [1, 1, job["lease"] + 2, "w1"]
    assert value(store.kill("a", "client", 1, True, stale))["job"]["status"] == "processing"
    out = value(store.kill("a", "client", 1, True, out["held"]))
    assert out["job"]["status"] == "killed" and out["worker"] is None and "held" not in out
    assert [a["outcome"] for a in value(store.get("a", "client", 1))["attempts"]] == ["undelivered"]
    assert value(store.report("w1", reported(job, result=b"")))["applied"] is False
    assert value(store.status()) == {"new": 1, "processing": 0, "killed": 1}


def test_owner_checks(store):
    """Another user can neither see nor kill a job; an admin can."""
    value(store.submit("alice", [spec()]))
    with pytest.raises(errors.AuthError):
        value(store.get("bob", "client", 1))
    with pytest.raises(errors.AuthError):
        value(store.kill("bob", "client", 1))
    assert value(store.list("bob", "client")) == []
    with pytest.raises(errors.AuthError):
        value(store.list("bob", "client", everyone=True))
    assert value(store.get("root", "admin", 1))["owner"] == "alice"
    assert [j["job_id"] for j in value(store.list("root", "admin", everyone=True))] == [1]
    with pytest.raises(errors.RemoteError):
        value(store.get("alice", "client", 42))


def test_list_filters_by_status_and_owner(store):
    """Listing by status shows only the caller's jobs in that status, newest first."""
    value(store.submit("alice", [spec("a1"), spec("a2")]))
    value(store.submit("bob", [spec("b1")]))
    claim_one(store)
    assert [j["name"] for j in value(store.list("alice", "client"))] == ["a2", "a1"]
    assert [j["name"] for j in value(store.list("alice", "client", "new"))] == ["a2"]
    assert [j["name"] for j in value(store.list("bob", "client", "new"))] == ["b1"]
    assert value(store.list("alice", "client", "failed")) == []


def test_rerun_only_finished_jobs(store):
    """rerun puts a finished job back in the queue with a clean slate."""
    value(store.submit("a", [spec()]))
    with pytest.raises(errors.RemoteError):
        value(store.rerun("a", "client", 1))
    value(store.report("w1", reported(claim_one(store), result=b"1")))
    rec = value(store.rerun("a", "client", 1))
    assert rec["status"] == "new" and rec["failures"] == 0
    assert claim_one(store)["attempt"] == 2


def test_lease_expiry_requeues_and_renewal_keeps(store, clock):
    """Expired leases return jobs (a failure); a heartbeat renews a live one."""
    value(store.submit("a", [spec("renewed"), spec("lost")]))
    [renewed], [lost] = value(store.claim([("w1", 1), ("w2", 1)], 10.0))
    clock.now += 8
    assert value(store.renew("w1", [(1, 1, renewed["lease"])], 10.0)) == []
    clock.now += 5
    expired = value(store.expire())
    assert [(s["job_id"], s["status"]) for s in expired] == [(2, "new")]
    assert value(store.get("a", "client", 2))["failures"] == 1
    assert value(store.renew("w2", [(2, 1, lost["lease"])], 10.0)) == [[2, 1, lost["lease"]]]


def test_a_renewal_writes_nothing_and_counts_only_for_its_own_lease(store, clock):
    """A heartbeat's renewal commits no transaction (each used to write every running job's
    record again: the file's growth under long jobs); the reaper counts it all the same,
    and a later lease of the same job is not stretched by an earlier lease's renewal."""
    value(store.submit("a", [spec()]))
    job = claim_one(store, lease=10.0)
    last = store.db.storage.lastTransaction()
    for _ in range(5):
        clock.now += 8
        assert value(store.renew("w1", [(1, 1, job["lease"])], 10.0)) == []
    assert store.db.storage.lastTransaction() == last, "renewals wrote to the database"
    assert value(store.expire()) == []
    assert value(store.release("w1", [(1, 1, job["lease"])])) == 1
    again = claim_one(store, lease=1.0)
    clock.now += 2
    assert [(s["job_id"], s["attempts"][-1]["attempt"]) for s in value(store.expire())] == [(1, again["attempt"])]
    assert store.renewed == {}, "renewals of ended leases are dropped"


def test_renewal_never_passes_the_timeout(store, clock):
    """A job running past its timeout loses its lease even with heartbeats."""
    value(store.submit("a", [spec(timeout=5.0)]))
    job = claim_one(store, lease=10.0)
    for _ in range(3):
        clock.now += 6
        assert value(store.renew("w1", [(1, 1, job["lease"])], 10.0)) == []
    clock.now += 6
    assert [s["job_id"] for s in value(store.expire())] == [1]


def test_leases_run_on_the_monotonic_clock_whatever_the_wall_clock_does(tmp_path):
    """A step of the machine's clock (+2 h, then -4 h) ends no lease and keeps none: leases,
    renewals and the timeout's backstop count on the monotonic clock; jobs are still
    stamped with wall time."""
    from tests.support.store import FakeTime

    now, ticks = FakeTime(1_800_000_000.0), FakeTime(50.0)
    store = memory_store(tmp_path, now, ticks)
    try:
        value(store.submit("a", [spec("stepped"), spec("timed", timeout=30.0)]))
        [stepped], [timed] = value(store.claim([("w1", 1), ("w2", 1)], 10.0))
        assert value(store.get("a", "client", 1))["started"] == now.now
        now.now += 7200
        assert value(store.expire()) == [], "a step forward ended the leases"
        for _ in range(3):
            ticks.now += 8
            assert value(store.renew("w2", [(2, 1, timed["lease"])], 10.0)) == []
        now.now -= 14400
        ticks.now += 8                      # 32 s on: renewed to the timeout's end (30 + 10 s), no more
        assert value(store.renew("w2", [(2, 1, timed["lease"])], 10.0)) == []
        ticks.now += 3
        assert [s["job_id"] for s in value(store.expire())] == [1], "a step back kept a lapsed lease"
        ticks.now += 6
        assert [s["job_id"] for s in value(store.expire())] == [2], "renewed past its timeout"
    finally:
        store.stop()


def test_release_returns_undelivered_jobs_without_a_failure(store):
    """Jobs claimed for a slot that vanished (or given back by a worker) go back uncounted,
    in their old place in the queue; someone else's lease cannot be given back."""
    value(store.submit("a", [spec("first"), spec("second")]))
    job = claim_one(store)
    assert value(store.release("w2", [(1, 1, job["lease"])])) == 0
    assert value(store.release("w1", [(1, 1, job["lease"] + 1)])) == 0
    assert value(store.release("w1", [(1, 1, job["lease"])])) == 1
    rec = value(store.get("a", "client", 1))
    assert rec["status"] == "new" and rec["failures"] == 0
    assert claim_one(store)["name"] == "first"


def test_runnable_says_whether_a_job_could_be_leased_now(store, clock):
    """The dispatch watchdog's question: a queued job is runnable, a leased one or one
    backing off after a failure is not, until its time comes."""
    assert value(store.runnable()) is False
    value(store.submit("a", [spec()]))
    assert value(store.runnable()) is True
    job = claim_one(store)
    assert value(store.runnable()) is False
    value(store.report("w1", reported(job, "failed", error="boom")))
    assert value(store.runnable()) is True          # a first failure is tried again at once
    value(store.report("w1", reported(claim_one(store), "failed", error="boom")))
    assert value(store.runnable()) is False
    clock.now += 3600
    assert value(store.runnable()) is True


def test_a_job_that_needs_memory_goes_only_to_a_worker_that_gives_that_much(store):
    """Jobs that state the memory they need wait in queues of their size: a worker takes
    from those up to what it gives each job (one that says nothing: only jobs that state
    nothing), in queue order; a job larger than every worker waits."""
    store.capacities.update({"small": 1000, "big": 8000})
    value(store.submit("a", [spec("any"), spec("4000", memory=4000), spec("900", memory=900),
                             spec("9000", memory=9000), spec("1000", memory=1000)]))
    assert [j["name"] for j in value(store.claim([("old", 10)], 60.0))[0]] == ["any"]
    assert [j["name"] for j in value(store.claim([("small", 10)], 60.0))[0]] == ["900", "1000"]
    assert [j["name"] for j in value(store.claim([("big", 10)], 60.0))[0]] == ["4000"]
    assert value(store.get("a", "client", 4))["status"] == "new" and value(store.get("a", "client", 4))["memory"] == 9000
    assert value(store.runnable()) is False             # what is left fits no slot that waits unserved
    store.capacities["huge"] = 16000
    assert [j["name"] for j in value(store.claim([("huge", 10)], 60.0))[0]] == ["9000"]


def test_a_job_that_ran_out_of_memory_asks_twice_as_much_next_time(store):
    """A failed attempt that ran out of memory (the worker says where) raises what the job
    needs: its next attempt waits for a worker that gives that much."""
    store.capacities.update({"small": 1000, "big": 8000})
    value(store.submit("a", [spec()]))
    job = claim_one(store, "small")
    value(store.report("small", reported(job, "failed", error="MemoryError", memory_exceeded=1000)))
    rec = value(store.get("a", "client", 1))
    assert rec["status"] == "new" and rec["memory"] == 2000 and rec["failures"] == 1
    assert claim_one(store, "small") is None
    assert claim_one(store, "big")["job_id"] == 1


def test_a_submission_leases_at_once_only_the_jobs_that_fit_the_waiting_slots(store):
    """Jobs leased in the transaction that stores them fit their slot too; the others queue."""
    store.capacities["small"] = 1000
    out = value(store.submit_and_claim("a", [spec("big", memory=4000), spec("small", memory=500), spec("any")],
                                       None, None, None, [("small", 3)], 60.0))
    assert [j["name"] for j in out["claims"][0]] == ["small", "any"] and out["queued"] is True
    store.capacities["big"] = 4096
    assert claim_one(store, "big")["name"] == "big"


@pytest.mark.parametrize("memory", [0, -1, True, "1G", 1 << 25])
def test_a_bad_memory_request_is_refused(store, memory):
    with pytest.raises(ValueError, match="memory must be"):
        store.submit("a", [spec(memory=memory)])


def test_revoking_a_worker_queues_its_running_jobs_again(store):
    """A revoked worker will never report: its running jobs go back at once, uncounted,
    the other workers' stay theirs; a user's revocation touches no job."""
    value(store.add_identity("w1", "worker", 1))
    value(store.add_identity("w2", "worker", 2))
    value(store.add_identity("alice", "client", 3))
    value(store.submit("alice", [spec("a"), spec("b"), spec("c")]))
    claim_one(store, "w1"), claim_one(store, "w2"), claim_one(store, "w1")
    assert value(store.revoke("alice"))["released"] == 0
    assert value(store.revoke("w1")) == {"name": "w1", "role": "worker", "released": 2}
    recs = {i: value(store.get("alice", "client", i)) for i in (1, 2, 3)}
    assert [recs[i]["status"] for i in (1, 2, 3)] == ["new", "processing", "new"]
    assert recs[1]["failures"] == 0 and recs[1]["attempts"][-1]["outcome"] == "revoked"
    assert claim_one(store, "w2")["name"] == "a"


def test_jobs_given_back_by_stopping_workers_are_free_twice_then_count_as_failures(store, clock):
    """A worker that stops gives its running jobs back uncounted; a job that keeps stopping
    its workers (one that signals its own) fails after FREE_INTERRUPTIONS, then max_failures."""
    value(store.submit("a", [spec("stopper", max_failures=2)]))
    for attempt in range(1, 5):
        job = claim_one(store)
        assert job["attempt"] == attempt
        assert value(store.release("w1", [(1, attempt, job["lease"])], "interrupted")) == 1
        rec = value(store.get("a", "client", 1))
        outcomes = [a["outcome"] for a in rec["attempts"]]
        assert outcomes == ["interrupted"] * attempt
        if attempt <= FREE_INTERRUPTIONS:
            assert rec["status"] == "new" and rec["failures"] == 0
        elif rec["status"] == "failed":
            break
        else:
            assert rec["failures"] == attempt - FREE_INTERRUPTIONS
            clock.now += 3600          # past the retry's back-off
    assert rec["status"] == "failed" and rec["failures"] == 2 and attempt == 4
    assert "worker stopped while it ran (4 times)" in rec["error"]


def test_output_is_capped_with_a_marker(store):
    """Output larger than the cap keeps its head and tail around a marker."""
    value(store.submit("a", [spec()]))
    job = claim_one(store)
    big = "A" * MAX_OUTPUT + "TAIL"
    value(store.report("w1", reported(job, result=b"", output=big)))
    out = value(store.get("a", "client", 1))["output"]
    assert OUTPUT_MARKER in out and out.endswith("TAIL") and len(out) < MAX_OUTPUT + 100


def test_payloads_by_size_inline_in_the_record_in_the_file_or_in_a_blob(store):
    """Small payloads live in the job record, medium ones in an object of their own, those
    above the inline limit in slices of one blob per request; all come back intact."""
    from ZODB.blob import Blob

    from dsage.server.model import INLINE_LIMIT, Data

    large = [bytes(range(256)) * (INLINE_LIMIT // 256 + 1), bytes(range(7)) * INLINE_LIMIT]
    payloads = [b"tiny", bytes(range(256)) * 40, *large]
    value(store.submit("a", [spec(payload=p) for p in payloads]))
    kinds = [type(store.root.jobs[i].payload) for i in (1, 2, 3, 4)]
    assert kinds == [bytes, Data, tuple, tuple]
    (blob3, offset3, len3), (blob4, offset4, len4) = store.root.jobs[3].payload, store.root.jobs[4].payload
    assert isinstance(blob3, Blob) and blob4 is blob3      # one blob file per request
    assert (offset3, len3, len4) == (0, len(large[0]), len(large[1])) and offset4 >= len3
    store.warm.take(store.root.jobs[3].payload)            # one read from its file
    assert [j["payload"] for j in value(store.claim([("w", 4)], 60.0))[0]] == payloads


def test_identities(store):
    """Identities authenticate by name and serial; revoked and replaced ones are refused."""
    value(store.add_identity("alice", "client", 11))
    assert value(store.authenticate("alice", 11)) == "client"
    with pytest.raises(errors.AuthError):
        value(store.authenticate("alice", 12))
    with pytest.raises(errors.AuthError):
        value(store.authenticate("mallory", 1))
    with pytest.raises(errors.RemoteError):
        value(store.add_identity("alice", "client", 13))
    value(store.add_identity("alice", "client", 13, force=True))
    with pytest.raises(errors.AuthError):
        value(store.authenticate("alice", 11))
    value(store.revoke("alice"))
    with pytest.raises(errors.AuthError, match="revoked"):
        value(store.authenticate("alice", 13))
    assert value(store.identities())[0]["revoked"] is True


def test_a_database_without_identities_takes_the_first_admin_only(store):
    """The admin of `dsage init` is recorded in a database that knows no one, never beside
    (or over) identities already there."""
    assert value(store.first_admin("root", 21)) is True
    assert value(store.authenticate("root", 21)) == "admin"
    assert value(store.first_admin("mallory", 22)) is False
    with pytest.raises(errors.AuthError):
        value(store.authenticate("mallory", 22))
    assert value(store.first_admin("root", 23)) is False
    assert value(store.authenticate("root", 21)) == "admin"


def test_a_shared_database_is_held_by_one_live_server(store, clock):
    """Another server's hold refuses a second one until it lapses, its process is gone
    (same host), or it lets go; the holder itself renews it at will."""
    import os
    import subprocess

    gone = subprocess.Popen(["true"])
    gone.wait()
    a = {"host": "lab1", "pid": os.getpid(), "token": "a"}
    value(store.hold(a, 30))
    clock.now += 20
    value(store.hold(a, 30))                                    # renewed
    clock.now += 20
    with pytest.raises(errors.DsageError, match=r"in use by the dsage_server on lab1 \(pid \d+, last seen 20 s "
                                               r"ago\).*lapses within 10 s"):
        value(store.hold({"host": "lab2", "pid": 1, "token": "b"}, 30))
    with pytest.raises(errors.DsageError):                      # same host, but the holder lives
        value(store.hold({"host": "lab1", "pid": 1, "token": "b"}, 30))
    clock.now += 10
    value(store.hold({"host": "lab2", "pid": gone.pid, "token": "b"}, 30))     # lapsed
    with pytest.raises(errors.DsageError):                      # lab2's name, another machine's boot
        value(store.hold({"host": "lab2", "boot": "other", "pid": 7, "token": "c"}, 30))
    value(store.hold({"host": "lab2", "pid": 7, "token": "c"}, 30))           # b's process is gone
    value(store.let_go("b"))                                    # not the holder: nothing changes
    with pytest.raises(errors.DsageError):
        value(store.hold({"host": "lab3", "pid": 8, "token": "d"}, 30))
    value(store.let_go("c"))
    value(store.hold({"host": "lab3", "pid": 8, "token": "d"}, 30))
    clock.now += 5
    with pytest.raises(errors.DsageError):                      # a shorter hold of its own is no lapse of d's
        value(store.hold({"host": "lab4", "pid": 9, "token": "e"}, 2))


def test_bad_specs_are_refused(store):
    """Malformed submissions raise ValueError and store nothing."""
    for bad in (spec(kind="shell"), spec(payload="text"), spec(timeout=-1), spec(priority="high"),
                spec(max_failures=0), spec(files={"../x": b""}), spec(files={"a": "str"}), "job"):
        with pytest.raises(ValueError):
            store.submit("a", [bad])
    assert value(store.status()) == {}


def test_filestorage_survives_reopen(tmp_path):
    """What was committed is there after the database is closed and opened again."""
    path = str(tmp_path / "d.fs")
    s = JobStore(ZODB.DB(FileStorage(path)), threaded=False)
    value(s.submit("a", [spec("kept")]))
    s.stop()
    s = JobStore(ZODB.DB(FileStorage(path)), threaded=False)
    try:
        assert value(s.get("a", "client", 1))["name"] == "kept"
        assert value(s.submit("a", [spec()])) == [2]
    finally:
        s.stop()


def test_a_filestorage_commit_does_not_check_what_it_only_read(tmp_path, monkeypatch):
    """The store is a FileStorage's only writer: its commits skip the serial checks of the
    tree nodes they passed through (`readCurrent`), which ZODB asks for by default."""
    checked = []
    check = FileStorage.checkCurrentSerialInTransaction
    monkeypatch.setattr(FileStorage, "checkCurrentSerialInTransaction",
                        lambda self, *a: checked.append(a[0]) or check(self, *a))
    s = JobStore(ZODB.DB(FileStorage(str(tmp_path / "d.fs"))), threaded=False)
    try:
        def round_trips(n):
            for _ in range(n):
                job = value(s.submit_and_claim("a", [spec()], None, None, None, [("w", 1)], 60.0))["claims"][0][0]
                assert value(s.report("w", reported(job)))["applied"]
        round_trips(200)
        assert checked == []
        del s._conn.readCurrent            # ZODB's own: the same work checks nodes
        round_trips(5)
        assert checked
    finally:
        s.stop()


def test_one_lease_message_carries_a_bounded_size_of_jobs(store, clock, monkeypatch):
    """Jobs leased in one go carry at most LEASE_BYTES of payload and files together (a job
    larger than that goes alone); a slot that got fewer than it asked for so is tried again
    at once (`next_retry`), not when new work comes."""
    from dsage.server import leases

    monkeypatch.setattr(leases, "LEASE_BYTES", 100 << 10)
    ids = value(store.submit("a", [spec(str(i), payload=bytes(size << 10))
                                   for i, size in enumerate((30, 60, 20, 150, 10))]))
    assert store.next_retry() is None
    got = [[j["job_id"] for j in value(store.claim([("w", 5)], 60.0))[0]] for _ in range(4)]
    assert got == [ids[:2], [ids[2]], [ids[3]], [ids[4]]]
    assert store.next_retry() is None, "the last claim took everything it could"
    value(store.submit("a", [spec("x", payload=bytes(80 << 10)), spec("y", payload=bytes(80 << 10))]))
    assert len(value(store.claim([("w", 2)], 60.0))[0]) == 1 and store.next_retry() == clock()


def test_submission_token_makes_a_retry_harmless(store, clock):
    """The same token submitted twice stores the jobs once and returns the same ids."""
    first = value(store.submit("a", [spec("x"), spec("y")], token="t1"))
    again = value(store.submit("a", [spec("x"), spec("y")], token="t1"))
    assert first == again == [1, 2]
    assert value(store.status()) == {"new": 2}
    assert value(store.submit("b", [spec("z")], token="t1")) == [3], "tokens are per user"
    clock.now += 2 * TOKEN_TTL
    value(store.expire())
    assert value(store.submit("a", [spec("x")], token="t1")) == [4], "old tokens are forgotten"


def test_tokens_are_remembered_a_day_across_their_generations(store, clock):
    """A token is remembered at least TOKEN_TTL whenever it came in its generation, and
    forgotten (its generation dropped whole) by twice that."""
    assert value(store.submit("a", [spec()], token="early")) == [1]
    clock.now += TOKEN_TTL * 0.9
    assert value(store.submit("a", [spec()], token="late")) == [2]
    clock.now += TOKEN_TTL * 0.2                # a new generation begins; both still known
    value(store.expire())
    assert value(store.submit("a", [spec()], token="early")) == [1]
    assert value(store.submit("a", [spec()], token="new")) == [3]
    clock.now += TOKEN_TTL * 0.85               # "late" is 0.95 TTL old: kept
    value(store.expire())
    assert value(store.submit("a", [spec()], token="late")) == [2]
    clock.now += TOKEN_TTL * 0.2                # the next turn drops the first generation
    value(store.expire())
    assert value(store.submit("a", [spec()], token="late")) == [4]
    assert value(store.submit("a", [spec()], token="new")) == [3]


def test_function_steps_are_numbered_and_fenced(store):
    """A repeated step replays its reply; an out-of-order step or a fenced session is refused."""
    value(store.function_start("a", "f", b"s0", "sess1"))
    out = value(store.function_step("a", "f", "sess1", 1, b"s1", [], [spec("j")], False))
    assert out["job_ids"] == [1]
    replay = value(store.function_step("a", "f", "sess1", 1, b"s1", [], [spec("j")], False))
    assert replay["job_ids"] == [1] and value(store.status()) == {"new": 1}
    with pytest.raises(errors.RemoteError, match="out of order"):
        value(store.function_step("a", "f", "sess1", 5, b"s", [], [], False))
    rec = value(store.function_get("a", "client", "f", attach="sess2"))
    assert rec["state"] == b"s1" and rec["jobs"] == [1] and rec["steps"] == 1
    with pytest.raises(errors.RemoteError, match="restored by another client"):
        value(store.function_step("a", "f", "sess1", 2, b"s2", [1], [], False))
    value(store.function_step("a", "f", "sess2", 2, b"s2", [1], [], True))
    rec = value(store.function_get("a", "client", "f"))
    assert rec["done"] and rec["processed"] == [1]


def test_function_done_kills_its_outstanding_jobs(store):
    """When a function is done its unprocessed jobs are killed, running ones named."""
    value(store.function_start("a", "f", b"s0", "s"))
    value(store.function_step("a", "f", "s", 1, b"s1", [], [spec("run"), spec("wait")], False))
    claim_one(store)
    out = value(store.function_step("a", "f", "s", 2, b"s2", [], [], True))
    assert out["running"] == [{"worker": "w1", "job_id": 1, "attempt": 1}]
    assert sorted(k["job_id"] for k in out["killed"]) == [1, 2]
    assert value(store.status()) == {"new": 0, "processing": 0, "killed": 2}


def test_grace_extends_running_leases(store, clock):
    """After a restart, running jobs get a fresh lease before the reaper looks at them,
    whatever clock the last server counted their leases on (its own monotonic clock, or the
    wall clock in older databases): that lease then ends on time."""
    value(store.submit("a", [spec()]))
    claim_one(store, lease=10.0)
    clock.now += 100
    assert value(store.grace(10.0)) == 1
    assert value(store.expire()) == []
    value(store.submit("a", [spec()]))
    claim_one(store, lease=10.0)
    clock.now -= 1e9                        # this server's clock is far behind the last one's
    assert value(store.grace(10.0)) == 2
    clock.now += 11
    assert [s["job_id"] for s in value(store.expire())] == [1, 2]


def test_queue_limit_per_user(store):
    """A user cannot queue more than the limit; running or finished jobs do not count."""
    value(store.submit("a", [spec(), spec()], limit=3))
    with pytest.raises(errors.RemoteError, match="queue limit"):
        value(store.submit("a", [spec(), spec()], limit=3))
    assert value(store.submit("b", [spec(), spec(), spec()], limit=3)) == [3, 4, 5]
    claim_one(store)                      # job 1 leaves the queue
    assert value(store.submit("a", [spec(), spec()], limit=3)) == [6, 7]
    assert value(store.status())["new"] == 7 - 1


def test_submit_and_claim_pairs_new_jobs_with_waiting_slots(store):
    """New jobs go to the waiting slots in the submit's own transaction; the rest queue."""
    out = value(store.submit_and_claim("a", [spec("x"), spec("y"), spec("z")], None, None, None,
                                       [("w1", 1), ("w2", 1)], 60.0))
    assert out["ids"] == [1, 2, 3] and out["queued"]
    assert [[j["job_id"] for j in c] for c in out["claims"]] == [[1], [2]]
    assert value(store.status()) == {"new": 1, "processing": 2}
    assert claim_one(store)["job_id"] == 3, "the one left over is queued"
    assert [j["status"] for j in value(store.list("a", "client", status="processing"))] == ["processing"] * 3


def test_submit_and_claim_keeps_the_queue_order(store):
    """Jobs already queued go first unless a new job's priority is ahead of them, and new
    jobs among themselves go by priority, then in order."""
    value(store.submit("a", [spec("old", priority=5), spec("old-low", priority=9)]))
    out = value(store.submit_and_claim("a", [spec("n1", priority=7), spec("urgent", priority=1),
                                             spec("n3", priority=7)], None, None, None,
                                       [("w1", 3)], 60.0))
    assert [j["name"] for j in out["claims"][0]] == ["urgent", "old", "n1"] and out["queued"]
    rest = [claim_one(store)["name"] for _ in range(2)]
    assert rest == ["n3", "old-low"]
    assert value(store.status()) == {"new": 0, "processing": 5}


def test_submit_and_claim_with_nobody_waiting_queues_everything(store):
    """No slot waiting: the new jobs are queued like any submission."""
    out = value(store.submit_and_claim("a", [spec("x")], None, "tok", None, [], 60.0))
    assert out == {"ids": [1], "claims": [], "queued": True}
    assert value(store.status()) == {"new": 1}
    assert claim_one(store)["job_id"] == 1


def test_backed_off_jobs_wait_apart_and_keep_their_place(store, clock):
    """A backed-off job does not block the queue; when due it runs before later jobs."""
    value(store.submit("a", [spec("retry", max_failures=5)]))
    for _ in (1, 2):
        value(store.report("w1", reported(claim_one(store), "failed", error="x")))
    value(store.submit("a", [spec("later"), spec("last")]))
    assert claim_one(store)["name"] == "later", "the waiting job is skipped, not in the way"
    when = store.next_retry()
    assert when > clock.now
    clock.now = when
    assert claim_one(store)["name"] == "retry"
    assert claim_one(store)["name"] == "last"
    assert store.next_retry() is None


def test_killing_a_backed_off_job_takes_it_off_the_queue(store, clock):
    """A job killed while it waits to retry never runs."""
    value(store.submit("a", [spec(max_failures=5)]))
    for _ in (1, 2):
        value(store.report("w1", reported(claim_one(store), "failed", error="x")))
    value(store.kill("a", "client", 1))
    clock.now += 3600
    assert claim_one(store) is None and store.next_retry() is None
    assert value(store.status())["killed"] == 1


def finish(store, n, outcome="completed"):
    """Submit, claim and report n jobs; their ids."""
    ids = value(store.submit("a", [spec(str(i), max_failures=1) for i in range(n)]))
    for job in value(store.claim([("w1", n)], 60.0))[0]:
        value(store.report("w1", reported(job, outcome, result=b"R", error="e", output="")))
    return ids


def test_finished_jobs_expire_after_keep_days(store, clock):
    """Jobs finished more than `days` ago are deleted with their indexes and counts; newer,
    queued and running jobs stay."""
    old = finish(store, 3) + finish(store, 2, "failed")
    clock.now += 2 * 86400
    recent = finish(store, 2)
    value(store.submit("a", [spec("queued")]))
    assert value(store.expire_finished(1.0)) == 5
    for job_id in old:
        with pytest.raises(errors.RemoteError, match="no job"):
            value(store.get("a", "client", job_id))
    assert [j["job_id"] for j in value(store.list("a", "client"))] == [8] + recent[::-1]
    assert value(store.status()) == {"new": 1, "processing": 0, "completed": 2, "failed": 0}
    assert value(store.expire_finished(1.0)) == 0


def test_expiry_goes_in_batches(store, clock):
    """At most `limit` jobs go per call."""
    finish(store, 7)
    clock.now += 2 * 86400
    assert [value(store.expire_finished(1.0, limit=3)) for _ in range(4)] == [3, 3, 1, 0]


def test_expiry_keeps_results_a_running_function_has_not_processed(store, clock):
    """A DistributedFunction's unprocessed results outlive keep_days until it is done."""
    value(store.function_start("a", "f", b"s0", "s"))
    value(store.function_step("a", "f", "s", 1, b"s1", [], [spec("p"), spec("u")], False))
    for job in value(store.claim([("w1", 2)], 60.0))[0]:
        value(store.report("w1", reported(job, result=b"R")))
    value(store.function_step("a", "f", "s", 2, b"s2", [1], [], False))
    clock.now += 2 * 86400
    assert value(store.expire_finished(1.0)) == 1
    assert value(store.get("a", "client", 2))["result"] == b"R"
    value(store.function_step("a", "f", "s", 3, b"s3", [2], [], True))
    clock.now += 2 * 86400
    assert value(store.expire_finished(1.0)) == 1
    with pytest.raises(errors.RemoteError, match="no distributed function"):
        value(store.function_get("a", "client", "f"))


def test_a_failing_operation_does_not_spoil_its_batch(store):
    """In one group commit, an operation that fails half-way is undone alone; the others
    commit and their callers get their results."""
    from twisted.internet import defer

    def half_way(root):
        root.next_job_id += 100
        raise ValueError("boom")

    def early(root):
        raise KeyError("nothing changed")

    ops = [(store._submit, ("a", [store_spec("x")], None)), (half_way, ()), (early, ()),
           (store._submit, ("a", [store_spec("y")], None))]
    batch = [(fn, args, defer.Deferred(), None) for fn, args in ops]
    results = store._execute(batch)
    assert [ok for _, ok, _ in results] == [True, False, False, True]
    assert results[0][2] == [1] and results[3][2] == [2]
    assert value(store.submit("a", [spec("z")])) == [3], "the failed operation's change was undone"


def test_a_storage_failure_while_applying_refuses_the_batch_and_the_writer_goes_on(store, monkeypatch):
    """A failing neighbour makes the batch run again with savepoints; when the savepoint's
    temporary file cannot be written (full disk), every caller of the batch hears of the
    disk, and the store takes the next request as before."""
    import errno

    from twisted.internet import defer

    def broken(root):
        raise ValueError("boom")

    def no_room():
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(store._tm, "savepoint", no_room)
    batch = [(fn, args, defer.Deferred(), None) for fn, args in
             [(store._submit, ("a", [store_spec("x")], None)), (broken, ())]]
    results = store._execute(batch)
    assert [ok for _, ok, _ in results] == [False, False]
    assert "No space left on device" in str(results[0][2].value)
    monkeypatch.undo()
    assert value(store.submit("a", [spec("y")])) == [1], "nothing of the refused batch was stored"


def test_a_staged_payload_survives_its_batch_running_again(store):
    """When a neighbour fails and the batch runs again, a payload already staged to a file
    is stored all the same (each run takes a link of the file) and reads back intact."""
    import os

    from twisted.internet import defer

    from dsage.server.model import INLINE_LIMIT
    from dsage.server.staging import Staged, WarmBytes

    def half_way(root):
        root.next_job_id += 100
        raise ValueError("boom")

    big = [os.urandom(INLINE_LIMIT * 2), os.urandom(INLINE_LIMIT * 3)]
    specs = [store_spec("x"), store_spec("y")]
    staged = Staged(big, store.db.storage.temporaryDirectory())
    for s, v in zip(specs, staged.values(big)):
        s["payload"] = v
    ops = [(store._submit, ("a", [specs[0]], None)), (half_way, ()), (store._submit, ("a", [specs[1]], None))]
    results = store._execute([(fn, args, defer.Deferred(), None) for fn, args in ops])
    staged.discard()
    assert [ok for _, ok, _ in results] == [True, False, True]
    store.warm = WarmBytes(store.warm.cap)
    assert [j["payload"] for j in value(store.claim([("w", 2)], 60.0))[0]] == big


def store_spec(code):
    from dsage.server import scheduler
    return scheduler.validate_spec(spec(code))


def test_a_database_of_the_previous_layout_is_upgraded_on_open(tmp_path):
    """Counters kept in their own objects by earlier versions become plain dicts in the
    root, with their values, and submission tokens indexed by age become the older
    generation of tokens, the first time the store opens the file."""
    import transaction
    from BTrees.OOBTree import OOBTree
    from persistent.mapping import PersistentMapping

    path = str(tmp_path / "d.fs")
    s = JobStore(ZODB.DB(FileStorage(path)), threaded=False)
    value(s.submit("a", [spec(), spec()]))
    s.stop()
    db = ZODB.DB(FileStorage(path))
    with transaction.manager:
        root = db.open().root()["dsage"]
        root.counts = PersistentMapping(root.counts)
        root.queued = OOBTree(root.queued)
        root.tokens = OOBTree({("a", "t9"): (1000.0, (1, 2))})      # with its index by age
        root.token_times = OOBTree({(1000.0, "a", "t9"): None})
    db.close()
    s = JobStore(ZODB.DB(FileStorage(path)), threaded=False)
    try:
        assert isinstance(s.root.counts, dict) and isinstance(s.root.queued, dict)
        assert s.root.token_times is None
        assert value(s.submit("a", [spec(), spec()], token="t9")) == [1, 2], "its tokens still known"
        assert value(s.status()) == {"new": 2}
        with pytest.raises(errors.RemoteError, match="queue limit"):
            value(s.submit("a", [spec()], limit=2))
        claim_one(s)
        assert value(s.status()) == {"new": 1, "processing": 1}
    finally:
        s.stop()




def test_large_submissions_are_stored_in_the_order_they_came(tmp_path):
    """Submissions whose payloads are written to files first (outside the store's thread)
    still get ids, and queue places, in the order they came."""
    from ZODB.blob import BlobStorage
    from ZODB.MappingStorage import MappingStorage

    from dsage.server.model import INLINE_LIMIT

    reactor = ThreadReactor()
    s = JobStore(ZODB.DB(BlobStorage(str(tmp_path / "blobs"), MappingStorage())), reactor=reactor)
    s.start()
    try:
        sizes = [8 << 20, INLINE_LIMIT + 1, 4 << 20, INLINE_LIMIT + 1, 2 << 20, INLINE_LIMIT + 1]
        subs = [s.submit("a", [spec(name=str(i), payload=bytes(n))]) for i, n in enumerate(sizes)]
        for d in subs:
            reactor.drain(d)
        assert [value(d) for d in subs] == [[i + 1] for i in range(len(sizes))]
    finally:
        s.stop()


def test_leases_go_out_before_their_commit_and_a_lost_commit_voids_them(store, monkeypatch):
    """A claim's leases reach the hook before its transaction commits (the worker starts
    while the disk writes); when that commit fails, the job is queued still, its next lease
    has another token, and a report on the void lease is refused."""
    import errno

    from twisted.internet import defer

    value(store.submit("a", [spec("first"), spec("second")]))
    seen = []

    def announce(early):
        conn = store.db.open()                      # what is committed, from outside
        try:
            seen.append(conn.root()["dsage"].jobs[1].status)
        finally:
            conn.close()
        for hook, leases in early:
            hook(leases)
    early_leases = []
    batch = [(store._claim, ([("w1", 1)], 60.0), defer.Deferred(), early_leases.extend)]
    store._execute(batch, announce)
    assert seen == ["new"] and early_leases[0][0]["job_id"] == 1

    real_commit = store._tm.commit
    monkeypatch.setattr(store._tm, "commit", lambda: (_ for _ in ()).throw(OSError(errno.ENOSPC, "full")))
    void = []
    with pytest.raises(errors.RemoteError):
        value(store.claim([("w2", 1)], 60.0, early=void.extend))
    monkeypatch.setattr(store._tm, "commit", real_commit)
    [[lost]] = void
    assert lost["job_id"] == 2 and value(store.get("a", "client", 2))["status"] == "new"
    again = claim_one(store, "w2")
    assert (again["job_id"], again["attempt"]) == (2, 1) and again["lease"] != lost["lease"]
    assert value(store.report("w2", reported(lost, result=b"void")))["applied"] is False
    assert value(store.report("w2", reported(again, result=b"ok")))["applied"]
    assert value(store.get("a", "client", 2))["result"] == b"ok"


def test_random_work_keeps_every_index_consistent(store, clock):
    """Thousands of submissions by three owners, leases, outcomes, kills, reruns and
    expiries, with far more than INLINE_IDS ids moving between the root and the id sets:
    statuses, owners, counts and the queue always agree with the jobs themselves."""
    import random

    from tests.unit.server.test_fuzz import check_store

    rng = random.Random(4242)
    held = []
    for step in range(1500):
        op = rng.random()
        owner = rng.choice(("alice", "bob", "carol"))
        if op < 0.3:
            value(store.submit(owner, [spec(str(step), max_failures=2)] * rng.choice((1, 1, 3, 40))))
        elif op < 0.55:
            held += value(store.claim([("w", rng.choice((1, 5, 70)))], 60.0))[0]
        elif op < 0.8 and held:
            job = held.pop(rng.randrange(len(held)))
            value(store.report("w", reported(job, rng.choice(("completed", "failed")), result=b"r")))
        elif op < 0.88:
            jobs = value(store.list(owner, "client", limit=5))
            if jobs:
                value(store.kill(owner, "client", rng.choice(jobs)["job_id"]))
        elif op < 0.95:
            done = value(store.list(owner, "client", status=rng.choice(("completed", "failed", "killed")), limit=3))
            if done:
                value(store.rerun(owner, "client", done[-1]["job_id"]))
        else:
            clock.now += rng.choice((10.0, 86400.0 * 2))
            value(store.expire_finished(1.0, limit=rng.choice((5, 500))))
        if step % 100 == 0:
            check_store(store)
    check_store(store)
    root = store.root
    assert root.inline and all(root.by_owner.get(o) for o in ("alice", "bob", "carol")), "both forms in use"
    for owner in ("alice", "bob", "carol"):
        listed = [j["job_id"] for j in value(store.list(owner, "client", limit=100000))]
        assert listed == sorted(listed, reverse=True) and len(listed) == len(set(listed))
