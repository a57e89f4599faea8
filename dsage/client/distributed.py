"""DistributedFunction: a long computation that keeps workers fed with jobs, processes their
results as they come back, and survives the loss of any process.

Every step of the driver is one checkpoint on the server, in one transaction: the results
processed since the last step, the function's new pickled state, and the jobs it asked for.
So after a crash (of the client, the server or a worker) `restore()` resumes from the last
checkpoint: the jobs it had submitted are known, the results it had processed are not given
to it again, and every other result is.  Jobs keep running, and results wait on the server,
while no client is connected.
"""
from __future__ import annotations

import contextlib
import queue
import threading
import time
import uuid
from typing import Any

import cloudpickle

from dsage import errors
from dsage.client import reactor as rt
from dsage.client.blocking import retrying
from dsage.job import FINAL, MAX_JOB_BYTES, MIB, Job, carried

#: once the new jobs of a step carry this much payload and files, the rest wait for the
#: next step: a step is one message, of at most 256 MiB with the checkpoint.
STEP_BYTES = 64 << 20
#: attributes that belong to one process's session, never to the checkpoint.
_SESSION_ATTRS = ("dsage", "_thread", "_stopping", "_lock", "_events", "_session", "outstanding_jobs",
                  "processed_jobs", "error", "start_time", "end_time")


