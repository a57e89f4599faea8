"""The commands a user types, as child processes against a real cluster."""
from __future__ import annotations

import os
import re
import signal
import socket
import stat
import subprocess

import pytest

from dsage.client.local import LocalCluster, command
from tests.e2e.conftest import wait_for


def run(home, *args, input=None):
    env = dict(os.environ, DSAGE_HOME=str(home))
    return subprocess.run(command("dsage") + list(args), env=env, capture_output=True, text=True,
                          input=input, timeout=120)


def test_init_makes_private_keys_and_is_idempotent(tmp_path):
    """dsage init writes keys 0600, refuses to replace them without --force."""
    home = tmp_path / "h"
    out = run(home, "init", "--host", "lab.example.org", "--port", "9001")
    assert out.returncode == 0, out.stderr
    for name in ("ca.key", "server.key", "client.pem"):
        assert stat.S_IMODE((home / name).stat().st_mode) == 0o600
    assert stat.S_IMODE(home.stat().st_mode) == 0o700
    assert "lab.example.org:9001" in (home / "client.pem").read_text()
    key = (home / "ca.key").read_bytes()
    again = run(home, "init")
    assert again.returncode == 0 and "already set up" in again.stdout
    assert (home / "ca.key").read_bytes() == key
    conf = (home / "server.conf").read_text()
    moved = run(home, "init", "--db", "zeo://zodb.example.org:8100")
    assert moved.returncode == 0 and (home / "server.conf").read_text() == conf
    assert f"--db is not used: to move to zeo://zodb.example.org:8100, set db = zeo://zodb.example.org:8100 in " \
           f"{home / 'server.conf'}" in moved.stdout
    forced = run(home, "init", "--force")
    assert forced.returncode == 0 and (home / "ca.key").read_bytes() != key


def test_identities_offline(tmp_path):
    """With the server down, user and worker bundles are issued on the database directly."""
    home = tmp_path / "h"
    assert run(home, "init").returncode == 0
    out = run(home, "user", "add", "alice", "--out", str(tmp_path / "alice.pem"))
    assert out.returncode == 0, out.stderr
    assert stat.S_IMODE((tmp_path / "alice.pem").stat().st_mode) == 0o600
    assert run(home, "worker", "add", "lab1", "--out", str(tmp_path / "lab1.pem")).returncode == 0
    again = run(home, "user", "add", "alice", "--out", str(tmp_path / "alice2.pem"))
    assert again.returncode == 1 and "already exists" in again.stderr
    listing = run(home, "user", "list").stdout
    assert "alice" in listing and "lab1" in listing and "worker" in listing


@pytest.mark.parametrize("args, message", [
    (("submit",), "give a FILE or -c CODE"),
    (("submit", "job.py", "-c", "1"), "give a FILE or -c CODE, not both"),
    (("submit", "/no/such/file.py"), "cannot read"),
    (("submit", "/bin/sh"), "/bin/sh is not Python source: it is not UTF-8 text"),
    (("kill", "notanumber"), "invalid int value"),
    (("user", "add", "bad name", "--out", "x.pem"), "invalid name"),
    (("demo", "--workers", "0"), "--workers must be at least 1, not 0"),
    (("init", "--force", "--port", "70000"), "the port must be from 0 (any free port) to 65535, not 70000"),
    (("init", "--force", "--host", "lab 7!"), "the host 'lab 7!' is neither a host name nor an IP address"),
    (("worker", "--nice", "-5"), "--nice must be from 0 (the worker's own priority) to 19 (the lowest), not -5"),
    (("worker", "--max-memory", "-1"), "--max-memory must not be negative, not -1"),
    (("worker", "--recycle-memory", "-1"), "--recycle-memory must not be negative, not -1"),
    (("worker", "--max-memory", "inf"), "--max-memory must be a finite number, not inf"),
    (("worker", "--recycle-memory", "nan"), "--recycle-memory must be a finite number, not nan"),
    (("demo", "--number", "1"), "--number must be at least 2, not 1"),
    (("jobs", "--limit", "0"), "--limit must be at least 1, not 0"),
    (("init", "--force", "--db", "postgresql://u@h/db"), "no storage for postgresql:// is installed: "
                                                         "PostgreSQL URIs start with postgres://"),
    (("init", "--force", "--db", "mongo://h/db"), "no storage for mongo:// is installed; known: "),
    (("server", "--db", "dsage.fs"), "bad database URI 'dsage.fs': not scheme://... (file:///path/dsage.fs, "),
    (("server", "--port", "99999"), "the port must be from 0 (any free port) to 65535, not 99999"),
    (("server", "--web-port", "-5"), "the web port must be from -1 (no dashboard) to 65535, not -5"),
])
def test_user_errors_are_one_line_without_traceback(tmp_path, args, message):
    """Bad input gets a clear message and a non-zero status, never a traceback."""
    home = tmp_path / "h"
    run(home, "init")
    out = run(home, *args)
    assert out.returncode != 0
    assert message in out.stderr and "Traceback" not in out.stderr


