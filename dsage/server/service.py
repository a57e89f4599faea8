"""The server's service tree: the store (opened first, closed last), the TLS listener, the
lease reaper and the database maintenance."""
from __future__ import annotations

import contextlib
import os
import resource
import socket
import uuid
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from twisted.application import internet, service
from twisted.internet import defer
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.logger import Logger

from dsage import errors, tls
from dsage.config import ServerConfig, masked
from dsage.server.access import Held
from dsage.server.connections import ServerFactory
from dsage.server.hub import Hub
from dsage.server.load import SAMPLE_SECONDS
from dsage.server.maintenance import Maintenance
from dsage.server.store import JobStore
from dsage.server.syncer import file_storage


#: the ZODB cache of the server's connection: objects, and their estimated bytes.
CACHE_OBJECTS = 100_000
CACHE_BYTES = 256 << 20


def open_db(uri: str):
    """Open the ZODB database named by a zodburi URI (file://, zeo://, postgres://, ...).

    Raises ValueError with a clear message when the URI is wrong or the file is in use."""
    import ZODB
    from zc.lockfile import LockError
    from zodburi import NoResolverForScheme, resolve_uri

    if "://" not in uri:
        raise ValueError(f"bad database URI {masked(uri)!r}: not scheme://... (file:///path/dsage.fs, "
                         f"zeo://host:port, postgres://user@host/db)")
    if uri.startswith("file://"):
        path = Path(uri[len("file://"):].split("?", 1)[0])
        path.parent.mkdir(parents=True, exist_ok=True)
    try:
        storage_factory, dbkw = resolve_uri(uri)
    except NoResolverForScheme:
        scheme, known = uri.partition("://")[0], _schemes()
        if scheme == "postgresql" and "postgres" in known:
            hint = ": PostgreSQL URIs start with postgres://"
        elif scheme in ("postgres", "postgresql"):
            hint = " (PostgreSQL: pip install 'dsage[postgres]')"
        elif scheme in RELSTORAGE:
            hint = " (pip install RelStorage and the database's driver)"
        else:
            hint = f"; known: {', '.join(s + '://' for s in sorted(known))}"
        raise ValueError(f"bad database URI {masked(uri)!r}: no storage for {scheme}:// is installed{hint}") from None
    except Exception as e:
        raise ValueError(f"bad database URI {masked(uri)!r}: {e}") from None
    # zodburi gives every URI a cache of 10,000 objects: ours, unless the URI names one.
    if not uri.startswith("zconfig:") and "connection_cache_size" not in parse_qs(urlsplit(uri).query):
        dbkw["cache_size"] = CACHE_OBJECTS
    # Payloads and results make objects of up to 64 KiB: bound the cache by size too.
    dbkw.setdefault("cache_size_bytes", CACHE_BYTES)
    try:
        db = ZODB.DB(storage_factory(), **dbkw)
    except LockError:
        raise ValueError(f"the database {masked(uri).split('?')[0]} is in use by another process "
                         f"(is a dsage_server already running?)") from None
    except Exception as e:      # a database server that does not answer, a file that cannot be read
        raise ValueError(f"cannot open the database {masked(uri).split('?')[0]}: {e}") from None
    fs = file_storage(db.storage)
    if fs is not None and uri.startswith("file://"):
        # FileStorage keeps the file of before each pack as dsage.fs.old until the next
        # one: the automatic packs would need twice the disk (zodburi has no option for it).
        fs.pack_keep_old = False
    return db


#: the URI schemes RelStorage adds to zodburi's when it is installed.
RELSTORAGE = ("postgres", "mysql", "oracle", "sqlite")


def _schemes() -> set[str]:
    from importlib.metadata import entry_points

    return {ep.name for ep in entry_points(group="zodburi.resolvers")}


