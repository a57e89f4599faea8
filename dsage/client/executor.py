"""`D.executor()`: the standard `concurrent.futures.Executor` interface over dsage jobs."""
from __future__ import annotations

import concurrent.futures
from typing import Any, Callable

from dsage.client import reactor as rt
from dsage.client.blocking import outcome


class DsageExecutor(concurrent.futures.Executor):
    """Each `submit()` is a dsage job; its Future resolves when the job finishes."""

    def __init__(self, dsage) -> None:
        self.dsage = dsage
        self._futures: set[concurrent.futures.Future] = set()
        self._shutdown = False

    def submit(self, fn: Callable, /, *args: Any, **kwargs: Any) -> concurrent.futures.Future:
        if self._shutdown:
            raise RuntimeError("cannot submit after shutdown")
        handle = self.dsage.submit(fn, *args, **kwargs)
        future: concurrent.futures.Future = concurrent.futures.Future()
        future.job = handle
        future.set_running_or_notify_cancel()
        self._futures.add(future)

        def finished(rec: Any) -> None:
            self._futures.discard(future)
            try:
                if isinstance(rec, dict):
                    future.set_result(outcome(rec))
                else:
                    future.set_exception(rec.value)
            except BaseException as e:
                future.set_exception(e)

        def watch() -> None:        # returns nothing: `rt.call` would wait for a Deferred
            self.dsage.client.watch(handle.job_id).addBoth(finished)
        rt.call(watch)
        return future

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        self._shutdown = True
        if cancel_futures:
            for f in list(self._futures):
                f.job.kill()
        if wait:
            concurrent.futures.wait(list(self._futures))
