"""The blocking client: `dsage.connect()` returns a `Dsage` session; jobs are `JobHandle`s.

Every call runs on the reactor thread (see `dsage.client.reactor`) and waits with a
timeout; job records are kept current by the server's push events."""
from __future__ import annotations

import collections
import concurrent.futures
import logging
import os
import queue
import threading
import time
import weakref
from typing import Any, Callable, Iterable, Iterator

from dsage import errors, tls
from dsage.client import reactor as rt
from dsage.client.connection import AsyncClient, default_address
from dsage.job import FINAL, Job, as_job

#: the final statuses whose record has result bytes (a failed job's: its exception, pickled).
WITH_RESULT = ("completed", "failed")
#: seconds the repr of a handle waits for its job's status.
REPR_WAIT = 2.0
#: seconds a request may take, reconnections included, before TimeoutError.
CALL_TIMEOUT = 120.0
#: requests that must not be sent twice (everything else is retried through reconnections).
NOT_RETRIED = frozenset({"rerun", "add_identity"})
SUBMIT_BATCH = 1000
#: payload bytes per submission message (the first jobs start while later ones travel).
SUBMIT_BYTES = 8 << 20
#: submission messages in flight at once (the next is pickled and sent while the server
#: stores the last).
SUBMITS_IN_FLIGHT = 3


def connect(address: str | None = None, cert: str | None = None, timeout: float = 30.0) -> Dsage:
    """Connect to a dsage server (see `dsage.connect`)."""
    from dsage.config import home

    try:
        bundle = tls.Bundle.load(cert or home() / "client.pem")
    except ValueError as e:
        raise errors.DsageError(f"{e}: run `dsage init` on the server machine, or pass cert= "
                                f"a bundle from `dsage user add`") from None
    if bundle.role == "worker":
        raise errors.AuthError(f"{cert or 'this bundle'} is a worker's bundle; clients need a user bundle")

    def start():
        from twisted.internet import reactor

        return AsyncClient(bundle, address or default_address(cert), reactor).start()
    return Dsage(rt.call(start, timeout=timeout))


def split_item(item: Any) -> tuple[tuple, dict]:
    """A starmap item as (args, kwargs): ``(tuple, dict)`` pairs carry kwargs, tuples and
    lists are args (as in `itertools.starmap`), anything else is the one argument."""
    if isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], tuple) and isinstance(item[1], dict):
        return item[0], item[1]
    if isinstance(item, (tuple, list)):
        return tuple(item), {}
    return (item,), {}


_sender_pool: concurrent.futures.ThreadPoolExecutor | None = None


def _senders() -> concurrent.futures.ThreadPoolExecutor:
    """The threads that wait for submissions' replies while the caller pickles the next."""
    global _sender_pool
    with _pool_lock:
        if _sender_pool is None:
            _sender_pool = concurrent.futures.ThreadPoolExecutor(SUBMITS_IN_FLIGHT, "dsage-submit")
        return _sender_pool


_pool_lock = threading.Lock()


def retrying(fn: Callable, *args: Any, timeout: float | None = CALL_TIMEOUT,
             give_up: Callable[[], bool] = lambda: False, **kw: Any) -> Any:
    """Call `fn` in the reactor thread; while the server is unreachable, try again (the same
    request: callers make it idempotent) until `timeout`, or until `give_up()` is true."""
    deadline = None if timeout is None else time.monotonic() + timeout
    lost: errors.ConnectionLost | None = None
    while True:
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        try:
            return rt.call(fn, *args, timeout=left, **kw)
        except errors.ConnectionLost as e:
            if (deadline is not None and time.monotonic() >= deadline) or give_up() or rt.ending():
                raise
            if lost is None:
                _warn_unreachable(e, timeout)
            lost = e
            time.sleep(0.2)
        except TimeoutError:
            if lost is None:
                raise TimeoutError(f"no answer within {timeout:g} s") from None
            # the time went in waiting for the server: say so, not "no answer within 0.4 s"
            raise errors.ConnectionLost(f"{str(lost).rstrip('.')} (tried again for {timeout:g} s)") from None


_last_warning = float("-inf")


def _warn_unreachable(lost: errors.ConnectionLost, timeout: float | None) -> None:
    """Tell the user (once in 30 s) that calls wait for the server, rather than seem to hang."""
    global _last_warning
    now = time.monotonic()
    if now - _last_warning >= 30.0:
        _last_warning = now
        how_long = "until it is back" if timeout is None else f"for up to {timeout:g} s"
        logging.getLogger("dsage").warning("%s; waiting %s", str(lost).rstrip("."), how_long)


