"""`D.executor()`: the standard `concurrent.futures.Executor` interface over dsage jobs."""
from __future__ import annotations

import concurrent.futures
import contextlib
import threading
import time
from typing import Any, Callable, Iterator

from dsage import errors
from dsage.client import reactor as rt
from dsage.client.blocking import outcome


class JobFuture(concurrent.futures.Future):
    """The Future of one dsage job (`.job`, its handle): pending until the job finishes, and
    `cancel()` succeeds while the job waits in the queue (it is then killed on the server)."""

    def __init__(self, job) -> None:
        super().__init__()
        self.job = job
        self._lock = threading.Lock()
        self._cancelling = False
        self._cancelled = False                   # cancel() killed the job: its JobKilled is ours
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
            # (`_call` asks again through a reconnection: a kill of a killed job says "killed")
            killed = self.job.dsage._call("kill", job_id=self.job.job_id, queued_only=True)["status"] == "killed"
        except (errors.DsageError, TimeoutError):
            killed = False
        with self._lock:
            self._cancelling = False
            self._cancelled = killed        # the kill's event may come after this: it is ours
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
            if self._cancelled and isinstance(error, errors.JobKilled):
                return                       # cancel()'s own kill: the Future is cancelled, not failed
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
        return self._futures_of([self.dsage.submit(fn, *args, **kwargs)])[0]

    def map(self, fn: Callable, *iterables: Any, timeout: float | None = None, chunksize: int = 1,
            **_: Any) -> Iterator[Any]:
        """As `Executor.map` (results in order, TimeoutError once `timeout` has passed since
        the call, the jobs not yet reached cancelled when the iterator is closed early), with
        the calls submitted in batches (`D.map`) rather than one round trip each."""
        if self._shutdown:
            raise RuntimeError("cannot submit after shutdown")
        futures = self._futures_of(self.dsage.map(fn, *iterables))
        end = None if timeout is None else time.monotonic() + timeout

        def results() -> Iterator[Any]:
            try:
                futures.reverse()
                while futures:
                    yield futures.pop().result(None if end is None else max(0.0, end - time.monotonic()))
            finally:
                for future in futures:
                    future.cancel()
        return results()

    def _futures_of(self, handles: list) -> list[JobFuture]:
        """Futures of submitted jobs, each resolved when its job finishes."""
        futures = [JobFuture(handle) for handle in handles]
        self._futures.update(futures)

        def finished(rec: Any, future: JobFuture) -> None:
            self._futures.discard(future)
            future.finished(rec)

        def watch() -> None:        # returns nothing: `rt.call` would wait for a Deferred
            for future in futures:
                self.dsage.client.watch(future.job.job_id).addBoth(finished, future)
        rt.call(watch)
        return futures

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """No more submissions; with `cancel_futures`, the jobs still queued are killed (those
        running go on); with `wait`, return once every job has finished."""
        self._shutdown = True
        if cancel_futures:
            for f in list(self._futures):
                f.cancel()
        if wait:
            concurrent.futures.wait(list(self._futures))
