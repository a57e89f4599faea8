"""`D.executor()`: the standard `concurrent.futures.Executor` interface over dsage jobs."""
from __future__ import annotations

import concurrent.futures
import contextlib
import threading
import time
from typing import Any, Callable, Iterator

from twisted.internet import defer

from dsage import errors
from dsage.client import reactor as rt
from dsage.client.blocking import CALL_TIMEOUT, outcome


class JobFuture(concurrent.futures.Future):
    """The Future of one dsage job (`.job`, its handle): pending until the job finishes, and
    `cancel()` succeeds until the job starts (it is then killed on the server)."""

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
        self._cancelling_now()
        return self._cancel_ends(self._kill())

    def _kill(self) -> bool:
        """Ask the server to kill the job if it has not started: whether it did."""
        try:
            # (`_call` asks again through a reconnection: a kill of a killed job says "killed")
            return self.job.dsage._call("kill", job_id=self.job.job_id, queued_only=True)["status"] == "killed"
        except (errors.DsageError, TimeoutError):
            return False

    def _cancelling_now(self) -> None:
        with self._lock:
            self._cancelling = True

    def _cancel_ends(self, killed: bool) -> bool:
        """The kill's answer: cancelled if it killed the job (its pushed end is ours), else
        the end pushed meanwhile, if any, is the Future's."""
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
        """As `Executor.map` (results in order; TimeoutError once `timeout` has passed since
        the call; the jobs whose results were not given cancelled, together, when it times
        out, fails or is closed early), with the calls submitted in batches (`D.map`) rather
        than one round trip each."""
        if self._shutdown:
            raise RuntimeError("cannot submit after shutdown")
        futures = self._futures_of(self.dsage.map(fn, *iterables))
        end = None if timeout is None else time.monotonic() + timeout

        def results() -> Iterator[Any]:
            try:
                futures.reverse()
                while futures:
                    # (one whose wait timed out stays in the list: it is cancelled with the rest)
                    value = futures[-1].result(None if end is None else max(0.0, end - time.monotonic()))
                    futures.pop()
                    yield value
            finally:
                cancel_all(self.dsage, futures)
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
            cancel_all(self.dsage, list(self._futures))
        if wait:
            concurrent.futures.wait(list(self._futures))


#: kills `cancel_all` has on their way at once.
CANCELS_IN_FLIGHT = 1000


def cancel_all(dsage, futures: list[JobFuture]) -> None:
    """Cancel many Futures together: their kills travel at once, the server commits them in
    batches (2,000 one after the other took 7.6 s here); a kill lost with the link is asked
    again alone, through the reconnection."""
    pending = [f for f in futures if not f.done()]
    for start in range(0, len(pending), CANCELS_IN_FLIGHT):
        chunk = pending[start:start + CANCELS_IN_FLIGHT]
        for f in chunk:
            f._cancelling_now()

        def kill_all() -> defer.Deferred:
            return defer.DeferredList([dsage.client.kill(f.job.job_id, True) for f in chunk], consumeErrors=True)
        try:
            answers = rt.call(kill_all, timeout=CALL_TIMEOUT)
        except TimeoutError:
            answers = [(False, None)] * len(chunk)
        for f, (ok, value) in zip(chunk, answers):
            if ok:
                f._cancel_ends(value["status"] == "killed")
            else:
                f._cancel_ends(f._kill() if value is not None and value.check(errors.ConnectionLost) else False)
