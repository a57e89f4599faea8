"""Queue policy and the long-poll dispatcher, driven by hand-fired Deferreds and a Clock."""
from __future__ import annotations

import pytest
from twisted.internet import defer
from twisted.internet.task import Clock

from dsage.server.scheduler import Dispatcher, retry_delay


class FakeClaims:
    """Records claim rounds; the test decides what each returns."""

    def __init__(self) -> None:
        self.rounds: list[tuple[list, defer.Deferred]] = []
        self.released: list = []
        self.retry_at = None
        #: what release returns: committed at once unless a test sets a Deferred here.
        self.release_done: defer.Deferred | None = None

    def claim(self, requests, early):
        """Like the store: the test fires the round with its leases, which go to `early`
        (delivered) before the Deferred's callbacks (committed)."""
        d = defer.Deferred()
        self.rounds.append((requests, d, early))
        return d.addCallback(lambda results: (early(results), results)[1])

    def release(self, worker, held):
        self.released.append((worker, held))
        return self.release_done or defer.succeed(len(held))

    def next_retry(self):
        return self.retry_at


def make():
    claims, clock = FakeClaims(), Clock()
    return claims, clock, Dispatcher(claims.claim, claims.release, claims.next_retry, clock)


def test_take_is_answered_when_a_job_is_claimed():
    """A waiting slot gets the jobs its claim round returned."""
    claims, clock, disp = make()
    d = disp.take("w1", 2)
    assert len(claims.rounds) == 1 and claims.rounds[0][0] == [("w1", 2)]
    got = []
    d.addCallback(got.append)
    claims.rounds[0][1].callback([[{"job_id": 1, "attempt": 1}]])
    assert got == [[{"job_id": 1, "attempt": 1}]]
    assert not disp.waiting


def test_empty_queue_parks_the_slot_until_work_arrives():
    """With nothing pending the slot waits, and no claim runs until work arrives."""
    claims, clock, disp = make()
    d = disp.take("w1", 1)
    claims.rounds[0][1].callback([[]])
    assert not d.called and len(disp.waiting) == 1
    disp.kick()
    disp.take("w2", 1)
    assert len(claims.rounds) == 1, "no claim while the queue is known to be empty"
    disp.work_arrived()
    assert len(claims.rounds) == 2 and claims.rounds[1][0] == [("w1", 1), ("w2", 1)]
    claims.rounds[1][1].callback([[{"job_id": 5, "attempt": 1}], []])
    assert d.called and len(disp.waiting) == 1


def test_a_slot_that_gives_more_memory_is_tried_though_smaller_ones_found_nothing():
    """A round that finds nothing for slots of one size says nothing of slots of another:
    the jobs left may need more memory than the first gave.  A slot of a size already found
    starved waits without a round."""
    claims, clock = FakeClaims(), Clock()
    sizes = {"small": 1000, "small2": 1000, "big": 8000}
    disp = Dispatcher(claims.claim, claims.release, claims.next_retry, clock, capacity_of=sizes.get)
    disp.take("small", 1)
    claims.rounds[0][1].callback([[]])
    disp.take("small2", 1)
    assert len(claims.rounds) == 1
    big = disp.take("big", 1)
    assert len(claims.rounds) == 2
    claims.rounds[1][1].callback([[], [], [{"job_id": 9, "attempt": 2}]])
    assert big.called and disp.starved == {1000}


def test_work_arriving_during_a_round_is_not_lost():
    """A submission that lands while a claim round runs triggers another round."""
    claims, clock, disp = make()
    d = disp.take("w1", 1)
    disp.work_arrived()              # arrives while round 1 is in flight
    claims.rounds[0][1].callback([[]])
    assert len(claims.rounds) == 2, "a second round must run"
    claims.rounds[1][1].callback([[{"job_id": 2, "attempt": 1}]])
    assert d.called


def test_jobs_claimed_for_a_vanished_slot_are_released():
    """If the slot's connection closed during the round, its jobs go back."""
    claims, clock, disp = make()
    d = disp.take("w1", 1)
    d.addErrback(lambda f: None)
    d.cancel()
    assert not disp.waiting
    claims.rounds[0][1].callback([[{"job_id": 3, "attempt": 1, "lease": 9}]])
    assert claims.released == [("w1", [[3, 1, 9]])]


