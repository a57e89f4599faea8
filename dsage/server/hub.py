"""What the server's connections share: the `Hub` (the store, the dispatcher, who is
connected, the running jobs' live output)."""
from __future__ import annotations

import collections
from typing import TYPE_CHECKING, Any

from twisted.internet import defer, task
from twisted.logger import Logger

from dsage import tls
from dsage.server.load import ReactorLoad
from dsage.server.scheduler import Dispatcher, fits

if TYPE_CHECKING:
    from dsage.server.connections import ServerProtocol

#: seconds a read of a running job waits for its worker's output before it shows the copy
#: of the last heartbeat.
OUTPUT_WAIT = 1.0
#: the most of a running job's output the server keeps in memory to show (a worker sends
#: the last 16 KiB).
LIVE_OUTPUT_CHARS = 32 << 10
#: seconds between two notes to one owner that a job of theirs waits for more memory.
WAITS_EVERY = 30.0
#: seconds the dispatch watchdog looks again before it calls what it saw a stall.
STALL_CONFIRM = 1.0
CLIENT_ROLES = ("client", "admin")
ADMIN = ("admin",)
WORKER = ("worker",)


class Hub:
    """What the connections share: the store, the dispatcher and who is connected."""

    log = Logger()

    def __init__(self, store, clock, *, lease_seconds: float, heartbeat_seconds: float,
                 ca: tls.Authority | None = None, address: str = "", max_queued_per_user: int = 1_000_000,
                 max_connections: int = 5_000) -> None:
        self.store = store
        self.max_queued_per_user = max_queued_per_user
        self.max_connections = max_connections
        self.open_connections = 0
        self.clock = clock
        self.lease_seconds = lease_seconds
        self.heartbeat_seconds = heartbeat_seconds
        self.ca = ca
        self.address = address
        self.connections: dict[str, set[ServerProtocol]] = collections.defaultdict(set)
        self.finished_times: collections.deque = collections.deque(maxlen=100_000)
        self.finished_total = 0
        #: times the watchdog found worker slots idle beside runnable jobs, and started dispatch.
        self.dispatch_restarts = 0
        #: owner -> when they were last told that a job of theirs waits for more memory.
        self._waits_said: dict[str, float] = {}
        #: job id -> (attempt, worker, the end of its output), for running jobs: not stored,
        #: shown by get_job until the job's report brings the whole output.
        self.live_output: dict[int, tuple[int, str, str]] = {}
        self.load = ReactorLoad(clock)
        self.dispatcher = Dispatcher(lambda reqs, early: store.claim(reqs, lease_seconds, early), store.release,
                                     store.next_retry, clock, store.now, store.capacities.get)

    def attach(self, conn: ServerProtocol) -> None:
        """A connection said hello."""
        self.connections[conn.identity].add(conn)
        self._note_capacity(conn.identity)

    def detach(self, conn: ServerProtocol) -> None:
        """A connection closed."""
        conns = self.connections.get(conn.identity)
        if conns is not None:
            conns.discard(conn)
            if not conns:
                del self.connections[conn.identity]
            self._note_capacity(conn.identity)

    def _note_capacity(self, name: str) -> None:
        """Tell the store the memory a worker gives each job: the least its connections
        announce (one bundle may serve several machines)."""
        sizes = [c.info.get("job_memory") for c in self.connections.get(name, ()) if c.role == "worker"]
        if not sizes:
            self.store.capacities.pop(name, None)
        else:
            self.store.capacities[name] = None if None in sizes else min(sizes)

    def with_live_output(self, rec: dict) -> dict:
        """`rec` (a job's summary) with the output its worker last sent, if it is running."""
        live = self.live_output.get(rec["job_id"])
        if live is not None and rec["status"] == "processing" and rec["attempts"] and \
                (rec["attempts"][-1].get("attempt"), rec["attempts"][-1].get("worker")) == live[:2]:
            rec["output"] = live[2]
        return rec

    def running_on(self, worker: str | None, job_id: int, attempt: int | None) -> ServerProtocol | None:
        """The connection of `worker` that holds that attempt of the job, if any."""
        return next((c for c in self.connections.get(worker, ()) if c.role == "worker"
                     and (job_id, attempt) in c.running), None)

    def fresh_output(self, rec: dict) -> dict | defer.Deferred:
        """`rec` with its running job's output as of now, asked of the worker that runs it
        (as `condor_tail` does), else as of that worker's last heartbeat."""
        last = rec["attempts"][-1] if rec["status"] == "processing" and rec["attempts"] else {}
        key = (rec["job_id"], last.get("attempt"))
        conn = self.running_on(last.get("worker"), *key)
        if conn is None:
            return self.with_live_output(rec)

        def answered(reply: object) -> dict:
            text = reply.get("output") if isinstance(reply, dict) else None
            if isinstance(text, str) and key in conn.running:       # not finished meanwhile
                self.live_output[key[0]] = (key[1], last["worker"], text[-LIVE_OUTPUT_CHARS:])
            return self.with_live_output(rec)
        d = conn.call("output", job=list(key))
        d.addTimeout(OUTPUT_WAIT, self.clock)
        return d.addCallbacks(answered, lambda f: self.with_live_output(rec))

    def job_finished(self, summary: dict) -> None:
        """Tell the owner's client connections that a job reached a final status."""
        self.finished_times.append(self.clock.seconds())
        self.finished_total += 1
        for conn in list(self.connections.get(summary["owner"], ())):
            if conn.role in CLIENT_ROLES:
                conn.push_done(summary)

    def check_fit(self, summary: dict, asked: bool = False) -> bool:
        """A queued job that needs more memory than any connected worker gives (it ran out of
        memory, or `asked` for it) waits for one: say so in the log and to its owner's
        clients, whose waits would otherwise be silent (once in WAITS_EVERY s per owner: a
        large map's jobs would each say it); True if the job waits so."""
        need = summary.get("memory")
        sizes = list(self.store.capacities.values())
        if not need or not sizes or any(fits(need, size) for size in sizes):
            return False
        now = self.clock.seconds()
        if now - self._waits_said.get(summary["owner"], float("-inf")) < WAITS_EVERY:
            return True
        self._waits_said[summary["owner"]] = now
        most = max(size or 0 for size in sizes)
        how = "asks for" if asked else "ran out of memory and needs"
        reason = (f"job {summary['job_id']} {how} {need} MiB; no connected worker gives a job that much "
                  f"(the most: {most} MiB): it waits for one")
        self.log.warn("{reason}", reason=reason)
        for conn in list(self.connections.get(summary["owner"], ())):
            if conn.role in CLIENT_ROLES:
                conn.send_event("job_waits", {"job_id": summary["job_id"], "reason": reason})
        return True

    def stop_running(self, running: dict | None) -> None:
        """Order the worker that runs an attempt to kill it (it sends no report of a killed
        attempt: its slot counts as free from now)."""
        if running and running.get("worker"):
            self.live_output.pop(running["job_id"], None)
            for conn in list(self.connections.get(running["worker"], ())):
                conn.running.discard((running["job_id"], running["attempt"]))
                conn.send_event("kill", {"job_id": running["job_id"], "attempt": running["attempt"]})

    def drop(self, name: str) -> None:
        """Close every connection of an identity (it was revoked)."""
        for conn in list(self.connections.get(name, ())):
            conn.transport.loseConnection()

    def worker_connections(self) -> list[ServerProtocol]:
        """The connected workers."""
        return [c for conns in self.connections.values() for c in conns if c.role == "worker"]

    def workers(self) -> list[dict]:
        """The connected workers and how many of their slots are busy."""
        return [dict(c.info, busy=len(c.running)) for c in self.worker_connections()]

    def status(self) -> defer.Deferred:
        """Queue depth, jobs by status, workers, slots, the recent rate of finished jobs and
        the server's own load (`ReactorLoad`)."""
        now = self.clock.seconds()
        recent = sum(1 for t in self.finished_times if t >= now - 60)
        workers = self.worker_connections()
        load = self.load.busy()

        def build(counts: dict) -> dict:
            return {"jobs": counts, "queued": counts.get("new", 0), "workers": len(workers),
                    "slots": sum(c.info.get("slots", 0) for c in workers),
                    "busy": sum(len(c.running) for c in workers), "jobs_per_second": recent / 60.0,
                    "finished_total": self.finished_total, "server_load": load,
                    "dispatch_restarts": self.dispatch_restarts}
        return self.store.status().addCallback(build)

    def drop_silent_workers(self) -> None:
        """Close worker connections that have been silent longer than a lease (a cut link
        leaves TCP open for minutes; their pending takes must not get jobs)."""
        limit = max(self.lease_seconds, 3 * self.heartbeat_seconds)
        now = self.clock.seconds()
        for conn in self.worker_connections():
            if now - conn.last_heard > limit:
                self.log.warn("worker {name} silent for {s:.0f} s: dropping its connection",
                              name=conn.identity, s=now - conn.last_heard)
                conn.transport.abortConnection()

    def reap(self) -> defer.Deferred:
        """Return jobs with expired leases to the queue, or fail them."""
        self.drop_silent_workers()
        def done(summaries: list[dict]) -> None:
            for s in summaries:
                self.log.warn("job {job_id}: lease expired ({status} now)", job_id=s["job_id"], status=s["status"])
                if s["status"] == "failed":
                    self.job_finished(s)
            if summaries:
                self.dispatcher.work_arrived()
            self.watch_dispatch().addErrback(lambda f: self.log.failure("the dispatch watchdog failed", f))
        return self.store.expire().addCallback(done)

    def watch_dispatch(self, confirm: float = STALL_CONFIRM) -> defer.Deferred:
        """The dispatch watchdog (at every reap): worker slots that wait, with no claim round
        running, while a queued job could be leased mean a wake-up was missed.  Seen again
        `confirm` seconds later (a round that has just ended can look like that for a moment),
        it is logged and counted, and a round started; fires with whether it was."""
        def check(_: Any = None) -> defer.Deferred | bool:
            if not self.dispatcher.unserved():
                return False
            return self.store.runnable().addCallback(lambda runnable: runnable and self.dispatcher.unserved())

        def confirmed(stalled: bool) -> bool:
            if stalled:
                self.dispatch_restarts += 1
                self.log.warn("jobs were runnable while {n} worker slots waited and no dispatch ran: "
                              "dispatch started again", n=len(self.dispatcher.waiting))
                self.dispatcher.work_arrived()
            return stalled

        def first(stalled: bool) -> defer.Deferred | bool:
            if not stalled:
                return False
            return task.deferLater(self.clock, confirm, check).addCallback(confirmed)
        return defer.maybeDeferred(check).addCallback(first)
