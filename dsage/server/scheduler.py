"""Scheduling policy: queue order, retry back-off, spec validation, and the long-poll
dispatcher that pairs waiting worker slots with pending jobs.  No I/O of its own."""
from __future__ import annotations

import math
from typing import Any, Callable

from twisted.internet import defer
from twisted.logger import Logger

from dsage import errors
from dsage.job import (KINDS, MAX_FAILURES, MAX_JOB_BYTES, MAX_MEMORY, MAX_PRIORITY, MAX_TIMEOUT, MIB, carried,
                       safe_file_name)
from dsage.protocol import encode

RETRY_BASE = 1.0
RETRY_MAX = 60.0


#: a queue place (`seq`) is a turn times TURN plus the order of submission (below TURN).
TURN = 1 << 32


def pending_key(priority: int, seq: int) -> tuple[int, int]:
    """Queue order: lower priority value first, then by turn (`place`), then first in,
    first out."""
    return (priority, seq)


def memory_class(memory: int | None) -> int:
    """The queue a job waits in by the MiB it needs: 0 if it says nothing, else one per
    quarter octave (a worker takes from the queues up to its own size's)."""
    return 1 + max(0, math.ceil(4 * math.log2(memory))) if memory else 0


def classes_for(capacity: int | None) -> int:
    """The highest queue a worker slot that gives each job `capacity` MiB takes from (the
    jobs of its own size's queue only when they fit); one that says nothing takes from 0 only."""
    return memory_class(capacity) if capacity else 0


def fits(memory: int | None, capacity: int | None) -> bool:
    """Whether a job that needs `memory` MiB may run where each job gets `capacity` MiB."""
    return not memory or (capacity is not None and memory <= capacity)


def retry_memory(memory: int | None, exceeded: int) -> int:
    """What a job that ran out of memory at `exceeded` MiB asks for at its next attempt."""
    return min(MAX_MEMORY, max(memory or 0, 2 * exceeded))


def place(turn: int, order: int) -> int:
    """A queue place: `turn`, then `order` (a counter of submissions) within it.

    Users take turns (start-time fair queueing): each job of a user gets the turn after the
    user's last one, and never one before the queue's present turn (the turn of the last job
    leased).  A user who queues 100,000 jobs takes the next 100,000 turns; another who then
    queues one gets the present turn + 1, and waits for one job, not 100,000.  Each user's
    jobs stay first in, first out; a user alone sees plain FIFO."""
    return turn * TURN + order % TURN


def turn_of(seq: int) -> int:
    """The turn of a queue place (0 for places given before turns existed)."""
    return seq // TURN


def retry_delay(failures: int) -> float:
    """Seconds a job waits before its next attempt after `failures` failures."""
    if failures <= 1:
        return 0.0
    return min(RETRY_MAX, RETRY_BASE * 2 ** (failures - 2))


def backing_off(not_before: float, now: float) -> bool:
    """Whether a job that may run again from `not_before` still waits at `now` (wall time).
    A time further ahead than any back-off lasts is past: the clock stepped back."""
    return now < not_before <= now + RETRY_MAX


def validate_spec(spec: Any) -> dict:
    """Check a submitted job description; ValueError naming the bad field."""
    if not isinstance(spec, dict):
        raise ValueError("a job must be a map")
    kind = spec.get("kind")
    if kind not in KINDS:
        raise ValueError(f"job kind must be one of {', '.join(KINDS)}")
    payload = spec.get("payload")
    if not isinstance(payload, bytes):
        raise ValueError("job payload must be bytes")
    files = spec.get("files") or {}
    if not isinstance(files, dict) or not all(isinstance(k, str) and isinstance(v, bytes)
                                              for k, v in files.items()):
        raise ValueError("job files must map names to bytes")
    for name in files:
        if not safe_file_name(name):
            raise ValueError(f"bad job file name {name!r}: a relative path inside the job's folder, without '..'")
    if carried(spec) > MAX_JOB_BYTES:
        raise ValueError(f"a job may carry at most {MAX_JOB_BYTES // MIB} MiB of payload and files")
    name = spec.get("name") or kind
    timeout = spec.get("timeout", 600.0)
    priority = spec.get("priority", 5)
    max_failures = spec.get("max_failures", 3)
    if not isinstance(timeout, (int, float)) or not 0 < timeout <= MAX_TIMEOUT:
        raise ValueError("timeout must be a number of seconds between 0 and 30 days")
    if not isinstance(priority, int) or not -MAX_PRIORITY <= priority <= MAX_PRIORITY:
        raise ValueError("priority must be an integer")
    if not isinstance(max_failures, int) or not 1 <= max_failures <= MAX_FAILURES:
        raise ValueError(f"max_failures must be an integer from 1 to {MAX_FAILURES}")
    memory = spec.get("memory")
    if memory is not None and (isinstance(memory, bool) or not isinstance(memory, (int, float))
                               or not 0 < memory <= MAX_MEMORY):
        raise ValueError(f"memory must be the MiB a job needs, more than 0 and at most {MAX_MEMORY}, or None")
    return {"kind": kind, "payload": payload, "name": str(name)[:200], "timeout": float(timeout),
            "priority": priority, "max_failures": max_failures,
            "files": encode(files) if files else b"", "memory": None if memory is None else math.ceil(memory)}


