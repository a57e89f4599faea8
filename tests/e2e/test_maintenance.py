"""The server's own maintenance, end to end: finished jobs expire after keep_days and the
database file is packed, while the server keeps serving."""
from __future__ import annotations

import pytest

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
            first = jobs[0].job_id

            def gone() -> bool:
                try:
                    D.job(first)
                except errors.RemoteError:
                    return True
                return False
            wait_for(gone, timeout=30, what="job expiry")
            log = lambda: (cluster.home / "server.log").read_text()
            wait_for(lambda: "packed the database" in log(), timeout=30, what="a pack")
            assert "jobs finished more than" in log()
            with pytest.raises(errors.RemoteError, match="no job"):
                D.job(jobs[-1].job_id)
            assert D.eval("6 * 7").wait(timeout=30) == 42
