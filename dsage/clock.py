"""The clock the reactors dsage runs keep their timers on (the server's, a worker's, and
the blocking client's thread): the monotonic one.

Twisted schedules `callLater` and `LoopingCall` on `time.time` (twisted/twisted#2424), so a
step of the machine's clock (the first NTP sync after a boot, a resumed VM, `date -s`) would
fire every timer at once, or hold them all back for as long as the step: a server's leases
would lapse together and their jobs run again, a worker's heartbeats would stop.  Wall time
stays what jobs are stamped with (`time.time`)."""
from __future__ import annotations

import heapq
import time


def steady(reactor) -> None:
    """Have `reactor` keep time with `time.monotonic`, moving the calls already scheduled
    so that each still comes when it was due (the workaround twisted#2424 suggests)."""
    shift = time.monotonic() - reactor.seconds()
    for call in reactor.getDelayedCalls():
        call.time += shift
        call.seconds = time.monotonic
    reactor.seconds = time.monotonic
    pending = getattr(reactor, "_pendingTimedCalls", None)
    if pending:
        heapq.heapify(pending)      # cancelled calls kept their times
