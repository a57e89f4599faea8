"""`dsage.start_all` and LocalCluster, as a notebook or script uses them."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from dsage import errors
from dsage.client.local import LocalCluster


def test_start_all_returns_with_its_workers_connected_and_cleans_up_at_exit():
    """start_all(workers=2) comes back with both workers there (status and workers say so at
    once), runs jobs, and the program's exit stops the processes and removes the home."""
    code = textwrap.dedent("""
        import dsage
        D, cluster = dsage.start_all(workers=2)
        print(len(D.workers()), D.status()["slots"], flush=True)
        print(D.submit(abs, -5).wait(timeout=30), flush=True)
        print(cluster.home, flush=True)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, DSAGE_HOME="/nonexistent"))
    assert out.returncode == 0, out.stderr
    counts, result, home = out.stdout.splitlines()
    assert counts == "2 2" and result == "5"
    assert not os.path.exists(home)
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert home not in ps


def test_a_session_of_a_stopped_cluster_fails_at_once():
    """After cluster.stop(), the session start_all gave is closed: a call says so at once
    instead of waiting two minutes for a server that is gone."""
    import time

    import dsage

    D, cluster = dsage.start_all(workers=1)
    assert D.eval("6 * 7").wait(timeout=30) == 42
    cluster.stop()
    start = time.monotonic()
    with pytest.raises(errors.DsageError, match="this dsage session is closed"):
        D.eval("1")
    assert time.monotonic() - start < 5


def test_a_worker_that_cannot_start_is_reported_with_its_log(tmp_path):
    """Waiting for workers ends with the worker's own error when it exits instead."""
    with LocalCluster(tmp_path / "home") as cluster:
        cluster.init()
        cluster.start_server()
        cluster.add_worker(args=("--slots", "0"))
        with cluster.connect() as D, pytest.raises(errors.DsageError, match="dsage_worker exited"):
            cluster.wait_for_workers(D, timeout=30)


def test_workers_that_never_connect_end_the_wait_with_their_last_log_lines(tmp_path):
    """A worker that cannot reach the server: the wait gives up after its timeout, saying how
    many came and what each worker last wrote."""
    with LocalCluster(tmp_path / "home") as cluster:
        cluster.init()
        cluster.start_server()
        cluster.add_worker(args=("--server", "127.0.0.1:1"))
        with cluster.connect() as D, pytest.raises(errors.DsageError) as e:
            cluster.wait_for_workers(D, timeout=3)
        assert "0 of 1 workers connected within 3 s (worker1.log: " in str(e.value)
        assert "cannot reach the dsage server at 127.0.0.1:1: Connection was refused" in str(e.value)


def test_a_local_cluster_stops_when_the_program_that_started_it_is_killed():
    """A notebook kernel or script killed (no atexit) takes its local server and workers with
    it: they used to run on, the workers retrying a dead server for ever."""
    import signal
    import time

    code = textwrap.dedent("""
        import dsage, time
        D, cluster = dsage.start_all(workers=1)
        print(cluster.server.pid, cluster.workers[0].pid, flush=True)
        time.sleep(600)
    """)
    program = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                               env=dict(os.environ, DSAGE_HOME="/nonexistent"))
    try:
        pids = [int(p) for p in program.stdout.readline().split()]
        assert len(pids) == 2
    finally:
        program.send_signal(signal.SIGKILL)
        program.wait()

    def alive(pid):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        try:
            with open(f"/proc/{pid}/stat") as fh:
                return fh.read().split(")")[1].split()[0] != "Z"       # a zombie has ended
        except FileNotFoundError:
            return False

    deadline = time.monotonic() + 30
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(alive(p) for p in pids)
