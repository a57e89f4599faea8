"""JobStore: the only module that uses `transaction`; every ZODB read and write goes here.

Threading model.  The server has one ZODB connection, with an explicit transaction manager,
and `JobStore._run` applies each operation and returns a Deferred that fires only once the
operation's commit is on the disk: nothing is acknowledged before it is durable, and no
persistent object leaves the store (operations return plain dicts, lists and bytes).

With a FileStorage (the default), operations run in the reactor's thread: those that came
in one turn of the reactor are committed together at its end (a commit not yet fsynced
costs 0.1-0.3 ms; under load a turn brings many requests), and a `Syncer` thread fsyncs
the file and then fires the Deferreds of every commit made before that fsync, in order
(group commit: one fsync for many commits); a commit made while none waits for the syncer
is fsynced and fired at once, in the reactor's thread.  Measured against a writer
thread of its own, same-process A/B: the hand-offs of operations, leases and the
interpreter between two busy threads cost more than that thread saved (the latency loop
1.79 -> 1.56 ms, throughput 3,831 -> 4,049 jobs/s, 1,000 worker slots 4,443 -> 4,750
jobs/s, heartbeats p99 305 -> 195 ms).  Other storages (ZEO, RelStorage) commit over the
network: there a dedicated writer thread owns the connection, drains a queue of operations
and commits each batch once.  Either way a failing operation runs again alone under a
savepoint, so that it does not spoil its neighbours; large payloads are written to their
files by a staging thread first.
"""
from __future__ import annotations

import contextlib
import queue
import threading
import time
from typing import Any, Callable

import transaction
from twisted.internet import defer, threads
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from dsage import errors
from dsage.job import FINAL, check_transition
from dsage.server import scheduler
from dsage.server.access import AccessOps
from dsage.server.functions import FunctionOps
from dsage.server.leases import MAX_OUTPUT, OUTPUT_MARKER, TOKEN_TTL, LeaseOps, _holds  # noqa: F401  (MAX_OUTPUT, OUTPUT_MARKER: tests)
from dsage.server.model import JobRecord, Root, large_fields, store_bytes
from dsage.server.staging import Staged, StagedValue, WarmBytes
from dsage.server.retention import RetentionOps
from dsage.server.syncer import Syncer, file_storage

MAX_BATCH = 500
ROOT_KEY = "dsage"
#: staged payloads and results kept in memory until first read (see `WarmBytes`); the
#: payload bench ran as fast with 32 MiB as with 128, and 30% slower with none.
WARM_BYTES = 32 << 20
#: longest the writer waits for the reactor to send leases before committing them.
ANNOUNCE_WAIT = 0.005
_STOP = object()


def _has_blobs(storage) -> bool:
    """Whether `storage` keeps blobs (a ZEO client does only when given a blob_dir)."""
    try:
        return isinstance(storage.temporaryDirectory(), str)
    except Exception:
        return False


