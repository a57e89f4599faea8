"""dsage_server on the other storages SPEC names, each a real server: ZEO (``runzeo``) and
PostgreSQL through RelStorage; what a user does with them, from ``dsage init`` on."""
from __future__ import annotations

import contextlib
import signal
import socket
import time
from typing import Iterator

import pytest

import dsage
from dsage.client.local import LocalCluster
from tests.e2e.conftest import wait_for
from tests.support.databases import postgres_server, zeo_server

pytestmark = pytest.mark.e2e


def _jobs_survive_a_kill9(cluster: LocalCluster) -> None:
    """Jobs of every kind, large values (blobs) among them, stored on the cluster's database,
    are all there after a kill -9 of the server; the worker and the client reconnect."""
    D = cluster.connect()
    try:
        wait_for(lambda: D.workers(), what="a worker")
        done = D.eval("6 * 7")
        assert done.wait(timeout=60) == 42
        big = D.submit(bytes.__add__, bytes(300_000), b"!")        # a payload and a result of 300 kB
        assert len(big.wait(timeout=60)) == 300_001
        failed = D.submit(dsage.Job(code="1/0", max_failures=1))
        with pytest.raises(dsage.JobFailed, match="ZeroDivisionError"):
            failed.wait(timeout=60)
        queued = D.map(abs, range(-200, 0))
        cluster.stop_server(signal.SIGKILL)
        cluster.start_server()
        assert D.job(done.job_id).result == 42
        assert D.job(big.job_id).result == bytes(300_000) + b"!"
        assert D.job(failed.job_id).status == "failed"
        assert [j.wait(timeout=120) for j in queued] == list(range(200, 0, -1))
        wait_for(lambda: D.workers(), what="the worker to reconnect")
        assert D.eval("'after'").wait(timeout=60) == "after"
        assert cluster.run("pack").stdout.startswith("packed: ")
    finally:
        D.close()


@pytest.mark.parametrize("blob_cache", [True, False], ids=["blob-cache", "no-blob-cache"])
def test_zeo_named_in_server_conf_after_init(tmp_path, blob_cache):
    """`dsage init`, then `db = zeo://...` in server.conf: the server adopts the admin of
    init in the new database, keeps everything across a kill -9, and a ZEO server that goes
    away makes requests fail with a clear error until it is back."""
    (tmp_path / "zeo").mkdir()
    with zeo_server(tmp_path / "zeo") as zeo:
        cluster = LocalCluster(tmp_path / "home")
        try:
            cluster.init()
            cluster.configure(db=zeo.uri(blob_cache))
            cluster.start_server()
            cluster.add_worker(slots=2)
            _jobs_survive_a_kill9(cluster)
            D = cluster.connect()
            try:
                zeo.stop()
                with pytest.raises(dsage.DsageError, match="the server's database failed this request"):
                    D.eval("1")
                zeo.start()
                assert wait_for(lambda: _answers(D), timeout=60, what="ZEO to be back") == "back"
            finally:
                D.close()
        finally:
            cluster.stop()


@contextlib.contextmanager
def _two_homes_on_one_zeo(tmp_path, **settings) -> Iterator[tuple[LocalCluster, LocalCluster]]:
    """Two set-up homes whose servers are to use one ZEO database (started by neither)."""
    (tmp_path / "zeo").mkdir()
    with zeo_server(tmp_path / "zeo") as zeo:
        first, second = LocalCluster(tmp_path / "first"), LocalCluster(tmp_path / "second")
        try:
            for cluster in (first, second):
                cluster.init()
                cluster.configure(db=zeo.uri(), **settings)
            yield first, second
        finally:
            first.stop()
            second.stop()


def test_a_second_server_on_the_same_zeo_database_is_refused(tmp_path):
    """Two servers on one ZEO database would lease the same jobs: the second one exits with
    a line naming the first; after a kill -9 of the first, it starts again at once on its
    host, and after a clean stop another server may take the database."""
    with _two_homes_on_one_zeo(tmp_path) as (first, second):
        first.start_server()
        with pytest.raises(dsage.DsageError, match="exited with 1"):
            second.start_server()
        log = (second.home / "server.log").read_text()
        assert f"the database is in use by the dsage_server on {socket.gethostname()} (pid {first.server.pid}, " in log
        first.stop_server(signal.SIGKILL)
        first.start_server()                    # its old hold names a process that is gone
        first.stop_server()
        second.start_server()                   # a clean stop let the database go
        assert second.server.poll() is None


def test_a_server_that_stalled_past_its_hold_stops_instead_of_sharing(tmp_path):
    """A server stopped (SIGSTOP) longer than its hold loses the database to another one;
    when it runs again it sees that at its next renewal and exits, saying why."""
    with _two_homes_on_one_zeo(tmp_path, hold_seconds=2) as (first, second):
        first.start_server()
        first.server.send_signal(signal.SIGSTOP)
        time.sleep(2.5)
        second.start_server()
        first.server.send_signal(signal.SIGCONT)
        assert first.server.wait(timeout=30) == 1
        log = (first.home / "server.log").read_text()
        assert f"stopping: the database is in use by the dsage_server on {socket.gethostname()} " \
               f"(pid {second.server.pid}, " in log
        assert second.server.poll() is None


def _answers(D) -> str | None:
    try:
        return D.eval("'back'").wait(timeout=30)
    except dsage.DsageError:
        return None


def test_postgresql_from_dsage_init(tmp_path):
    """`dsage init --db postgres://...` puts the admin into that database; users and
    workers added there log in; jobs survive a kill -9 of the server; the URI's password
    is shown nowhere."""
    with postgres_server() as uri:
        uri = uri.replace("postgres@", "postgres:s3cret@")         # the test server trusts anyone
        cluster = LocalCluster(tmp_path / "home")
        try:
            said = cluster.run("init", "--port", "0", "--web-port", "0", "--db", uri).stdout
            assert "postgres://postgres:***@127.0.0.1:" in said and "s3cret" not in said
            cluster.start_server()
            cluster.add_worker(slots=2)
            _jobs_survive_a_kill9(cluster)
            listed = cluster.run("user", "list").stdout
            assert "worker1" in listed and "admin" in listed
            log = (cluster.home / "server.log").read_text()
            assert "opening database postgres://postgres:***@127.0.0.1:" in log and "s3cret" not in log
        finally:
            cluster.stop()


def test_init_refuses_a_database_it_cannot_open_and_writes_nothing(tmp_path):
    """A --db that does not answer: one line, and no keys or config left behind."""
    cluster = LocalCluster(tmp_path / "home")
    out = cluster.run("init", "--db", "zeo://127.0.0.1:1?wait_timeout=1", check=False)
    assert out.returncode == 1
    assert out.stderr == "dsage: error: cannot open the database zeo://127.0.0.1:1: timed out waiting for connection\n"
    assert not list((tmp_path / "home").glob("*"))
