"""The worker part of the store: leases (claims, reports, renewals, expiry, give-backs).

A mixin of `JobStore` (the one class that writes to ZODB): every method runs its operation
through the store's writer thread with `self._run`, like the rest of the store.  Each lease
carries a random token that the worker names in its reports, renewals and give-backs."""
from __future__ import annotations

import random
from typing import Any, Callable

from BTrees.OOBTree import OOBTree
from twisted.internet import defer

from dsage.job import FINAL
from dsage.server import scheduler
from dsage.server.model import JobRecord, Root, large_fields, load_bytes, stored_size

MAX_OUTPUT = 1 << 20
OUTPUT_MARKER = "\n[... output truncated by dsage ...]\n"
#: how long a submission token is remembered (a client retrying after a lost reply).
TOKEN_TTL = 86400.0


def _cap_output(text: str) -> str:
    if len(text) <= MAX_OUTPUT:
        return text
    half = MAX_OUTPUT // 2
    return text[:half] + OUTPUT_MARKER + text[-half:]


#: the most payload and files the jobs leased in one message may carry together (beyond
#: one job's): a message holds at most `protocol.MAX_MESSAGE` bytes.
LEASE_BYTES = 64 << 20


class LeaseOps:
    """Leases of jobs to workers (mixed into JobStore)."""

    def claim(self, requests: list[tuple[str, int]], lease: float,
              early: Callable[[list[list[dict]]], None] | None = None) -> defer.Deferred:
        """Lease pending jobs to waiting workers, in request order; one list per request,
        also given to `early` before the commit (see `_run`)."""
        return self._run(self._claim, requests, lease, early=early)

    def _claim(self, root: Root, requests: list[tuple[str, int]], lease: float,
               fresh: list[JobRecord] | None = None) -> list[list[dict]]:
        now = self.now()
        self._promote(root, now)
        if fresh:
            fresh.sort(key=lambda job: scheduler.pending_key(job.priority, job.seq))
        out: list[list[dict]] = []
        capped = False
        for worker, n in requests:
            capacity = self.capacities.get(worker)
            got: list[dict] = []
            size = 0
            while len(got) < n:
                queue, key = _first(root, root.queues_for(capacity), capacity)
                i = _first_fitting(fresh, capacity) if fresh else None
                if i is not None and (key is None or scheduler.pending_key(fresh[i].priority, fresh[i].seq) < key):
                    job, queue = fresh[i], None     # made by this transaction, never queued
                elif queue is not None:
                    job = root.jobs[queue[key]]
                else:
                    break
                more = stored_size(job.payload) + stored_size(job.files)
                if got and size + more > LEASE_BYTES:
                    capped = True                   # the rest in another message
                    break
                if queue is None:
                    fresh.pop(i)
                    self._enter(root, job, "processing", fresh=True)
                else:
                    del queue[key]
                    if scheduler.backing_off(job.not_before, now):
                        self._delay(root, job)       # queued by a version without the delayed tree
                        continue
                    self._enter(root, job, "processing", unqueue=False)
                root.leased(job.seq)
                size += more
                got.append(self._lease(job, worker, now, lease))
            out.append(got)
        # A slot that got fewer jobs than it asked for because of their size asks again at once.
        self._retry_due = now if capped else root.delayed.minKey()[0] if root.delayed else None
        return out

    def _lease(self, job: JobRecord, worker: str, now: float, lease: float) -> dict:
        """Lease `job` (now processing) to `worker`: its next attempt, as sent to the worker."""
        job.attempt += 1
        job.lease_worker = worker
        tick = self.ticks()
        job.lease_expires = tick + lease
        job.lease = _lease_token()
        self.leased_at[job.job_id] = (job.lease, tick)
        job.started = now
        job.attempts = (*job.attempts, {"attempt": job.attempt, "worker": worker, "start": now,
                                        "end": None, "outcome": None})
        return {"job_id": job.job_id, "attempt": job.attempt, "lease": job.lease, "kind": job.kind,
                "name": job.name, "owner": job.owner, "timeout": job.timeout, "priority": job.priority,
                "payload": load_bytes(job.payload, self.warm), "files": load_bytes(job.files, self.warm)}

    def _delay(self, root: Root, job: JobRecord) -> None:
        if root.delayed is None:
            root.delayed = OOBTree()
        root.delayed[(job.not_before, job.job_id)] = job.job_id

    def _promote(self, root: Root, now: float) -> None:
        """Move backed-off jobs whose time has come into the pending queue (cheap when none)."""
        delayed = root.delayed
        while delayed:
            key = delayed.minKey()
            if scheduler.backing_off(key[0], now):
                return
            job = root.jobs[delayed.pop(key)]
            root.queue_of(job)[scheduler.pending_key(job.priority, job.seq)] = job.job_id

    def runnable(self) -> defer.Deferred:
        """Fires with whether a queued job could be leased now (the dispatch watchdog's question)."""
        return self._run(self._runnable)

    def _runnable(self, root: Root) -> bool:
        """Whether a job that states no memory need could be leased now (one that does may
        wait rightly beside a slot too small for it)."""
        delayed = root.delayed
        if root.pending:
            return True
        if not delayed or scheduler.backing_off(delayed.minKey()[0], self.now()):
            return False
        return not root.jobs[delayed[delayed.minKey()]].memory

    def next_retry(self) -> float | None:
        """The earliest time a backed-off job becomes runnable, or None, as of the last
        claim (whose leases have been delivered when the dispatcher asks: no transaction)."""
        return self._retry_due

    def report(self, worker: str, report: dict, take: int = 0, lease: float = 60.0) -> defer.Deferred:
        """Apply a worker's report on its attempt (refused, applied False, when stale) and, in
        the same transaction, lease it up to `take` next jobs (under "jobs")."""
        def one(out: dict) -> dict:
            return dict(out["results"][0], jobs=out["jobs"])
        return self.report_many(worker, [report], take, lease).addCallback(one)

    def report_many(self, worker: str, reports: list[dict], take: int = 0, lease: float = 60.0) -> defer.Deferred:
        """Apply several reports of a worker, then lease it up to `take` next jobs, in one
        transaction; fires with {"results": [per report], "jobs": [...]}."""
        return self._run_staged(large_fields(reports, ("result",)), self._report_and_take, worker, reports,
                                take, lease)

    def _report_and_take(self, root: Root, worker: str, reps: list[dict], take: int, lease: float) -> dict:
        results = [self._report(root, worker, rep) for rep in reps]
        return {"results": results, "jobs": self._claim(root, [(worker, take)], lease)[0] if take > 0 else []}

    def _report(self, root: Root, worker: str, rep: dict) -> dict:
        job = root.jobs.get(rep["job_id"])
        if not _holds(job, worker, rep["attempt"], rep.get("lease", 0)):
            return {"applied": False, "reason": "attempt is no longer current"}
        self.leased_at.pop(job.job_id, None)
        self.renewed.pop(job.job_id, None)
        job.output = _cap_output(rep.get("output") or "")
        job.cpu_time, job.wall_time, job.peak_memory = rep.get("cpu_time"), rep.get("wall_time"), rep.get("peak_memory")
        if rep["outcome"] == "completed":
            self._close_attempt(job, "completed")
            job.result = self._keep(rep.get("result") or b"")
            job.error = None
            self._enter(root, job, "completed")
            job.finished = self.now()
        else:
            # a failure's result is the job's exception, pickled (when it pickles)
            job.result = self._keep(rep["result"]) if rep.get("result") else None
            if rep.get("memory_exceeded"):      # its next attempt goes to a worker that gives it more
                job.memory = scheduler.retry_memory(job.memory, rep["memory_exceeded"])
            self._fail(root, job, rep.get("error") or "the job failed", "failed")
        return {"applied": True, "job": job.summary(True, self.warm), "final": job.status in FINAL}

    def renew(self, worker: str, held: list[tuple[int, int]], lease: float) -> defer.Deferred:
        """Extend the leases of a worker's attempts; fires with the ones it no longer owns."""
        return self._run(self._renew, worker, held, lease)

    def _renew(self, root: Root, worker: str, held: list, lease: float) -> list[list[int]]:
        """Renewals are kept in memory (`renewed`), not written: a heartbeat would write
        each running job's record again (500 bytes per job every 10 s, the file's growth
        under long jobs), and a restart gives every running job a fresh lease anyway
        (`grace`)."""
        now, lost = self.ticks(), []
        for entry in held:
            job = root.jobs.get(entry[0])
            if not _holds(job, worker, *_lease_of(entry)):
                lost.append(list(entry))
            else:
                # Renewal never carries a job past its timeout: the lease is the server's backstop.
                token, start = self.leased_at.get(job.job_id, (None, now))
                start = start if token == job.lease else now
                self.renewed[job.job_id] = (job.lease, min(now + lease, start + job.timeout + lease))
        return lost

    def lease_expires(self, job: JobRecord) -> float:
        """When the current lease of a processing job expires, renewals counted."""
        token, expires = self.renewed.get(job.job_id, (None, 0.0))
        return max(job.lease_expires, expires) if token == job.lease else job.lease_expires

    def expire(self) -> defer.Deferred:
        """Return jobs whose lease expired to the queue (or fail them); fires with summaries."""
        return self._run(self._expire)

    def _expire(self, root: Root) -> list[dict]:
        now, out = self.ticks(), []
        root.turn_tokens(self.now(), TOKEN_TTL)
        for job_id in list(root.status_ids("processing")):
            job = root.jobs[job_id]
            if self.lease_expires(job) < now:
                self._fail(root, job, f"lease of worker {job.lease_worker} expired "
                                      f"(worker lost, or job past its timeout)", "lost")
                out.append(job.summary(False))
        # Drop what is kept of leases that have ended.
        def current(kept: dict) -> dict:
            return {job_id: r for job_id, r in kept.items()
                    if (job := root.jobs.get(job_id)) is not None and job.status == "processing" and job.lease == r[0]}
        self.renewed, self.leased_at = current(self.renewed), current(self.leased_at)
        return out

    def grace(self, lease: float) -> defer.Deferred:
        """At start: give running jobs a fresh lease, so that their workers can reconnect and
        report instead of the jobs being re-run; fires with how many there are."""
        def extend(root: Root) -> int:
            # A lease of an earlier server counts nothing here: its expiry is on that
            # process's monotonic clock (or, in older databases, on the wall clock).
            ids, now = list(root.status_ids("processing")), self.ticks()
            for job_id in ids:
                job = root.jobs[job_id]
                job.lease_expires = now + lease
                self.leased_at[job_id] = (job.lease, now)
            return len(ids)
        return self._run(extend)

    def release(self, worker: str, held: list[tuple[int, int]], outcome: str = "undelivered") -> defer.Deferred:
        """Put leased jobs back in the queue, uncounted: never started ("undelivered"),
        stopped with their worker ("interrupted"), or of a revoked worker ("revoked")."""
        return self._run(self._release, worker, held, outcome)

    def _release(self, root: Root, worker: str, held: list, outcome: str) -> int:
        n = 0
        for entry in held:
            job = root.jobs.get(entry[0])
            if not _holds(job, worker, *_lease_of(entry)):
                continue
            n += 1
            stops = sum(a.get("outcome") == "interrupted" for a in job.attempts)
            if outcome == "interrupted" and stops >= FREE_INTERRUPTIONS:
                # A job that keeps stopping its workers (say, one that signals its own) fails.
                self._fail(root, job, f"dsage: its worker stopped while it ran ({stops + 1} times)", outcome)
                continue
            self._close_attempt(job, outcome)
            job.started = None
            self._enter(root, job, "new", keep_place=True)
        return n


