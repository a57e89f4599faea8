"""The client's asynchronous core: a reconnecting TLS connection whose calls return
Deferreds, and the push events that tell it when its jobs finish.  Twisted programs use it
directly through `connect_async`; everyone else through the blocking façade."""
from __future__ import annotations

import collections
import logging
from typing import Callable

from twisted.internet import defer
from twisted.internet.protocol import Factory
from twisted.logger import Logger

from dsage import errors, tls
from dsage.job import FINAL
from dsage.protocol import PROTOCOL_VERSION, MessageProtocol
from dsage.reconnect import Reconnector
from dsage.config import split_address

#: consecutive failed connection attempts before a call gives up.
CALL_RETRIES = 6
#: finished jobs remembered from the server's pushes (waits on them need no round trip),
#: and the most bytes of results among them (the oldest go first; a wait fetches them).
FINISHED_CACHE = 100_000
FINISHED_BYTES = 64 << 20


class ClientProtocol(MessageProtocol):
    """The client's end of a connection; job events go to the factory's `AsyncClient`."""

    def handle_event(self, event: str, data: dict) -> None:
        if event == "job_waits" and isinstance(data.get("reason"), str):
            logging.getLogger("dsage").warning("%s", data["reason"][:500])
            return
        done = data.get("jobs") if event == "jobs_done" else [data] if event == "job_done" else None
        for summary in done if isinstance(done, list) else ():
            if isinstance(summary, dict) and isinstance(summary.get("job_id"), int):
                self.factory.client.job_event(summary)


