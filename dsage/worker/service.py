"""dsage_worker's service tree: a reconnecting TLS client (`Reconnector`, with back-off)
whose connections each run a `WorkerSession`, the `JobRunner` that outlives them, and the
queue of jobs leased ahead of the slots (automatic prefetch, given back when held up)."""
from __future__ import annotations

import collections
import math
import os

from twisted.application import service
from twisted.internet import defer
from twisted.internet.protocol import Factory
from twisted.logger import Logger

from dsage import errors, tls
from dsage.config import split_address
from dsage.reconnect import Reconnector
from dsage.worker.child import adopt_orphans
from dsage.worker.runner import RECYCLE_MEMORY, JobRunner, lease_key, lease_matches
from dsage.worker.session import WorkerProtocol, WorkerSession

#: jobs shorter than this (seconds) make an automatic prefetch worthwhile.
SHORT_JOB = 0.1
#: automatic prefetch: about this many seconds of (recent-sized) jobs wait per slot ...
AHEAD_SECONDS = 0.05
#: ... but no more than this many jobs per slot.
MAX_AHEAD = 64
#: how long a job fetched ahead may wait here for a slot before it is given back.
HOLD_LIMIT = 0.5
#: seconds a stopping worker waits for the server to take its jobs back.
RELEASE_WAIT = 3.0


def worker_bundle(cert: str, slots: int | None, nice: int) -> tls.Bundle:
    """The bundle a worker starts with, once its options are checked (ValueError says what
    is wrong: `dsage_worker` and `twist dsage-worker` both)."""
    if slots is not None and slots < 1:
        raise ValueError("--slots must be at least 1")
    if not 0 <= nice <= 19:
        raise ValueError(f"--nice must be from 0 (the worker's own priority) to 19 (the lowest), not {nice}")
    try:
        bundle = tls.Bundle.load(cert)
    except ValueError as e:
        raise ValueError(f"{e} (give the worker's bundle with --cert)") from None
    if bundle.role != "worker":
        raise ValueError(f"{cert} is the bundle of {bundle.role} {bundle.name}; make a worker one with "
                         f"`dsage worker add`")
    return bundle


def job_settings(max_memory: float = 0, max_open_files: int = 1024, max_file_size: float = 0,
                 max_output: float = 1, recycle_memory: float | None = None, prefetch: int | None = None) -> dict:
    """WorkerService's settings of the jobs from the options (sizes in MB), once checked
    (ValueError says what is wrong: `dsage_worker` and `twist dsage-worker` both)."""
    for name, value in (("max-memory", max_memory), ("max-open-files", max_open_files),
                        ("max-file-size", max_file_size), ("max-output", max_output),
                        ("recycle-memory", recycle_memory), ("prefetch", prefetch)):
        if value is not None and value < 0:
            raise ValueError(f"--{name} must not be negative, not {value:g}")
        if value is not None and not math.isfinite(value):
            raise ValueError(f"--{name} must be a finite number, not {value:g}")
    return {"limits": {"memory": int(max_memory * 2**20), "open_files": max_open_files,
                       "file_size": int(max_file_size * 2**20)},
            "max_output": max(1024, int(max_output * 2**20)), "prefetch": prefetch,
            "recycle_memory": RECYCLE_MEMORY if recycle_memory is None else int(recycle_memory * 2**20)}


def enqueue(queue: collections.deque, job: dict) -> None:
    """Add a job to those waiting here, kept in the order they run: the lowest priority
    number first, the first come among equals (a job fetched ahead must not pass one of
    higher priority that came after it).  Equal priorities, the usual case, append."""
    priority = job.get("priority", 5)
    i = len(queue)
    while i and queue[i - 1].get("priority", 5) > priority:
        i -= 1
    queue.insert(i, job)


def automatic_ahead(slots: int, recent) -> int:
    """Jobs to lease ahead of `slots` given the wall times of the recent jobs: none until
    there are some, or if any was long; else about AHEAD_SECONDS of them per slot."""
    if not recent:
        return 0
    longest = max(recent)
    if longest >= SHORT_JOB:
        return 0
    return slots * max(1, min(MAX_AHEAD, int(AHEAD_SECONDS / max(longest, 1e-6))))


