"""Automatic prefetch: a worker busy with short jobs leases one job ahead per slot, and gives
it back when it waits behind a long one, so that it runs elsewhere."""
from __future__ import annotations

import time

from dsage import Job
from tests.e2e.conftest import connected, start_cluster, wait_for


def test_a_job_fetched_ahead_behind_a_long_one_is_given_back(tmp_path_factory):
    """The waiting job leaves the busy worker after 0.5 s and runs on the one that is free,
    long before the long job ends; no failure is counted for it."""
    cluster = start_cluster(tmp_path_factory, workers=1, slots=1)
    try:
        with connected(cluster) as D:
            assert [j.wait(timeout=30) for j in D.map(abs, range(-20, 0))] == list(range(20, 0, -1))
            long, short = D.submit_many([Job(code="import time\ntime.sleep(8)\n'long'", name="long"),
                                         Job(func=abs, args=(-7,), name="short")])
            wait_for(lambda: long.status == "processing" and short.status == "processing", timeout=10,
                     what="both jobs leased to the busy worker")
            cluster.add_worker(slots=1)
            start = time.monotonic()
            assert short.wait(timeout=6) == 7
            assert time.monotonic() - start < 6 and long.status == "processing"
            attempts = short.attempts
            assert [a["outcome"] for a in attempts] == ["undelivered", "completed"]
            assert attempts[0]["worker"] != attempts[1]["worker"] and short.failures == 0
            assert long.wait(timeout=30) == "long"
    finally:
        cluster.stop()


def test_a_job_leased_ahead_is_cancelled_while_it_waits_for_a_slot(tmp_path_factory):
    """An executor Future's cancel() of a job its worker has leased ahead but not started
    (`--prefetch 2`, its one slot busy) kills it: True, as for a job in the queue; the job
    next to it and the running one go on."""
    cluster = start_cluster(tmp_path_factory, workers=1, slots=1, worker_args=("--prefetch", "2"))
    try:
        with connected(cluster) as D:
            ex = D.executor()
            running = ex.submit(time.sleep, 60)
            wait_for(running.running, what="the long job to start")
            ahead = [ex.submit(abs, -5), ex.submit(abs, -6)]
            wait_for(lambda: all(f.job.status == "processing" for f in ahead), what="both jobs leased ahead")
            assert ahead[0].cancel() and ahead[0].cancelled()
            assert ahead[0].job.status == "killed"
            assert [a["outcome"] for a in ahead[0].job.attempts] == ["undelivered"]
            assert not running.cancel() and running.job.status == "processing"
            assert ahead[1].job.status == "processing"
            running.job.kill()
            assert ahead[1].result(timeout=30) == 6
    finally:
        cluster.stop()