class AsyncClient:
    """One user's connection to the server, reconnecting by itself."""

    log = Logger()

    def __init__(self, bundle: tls.Bundle, address: str | None, reactor) -> None:
        self.bundle = bundle
        self.reactor = reactor
        self.address = address or bundle.server
        self.identity: str | None = None
        self.role: str | None = None
        self.watchers: dict[int, list[defer.Deferred]] = {}
        self.closed = False              # stop() was called: every request fails at once
        self.finished: collections.OrderedDict[int, dict] = collections.OrderedDict()
        self._finished_bytes = 0
        #: unfinished jobs submitted on this connection: their end will be pushed to us.
        self.pushed: set[int] = set()
        self.listeners: list[Callable[[dict], None]] = []
        host, port = split_address(self.address)
        endpoint = tls.client_endpoint(bundle, reactor, host, port)
        factory = Factory.forProtocol(ClientProtocol)
        factory.client = self
        self.link = Reconnector(endpoint, factory, self._prepare, reactor, max_delay=2.0)
        self._auth_error: Exception | None = None

    async def _hello(self, proto: ClientProtocol) -> None:
        try:
            welcome = await proto.call("hello", version=list(PROTOCOL_VERSION), role="client",
                                       name=self.bundle.name)
        except errors.AuthError as e:
            # Refused identities do not retry: stop reconnecting, fail what waits.
            self._auth_error = e
            self.reactor.callLater(0, self.link.stop)
            raise
        self.identity, self.role = welcome["identity"], welcome["role"]
        self.pushed.clear()     # pushes may have been missed while away: the watchers look again
        # Jobs may have finished while we were away: look again at every watched job.
        for job_id in list(self.watchers):
            proto.call("get_job", job_id=job_id).addCallbacks(self._check_final, lambda f: None)

    def _prepare(self, proto: ClientProtocol) -> defer.Deferred:
        return defer.Deferred.fromCoroutine(self._hello(proto))

    async def _start(self) -> AsyncClient:
        self.link.start()
        try:
            await self.link.when_connected(fail_after=1)
        except Exception as e:
            await self.link.stop()
            if self._auth_error is not None:
                raise self._auth_error from None
            if isinstance(e, errors.DsageError):
                raise
            raise errors.ConnectionLost(f"cannot connect to the dsage server at {self.address}: {e}") from None
        return self

    def start(self) -> defer.Deferred:
        """Connect; fires with self, or fails with AuthError or ConnectionLost."""
        return defer.Deferred.fromCoroutine(self._start())

    def stop(self) -> defer.Deferred:
        """Disconnect for good; what waits for a job fails."""
        self.closed = True
        watchers, self.watchers = self.watchers, {}
        for waiting in watchers.values():
            for d in waiting:
                d.errback(_closed())
        return self.link.stop()

    async def _call(self, verb: str, args: dict):
        if self.closed:
            raise _closed()
        if self._auth_error is not None:
            raise self._auth_error
        try:
            proto = await self.link.when_connected(fail_after=CALL_RETRIES)
        except errors.DsageError:
            raise
        except Exception as e:
            if self._auth_error is not None:
                raise self._auth_error from None
            raise errors.ConnectionLost(f"the dsage server at {self.address} is unreachable: {e}") from None
        return await proto.call(verb, **args)

    def call(self, verb: str, **args) -> defer.Deferred:
        """Send a request once connected; fires with the server's reply."""
        return defer.Deferred.fromCoroutine(self._call(verb, args))

    # -- the API, as Deferreds -----------------------------------------------------------
    def submit(self, func, *args, **kwargs) -> defer.Deferred:
        """Submit a callable (or a `dsage.Job`); fires with the job id."""
        from dsage.job import as_job

        return self.submit_many([as_job(func, args, kwargs)]).addCallback(lambda ids: ids[0])

    def eval(self, code: str, **options) -> defer.Deferred:
        """Submit a code string (options as for `dsage.Job`); fires with the job id."""
        from dsage.job import Job

        return self.submit(Job(code=code, **options))

    def submit_many(self, jobs, function_id: str | None = None, token: str | None = None) -> defer.Deferred:
        """Submit jobs (`dsage.Job`s, or their `to_wire()` maps) in one transaction; fires with
        their ids.  Resending the same `token` after a lost reply returns the first
        submission's ids instead of submitting twice."""
        args = {"jobs": [j if isinstance(j, dict) else j.to_wire() for j in jobs]}
        if function_id:
            args["function_id"] = function_id
        if token:
            args["token"] = token

        def submitted(reply: dict) -> list[int]:
            self.pushed.update(reply["job_ids"])
            return reply["job_ids"]
        return self.call("submit", **args).addCallback(submitted)

    def map(self, func, *iterables) -> defer.Deferred:
        """One job per item; fires with the ids in item order."""
        from dsage.job import Job

        return self.submit_many([Job(func=func, args=args) for args in zip(*iterables)])

    def starmap(self, func, items) -> defer.Deferred:
        """One job per args tuple or (args, kwargs) pair; fires with the ids in item order."""
        from dsage.client.blocking import split_item
        from dsage.job import Job

        return self.submit_many([Job(func=func, args=a, kwargs=k) for a, k in map(split_item, items)])

    def result(self, job_id: int) -> defer.Deferred:
        """Fires with the job's result once finished (or fails with JobFailed / JobKilled)."""
        from dsage.client.blocking import outcome

        return self.watch(job_id).addCallback(outcome)

    def job(self, job_id: int) -> defer.Deferred:
        """Fires with the job's record."""
        return self.call("get_job", job_id=job_id)

    def jobs(self, status: str | None = None, all: bool = False) -> defer.Deferred:
        """Fires with the records of your jobs (without results)."""
        return self.call("list_jobs", status=status, all=all)

    def rerun(self, job_id: int) -> defer.Deferred:
        """Run a finished job again; fires with its record."""
        self._forget(job_id)
        return self.call("rerun", job_id=job_id)

    def kill(self, job_id: int, queued_only: bool = False) -> defer.Deferred:
        """Kill a job (with `queued_only`, only one that has not started); fires with its record."""
        return self.call("kill", job_id=job_id, queued_only=queued_only)

    def workers(self) -> defer.Deferred:
        """Fires with the connected workers."""
        return self.call("workers")

    def status(self) -> defer.Deferred:
        """Fires with the cluster's status."""
        return self.call("status")

    # -- finished jobs -----------------------------------------------------------------
    def job_event(self, summary: dict) -> None:
        """A job of ours reached a final status."""
        self._forget(summary["job_id"])
        self.finished[summary["job_id"]] = summary
        self._finished_bytes += len(summary.get("result") or b"")
        self.pushed.discard(summary["job_id"])
        while len(self.finished) > FINISHED_CACHE or self._finished_bytes > FINISHED_BYTES:
            self._forget(next(iter(self.finished)))
        for listener in list(self.listeners):
            listener(summary)
        self._check_final(summary)

    def _forget(self, job_id: int) -> None:
        old = self.finished.pop(job_id, None)
        if old is not None:
            self._finished_bytes -= len(old.get("result") or b"")

    def _check_final(self, summary: dict) -> None:
        if summary.get("status") in FINAL:
            for d in self.watchers.pop(summary["job_id"], []):
                d.callback(summary)

    def watch(self, job_id: int) -> defer.Deferred:
        """Fires with the job's final record (result included) when it is finished."""
        if self.closed:
            return defer.fail(_closed())
        known = self.finished.get(job_id)
        if known is not None and known.get("status") in FINAL and (known["status"] != "completed" or "result" in known):
            return defer.succeed(known)
        d = defer.Deferred(lambda d: self._unwatch(job_id, d))
        self.watchers.setdefault(job_id, []).append(d)
        if job_id in self.pushed:
            return d            # submitted here: its end will be pushed

        def fetched(summary: dict) -> None:
            if summary.get("status") in FINAL and not d.called:
                self._unwatch(job_id, d)
                d.callback(summary)

        def failed(f):
            if f.check(errors.ConnectionLost):
                return  # keep waiting: the next hello looks at every watched job again
            if not d.called:
                self._unwatch(job_id, d)
                d.errback(f)
        self.call("get_job", job_id=job_id).addCallbacks(fetched, failed)
        return d

    def _unwatch(self, job_id: int, d: defer.Deferred) -> None:
        waiting = self.watchers.get(job_id, [])
        if d in waiting:
            waiting.remove(d)
        if not waiting:
            self.watchers.pop(job_id, None)


def _closed() -> errors.DsageError:
    return errors.DsageError("this dsage session is closed: connect again")


def connect_async(address: str | None = None, cert: str | None = None, reactor=None) -> defer.Deferred:
    """Connect from a Twisted program; fires with an `AsyncClient`."""
    from dsage.config import home

    if reactor is None:
        from twisted.internet import reactor
    bundle = tls.Bundle.load(cert or home() / "client.pem")
    return AsyncClient(bundle, address or default_address(cert), reactor).start()


def default_address(cert: str | None) -> str | None:
    """With the home's own bundle, the address the local server wrote when it started."""
    from dsage.config import home

    addr_file = home() / "server.addr"
    if cert is None and addr_file.exists():
        return addr_file.read_text().strip() or None
    return None
