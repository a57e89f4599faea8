"""A full disk under the database: the submission that does not fit gets a clear error, what
was stored before stays, and the server goes on once there is room.  The database lives on
a small tmpfs; needs root to mount it, and says why otherwise."""
from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from dsage import errors
from dsage.client.local import LocalCluster
from tests.e2e.conftest import connected


def tmpfs_usable(probe: str) -> str | None:
    if os.geteuid() != 0:
        return "mounting a tmpfs needs root"
    os.makedirs(probe, exist_ok=True)
    try:
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", probe], check=True, capture_output=True)
        subprocess.run(["umount", probe], check=True, capture_output=True)
    except (subprocess.CalledProcessError, OSError) as e:
        return f"mount does not work here: {getattr(e, 'stderr', b'') or e}"
    finally:
        os.rmdir(probe)
    return None


def test_a_full_disk_refuses_the_submission_and_loses_nothing(tmp_path):
    """24 MiB of database space, 6 free: a 20 MiB job, or a 7.8 MB batch, that does not fit
    is refused with the disk's error; the jobs before keep their results, across a restart, and
    small jobs still run."""
    why = tmpfs_usable(str(tmp_path / "probe"))
    if why:
        pytest.skip(f"full-disk test not possible: {why}")
    cluster = LocalCluster(tmp_path / "home")
    cluster.init()
    disk = cluster.home / "db"                      # the database `dsage init` made, moved onto the tmpfs
    shutil.move(str(disk), str(tmp_path / "db"))
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(disk)], check=True)
    try:
        for path in (tmp_path / "db").iterdir():
            shutil.move(str(path), str(disk / path.name))
        with cluster:
            cluster.start_server()
            cluster.add_worker(slots=2)
            with connected(cluster) as D:
                # 17.5 MiB of the 24 in blobs: about 6 MiB stay free.
                kept = [D.submit(bytes.__len__, bytes(7 << 19)) for _ in range(5)]
                assert [j.wait(timeout=60) for j in kept] == [7 << 19] * 5
                with pytest.raises(errors.RemoteError, match="could not store this request: No space left"):
                    D.submit(bytes.__len__, os.urandom(20 << 20))         # a blob: refused while staged
                with pytest.raises(errors.RemoteError, match="could not store this request: No space left"):
                    # 7.8 MB in one request (under the client's 8 MiB batches): the commit fails
                    D.map(len, [os.urandom(60_000) for _ in range(130)])
                assert D.eval("6 * 7").wait(timeout=60) == 42
            cluster.stop_server()
            cluster.start_server()
            with connected(cluster) as D:
                assert [D.job(j.job_id).result for j in kept] == [7 << 19] * 5
                assert D.eval("6 * 8").wait(timeout=60) == 48
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)
