"""`D.executor()`: the standard `concurrent.futures.Executor` interface over dsage jobs."""
from __future__ import annotations

import concurrent.futures
import contextlib
import threading
from typing import Any, Callable

from dsage import errors
from dsage.client import reactor as rt
from dsage.client.blocking import CALL_TIMEOUT, outcome


class JobFuture(concurrent.futures.Future):
    """The Future of one dsage job (`.job`, its handle): pending until the job finishes, and
    `cancel()` succeeds while the job waits in the queue (it is then killed on the server)."""

    def __init__(self, job) -> None:
        super().__init__()
        self.job = job
        self._lock = threading.Lock()
        self._cancelling = False
        self._held: BaseException | None = None   # the kill's JobKilled, while cancel() waits

    def running(self) -> bool:
        """True while the job runs on a worker (asks the server)."""
        return not self.done() and self.job.status == "processing"

    def cancel(self) -> bool:
        """Kill the job if it has not started; True if it will never run."""
        if self.done():
            return self.cancelled()
        with self._lock:
            self._cancelling = True
        try:
            killed = rt.call(self.job.dsage.client.kill, self.job.job_id, True,
                             timeout=CALL_TIMEOUT)["status"] == "killed"
        except (errors.DsageError, TimeoutError):
            killed = False
        with self._lock:
            self._cancelling = False
            held, self._held = self._held, None
        if killed:
            return super().cancel()
        if held is not None:
            self._settle(None, held)
        return False

    def finished(self, rec: Any) -> None:
        """The job's final record (or the Failure of its watch), in the reactor's thread."""
        try:
            value, error = (outcome(rec), None) if isinstance(rec, dict) else (None, rec.value)
        except BaseException as e:
            value, error = None, e
        with self._lock:
            if self._cancelling and isinstance(error, errors.JobKilled):
                self._held = error           # cancel() decides: cancelled, or killed by someone else
                return
        self._settle(value, error)

    def _settle(self, value: Any, error: BaseException | None) -> None:
        with contextlib.suppress(concurrent.futures.InvalidStateError):   # cancelled
            if error is None:
                self.set_result(value)
            else:
                self.set_exception(error)


class DsageExecutor(concurrent.futures.Executor):
    """Each `submit()` is a dsage job; its Future resolves when the job finishes."""

    def __init__(self, dsage) -> None:
        self.dsage = dsage
        self._futures: set[JobFuture] = set()
        self._shutdown = False

    def submit(self, fn: Callable, /, *args: Any, **kwargs: Any) -> JobFuture:
        if self._shutdown:
            raise RuntimeError("cannot submit after shutdown")
        future = JobFuture(self.dsage.submit(fn, *args, **kwargs))
        self._futures.add(future)

        def finished(rec: Any) -> None:
            self._futures.discard(future)
            future.finished(rec)

        def watch() -> None:        # returns nothing: `rt.call` would wait for a Deferred
            self.dsage.client.watch(future.job.job_id).addBoth(finished)
        rt.call(watch)
        return future

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """No more submissions; with `cancel_futures`, the jobs still queued are killed (those
        running go on); with `wait`, return once every job has finished."""
        self._shutdown = True
        if cancel_futures:
            for f in list(self._futures):
                f.cancel()
        if wait:
            concurrent.futures.wait(list(self._futures))
