"""One connection of a worker: hello, taking jobs by long-poll, heartbeats, kills, reports."""
from __future__ import annotations

import os
import platform
import socket

from twisted.internet import defer, task
from twisted.logger import Logger

from dsage import __version__, errors
from dsage.protocol import PROTOCOL_VERSION, MessageProtocol
from dsage.worker.runner import machine_memory


def host_facts() -> dict:
    """What a worker announces about its machine."""
    return {"host": socket.gethostname(), "cores": os.cpu_count(), "memory": machine_memory(),
            "os": platform.platform(), "python": platform.python_version(), "dsage": __version__}


#: heartbeats without an answer before the worker gives a connection up.
MISSED_BEATS = 3
#: the most jobs one take (or report) asks for (the server's limit).
MAX_TAKE = 1024
#: seconds before a worker asks again for jobs after the server refused a take.
TAKE_RETRY = 1.0
#: reports batched in one request up to this many bytes of results and output (at least one).
REPORTS_BYTES = 8 << 20


def _size(report: dict) -> int:
    return len(report.get("result") or b"") + len(report.get("output") or "")


class WorkerProtocol(MessageProtocol):
    """The worker's end of a connection; events go to the factory's worker service."""

    def handle_event(self, event: str, data: dict) -> None:
        if event == "kill" and isinstance(data, dict):
            self.factory.worker.kill(data)

    def handle_request(self, verb: str, args: dict) -> dict:
        """The server's requests: give up a job leased ahead if it has not started
        (`unqueue`), and the end of a running job's output (`output`)."""
        name, size = {"unqueue": ("held", 3), "output": ("job", 2)}.get(verb, (None, 0))
        key = args.get(name) if isinstance(args, dict) else None
        if not (isinstance(key, list) and len(key) == size and all(isinstance(x, int) for x in key)):
            return super().handle_request(verb, args)
        if verb == "output":
            return {"output": self.factory.worker.output_of(*key)}
        return {"removed": self.factory.worker.unqueue(tuple(key))}

    def connectionLost(self, reason=None) -> None:
        super().connectionLost(reason)
        self.factory.worker.connection_lost(self)


class WorkerSession:
    """Keeps this worker's free slots asking for jobs while the connection lasts."""

    log = Logger()

    def __init__(self, proto: WorkerProtocol, worker, clock) -> None:
        self.proto = proto
        self.worker = worker
        self.clock = clock
        self.asking = 0                  # jobs asked for and not yet answered (takes, reports)
        self.taking = False              # a take is waiting on the server
        self.heartbeat: task.LoopingCall | None = None
        self.first_beat = True           # this connection's first: every running job's output
        self.unanswered = 0
        self.outbox: list[dict] = []
        self.reporting = False

    async def start(self) -> dict:
        """Say hello, then start heartbeats, flush old reports and ask for work."""
        welcome = await self.proto.call("hello", version=list(PROTOCOL_VERSION), role="worker",
                                        name=self.worker.bundle.name,
                                        slots=self.worker.slots, facts=host_facts(),
                                        job_memory=self.worker.job_memory())
        self.heartbeat = task.LoopingCall(self.beat)
        self.heartbeat.clock = self.clock
        self.heartbeat.start(float(welcome.get("heartbeat_seconds", 10.0)), now=False)
        for report in self.worker.unsent_reports():
            self.send_report(report)
        self.ask()
        return welcome

    def lost(self) -> None:
        """The connection closed."""
        if self.heartbeat is not None and self.heartbeat.running:
            self.heartbeat.stop()

    def ask(self) -> None:
        """Ask for as many jobs as the worker has room for and has not already asked for,
        in one take at a time: the server answers a take as soon as it has any job for it,
        so a second take would only split the jobs of a burst into more messages (and
        every waiting take costs the server's dispatcher a look at each new job)."""
        want = min(MAX_TAKE, self.worker.room() - self.asking)
        if want <= 0 or self.taking or self.proto.closed:
            return
        self.asking += want
        self.taking = True
        d = self.proto.call("take", n=want)
        d.addCallbacks(self._got, self._take_failed, callbackArgs=(want,), errbackArgs=(want,))

    def _got(self, jobs: list[dict], asked: int) -> None:
        self.asking -= asked
        self.taking = False
        for job in jobs:
            self.worker.start_job(job)
        self.ask()

    def _take_failed(self, failure, asked: int) -> None:
        self.asking -= asked
        self.taking = False
        if not failure.check(errors.ConnectionLost):
            # Refused (the server's error): this was the one take, so ask again in a while,
            # or an idle worker would wait for jobs it never asked for.
            self.log.failure("take failed", failure)
            self.clock.callLater(TAKE_RETRY, self.ask)

    def send_report(self, report: dict) -> None:
        """Send a report, asking in the same round trip for the next jobs there is room for.
        One report request is in flight at a time: reports of jobs that finish meanwhile go
        together in the next one (one transaction on the server).  If the link fails the
        reports are kept and sent after reconnecting."""
        self.outbox.append({k: v for k, v in report.items() if k != "killed"})
        if not self.reporting:
            self._flush_reports()

    def _flush_reports(self) -> None:
        n, size = 0, 0
        while n < min(len(self.outbox), MAX_TAKE) and (n == 0 or size + _size(self.outbox[n]) <= REPORTS_BYTES):
            size += _size(self.outbox[n])
            n += 1
        reports, self.outbox = self.outbox[:n], self.outbox[n:]
        take = max(0, min(MAX_TAKE, self.worker.room() - self.asking))
        self.asking += take
        self.reporting = True
        d = self.proto.call("reports", reports=reports, take=take)

        def sent(reply: dict) -> None:
            self.asking -= take
            self.reporting = False
            for report, applied in zip(reports, reply.get("applied", [])):
                if not applied:
                    self.log.info("the server refused the report of job {job_id} attempt {attempt}: "
                                  "no longer this worker's", job_id=report["job_id"], attempt=report["attempt"])
            for job in reply.get("jobs", []):
                self.worker.start_job(job)
            if self.outbox:
                self._flush_reports()
            self.ask()

        def failed(f) -> None:
            self.asking -= take
            self.reporting = False
            if f.check(errors.ConnectionLost):
                for report in reports + self.outbox:
                    self.worker.keep_report(report)
                self.outbox = []
            else:
                self.log.failure("reports of jobs {ids} refused", f, ids=[r["job_id"] for r in reports])
                if self.outbox:
                    self._flush_reports()
        d.addCallbacks(sent, failed)

    def beat(self) -> defer.Deferred | None:
        """Renew the leases of the running jobs; kill those the server no longer gives us.
        A link whose heartbeats go unanswered (a cut cable keeps TCP open) is dropped."""
        if self.unanswered >= MISSED_BEATS:
            self.log.warn("no answer to {n} heartbeats: dropping the connection", n=self.unanswered)
            self.proto.transport.abortConnection()
            return None
        self.unanswered += 1
        d = self.proto.call("heartbeat", held=self.worker.held(), output=self.worker.live_output(self.first_beat))
        self.first_beat = False

        def lost(reply: dict) -> None:
            self.unanswered = 0
            for job_id, attempt, *token in reply.get("lost", []):
                if self.worker.drop(job_id, attempt, token[0] if token else None):
                    self.log.info("job {job_id} attempt {attempt} is no longer ours: stopped",
                                  job_id=job_id, attempt=attempt)

        def refused(f) -> None:
            if not f.check(errors.ConnectionLost):      # a lost link is found out by the beats
                self.log.failure("the server refused a heartbeat", f)
        return d.addCallbacks(lost, refused)