def usable_cores() -> int:
    """The cores this process may run on: its CPU affinity (`taskset`, a cgroup's cpuset, a
    batch system's allocation), not every core of the machine."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):
        return os.cpu_count() or 1


class WorkerService(service.MultiService):
    """dsage_worker: connects (and reconnects) to the server and runs jobs in its slots."""

    log = Logger()

    def __init__(self, bundle: tls.Bundle, address: str, reactor, *, slots: int | None = None,
                 nice: int = 10, max_output: int = 1 << 20, limits: dict | None = None,
                 prefetch: int | None = None, recycle_memory: int = RECYCLE_MEMORY) -> None:
        super().__init__()
        self.bundle = bundle
        self.reactor = reactor
        self.slots = slots or usable_cores()
        #: leased jobs kept waiting here so that a slot never waits for the network (they
        #: show as processing meanwhile).  None: automatic, about 50 ms of work per slot
        #: while the recent jobs were short, given back to the server if they wait too long.
        self.prefetch = prefetch
        self.recent: collections.deque = collections.deque(maxlen=2 * self.slots)
        self.queue: collections.deque = collections.deque()
        self._hold_check = None
        self.stopping = False            # shutting down: takes no more jobs
        self.runner = JobRunner(reactor, nice=nice, max_output=max_output, limits=limits,
                                keep_idle=2 * self.slots, recycle_memory=recycle_memory)
        self.session: WorkerSession | None = None
        self._reports: list[dict] = []
        self._sessions: list[WorkerSession] = []
        host, port = split_address(address)
        endpoint = tls.client_endpoint(bundle, reactor, host, port)
        factory = Factory.forProtocol(WorkerProtocol)
        factory.worker = self
        self.link = Reconnector(endpoint, factory, self._prepare, reactor, max_delay=5.0, address=f"{host}:{port}")
        self.address = address

    def _prepare(self, proto: WorkerProtocol) -> defer.Deferred:
        session = WorkerSession(proto, self, self.reactor)
        self._sessions.append(session)
        d = defer.Deferred.fromCoroutine(session.start())

        def ready(welcome: dict) -> None:
            self.session = session
            self.log.info("worker {name} connected to {address} with {slots} slots",
                          name=welcome.get("identity"), address=self.address, slots=self.slots)

        def refused(f):
            if f.check(errors.AuthError, errors.ProtocolError):
                self.log.error("the server refused this worker: {why}; stopping", why=str(f.value))
                self.reactor.callLater(0, self._give_up)
            return f
        return d.addCallbacks(ready, refused)

    def connection_lost(self, proto: WorkerProtocol) -> None:
        """A connection closed: end its session."""
        for session in list(self._sessions):
            if session.proto.closed:
                session.lost()
                self._sessions.remove(session)
                if self.session is session:
                    self.session = None

    def kill(self, data: dict) -> None:
        """The server ordered a kill."""
        job_id, attempt = data.get("job_id"), data.get("attempt")
        if isinstance(job_id, int) and self.drop(job_id, attempt if isinstance(attempt, int) else None):
            self.log.info("killed job {job_id}", job_id=job_id)

    def _give_up(self) -> None:
        self.exit_code = 2
        if self.reactor.running:
            self.reactor.stop()

    exit_code = 0

    def ahead(self) -> int:
        """How many leased jobs may wait here beyond the slots."""
        if self.prefetch is not None:
            return self.prefetch
        return automatic_ahead(self.slots, self.recent if len(self.recent) == self.recent.maxlen else ())

    def room(self) -> int:
        """How many more jobs this worker takes now (free slots plus prefetch room)."""
        if self.stopping:
            return 0
        return self.slots + self.ahead() - len(self.runner.running) - len(self.queue)

    def held(self) -> list[list[int]]:
        """Every lease (job id, attempt, token) of this worker: running or waiting here."""
        return self.runner.held() + [list(lease_key(j)) for j in self.queue]

    def live_output(self, again: bool = False) -> list[list]:
        """The end of each running job's output, where it grew (`JobRunner.live_output`)."""
        return self.runner.live_output(again)

    def start_job(self, job: dict) -> None:
        """Take a leased job: run it when a slot is free (or, shutting down, give it back)."""
        if self.stopping:
            session = self.session
            if session is not None and not session.proto.closed:
                session.proto.call("release", held=[list(lease_key(job))]).addErrback(lambda f: None)
            return
        job["queued_at"] = self.reactor.seconds()
        enqueue(self.queue, job)
        self._pump()
        self._watch_queue()

    def _watch_queue(self) -> None:
        if self.queue and self.prefetch is None and self._hold_check is None:
            due = min(j["queued_at"] for j in self.queue) + HOLD_LIMIT - self.reactor.seconds()
            self._hold_check = self.reactor.callLater(max(0.0, due), self._give_back)

    def _give_back(self) -> None:
        """Jobs fetched ahead waited too long behind long ones: hand them back to the server
        (to run elsewhere, in their place) and fetch no more ahead until jobs are short again."""
        self._hold_check = None
        session = self.session
        limit = self.reactor.seconds() - HOLD_LIMIT
        stale = [j for j in self.queue if j["queued_at"] <= limit]
        if stale and (session is None or session.proto.closed):
            # Offline: nobody to give them to; look again later.
            self._hold_check = self.reactor.callLater(HOLD_LIMIT, self._give_back)
            return
        if stale:
            for job in stale:
                self.queue.remove(job)
            self.recent.clear()
            d = session.proto.call("release", held=[list(lease_key(j)) for j in stale])

            def failed(f) -> None:
                self.queue.extendleft(reversed(stale))       # still ours: they run here after all
                self._pump()
            d.addCallbacks(lambda reply: self.log.info("gave {n} waiting jobs back to the server",
                                                       n=reply["released"]), failed)
        self._watch_queue()

    def _pump(self) -> None:
        while self.queue and len(self.runner.running) < self.slots:
            job = self.queue.popleft()
            self.log.debug("running job {job_id} ({name}) attempt {attempt}", job_id=job["job_id"],
                           name=job.get("name"), attempt=job["attempt"])
            self.runner.run(job).addCallback(self._finished).addErrback(
                lambda f, j=job: self.log.failure("running job {job_id} failed", f, job_id=j["job_id"]))

    def unqueue(self, key: tuple[int, int, int]) -> bool:
        """Give up a job leased ahead that still waits here for a slot (the server kills it:
        its owner cancelled it); False if it has started, or is not here."""
        if not self._take_out(*key):
            return False
        session = self.session
        if session is not None:
            session.ask()           # its room is free again
        return True

    def output_of(self, job_id: int, attempt: int) -> str | None:
        """The end of a running job's output now (the server asks when its owner reads it)."""
        return self.runner.output_of(job_id, attempt)

    def drop(self, job_id: int, attempt: int | None = None, lease: int | None = None) -> bool:
        """Give up a job (killed, or its lease lost): out of the queue, or stopped if running."""
        return self._take_out(job_id, attempt, lease) or self.runner.kill(job_id, attempt, lease)

    def _take_out(self, job_id: int, attempt: int | None, lease: int | None) -> bool:
        """Take a job out of the queue of those waiting here for a slot: whether it was there."""
        for job in list(self.queue):
            if lease_matches(lease_key(job), job_id, attempt, lease):
                self.queue.remove(job)
                return True
        return False

    def _finished(self, report: dict) -> None:
        if self.stopping:       # stopped by the shutdown, and given back: nothing to report
            return
        if report["outcome"] == "completed":
            self.recent.append(report["wall_time"])
        self._pump()
        if report.get("killed") or report["outcome"] != "completed" or report["wall_time"] > 1.0:
            self.log.info("job {job_id} {outcome} in {wall:.3f} s", job_id=report["job_id"],
                          outcome="killed" if report.get("killed") else report["outcome"],
                          wall=report["wall_time"])
        session = self.session
        if not report.get("killed"):
            if session is not None and not session.proto.closed:
                session.send_report(report)
            else:
                self.keep_report(report)
        if session is not None:
            session.ask()

    def keep_report(self, report: dict) -> None:
        """Hold a report until the next connection."""
        self._reports.append(report)

    def job_memory(self) -> int | None:
        """The MiB each job may use here (what the server leases by)."""
        return self.runner.job_memory()

    def unsent_reports(self) -> list[dict]:
        """Take the held reports."""
        reports, self._reports = self._reports, []
        return reports

    def startService(self) -> None:
        adopt_orphans()             # what a killed job process leaves comes here (`JobRunner.end_orphans`)
        super().startService()
        self.link.start()

    def stopService(self) -> defer.Deferred:
        """Stop the jobs, give them back to the server (to run elsewhere at once, no failure
        counted, instead of when their leases lapse), then disconnect."""
        if self._hold_check is not None and self._hold_check.active():
            self._hold_check.cancel()
        self.stopping = True
        held = self.held()
        self.queue.clear()
        self.runner.stop_all()
        return defer.Deferred.fromCoroutine(self._stop(held))

    async def _stop(self, held: list[list[int]]) -> None:
        session = self.session
        if held and session is not None and not session.proto.closed:
            d = session.proto.call("release", held=held, interrupted=True)
            try:
                reply = await d.addTimeout(RELEASE_WAIT, self.reactor)
                self.log.info("gave {n} jobs back to the server", n=reply["released"])
            except Exception as e:
                self.log.warn("could not give the jobs back ({why}): they run again once their "
                              "leases lapse", why=str(e) or type(e).__name__)
        await defer.gatherResults([self.link.stop(), defer.maybeDeferred(super().stopService)])