#: times a job may be given back by a stopping worker before each such stop counts as a failure.
FREE_INTERRUPTIONS = 2


def _lease_token() -> int:
    """A new lease's token: random, so that a lease whose transaction never committed
    (delivered early, then the commit failed or the server died) is never taken for a
    later lease of the same attempt, even after a restart."""
    return random.getrandbits(62) | 1


def _first(root: Root, queues: list, capacity: int | None) -> tuple[Any, Any]:
    """(the queue whose first job goes first to a slot of `capacity` MiB, that job's key),
    or (None, None).  The first job of the queue of the slot's own size may need more than
    it gives: that queue is passed over."""
    if len(queues) == 1 and queues[0] is root.pending:
        return queues[0], queues[0].minKey()
    for key, i in sorted((q.minKey(), i) for i, q in enumerate(queues)):
        if scheduler.fits(root.jobs[queues[i][key]].memory, capacity):
            return queues[i], key
    return None, None


def _first_fitting(fresh: list[JobRecord], capacity: int | None) -> int | None:
    """The index of the first of `fresh` that fits a slot of `capacity` MiB."""
    return next((i for i, job in enumerate(fresh) if scheduler.fits(job.memory, capacity)), None)


def _holds(job: JobRecord | None, worker: str, attempt: int, token: int) -> bool:
    """Whether `worker` holds the current lease of `job` (its attempt and token)."""
    return (job is not None and job.status == "processing" and job.attempt == attempt
            and job.lease == token and job.lease_worker == worker)


def _lease_of(held: list[int]) -> tuple[int, int]:
    """The (attempt, token) of a worker's held entry [job_id, attempt(, token)]: workers
    before protocol 2.0 sent no token (0, which no lease has)."""
    return held[1], (held[2] if len(held) > 2 else 0)
