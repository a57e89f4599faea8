"""The server side of the wire: one `ServerProtocol` per connection (the `Hub` knows them
all).  Handlers are thin: they check the caller's role, then call the store and the
dispatcher."""
from __future__ import annotations

import math
from typing import Any, Callable

from twisted.internet import defer
from twisted.internet.protocol import Factory
from twisted.logger import Logger

from dsage import errors, tls
from dsage.job import STATUSES
from dsage.protocol import PROTOCOL_VERSION, MessageProtocol
from dsage.server.hub import ADMIN, CLIENT_ROLES, LIVE_OUTPUT_CHARS, WORKER, Hub

HELLO_TIMEOUT = 15.0
#: seconds a worker has to say whether a job leased to it has started (a `queued_only` kill).
UNQUEUE_WAIT = 5.0
#: the most takes one worker connection may have waiting (dsage's worker has one; each
#: waiting take is looked at for every new job, so a flood would slow every submission).
MAX_TAKES = 64
#: the most result bytes one `jobs_done` event carries (beyond one job's): the jobs that
#: finished in one commit go in as few events as fit.
EVENT_BYTES = 64 << 20


class ServerProtocol(MessageProtocol):
    """One connection from a client, admin or worker."""

    drop_on_refusal = True
    log = Logger()

    def __init__(self, hub: Hub) -> None:
        super().__init__()
        self.hub = hub
        self.identity: str | None = None
        self.role: str | None = None
        self.info: dict = {}
        self.takes: set[defer.Deferred] = set()
        self.running: set[tuple[int, int]] = set()
        self._hello_timer = None
        self.last_heard = hub.clock.seconds()
        self._done: list[dict] = []

    def heard(self) -> None:
        self.last_heard = self.hub.clock.seconds()

    def connectionMade(self) -> None:
        self.tune_transport()
        self.hub.open_connections += 1
        if self.hub.open_connections > self.hub.max_connections:
            self.log.warn("refused {peer}: {n} connections already (max_connections)",
                          peer=self.peer_name(), n=self.hub.open_connections - 1)
            self.transport.abortConnection()
            return
        self._hello_timer = self.hub.clock.callLater(HELLO_TIMEOUT, self._no_hello)

    def push_done(self, summary: dict) -> None:
        """Tell this client that one of its jobs finished; the jobs that finish in the same
        turn of the reactor (one commit's) go in one event."""
        if not self._done:
            self.hub.clock.callLater(0, self._flush_done)
        self._done.append(summary)

    def _flush_done(self) -> None:
        done, self._done = self._done, []
        start, size = 0, 0
        for i, summary in enumerate(done):
            more = len(summary.get("result") or b"")
            if i > start and size + more > EVENT_BYTES:     # a message holds at most MAX_MESSAGE
                self.send_event("jobs_done", {"jobs": done[start:i]})
                start, size = i, 0
            size += more
        self.send_event("jobs_done", {"jobs": done[start:]})

    def _no_hello(self) -> None:
        self._hello_timer = None
        self.protocol_error("no hello in time")

    def connectionLost(self, reason=None) -> None:
        self.hub.open_connections -= 1
        if self._hello_timer is not None and self._hello_timer.active():
            self._hello_timer.cancel()
        if self.identity is not None and self.role is not None:
            self.hub.detach(self)
            for job_id, _ in self.running:
                self.hub.live_output.pop(job_id, None)
            self.log.info("{role} {name} disconnected", role=self.role, name=self.identity)
        elif reason is not None and self.hub.open_connections < self.hub.max_connections:
            # Refused certificates, plain TCP and garbage end here, before any hello.
            why = tls.describe_error(getattr(reason, "value", reason))[:300]
            self.log.warn("connection from {peer} closed before hello: {why}", peer=self.peer_name(), why=why)
        super().connectionLost(reason)
        for d in list(self.takes):
            d.cancel()

    def handle_request(self, verb: str, args: dict) -> Any:
        if self.role is None:
            if verb != "hello":
                raise errors.ProtocolError("the first request must be hello")
            return self.hello(args)
        entry = HANDLERS.get(verb)
        if entry is None:
            raise errors.ProtocolError(f"unknown request {verb!r}")
        roles, handler = entry
        if self.role not in roles:
            if roles == ADMIN:
                raise errors.AuthError(f"only an admin may {ADMIN_ACTIONS[verb]} (this is {self.role} {self.identity})")
            raise errors.AuthError(f"a {self.role} may not call {verb}")
        return handler(self, args)

    # -- hello -------------------------------------------------------------------------
    async def _hello(self, args: dict) -> dict:
        version = args.get("version")
        if not (isinstance(version, list) and version and version[0] == PROTOCOL_VERSION[0]):
            raise errors.ProtocolError(f"protocol version {version} is not supported; "
                                       f"this server speaks {PROTOCOL_VERSION[0]}.x")
        try:
            name, serial = tls.peer_identity(self.transport)
        except ValueError as e:
            raise errors.AuthError(str(e)) from None
        try:
            role = await self.hub.store.authenticate(name, serial)
        except errors.AuthError as e:
            self.log.warn("refused {peer} ({name}): {why}", peer=self.peer_name(), name=name, why=str(e))
            raise
        claimed = args.get("name")
        if claimed is not None and claimed != name:
            self.log.warn("refused {peer}: says it is {claimed} but its certificate is {name}",
                          peer=self.peer_name(), claimed=str(claimed)[:64], name=name)
            raise errors.AuthError(f"the name {claimed!r} is not the certificate's ({name!r})")
        wanted = args.get("role", "client")
        if (wanted == "worker") != (role == "worker"):
            self.log.warn("refused {peer} ({name}): a {role} certificate used as {wanted}",
                          peer=self.peer_name(), name=name, role=role, wanted=wanted)
            raise errors.AuthError(f"{name} is a {role}, not a {wanted}")
        if self.closed:
            raise errors.ConnectionLost("closed during hello")
        if self._hello_timer is not None and self._hello_timer.active():
            self._hello_timer.cancel()
        self.identity, self.role = name, role
        if role == "worker":
            facts = args.get("facts") if isinstance(args.get("facts"), dict) else {}
            slots = args.get("slots") if isinstance(args.get("slots"), int) else 1
            job_memory = args.get("job_memory")
            self.info = {"name": name, "slots": slots, "facts": facts,
                         "job_memory": job_memory if _is_int(job_memory) and job_memory > 0 else None,
                         "connected": self.hub.store.now(), "peer": self.peer_name()}
        self.hub.attach(self)
        self.log.info("{role} {name} connected from {peer}", role=role, name=name, peer=self.peer_name())
        return {"version": list(PROTOCOL_VERSION), "identity": name, "role": role,
                "lease_seconds": self.hub.lease_seconds, "heartbeat_seconds": self.hub.heartbeat_seconds}

    def hello(self, args: dict) -> defer.Deferred:
        """Check the protocol version and the certificate's identity and role."""
        if not isinstance(args, dict):
            raise errors.ProtocolError("hello takes a map")
        return defer.Deferred.fromCoroutine(self._hello(args))

    # -- clients -----------------------------------------------------------------------
    def submit(self, args: dict) -> defer.Deferred:
        """Store jobs; replies with their ids once committed."""
        jobs = args.get("jobs")
        if not isinstance(jobs, list) or not jobs:
            raise ValueError("submit needs a non-empty list of jobs")
        function_id, token = args.get("function_id"), args.get("token")
        if token is not None and not (isinstance(token, str) and 0 < len(token) <= 64):
            raise ValueError("token must be a string of at most 64 characters")
        # The new jobs go straight to the first slots that wait for work (as many as they
        # need), in the same transaction, and out to them while it commits; the submitter's
        # reply waits for the commit.  Jobs left queued go to the other waiting slots after.
        entries, arrivals = self.hub.dispatcher.snapshot(len(jobs))

        def leased(out: dict) -> None:
            if entries:
                self.hub.dispatcher.deliver(out["claims"], entries, arrivals)
        try:
            d = self.hub.store.submit_and_claim(
                self.identity, jobs, function_id if isinstance(function_id, str) else None, token,
                self.hub.max_queued_per_user, [(w, n) for _key, (w, n, _d) in entries], self.hub.lease_seconds,
                leased)
        except Exception:
            # Refused at once (a job's description is bad): the reserved slots must not
            # stay reserved for a claim that will never come, or they wait forever.
            self.hub.dispatcher.unreserve(entries)
            raise

        def stored(out: dict) -> dict:
            if out["queued"]:       # for the waiting slots this claim did not reserve
                self.hub.dispatcher.work_arrived()
            for job_id, spec in zip(out["ids"], jobs):
                if spec.get("memory") and self.hub.check_fit(
                        {"job_id": job_id, "owner": self.identity, "memory": math.ceil(spec["memory"])}, asked=True):
                    break           # one note for a submission
            return {"job_ids": out["ids"]}

        def refused(f):
            self.hub.dispatcher.unclaim(f, entries)
            return f
        return d.addCallbacks(stored, refused)

    def get_job(self, args: dict) -> defer.Deferred:
        """One job, with its result unless ``result`` is false; a running job's output is
        the end of it as of now with ``output`` (`Hub.fresh_output`), else as of its worker's
        last heartbeat (a look at its status does not bother the worker)."""
        show = self.hub.fresh_output if args.get("output") else self.hub.with_live_output
        return self.hub.store.get(self.identity, self.role, _job_id(args),
                                  bool(args.get("result", True))).addCallback(show)

    def list_jobs(self, args: dict) -> defer.Deferred:
        """The caller's jobs (everyone's with ``all``, for admins)."""
        status = args.get("status")
        limit = args.get("limit", 1000)
        if status is not None and status not in STATUSES:
            raise ValueError(f"unknown status {status!r}: one of {', '.join(STATUSES)}")
        if not isinstance(limit, int) or limit < 1:
            raise ValueError("limit must be a positive integer")
        return self.hub.store.list(self.identity, self.role, status, bool(args.get("all")), limit)

    def kill(self, args: dict) -> defer.Deferred:
        """Kill a job; a running one is stopped on its worker (unless `queued_only`: then
        only a job that has not started is killed, one leased ahead to a busy worker too
        if that worker gives it up)."""
        def killed(out: dict) -> dict | defer.Deferred:
            if out.get("held") is not None:
                return self._unqueue(out).addCallback(killed)
            self.hub.stop_running(out["worker"])
            if out["worker"] is not None or out["job"]["status"] == "killed":
                self.hub.job_finished(out["job"])
            return out["job"]
        return self.hub.store.kill(self.identity, self.role, _job_id(args),
                                   bool(args.get("queued_only"))).addCallback(killed)

    def _unqueue(self, out: dict) -> defer.Deferred:
        """A `queued_only` kill of a job leased to a worker: ask that worker whether the job
        still waits there for a slot; if it gives the job up, the store kills it (its attempt
        "undelivered"); fires with the kill's outcome, or `out` with nothing killed."""
        held = out.pop("held")
        job_id, attempt, _, worker = held
        conn = self.hub.running_on(worker, job_id, attempt)
        if conn is None:
            return defer.succeed(out)

        def answered(reply: Any) -> dict | defer.Deferred:
            if not (isinstance(reply, dict) and reply.get("removed") is True):
                return out
            conn.running.discard((job_id, attempt))
            return self.hub.store.kill(self.identity, self.role, job_id, True, held)
        d = conn.call("unqueue", held=held[:3])
        d.addTimeout(UNQUEUE_WAIT, self.hub.clock)
        return d.addCallbacks(answered, lambda f: out)

    def rerun(self, args: dict) -> defer.Deferred:
        """Queue a finished job again."""
        def queued(summary: dict) -> dict:
            self.hub.dispatcher.work_arrived()
            return summary
        return self.hub.store.rerun(self.identity, self.role, _job_id(args)).addCallback(queued)

    def workers(self, args: dict) -> list[dict]:
        """The connected workers and how many of their slots are busy."""
        return self.hub.workers()

    def status(self, args: dict) -> defer.Deferred:
        """Queue depth, jobs by status, workers, slots and the recent rate of finished jobs."""
        return self.hub.status()

    # -- distributed functions ------------------------------------------------------------
    def function_start(self, args: dict) -> defer.Deferred:
        """Record a new DistributedFunction with its first checkpoint."""
        name, state = _function_args(args)
        return self.hub.store.function_start(self.identity, name, state, _session(args))

    def function_step(self, args: dict) -> defer.Deferred:
        """One checkpoint: processed results, the new state and new jobs, atomically."""
        name, state = _function_args(args)
        processed, jobs = args.get("processed", []), args.get("jobs", [])
        if not isinstance(processed, list) or not all(isinstance(i, int) for i in processed):
            raise ValueError("processed must be a list of job ids")
        if not isinstance(jobs, list):
            raise ValueError("jobs must be a list")
        step = args.get("step")
        if not isinstance(step, int) or step < 1:
            raise ValueError("step must be a positive integer")
        d = self.hub.store.function_step(self.identity, name, _session(args), step, state, processed, jobs,
                                         bool(args.get("done")), self.hub.max_queued_per_user)

        def stepped(out: dict) -> dict:
            if out["job_ids"]:
                self.hub.dispatcher.work_arrived()
            for running in out["running"]:
                self.hub.stop_running(running)
            for summary in out["killed"]:
                self.hub.job_finished(summary)
            return {"job_ids": out["job_ids"]}
        return d.addCallback(stepped)

    def function_get(self, args: dict) -> defer.Deferred:
        """A function's last checkpoint."""
        name = args.get("name")
        if not isinstance(name, str) or not name:
            raise ValueError("a function needs a name")
        attach = _session(args) if args.get("session") is not None else None
        return self.hub.store.function_get(self.identity, self.role, name, attach)

    # -- admins ------------------------------------------------------------------------
    def add_identity(self, args: dict) -> defer.Deferred:
        """Issue a bundle for a new user or worker."""
        if self.hub.ca is None:
            raise errors.RemoteError("this server has no CA key; issue bundles where the CA is")
        name, role = args.get("name"), args.get("role")
        if not isinstance(name, str) or role not in tls.ROLES:
            raise ValueError("add_identity needs a name and a role (admin, client or worker)")
        bundle, serial = tls.make_bundle(self.hub.ca, name, role, self.hub.address)
        d = self.hub.store.add_identity(name, role, serial, bool(args.get("force")))
        return d.addCallback(lambda _: {"bundle": bundle.dumps()})

    def revoke(self, args: dict) -> defer.Deferred:
        """Revoke an identity and drop its connections."""
        name = args.get("name")
        if not isinstance(name, str):
            raise ValueError("revoke needs a name")
        if name == self.identity:
            raise ValueError(f"{name} cannot revoke its own certificate: another admin can (or, with "
                             f"the server stopped, `dsage user revoke` on its machine)")

        def revoked(out: dict) -> dict:
            self.hub.drop(name)
            if out.get("released"):
                self.hub.dispatcher.work_arrived()
            self.log.info("revoked {name} ({role})", name=name, role=out["role"])
            return out
        return self.hub.store.revoke(name).addCallback(revoked)

    def identities(self, args: dict) -> defer.Deferred:
        """Every user and worker."""
        return self.hub.store.identities()

    def pack(self, args: dict) -> defer.Deferred:
        """Pack the database (drop old object revisions)."""
        days = args.get("days", 0)
        if isinstance(days, bool) or not isinstance(days, (int, float)) or not 0 <= days <= 36500:
            raise ValueError("days must be a number of days from 0 to 36500")
        self.log.info("packing the database (keeping {days} days of history)", days=days)
        return self.hub.store.pack(float(days))

    # -- workers -----------------------------------------------------------------------
    def take(self, args: dict) -> defer.Deferred:
        """Long-poll: replies when at least one job is leased to this worker."""
        n = args.get("n", 1)
        if not isinstance(n, int) or not 1 <= n <= 1024:
            raise ValueError("take needs 1 <= n <= 1024")
        if len(self.takes) >= MAX_TAKES:
            raise ValueError(f"this connection has {len(self.takes)} takes waiting already: ask for "
                             f"more jobs in one take")
        d = self.hub.dispatcher.take(self.identity, n)
        self.takes.add(d)

        def taken(jobs: list[dict]) -> list[dict]:
            self.takes.discard(d)
            self.running.update((j["job_id"], j["attempt"]) for j in jobs)
            return jobs

        def gone(f):
            self.takes.discard(d)
            return f
        return d.addCallbacks(taken, gone)

    def report(self, args: dict) -> defer.Deferred:
        """Apply the outcome of one of this worker's attempts (and lease it `take` more)."""
        d = self._apply_reports([_report_args(args)], _take(args))
        return d.addCallback(lambda out: {"applied": out["applied"][0], "jobs": out["jobs"]})

    def reports(self, args: dict) -> defer.Deferred:
        """Apply several outcomes in one transaction (and lease the worker `take` more);
        replies with whether each was applied, and the jobs leased."""
        reports = args.get("reports")
        if not isinstance(reports, list) or not 0 < len(reports) <= 1024 or \
                not all(isinstance(r, dict) for r in reports):
            raise ValueError("reports must be a list of 1 to 1024 reports")
        return self._apply_reports([_report_args(r) for r in reports], _take(args))

    def _apply_reports(self, reps: list[dict], take: int) -> defer.Deferred:
        for rep in reps:
            self.running.discard((rep["job_id"], rep["attempt"]))
            self.hub.live_output.pop(rep["job_id"], None)

        def applied(out: dict) -> dict:
            self.running.update((j["job_id"], j["attempt"]) for j in out["jobs"])
            requeued = False
            for rep, result in zip(reps, out["results"]):
                if not result["applied"]:
                    self.log.warn("stale report from {worker} for job {job_id} attempt {attempt} refused",
                                  worker=self.identity, job_id=rep["job_id"], attempt=rep["attempt"])
                elif result["final"]:
                    self.hub.job_finished(result["job"])
                else:
                    requeued = True
                    self.hub.check_fit(result["job"])
            if requeued:
                self.hub.dispatcher.work_arrived()
            return {"applied": [r["applied"] for r in out["results"]], "jobs": out["jobs"]}
        return self.hub.store.report_many(self.identity, reps, take, self.hub.lease_seconds).addCallback(applied)

    def heartbeat(self, args: dict) -> defer.Deferred:
        """Renew the leases of the attempts this worker holds; replies with those it lost."""
        held = _held(args)
        self.running = {(h[0], h[1]) for h in held}
        for job_id, attempt, text in _live_output(args):
            if (job_id, attempt) in self.running:
                self.hub.live_output[job_id] = (attempt, self.identity, text)
        return self.hub.store.renew(self.identity, held, self.hub.lease_seconds).addCallback(
            lambda lost: {"lost": lost})

    def release(self, args: dict) -> defer.Deferred:
        """Give back leased jobs this worker has not started (or stops running as it shuts
        down: `interrupted`): queued again in their old place, no failure counted; replies
        with how many were given back.  The worker's waiting takes are answered empty
        first, so that the jobs go to other workers."""
        held = _held(args)
        outcome = "interrupted" if args.get("interrupted") else "undelivered"
        self.running.difference_update((h[0], h[1]) for h in held)
        for d in list(self.takes):
            self.hub.dispatcher.withdraw(d)

        def released(n: int) -> dict:
            if n:
                self.hub.dispatcher.work_arrived()
            return {"released": n}
        return self.hub.store.release(self.identity, held, outcome).addCallback(released)


