"""The queue's order between users, on a real server and worker."""
from __future__ import annotations

from tests.e2e.conftest import start_cluster, wait_for


def test_a_user_s_job_waits_for_one_turn_not_for_another_user_s_whole_queue(tmp_path_factory):
    """Alice queues 20 jobs on one slot; bob's job, queued after them at the same priority,
    starts after one or two of hers, not after all 20; her jobs run in her order."""
    cluster = start_cluster(tmp_path_factory, workers=1, slots=1, worker_args=("--prefetch", "0"))
    try:
        sessions = {}
        for name in ("alice", "bob"):
            path = cluster.home / f"{name}.pem"
            cluster.run("user", "add", name, "--out", str(path))
            sessions[name] = cluster.connect(cert=str(path))
        alice, bob = sessions["alice"], sessions["bob"]
        wait_for(lambda: alice.workers(), what="the worker")
        hers = alice.map(__import__("time").sleep, [0.2] * 20)
        wait_for(lambda: hers[0].status != "new", what="alice's first job to start")
        his = bob.submit(abs, -1)
        assert his.wait(timeout=60) == 1
        assert [j.wait(timeout=60) for j in hers] == [None] * 20
        started = [j.attempts[0]["start"] for j in hers]
        assert started == sorted(started)
        assert his.attempts[0]["start"] < started[3]
    finally:
        cluster.stop()