class JobStore(AccessOps, FunctionOps, RetentionOps, LeaseOps):
    """Jobs, identities and functions in ZODB, behind one writer thread."""

    log = Logger()

    def __init__(self, db, *, reactor=None, now: Callable[[], float] = time.time,
                 ticks: Callable[[], float] = time.monotonic, threaded: bool = True) -> None:
        self.db = db
        #: wall time, what jobs are stamped with; leases are on `ticks`, the monotonic clock
        #: (a step of the machine's clock must not end them all at once: `dsage.clock`).
        self.now = now
        self.ticks = ticks
        self.reactor = reactor
        self.threaded = threaded
        self._stager = ThreadPool(minthreads=0, maxthreads=1, name="dsage-staging")
        self.warm = WarmBytes(WARM_BYTES)
        #: the earliest time a backed-off job becomes runnable, as the last claim saw it.
        self._retry_due: float | None = None
        #: job id -> (lease token, expiry) of leases renewed by heartbeats (`LeaseOps._renew`).
        self.renewed: dict[int, tuple[int, float]] = {}
        #: job id -> (lease token, `ticks` when leased, or when this server started).
        self.leased_at: dict[int, tuple[int, float]] = {}
        #: worker name -> MiB each of its jobs may use (None: it does not say), as its
        #: connections announced: it is leased no job that says it needs more.
        self.capacities: dict[str, int | None] = {}
        self.blobs = _has_blobs(db.storage)
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._tm = transaction.TransactionManager(explicit=True)
        self._conn = None
        self._syncer: Syncer | None = None
        self._packing = False
        self._waiting: list = []         # operations for the commit at the end of this turn (`_write`)
        self._in_hand = 0                # batches with the syncer's thread, not yet fired
        self._flushing = False
        if not threaded:
            self._open()

    # -- the writer thread -----------------------------------------------------------
    def _open(self) -> None:
        self._conn = self.db.open(self._tm)
        if file_storage(self.db.storage) is not None:
            # This is the only connection, in the only process that has the file open
            # (FileStorage locks it): no other transaction can change what one of ours
            # read.  BTrees still ask the connection to check the nodes they pass through
            # (`readCurrent`), which cost a read of each node's record header per commit
            # (5.7 per job): not asked.
            self._conn.readCurrent = _read_alone
        with self._tm:
            zroot = self._conn.root()
            if ROOT_KEY not in zroot:
                zroot[ROOT_KEY] = Root()
                self._tm.get().note("dsage: create root")
            elif zroot[ROOT_KEY].upgrade():
                self._tm.get().note("dsage: upgrade root")
        self._tm.begin()
        self.root: Root = self._conn.root()[ROOT_KEY]
        self._tm.abort()

    def start(self) -> None:
        """Start the syncer (a FileStorage) or the writer thread, and the staging thread."""
        if not self.threaded or self._thread is not None or self._syncer is not None:
            return
        self._stager.start()
        fs = file_storage(self.db.storage)
        if fs is not None:
            self._open()
            self._syncer = Syncer(fs, self._synced)
            self._syncer.start()
        else:
            self._thread = threading.Thread(target=self._loop, name="dsage-zodb", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """Finish queued operations and fsyncs, stop the threads and close the database."""
        if self.threaded:
            self._stager.stop()
        if self._thread is not None:
            self._queue.put(_STOP)
            self._thread.join()
            self._thread = None
        if self._syncer is not None:
            self._flush()
            self._syncer.stop()
            self._syncer = None
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        self.db.close()

    def _loop(self) -> None:
        self._open()
        try:
            while True:
                item = self._queue.get()
                if item is _STOP:
                    return
                batch = [item]
                stop = False
                while len(batch) < MAX_BATCH:
                    try:
                        nxt = self._queue.get_nowait()
                    except queue.Empty:
                        break
                    if nxt is _STOP:
                        stop = True
                        break
                    batch.append(nxt)
                self.reactor.callFromThread(_fire, self._execute(batch, self._announce))
                if stop:
                    return
        finally:
            self._conn.close()
            self._conn = None

    def _write(self, op: tuple) -> None:
        """Queue `op` for the commit at the end of this turn of the reactor (a FileStorage):
        the operations that came in one turn share a transaction (when the reactor is busy,
        with many connections, a turn brings many), and its Deferreds fire once the syncer's
        fsync covers that commit (all refused after a failed fsync, see `_synced`)."""
        self._waiting.append(op)
        if not self._flushing:
            self._flushing = True
            self.reactor.callLater(0, self._flush)

    def _flush(self) -> None:
        """Apply and commit the operations queued by `_write`; those their early hooks ask
        for (a lease for a slot that has gone is given back) go in the next turn."""
        self._flushing = False
        while self._waiting:
            batch, self._waiting = self._waiting[:MAX_BATCH], self._waiting[MAX_BATCH:]
            last = self.db.storage.lastTransaction()
            results = ([(d, False, None) for _, _, d, _ in batch] if self._syncer.failed
                       else self._execute(batch, _announce))
            wrote = self.db.storage.lastTransaction() != last
            if self._in_hand == 0 and self._syncer.quick:
                # Nothing earlier waits to be acknowledged: fsync here, and answer at once
                # (two thread wake-ups fewer; see the syncer's module).
                if wrote:
                    self._syncer.sync()
                _fire(self._checked(results))
            else:
                self._in_hand += 1
                self._syncer.put(results, wrote)
            if self._flushing:      # a hook asked for more: the reactor reads its sockets first
                return

    def _synced(self, results: list) -> None:
        """A batch's results, its commit on the disk (in the syncer's thread)."""
        self.reactor.callFromThread(self._hand_back, results)

    def _hand_back(self, results: list) -> None:
        """In the reactor: fire a batch the syncer's thread made durable."""
        self._in_hand -= 1
        _fire(self._checked(results))

    def _checked(self, results: list) -> list:
        """A batch's results once its commit was fsynced: all refused once an fsync failed
        (what it covered may be lost)."""
        if self._syncer.failed:
            e = self._syncer.failed
            failure = Failure(errors.RemoteError(
                f"the server's disk failed to make this request durable: {e.strerror or e} (it refuses "
                f"every request until restarted; tell the server's administrator)"))
            results = [(d, False, failure) for d, _, _ in results]
        return results

    def _announce(self, early: list) -> None:
        """Hand what may go out before the commit (leases: see `_run`) to the reactor, and
        let it go: waiting here gives the reactor the interpreter at once, where the
        commit's pickling would keep it for a switch interval (5 ms)."""
        sent = threading.Event()
        self.reactor.callFromThread(_announce, early, sent.set)
        sent.wait(ANNOUNCE_WAIT)

    def _execute(self, batch: list, announce: Callable[[list], None] | None = None) -> list:
        """Run a batch of operations in one transaction; returns (deferred, ok, value).
        Before the commit, `announce` gets the (early hook, value) pairs to call."""
        try:
            out = self._apply(batch, guarded=False)
            if out is None:
                # An operation failed, perhaps half-way: start again with a savepoint around
                # each one, so that it alone is undone and its neighbours still commit.
                out = self._apply(batch, guarded=True)
        except Exception as e:
            # The storage itself failed (a savepoint's temporary file on a full disk): the
            # whole batch is refused, and the writer goes on with the next.
            failure = Failure()
            self.log.failure("applying a batch failed; {n} operations refused", failure, n=len(batch))
            with contextlib.suppress(Exception):
                self._tm.abort()
            if isinstance(e, OSError):
                failure = Failure(_storage_error(e))
            return [(d, False, _database_failure(failure)) for _, _, d, _ in batch]
        early = [(hook, value) for (_, _, _, hook), (_, ok, value) in zip(batch, out) if ok and hook is not None]
        if early and announce is not None:
            announce(early)
        try:
            self._tm.commit()
        except Exception as e:
            failure = Failure()
            self.log.failure("commit failed; {n} operations refused", failure, n=len(batch))
            self._tm.abort()
            if isinstance(e, OSError):
                failure = Failure(_storage_error(e))
                self._release_temp_space()
            out = [(d, False, _database_failure(failure)) for d, _, _ in out]
        return out

    def _apply(self, batch: list, guarded: bool) -> list | None:
        """Apply the operations in a new transaction; unguarded, None as soon as one fails
        (the transaction aborted), since savepoints cost a temporary file each."""
        out = []
        self._tm.begin()
        for fn, args, d, _ in batch:
            savepoint = self._tm.savepoint() if guarded else None
            try:
                out.append((d, True, fn(self.root, *args)))
            except Exception:
                if savepoint is None and len(batch) > 1:
                    self._tm.abort()
                    return None
                if savepoint is not None:
                    savepoint.rollback()
                else:
                    self._tm.abort()
                    self._tm.begin()
                out.append((d, False, _database_failure(Failure())))
        return out

    def _release_temp_space(self) -> None:
        """After a full disk, shrink FileStorage's transaction buffer (``.fs.tmp`` keeps the
        size of the largest transaction, which left no room for small ones after a large)."""
        tfile = getattr(self.db.storage, "_tfile", None)
        with contextlib.suppress(OSError, AttributeError):
            tfile.seek(0)
            tfile.truncate()

    def _run(self, fn: Callable[..., Any], *args: Any, early: Callable[[Any], None] | None = None) -> defer.Deferred:
        """Apply `fn(root, *args)` (at once, or in the writer thread: see the module); the
        Deferred fires with its value once committed and on the disk.  `early`, if given, is
        called in the reactor with the value as soon as it is computed, before the commit:
        only for what may be acted on before it is durable (jobs leased: a lease that does not survive a crash is refused by its
        token when reported, and the job, never acknowledged, is submitted again)."""
        d = defer.Deferred()
        if self._syncer is not None:
            self._write((fn, args, d, early))
        elif self.threaded:
            self._queue.put((fn, args, d, early))
        else:       # unit tests: the hooks run once the transaction is over (they call in again)
            announced: list = []
            results = self._execute([(fn, args, d, early)], announced.extend)
            _announce(announced)
            _fire(results)
        return d

    def _run_staged(self, fields: list[tuple[dict, str]], fn: Callable[..., Any], *args: Any,
                    early: Callable[[Any], None] | None = None) -> defer.Deferred:
        """`_run`, after writing the large values among `fields` (dict, key) together to one
        durable file, in a thread of its own, so that the store's thread only links it into
        a blob."""
        if not fields or not self.blobs:
            return self._run(fn, *args, early=early)
        folder = self.db.storage.temporaryDirectory()

        def stage() -> Staged:
            datas = [holder[key] for holder, key in fields]
            try:
                staged = Staged(datas, folder)
            except OSError as e:               # a full disk: nothing half-written is left
                raise _storage_error(e) from None
            for (holder, key), value in zip(fields, staged.values(datas)):
                holder[key] = value
            return staged

        def run(staged: Staged) -> defer.Deferred:
            return self._run(fn, *args, early=early).addBoth(lambda result: (staged.discard(), result)[1])
        if not self.threaded:
            return run(stage())
        # One staging thread: requests reach the store in the order they came, and the disk
        # gets one writer (concurrent writes with fsyncs cost ext4 four times the CPU here).
        return threads.deferToThreadPool(self.reactor, self._stager, stage).addCallback(run)

    def _keep(self, data: bytes | StagedValue) -> Any:
        """`data` as the store keeps it: a slice of its request's blob when it was staged
        (its bytes kept warm), else what `store_bytes` makes of it."""
        if isinstance(data, StagedValue):
            stored = data.stored(self._tm.get())
            self.warm.put(stored, data.data)
            return stored
        return store_bytes(data, self.blobs)

    # -- jobs: clients ---------------------------------------------------------------
    def submit(self, owner: str, specs: list[dict], function_id: str | None = None,
               token: str | None = None, limit: int | None = None) -> defer.Deferred:
        """Store new jobs; fires with their ids once committed.  A `token` seen before (a
        retry after a lost reply) returns the ids of that first submission instead.  With
        `limit`, a submission that would leave more of the owner's jobs queued is refused."""
        clean = [scheduler.validate_spec(s) for s in specs]
        return self._run_staged(large_fields(clean), self._submit, owner, clean, function_id, token, limit)

    def submit_and_claim(self, owner: str, specs: list[dict], function_id: str | None, token: str | None,
                         limit: int | None, claim_for: list[tuple[str, int]], lease: float,
                         early: Callable[[dict], None] | None = None) -> defer.Deferred:
        """Store new jobs and, in the same transaction, lease pending jobs to the worker slots
        that wait for work; fires with {"ids": [...], "claims": [[job, ...] per slot],
        "queued": whether jobs are left in the queue}, also given to `early` before the
        commit (see `_run`)."""
        clean = [scheduler.validate_spec(s) for s in specs]

        def op(root: Root) -> dict:
            fresh: list[JobRecord] = []
            ids = self._submit(root, owner, clean, function_id, token, limit, fresh)
            claims = self._claim(root, claim_for, lease, fresh) if claim_for else []
            for job in fresh:
                self._enter(root, job, "new", fresh=True, keep_place=True)
            return {"ids": ids, "claims": claims, "queued": root.has_pending()}
        return self._run_staged(large_fields(clean), op, early=early)

    def _submit(self, root: Root, owner: str, specs: list[dict], function_id: str | None,
                token: str | None = None, limit: int | None = None,
                fresh: list[JobRecord] | None = None) -> list[int]:
        """Store new jobs; queued at once, or, given `fresh`, numbered in the queue's order
        and left in that list for the caller to lease or queue (a job leased in the
        transaction that made it then writes neither the queue nor the new-jobs index)."""
        now = self.now()
        queued = root.queued.get(owner, 0)
        if limit is not None and queued + len(specs) > limit:
            raise errors.RemoteError(f"queue limit reached: {queued} of your jobs are waiting, "
                                     f"{len(specs)} more would pass the limit of {limit} (max_queued_per_user)")
        seen = root.submission(owner, token) if token is not None else None
        if seen is not None:
            return list(seen)
        ids = []
        for spec in specs:
            job_id = root.next_job_id
            root.next_job_id = job_id + 1
            files = self._keep(spec["files"]) if spec["files"] else None
            job = JobRecord(job_id, owner, spec, self._keep(spec["payload"]), files, now)
            job.function_id = function_id
            root.jobs[job_id] = job
            root.index_add("owner", owner, job_id)
            if fresh is None:
                self._enter(root, job, "new", fresh=True)
            else:
                job.seq = root.place(owner)
                fresh.append(job)
            ids.append(job_id)
        if token is not None:
            root.remember(owner, token, now, tuple(ids), TOKEN_TTL)
        return ids

    def get(self, requester: str, role: str, job_id: int, with_result: bool = True) -> defer.Deferred:
        """One job's full record (its result bytes too) for its owner or an admin."""
        return self._run(lambda root: self._own(root, requester, role, job_id).summary(with_result))

    def list(self, requester: str, role: str, status: str | None = None, everyone: bool = False,
             limit: int = 1000) -> defer.Deferred:
        """Summaries (without results) of the requester's jobs, newest first."""
        return self._run(self._list, requester, role, status, everyone, limit)

    def _list(self, root: Root, requester: str, role: str, status: str | None, everyone: bool,
              limit: int) -> list[dict]:
        if everyone and role != "admin":
            raise errors.AuthError("only an admin may list every user's jobs")
        ids = root.status_ids(status) if status else None
        if status and not ids:
            return []
        mine = None if everyone else root.ids("owner", requester)
        if mine is not None and not mine:
            return []
        source = ids if ids is not None else (mine if mine is not None else root.jobs.keys())
        out = []
        for job_id in reversed(list(source)):
            if mine is not None and ids is not None and job_id not in mine:
                continue
            out.append(root.jobs[job_id].summary(False))
            if len(out) >= limit:
                break
        return out

    def kill(self, requester: str, role: str, job_id: int, queued_only: bool = False,
             unstarted: list | None = None) -> defer.Deferred:
        """Kill a job (with `queued_only`, only one that has not started); fires with its
        summary plus the worker to stop, if it was running.  A `queued_only` kill of a job
        leased to a worker kills nothing and says whose lease it is ("held": [job id,
        attempt, token, worker]); once that worker has given it up unstarted, the kill with
        `unstarted` (that list) kills it if the lease is still the same."""
        return self._run(self._kill, requester, role, job_id, queued_only, unstarted)

    def _kill(self, root: Root, requester: str, role: str, job_id: int, queued_only: bool = False,
              unstarted: list | None = None) -> dict:
        job = self._own(root, requester, role, job_id)
        running = None
        if unstarted is not None and _holds(job, unstarted[3], unstarted[1], unstarted[2]):
            self._close_attempt(job, "undelivered")     # never ran: its worker gave it up
            job.started = None
        elif job.status in FINAL or (queued_only and job.status != "new"):
            out = {"job": job.summary(False), "worker": None}
            if queued_only and job.status == "processing" and unstarted is None:
                out["held"] = [job.job_id, job.attempt, job.lease, job.lease_worker]
            return out
        elif job.status == "processing":
            running = {"worker": job.lease_worker, "job_id": job_id, "attempt": job.attempt}
            self._close_attempt(job, "killed")
        job.error = f"killed by {requester}"
        self._enter(root, job, "killed")
        job.finished = self.now()
        return {"job": job.summary(False), "worker": running}

    def rerun(self, requester: str, role: str, job_id: int) -> defer.Deferred:
        """Queue a finished job again from the start."""
        return self._run(self._rerun, requester, role, job_id)

    def _rerun(self, root: Root, requester: str, role: str, job_id: int) -> dict:
        job = self._own(root, requester, role, job_id)
        if job.status not in FINAL:
            raise errors.RemoteError(f"job {job_id} is still {job.status}; kill it first")
        job.failures, job.error, job.result, job.output = 0, None, None, ""
        job.cpu_time = job.wall_time = job.peak_memory = job.started = job.finished = None
        job.not_before = 0.0
        self._enter(root, job, "new")
        return job.summary(False)

    def status(self) -> defer.Deferred:
        """Counts of jobs by status."""
        return self._run(lambda root: {s: int(n) for s, n in root.counts.items()})

    # -- helpers (store thread only) ---------------------------------------------------
    def _own(self, root: Root, requester: str, role: str, job_id: int) -> JobRecord:
        job = root.jobs.get(int(job_id))
        if job is None:
            raise errors.RemoteError(f"no job {job_id}")
        if job.owner != requester and role != "admin":
            raise errors.AuthError(f"job {job_id} belongs to another user")
        return job

    def _fail(self, root: Root, job: JobRecord, error: str, outcome: str) -> None:
        self._close_attempt(job, outcome, error)
        job.failures += 1
        job.error = error
        if job.failures >= job.max_failures:
            self._enter(root, job, "failed")
            job.finished = self.now()
        else:
            job.not_before = self.now() + scheduler.retry_delay(job.failures)
            self._enter(root, job, "new")

    def _close_attempt(self, job: JobRecord, outcome: str, error: str | None = None) -> None:
        if job.attempts:
            last = dict(job.attempts[-1])
            last.update(end=self.now(), outcome=outcome)
            if error:
                last["error"] = error.strip().splitlines()[-1][:500] if error.strip() else ""
            job.attempts = (*job.attempts[:-1], last)
        job.lease_worker = None

    def _enter(self, root: Root, job: JobRecord, status: str, unqueue: bool = True,
               fresh: bool = False, keep_place: bool = False) -> None:
        """Move a job to `status`, keeping the indexes, counts and the pending queue right
        (back to new: at its owner's next turn in its priority's queue, or where it was with
        `keep_place`)."""
        if not fresh:
            old = job.status
            check_transition(old, status)
            root.status_remove(old, job.job_id)
            root.count(old, -1)
            if old == "new":
                root.count_queued(job.owner, -1)
                if unqueue:
                    root.queue_of(job).pop(scheduler.pending_key(job.priority, job.seq), None)
                    if root.delayed:
                        root.delayed.pop((job.not_before, job.job_id), None)
        if status == "new":
            root.count_queued(job.owner, 1)
        job.status = status
        root.status_add(status, job.job_id)
        root.count(status, 1)
        if status == "new":
            if not keep_place:
                job.seq = root.place(job.owner)
            if scheduler.backing_off(job.not_before, self.now()):
                self._delay(root, job)
            else:
                root.queue_of(job)[scheduler.pending_key(job.priority, job.seq)] = job.job_id


def _read_alone(obj: Any) -> None:
    """`Connection.readCurrent` of a connection that no other one can write beside."""


def _storage_error(e: OSError) -> errors.RemoteError:
    """What the requester is told when the server's disk refused a write."""
    return errors.RemoteError(f"the server could not store this request: {e.strerror or e} "
                              f"(nothing of it was stored; tell the server's administrator)")


#: where the exceptions of a database that cannot be reached come from (ZEO, RelStorage).
_DATABASE_MODULES = ("ZEO.", "ZODB.", "relstorage.", "psycopg2", "pg8000")


def _database_failure(failure: Failure) -> Failure:
    """What the requester is told when the database itself failed (a ZEO or PostgreSQL
    server that went away): said so, instead of the storage's bare exception."""
    e = failure.value
    if not type(e).__module__.startswith(_DATABASE_MODULES):
        return failure
    why = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
    return Failure(errors.RemoteError(f"the server's database failed this request ({why}); nothing of it "
                                      f"was stored: try again, or tell the server's administrator"))


def _announce(early: list, then: Callable[[], None] | None = None) -> None:
    """In the reactor: call each early hook with its value, then `then`."""
    for hook, value in early:
        try:
            hook(value)
        except Exception:
            JobStore.log.failure("acting on leases before their commit failed")
    if then is not None:
        then()


def _fire(results: list) -> None:
    for d, ok, value in results:
        if ok:
            d.callback(value)
        else:
            d.errback(value)
