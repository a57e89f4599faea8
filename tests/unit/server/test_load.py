"""The server's own load, on a Clock and a made-up CPU counter."""
from __future__ import annotations

from twisted.internet.task import Clock

from dsage.server.load import WINDOW, ReactorLoad


def test_the_load_is_the_reactor_thread_s_cpu_share_over_the_last_minute():
    """None before a first sample; then CPU seconds per second since the oldest sample of
    the window (a busy spell long ago no longer counts); never above 1; reading it adds no
    sample (a client asking often does not fill the window)."""
    clock, cpu = Clock(), [0.0]
    load = ReactorLoad(clock, cpu=lambda: cpu[0])
    assert load.busy() is None
    load.sample()
    assert load.busy() is None
    clock.advance(10)
    cpu[0] += 5.0
    assert load.busy() == 0.5
    for _ in range(int(WINDOW / 5) + 2):       # a quiet minute, sampled every 5 s
        clock.advance(5)
        load.sample()
    assert load.busy() == 0.0
    clock.advance(1)
    cpu[0] += 100.0                             # more than the window: shown as 1
    assert load.busy() == 1.0
    for _ in range(1000):
        load.busy()
    assert len(load.samples) <= WINDOW / 5 + 2
