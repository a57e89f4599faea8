"""Retention: finished jobs expire, the storage is packed.

A mixin of `JobStore` (the one class that writes to ZODB): the expiry runs through the
store's writer thread with `self._run`; packing runs in a thread of its own."""
from __future__ import annotations

import os
import threading

from twisted.internet import defer
from twisted.python.failure import Failure

from dsage import errors
from dsage.job import FINAL
from dsage.server.model import JobRecord, Root
from dsage.server.syncer import file_storage

#: finished jobs deleted per transaction by `expire_finished`.
EXPIRE_BATCH = 5000


class RetentionOps:
    """Expiry of finished jobs and packing of the storage (mixed into JobStore)."""

    def expire_finished(self, days: float, limit: int = EXPIRE_BATCH) -> defer.Deferred:
        """Delete up to `limit` jobs that finished more than `days` ago (their storage is freed
        by the next pack); fires with how many went.  Jobs of an unfinished DistributedFunction
        whose results it has not processed yet are kept, as are finished functions' records
        until they too are `days` old."""
        return self._run(self._expire_finished, self.now() - days * 86400.0, limit)

    def _expire_finished(self, root: Root, cutoff: float, limit: int) -> int:
        gone = 0
        for status in FINAL:
            ids = root.status_ids(status)
            if not ids:
                continue
            doomed = []
            for job_id in ids:               # ascending ids: ascending creation times
                job = root.jobs[job_id]
                if job.created >= cutoff or gone + len(doomed) >= limit:
                    break
                if job.finished is not None and job.finished < cutoff and self._expendable(root, job):
                    doomed.append(job)
            for job in doomed:
                root.status_remove(status, job.job_id)
                root.count(status, -1)
                if job.job_id in root.ids("owner", job.owner):
                    root.index_remove("owner", job.owner, job.job_id)
                    if not root.by_owner.get(job.owner, True):
                        del root.by_owner[job.owner]
                del root.jobs[job.job_id]
            gone += len(doomed)
        for key in [k for k, fn in root.functions.items() if fn.done and fn.updated < cutoff][:limit]:
            fn = root.functions.pop(key)
            for job_id in fn.jobs:
                job = root.jobs.get(job_id)
                if job is not None and job.status in FINAL:
                    job.function_id = None
        return gone

    @staticmethod
    def _expendable(root: Root, job: JobRecord) -> bool:
        if job.function_id is None:
            return True
        fn = root.functions.get((job.owner, job.function_id))
        return fn is None or fn.done or job.job_id in fn.processed

    def pack(self, days: float = 0.0) -> defer.Deferred:
        """Drop object history older than `days` from the storage; fires with sizes in bytes.

        Packing runs in a thread of its own, beside the writer (FileStorage allows it); one
        pack at a time (a second is refused while one runs)."""
        if self._packing:
            return defer.fail(errors.RemoteError("a pack is already running"))

        def work() -> dict:
            before = self.db.getSize()
            try:
                self.db.pack(days=days)
            except ValueError as e:
                if "Already packed" not in str(e):
                    raise
                # A later pack already dropped this history: nothing more to do.
            return {"before": before, "after": self.db.getSize()}
        if not self.threaded:
            return defer.maybeDeferred(work)
        d: defer.Deferred = defer.Deferred()
        self._packing = True

        def run() -> None:
            try:
                result = work()
            except Exception:
                self.reactor.callFromThread(d.errback, Failure())
            else:
                self.reactor.callFromThread(d.callback, result)

        def done(result):
            self._packing = False
            return result
        threading.Thread(target=run, name="dsage-pack", daemon=True).start()
        return d.addBoth(done)

    def size(self) -> int:
        """The storage's size in bytes."""
        return self.db.getSize()

    def save_index(self) -> bool:
        """Write a FileStorage's index file now; False for other storages and during a pack.

        FileStorage writes it only when it closes or packs, and a start after a crash reads
        every record written since (the whole file, after months without a clean stop)."""
        fs = file_storage(self.db.storage)
        if fs is None or self._packing:
            return False
        with fs._lock:                       # commits run in the reactor: none is under way
            try:
                fs._save_index()
            except OSError:
                # A full disk: the index file of before stays, as does the database.
                try:
                    os.unlink(fs.__name__ + ".index.index_tmp")
                except OSError:
                    pass
                raise
        return True
