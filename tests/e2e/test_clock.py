"""A step of the machine's clock (the first NTP sync after a boot, a resumed VM, `date -s`)
while jobs run: no lease ends early, none is kept past its time, heartbeats go on.  The
server or the worker runs under libfaketime, whose offset the test moves."""
from __future__ import annotations

import glob
import os
import signal
import time

import pytest

from dsage.client.local import LocalCluster
from tests.e2e.conftest import wait_for

LIBFAKETIME = sorted(glob.glob("/usr/lib/*/faketime/libfaketimeMT.so.1"))

pytestmark = pytest.mark.skipif(not LIBFAKETIME, reason="libfaketime could not be installed here (make system)")


class SteppedClock:
    """The environment that puts a process on a wall clock this test can step."""

    def __init__(self, folder) -> None:
        self.file = folder / "clock-offset"
        self.file.write_text("+0\n")
        self.env = {"LD_PRELOAD": LIBFAKETIME[-1], "FAKETIME_TIMESTAMP_FILE": str(self.file),
                    "FAKETIME_CACHE_DURATION": "1", "DONT_FAKE_MONOTONIC": "1"}

    def step(self, offset: str) -> None:
        """Move the wall clock to `offset` from the real one (e.g. "+2h"); seen within 1 s."""
        self.file.write_text(offset + "\n")
        time.sleep(1.5)


def cluster_with(tmp_path, stepped: str) -> tuple[LocalCluster, SteppedClock]:
    """A cluster with 4 s leases (heartbeats every second) whose server or worker (`stepped`)
    runs on a clock the test steps."""
    cluster = LocalCluster(tmp_path / "home", lease_seconds=4)
    cluster.init()
    clock = SteppedClock(tmp_path)
    base = dict(cluster.env)
    if stepped == "server":
        cluster.env.update(clock.env)
    cluster.start_server()
    cluster.env = base
    cluster.add_worker(slots=1, env=clock.env if stepped == "worker" else None)
    return cluster, clock


def completes_through_a_step(D, clock, offset: str, seconds: float):
    """A job of `seconds` during which the clock steps by `offset`: it completes in its first
    attempt, with no failure counted; its handle."""
    job = D.eval(f"import time\ntime.sleep({seconds})\n'done'")
    wait_for(lambda: job.status == "processing", what="the job to start")
    clock.step(offset)
    assert job.wait(timeout=60) == "done"
    assert (job.failures, [a["outcome"] for a in job.attempts]) == (0, ["completed"])
    return job


def test_a_step_of_the_server_s_clock_ends_no_lease_and_keeps_none(tmp_path):
    """Two hours forward while a job runs: it completes in its first attempt (before, every
    lease ended at once and the job ran again).  Then four hours back, and its worker
    killed: its job runs again elsewhere once the lease lapses (not four hours later)."""
    cluster, clock = cluster_with(tmp_path, "server")
    try:
        D = cluster.connect()
        cluster.wait_for_workers(D)
        job = completes_through_a_step(D, clock, "+2h", 6)
        assert job.finished - job.started > 7000, "jobs are stamped with the (stepped) wall time"

        clock.step("-2h")
        lost = D.eval("import time\ntime.sleep(600)", max_failures=3)
        wait_for(lambda: lost.status == "processing", what="the second job to start")
        os.killpg(cluster.workers[0].pid, signal.SIGKILL)
        cluster.add_worker(slots=1)
        wait_for(lambda: lost.failures == 1, timeout=30, what="the dead worker's lease to lapse")
        assert lost.attempts[0]["outcome"] == "lost"
        wait_for(lambda: len(lost.attempts) == 2 and lost.status == "processing", timeout=30,
                 what="the job to run again on the new worker")
        lost.kill()
    finally:
        cluster.stop()


def test_a_step_back_of_a_worker_s_clock_does_not_stop_its_heartbeats(tmp_path):
    """Two hours back on the worker's machine while its job runs: its heartbeats go on, so
    the job keeps its lease and completes in its first attempt (before, the worker's timers
    waited for the clock to catch up, and the lease lapsed)."""
    cluster, clock = cluster_with(tmp_path, "worker")
    try:
        D = cluster.connect()
        cluster.wait_for_workers(D)
        completes_through_a_step(D, clock, "-2h", 8)
    finally:
        cluster.stop()
