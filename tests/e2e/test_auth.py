"""Identities, roles and ownership against a real server."""
from __future__ import annotations

import dataclasses
import socket

import pytest

import dsage
from dsage import tls
from tests.e2e.conftest import start_cluster, wait_for


def test_users_see_and_kill_only_their_own_jobs(cluster, D, users):
    """bob cannot read or kill alice's job; the admin can see it."""
    alice = cluster.connect(users["alice"])
    bob = cluster.connect(users["bob"])
    try:
        job = alice.eval("import time\ntime.sleep(1)\n'mine'")
        with pytest.raises(dsage.AuthError):
            bob.job(job.job_id)
        with pytest.raises(dsage.AuthError):
            bob._call("kill", job_id=job.job_id)
        assert job.job_id not in [j.job_id for j in bob.jobs()]
        with pytest.raises(dsage.AuthError):
            bob.jobs(all=True)
        assert job.wait(timeout=30) == "mine"
        assert D.job(job.job_id).result == "mine"
        assert job.job_id in [j.job_id for j in D.jobs(all=True)]
    finally:
        alice.close()
        bob.close()


def test_a_users_job_never_runs_where_another_users_job_ran(cluster, users):
    """Job processes are reused, but per user: what alice's job leaves in its process (a
    patched builtin, a hook) is seen by alice's next job and by none of bob's."""
    alice = cluster.connect(users["alice"])
    bob = cluster.connect(users["bob"])
    mark = "import builtins\nbuiltins.MARK = getattr(builtins, 'MARK', 0) + 1\nbuiltins.MARK"
    try:
        assert [alice.eval(mark).wait(timeout=30) for _ in range(4)][-1] >= 2      # reused: 2 slots
        assert [bob.eval(mark).wait(timeout=30) for _ in range(4)][0] == 1
        assert all(bob.eval("__import__('os').getpid()").wait(timeout=30) !=
                   alice.eval("__import__('os').getpid()").wait(timeout=30) for _ in range(3))
    finally:
        alice.close()
        bob.close()


def test_worker_certificate_cannot_submit(cluster, D):
    """A worker's certificate is refused as a client, even with its bundle relabelled."""
    path = cluster.home / "worker1.pem"
    with pytest.raises(dsage.AuthError):
        dsage.connect(cluster.address, cert=str(path))
    relabelled = dataclasses.replace(tls.Bundle.load(path), role="client")
    fake = cluster.home / "relabelled.pem"
    relabelled.save(fake)
    with pytest.raises(dsage.AuthError, match="is a worker"):
        dsage.connect(cluster.address, cert=str(fake))


def test_plain_users_cannot_manage_identities(cluster, users):
    """Only admins may issue or revoke bundles."""
    alice = cluster.connect(users["alice"])
    try:
        with pytest.raises(dsage.AuthError):
            alice._call("add_identity", name="eve", role="admin")
        with pytest.raises(dsage.AuthError):
            alice._call("take", n=1)
    finally:
        alice.close()


def test_an_admin_manages_identities_with_its_own_bundle(cluster, D, tmp_path):
    """`dsage user add|list|revoke`, `worker add` and `pack` take --cert (an admin's bundle
    from another machine); a plain user's is refused; no admin can revoke itself."""
    boss = tmp_path / "boss.pem"
    cluster.run("user", "add", "boss", "--admin", "--out", str(boss))
    issued = cluster.run("user", "add", "dave", "--out", str(tmp_path / "dave.pem"), "--cert", str(boss))
    assert "bundle written" in issued.stdout
    assert cluster.run("worker", "add", "lab7", "--out", str(tmp_path / "lab7.pem"), "--cert", str(boss)).returncode == 0
    listed = cluster.run("user", "list", "--cert", str(boss), "--server", cluster.address).stdout
    assert "dave" in listed and "lab7" in listed
    refused = cluster.run("user", "list", "--cert", str(tmp_path / "dave.pem"), check=False)
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    itself = cluster.run("user", "revoke", "boss", "--cert", str(boss), check=False)
    assert itself.returncode == 1 and "boss cannot revoke its own certificate" in itself.stderr
    assert cluster.run("user", "revoke", "dave", "--cert", str(boss)).returncode == 0
    assert "packed" in cluster.run("pack", "--cert", str(boss)).stdout
    assert D.eval("6 * 7").wait(timeout=30) == 42


def test_foreign_ca_is_refused(cluster, tmp_path):
    """A bundle from another CA cannot connect; the server goes on serving."""
    rogue = tls.Authority.create()
    bundle, _ = tls.make_bundle(rogue, "mallory", "admin", cluster.address)
    bundle = dataclasses.replace(bundle, ca_pem=(cluster.home / "ca.pem").read_bytes())
    path = tmp_path / "mallory.pem"
    bundle.save(path)
    with pytest.raises((dsage.ConnectionLost, dsage.AuthError)):
        dsage.connect(cluster.address, cert=str(path), timeout=15)


def test_garbage_bytes_do_not_hurt_the_server(cluster, D):
    """Plain TCP garbage is dropped; everyone else is still served."""
    host, port = cluster.address.rsplit(":", 1)
    with socket.create_connection(("127.0.0.1", int(port)), timeout=5) as s:
        s.sendall(b"\x00\x00\x00\x05hello" * 100)
        s.settimeout(5)
        try:
            while s.recv(4096):
                pass
        except OSError:
            pass
    assert D.eval("6 * 7").wait(timeout=30) == 42


def test_revoked_user_is_dropped_and_refused(cluster, D):
    """Revoking a user drops its open connection and refuses new logins."""
    path = cluster.home / "carol.pem"
    cluster.run("user", "add", "carol", "--out", str(path))
    carol = cluster.connect(str(path))
    assert carol.eval("1").wait(timeout=30) == 1
    out = cluster.run("user", "revoke", "carol")
    assert "revoked" in out.stdout
    with pytest.raises(dsage.AuthError):
        dsage.connect(cluster.address, cert=str(path), timeout=15)
    with pytest.raises((dsage.AuthError, dsage.ConnectionLost, TimeoutError)):
        carol._call("status", timeout=15)
    listed = cluster.run("user", "list").stdout
    assert "carol" in listed and "revoked" in listed
    cluster.stop_server()
    cluster.start_server()
    with pytest.raises(dsage.AuthError):
        dsage.connect(cluster.address, cert=str(path), timeout=15)


def test_a_revoked_worker_s_running_jobs_run_elsewhere_at_once(tmp_path_factory):
    """A revoked worker will never report: its running job is queued again at the revocation
    (no failure counted), not after its lease, and another worker runs it."""
    cluster = start_cluster(tmp_path_factory, workers=0, lease_seconds=300)
    try:
        cluster.add_worker(slots=1, name="lab1")
        D = cluster.connect()
        cluster.wait_for_workers(D)
        job = D.eval("import time\ntime.sleep(2)\n'done'", max_failures=1)
        wait_for(lambda: job.status == "processing", what="the job to start on lab1")
        cluster.add_worker(slots=1, name="lab2")
        cluster.wait_for_workers(D)
        out = cluster.run("user", "revoke", "lab1")
        assert "its 1 running job(s) queued again" in out.stdout
        assert job.wait(timeout=30) == "done"
        assert job.failures == 0 and [(a["worker"], a["outcome"]) for a in job.attempts] == [
            ("lab1", "revoked"), ("lab2", "completed")]
        D.close()
    finally:
        cluster.stop()