def test_a_server_with_a_garbled_config_or_a_database_it_cannot_reach_says_so(tmp_path):
    """A server.conf that is not one, and a ZEO server that does not answer: one line each,
    exit status 1 (they were tracebacks)."""
    home = tmp_path / "h"
    run(home, "init")
    garbled = tmp_path / "garbled.conf"
    garbled.write_text("port 8081\n")
    out = run(home, "server", "--config", str(garbled))
    assert out.returncode == 1 and out.stderr == (
        f"dsage: error: {garbled} is not a configuration file of [sections] and key = value lines: "
        f"File contains no section headers.\n")
    out = run(home, "server", "--db", "zeo://127.0.0.1:1?wait_timeout=1")
    assert out.returncode == 1
    assert out.stderr.splitlines()[-1] == ("dsage: error: cannot open the database zeo://127.0.0.1:1: "
                                           "timed out waiting for connection")
    assert "Traceback" not in out.stderr


def test_a_server_that_cannot_listen_says_why_and_exits_1(tmp_path):
    """A port in use: one line naming it, exit status 1, no traceback."""
    home = tmp_path / "h"
    run(home, "init")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        out = run(home, "server", "--port", str(port), "--web-port", "-1")
    assert out.returncode == 1, out.stderr
    assert f"cannot listen on 127.0.0.1:{port}" in out.stderr and "Address already in use" in out.stderr
    assert "Traceback" not in out.stderr


def test_the_server_logs_to_its_log_file_and_reopens_it_on_sighup(tmp_path):
    """`log_file`: the server's log goes there; after logrotate moves it away and sends
    SIGHUP, the server writes a new one and serves on; a file it cannot write is one line."""
    log = tmp_path / "server.log"
    with LocalCluster(tmp_path / "home") as c:
        c.init()
        c.configure(log_file=str(log))
        c.start_server()
        wait_for(lambda: "listening on" in log.read_text(), what="the log file")
        log.rename(tmp_path / "server.log.1")
        c.server.send_signal(signal.SIGHUP)
        D = c.connect()
        D.status()
        wait_for(lambda: log.exists() and "connected from" in log.read_text(), what="a new log file")
        D.close()
        assert "listening on" in (tmp_path / "server.log.1").read_text()
        assert "listening on" not in log.read_text() and c.server.poll() is None
    out = run(tmp_path / "home", "server", "--log-file", str(tmp_path / "no" / "such.log"))
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert out.stderr.strip() == (f"dsage: error: cannot write the log file {tmp_path / 'no' / 'such.log'}: "
                                  "No such file or directory")


def test_no_server_is_a_clear_error(tmp_path):
    """Talking to a server that is not running says so."""
    home = tmp_path / "h"
    run(home, "init", "--port", "1")
    out = run(home, "status")
    assert out.returncode == 1 and "cannot connect" in out.stderr and "Traceback" not in out.stderr


def test_job_commands_against_a_cluster(cluster, D, tmp_path):
    """submit --wait, jobs, job, result, kill and status work from the shell."""
    home = cluster.home
    script = tmp_path / "work.py"
    script.write_text("print('from a file')\nsum(range(10))\n")
    out = run(home, "submit", str(script), "--wait")
    assert out.returncode == 0, out.stderr
    job_id, *rest = out.stdout.splitlines()
    assert rest == ["from a file", "45"]
    assert run(home, "result", job_id).stdout.strip() == "45"
    shown = run(home, "job", job_id).stdout
    assert "completed" in shown and "from a file" in shown and "work.py" in shown
    assert job_id in run(home, "jobs").stdout
    assert run(home, "jobs", "--status", "killed").stdout == "no killed jobs of yours\n"
    newest = run(home, "jobs", "--limit", "1").stdout.splitlines()
    assert newest[1].split()[0] == job_id and newest[2] == "(the newest 1 jobs shown: --limit N for more)"
    long = run(home, "submit", "-c", "import time\ntime.sleep(60)")
    long_id = long.stdout.strip()
    killed = run(home, "kill", long_id)
    assert killed.returncode == 0 and "killed" in killed.stdout
    gone = run(home, "result", long_id)
    assert gone.returncode == 1 and gone.stderr == f"dsage: error: job {long_id} was killed\n"
    failed = run(home, "submit", "-c", "1/0", "--wait")
    assert failed.returncode == 1
    assert failed.stderr.startswith(f"dsage: error: job {failed.stdout.strip()} failed: ZeroDivisionError: "
                                    f"division by zero\nTraceback")
    again = run(home, "result", failed.stdout.strip())          # says what submit --wait said
    assert again.returncode == 1 and again.stderr == failed.stderr
    sized = run(home, "submit", "-c", "'sized'", "--memory", "64", "--wait")
    assert sized.stdout.splitlines()[1:] == ["'sized'"], sized.stderr
    assert "needs 64 MiB" in run(home, "job", sized.stdout.split()[0]).stdout
    bad = run(home, "submit", "-c", "1", "--memory", "0")
    assert bad.returncode == 1 and bad.stderr.startswith("dsage: error: memory must be the MiB the job needs")
    status = run(home, "status").stdout
    assert "workers 1" in status and "worker1" in status
    assert re.search(r"^server: busy \d+% of the last minute$", status, re.M), status


