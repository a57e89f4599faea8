"""DistributedFunction: a long computation that keeps workers fed with jobs and processes
their results as they come back."""
from __future__ import annotations

import queue
import threading
import time
import uuid
from typing import Any

from dsage import errors
from dsage.client import reactor as rt
from dsage.job import FINAL, Job


class DistributedFunction:
    """Subclass it: `next_job()` returns the next `dsage.Job` (or None when nothing is
    ready now); `process_result(job)` is called once for each finished job and sets
    `self.done = True` (and `self.result`) when the computation is finished."""

    #: jobs kept outstanding at once; None: the cluster's slots (at least 2).
    window: int | None = None

    def __init__(self, dsage, name: str | None = None) -> None:
        self.dsage = dsage
        self.name = name or f"{type(self).__name__}-{uuid.uuid4().hex[:12]}"
        self.done = False
        self.result: Any = None
        self.outstanding_jobs: list = []
        self.waiting_jobs: list[Job] = []
        self.processed_jobs: list = []
        self.error: BaseException | None = None
        self.start_time: float | None = None
        self.end_time: float | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()

    def next_job(self) -> Job | None:
        """The next job to run, or None if none is ready now (override)."""
        raise NotImplementedError

    def process_result(self, job) -> None:
        """Handle one finished job (override)."""
        raise NotImplementedError

    @property
    def elapsed(self) -> float:
        """Seconds since `start()` (until finished)."""
        if self.start_time is None:
            return 0.0
        return (self.end_time or time.monotonic()) - self.start_time

    def start(self) -> DistributedFunction:
        """Start feeding jobs and processing results in a background thread."""
        if self._thread is not None:
            raise errors.DsageError(f"{self.name} is already started")
        self.start_time = time.monotonic()
        self._thread = threading.Thread(target=self._drive, name=f"dsage-{self.name}", daemon=True)
        self._thread.start()
        return self

    def wait(self, timeout: float | None = None) -> Any:
        """Block until done; returns `result` (TimeoutError if `timeout` passes first)."""
        if self._thread is None:
            raise errors.DsageError(f"{self.name} was not started")
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise TimeoutError(f"{self.name} not done within {timeout:g} s")
        if self.error is not None:
            raise self.error
        return self.result

    def stop(self) -> None:
        """Stop submitting, kill the outstanding jobs and end the driver thread."""
        self._stopping.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(30)
        self._kill_outstanding()

    def _window(self) -> int:
        if self.window:
            return self.window
        try:
            return max(2, int(self.dsage.status().get("slots", 0)))
        except errors.DsageError:
            return 2

    def _fill(self, events: queue.SimpleQueue, window: int) -> bool:
        """Submit jobs until the window is full; False when next_job had none to give."""
        while len(self.outstanding_jobs) < window and not self.done and not self._stopping.is_set():
            job = self.waiting_jobs.pop(0) if self.waiting_jobs else self.next_job()
            if job is None:
                return False
            handle = self.dsage.submit_many([job], function_id=self.name)[0]
            self.outstanding_jobs.append(handle)
            rt.call(lambda i=handle.job_id: self.dsage.client.watch(i).addBoth(lambda r: events.put((i, r))))
        return True

    def _drive(self) -> None:
        events: queue.SimpleQueue = queue.SimpleQueue()
        try:
            window = self._window()
            while not self.done and not self._stopping.is_set():
                more = self._fill(events, window)
                if not self.outstanding_jobs:
                    if not more:
                        raise errors.DsageError(f"{self.name}: next_job() gave no job, none is "
                                                f"outstanding, and done is still False")
                    continue
                try:
                    job_id, rec = events.get(timeout=0.25)
                except queue.Empty:
                    continue
                if not isinstance(rec, dict):
                    rec.raiseException()
                handle = next(h for h in self.outstanding_jobs if h.job_id == job_id)
                self.outstanding_jobs.remove(handle)
                with self.dsage._lock:
                    self.dsage._remember(rec)
                self.processed_jobs.append(handle)
                self.process_result(handle)
        except BaseException as e:
            self.error = e
        finally:
            self.end_time = time.monotonic()
            if self.done:
                self._kill_outstanding()

    def _kill_outstanding(self) -> None:
        """Kill the jobs still outstanding (the function no longer needs them)."""
        handles, self.outstanding_jobs = self.outstanding_jobs, []
        for handle in handles:
            try:
                if handle.dsage.record(handle.job_id)["status"] not in FINAL:
                    handle.kill()
            except errors.DsageError:
                pass
