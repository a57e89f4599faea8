"""The server's own maintenance, end to end: finished jobs expire after keep_days and the
database file is packed, while the server keeps serving."""
from __future__ import annotations

import signal

from ZODB.fsIndex import fsIndex

from dsage import errors
from dsage.client.local import LocalCluster
from tests.e2e.conftest import connected, wait_for


def test_finished_jobs_expire_and_the_database_is_packed(tmp_path):
    """keep_days ~ 2 s: results are there at first, gone a few seconds later; the server
    packs its file by itself and still takes and runs jobs."""
    with LocalCluster(tmp_path / "home") as cluster:
        cluster.init()
        cluster.configure(keep_days=2.5 / 86400, maintenance_seconds=0.5, pack_min_mb=0, pack_growth=1.5)
        cluster.start_server()
        cluster.add_worker(slots=2)
        with connected(cluster) as D:
            jobs = [D.eval(f"'x' * 100_000 + str({i})") for i in range(40)]
            values = [j.wait(timeout=60) for j in jobs]
            assert values[7] == "x" * 100_000 + "7"
            # Each went to the worker once: no lot claimed twice for one waiting slot.
            assert [len(j.attempts) for j in jobs] == [1] * 40

            def gone(job_id: int) -> bool:
                try:
                    D.job(job_id)
                except errors.RemoteError as e:
                    assert "no job" in str(e)
                    return True
                return False
            wait_for(lambda: all(gone(j.job_id) for j in jobs), timeout=30, what="job expiry")
            log = lambda: (cluster.home / "server.log").read_text()
            wait_for(lambda: "packed the database" in log(), timeout=30, what="a pack")
            assert "jobs finished more than" in log()
            assert D.eval("6 * 7").wait(timeout=30) == 42


def test_the_server_saves_its_index_so_a_restart_after_kill9_reads_little(tmp_path):
    """With index_seconds = 0.5 the server's index file soon covers all that was written,
    so a start after kill -9 reads no record again; every result is there after it."""
    with LocalCluster(tmp_path / "home") as cluster:
        cluster.init()
        cluster.configure(index_seconds=0.5)
        cluster.start_server()
        cluster.add_worker(slots=2)
        fs = cluster.home / "db" / "dsage.fs"

        def covered() -> int:
            """The file position the index file covers (FileStorage replaces the file by
            removing the old one first: for a moment there is none)."""
            try:
                return int(fsIndex.load(f"{fs}.index")["pos"])
            except OSError:
                return -1
        with connected(cluster) as D:
            jobs = D.map(abs, range(-1500, 0))
            assert [j.wait(timeout=120) for j in jobs] == list(range(1500, 0, -1))
            # Without the periodic save, the index covers only what the first start wrote.
            wait_for(lambda: covered() == fs.stat().st_size, timeout=30, what="the index saved")
        cluster.stop_server(signal.SIGKILL)
        cluster.start_server()
        with connected(cluster) as D:
            assert [D.job(j.job_id).wait(timeout=30) for j in jobs[:3]] == [1500, 1499, 1498]
        assert "Ignoring index" not in (cluster.home / "server.log").read_text()
