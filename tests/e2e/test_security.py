"""Security against a real server: certificates, names, payloads, limits, containment."""
from __future__ import annotations

import dataclasses
import datetime
import os
import pickle
import resource
import select
import signal
import socket
import ssl
import subprocess
import time

import pytest

import dsage
from dsage import tls
from dsage.server.service import SPARE_FILES
from tests.e2e.conftest import connected, start_cluster, wait_for


@pytest.fixture(scope="module")
def strict(tmp_path_factory):
    """A cluster with tight limits: small queues, few connections, contained jobs."""
    c = start_cluster(tmp_path_factory, workers=0)
    c.stop_server()
    c.configure(max_queued_per_user=5, max_connections=6)
    c.start_server()
    c.add_worker(slots=2, args=("--max-memory", "400", "--max-open-files", "64", "--max-file-size", "1",
                                "--max-output", "0.01"))
    yield c
    c.stop()


@pytest.fixture(scope="module")
def SD(strict):
    with connected(strict) as session:
        yield session


def server_log(cluster) -> str:
    return (cluster.home / "server.log").read_text()


def test_expired_certificate_is_refused_and_logged(strict, SD, tmp_path):
    """A certificate from the right CA but expired is refused; the log names the peer and why."""
    ca = tls.Authority.load(strict.home)
    past = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(days=30)
    bundle, _ = tls.make_bundle(ca, "root", "admin", strict.address, not_before=past, days=1)
    path = tmp_path / "expired.pem"
    bundle.save(path)
    with pytest.raises((dsage.ConnectionLost, dsage.AuthError)):
        dsage.connect(strict.address, cert=str(path), timeout=15)
    wait_for(lambda: "closed before hello" in server_log(strict) and "expired" in server_log(strict),
             what="a log line about the expired certificate")
    assert SD.eval("'still serving'").wait(timeout=30) == "still serving"


def test_no_client_certificate_is_refused(strict, SD):
    """TLS without a client certificate never reaches the application."""
    host, port = strict.address.rsplit(":", 1)
    context = ssl.create_default_context(cadata=(strict.home / "ca.pem").read_text())
    context.check_hostname = False
    with socket.create_connection(("127.0.0.1", int(port)), timeout=10) as raw:
        with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
            with context.wrap_socket(raw, server_hostname="dsage-server") as tls_sock:
                tls_sock.sendall(b"\x00\x00\x00\x01\x90")
                if not tls_sock.recv(1):
                    raise ConnectionError("closed")
    assert SD.status()["workers"] == 1


def test_a_name_other_than_the_certificates_is_refused(strict, tmp_path):
    """The name a client claims must be its certificate's subject."""
    bundle = dataclasses.replace(tls.Bundle.load(strict.home / "client.pem"), name="mallory")
    path = tmp_path / "liar.pem"
    bundle.save(path)
    with pytest.raises(dsage.AuthError, match="not the certificate's"):
        dsage.connect(strict.address, cert=str(path), timeout=15)


class Tattle:
    """Unpickling this appends the unpickling process's pid to a file."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (exec, (f"import os; open({self.path!r}, 'a').write(str(os.getpid()) + '\\n')",))


def test_the_server_never_unpickles_payloads(strict, SD, tmp_path):
    """A payload whose unpickling leaves a trace: only the worker's job process unpickles it."""
    trace = tmp_path / "unpickled-by"
    payload = pickle.dumps((Tattle(str(trace)), (), {}))
    job_id = SD._call("submit", jobs=[{"kind": "callable", "payload": payload, "name": "tattle",
                                       "max_failures": 1}])["job_ids"][0]
    job = SD.job(job_id)
    with pytest.raises(dsage.JobFailed):       # exec(...) returns None, which is not callable
        job.wait(timeout=60)
    pids = {int(p) for p in trace.read_text().split()}
    assert pids and strict.server.pid not in pids


def test_queue_limit_per_user(strict, SD):
    """Submitting past max_queued_per_user is refused with a clear error; nothing is stored."""
    before = SD.status()["jobs"].get("new", 0)
    with pytest.raises(dsage.RemoteError, match="queue limit"):
        SD.map(abs, range(before + 6))
    assert SD.status()["jobs"].get("new", 0) == before


def test_connection_limit(strict, SD):
    """Past max_connections, new connections are closed at once; the others are unaffected."""
    host, port = strict.address.rsplit(":", 1)
    socks = []
    for _ in range(8):
        try:
            socks.append(socket.create_connection(("127.0.0.1", int(port)), timeout=5))
        except OSError:
            pass            # reset at once, even before connect() returned: the limit at work
    try:
        wait_for(lambda: "max_connections" in server_log(strict), what="the connection limit to act")
        assert SD.eval("'served'").wait(timeout=30) == "served"
    finally:
        for s in socks:
            s.close()


