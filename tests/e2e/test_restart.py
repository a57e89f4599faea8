"""Crashes of the server and of workers: acknowledged work survives, everyone reconnects."""
from __future__ import annotations

import os
import signal
import time

import pytest

import dsage
from tests.e2e.conftest import connected, start_cluster, wait_for


@pytest.fixture
def fresh(tmp_path_factory):
    c = start_cluster(tmp_path_factory, workers=1, slots=2, lease_seconds=3)
    yield c
    c.stop()


@pytest.fixture
def D(fresh):
    """A session on this test's own cluster."""
    with connected(fresh) as session:
        yield session


def test_server_kill9_keeps_acknowledged_jobs_and_everyone_reconnects(fresh, D):
    """After kill -9 of the server and a restart, acknowledged jobs are there and finish;
    the worker and the client reconnect by themselves."""
    done = D.eval("'before'")
    assert done.wait(timeout=30) == "before"
    queued = D.map(lambda x: x * 10, range(10))
    fresh.stop_server(signal.SIGKILL)
    fresh.start_server()
    assert [j.wait(timeout=60) for j in queued] == [x * 10 for x in range(10)]
    assert D.job(done.job_id).result == "before"
    wait_for(lambda: D.workers(), what="the worker to reconnect")
    assert D.eval("'after'").wait(timeout=30) == "after"


def test_a_handle_shows_its_status_without_waiting_for_a_server_that_is_down(fresh, D):
    """The repr of a handle (a notebook showing `D.map(...)`) asks for the status once: a
    final one known is shown at once; else, with the server down, it says so within
    seconds (it waited 120 s per handle)."""
    done = D.eval("'done'")
    done.wait(timeout=30)
    running = D.eval("import time\ntime.sleep(60)")
    wait_for(lambda: running.status == "processing", what="the job to start")
    assert repr([done, running]) == f"[<dsage job {done.job_id} completed>, <dsage job {running.job_id} processing>]"
    fresh.stop_server(signal.SIGKILL)
    started = time.monotonic()
    shown = repr([done, running])
    assert time.monotonic() - started < 10
    assert shown.startswith(f"[<dsage job {done.job_id} completed>, <dsage job {running.job_id} (status unknown: ")
    fresh.start_server()
    wait_for(lambda: "processing" in repr(running), what="the server to answer again")


def test_large_payloads_sent_together_survive_a_server_kill9(fresh, D):
    """Large payloads of one submission (stored together, in one file) and their large
    results are read back byte for byte from the disk after kill -9 of the server."""
    datas = [os.urandom(300_000) + bytes([i]) for i in range(6)]
    jobs = D.map(lambda b: b[::-1], datas)
    fresh.stop_server(signal.SIGKILL)
    fresh.start_server()
    assert [j.wait(timeout=60) for j in jobs] == [d[::-1] for d in datas]
    fresh.stop_server(signal.SIGKILL)
    fresh.start_server()
    assert [D.job(j.job_id).result for j in jobs] == [d[::-1] for d in datas]


def _hangs_the_first_time(D, marker):
    """A job whose first attempt writes its pid to `marker` and sleeps; the next returns
    'second try'.  Returns the job once its first attempt runs, and that attempt's pid."""
    job = D.eval(f"import os, time\nif not os.path.exists({str(marker)!r}):\n"
                 f"    open({str(marker)!r}, 'w').write(str(os.getpid()))\n    time.sleep(120)\n'second try'")
    wait_for(lambda: marker.exists() and marker.read_text(), what="the first attempt to start")
    return job, int(marker.read_text())


def test_worker_kill9_jobs_run_elsewhere(fresh, tmp_path, D):
    """A job on a worker killed with -9 dies with it (no orphan goes on using the machine)
    and runs on another worker once its lease expires."""
    job, first = _hangs_the_first_time(D, tmp_path / "started")
    fresh.workers[0].send_signal(signal.SIGKILL)
    fresh.workers[0].wait()
    wait_for(lambda: not _alive(first), timeout=10, what="the orphaned job process to die")
    fresh.add_worker(slots=1)
    assert job.wait(timeout=60) == "second try"
    assert job.failures == 1 and "lease" in job.attempts[0].get("error", "")