def unpickle_result(summary: dict) -> Any:
    """The Python value of a completed job's result bytes."""
    data = summary.get("result")
    if data is None:
        return None
    import cloudpickle

    try:
        return cloudpickle.loads(data)
    except Exception as e:
        raise errors.DsageError(f"job {summary['job_id']}: cannot unpickle its result here: {e!r}") from None


def outcome(summary: dict) -> Any:
    """The result of a finished job, or the exception it ended with."""
    status = summary["status"]
    if status == "completed":
        return unpickle_result(summary)
    if status == "killed":
        raise errors.JobKilled(summary["job_id"])
    raise errors.job_failed(summary["job_id"], summary.get("error"), _job_exception(summary))


def _job_exception(summary: dict) -> BaseException | None:
    """A failed job's own exception (its result bytes), or None when it cannot be had here."""
    data = summary.get("result")
    if not data:
        return None
    import cloudpickle

    try:
        exception = cloudpickle.loads(data)
    except Exception:
        return None
    return exception if isinstance(exception, BaseException) else None


def _submission_token() -> str:
    """A new submission's token (unique; the server remembers it a day): its time first, so
    that the server's tree of tokens grows at its end instead of at random leaves."""
    return f"{time.time_ns():016x}{os.urandom(8).hex()}"


class Dsage:
    """A blocking session with the server: submit jobs, look at them, manage them."""

    def __init__(self, client: AsyncClient) -> None:
        self.client = client
        #: the latest record of each job some handle of this session refers to (with its
        #: result once fetched); an entry goes with the job's last handle.
        self._records: weakref.WeakValueDictionary[int, _Record] = weakref.WeakValueDictionary()
        self._lock = threading.Lock()
        rt.call(lambda: client.listeners.append(self._job_event))

    def __repr__(self) -> str:
        return f"<dsage session {self.client.identity}@{self.client.address}>"

    @property
    def identity(self) -> str:
        """Who this session is (the certificate's name)."""
        return self.client.identity

    def _call(self, verb: str, timeout: float | None = CALL_TIMEOUT, **args: Any) -> Any:
        if verb in NOT_RETRIED:
            return rt.call(self.client.call, verb, timeout=timeout, **args)
        return retrying(self.client.call, verb, timeout=timeout, **args)

    def _job_event(self, summary: dict) -> None:
        with self._lock:
            self._remember(summary)

    def _handles(self, ids: Iterable[int]) -> list[JobHandle]:
        """Handles on these jobs (one lock for them all)."""
        with self._lock:
            return [JobHandle(self, job_id, self._slot(job_id)) for job_id in ids]

    def _slot(self, job_id: int) -> _Record:
        """Where the handles of one job keep its record, shared by them (`_lock` held)."""
        slot = self._records.get(job_id)
        if slot is None:
            slot = self._records[job_id] = _Record()
        return slot

    def _known(self, job_id: int) -> dict | None:
        with self._lock:
            slot = self._records.get(job_id)
            return None if slot is None else slot.rec

    def _remember(self, summary: dict) -> dict:
        """Keep `summary` for the job's handles, if there are any (with `_lock` held)."""
        slot = self._records.get(summary["job_id"])
        if slot is None:
            return summary
        old = slot.rec
        if old is not None and "result" in old and "result" not in summary and summary["status"] == old["status"]:
            summary = dict(summary, result=old["result"])
        slot.rec = summary
        return summary

    def _drop_result(self, handle: JobHandle) -> None:
        """Forget the result bytes kept for `handle` (the server keeps them: `handle.result`
        fetches them again); a long DistributedFunction holds every processed job's handle."""
        with self._lock:
            rec = handle._record.rec
            if rec is not None and "result" in rec:
                handle._record.rec = {k: v for k, v in rec.items() if k != "result"}

    def record(self, job_id: int, fresh: bool = False, output: bool = False) -> dict:
        """The latest known record of a job (fetched when unknown, unfinished or `fresh`;
        with `output`, a running job's output as of now, asked of its worker)."""
        rec = self._known(job_id)
        if rec is None or fresh or (rec["status"] not in FINAL):
            rec = self._call("get_job", job_id=job_id, result=True, **({"output": True} if output else {}))
            with self._lock:
                rec = self._remember(rec)
        elif rec["status"] in WITH_RESULT and "result" not in rec:
            rec = self.record(job_id, fresh=True)
        return rec

    # -- submitting --------------------------------------------------------------------
    def eval(self, code: str, name: str | None = None, timeout: float | None = 600, priority: int = 5,
             max_failures: int = 3, files: Any = None, memory: float | None = None) -> JobHandle:
        """Run a code string; the result is its last expression's value (or DSAGE_RESULT)."""
        return self.submit(Job(code=code, name=name, timeout=timeout, priority=priority,
                               max_failures=max_failures, files=files or {}, memory=memory))

    def submit(self, func: Callable | Job, *args: Any, **kwargs: Any) -> JobHandle:
        """Run `func(*args, **kwargs)` on a worker, or submit a `dsage.Job` as described."""
        return self.submit_many([as_job(func, args, kwargs)])[0]

    def submit_many(self, jobs: Iterable[Job], function_id: str | None = None) -> list[JobHandle]:
        """Submit several jobs in few round trips (each batch committed in one transaction,
        up to SUBMITS_IN_FLIGHT batches on their way at once); the handles in job order."""
        if rt.in_reactor_thread():      # it would wait for senders that wait for this thread
            raise errors.DsageError("blocking dsage call from the reactor thread; use the async client")
        ids: list[int] = []
        flying: collections.deque[concurrent.futures.Future] = collections.deque()
        batch: list[dict] = []
        size = 0

        def send() -> None:
            # A lost reply is sent again with the same token: never submitted twice.
            flying.append(_senders().submit(retrying, self.client.submit_many, list(batch),
                                            function_id, _submission_token()))
            batch.clear()

        try:
            for job in jobs:
                wire = job.to_wire()            # pickled here, in the caller's thread
                batch.append(wire)
                size += len(wire["payload"]) + sum(map(len, wire["files"].values()))
                if len(batch) >= SUBMIT_BATCH or size >= SUBMIT_BYTES:
                    if len(flying) >= SUBMITS_IN_FLIGHT:
                        ids += flying.popleft().result()
                    send()
                    size = 0
            if batch and not flying:        # one batch in all: sent from this thread
                ids += retrying(self.client.submit_many, batch, function_id, _submission_token())
            elif batch:
                send()
            while flying:
                ids += flying.popleft().result()
        finally:
            for future in flying:
                future.cancel()             # not started yet: never sent
        return self._handles(ids)

    def map(self, func: Callable, *iterables: Iterable, timeout: float = 600, priority: int = 5,
            max_failures: int = 3, memory: float | None = None) -> list[JobHandle]:
        """One job per item (like the builtin `map`); the handles come in item order."""
        return self.submit_many(Job(func=func, args=args, timeout=timeout, priority=priority,
                                    max_failures=max_failures, memory=memory) for args in zip(*iterables))

    def starmap(self, func: Callable, items: Iterable, timeout: float = 600, priority: int = 5,
                max_failures: int = 3, memory: float | None = None) -> list[JobHandle]:
        """One job per item: an args tuple, or an ``(args, kwargs)`` pair; handles in item order."""
        return self.submit_many(Job(func=func, args=args, kwargs=kwargs, timeout=timeout, priority=priority,
                                    max_failures=max_failures, memory=memory)
                                for args, kwargs in map(split_item, items))

    # -- looking -----------------------------------------------------------------------
    def job(self, job_id: int) -> JobHandle:
        """A handle on one of your jobs (AuthError if it is someone else's)."""
        handle, = self._handles([int(job_id)])
        self.record(handle.job_id, fresh=True)
        return handle

    def jobs(self, status: str | None = None, all: bool = False, limit: int = 1000) -> list[JobHandle]:
        """Your newest `limit` jobs, newest first (everyone's with all=True, for admins)."""
        summaries = self._call("list_jobs", status=status, all=all, limit=limit)
        handles = self._handles(s["job_id"] for s in summaries)
        with self._lock:
            for s in summaries:
                self._remember(s)
        return handles

    def workers(self) -> list[dict]:
        """The connected workers: name, slots, busy slots and host facts."""
        return self._call("workers")

    def status(self) -> dict:
        """Queue depth, jobs by status, workers, slots, busy slots, recent jobs per second."""
        return self._call("status")

    def executor(self):
        """A `concurrent.futures.Executor` (a `DsageExecutor`) that runs calls as dsage jobs."""
        from dsage.client.executor import DsageExecutor

        return DsageExecutor(self)

    def wait_record(self, job_id: int, timeout: float | None) -> dict:
        """Block until a job is finished (through reconnections); its final record."""
        rec = self._known(job_id)
        if rec is not None and rec["status"] in FINAL and (rec["status"] not in WITH_RESULT or "result" in rec):
            return rec
        try:
            rec = rt.call(self.client.watch, job_id, timeout=timeout)
        except TimeoutError:
            if timeout is None:
                raise
            raise TimeoutError(f"job {job_id} not finished within {timeout:g} s") from None
        with self._lock:
            return self._remember(rec)

    def close(self) -> None:
        """Disconnect."""
        rt.call(self.client.stop, timeout=10)

    def __enter__(self) -> Dsage:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class _Record:
    """The latest known record of one job, shared by its handles."""

    __slots__ = ("rec", "__weakref__")

    def __init__(self) -> None:
        self.rec: dict | None = None


