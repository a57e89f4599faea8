"""A local cluster in a temporary DSAGE_HOME: one `dsage_server` and N `dsage_worker`
processes, for notebooks (`dsage.start_all`), the demo and the tests."""
from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import weakref
from pathlib import Path

from dsage import errors


def command(name: str) -> list[str]:
    """The argv prefix of one of dsage's console scripts, next to this Python."""
    script = Path(sys.executable).with_name(name)
    if script.exists():
        return [str(script)]
    module = {"dsage": "dsage.cli"}.get(name)
    entry = {"dsage_server": "server_main", "dsage_worker": "worker_main"}.get(name, "main")
    return [sys.executable, "-c", f"import sys, dsage.daemons as d; sys.exit(d.{entry}())"] if module is None \
        else [sys.executable, "-m", module]


class LocalCluster:
    """Starts and stops a server and workers as real child processes."""

    def __init__(self, home: Path | None = None, *, quiet: bool = True, lease_seconds: float | None = None) -> None:
        self.own_home = home is None
        self.home = Path(home or tempfile.mkdtemp(prefix="dsage-"))
        self.quiet = quiet
        # The server and workers stop by themselves once this program is gone (dsage.daemons).
        self.env = dict(os.environ, DSAGE_HOME=str(self.home), DSAGE_PARENT_PID=str(os.getpid()))
        self.server: subprocess.Popen | None = None
        self.workers: list[subprocess.Popen] = []
        self.address: str | None = None
        self.lease_seconds = lease_seconds
        self._worker_count = 0
        self._sessions: weakref.WeakSet = weakref.WeakSet()

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        """Run a `dsage` command against this cluster's home."""
        out = subprocess.run(command("dsage") + list(args), env=self.env, capture_output=True, text=True)
        if check and out.returncode != 0:
            raise errors.DsageError(f"dsage {' '.join(args)} failed: {out.stderr.strip()}")
        return out

    def init(self) -> None:
        """`dsage init` with a free port chosen by the server."""
        self.run("init", "--port", "0", "--web-port", "0")
        if self.lease_seconds is not None:
            self.configure(lease_seconds=self.lease_seconds, heartbeat_seconds=min(10.0, self.lease_seconds / 4))

    def configure(self, **settings) -> None:
        """Change settings of server.conf (before the server starts)."""
        import configparser

        conf = self.home / "server.conf"
        parser = configparser.ConfigParser(interpolation=None)
        parser.read(conf)
        for key, value in settings.items():
            parser["server"][key] = str(value)
        with open(conf, "w") as fh:
            parser.write(fh)

    def start_server(self, timeout: float = 30.0) -> str:
        """Start dsage_server; returns its address once it listens."""
        addr_file = self.home / "server.addr"
        for stale in (addr_file, self.home / "server.web"):
            stale.unlink(missing_ok=True)
        log = open(self.home / "server.log", "ab")
        # A restart keeps the port, so that workers and clients find the server again.
        port = ["--port", self.address.rsplit(":", 1)[1]] if self.address else []
        self.server = subprocess.Popen(command("dsage_server") + port, env=self.env, stdout=log, stderr=log,
                                       start_new_session=True)
        deadline = time.monotonic() + timeout
        while not addr_file.exists():
            if self.server.poll() is not None:
                raise errors.DsageError(f"dsage_server exited with {self.server.returncode}: "
                                        f"{(self.home / 'server.log').read_text()[-2000:]}")
            if time.monotonic() > deadline:
                raise errors.DsageError("dsage_server did not start in time")
            time.sleep(0.02)
        self.address = addr_file.read_text().strip()
        return self.address

    @property
    def web_url(self) -> str | None:
        """The running server's dashboard (JSON API under ``api/v1/``, metrics at ``metrics``),
        once it listens; None before."""
        path = self.home / "server.web"
        return path.read_text().strip() if path.exists() else None

    def stop_server(self, sig: int = signal.SIGTERM) -> None:
        """Stop (or, with SIGKILL, crash) the server."""
        if self.server is not None:
            _end(self.server, sig)
            self.server = None

    def add_worker(self, slots: int = 1, name: str | None = None, env: dict | None = None,
                   args: tuple[str, ...] = ()) -> subprocess.Popen:
        """Issue a worker bundle (once per name) and start a dsage_worker (`env` adds settings,
        `args` more command-line flags)."""
        self._worker_count += 1
        name = name or f"worker{self._worker_count}"
        bundle = self.home / f"{name}.pem"
        if not bundle.exists():
            self.run("worker", "add", name, "--out", str(bundle))
        log = open(self.home / f"{name}.log", "ab")
        proc = subprocess.Popen(command("dsage_worker") + ["--cert", str(bundle), "--server", self.address,
                                                           "--slots", str(slots), *args],
                                env=dict(self.env, **(env or {})), stdout=log, stderr=log,
                                start_new_session=True)
        proc.log_path = self.home / f"{name}.log"
        self.workers.append(proc)
        return proc

    def wait_for_workers(self, D, n: int | None = None, timeout: float = 30.0) -> None:
        """Block until `n` workers (by default every one started here) are connected to the
        server; DsageError if one of them exits or `timeout` passes first."""
        n = len(self.workers) if n is None else n
        deadline = time.monotonic() + timeout
        while (connected := len(D.workers())) < n:
            for proc in self.workers:
                if proc.poll() is not None:
                    raise errors.DsageError(f"dsage_worker exited with {proc.returncode}: "
                                            f"{proc.log_path.read_text()[-2000:]}")
            if time.monotonic() > deadline:
                tails = " | ".join(f"{p.log_path.name}: {_last_line(p.log_path)}" for p in self.workers)
                raise errors.DsageError(f"{connected} of {n} workers connected within {timeout:g} s "
                                        f"({tails})")
            time.sleep(0.05)

    def connect(self, cert: str | None = None):
        """A blocking session as the admin (or the bundle given)."""
        import dsage

        session = dsage.connect(self.address, cert=cert or str(self.home / "client.pem"))
        self._sessions.add(session)
        return session

    def stop(self) -> None:
        """Close the sessions made by `connect` (their calls fail at once, instead of waiting
        for a server that is not coming back), stop every process, remove a temporary home."""
        for session in list(self._sessions):
            with contextlib.suppress(Exception):
                session.close()
        for proc in self.workers:
            _end(proc, signal.SIGTERM)
        self.workers = []
        self.stop_server()
        if self.own_home:
            shutil.rmtree(self.home, ignore_errors=True)

    def __enter__(self) -> LocalCluster:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _last_line(path: Path) -> str:
    """The last line a process wrote to its log, or "(empty)"."""
    lines = path.read_text(errors="replace").strip().splitlines() if path.exists() else []
    return lines[-1][-300:] if lines else "(empty)"


def _end(proc: subprocess.Popen, sig: int) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def start_all(workers: int = 2, slots: int = 1, home: str | None = None, timeout: float = 30.0):
    """A local server and workers, returned once the workers are connected: (D, cluster).
    `cluster.stop()` ends them."""
    cluster = LocalCluster(Path(home) if home else None)
    D = None
    try:
        cluster.init()
        cluster.start_server()
        for _ in range(workers):
            cluster.add_worker(slots=slots)
        D = cluster.connect()
        cluster.wait_for_workers(D, timeout=timeout)
    except BaseException:
        if D is not None:
            D.close()
        cluster.stop()
        raise
    import atexit

    atexit.register(cluster.stop)
    return D, cluster