def _boot_id() -> str:
    """This machine's boot (Linux), which tells its process ids from another's of the same name."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


class _Refused(Exception):
    """The server cannot start: the database is held by another one."""


#: files the server keeps open beside its connections (database, blobs, logs, web clients).
SPARE_FILES = 256


def raise_open_files(connections: int) -> tuple[int, int]:
    """Raise this process's soft limit of open files to what `connections` connections need
    (most systems start a process at 1,024, a thousand workers' connections), as far as the
    hard limit allows; (the soft limit now, the number wanted)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = connections + SPARE_FILES
    if soft != resource.RLIM_INFINITY and soft < want:
        new = want if hard == resource.RLIM_INFINITY else min(want, hard)
        if new > soft:
            resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
            soft = new
    return soft, want


class ServerService(service.MultiService):
    """dsage_server: owns the database, the listener and the reaper."""

    log = Logger()

    def __init__(self, config: ServerConfig, reactor, db=None) -> None:
        super().__init__()
        self.config = config
        self.db = db
        self.reactor = reactor
        self.store: JobStore | None = None
        self.hub: Hub | None = None
        self.port = None
        self.web_port = None
        self.failed = False     # could not listen
        self.holder: dict | None = None     # this server's hold on a shared database

    def startService(self) -> None:
        home = self.config.home
        files, want = raise_open_files(self.config.max_connections)
        if files != resource.RLIM_INFINITY and files < want:
            self.log.warn("this process may open only {files} files (its hard limit): about {n} connections, "
                          "not max_connections {max}; raise the limit (ulimit -Hn; LimitNOFILE= in a systemd "
                          "unit)", files=files, n=max(0, files - SPARE_FILES), max=self.config.max_connections)
        self.log.info("opening database {uri}", uri=masked(self.config.db_uri).split("?")[0])
        self.store = JobStore(self.db or open_db(self.config.db_uri), reactor=self.reactor)
        self.store.start()
        self._adopt_admin()
        self.store.grace(self.config.lease_seconds).addCallback(
            lambda n: n and self.log.info("{n} jobs were running: their workers have {s} s to report",
                                          n=n, s=self.config.lease_seconds))
        ca = tls.Authority.load(home) if (home / "ca.key").exists() else None
        self.hub = Hub(self.store, self.reactor, lease_seconds=self.config.lease_seconds,
                       heartbeat_seconds=self.config.heartbeat_seconds, ca=ca,
                       address=f"{self.config.host}:{self.config.port}",
                       max_queued_per_user=self.config.max_queued_per_user,
                       max_connections=self.config.max_connections)
        reaper = internet.TimerService(max(0.5, self.config.lease_seconds / 4), self.hub.reap)
        reaper.clock = self.reactor
        reaper.setServiceParent(self)
        load = internet.TimerService(SAMPLE_SECONDS, self.hub.load.sample)
        load.clock = self.reactor
        load.setServiceParent(self)
        Maintenance(self.store, self.reactor, keep_days=self.config.keep_days,
                    pack_growth=self.config.pack_growth, pack_min_mb=self.config.pack_min_mb,
                    interval=self.config.maintenance_seconds,
                    index_interval=self.config.index_seconds).setServiceParent(self)
        if file_storage(self.store.db.storage) is None:      # ZEO, RelStorage: others may reach it
            self.holder = {"host": socket.gethostname(), "boot": _boot_id(), "pid": os.getpid(),
                           "token": uuid.uuid4().hex}
            # The hold lasts `hold_seconds` (30) unless renewed, every third of that.
            renew = internet.TimerService(self.config.hold_seconds / 3, self._hold_again)
            renew.clock = self.reactor
            renew.setServiceParent(self)
        super().startService()
        d = self._hold() if self.holder else defer.succeed(None)
        d.addCallback(lambda _: self._listen())
        d.addErrback(self._listen_failed)

    def _hold(self) -> defer.Deferred:
        """Hold the shared database before listening (`_Refused` if another server does, or
        the database fails)."""
        def refused(failure):
            failure.trap(errors.DsageError)
            raise _Refused(failure.getErrorMessage())
        return self.store.hold(self.holder, self.config.hold_seconds).addErrback(refused)

    def _hold_again(self) -> None:
        """Renew the hold; if another server took the database meanwhile (this one stalled
        past the hold), stop rather than lease the same jobs."""
        def failed(failure) -> None:
            if failure.check(Held):
                self.log.critical("stopping: {why}", why=failure.getErrorMessage())
                self.failed = True
                self.reactor.stop()
            else:
                self.log.error("cannot hold the database: {why}", why=failure.getErrorMessage())
        if self.store is not None and self.port is not None:
            self.store.hold(self.holder, self.config.hold_seconds).addErrback(failed)

    def _adopt_admin(self) -> None:
        """A database with no identity yet (one named after `dsage init`, by `--db` or in
        server.conf) takes this home's admin, the one `dsage init` made (client.pem)."""
        path = self.config.home / "client.pem"
        try:
            bundle = tls.Bundle.load(path)
        except (OSError, ValueError):
            return
        if bundle.role != "admin":
            return
        self.store.first_admin(bundle.name, bundle.certificate().serial_number).addCallback(
            lambda new: new and self.log.info("a database without users: {name} (of {path}) is its admin",
                                              name=bundle.name, path=str(path)))

    async def _listen_async(self) -> None:
        home = self.config.home
        options = tls.server_options((home / "ca.pem").read_bytes(), (home / "server.pem").read_bytes(),
                                     (home / "server.key").read_bytes())
        self.port = await tls.listen(self.reactor, self.config.port, options, ServerFactory(self.hub),
                                     interface=self.config.interface)
        port = self.port.getHost().port
        self.hub.address = f"{self.config.host}:{port}"     # in bundles issued: the port chosen, if 0
        addr_file = home / "server.addr"
        tmp = addr_file.with_name("server.addr.tmp")
        tmp.write_text(f"{self.config.host}:{port}\n")
        os.replace(tmp, addr_file)
        self.log.info("dsage_server listening on {interface}:{port} (TLS, client certificates required)",
                      interface=self.config.interface, port=port)
        await self._listen_web()

    async def _listen_web(self) -> None:
        """The dashboard, JSON API and metrics; a failure here does not stop the server."""
        from dsage.server.web import site

        if self.config.web_port < 0:
            return
        endpoint = TCP4ServerEndpoint(self.reactor, self.config.web_port, interface=self.config.web_interface)
        try:
            self.web_port = await endpoint.listen(site(self.hub))
        except Exception as e:
            self.log.error("dashboard not started: cannot listen on {interface}:{port}: {why}",
                           interface=self.config.web_interface, port=self.config.web_port, why=str(e))
            return
        url = f"http://{self.config.web_interface}:{self.web_port.getHost().port}/"
        tmp = self.config.home / "server.web.tmp"
        tmp.write_text(url + "\n")
        os.replace(tmp, self.config.home / "server.web")
        self.log.info("dashboard, JSON API and metrics at {url}", url=url)

    def _listen(self) -> defer.Deferred:
        return defer.Deferred.fromCoroutine(self._listen_async())

    def _listen_failed(self, failure) -> None:
        """No listener (or the database held by another server): say why in one line, and
        stop (`dsage_server` then exits with 1)."""
        self.failed = True
        if failure.check(_Refused):
            self.log.critical("{why}", why=failure.getErrorMessage())
        else:
            self.log.critical("cannot listen on {interface}:{port}: {why}", interface=self.config.interface,
                              port=self.config.port, why=failure.getErrorMessage())
        if self.reactor.running:
            self.reactor.stop()
        else:           # `twist` starts its services before its reactor
            self.reactor.callWhenRunning(self.reactor.stop)

    async def _stop(self) -> None:
        for port in (self.port, self.web_port):
            if port is not None:
                await port.stopListening()
        await service.MultiService.stopService(self)
        if self.hub is not None:
            self.hub.dispatcher.stop()
        if self.store is not None:
            if self.holder and not self.failed:
                with contextlib.suppress(Exception):
                    await self.store.let_go(self.holder["token"])
            self.store.stop()

    def stopService(self) -> defer.Deferred:
        return defer.Deferred.fromCoroutine(self._stop())