def test_connections_that_come_at_once_wait_in_the_listen_queue(strict, SD):
    """300 connections made while the server cannot accept (stopped, as a reactor busy with
    handshakes) all complete their TCP handshake in the kernel's queue: none is dropped to
    retry a second later, as past Twisted's default queue of 50."""
    host, port = strict.address.rsplit(":", 1)
    socks = []
    strict.server.send_signal(signal.SIGSTOP)
    try:
        for _ in range(300):
            s = socket.socket()
            s.setblocking(False)
            s.connect_ex(("127.0.0.1", int(port)))
            socks.append(s)
        deadline = time.monotonic() + 3
        pending = list(socks)
        while pending and time.monotonic() < deadline:
            _, writable, _ = select.select([], pending, [], 0.1)
            pending = [s for s in pending if s not in writable]
        done = [s for s in socks if s not in pending and s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0]
        # the kernel caps a queue at net.core.somaxconn (4,096 since Linux 5.4, 128 before)
        cap = int(open("/proc/sys/net/core/somaxconn").read()) + 1
        assert len(done) == min(300, cap)
    finally:
        strict.server.send_signal(signal.SIGCONT)
        for s in socks:
            s.close()
    assert SD.eval("'served'").wait(timeout=30) == "served"


def test_the_server_raises_its_open_files_limit_for_its_connections(tmp_path_factory):
    """Started with the 1,024 open files most systems give a process (512 here), the server
    raises its own limit to what max_connections (5,000) needs, as far as the hard limit
    allows: at 1,024 it stopped accepting at 1,008 connections."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (512, hard))
    try:
        cluster = start_cluster(tmp_path_factory, workers=0)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    try:
        with open(f"/proc/{cluster.server.pid}/limits") as f:
            line = next(x for x in f if x.startswith("Max open files"))
        want = 5_000 + SPARE_FILES
        assert int(line.split()[3]) == (want if hard == resource.RLIM_INFINITY else min(want, hard))
        assert cluster.connect().status()["workers"] == 0
    finally:
        cluster.stop()


def test_jobs_are_contained(strict, SD):
    """Memory, open files, file size and output are limited per job, as configured."""
    hog = SD.eval("keep = bytearray(100 << 20)\nx = bytearray(1 << 30)", max_failures=1)
    with pytest.raises(dsage.JobFailed, match="MemoryError"):
        hog.wait(timeout=60)
    # The error says what the worker allows, and how close the job came (its peak).
    note = hog.error.splitlines()[-1]
    assert note.startswith("dsage: this worker limits each job to 400 MiB of address space "
                           "(dsage_worker --max-memory); the job's peak resident memory was ")
    assert int(note.split("was ")[1].split(" MiB")[0]) == round(hog.peak_memory / 2**20) >= 100
    files = SD.eval("fs = [open('f%d' % i, 'w') for i in range(200)]", max_failures=1)
    with pytest.raises(dsage.JobFailed, match="Too many open files"):
        files.wait(timeout=60)
    big = SD.eval("open('big', 'wb').write(b'x' * (5 << 20))", max_failures=1)
    with pytest.raises(dsage.JobFailed):
        big.wait(timeout=60)
    assert "SIGXFSZ" in big.error or "File too large" in big.error
    chatty = SD.eval("for i in range(100000): print('line', i)\n'ok'")
    assert chatty.wait(timeout=60) == "ok"
    assert "[... output truncated by dsage ...]" in chatty.output and len(chatty.output) < 20000
    assert "line 99999" in chatty.output


def test_job_environment_does_not_expose_worker_secrets(strict, SD):
    """The job sees no DSAGE_HOME and no path of the worker's bundle in its environment."""
    env = SD.eval("import os\ndict(os.environ)").wait(timeout=30)
    assert "DSAGE_HOME" not in env
    assert not any(str(strict.home) in v for v in env.values())


def test_init_refuses_a_home_others_can_read(tmp_path):
    """dsage init will not put keys in a folder other users can read."""
    home = tmp_path / "open"
    home.mkdir(mode=0o755)
    os.chmod(home, 0o755)
    out = subprocess.run(["dsage", "init"], env=dict(os.environ, DSAGE_HOME=str(home),
                                                     PATH=os.path.dirname(os.sys.executable) + ":" + os.environ["PATH"]),
                         capture_output=True, text=True)
    assert out.returncode == 1 and "chmod 700" in out.stderr
    assert not (home / "ca.key").exists()


def test_clients_refuse_a_server_from_another_ca(strict, tmp_path):
    """A server whose certificate was not made by the cluster's CA is refused by the client,
    even when it has the right name."""
    from twisted.internet.protocol import Factory, Protocol

    from dsage.client import reactor as rt

    rogue = tls.Authority.create()
    cert, key = rogue.issue("dsage-server", server_hosts=["127.0.0.1"])
    options = tls.server_options(tls.cert_pem(rogue.cert), tls.cert_pem(cert), tls.key_pem(key))

    def listen():
        from twisted.internet import reactor
        return tls.listen(reactor, 0, options, Factory.forProtocol(Protocol), interface="127.0.0.1")
    port = rt.call(listen, timeout=10)
    try:
        with pytest.raises(dsage.ConnectionLost):
            dsage.connect(f"127.0.0.1:{port.getHost().port}", cert=str(strict.home / "client.pem"), timeout=15)
    finally:
        rt.call(port.stopListening, timeout=10)