def _live_output(args: dict) -> list[tuple[int, int, str]]:
    """(job id, attempt, text) of a heartbeat's `output`: [[job_id, attempt, lease, text], ...]."""
    output = args.get("output") or []
    if not isinstance(output, list) or not all(
            isinstance(o, list) and len(o) == 4 and _is_int(o[0]) and _is_int(o[1]) and isinstance(o[3], str)
            for o in output):
        raise ValueError("output must be [[job_id, attempt, lease, text], ...]")
    return [(o[0], o[1], o[3][-LIVE_OUTPUT_CHARS:]) for o in output]


def _held(args: dict) -> list[list[int]]:
    held = args.get("held", [])
    if not isinstance(held, list) or not all(isinstance(h, list) and len(h) in (2, 3) and
                                             all(_is_int(x) for x in h) for h in held):
        raise ValueError("held must be [[job_id, attempt, lease], ...]")
    return held


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _function_args(args: dict) -> tuple[str, bytes]:
    name, state = args.get("name"), args.get("state")
    if not isinstance(name, str) or not 0 < len(name) <= 200:
        raise ValueError("a function needs a name of 1 to 200 characters")
    if not isinstance(state, bytes):
        raise ValueError("a function's state must be bytes")
    return name, state


def _session(args: dict) -> str:
    session = args.get("session")
    if not isinstance(session, str) or not 0 < len(session) <= 64:
        raise ValueError("a function call needs the client's session id")
    return session