class JobHandle:
    """A submitted job; attributes read its latest record from the server (kept while
    some handle of the job is, then dropped with its result)."""

    def __init__(self, dsage: Dsage, job_id: int, record: _Record) -> None:
        self.dsage = dsage
        self.job_id = job_id
        self._record = record           # shared with the job's other handles (`Dsage._handles`)

    def __repr__(self) -> str:
        """With the job's status: a final one as known, else asked once (without the result,
        waiting at most REPR_WAIT s: a list of handles shown while the server is down)."""
        rec = self.dsage._known(self.job_id)
        if rec is None or rec["status"] not in FINAL:
            try:
                fetched = rt.call(self.dsage.client.call, "get_job", job_id=self.job_id, result=False,
                                  timeout=REPR_WAIT)
            except (errors.DsageError, TimeoutError) as e:
                return f"<dsage job {self.job_id} (status unknown: {str(e).splitlines()[0][:120]})>"
            with self.dsage._lock:
                rec = self.dsage._remember(fetched)
        return f"<dsage job {self.job_id} {rec['status']}>"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, JobHandle) and other.job_id == self.job_id and other.dsage is self.dsage

    def __hash__(self) -> int:
        return hash(self.job_id)

    def _rec(self) -> dict:
        return self.dsage.record(self.job_id)

    status = property(lambda self: self._rec()["status"], doc="new, processing, completed, failed or killed")
    name = property(lambda self: self._rec()["name"], doc="the job's name")
    output = property(lambda self: self.dsage.record(self.job_id, output=True)["output"],
                      doc="captured stdout and stderr (while it runs: the end of it so far)")
    error = property(lambda self: self._rec()["error"], doc="the traceback of the last failure")
    failures = property(lambda self: self._rec()["failures"], doc="how many attempts failed")
    attempts = property(lambda self: self._rec()["attempts"], doc="every attempt: worker, times, outcome")
    cpu_time = property(lambda self: self._rec()["cpu_time"], doc="CPU seconds of the last attempt")
    wall_time = property(lambda self: self._rec()["wall_time"], doc="wall seconds of the last attempt")
    memory = property(lambda self: self._rec().get("memory"),
                      doc="MiB the job needs (as given, or raised after an attempt ran out of memory)")
    peak_memory = property(lambda self: self._rec().get("peak_memory"),
                           doc="peak resident memory of the last attempt's process, in bytes (None: unknown)")
    function_id = property(lambda self: self._rec()["function_id"], doc="its DistributedFunction, if any")
    created = property(lambda self: self._rec()["created"], doc="when it was submitted (seconds since the epoch)")
    started = property(lambda self: self._rec()["started"], doc="when its last attempt started (None: not yet)")
    finished = property(lambda self: self._rec()["finished"], doc="when it ended (None: not yet)")

    @property
    def result(self) -> Any:
        """The job's value once completed, else None."""
        rec = self._rec()
        return unpickle_result(rec) if rec["status"] == "completed" else None

    def done(self) -> bool:
        """True once the job is completed, failed or killed."""
        return self._rec()["status"] in FINAL

    def wait(self, timeout: float | None = None) -> Any:
        """Block until finished; the result, or JobFailed / JobKilled / TimeoutError."""
        return outcome(self.dsage.wait_record(self.job_id, timeout))

    def kill(self) -> str:
        """Kill the job (a running one is stopped on its worker); returns its status."""
        rec = self.dsage._call("kill", job_id=self.job_id)
        with self.dsage._lock:
            self.dsage._remember(rec)
        return rec["status"]

    def rerun(self) -> JobHandle:
        """Run a finished job again from the start."""
        rec = rt.call(self.dsage.client.rerun, self.job_id, timeout=CALL_TIMEOUT)
        with self.dsage._lock:
            self._record.rec = rec
        return self


def as_completed(jobs: Iterable[JobHandle], timeout: float | None = None) -> Iterator[JobHandle]:
    """Yield the handles as their jobs finish; TimeoutError if `timeout` passes first."""
    import time

    jobs = list(jobs)
    if not jobs:
        return
    finished: queue.SimpleQueue = queue.SimpleQueue()
    by_id = {j.job_id: j for j in jobs}
    session = jobs[0].dsage

    def watch_all() -> None:
        for job_id in by_id:
            session.client.watch(job_id).addBoth(lambda r, i=job_id: finished.put((i, r)))
    rt.call(watch_all)
    deadline = None if timeout is None else time.monotonic() + timeout
    for _ in range(len(by_id)):
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        try:
            job_id, rec = finished.get(timeout=left)
        except queue.Empty:
            raise TimeoutError(f"jobs not finished within {timeout:g} s") from None
        if isinstance(rec, dict):
            with session._lock:
                session._remember(rec)
        yield by_id[job_id]
