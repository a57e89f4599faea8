"""Keeping the database bounded under steady load: finished jobs expire after `keep_days`,
and the storage is packed when it has grown `pack_growth` times since the last pack (or
since the server started).  Keeping a start after a crash short: a FileStorage's index is
saved every `index_interval` seconds when the file has grown."""
from __future__ import annotations

from twisted.application import service
from twisted.internet import defer, task
from twisted.logger import Logger

from dsage.server.retention import EXPIRE_BATCH
from dsage.server.store import JobStore

MIB = 1 << 20


class Maintenance(service.Service):
    """Runs `run_once` every `interval` seconds (and once at start)."""

    log = Logger()

    def __init__(self, store: JobStore, clock, *, keep_days: float, pack_growth: float,
                 pack_min_mb: float, interval: float, index_interval: float = 30.0) -> None:
        self.store = store
        self.clock = clock
        self.keep_days = keep_days
        self.pack_growth = pack_growth
        self.pack_min = pack_min_mb * MIB
        self.interval = interval
        self.index_interval = index_interval
        self.packed_size: int | None = None
        self.indexed_size: int | None = None
        self._loop: task.LoopingCall | None = None
        self._index_loop: task.LoopingCall | None = None
        self._running: defer.Deferred | None = None

    def startService(self) -> None:
        super().startService()
        self._loop = task.LoopingCall(self._tick)
        self._loop.clock = self.clock
        self._loop.start(self.interval, now=True)
        if self.index_interval > 0:
            self._index_loop = task.LoopingCall(self.save_index)
            self._index_loop.clock = self.clock
            self._index_loop.start(self.index_interval, now=False)

    def stopService(self) -> defer.Deferred | None:
        super().stopService()
        for loop in (self._loop, self._index_loop):
            if loop is not None and loop.running:
                loop.stop()
        return self._running

    def save_index(self) -> bool:
        """Save the storage's index if the file changed since the last save (at the first tick,
        always: the index file may be from long before a crash).  A million jobs' index is
        saved in ~20 ms."""
        size = self.store.size()
        if size == self.indexed_size:
            return False
        try:
            saved = self.store.save_index()
        except OSError as e:
            self.log.warning("could not save the database index: {error}", error=e)
            return False
        if saved:
            self.indexed_size = size
        return saved

    def _tick(self) -> None:
        if self._running is None:
            self._running = defer.Deferred.fromCoroutine(self.run_once())
            self._running.addErrback(lambda f: self.log.failure("database maintenance failed", f))
            self._running.addBoth(self._ran)

    def _ran(self, _: object) -> None:
        self._running = None

    async def run_once(self) -> dict:
        """Expire old finished jobs, then pack if the storage has grown enough."""
        expired = 0
        if self.keep_days > 0:
            while self.running:
                n = await self.store.expire_finished(self.keep_days)
                expired += n
                if n < EXPIRE_BATCH:
                    break
            if expired:
                self.log.info("{n} jobs finished more than {days:g} days ago were deleted",
                              n=expired, days=self.keep_days)
        size = self.store.size()
        if self.packed_size is None:
            self.packed_size = size          # the size at start counts as packed: no pack at once
        packed = None
        if self.pack_growth > 0 and size >= max(self.pack_min, self.pack_growth * self.packed_size) and self.running:
            self.log.info("packing the database ({mb:.0f} MiB)", mb=size / MIB)
            packed = await self.store.pack(0.0)
            self.packed_size = self.indexed_size = packed["after"]     # a pack saves the index
            self.log.info("packed the database: {before:.0f} MiB -> {after:.0f} MiB",
                          before=packed["before"] / MIB, after=packed["after"] / MIB)
        return {"expired": expired, "packed": packed}
