"""The server's own maintenance, end to end: finished jobs expire after keep_days and the
database file is packed, while the server keeps serving."""
from __future__ import annotations

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
