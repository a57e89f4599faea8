"""Real database servers for the storage tests: a ZEO server (``runzeo``) and a PostgreSQL
server (``initdb`` and ``pg_ctl`` of Debian's ``postgresql``), each on a free port of
127.0.0.1 in a folder of its own; context managers that yield the server's zodburi URI."""
from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator


def free_port() -> int:
    """A TCP port of 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_listening(port: int, proc: subprocess.Popen | None, what: str, timeout: float = 60.0) -> None:
    """Block until something accepts on 127.0.0.1:`port`; AssertionError if `proc` exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"{what} exited with {proc.returncode}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
            return
        time.sleep(0.05)
    raise AssertionError(f"{what} did not listen on port {port} within {timeout:g} s")


class ZEOServer:
    """A ``runzeo`` process serving a FileStorage with a blob folder; stop and start it again
    on the same port and files."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.port = free_port()
        self.conf = folder / "zeo.conf"
        # A client stopped inside a commit (a server under SIGSTOP) would hold ZEO's commit
        # lock forever: transaction-timeout aborts it, as on a ZEO server in production.
        self.conf.write_text(f"<zeo>\n  address 127.0.0.1:{self.port}\n  transaction-timeout 5\n</zeo>\n"
                             f"<filestorage>\n  path {folder / 'data.fs'}\n  blob-dir {folder / 'blobs'}\n"
                             f"</filestorage>\n")
        self.proc: subprocess.Popen | None = None

    def uri(self, blob_cache: bool = True) -> str:
        """The URI of dsage's ``--db``: with a blob cache of its own, or without (then dsage
        keeps large values in objects, not blobs); a request waits 3 s for a ZEO server that
        went away (ZEO's default: 30 s)."""
        blobs = f"blob_dir={self.folder / 'blob-cache'}&" if blob_cache else ""
        return f"zeo://127.0.0.1:{self.port}?{blobs}wait_timeout=3"

    def start(self) -> None:
        runzeo = Path(sys.executable).with_name("runzeo")
        self.proc = subprocess.Popen([str(runzeo), "-C", str(self.conf)], stdout=subprocess.DEVNULL,
                                     stderr=open(self.folder / "zeo.log", "ab"))
        wait_listening(self.port, self.proc, "runzeo")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(30)
            self.proc = None


@contextlib.contextmanager
def zeo_server(folder: Path) -> Iterator[ZEOServer]:
    server = ZEOServer(folder)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def _postgres_bin() -> Path:
    found = shutil.which("initdb") or next(iter(sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"),
                                                       reverse=True)), None)
    if not found:
        raise AssertionError("PostgreSQL is not installed (Debian: apt-get install postgresql; "
                             "`make test` does it as root)")
    return Path(found).resolve().parent         # the folder of every PostgreSQL program


@contextlib.contextmanager
def postgres_server() -> Iterator[str]:
    """A PostgreSQL server with an empty database ``dsage``; yields its URI (RelStorage).
    As root it runs as the ``postgres`` user, since PostgreSQL refuses to run as root."""
    bin_dir = _postgres_bin()
    folder = Path(tempfile.mkdtemp(prefix="dsage-pg-"))
    as_user: list[str] = []
    if os.geteuid() == 0:
        user = pwd.getpwnam("postgres")
        os.chown(folder, user.pw_uid, user.pw_gid)
        as_user = ["runuser", "-u", "postgres", "--"]
    port = free_port()
    data = folder / "data"

    def run(*args: str) -> None:
        out = subprocess.run(as_user + list(args), capture_output=True, text=True, timeout=120)
        if out.returncode != 0:
            raise AssertionError(f"{' '.join(args)} failed: {out.stdout}{out.stderr}")
    try:
        run(str(bin_dir / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres", "-E", "UTF8", "--no-sync")
        run(str(bin_dir / "pg_ctl"), "-D", str(data), "-l", str(folder / "server.log"), "-w", "-t", "60",
            "-o", f"-p {port} -k {folder} -c listen_addresses=127.0.0.1", "start")
        try:
            run(str(bin_dir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "dsage")
            yield f"postgres://postgres@127.0.0.1:{port}/dsage?connect_timeout=10"
        finally:
            run(str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop")
    finally:
        shutil.rmtree(folder, ignore_errors=True)