def test_jobs_released_from_a_vanished_slot_reach_the_slots_still_waiting():
    """The release of a vanished slot's jobs commits after the next round found the queue
    empty: once it commits, the slots still waiting are tried again (else the jobs sit
    queued with idle workers until something else arrives)."""
    claims, clock, disp = make()
    later = claims.release_done = defer.Deferred()
    gone = disp.take("w1", 1)
    gone.addErrback(lambda f: None)
    disp.take("w2", 1)                 # joins while round 1 runs
    gone.cancel()
    claims.rounds[0][1].callback([[{"job_id": 3, "attempt": 1, "lease": 9}]])
    assert claims.released == [("w1", [[3, 1, 9]])]
    claims.rounds[1][1].callback([[]])     # the release has not committed yet: nothing pending
    assert len(claims.rounds) == 2
    later.callback(1)
    assert len(claims.rounds) == 3 and claims.rounds[2][0] == [("w2", 1)]


@pytest.mark.parametrize("wall", [None, 1_800_000_000.0])
def test_backed_off_jobs_wake_the_dispatcher_when_due(wall):
    """When only backed-off jobs are pending, a timer tries again when the first is due.
    The store says when in wall time; the reactor's timers may run on another clock (the
    monotonic one: `dsage.clock`): the wait is the difference in wall time."""
    claims, clock = FakeClaims(), Clock()
    disp = Dispatcher(claims.claim, claims.release, claims.next_retry, clock,
                      now=None if wall is None else lambda: wall)
    claims.retry_at = (wall or 0.0) + 5.0
    disp.take("w1", 1)
    claims.rounds[0][1].callback([[]])
    clock.advance(4.0)
    assert len(claims.rounds) == 1
    clock.advance(1.1)
    assert len(claims.rounds) == 2


def test_a_back_off_due_hours_ahead_is_tried_within_a_back_off_s_longest():
    """A backed-off job due further ahead than any back-off lasts (the wall clock stepped
    back) is tried again within RETRY_MAX, not hours later."""
    from dsage.server.scheduler import RETRY_MAX

    claims, clock, disp = make()
    claims.retry_at = 4 * 3600.0
    disp.take("w1", 1)
    claims.rounds[0][1].callback([[]])
    clock.advance(RETRY_MAX + 0.1)
    assert len(claims.rounds) == 2


def test_retry_delay_grows_and_is_capped():
    """The first retry is immediate, later ones double, up to a minute."""
    assert retry_delay(1) == 0.0
    assert retry_delay(2) < retry_delay(3) < retry_delay(4)
    assert retry_delay(50) == 60.0


def test_a_withdrawn_take_is_answered_empty_and_leaves_the_line():
    """A worker giving jobs back has its waiting take answered with nothing; the next
    claim round serves the other slots only."""
    claims, clock, disp = make()
    first = disp.take("w1", 5)
    claims.rounds[0][1].callback([[]])
    disp.take("w2", 1)
    got = []
    first.addCallback(got.append)
    disp.withdraw(first)
    assert got == [[]] and len(disp.waiting) == 1
    disp.work_arrived()
    assert claims.rounds[-1][0] == [("w2", 1)]


def test_a_slot_is_claimed_for_by_one_claim_at_a_time():
    """A submission's claim (snapshot) skips the slots a round is claiming for, so the same
    slot is never given jobs twice (the second lot would go back as undelivered)."""
    claims, clock, disp = make()
    first = disp.take("w1", 1)
    assert claims.rounds[0][0] == [("w1", 1)]
    entries, arrivals = disp.snapshot()
    assert entries == [], "w1 is reserved by the round in flight"
    disp.take("w2", 1)
    entries, arrivals = disp.snapshot()
    assert [slot[0] for _key, slot in entries] == ["w2"]
    claims.rounds[0][1].callback([[{"job_id": 1, "attempt": 1}]])
    assert first.called
    assert len(claims.rounds) == 1, "w2 is the submission's to serve"
    disp.deliver([[{"job_id": 2, "attempt": 1}]], entries, arrivals)
    assert not disp.waiting and not disp.claiming and claims.released == []


