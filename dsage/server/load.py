"""The server's own load: the share of the last minute its reactor thread spent working, as
HTCondor's `RecentDaemonCoreDutyCycle` (near 1, the server falls behind whatever the
workers do).  Shown by `dsage status`, `D.status()` and `/metrics`."""
from __future__ import annotations

import collections
import time
from typing import Callable

#: seconds of history the share is over, and between samples.
WINDOW = 60.0
SAMPLE_SECONDS = 5.0


class ReactorLoad:
    """Samples the reactor thread's CPU time against the clock (call it in that thread)."""

    def __init__(self, clock, cpu: Callable[[], float] = time.thread_time, window: float = WINDOW) -> None:
        self.clock = clock
        self.cpu = cpu
        self.window = window
        self.samples: collections.deque[tuple[float, float]] = collections.deque()

    def sample(self) -> None:
        """Note the time and the thread's CPU seconds; forget what is older than the window."""
        now = self.clock.seconds()
        self.samples.append((now, self.cpu()))
        while len(self.samples) > 2 and self.samples[1][0] <= now - self.window:
            self.samples.popleft()

    def busy(self) -> float | None:
        """CPU seconds per second of the reactor thread from the window's first sample up to
        now (None before a first sample, or in its moment); keeps no sample of its own."""
        if not self.samples:
            return None
        (t0, c0), now = self.samples[0], self.clock.seconds()
        if now <= t0:
            return None
        return min(1.0, max(0.0, (self.cpu() - c0) / (now - t0)))
