"""The twistd plugins: `twist dsage-server` and `twist dsage-worker` run the same services."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from dsage.client.local import LocalCluster
from tests.e2e.conftest import wait_for

TWIST = str(Path(sys.executable).with_name("twist"))


def test_twist_lists_and_runs_the_plugins(tmp_path):
    """`twist --help` lists both plugins; they serve a job end to end."""
    listing = subprocess.run([TWIST, "--help"], capture_output=True, text=True).stdout
    assert "dsage-server" in listing and "dsage-worker" in listing
    cluster = LocalCluster(tmp_path / "home")
    procs = []
    try:
        cluster.init()
        cluster.run("worker", "add", "tw", "--out", str(cluster.home / "tw.pem"))
        log = open(tmp_path / "twist.log", "ab")
        procs.append(subprocess.Popen([TWIST, "dsage-server"], env=cluster.env, stdout=log, stderr=log,
                                      start_new_session=True))
        wait_for((cluster.home / "server.addr").exists, what="twist dsage-server to listen")
        cluster.address = (cluster.home / "server.addr").read_text().strip()
        procs.append(subprocess.Popen([TWIST, "dsage-worker", "--cert", str(cluster.home / "tw.pem"),
                                       "--server", cluster.address, "--slots", "1"],
                                      env=cluster.env, stdout=log, stderr=log, start_new_session=True))
        D = cluster.connect()
        wait_for(lambda: D.workers(), what="the twist worker")
        assert D.eval("'via twistd'").wait(timeout=60) == "via twistd"
        D.close()
    finally:
        for proc in procs:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=30)
        cluster.stop()