def _job_id(args: dict) -> int:
    job_id = args.get("job_id")
    if not isinstance(job_id, int) or isinstance(job_id, bool):
        raise ValueError("job_id must be an integer")
    return job_id


def _take(args: dict) -> int:
    take = args.get("take", 0)
    if isinstance(take, bool) or not isinstance(take, int) or not 0 <= take <= 1024:
        raise ValueError("take must be an integer from 0 to 1024")
    return take


def _report_args(args: dict) -> dict:
    rep = {"job_id": _job_id(args), "attempt": args.get("attempt"), "lease": args.get("lease", 0),
           "outcome": args.get("outcome")}
    if not _is_int(rep["attempt"]) or not _is_int(rep["lease"]) or rep["outcome"] not in ("completed", "failed"):
        raise ValueError("report needs attempt, lease and outcome (completed or failed)")
    checks = {"result": (bytes, type(None)), "output": (str, type(None)), "error": (str, type(None)),
              "cpu_time": (int, float, type(None)), "wall_time": (int, float, type(None)),
              "peak_memory": (int, type(None)), "memory_exceeded": (int, type(None))}
    for key, types in checks.items():
        if not isinstance(args.get(key), types):
            raise ValueError(f"report field {key} has the wrong type")
        rep[key] = args.get(key)
    for key in ("peak_memory", "memory_exceeded"):
        if isinstance(rep[key], bool) or (rep[key] or 0) < 0:
            raise ValueError(f"report field {key} has the wrong type")
    return rep


