"""Reconnector: keeps one connection to the server up, for clients and workers.

Connect, run `prepare` (the hello) on the new protocol, hand it out; when the link goes (or
connecting or hello fails) try again after a jittered exponential back-off.  (Twisted's
ClientService does the same, but has no transition for a disconnect that arrives while its
prepareConnection runs, which is exactly what a refused TLS handshake does.)"""
from __future__ import annotations

import random
from typing import Callable

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from dsage import errors


class Reconnector:
    """One connection, re-made on loss; `when_connected()` waits for it."""

    log = Logger()

    def __init__(self, endpoint, factory, prepare: Callable[[object], defer.Deferred], clock, *,
                 initial: float = 0.2, max_delay: float = 5.0, factor: float = 1.5, address: str = "") -> None:
        self.endpoint = endpoint
        self.factory = factory
        factory.noisy = False       # its "Starting factory" lines, at every attempt, said nothing
        self.address = address
        self.prepare = prepare
        self.clock = clock
        self.initial, self.max_delay, self.factor = initial, max_delay, factor
        self.protocol = None
        self.failures = 0
        self.running = False
        self._waiters: list[list] = []
        self._retry = None
        self._connecting: defer.Deferred | None = None

    def start(self) -> None:
        """Begin connecting (and keep the connection up until `stop`)."""
        if not self.running:
            self.running = True
            self._attempt()

    def stop(self) -> defer.Deferred:
        """Stop reconnecting and close the connection; fires once it is closed."""
        self.running = False
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        if self._connecting is not None:
            self._connecting.cancel()
        self._fail_waiters(Failure(errors.ConnectionLost("the connection was closed")), everyone=True)
        proto, self.protocol = self.protocol, None
        if proto is not None and not proto.closed:
            proto.transport.loseConnection()
            return proto.when_closed
        return defer.succeed(None)

    def when_connected(self, fail_after: int | None = None) -> defer.Deferred:
        """Fires with the ready protocol; fails after `fail_after` more failed attempts."""
        if self.protocol is not None:
            return defer.succeed(self.protocol)
        if not self.running:
            return defer.fail(errors.ConnectionLost("not connected (stopped)"))
        entry: list = [None, fail_after]
        entry[0] = defer.Deferred(lambda d: self._waiters.remove(entry) if entry in self._waiters else None)
        self._waiters.append(entry)
        return entry[0]

    def _attempt(self) -> None:
        self._retry = None
        if not self.running:
            return
        self._connecting = self.endpoint.connect(self.factory)
        self._connecting.addCallbacks(self._connected, self._failed)

    def _connected(self, proto) -> defer.Deferred:
        self._connecting = None

        def ready(_) -> None:
            if proto.closed or not self.running:
                if not self.running and not proto.closed:
                    proto.transport.loseConnection()
                return self._failed(Failure(errors.ConnectionLost("closed while saying hello")))
            self.protocol = proto
            self.failures = 0
            proto.when_closed.addCallback(self._lost, proto)
            waiters, self._waiters = self._waiters, []
            for d, _ in waiters:
                d.callback(proto)

        def refused(f: Failure) -> None:
            if not proto.closed:
                proto.transport.abortConnection()
            self._failed(f)
        return defer.maybeDeferred(self.prepare, proto).addCallbacks(ready, refused)

    def _lost(self, _, proto) -> None:
        if self.protocol is proto:
            self.protocol = None
        if self.running:
            self._schedule()

    def _failed(self, failure: Failure) -> None:
        self._connecting = None
        if failure.check(defer.CancelledError) and not self.running:
            return
        self.failures += 1
        if self.running and self.address and self.failures & (self.failures - 1) == 0 and \
                not failure.check(errors.AuthError, errors.ProtocolError):      # those: the caller's to say
            # Attempts 1, 2, 4, 8, ...: a server down for an hour costs a dozen lines.
            self.log.warn("cannot reach the dsage server at {address}: {why} (attempt {n}; trying again)",
                          address=self.address, why=failure.getErrorMessage(), n=self.failures)
        self._fail_waiters(failure)
        if self.running:
            self._schedule()

    def _fail_waiters(self, failure: Failure, everyone: bool = False) -> None:
        keep, failing = [], []
        for entry in self._waiters:
            left = entry[1]
            if everyone or (left is not None and left <= 1):
                failing.append(entry[0])
            else:
                entry[1] = None if left is None else left - 1
                keep.append(entry)
        self._waiters = keep          # before firing: an errback may call back into us
        for d in failing:
            d.errback(failure)

    def _schedule(self) -> None:
        if self._retry is not None and self._retry.active():
            return
        delay = min(self.max_delay, self.initial * self.factor ** max(0, self.failures - 1))
        self._retry = self.clock.callLater(delay * random.uniform(0.8, 1.2), self._attempt)
