"""A real network cut: the server and a worker on hosts of their own (Linux network
namespaces joined by veth links); the worker's link goes down while it runs jobs, and comes
back after its jobs were re-run elsewhere.  Needs root and `ip netns`; says why otherwise."""
from __future__ import annotations

import os
import shutil
import subprocess
import threading
import time

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


def run_in(ns: str, cluster: LocalCluster, log_name: str, args: list[str]) -> subprocess.Popen:
    """Start a program on the host `ns` (a network namespace), its output in the cluster's home."""
    log = open(cluster.home / log_name, "ab")
    return subprocess.Popen(["ip", "netns", "exec", ns] + args, env=cluster.env, stdout=log, stderr=log,
                            start_new_session=True)


def worker_on(ns: str, cluster: LocalCluster, name: str, server: str) -> subprocess.Popen:
    """A dsage_worker named `name` (its bundle issued already) with 2 slots on the host `ns`."""
    return run_in(ns, cluster, f"{name}.log", command("dsage_worker") +
                  ["--cert", str(cluster.home / f"{name}.pem"), "--server", server, "--slots", "2"])


def end(procs: list[subprocess.Popen], cluster: LocalCluster) -> None:
    """Stop the programs started on the hosts, then the cluster."""
    for proc in procs:
        subprocess.run(["kill", "--", f"-{proc.pid}"], capture_output=True)
        proc.wait()
    cluster.stop()


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
        procs.append(run_in(SERVER_NS, cluster, "server.log", command("dsage_server")))
        wait_for((cluster.home / "server.addr").exists, what="the server")
        cluster.address = (cluster.home / "server.addr").read_text().strip()
        port = cluster.address.rsplit(":", 1)[1]
        for name in ("remote", "local"):
            cluster.run("worker", "add", name, "--out", str(cluster.home / f"{name}.pem"))
        procs.append(worker_on(WORKER_NS, cluster, "remote", f"{SERVER_LAN}:{port}"))
        D = cluster.connect()
        wait_for(lambda: D.workers(), what="the remote worker")
        jobs = D.map(lambda i: __import__("time").sleep(2) or i * 10, range(4))
        wait_for(lambda: D.status()["busy"] == 2, what="the remote worker to run jobs")
        sh("ip", "netns", "exec", WORKER_NS, "ip", "link", "set", "lan1", "down")
        procs.append(worker_on(SERVER_NS, cluster, "local", f"127.0.0.1:{port}"))
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
        end(procs, cluster)


def test_a_client_waiting_on_a_link_gone_silent_reconnects(hosts, tmp_path, monkeypatch):
    """The server's host goes away without a word (its link cut, the server killed and its
    connections forgotten as in a reboot, then all back): a client blocked in wait() finds out
    by TCP keepalive, reconnects and gets the result, where the kernel's defaults would keep it
    waiting two hours (the test fails at 60 s without it)."""
    from dsage import protocol

    monkeypatch.setattr(protocol, "KEEPALIVE", (1, 1, 2))      # about a minute in use
    cluster = LocalCluster(tmp_path / "home")
    procs: list[subprocess.Popen] = []

    def start_server(*port: str) -> subprocess.Popen:
        (cluster.home / "server.addr").unlink(missing_ok=True)
        proc = run_in(SERVER_NS, cluster, "server.log", command("dsage_server") + list(port))
        procs.append(proc)
        wait_for((cluster.home / "server.addr").exists, what="the server")
        return proc

    try:
        cluster.init()
        cluster.configure(host=SERVER_SIDE, interface="0.0.0.0")
        server = start_server()
        cluster.address = (cluster.home / "server.addr").read_text().strip()
        port = cluster.address.rsplit(":", 1)[1]
        cluster.run("worker", "add", "local", "--out", str(cluster.home / "local.pem"))
        procs.append(worker_on(SERVER_NS, cluster, "local", f"127.0.0.1:{port}"))
        D = cluster.connect()
        wait_for(lambda: D.workers(), what="the worker")
        job = D.eval("import time; time.sleep(4); 'done'")
        wait_for(lambda: D.status()["busy"] == 1, what="the job to start")
        waited: list = []
        waiter = threading.Thread(target=lambda: waited.append(job.wait(timeout=60)))
        waiter.start()          # its watch is asked for now: from here on the client sends nothing
        time.sleep(0.5)
        # The server's host is cut off from us (both ends of the link down: nothing it sends
        # is kept for later), its server dies, and its kernel forgets the connections, as a
        # reboot would (it would otherwise resend the dead server's FIN once the link is back)
        server_side = ("ip", "netns", "exec", SERVER_NS)
        sh(*server_side, "ip", "link", "set", f"{TAG}s", "down")
        sh("ip", "link", "set", f"{TAG}r", "down")
        subprocess.run(["kill", "-9", "--", f"-{server.pid}"], capture_output=True)
        server.wait()
        sh(*server_side, "ss", "-K", "-tn", "sport", "=", f":{port}")
        start_server("--port", port)
        sh(*server_side, "ip", "link", "set", f"{TAG}s", "up")
        sh("ip", "link", "set", f"{TAG}r", "up")
        waiter.join(70)
        assert waited == ["done"]
        assert D.eval("'again'").wait(timeout=30) == "again"
        D.close()
    finally:
        end(procs, cluster)
