"""A real network cut: the server and a worker on hosts of their own (Linux network
namespaces joined by veth links); the worker's link goes down while it runs jobs, and comes
back after its jobs were re-run elsewhere.  Needs root and `ip netns`; says why otherwise."""
from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from dsage.client.local import LocalCluster, command
from tests.e2e.conftest import wait_for

TAG = f"ds{os.getpid() % 10000}"
SERVER_NS, WORKER_NS = f"{TAG}-srv", f"{TAG}-wrk"
ROOT_SIDE, SERVER_SIDE = "10.231.1.1", "10.231.1.2"     # our own test hosts' addresses
SERVER_LAN, WORKER_LAN = "10.231.2.1", "10.231.2.2"


def sh(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True)


def namespaces_usable() -> str | None:
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "the ip command (iproute2) is missing"
    probe = f"{TAG}-probe"
    try:
        sh("ip", "netns", "add", probe)
        sh("ip", "netns", "del", probe)
    except (subprocess.CalledProcessError, OSError) as e:
        return f"ip netns does not work here: {getattr(e, 'stderr', b'') or e}"
    return None


WHY_NOT = namespaces_usable()
pytestmark = pytest.mark.skipif(WHY_NOT is not None, reason=f"netns test not possible: {WHY_NOT}")


@pytest.fixture
def hosts():
    """Two hosts: the server's (reachable from here) and a worker's (reachable from the server)."""
    sh("ip", "netns", "add", SERVER_NS)
    sh("ip", "netns", "add", WORKER_NS)
    try:
        sh("ip", "link", "add", f"{TAG}r", "type", "veth", "peer", "name", f"{TAG}s")
        sh("ip", "link", "set", f"{TAG}s", "netns", SERVER_NS)
        sh("ip", "addr", "add", f"{ROOT_SIDE}/24", "dev", f"{TAG}r")
        sh("ip", "link", "set", f"{TAG}r", "up")
        ns = ("ip", "netns", "exec", SERVER_NS)
        sh(*ns, "ip", "addr", "add", f"{SERVER_SIDE}/24", "dev", f"{TAG}s")
        sh(*ns, "ip", "link", "set", f"{TAG}s", "up")
        sh(*ns, "ip", "link", "set", "lo", "up")
        sh(*ns, "ip", "link", "add", "lan0", "type", "veth", "peer", "name", "lan1", "netns", WORKER_NS)
        sh(*ns, "ip", "addr", "add", f"{SERVER_LAN}/24", "dev", "lan0")
        sh(*ns, "ip", "link", "set", "lan0", "up")
        wk = ("ip", "netns", "exec", WORKER_NS)
        sh(*wk, "ip", "addr", "add", f"{WORKER_LAN}/24", "dev", "lan1")
        sh(*wk, "ip", "link", "set", "lan1", "up")
        sh(*wk, "ip", "link", "set", "lo", "up")
        yield
    finally:
        subprocess.run(["ip", "link", "del", f"{TAG}r"], capture_output=True)
        for name in (SERVER_NS, WORKER_NS):
            subprocess.run(["ip", "netns", "del", name], capture_output=True)


def test_network_cut_and_heal(hosts, tmp_path):
    """Jobs of a worker cut off run elsewhere once its lease expires; when the link heals its
    late results are refused; every job completes once, with the right value."""
    cluster = LocalCluster(tmp_path / "home")
    procs = []
    try:
        cluster.init()
        cluster.configure(host=SERVER_SIDE, interface="0.0.0.0", lease_seconds=3, heartbeat_seconds=0.5)
        log = open(cluster.home / "server.log", "ab")
        procs.append(subprocess.Popen(["ip", "netns", "exec", SERVER_NS] + command("dsage_server"),
                                      env=cluster.env, stdout=log, stderr=log, start_new_session=True))
        wait_for((cluster.home / "server.addr").exists, what="the server")
        cluster.address = (cluster.home / "server.addr").read_text().strip()
        port = cluster.address.rsplit(":", 1)[1]
        for name in ("remote", "local"):
            cluster.run("worker", "add", name, "--out", str(cluster.home / f"{name}.pem"))
        wlog = open(cluster.home / "remote.log", "ab")
        procs.append(subprocess.Popen(["ip", "netns", "exec", WORKER_NS] + command("dsage_worker") +
                                      ["--cert", str(cluster.home / "remote.pem"), "--server", f"{SERVER_LAN}:{port}",
                                       "--slots", "2"], env=cluster.env, stdout=wlog, stderr=wlog,
                                      start_new_session=True))
        D = cluster.connect()
        wait_for(lambda: D.workers(), what="the remote worker")
        jobs = D.map(lambda i: __import__("time").sleep(2) or i * 10, range(4))
        wait_for(lambda: D.status()["busy"] == 2, what="the remote worker to run jobs")
        sh("ip", "netns", "exec", WORKER_NS, "ip", "link", "set", "lan1", "down")
        llog = open(cluster.home / "local.log", "ab")
        procs.append(subprocess.Popen(["ip", "netns", "exec", SERVER_NS] + command("dsage_worker") +
                                      ["--cert", str(cluster.home / "local.pem"), "--server", f"127.0.0.1:{port}",
                                       "--slots", "2"], env=cluster.env, stdout=llog, stderr=llog,
                                      start_new_session=True))
        assert [j.wait(timeout=120) for j in jobs] == [0, 10, 20, 30]
        sh("ip", "netns", "exec", WORKER_NS, "ip", "link", "set", "lan1", "up")
        wait_for(lambda: "stale report from remote" in (cluster.home / "server.log").read_text(), timeout=60,
                 what="the healed worker's late reports")
        for job in jobs:
            outcomes = [a["outcome"] for a in job.attempts]
            assert outcomes.count("completed") == 1, outcomes
        cut = [j for j in jobs if len(j.attempts) == 2]
        assert cut and all(j.attempts[0]["worker"] == "remote" and j.attempts[1]["worker"] == "local" for j in cut)
        assert all(j.status == "completed" for j in jobs)
        wait_for(lambda: {w["name"] for w in D.workers()} == {"remote", "local"}, timeout=60,
                 what="the remote worker to come back")
        assert D.eval("'healed'").wait(timeout=60) == "healed"
        D.close()
    finally:
        for proc in procs:
            subprocess.run(["kill", "--", f"-{proc.pid}"], capture_output=True)
            proc.wait()
        cluster.stop()
