"""The daemons' reactors keep time on the monotonic clock."""
from __future__ import annotations

import time

from twisted.internet.task import Clock

from dsage.clock import steady


def test_steady_moves_the_timers_to_the_monotonic_clock_and_keeps_what_was_due():
    """After `steady`, the reactor's time is the monotonic clock's; a call scheduled before
    still comes when it was due, and new ones are scheduled on the new clock."""
    reactor = Clock()
    reactor.advance(1_800_000_000.0)          # wall time, as Twisted keeps it
    reactor.callLater(5.0, lambda: None)
    steady(reactor)
    assert abs(reactor.seconds() - time.monotonic()) < 1
    [earlier] = reactor.getDelayedCalls()
    assert 4 < earlier.getTime() - time.monotonic() <= 5
    later = reactor.callLater(1.0, lambda: None)
    assert 0 < later.getTime() - time.monotonic() <= 1
    earlier.delay(10.0)                        # its own clock moved too
    assert 14 < earlier.getTime() - time.monotonic() <= 15