class Dispatcher:
    """Long-poll: worker slots wait here until a job can be leased to them."""

    log = Logger()

    def __init__(self, claim: Callable[[list[tuple[str, int]], Callable], defer.Deferred],
                 release: Callable[[str, list], defer.Deferred], next_retry: Callable[[], float | None],
                 clock, now: Callable[[], float] | None = None,
                 capacity_of: Callable[[str], int | None] = lambda worker: None) -> None:
        self._claim = claim
        #: worker -> the MiB it gives each job (the store leases by it).
        self.capacity_of = capacity_of
        self._release = release
        self._next_retry = next_retry
        self.clock = clock
        #: the wall clock `next_retry`'s times are on (the store's; the reactor's timers are
        #: on the monotonic one: `dsage.clock`).
        self.now = now or clock.seconds
        #: the slots waiting for work, in arrival order: key -> (worker, n, deferred).
        self.waiting: dict[int, tuple[str, int, defer.Deferred]] = {}
        #: the waiting slots a claim (a round's or a submission's) is in flight for: no
        #: other claim is made for them meanwhile.
        self.claiming: set[int] = set()
        self._serial = 0
        self._busy = False
        self._again = False
        #: the capacities of slots that a round found no job for since work last arrived
        #: (a slot of another capacity may still find one); None stands for "says nothing".
        self.starved: set[int | None] = set()
        self._arrivals = 0
        self._retry_call = None

    def take(self, worker: str, n: int) -> defer.Deferred:
        """Fires with a non-empty list of leased jobs for `worker` (at most `n`)."""
        self._serial += 1
        key = self._serial
        d = defer.Deferred(lambda _: self._leave(key))
        self.waiting[key] = (worker, max(1, n), d)
        if self.capacity_of(worker) not in self.starved:     # else a round found nothing for its size
            self.kick()
        return d

    def unserved(self) -> bool:
        """Whether slots wait with no claim round running or in flight for them."""
        return not self._busy and len(self.waiting) > len(self.claiming)

    def _leave(self, key: int) -> None:
        self.waiting.pop(key, None)
        self.claiming.discard(key)      # jobs claimed for it meanwhile are released in deliver

    def withdraw(self, d: defer.Deferred) -> None:
        """Answer a waiting take with no jobs (its worker no longer wants them)."""
        for key, (_, _, waiting) in list(self.waiting.items()):
            if waiting is d:
                self._leave(key)
                d.callback([])
                return

    def work_arrived(self) -> None:
        """New or returned jobs may be pending: try the waiting slots again."""
        self.starved.clear()
        self._arrivals += 1
        self.kick()

    def kick(self) -> None:
        """Run one claim round for every waiting slot (one store transaction, whose leases
        are delivered while it commits)."""
        if len(self.waiting) <= len(self.claiming) or (self.starved and all(
                self.capacity_of(w) in self.starved for key, (w, _n, _d) in self.waiting.items()
                if key not in self.claiming)):
            return
        if self._busy:
            self._again = True
            return
        self._busy = True
        entries, arrivals = self.snapshot()
        d = self._claim([(w, n) for _key, (w, n, _d) in entries],
                        lambda results: self.deliver(results, entries, arrivals))
        d.addErrback(self.unclaim, entries)
        d.addBoth(self._round_done)

    def snapshot(self, jobs: int | None = None) -> tuple[list, int]:
        """The waiting slots no claim is in flight for (the first of them with room for
        `jobs` jobs, when given: a lone job does not look at every idle worker), now reserved
        for the caller's claim (whose results go to `deliver`), and the arrival count to
        hand back with them."""
        entries, room = [], 0
        for key, slot in self.waiting.items():
            if key not in self.claiming:
                entries.append((key, slot))
                room += slot[1]
                if jobs is not None and room >= jobs:
                    break
        self.claiming.update(key for key, _ in entries)
        return entries, self._arrivals

    def unclaim(self, failure, entries: list) -> None:
        """A claim for `entries` failed: they wait unreserved again (leases delivered before
        a commit that failed are refused when reported, and their jobs are still queued)."""
        if not failure.check(errors.DsageError):
            self.log.failure("claim failed", failure)
        self.unreserve(entries)
        self.starved.clear()

    def unreserve(self, entries: list) -> None:
        """`entries` from `snapshot` whose claim was not made (a submission refused before
        it): they wait unreserved again, for the next claim."""
        self.claiming.difference_update(key for key, _ in entries)

    def deliver(self, results: list[list[dict]], entries: list, arrivals: int) -> None:
        """Hand claimed jobs to the slots they were claimed for (back to the queue if gone)."""
        starved = set()
        self.claiming.difference_update(key for key, _ in entries)
        for (key, (worker, n, d)), jobs in zip(entries, results):
            if len(jobs) < n:
                starved.add(self.capacity_of(worker))
            if not jobs:
                continue
            if self.waiting.pop(key, None) is not None:
                d.callback(jobs)
            else:
                # The slot went away (closed, or withdrawn) while the claim committed: the
                # jobs go back, and the slots still waiting are tried again once they are.
                self._release(worker, [[j["job_id"], j["attempt"], j["lease"]] for j in jobs]).addCallbacks(
                    lambda _: self.work_arrived(), lambda f: self.log.failure("release failed", f))
        if starved and arrivals == self._arrivals:
            # Nothing arrived while this round ran, so the queue really is empty (or waiting)
            # for slots of these capacities.
            self.starved |= starved
            self._schedule_retry(self._next_retry())
        self.kick()         # slots skipped while this claim was in flight

    def _schedule_retry(self, when: float | None) -> None:
        if when is None:
            return
        if self._retry_call is not None and self._retry_call.active():
            self._retry_call.cancel()
        delay = min(max(0.0, when - self.now()), RETRY_MAX) + 0.01     # no longer: the clock stepped back
        self._retry_call = self.clock.callLater(delay, self.work_arrived)

    def _round_done(self, _: Any) -> None:
        self._busy = False
        if self._again:
            self._again = False
            self.kick()

    def stop(self) -> None:
        """Cancel timers."""
        if self._retry_call is not None and self._retry_call.active():
            self._retry_call.cancel()