def test_an_unwritable_bundle_adds_no_one_and_only_an_admin_adds_anyone(cluster, D, tmp_path):
    """A bundle that cannot be written is refused before the identity is made (it used to
    be made, and the next try said it already existed); a client asking to add someone is
    told that only an admin may."""
    home = cluster.home
    out = run(home, "user", "add", "alice", "--out", str(tmp_path / "no" / "such" / "alice.pem"))
    assert out.returncode == 1
    assert out.stderr == f"dsage: error: cannot write {tmp_path}/no/such/alice.pem: No such file or directory\n"
    bundle = tmp_path / "alice.pem"
    out = run(home, "user", "add", "alice", "--out", str(bundle))
    assert out.returncode == 0, out.stderr
    out = run(home, "user", "add", "bob", "--out", str(tmp_path / "bob.pem"), "--cert", str(bundle))
    assert out.returncode == 1 and not (tmp_path / "bob.pem").exists()
    assert out.stderr == "dsage: error: only an admin may add users and workers (this is client alice)\n"


def test_job_says_why_a_queued_job_waits(tmp_path):
    """`dsage job` of a queued job, and `dsage submit --wait` after a few seconds, say what
    the job waits for: a worker, or a free slot."""
    with LocalCluster(tmp_path / "home") as cluster:
        cluster.init()
        cluster.start_server()
        env = dict(os.environ, DSAGE_HOME=str(cluster.home))
        waiting = subprocess.Popen(command("dsage") + ["submit", "-c", "6 * 7", "--wait"], env=env, text=True,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        note = waiting.stderr.readline()
        assert note.startswith("dsage: job ") and note.endswith(
            " waits: no worker is connected (start one: dsage_worker --cert BUNDLE)\n")
        first = run(cluster.home, "submit", "-c", "import time\ntime.sleep(60)").stdout.strip()
        shown = run(cluster.home, "job", first).stdout
        assert "  waiting   no worker is connected (start one: dsage_worker --cert BUNDLE)\n" in shown
        cluster.add_worker(slots=1)
        out, _ = waiting.communicate(timeout=60)   # the worker came: the waiting job ran first
        assert waiting.returncode == 0 and out.splitlines()[-1] == "42"
        with cluster.connect() as D:
            wait_for(lambda: D.job(int(first)).status == "processing", what="the sleeping job to start")
        second = run(cluster.home, "submit", "-c", "1").stdout.strip()
        shown = run(cluster.home, "job", second).stdout
        assert ("  waiting   all 1 slots of 1 workers are busy, 1 jobs queued (lower priority numbers go "
                "first, then users take turns, each one's oldest first)\n") in shown
        assert "waiting" not in run(cluster.home, "job", first).stdout


def test_a_bundle_issued_by_a_running_server_has_its_real_port(cluster, D, tmp_path):
    """A server configured with port 0 listens on a port of its choosing; the bundles it
    issues name that port, so `--cert` alone reaches it (they said port 0)."""
    bundle = tmp_path / "carol.pem"
    assert run(cluster.home, "user", "add", "carol", "--out", str(bundle)).returncode == 0
    out = run(cluster.home, "submit", "-c", "6 * 7", "--wait", "--cert", str(bundle))
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[-1] == "42"


def test_pack_online_and_offline(cluster, D, tmp_path):
    """dsage pack works through the running server and on a stopped one's database."""
    D.eval("1").wait(timeout=30)
    out = run(cluster.home, "pack")
    assert out.returncode == 0 and "packed" in out.stdout, out.stderr
    home = tmp_path / "h"
    run(home, "init")
    out = run(home, "pack")
    assert out.returncode == 0 and "packed" in out.stdout, out.stderr


def test_output_into_a_closed_pipe_is_quiet(cluster, D):
    """`dsage jobs | head -1` ends quietly when head stops reading."""
    D.map(abs, range(30))
    env = dict(os.environ, DSAGE_HOME=str(cluster.home))
    out = subprocess.run(" ".join(command("dsage")) + " jobs --limit 1000 | head -1", shell=True, env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.stdout.split() == ["id", "status", "owner", "fails", "name"]
    assert "error" not in out.stderr
