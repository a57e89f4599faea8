"""The twistd plugins: `twist dsage-server` and `twist dsage-worker` run the same services."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

import dsage
from dsage import tls
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
                                       "--server", cluster.address, "--slots", "1", "--max-file-size", "1",
                                       "--recycle-memory", "0"],
                                      env=cluster.env, stdout=log, stderr=log, start_new_session=True))
        D = cluster.connect()
        wait_for(lambda: D.workers(), what="the twist worker")
        assert D.eval("'via twistd'").wait(timeout=60) == "via twistd"
        # dsage_worker's job options: a fresh process per job, files of at most 1 MB.
        pids = {D.eval("__import__('os').getpid()").wait(timeout=60) for _ in range(2)}
        assert len(pids) == 2, "--recycle-memory 0: a fresh process for every job"
        with pytest.raises(dsage.JobFailed, match="File too large|SIGXFSZ|file size"):
            D.eval("open('big', 'wb').write(bytes(2 << 20))", max_failures=1).wait(timeout=60)
        D.close()
    finally:
        for proc in procs:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=30)
        cluster.stop()


def test_bad_plugin_options_are_one_line_errors_and_a_port_in_use_stops_the_server(tmp_path):
    """A wrong bundle or option is twist's one-line usage error (it was a traceback, or
    was taken); a server that cannot listen stops (it stayed up, listening on nothing)."""
    cluster = LocalCluster(tmp_path / "home")
    cluster.init()
    client = str(cluster.home / "client.pem")
    admin = tls.Bundle.load(client).name
    for args, message in ((["--cert", str(tmp_path / "none.pem")], f"no dsage bundle at {tmp_path}/none.pem"),
                          (["--cert", client], f"{client} is the bundle of admin {admin}; make a worker one"),
                          (["--cert", client, "--slots", "0"], "--slots must be at least 1"),
                          (["--cert", client, "--nice", "-3"], "--nice must be from 0"),
                          (["--cert", client, "--max-memory", "-1"], "--max-memory must not be negative, not -1"),
                          (["--cert", client, "--recycle-memory", "inf"], "--recycle-memory must be a finite")):
        out = subprocess.run([TWIST, "dsage-worker", *args], env=cluster.env, capture_output=True, text=True,
                             timeout=60)
        assert out.returncode == 64 and out.stderr.startswith(f"Error: {message}"), out.stderr
        assert "Traceback" not in out.stderr
    out = subprocess.run([TWIST, "dsage-server", "--web-port", "70000"], env=cluster.env, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 64
    assert out.stderr.startswith("Error: the web port must be from -1 (no dashboard) to 65535, not 70000")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        out = subprocess.run([TWIST, "--log-format", "text", "dsage-server", "--port", port], env=cluster.env,
                             capture_output=True, text=True, timeout=60)
    assert f"cannot listen on 127.0.0.1:{port}: " in out.stdout + out.stderr