def test_a_failed_claim_frees_its_slots():
    """A submission refused (quota, full disk) leaves its slots waiting for the next claim."""
    from twisted.python.failure import Failure

    from dsage import errors

    claims, clock, disp = make()
    disp.take("w1", 1)
    claims.rounds[0][1].callback([[]])
    entries, arrivals = disp.snapshot()
    disp.unclaim(Failure(errors.RemoteError("quota")), entries)
    disp.work_arrived()
    assert claims.rounds[-1][0] == [("w1", 1)] and len(claims.rounds) == 2


def test_a_slot_gone_during_a_claim_does_not_hide_the_others():
    """A reserved slot that goes away (its connection closed) no longer counts as reserved:
    a slot arriving next is claimed for at once."""
    claims, clock, disp = make()
    gone = disp.take("w1", 1)
    gone.addErrback(lambda f: None)
    claims.rounds[0][1].callback([[]])      # nothing queued yet
    entries, arrivals = disp.snapshot()     # a submission claims for w1 ...
    gone.cancel()                           # ... which disconnects meanwhile
    disp.take("w2", 1)
    disp.work_arrived()
    assert len(claims.rounds) == 2 and claims.rounds[1][0] == [("w2", 1)]


def test_leases_delivered_before_a_failed_commit_leave_the_queue_to_be_claimed_again():
    """A round's leases go to the slots while its transaction commits; when the commit
    then fails, the jobs are still queued in the database, so the dispatcher claims again
    for the next slot instead of believing the queue empty."""
    from twisted.python.failure import Failure

    from dsage import errors

    claims, clock, disp = make()
    first = disp.take("w1", 2)
    requests, d, early = claims.rounds[0]
    early([[{"job_id": 1, "attempt": 1}]])           # delivered: fewer than asked for
    assert first.called and not disp.waiting
    d.errback(Failure(errors.RemoteError("disk full")))
    disp.take("w2", 1)
    assert len(claims.rounds) == 2 and claims.rounds[1][0] == [("w2", 1)]


def test_a_vanished_slots_leases_go_back_to_the_queue_of_a_real_store(tmp_path):
    """Jobs leased for a slot that closed before its leases went out are given back by
    their tokens: queued again in their place, no failure counted."""
    from tests.support.store import memory_store, spec, value

    store = memory_store(tmp_path)
    held_back = []
    disp = Dispatcher(lambda reqs, early: store.claim(reqs, 10.0, lambda r: held_back.append((early, r))),
                      store.release, store.next_retry, Clock())
    try:
        value(store.submit("a", [spec("x")]))
        d = disp.take("w1", 1)
        d.addErrback(lambda f: None)
        d.cancel()
        [(early, leases)] = held_back
        early(leases)                   # the leases reach the dispatcher after the slot left
        rec = value(store.get("a", "client", 1))
        assert rec["status"] == "new" and rec["failures"] == 0
        assert [a["outcome"] for a in rec["attempts"]] == ["undelivered"]
    finally:
        store.stop()


def test_a_submission_reserves_only_the_slots_its_jobs_need():
    """A submission of k jobs claims for the first waiting takes with room for k, not for
    every idle worker (a lone job with 500 workers idle looked at all 500); the others
    stay waiting and unreserved, and a round (no k) still takes them all."""
    claims, clock, disp = make()
    disp.take("w1", 2)
    claims.rounds[0][1].callback([[]])           # the queue is empty: w1 parks
    for w in ("w2", "w3", "w4"):
        disp.take(w, 1)
    entries, arrivals = disp.snapshot(1)
    assert [slot[:2] for _key, slot in entries] == [("w1", 2)]
    entries3, _ = disp.snapshot(3)
    assert [slot[:2] for _key, slot in entries3] == [("w2", 1), ("w3", 1), ("w4", 1)]
    disp.unreserve(entries3)
    entries4, _ = disp.snapshot(4)
    assert [slot[:2] for _key, slot in entries4] == [("w2", 1), ("w3", 1), ("w4", 1)], "all there are"
    disp.unreserve(entries4)
    disp.deliver([[{"job_id": 1, "attempt": 1}]], entries, arrivals)
    assert disp.claiming == set() and sorted(slot[0] for slot in disp.waiting.values()) == ["w2", "w3", "w4"]
    round_entries, _ = disp.snapshot()
    assert len(round_entries) == 3