class DistributedFunction:
    """Subclass it: `next_job()` returns the next `dsage.Job` (or None when nothing is
    ready now); `process_result(job)` is called once for each finished job and sets
    `self.done = True` (and `self.result`) when the computation is finished."""

    #: jobs kept outstanding at once; None: the cluster's slots (at least 2).
    window: int | None = None

    def __init__(self, dsage, name: str | None = None) -> None:
        self.name = name or f"{type(self).__name__}-{uuid.uuid4().hex[:12]}"
        self.done = False
        self.result: Any = None
        self.waiting_jobs: list[Job] = []
        self._started = False
        self._step_no = 0
        self._attach(dsage)

    def _attach(self, dsage) -> None:
        self.dsage = dsage
        self.outstanding_jobs: list = []
        self.processed_jobs: list = []
        self.error: BaseException | None = None
        self.start_time: float | None = None
        self.end_time: float | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._lock = threading.RLock()
        self._events: queue.SimpleQueue = queue.SimpleQueue()
        self._session = uuid.uuid4().hex

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k not in _SESSION_ATTRS}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)

    # -- what subclasses write -----------------------------------------------------------
    def next_job(self) -> Job | None:
        """The next job to run, or None if none is ready now (override)."""
        raise NotImplementedError

    def process_result(self, job) -> None:
        """Handle one finished job (override)."""
        raise NotImplementedError

    # -- control -------------------------------------------------------------------------
    @property
    def elapsed(self) -> float:
        """Seconds since `start()` (until finished)."""
        if self.start_time is None:
            return 0.0
        return (self.end_time or time.monotonic()) - self.start_time

    def start(self) -> DistributedFunction:
        """Start (or, after `restore` or `stop`, resume) feeding jobs and processing results;
        a function already done has nothing to do."""
        if self._thread is not None:
            if self._thread.is_alive():
                raise errors.DsageError(f"{self.name} is already started")
            if self.done:
                return self
            if self.error is not None:
                raise errors.DsageError(f"{self.name} stopped on an error ({self.error!r}): fix it, then "
                                        f"restore the function to go on from its last checkpoint")
            self._stopping.clear()              # stopped by stop(): go on
        with self._lock:
            if not self._started:
                self._started = True        # part of the checkpoint
                try:
                    retrying(self.dsage.client.call, "function_start", name=self.name, state=self._pickle(),
                             session=self._session)
                except BaseException:
                    self._started = False
                    raise
        self.start_time = time.monotonic()
        self._thread = threading.Thread(target=self._drive, name=f"dsage-{self.name}", daemon=True)
        self._thread.start()
        return self

    def wait(self, timeout: float | None = None) -> Any:
        """Block until done; returns `result` (TimeoutError if `timeout` passes first).  A
        function this process has not started (new, or just restored) is started first."""
        if self._thread is None:
            self.start()
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise TimeoutError(f"{self.name} not done within {timeout:g} s")
        if self.error is not None:
            raise self.error
        return self.result

    def stop(self) -> None:
        """Stop this client's driver (the checkpoint and the jobs stay on the server)."""
        self._stopping.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(60)

    def save(self) -> None:
        """Checkpoint now (the driver also does it at every step)."""
        if not self._started:
            raise errors.DsageError(f"{self.name} was not started: nothing to save")
        with self._lock:
            self._step([], [])

    @classmethod
    def restore(cls, dsage, name: str) -> DistributedFunction:
        """The function `name` as of its last checkpoint, ready to `start()` again.  Called
        on a subclass (`Factor.restore(D, name)`), the state comes back into that class as
        it is defined now: a class defined in a script or notebook is checkpointed by value,
        and its code as it was then, bugs included, would come back with it."""
        session = uuid.uuid4().hex
        rec = dsage._call("function_get", name=name, session=session)
        try:
            self = _loads_leaving_classes(rec["state"])
        except Exception as e:
            raise errors.DsageError(f"cannot unpickle the function {name!r} here: {e!r} "
                                    f"(is its class importable in this program?)") from None
        if not isinstance(self, DistributedFunction):
            raise errors.DsageError(f"{name!r} is not a DistributedFunction")
        if cls is not DistributedFunction and not isinstance(self, cls):
            if type(self).__qualname__ != cls.__qualname__:
                raise errors.DsageError(f"{name!r} is a {type(self).__qualname__}, not a {cls.__qualname__}")
            self.__class__ = cls        # today's code for the checkpointed state
        self._attach(dsage)
        self._session = session
        processed = set(rec["processed"])
        self.processed_jobs = dsage._handles(i for i in rec["jobs"] if i in processed)
        self.outstanding_jobs = [] if rec["done"] else dsage._handles(i for i in rec["jobs"] if i not in processed)
        self._watch([handle.job_id for handle in self.outstanding_jobs])
        return self

    # -- the driver ------------------------------------------------------------------------
    def _pickle(self) -> bytes:
        try:
            state = cloudpickle.dumps(self)
        except Exception as e:
            raise errors.DsageError(f"cannot checkpoint {self.name}: its state does not pickle: {e!r}") from None
        if len(state) > MAX_JOB_BYTES:
            raise errors.DsageError(f"cannot checkpoint {self.name}: its state is {len(state) / MIB:.1f} MiB "
                                    f"pickled, more than the {MAX_JOB_BYTES // MIB} MiB a checkpoint may hold")
        return state

    def _window(self) -> int:
        if self.window:
            return self.window
        try:
            return max(2, int(self.dsage.status().get("slots", 0)))
        except errors.DsageError:
            return 2

    def _watch(self, job_ids: list[int]) -> None:
        """Have these jobs' ends put in `_events` as they come (without waiting for them)."""
        def watch() -> None:        # returns nothing: `rt.call` would wait for a Deferred
            for job_id in job_ids:
                self.dsage.client.watch(job_id).addBoth(lambda r, i=job_id: self._events.put((i, r)))
        rt.call(watch)

    def _step(self, processed: list[int], wires: list[dict]) -> None:
        """One checkpoint on the server; new jobs (`Job.to_wire()`s) become outstanding."""
        self._step_no += 1              # part of the checkpoint: pickled after it changes
        try:
            state = self._pickle()
            size = len(state) + sum(map(carried, wires))
            if size > MAX_JOB_BYTES:
                raise errors.DsageError(f"{self.name}: a checkpoint with its new jobs is {size / MIB:.1f} MiB, "
                                        f"more than the {MAX_JOB_BYTES // MIB} MiB one step may carry")
        except errors.DsageError:
            self._step_no -= 1
            raise
        reply = retrying(self.dsage.client.call, "function_step", name=self.name, session=self._session,
                         step=self._step_no, state=state, processed=processed,
                         jobs=wires, done=bool(self.done), timeout=None, give_up=self._stopping.is_set)
        self.outstanding_jobs += self.dsage._handles(reply["job_ids"])
        self._watch(reply["job_ids"])

    def _next_events(self) -> list:
        """Finished jobs: wait a moment for the first, then take whatever else is there."""
        try:
            got = [self._events.get(timeout=0.25)]
        except queue.Empty:
            return []
        while True:
            try:
                got.append(self._events.get_nowait())
            except queue.Empty:
                return got

    def _drive(self) -> None:
        if self.done:                       # restored after it finished: nothing left to do
            self.end_time = time.monotonic()
            return
        try:
            window = self._window()
            starved = False
            while not self._stopping.is_set():
                with self._lock:
                    processed = self._process(self._next_events() if self.outstanding_jobs or starved else [])
                    new: list[dict] = []
                    size = 0
                    while (not self.done and len(self.outstanding_jobs) + len(new) < window
                           and size < STEP_BYTES):      # more in the next step
                        job = self.waiting_jobs.pop(0) if self.waiting_jobs else self.next_job()
                        if job is None:
                            break
                        if not isinstance(job, Job):
                            raise TypeError(f"{self.name}: next_job() must return a dsage.Job or None, "
                                            f"not {type(job).__name__}")
                        new.append(job.to_wire())
                        size += carried(new[-1])
                    if processed or new or self.done:
                        self._step(processed, new)
                    if self.done:
                        self.outstanding_jobs = []
                        return
                    if not self.outstanding_jobs:
                        if starved:
                            raise errors.DsageError(f"{self.name}: next_job() gave no job, none is "
                                                    f"outstanding, and done is still False")
                        starved = True
                    else:
                        starved = False
        except BaseException as e:
            self.error = e
        finally:
            self.end_time = time.monotonic()

    def _process(self, events: list) -> list[int]:
        """Give each finished job to process_result, once; their ids."""
        done_ids = []
        for job_id, rec in events:
            if not isinstance(rec, dict):
                rec.raiseException()
            handle = next((h for h in self.outstanding_jobs if h.job_id == job_id), None)
            if handle is None or rec["status"] not in FINAL:
                continue
            self.outstanding_jobs.remove(handle)
            with self.dsage._lock:
                self.dsage._remember(rec)
            if not self.done:
                self.process_result(handle)
            self.processed_jobs.append(handle)
            done_ids.append(job_id)
            self.dsage._drop_result(handle)
        return done_ids


def _subclasses(cls: type) -> list[type]:
    """Every subclass of `cls`, at any depth."""
    found: list[type] = []
    for sub in cls.__subclasses__():
        found += [sub, *_subclasses(sub)]
    return found


def _loads_leaving_classes(state: bytes) -> DistributedFunction:
    """Unpickle a checkpoint without changing the classes this program has now: a class
    checkpointed by value (from a script or notebook) is, in the program that pickled it,
    given back the attributes it had then (cloudpickle applies them to the live class), which
    would undo a fix made since, for instance a method patched in."""
    live = [(cls, dict(vars(cls))) for cls in _subclasses(DistributedFunction)]
    try:
        return cloudpickle.loads(state)
    finally:
        for cls, attrs in live:
            for name in set(vars(cls)) - set(attrs):
                with contextlib.suppress(AttributeError, TypeError):
                    delattr(cls, name)
            for name, value in attrs.items():
                if vars(cls).get(name) is not value:
                    with contextlib.suppress(AttributeError, TypeError):
                        setattr(cls, name, value)