def test_a_stopped_worker_gives_its_jobs_back_at_once(tmp_path_factory, tmp_path):
    """SIGTERM (systemctl stop, a machine shutting down): the worker stops its job and gives
    it back; the job waits for the next worker at once, with no failure counted, instead of
    for its lease (60 s here) to lapse."""
    cluster = start_cluster(tmp_path_factory, workers=1, slots=1)
    try:
        with connected(cluster) as D:
            job, first = _hangs_the_first_time(D, tmp_path / "started")
            cluster.workers[0].send_signal(signal.SIGTERM)
            assert cluster.workers[0].wait(timeout=30) == 0
            wait_for(lambda: not _alive(first), timeout=10, what="the job process to end")
            assert job.status == "new" and job.failures == 0
            assert [a["outcome"] for a in job.attempts] == ["interrupted"]
            cluster.add_worker(slots=1)
            assert job.wait(timeout=20) == "second try" and job.failures == 0
    finally:
        cluster.stop()


def test_distributed_factor_on_a_local_cluster(D):
    """DistributedFactor factors a number on real workers."""
    from dsage.examples.factor import DistributedFactor

    n = 2**64 + 1
    f = DistributedFactor(D, n * 1000003 * 1000003)
    f.start()
    assert f.wait(timeout=120) == {274177: 1, 1000003: 2, 67280421310721: 1}
    assert f.done and f.prime_factors == [274177, 1000003, 67280421310721]
    assert len(f.processed_jobs) >= 2 and not f.outstanding_jobs


def test_distributed_function_that_runs_out_of_work_reports_it(D):
    """A function whose next_job gives nothing while not done fails clearly, not hangs."""
    class Stuck(dsage.DistributedFunction):
        def next_job(self):
            return None

        def process_result(self, job):
            pass

    with pytest.raises(dsage.DsageError, match="next_job"):
        Stuck(D).start().wait(timeout=30)


TORN_COMMIT = """
import os, sys, transaction, ZODB
from ZODB.FileStorage import FileStorage
db = ZODB.DB(FileStorage(sys.argv[1]))
conn = db.open()
txn = transaction.get()
conn.root()["torn"] = "x" * 10000
conn.tpc_begin(txn)
conn.commit(txn)
conn.tpc_vote(txn)
os._exit(0)      # power lost after the vote: the transaction is written but never finished
"""


def test_commit_torn_by_a_crash_is_recovered_on_start(fresh, D):
    """A transaction cut short in the FileStorage is dropped on start with a log line;
    everything committed before it is there and the server works."""
    import subprocess
    import sys

    done = [j.wait(timeout=60) for j in D.map(abs, [-1, -2, -3])]
    fresh.stop_server()
    path = fresh.home / "db" / "dsage.fs"
    subprocess.run([sys.executable, "-c", TORN_COMMIT, str(path)], check=True)
    fresh.start_server()
    log = (fresh.home / "server.log").read_text()
    assert "truncated, possibly due to damaged records" in log
    assert [D.job(j).result for j in (1, 2, 3)] == done == [1, 2, 3]
    assert D.eval("'after recovery'").wait(timeout=60) == "after recovery"


def test_a_killed_job_stays_killed_across_a_restart(fresh, tmp_path, D):
    """A kill is durable: after kill -9 and restart of the server the job never runs."""
    marker = tmp_path / "ran"
    blockers = [D.eval("import time\ntime.sleep(2)") for _ in range(2)]
    job = D.eval(f"open({str(marker)!r}, 'w')", priority=50)
    job.kill()
    fresh.stop_server(signal.SIGKILL)
    fresh.start_server()
    for b in blockers:
        b.wait(timeout=60)
    assert D.eval("'drained'", priority=99).wait(timeout=60) == "drained"
    assert D.job(job.job_id).status == "killed" and not marker.exists()


def _alive(pid: int) -> bool:
    """True while a process exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