#: what each admin request does, for the refusal of anyone else.
ADMIN_ACTIONS = {"add_identity": "add users and workers", "revoke": "revoke users and workers",
                 "identities": "list users and workers", "pack": "pack the database"}

HANDLERS: dict[str, tuple[tuple[str, ...], Callable]] = {
    "submit": (CLIENT_ROLES, ServerProtocol.submit),
    "get_job": (CLIENT_ROLES, ServerProtocol.get_job),
    "list_jobs": (CLIENT_ROLES, ServerProtocol.list_jobs),
    "kill": (CLIENT_ROLES, ServerProtocol.kill),
    "rerun": (CLIENT_ROLES, ServerProtocol.rerun),
    "workers": (CLIENT_ROLES, ServerProtocol.workers),
    "status": (CLIENT_ROLES, ServerProtocol.status),
    "function_start": (CLIENT_ROLES, ServerProtocol.function_start),
    "function_step": (CLIENT_ROLES, ServerProtocol.function_step),
    "function_get": (CLIENT_ROLES, ServerProtocol.function_get),
    "add_identity": (ADMIN, ServerProtocol.add_identity),
    "revoke": (ADMIN, ServerProtocol.revoke),
    "identities": (ADMIN, ServerProtocol.identities),
    "pack": (ADMIN, ServerProtocol.pack),
    "take": (WORKER, ServerProtocol.take),
    "report": (WORKER, ServerProtocol.report),
    "reports": (WORKER, ServerProtocol.reports),
    "heartbeat": (WORKER, ServerProtocol.heartbeat),
    "release": (WORKER, ServerProtocol.release),
}


class ServerFactory(Factory):
    """Builds a `ServerProtocol` for each accepted connection."""

    def __init__(self, hub: Hub) -> None:
        self.hub = hub

    def buildProtocol(self, addr) -> ServerProtocol:
        proto = ServerProtocol(self.hub)
        proto.factory = self
        return proto
